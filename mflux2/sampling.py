"""FLUX.2 sampling maths: the empirical-mu timestep schedule, Euler steps, CFG, initial noise.

The facts: docs/architecture.md, "Sampling". Sources: BFL `flux2/sampling.py` (`get_schedule`,
`compute_empirical_mu`, `denoise`, `denoise_cfg`) and diffusers `pipeline_flux2*.py` +
`FlowMatchEulerDiscreteScheduler` (use_dynamic_shifting, time_shift_type "exponential").

Conventions: sigma = t in [0, 1], 1 = pure noise; the transformer predicts the velocity
v = noise - x0; latents are packed tokens [B, H/16·W/16, 128], row-major (see `mflux2.models.vae`).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import mlx.core as mx
import numpy as np

LATENT_CHANNELS = 128  # packed token width: 32 VAE channels x 2x2 patch
PIXELS_PER_TOKEN = 16  # 8x VAE downsampling x 2x2 patchify
# While sampling, MLX's memory limit is what is allocated + this × one forward's live set
# (`forward_live_bytes`): MLX allocates an operation's output when it encodes it and frees its
# inputs only once the device has run it, so without a limit the host runs ahead and a forward held
# far more than its live set (issue 34: 13 GB above dev's weights on an H100). None: no limit set.
# MFLUX2_SAMPLING_RUN_AHEAD (a number, or "none") sets it, so one GPU call can time both.
_env = os.environ.get("MFLUX2_SAMPLING_RUN_AHEAD", "2").strip().lower()
RUN_AHEAD = None if _env == "none" else float(_env)
# One block's no-grad forward, in units of tokens × hidden × 2 bytes beyond what scales with the
# MLP: the block's input, the modulated input, the attention output, the residual and the gated sum.
FORWARD_FIXED_UNITS = 5


def forward_live_bytes(hidden: int, mlp_hidden: int, tokens: int, tile_bytes: int = 0) -> float:
    """The live set of a sampling forward (no gradient) beyond the weights: one block's activations
    (a single block's linear1 output as GEMM parts and their concatenation, 2 × (3·hidden +
    2·mlp_hidden), its SwiGLU output and FORWARD_FIXED_UNITS) plus, for a quantized base, two
    dequantised weight tiles (`ops.gemm`: one in use, the next made after the GEMM before it)."""
    units = 2 * (3 + 2 * mlp_hidden / hidden) + mlp_hidden / hidden + FORWARD_FIXED_UNITS
    return units * tokens * hidden * 2 + 2 * tile_bytes


def model_live_bytes(model, tokens: int) -> float | None:
    """`forward_live_bytes` of a loaded transformer (None: not a FLUX.2 transformer)."""
    import mlx.nn as nn

    from mflux2.ops.gemm import tile_bytes

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "hidden_size"):
        return None
    tiles = [tile_bytes(m.weight.shape[0], m.weight.shape[1] * 32 // m.bits, m.scales.dtype.size)
             for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    return forward_live_bytes(cfg.hidden_size, cfg.mlp_hidden, tokens, max(tiles, default=0))


@contextmanager
def bounded_run_ahead(extra_bytes: float | None):
    """MLX's memory limit at what is allocated now + RUN_AHEAD × `extra_bytes` (never above the
    limit in force), restored after: MLX's evaluation waits for the device whenever more is
    allocated, on every backend. The images are the same: only when operations run changes."""
    if extra_bytes is None or RUN_AHEAD is None:
        yield
        return
    before = mx.get_memory_limit()
    mx.set_memory_limit(min(before, mx.get_active_memory() + int(RUN_AHEAD * extra_bytes)))
    try:
        yield
    finally:
        mx.set_memory_limit(before)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift. Below 4300 tokens it interpolates linearly in
    the step count between a fit for 10 steps and one for 200 steps; above, the 200-step fit."""
    a1, b1 = 8.73809524e-05, 1.89833333  # 10-step fit
    a2, b2 = 0.00016927, 0.45666666  # 200-step fit
    m200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m200)
    m10 = a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return float(a * num_steps + b)


def time_shift(mu: float, t: np.ndarray) -> np.ndarray:
    """Exponential time shift e^mu / (e^mu + (1/t - 1)); maps 1 -> 1 and 0 -> 0."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return np.where(t <= 0.0, 0.0, shifted)


def get_sigmas(num_steps: int, image_seq_len: int, mu: float | None = None) -> list[float]:
    """The S+1 sigmas of an S-step FLUX.2 schedule, from 1.0 down to 0.0 (float64 maths,
    like BFL's `get_schedule`; diffusers' float32 table agrees to ~1e-7)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    mu = compute_empirical_mu(image_seq_len, num_steps) if mu is None else mu
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return [float(s) for s in time_shift(mu, t)]


def image_seq_len(height: int, width: int) -> int:
    """Number of image tokens of a height x width image (refs for editing are not counted)."""
    check_size(height, width)
    return (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)


def check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ValueError(
            f"image size {width}x{height} (WxH) is not a positive multiple of 16: FLUX.2 needs width and "
            f"height divisible by 16, e.g. {max(16, width // 16 * 16)}x{max(16, height // 16 * 16)}"
        )


