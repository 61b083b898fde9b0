"""End-to-end generation against diffusers' Flux2KleinPipeline / Flux2Pipeline, model-folder layouts,
the converter round trip, LoRA delegation, and the mflux2-generate CLI.

The references are diffusers pipelines built from tiny random components (Flux2Transformer2DModel,
AutoencoderKLFlux2, Qwen3ForCausalLM / Mistral3ForConditionalGeneration, the tiny tokenizers of
tests/tiny_tokenizers.py) and saved with `save_pretrained`; mflux2 loads the saved folders. Both get
the same prompts and the same initial noise (ours packed [B, N, 128], diffusers' [B, 128, h, w]).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file as save_torch

import diffusers
import transformers
from mflux2 import sampling
from mflux2.hub import ModelLoadError
from mflux2.pipeline import Flux2Pipeline, GenerationWarning
from tiny_tokenizers import TINY_VOCAB, build_mistral_tokenizer, build_qwen3_tokenizer

ROOT = Path(__file__).resolve().parents[1]
W, H = 64, 48  # 4 x 3 tokens: non-square catches h/w swaps
PROMPTS = ["a photo of a cat sitting on a red chair", "an oil painting of a lighthouse at dusk"]
QWEN_LEN, MISTRAL_LEN = 48, 112  # max_sequence_length: both leave padding after the chat template
LAYERS = (1, 2)  # text_encoder_out_layers -> joint_attention_dim = 2 x 32
F32 = dict(dtype=mx.float32)


# ----------------------------------------------------------------------------------------------
# tiny diffusers pipelines


def randomize(model: torch.nn.Module, seed: int, std: float | None = None) -> torch.nn.Module:
    """Non-degenerate random weights: norm scales 1 ± 0.1, everything else N(0, 1/fan_in) (or std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                s = std if std is not None else (p.shape[-1] if p.ndim > 1 else 1) ** -0.5
                p.copy_(s * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_vae():
    # 32 groups as in the real VAE: a BFL ae.safetensors has no config, and BFL hard-codes 32
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                                       latent_channels=32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial batch-norm statistics
        vae.bn.running_mean.copy_(0.1 * torch.randn(128, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(128, generator=g))
    return vae.eval()


def tiny_transformer(guidance_embeds: bool, seed: int = 1):
    model = diffusers.Flux2Transformer2DModel(
        in_channels=128, out_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        rope_theta=2000, guidance_embeds=guidance_embeds,
    )
    return randomize(model, seed, std=0.1)


def tiny_qwen3():
    cfg = transformers.Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    return randomize(transformers.Qwen3ForCausalLM(cfg), 2)


def tiny_mistral3():
    text = transformers.MistralConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=512, sliding_window=None)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)
    cfg = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), spatial_merge_size=1)
    return randomize(transformers.Mistral3ForConditionalGeneration(cfg), 3)


def scheduler():
    # FLUX.2 repos' scheduler_config.json
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                     base_shift=0.5, max_shift=1.15, time_shift_type="exponential")


def build_klein(folder: Path, distilled: bool) -> Path:
    torch.manual_seed(0)
    tok = build_qwen3_tokenizer(folder / "_tok")
    pipe = diffusers.Flux2KleinPipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=tiny_qwen3(), tokenizer=tok,
                                        transformer=tiny_transformer(False), is_distilled=distilled)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return folder


def build_dev(folder: Path) -> Path:
    torch.manual_seed(0)
    tok = build_mistral_tokenizer(folder / "_tok")
    pipe = diffusers.Flux2Pipeline(scheduler=scheduler(), vae=tiny_vae(), text_encoder=tiny_mistral3(), tokenizer=tok,
                                   transformer=tiny_transformer(True))
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "klein": build_klein(root / "klein", distilled=True),
            "klein-base": build_klein(root / "klein-base", distilled=False),
            "dev": build_dev(root / "dev"),
        }


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def reference(folder: Path, family: str, prompts, latents, **kw) -> np.ndarray:
    cls = diffusers.Flux2Pipeline if family == "dev" else diffusers.Flux2KleinPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    length = MISTRAL_LEN if family == "dev" else QWEN_LEN
    out = pipe(prompt=prompts, height=H, width=W, latents=latents, output_type="np", max_sequence_length=length,
               text_encoder_out_layers=LAYERS, **kw)
    return out.images  # [B, H, W, 3] in [0, 1]


