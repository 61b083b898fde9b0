"""Generation and editing with FLUX.2 (klein-4b/9b distilled, klein-base-4b/9b, dev).

    pipe = Flux2Pipeline.from_pretrained("klein-4b")           # short name, repo id or local folder
    images = pipe.generate("a red fox in the snow", width=1024, height=1024, seed=0)
    edited = pipe.generate("make it winter", image="photo.jpg")  # reference image(s): editing

Where the weights come from: `mflux2.model_files`; when the components load and are freed (LoRAs,
`low_memory`, `release`): `mflux2.components`, whose `PipelineComponents` this pipeline extends with
generation. With `low_memory` `generate` encodes the prompts, frees the text encoder, denoises, frees
the transformer and decodes — so only one large component is ever resident.

Sampling follows BFL/diffusers (docs/architecture.md, "Sampling"): empirical-mu schedule, Euler steps
in float32 latents; dev embeds the guidance scale; klein-base runs real CFG against the negative
prompt ("" by default); distilled klein uses 4 steps (the count it was distilled for; others run as
asked, with a warning) and no guidance.

Editing (docs/architecture.md, "Reference images"): reference images are prepared as diffusers'
Flux2KleinPipeline does (`prepare_reference`), VAE-encoded (posterior mean), patchified, batch-normed
and packed; reference j gets position ids t = 10·(j+1) on its own grid, and its clean tokens follow
the noisy ones in every forward (`sampling.denoise`).
"""

from __future__ import annotations

import math
import os
import warnings

import mlx.core as mx
from PIL import Image

from mflux2 import sampling
from mflux2.components import PipelineComponents

# Sampling defaults per family [BFL util.py / cli.py; docs/architecture.md, "Variants"]
DEFAULT_STEPS = {"klein": 4, "klein-base": 50, "dev": 50}
DEFAULT_GUIDANCE = {"klein": 1.0, "klein-base": 4.0, "dev": 4.0}
DEFAULT_SIZE = 1024  # width and height without a reference image (diffusers' default_sample_size x 8)

# Pixel-area caps of a reference image: diffusers' pipelines cap each at 1024² (the default, for
# parity); BFL's reference code allows 2024² for a single reference and 1024² each for several.
REFERENCE_CAPS = ("diffusers", "bfl")
REFERENCE_MIN_SIDE, REFERENCE_MAX_ASPECT = 64, 8  # both tools refuse smaller or more elongated images


def reference_area(caps: str, count: int) -> int:
    """The pixel area a reference is scaled down to (if larger) under `caps` with `count` references."""
    if caps not in REFERENCE_CAPS:
        raise ValueError(f"reference_caps={caps!r}: choose {' or '.join(REFERENCE_CAPS)}")
    return 2024 * 2024 if caps == "bfl" and count == 1 else 1024 * 1024


def reference_scaled_size(w: int, h: int, max_area: int) -> tuple[int, int]:
    """The size a w x h reference is scaled down to when larger than `max_area` pixels (sides truncated,
    as diffusers does); before the crop to multiples of 16."""
    if w * h <= max_area:
        return w, h
    scale = math.sqrt(max_area / (w * h))
    return int(w * scale), int(h * scale)


def prepare_reference(image, max_area: int = 1024 * 1024, name: str = "reference image") -> Image.Image:
    """A reference image (PIL image or path) as the model sees it, exactly as diffusers'
    Flux2KleinPipeline / Flux2Pipeline prepare `image=` (and BFL's `default_prep`): RGB (EXIF-
    oriented for a file), sides >= 64 and aspect <= 8 checked, scaled down with LANCZOS to `max_area`
    if larger (sides truncated), then centre-cropped to multiples of 16 (no resize)."""
    from mflux2.images import open_rgb, to_rgb

    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        image = open_rgb(image)
    elif isinstance(image, Image.Image):
        image = to_rgb(image)
    else:
        raise ValueError(f"{name}: expected a PIL image or a file path, got {type(image).__name__}")
    w, h = image.size
    if w < REFERENCE_MIN_SIDE or h < REFERENCE_MIN_SIDE:
        raise ValueError(f"{name}: {w}x{h} is too small; a reference image needs both sides >= {REFERENCE_MIN_SIDE} px")
    if max(w / h, h / w) > REFERENCE_MAX_ASPECT:
        raise ValueError(f"{name}: {w}x{h} is too elongated; a reference image needs an aspect ratio <= {REFERENCE_MAX_ASPECT}:1")
    if (w, h) != (size := reference_scaled_size(w, h, max_area)):
        image = image.resize(size, Image.Resampling.LANCZOS)
        w, h = size
    cw, ch = w // 16 * 16, h // 16 * 16
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)) if (cw, ch) != (w, h) else image