def euler_step(latents: mx.array, velocity: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """x <- x + (sigma_next - sigma)·v, in float32 (the latents are kept in float32 throughout)."""
    return latents.astype(mx.float32) + (sigma_next - sigma) * velocity.astype(mx.float32)


def cfg_combine(v_cond: mx.array, v_uncond: mx.array, scale: float) -> mx.array:
    """Real classifier-free guidance: v_uncond + w·(v_cond − v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def initial_noise(seed: int, batch: int, height: int, width: int) -> mx.array:
    """Standard-normal packed latents [batch, H/16·W/16, 128] (float32), reproducible from `seed`.
    Image i of a batch gets the noise of `seed + i`, so a prompt's image does not depend on the
    batch it was generated in."""
    n = image_seq_len(height, width)
    return mx.stack(
        [mx.random.normal((n, LATENT_CHANNELS), dtype=mx.float32, key=mx.random.key(seed + i)) for i in range(batch)]
    )


def pack_grid(latents: mx.array) -> mx.array:
    """Unpacked token grid [B, 128, H/16, W/16] (diffusers' `latents` argument) -> packed
    tokens [B, H/16·W/16, 128], row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(0, 2, 1)


def unpack_grid(tokens: mx.array, height: int, width: int) -> mx.array:
    """Inverse of `pack_grid`: [B, N, 128] -> [B, 128, H/16, W/16]."""
    b, n, c = tokens.shape
    h, w = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
    if n != h * w:
        raise ValueError(f"{n} tokens do not fit a {width}x{height} image ({h}x{w} = {h * w} tokens expected)")
    return tokens.transpose(0, 2, 1).reshape(b, c, h, w)


def denoise(model, x: mx.array, embeds: mx.array, txt_ids: mx.array, img_ids: mx.array, sigmas: list[float],
            guidance: float | None = None, neg_embeds: mx.array | None = None, neg_txt_ids: mx.array | None = None,
            cfg_scale: float | None = None, on_step=None, refs: mx.array | None = None,
            ref_ids: mx.array | None = None) -> mx.array:
    """Euler sampling from packed noise x [B, N, 128] along `sigmas`: one forward per step, with dev's
    embedded `guidance`, or real CFG (`cfg_scale`) against `neg_embeds`. Latents stay float32; one
    evaluation per step. Shared by the pipeline and the trainer's validation images.

    Editing: `refs` [B or 1, M, 128] are the reference images' packed tokens (clean, never noised)
    and `ref_ids` [M, 4] or [B, M, 4] their position ids. Every forward — both CFG passes — sees
    [x ; refs] with [img_ids ; ref_ids]; its output is cut back to x's N tokens and only x is
    updated (docs/architecture.md, "Reference images"). `sigmas` must come from N alone: refs do not
    shift the schedule."""
    dtype = model.dtype
    b, n = x.shape[0], x.shape[1]
    x = x.astype(mx.float32)
    guid = mx.full((b,), guidance, dtype=mx.float32) if guidance is not None else None
    embeds = embeds.astype(dtype)
    if refs is not None or ref_ids is not None:
        refs, img_ids = _with_refs(x, img_ids, refs, ref_ids)
        refs = refs.astype(dtype)

    def velocity(x, emb, tids, t, g):
        inp = x.astype(dtype) if refs is None else mx.concatenate([x.astype(dtype), refs], axis=1)
        v = model(inp, emb, t, img_ids, tids, g)
        return v if refs is None else v[:, :n]

    tokens = b * (n + (0 if refs is None else refs.shape[1]) + embeds.shape[-2])
    with bounded_run_ahead(model_live_bytes(model, tokens)):
        for s in range(len(sigmas) - 1):
            t = mx.full((b,), sigmas[s], dtype=mx.float32)
            v = velocity(x, embeds, txt_ids, t, guid)
            if cfg_scale is not None:
                v_neg = velocity(x, neg_embeds.astype(dtype), neg_txt_ids, t, None)
                v = cfg_combine(v.astype(mx.float32), v_neg.astype(mx.float32), cfg_scale)
            x = euler_step(x, v, sigmas[s], sigmas[s + 1])
            mx.eval(x)
            if on_step is not None:
                on_step()
    return x


def _with_refs(x: mx.array, img_ids: mx.array, refs: mx.array | None, ref_ids: mx.array | None):
    """Checks refs against x and returns (refs [B, M, 128], the joint ids [img_ids ; ref_ids])."""
    if refs is None or ref_ids is None:
        raise ValueError("denoise: pass refs and ref_ids together (reference tokens and their position ids)")
    b, n, c = x.shape
    if refs.ndim != 3 or refs.shape[2] != c or refs.shape[0] not in (1, b):
        raise ValueError(f"denoise: refs of shape {tuple(refs.shape)} do not fit latents {tuple(x.shape)}: expected [1 or {b}, M, {c}]")
    m = refs.shape[1]
    if ref_ids.ndim not in (2, 3) or ref_ids.shape[-2:] != (m, 4):
        raise ValueError(f"denoise: ref_ids of shape {tuple(ref_ids.shape)} do not fit {m} reference tokens: expected [{m}, 4] or [B, {m}, 4]")
    refs = mx.broadcast_to(refs, (b, m, c))
    if img_ids.ndim == 2 and ref_ids.ndim == 2:
        return refs, mx.concatenate([img_ids, ref_ids], axis=0)
    per_batch = lambda ids: ids if ids.ndim == 3 else mx.broadcast_to(ids[None], (b, *ids.shape))  # noqa: E731
    return refs, mx.concatenate([per_batch(img_ids), per_batch(ref_ids)], axis=1)