def ours(folder: Path, family: str, **kw) -> Flux2Pipeline:
    length = MISTRAL_LEN if family == "dev" else QWEN_LEN
    return Flux2Pipeline.from_pretrained(folder, max_sequence_length=length, text_encoder_out_layers=LAYERS, **F32, **kw)


def as_float(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 if isinstance(im, Image.Image) else np.array(im) for im in images])


def check_parity(mine: np.ndarray, ref: np.ndarray) -> None:
    # the image must carry information (not clamped flat), else the comparison proves little
    assert ref.std() > 0.05 and ((ref > 0.001) & (ref < 0.999)).mean() > 0.9
    assert mine.shape == ref.shape
    assert np.abs(mine - ref).mean() <= 1 / 255


# ----------------------------------------------------------------------------------------------
# parity with diffusers


def test_klein_distilled_matches_diffusers(models):
    lat = noise(2)
    ref = reference(models["klein"], "klein", PROMPTS, lat, num_inference_steps=4, guidance_scale=1.0)
    pipe = ours(models["klein"], "klein")
    assert (pipe.family, pipe.is_distilled) == ("klein", True)
    packed = sampling.pack_grid(mx.array(lat.numpy()))
    arrays = as_float(pipe.generate(PROMPTS, W, H, latents=packed, output_type="array", progress=False))
    np.testing.assert_allclose(arrays, ref, atol=2e-4)  # float32 end to end: far inside 1/255
    pil = pipe.generate(PROMPTS, W, H, latents=packed, progress=False)
    assert all(im.size == (W, H) and im.mode == "RGB" for im in pil)
    check_parity(as_float(pil), ref)
    assert np.abs(ref[0] - ref[1]).mean() > 0.02  # the two prompts/noises give different images


def test_klein_base_cfg_matches_diffusers(models):
    lat = noise(1, seed=3)
    ref = reference(models["klein-base"], "klein-base", PROMPTS[:1], lat, num_inference_steps=3, guidance_scale=4.0)
    pipe = ours(models["klein-base"], "klein-base")
    assert pipe.family == "klein-base" and not pipe.is_distilled
    packed = sampling.pack_grid(mx.array(lat.numpy()))
    img = as_float(pipe.generate(PROMPTS[0], W, H, num_inference_steps=3, guidance_scale=4.0, latents=packed, progress=False))
    check_parity(img, ref)
    # CFG really ran: guidance 1 (no CFG) gives a visibly different image, and matches diffusers too
    ref1 = reference(models["klein-base"], "klein-base", PROMPTS[:1], lat, num_inference_steps=3, guidance_scale=1.0)
    img1 = as_float(pipe.generate(PROMPTS[0], W, H, num_inference_steps=3, guidance_scale=1.0, latents=packed, progress=False))
    check_parity(img1, ref1)
    assert np.abs(img - img1).mean() > 0.01
    # a non-empty negative prompt changes the result (diffusers always uses "")
    neg = as_float(pipe.generate(PROMPTS[0], W, H, num_inference_steps=3, guidance_scale=4.0, latents=packed,
                                 negative_prompt="blurry", progress=False))
    assert np.abs(neg - img).mean() > 0.005


def test_dev_guidance_matches_diffusers(models):
    lat = noise(2, seed=4)
    ref = reference(models["dev"], "dev", PROMPTS, lat, num_inference_steps=3, guidance_scale=3.5)
    pipe = ours(models["dev"], "dev")
    assert pipe.family == "dev" and pipe.guidance_embeds
    packed = sampling.pack_grid(mx.array(lat.numpy()))
    img = as_float(pipe.generate(PROMPTS, W, H, num_inference_steps=3, guidance_scale=3.5, latents=packed, progress=False))
    check_parity(img, ref)
    other = as_float(pipe.generate(PROMPTS, W, H, num_inference_steps=3, guidance_scale=1.5, latents=packed, progress=False))
    assert np.abs(other - img).mean() > 0.005  # the embedded guidance is used


# ----------------------------------------------------------------------------------------------
# editing: reference images (docs/architecture.md, "Reference images")


