"""Text-to-image generation with FLUX.2 (klein-4b/9b distilled, klein-base-4b/9b, dev).

    pipe = Flux2Pipeline.from_pretrained("klein-4b")           # short name, repo id or local folder
    images = pipe.generate("a red fox in the snow", width=1024, height=1024, seed=0)

Where the weights come from: `mflux2.model_files`; when the components load and are freed (LoRAs,
`low_memory`, `release`): `mflux2.components`, whose `PipelineComponents` this pipeline extends with
generation. With `low_memory` `generate` encodes the prompts, frees the text encoder, denoises, frees
the transformer and decodes — so only one large component is ever resident.

Sampling follows BFL/diffusers (spec §6): empirical-mu schedule, Euler steps in float32 latents;
dev embeds the guidance scale; klein-base runs real CFG against the negative prompt ("" by default);
distilled klein uses 4 steps and no guidance.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from mflux2 import sampling
from mflux2.components import PipelineComponents

# Sampling defaults per family [BFL util.py / cli.py, spec §1]
DEFAULT_STEPS = {"klein": 4, "klein-base": 50, "dev": 50}
DEFAULT_GUIDANCE = {"klein": 1.0, "klein-base": 4.0, "dev": 4.0}


class GenerationWarning(UserWarning):
    """A generation setting was adjusted or ignored (e.g. guidance for distilled klein)."""


class Flux2Pipeline(PipelineComponents):
    """FLUX.2 text-to-image. Build it with `from_pretrained`; components load on first use."""

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
        steps = DEFAULT_STEPS[fam] if num_inference_steps is None else int(num_inference_steps)
        guidance = DEFAULT_GUIDANCE[fam] if guidance_scale is None else float(guidance_scale)
        if fam == "klein":
            if steps != 4:
                warnings.warn(f"{self.source.name} is step-distilled for 4 steps; using 4 instead of {steps}", GenerationWarning, stacklevel=3)
                steps = 4
            if guidance != 1.0:
                warnings.warn(f"{self.source.name} is guidance-distilled: guidance {guidance} is ignored", GenerationWarning, stacklevel=3)
                guidance = 1.0
        if negative_prompt is not None and not (fam == "klein-base" and guidance > 1.0):
            warnings.warn(f"negative_prompt is ignored: {self.source.name} runs no classifier-free guidance"
                          + (" at guidance <= 1" if fam == "klein-base" else ""), GenerationWarning, stacklevel=3)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        return steps, guidance, fam == "klein-base" and guidance > 1.0

    def generate(self, prompt: str | list[str], width: int = 1024, height: int = 1024,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 latents: mx.array | None = None, negative_prompt: str | list[str] | None = None,
                 progress: bool = True, output_type: str = "pil") -> list:
        """Generate one image per prompt; returns PIL images.

        Defaults per variant: distilled klein 4 steps / no guidance (other values are ignored with
        a warning); klein-base 50 steps, real CFG with scale 4.0 against `negative_prompt` (""
        by default); dev 50 steps, embedded guidance 4.0. Image i uses the noise of `seed + i`,
        or `latents` [B, H/16·W/16, 128] (packed, row-major) if given. `output_type`: "pil", or
        "array" for float32 mx arrays [H, W, 3] in [0, 1], or "latent" for the packed latents."""
        if output_type not in ("pil", "array", "latent"):
            raise ValueError(f"output_type={output_type!r}: choose pil, array or latent")
        from tqdm.auto import tqdm

        from mflux2.models.vae import image_ids

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
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

        sigmas = sampling.get_sigmas(steps, n)
        img_ids = image_ids(height, width)
        model = self.transformer
        out = []
        bar = tqdm(total=steps * b, desc="denoising", unit="step", disable=not progress, leave=False)
        for i in range(b):  # one image at a time: image i depends only on its own noise
            neg = (neg_embeds[i : i + 1], neg_ids[i : i + 1]) if cfg else (None, None)
            out.append(sampling.denoise(
                model, latents[i : i + 1], embeds[i : i + 1], txt_ids[i : i + 1], img_ids, sigmas,
                guidance=guidance if self.guidance_embeds else None, neg_embeds=neg[0], neg_txt_ids=neg[1],
                cfg_scale=guidance if cfg else None, on_step=lambda: bar.update(1)))
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