class GenerationWarning(UserWarning):
    """A generation setting was adjusted or ignored (e.g. guidance for distilled klein)."""


class Flux2Pipeline(PipelineComponents):
    """FLUX.2 text-to-image and editing. Build it with `from_pretrained`; components load on first use."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._warned: set[str] = set()  # warnings given once per pipeline

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, GenerationWarning, stacklevel=4)

    def encode_prompt(self, prompts: str | list[str]) -> tuple[mx.array, mx.array]:
        """prompts -> (prompt_embeds [B, L, 3·hidden], text_ids [B, L, 4]) with L = 512."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, ids = self.text_encoder.encode(prompts)
        mx.eval(embeds, ids)
        return embeds, ids

    def sampling_settings(self, num_inference_steps: int | None, guidance_scale: float | None,
                          negative_prompt: str | list[str] | None = None) -> tuple[int, float, bool]:
        """(steps, guidance, use_cfg) after the variant's defaults and rules; warns on ignored settings."""
        fam = self.family
        own = self.source.sampling  # the model folder's own defaults (model_files.SAMPLING_FILE), else the family's
        steps = own.get("steps", DEFAULT_STEPS[fam]) if num_inference_steps is None else int(num_inference_steps)
        guidance = float(own.get("guidance", DEFAULT_GUIDANCE[fam])) if guidance_scale is None else float(guidance_scale)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if fam == "klein":
            if steps != DEFAULT_STEPS["klein"]:  # run as asked, as diffusers does
                self._warn_once(f"{self.source.name} is step-distilled for 4 steps; running {steps} as asked")
            if guidance != 1.0:
                warnings.warn(f"{self.source.name} is guidance-distilled: guidance {guidance} is ignored", GenerationWarning, stacklevel=3)
                guidance = 1.0
        if negative_prompt is not None and not (fam == "klein-base" and guidance > 1.0):
            warnings.warn(f"negative_prompt is ignored: {self.source.name} runs no classifier-free guidance"
                          + (" at guidance <= 1" if fam == "klein-base" else ""), GenerationWarning, stacklevel=3)
        return steps, guidance, fam == "klein-base" and guidance > 1.0

    def prepare_references(self, images, reference_caps: str = "diffusers") -> list[Image.Image]:
        """Reference images (a PIL image, a path, or a list of them) as the model sees them
        (`prepare_reference`), each capped to `reference_area(reference_caps, count)` pixels."""
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not images:
            raise ValueError("image=[] holds no reference image: pass one or more, or leave image out")
        area = reference_area(reference_caps, len(images))
        return [prepare_reference(im, area, name=f"reference image {j}") for j, im in enumerate(images)]

    def encode_references(self, images, reference_caps: str = "diffusers") -> tuple[mx.array, mx.array]:
        """Reference images -> (tokens [1, M, 128] float32, ids [M, 4]): each prepared
        (`prepare_references`), VAE-encoded (posterior mean, as diffusers' argmax), patchified,
        batch-normed and packed; reference j gets ids (10·(j+1), row, col, 0) on its own grid.
        The same encoding serves `generate(image=...)` and the trainer's validation images."""
        return self._encode_prepared(self.prepare_references(images, reference_caps))

    def _encode_prepared(self, prepared: list[Image.Image]) -> tuple[mx.array, mx.array]:
        from mflux2.images import pil_to_array
        from mflux2.models.vae import image_ids

        vae = self.vae
        tokens, ids = [], []
        for j, im in enumerate(prepared):
            w, h = im.size
            tokens.append(vae.pack(vae.encode(pil_to_array(im)[None]))[0])
            ids.append(image_ids(h, w, t=10 * (j + 1)))
        tokens, ids = mx.concatenate(tokens)[None], mx.concatenate(ids)
        mx.eval(tokens, ids)
        return tokens, ids

    def generate(self, prompt: str | list[str], width: int | None = None, height: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 latents: mx.array | None = None, negative_prompt: str | list[str] | None = None,
                 progress: bool = True, output_type: str = "pil", image=None,
                 reference_caps: str = "diffusers") -> list:
        """Generate one image per prompt; returns PIL images.

        Defaults per variant: distilled klein 4 steps / no guidance (guidance is ignored with a
        warning; another step count runs with one); klein-base 50 steps, real CFG with scale 4.0
        against `negative_prompt` ("" by default); dev 50 steps, embedded guidance 4.0 — unless the
        model folder has its own (model_files.SAMPLING_FILE: the toy's 64², 20 steps, 2.0). Image i uses
        the noise of `seed + i`, or `latents` [B, H/16·W/16, 128] (packed, row-major) if given.
        `output_type`: "pil", or "array" for float32 mx arrays [H, W, 3] in [0, 1], or "latent" for
        the packed latents.

        Editing: `image` is a reference image (PIL image or path) or a list of them, shared by all
        prompts (diffusers' argument). Each is capped to 1024² pixels (`reference_caps="bfl"`: 2024²
        for a single one) and cropped to multiples of 16; width and height default to the first
        reference's prepared size (without references: the folder's own size, else 1024)."""
        if output_type not in ("pil", "array", "latent"):
            raise ValueError(f"output_type={output_type!r}: choose pil, array or latent")
        from tqdm.auto import tqdm

        from mflux2.models.vae import image_ids

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        prepared = self.prepare_references(image, reference_caps) if image is not None else None
        if width is None:  # diffusers: each side on its own, from the first reference
            width = prepared[0].width if prepared else self.source.sampling.get("width", DEFAULT_SIZE)
        if height is None:
            height = prepared[0].height if prepared else self.source.sampling.get("height", DEFAULT_SIZE)
        sampling.check_size(height, width)
        steps, guidance, cfg = self.sampling_settings(num_inference_steps, guidance_scale, negative_prompt)
        b, n = len(prompts), sampling.image_seq_len(height, width)
        if latents is None:
            latents = sampling.initial_noise(seed, b, height, width)
        elif tuple(latents.shape) != (b, n, sampling.LATENT_CHANNELS):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {b} prompt(s) at {width}x{height}: expected {(b, n, sampling.LATENT_CHANNELS)}")
        latents = latents.astype(mx.float32)

        embeds, txt_ids = self.encode_prompt(prompts)
        neg_embeds = neg_ids = None
        if cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * b if isinstance(neg, str) else list(neg)
            if len(neg) != b:
                raise ValueError(f"{len(neg)} negative prompts for {b} prompts: give one, or one per prompt")
            neg_embeds, neg_ids = self.encode_prompt(neg)
        if self.low_memory:
            self.release("text_encoder")
        refs, ref_ids = self._encode_prepared(prepared) if prepared else (None, None)

        sigmas = sampling.get_sigmas(steps, n)  # the target's tokens only: references do not shift mu
        img_ids = image_ids(height, width)
        model = self.transformer
        out = []
        bar = tqdm(total=steps * b, desc="denoising", unit="step", disable=not progress, leave=False)
        for i in range(b):  # one image at a time: image i depends only on its own noise
            neg = (neg_embeds[i : i + 1], neg_ids[i : i + 1]) if cfg else (None, None)
            out.append(sampling.denoise(
                model, latents[i : i + 1], embeds[i : i + 1], txt_ids[i : i + 1], img_ids, sigmas,
                guidance=guidance if self.guidance_embeds else None, neg_embeds=neg[0], neg_txt_ids=neg[1],
                cfg_scale=guidance if cfg else None, on_step=lambda: bar.update(1), refs=refs, ref_ids=ref_ids))
        bar.close()
        if output_type == "latent":
            return [x[0] for x in out]
        if self.low_memory:
            self.release("transformer")
        return [self.decode(x, height, width, output_type)[0] for x in out]

    def decode(self, latents: mx.array, height: int, width: int, output_type: str = "pil") -> list:
        """Packed latents [B, N, 128] -> images (PIL, or float32 [H, W, 3] arrays in [0, 1])."""
        vae = self.vae
        pixels = vae.decode(vae.unpack(latents, height, width))  # [B, H, W, 3], about [-1, 1]
        pixels = mx.clip(pixels.astype(mx.float32), -1.0, 1.0)
        mx.eval(pixels)
        if output_type == "array":
            return [pixels[j] / 2 + 0.5 for j in range(pixels.shape[0])]
        from mflux2.images import array_to_pil

        return [array_to_pil(pixels[j]) for j in range(pixels.shape[0])]