def ref_image(w: int, h: int, seed: int) -> Image.Image:
    """A structured random RGB image: a gradient with a few coloured rectangles."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w, y / h, 1 - x / w], -1) * 0.6 + 0.2 * g.random(3)
    for _ in range(4):
        x0, y0 = g.integers(0, w - 8), g.integers(0, h - 8)
        img[y0 : y0 + g.integers(6, h // 2), x0 : x0 + g.integers(6, w // 2)] = g.random(3)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def reference_edit(folder: Path, family: str, prompt: str, latents, image, **kw) -> np.ndarray:
    cls = diffusers.Flux2Pipeline if family == "dev" else diffusers.Flux2KleinPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    length = MISTRAL_LEN if family == "dev" else QWEN_LEN
    return pipe(prompt=[prompt], image=image, latents=latents, output_type="np", max_sequence_length=length,
                text_encoder_out_layers=LAYERS, **kw).images


# Two references of different size and aspect: 88x72 is cropped to 80x64 (5 x 4 tokens), 64x112 is
# portrait (4 x 7 tokens); the output size defaults to the first one's prepared size.
REFS = [ref_image(88, 72, 1), ref_image(64, 112, 2)]


@pytest.mark.parametrize("family, refs, size, kw", [
    ("klein", REFS[:1], None, dict(num_inference_steps=4, guidance_scale=1.0)),  # output size from the reference
    ("klein", REFS, (W, H), dict(num_inference_steps=4, guidance_scale=1.0)),
    ("klein-base", REFS, (W, H), dict(num_inference_steps=2, guidance_scale=4.0)),  # CFG: both passes carry the refs
    ("dev", REFS[:1], (W, H), dict(num_inference_steps=2, guidance_scale=3.5)),
])
def test_reference_images_match_diffusers(models, family, refs, size, kw):
    w, h = size or (80, 64)
    lat = torch.randn(1, 128, h // 16, w // 16, generator=torch.Generator().manual_seed(6))
    sized = dict(width=w, height=h) if size else {}
    ref = reference_edit(models[family], family, PROMPTS[0], lat, refs if len(refs) > 1 else refs[0], **sized, **kw)
    pipe = ours(models[family], family)
    packed = sampling.pack_grid(mx.array(lat.numpy()))
    edited = pipe.generate(PROMPTS[0], **sized, latents=packed, image=refs, output_type="latent", progress=False, **kw)[0]
    img = as_float(pipe.decode(edited[None], h, w, "array"))
    assert img.shape == ref.shape == (1, h, w, 3)
    check_parity(img, ref)
    np.testing.assert_allclose(img, ref, atol=5e-4)  # float32 end to end
    # the references are really used: without them the same noise gives a clearly different result —
    # final latents 3-15 % apart (parity holds them to ~1e-6), images beyond twice the parity bound
    without = pipe.generate(PROMPTS[0], w, h, latents=packed, output_type="latent", progress=False, **kw)[0]
    assert np.abs(as_float(pipe.decode(without[None], h, w, "array")) - img).mean() > 2 / 255
    edited, without = np.array(edited), np.array(without)
    assert np.abs(edited - without).mean() > 0.02 * np.abs(without).mean()


def test_reference_preparation_matches_diffusers_and_encode_references(models, tmp_path):
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from mflux2.images import pil_to_array
    from mflux2.pipeline import prepare_reference

    proc = Flux2ImageProcessor(vae_scale_factor=16)
    big = ref_image(1100, 1000, 3)  # above 1024²: scaled down with LANCZOS, then cropped to x16
    for img in (big, REFS[0], ref_image(70, 500, 4)):
        # diffusers' Flux2KleinPipeline.__call__, step 4
        d = img
        if d.width * d.height > 1024 * 1024:
            d = proc._resize_to_target_area(d, 1024 * 1024)
        dw, dh = d.width // 16 * 16, d.height // 16 * 16
        want = proc.preprocess(d, height=dh, width=dw, resize_mode="crop")[0].permute(1, 2, 0).numpy()
        mine = prepare_reference(img)
        assert mine.size == (dw, dh)
        np.testing.assert_allclose(np.array(pil_to_array(mine)), want, atol=1e-6)
    assert prepare_reference(big).size == (1072, 976)
    pipe = ours(models["klein"], "klein")
    assert pipe.prepare_references(big, "bfl")[0].size == (1088, 992)  # BFL: a single reference keeps up to 2024²
    assert [im.size for im in pipe.prepare_references([big, big], "bfl")] == [(1072, 976)] * 2
    with pytest.raises(ValueError, match="reference image 1: 40x80 is too small"):
        pipe.prepare_references([REFS[0], ref_image(40, 80, 5)])
    with pytest.raises(ValueError, match="too elongated"):
        prepare_reference(ref_image(64, 600, 5))
    with pytest.raises(ValueError, match="cannot read image"):
        prepare_reference(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="reference_caps"):
        pipe.prepare_references(big, "max")

    # encode_references: the pipeline's own encoding (a path works like the PIL image), ids t = 10, 20
    path = tmp_path / "r.png"
    REFS[1].save(path)
    tokens, ids = pipe.encode_references([REFS[0], path])
    assert tokens.shape == (1, 20 + 28, 128) and ids.shape == (48, 4)
    assert np.array(ids[:20, 0]).tolist() == [10] * 20 and np.array(ids[20:, 0]).tolist() == [20] * 28
    assert np.array(ids[20:, 1]).max() == 6 and np.array(ids[20:, 2]).max() == 3  # 7 rows x 4 columns
    dpipe = diffusers.Flux2KleinPipeline.from_pretrained(models["klein"])
    cond = [proc.preprocess(im, height=im.height // 16 * 16, width=im.width // 16 * 16, resize_mode="crop") for im in REFS]
    with torch.no_grad():
        want_tokens, want_ids = dpipe.prepare_image_latents(cond, 1, torch.Generator().manual_seed(0), "cpu", torch.float32)
    np.testing.assert_allclose(np.array(tokens), want_tokens.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(ids), want_ids[0].numpy())


# ----------------------------------------------------------------------------------------------
# variant rules, memory, seeds


def test_distilled_klein_runs_the_steps_asked_and_ignores_guidance(models):
    pipe = ours(models["klein"], "klein")
    base = pipe.generate(PROMPTS[0], W, H, seed=1, output_type="array", progress=False)[0]
    with pytest.warns(GenerationWarning) as record:
        other = pipe.generate(PROMPTS[0], W, H, seed=1, num_inference_steps=2, guidance_scale=5.0,
                              negative_prompt="x", output_type="array", progress=False)[0]
    text = " ".join(str(r.message) for r in record)
    assert "step-distilled for 4 steps; running 2 as asked" in text
    assert "guidance 5.0 is ignored" in text and "negative_prompt is ignored" in text
    assert np.abs(np.array(base) - np.array(other)).mean() > 0.005  # 2 steps ran, not 4 (as diffusers does)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the steps warning is given once per pipeline
        assert pipe.sampling_settings(2, None) == (2, 1.0, False)
    assert pipe.sampling_settings(None, None) == (4, 1.0, False)
    assert ours(models["klein-base"], "klein-base").sampling_settings(None, None) == (50, 4.0, True)
    assert ours(models["dev"], "dev").sampling_settings(None, None) == (50, 4.0, False)


def test_low_memory_releases_components_and_gives_the_same_image(models):
    keep = ours(models["klein"], "klein", low_memory=False)
    low = ours(models["klein"], "klein", low_memory=True)
    a = keep.generate(PROMPTS[0], W, H, seed=2, output_type="array", progress=False)[0]
    assert keep._text_encoder is not None and keep._transformer is not None
    b = low.generate(PROMPTS[0], W, H, seed=2, output_type="array", progress=False)[0]
    assert low._text_encoder is None and low._transformer is None and low._vae is not None
    np.testing.assert_array_equal(np.array(a), np.array(b))
    c = low.generate(PROMPTS[0], W, H, seed=2, output_type="array", progress=False)[0]  # reloads what it freed
    np.testing.assert_array_equal(np.array(a), np.array(c))
    keep.release()
    assert keep._text_encoder is None and keep._transformer is None and keep._vae is None


def test_seed_gives_per_image_noise_and_encode_prompt_shapes(models):
    pipe = ours(models["klein"], "klein")
    both = pipe.generate(PROMPTS, W, H, seed=10, output_type="latent", progress=False)
    second = pipe.generate(PROMPTS[1], W, H, seed=11, output_type="latent", progress=False)
    np.testing.assert_allclose(np.array(both[1]), np.array(second[0]), atol=1e-6)
    embeds, ids = pipe.encode_prompt(PROMPTS)
    assert embeds.shape == (2, QWEN_LEN, 64) and ids.shape == (2, QWEN_LEN, 4)
    with pytest.raises(ValueError, match="latents of shape"):
        pipe.generate(PROMPTS, W, H, latents=mx.zeros((1, 12, 128)), progress=False)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate(PROMPTS[0], 60, 48, progress=False)


# ----------------------------------------------------------------------------------------------
# folder layouts and errors


def bfl_transformer_file(diffusers_folder: Path, path: Path) -> Path:
    """The diffusers transformer re-saved with BFL keys (the single-file layout), via the mapping in
    docs/architecture.md ("Weight layouts")."""
    from safetensors.torch import load_file

    from test_transformer import to_bfl

    sd = load_file(str(diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_torch({k: v.contiguous() for k, v in to_bfl(sd).items()}, str(path))
    return path


def make_bfl_folder(src: Path, dst: Path, transformer_name: str) -> Path:
    dst.mkdir()
    bfl_transformer_file(src, dst / transformer_name)
    # ae.safetensors: load_vae reads BFL and diffusers key names alike
    shutil.copy(src / "vae" / "diffusion_pytorch_model.safetensors", dst / "ae.safetensors")
    shutil.copytree(src / "text_encoder", dst / "text_encoder")
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    return dst


def test_bfl_layout_folder_and_file(models, tmp_path):
    folder = make_bfl_folder(models["klein-base"], tmp_path / "bfl", "flux-2-klein-base-tiny.safetensors")
    pipe = ours(folder, "klein-base")
    assert (pipe.source.layout, pipe.family) == ("bfl", "klein-base")
    ref = ours(models["klein-base"], "klein-base")
    kw = dict(num_inference_steps=2, guidance_scale=3.0, seed=5, output_type="array", progress=False)
    np.testing.assert_allclose(np.array(pipe.generate(PROMPTS[0], W, H, **kw)[0]),
                               np.array(ref.generate(PROMPTS[0], W, H, **kw)[0]), atol=1e-5)
    # the transformer file itself works too; a name without klein/base needs variant=
    assert ours(folder / "flux-2-klein-base-tiny.safetensors", "klein").source.layout == "bfl"
    (folder / "flux-2-klein-base-tiny.safetensors").rename(folder / "tiny.safetensors")
    with pytest.raises(ModelLoadError, match="pass variant="):
        ours(folder, "klein")
    assert ours(folder, "klein", variant="klein-base-4b").family == "klein-base"


def test_missing_components_and_bad_sources_are_one_line_errors(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["klein"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match=r"the vae/ folder is missing") as e:
        Flux2Pipeline.from_pretrained(broken)
    assert "\n" not in str(e.value)

    bfl = make_bfl_folder(models["klein"], tmp_path / "bfl", "flux-2-klein-tiny.safetensors")
    (bfl / "ae.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"ae.safetensors \(the VAE\) is missing"):
        Flux2Pipeline.from_pretrained(bfl)

    with pytest.raises(ModelLoadError, match="nowhere: no such file or folder"):
        Flux2Pipeline.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="not a FLUX.2 model folder"):
        Flux2Pipeline.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="you asked for variant 'dev'"):
        Flux2Pipeline.from_pretrained(models["klein"], variant="dev")
    with pytest.raises(ModelLoadError, match="unknown variant"):
        Flux2Pipeline.from_pretrained(models["klein"], variant="klein-5b")
    with pytest.raises(ValueError, match="choose int8 or int4"):
        Flux2Pipeline.from_pretrained(models["klein"], quantize="int3")


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_load_and_unload(models, tmp_path):
    g = torch.Generator().manual_seed(9)
    rank, d = 4, 64
    tensors = {}
    for i in range(1):  # BFL names with ai-toolkit's prefix: fused qkv of the double block, linear1 of a single block
        tensors[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_A.weight"] = torch.randn(rank, d, generator=g) * 0.3
        tensors[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_B.weight"] = torch.randn(3 * d, rank, generator=g) * 0.3
    tensors["diffusion_model.single_blocks.1.linear1.lora_A.weight"] = torch.randn(rank, d, generator=g) * 0.3
    tensors["diffusion_model.single_blocks.1.linear1.lora_B.weight"] = torch.randn(3 * d + 2 * 3 * d, rank, generator=g) * 0.3
    path = tmp_path / "lora.safetensors"
    save_torch(tensors, str(path))

    pipe = ours(models["klein"], "klein")
    kw = dict(seed=3, output_type="array", progress=False)
    plain = np.array(pipe.generate(PROMPTS[0], W, H, **kw)[0])
    pipe.load_lora(path, 1.0)
    with_lora = np.array(pipe.generate(PROMPTS[0], W, H, **kw)[0])
    assert np.abs(with_lora - plain).mean() > 0.005
    pipe.release("transformer")  # reloading the transformer re-applies the LoRA
    np.testing.assert_array_equal(np.array(pipe.generate(PROMPTS[0], W, H, **kw)[0]), with_lora)
    pipe.unload_loras()
    np.testing.assert_array_equal(np.array(pipe.generate(PROMPTS[0], W, H, **kw)[0]), plain)

    late = ours(models["klein"], "klein")  # added before the transformer is loaded
    late.load_lora(path, 1.0)
    np.testing.assert_array_equal(np.array(late.generate(PROMPTS[0], W, H, **kw)[0]), with_lora)
    bad = tmp_path / "bad.safetensors"
    save_torch({"foo.weight": torch.zeros(2)}, str(bad))
    from mflux2.lora import LoRAError

    with pytest.raises(LoRAError, match="bad.safetensors"):
        late.load_lora(bad)
    assert len(late._loras) == 1  # the bad file was not recorded


# ----------------------------------------------------------------------------------------------
# converter


def load_convert_script():
    spec = importlib.util.spec_from_file_location("mflux2_convert", ROOT / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """klein-base converted to an mflux2 folder (float32); it records the tiny text-encoder options,
    so the CLI can load it without test-only arguments."""
    conv = load_convert_script()
    return conv.convert(str(models["klein-base"]), tmp_path_factory.mktemp("converted") / "mlx", dtype="float32",
                        progress=False, max_sequence_length=QWEN_LEN, text_encoder_out_layers=LAYERS)


def test_convert_round_trip_gives_identical_images(models, converted, tmp_path):
    conv = load_convert_script()
    te_opts = dict(max_sequence_length=QWEN_LEN, text_encoder_out_layers=LAYERS)
    out = converted
    record = json.loads((out / "mflux2.json").read_text())
    assert record["family"] == "klein-base" and record["transformer"]["quantization"] is None
    assert record["text_encoder_options"]["max_length"] == QWEN_LEN
    converted = Flux2Pipeline.from_pretrained(out, **F32)  # no text-encoder options needed: recorded
    assert converted.source.layout == "mflux2" and converted.family == "klein-base"
    kw = dict(num_inference_steps=2, guidance_scale=4.0, seed=7, output_type="array", progress=False)
    original = ours(models["klein-base"], "klein-base")
    np.testing.assert_array_equal(np.array(converted.generate(PROMPTS, W, H, **kw)[0]),
                                  np.array(original.generate(PROMPTS, W, H, **kw)[0]))

    # never overwrite without --force; --force replaces only an mflux2 folder
    with pytest.raises(conv.ConvertError, match="already exists"):
        conv.convert(str(models["klein-base"]), out, dtype="float32", progress=False, **te_opts)
    assert conv.main([str(models["klein-base"]), str(out), "--quiet"]) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(conv.ConvertError, match="not an mflux2 conversion"):
        conv.convert(str(models["klein-base"]), other, force=True, progress=False, **te_opts)
    assert (other / "keep.txt").read_text() == "mine"
    again = conv.convert(str(models["klein"]), tmp_path / "k", dtype="float32", progress=False, **te_opts)
    conv.convert(str(models["klein-base"]), again, force=True, dtype="float32", progress=False, **te_opts)
    assert json.loads((again / "mflux2.json").read_text())["family"] == "klein-base"
    assert not list(tmp_path.glob(".*converting*"))  # no temporary folder is left behind


def test_convert_prequantized_equals_quantize_on_load(models, tmp_path):
    conv = load_convert_script()
    te_opts = dict(max_sequence_length=QWEN_LEN, text_encoder_out_layers=LAYERS)
    out = conv.convert(str(models["klein"]), tmp_path / "q", quantize="int8", text_encoder_quantize="int4",
                       dtype="float32", progress=False, **te_opts)
    record = json.loads((out / "mflux2.json").read_text())
    assert record["transformer"]["quantization"] == {"name": "int8", "bits": 8, "group_size": 128}
    assert record["text_encoder"]["quantization"]["name"] == "int4"
    te_cfg = json.loads((out / "text_encoder" / "config.json").read_text())
    assert te_cfg["quantization"]["bits"] == 4
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(out / "transformer") < 0.6 * size(models["klein"] / "transformer")
    keys = mx.load(str(out / "transformer" / "model.safetensors"))
    assert keys["single_blocks.0.linear1.weight"].dtype == mx.uint32 and "single_blocks.0.linear1.scales" in keys

    kw = dict(seed=8, output_type="array", progress=False)
    pre = Flux2Pipeline.from_pretrained(out, **F32)
    on_load = ours(models["klein"], "klein", quantize="int8", text_encoder_quantize="int4")
    np.testing.assert_array_equal(np.array(pre.generate(PROMPTS[0], W, H, **kw)[0]),
                                  np.array(on_load.generate(PROMPTS[0], W, H, **kw)[0]))
    assert pre.transformer.quantization == "int8"
    with pytest.raises(ModelLoadError, match="converted as int8; it cannot be loaded as int4"):
        Flux2Pipeline.from_pretrained(out, quantize="int4").transformer


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_pngs_with_metadata(converted, tmp_path, capsys):
    from mflux2.cli import _parse_lora, generate_main

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a bowl of fresh fruit\n\n  a fox in the snow  \n")
    out_dir = tmp_path / "out"
    rc = generate_main(["--model", str(converted), "--prompt", "a cat", "--prompt", f"@{prompt_file}",
                        "--width", "32", "--height", "48", "--steps", "2", "--guidance", "3", "--seed", "5",
                        "--output", f"{out_dir}/", "--quiet"])
    assert rc == 0
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files] == ["image_1.png", "image_2.png", "image_3.png"]
    with Image.open(files[2]) as im:
        assert im.size == (32, 48)
        meta = json.loads(im.text["parameters"])
        assert im.text["prompt"] == "a fox in the snow"
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["guidance"] == 3.0 and meta["cfg"] is True
    assert meta["negative_prompt"] == "" and meta["variant"] == "klein-base" and meta["width"] == 32
    assert str(files[0]) in capsys.readouterr().out

    assert _parse_lora("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert _parse_lora("dir:with:colons/x.safetensors") == ("dir:with:colons/x.safetensors", 1.0)


def test_cli_image_edits_at_the_reference_size(converted, tmp_path, capsys):
    from mflux2.cli import generate_main

    ref = tmp_path / "ref.png"
    REFS[0].save(ref)  # 88x72: prepared 80x64, the output's size when --width/--height are not given
    out = tmp_path / "edit.png"
    args = ["--model", str(converted), "--prompt", "a cat", "--steps", "1", "--guidance", "1", "--seed", "3", "--quiet"]
    assert generate_main([*args, "--image", str(ref), "--output", str(out)]) == 0
    assert generate_main([*args, "--width", "80", "--height", "64", "--output", str(tmp_path / "plain.png")]) == 0
    with Image.open(out) as im, Image.open(tmp_path / "plain.png") as plain:
        meta = json.loads(im.text["parameters"])
        assert im.size == (80, 64) and (meta["width"], meta["height"]) == (80, 64)
        assert meta["images"] == [str(ref)] and meta["reference_caps"] == "diffusers"
        assert np.abs(np.asarray(im, dtype=np.int16) - np.asarray(plain, dtype=np.int16)).mean() > 0.5  # the reference acted
    assert generate_main([*args, "--image", str(tmp_path / "none.png"), "--output", str(out)]) == 1
    assert "--image" in capsys.readouterr().err


def test_cli_errors_are_one_line(converted, tmp_path, capsys):
    from mflux2.cli import generate_main

    assert generate_main(["--model", str(tmp_path / "none"), "--prompt", "x", "--output", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mflux2-generate: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert generate_main(["--model", str(converted), "--prompt", "x", "--width", "50",
                          "--output", str(tmp_path / "a.png")]) == 1
    assert "multiple of 16" in capsys.readouterr().err
    assert generate_main(["--model", str(converted), "--prompt", "x", "--lora", str(tmp_path / "no.safetensors"),
                          "--output", str(tmp_path / "a.png")]) == 1
    assert "no such file" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (f"{blocker}/a.png", f"{blocker}/sub/"):  # refused before any model loads (this one does not exist)
        assert generate_main(["--model", str(tmp_path / "none"), "--prompt", "x", "--output", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mflux2-generate: error: --output ") and f"{blocker} is a file, not a folder" in err, err
    with pytest.raises(ModelLoadError):
        generate_main(["--model", str(tmp_path / "none"), "--prompt", "x", "--debug"])
