"""One switch per operation: its fast path or its plain-MLX fallback.

An op asks `is_fast(name)` each time it is called (so once per trace under mx.compile): `using(name=...)`
if in force, else its environment variable if set ("0": the fallback), else its backend's default
(`BACKEND_DEFAULTS`; True where none is given). The ops also take `fast=` per call.
The CUDA kernels are switches of their own inside the fast paths ("rope_cuda", "dequantize_cuda"):
they run only on a CUDA device, and "0" keeps the fast path's plain-MLX formula there."""

from __future__ import annotations

import os
from contextlib import contextmanager

import mlx.core as mx

SWITCHES = {  # op -> environment variable ("0": the fallback)
    "rope": "MFLUX2_FAST_ROPE",  # RoPE's one-pass VJP | autodiff of the rotation
    "rope_cuda": "MFLUX2_CUDA_ROPE",  # (on CUDA, inside "rope") the RoPE kernel | the elementwise formula
    "swiglu": "MFLUX2_FAST_SWIGLU",  # SwiGLU's recomputing VJP | autodiff of silu(gate)·up
    "split_views": "MFLUX2_FAST_SPLIT",  # split views with a concatenating VJP | plain slices
    "flat_views": "MFLUX2_FAST_FLAT_VIEWS",  # views of the flat parameters, VJP concatenating per group | plain slices
    "flat_transposed": "MFLUX2_FLAT_TRANSPOSED",  # LoRA factors stored transposed in the flat parameters (their gradients flatten as views) | as they are (a layout copy per factor's gradient)
    "qkv_parts": "MFLUX2_QKV_PARTS",  # q, k, v from one GEMM each (contiguous; a LoRA's down-projection shared) | one fused GEMM split into views
    "linear": "MFLUX2_FAST_LINEAR",  # GEMMs per output part, LoRA as accumulator, dequantised tiles | layer(x)
    "dequantize_cuda": "MFLUX2_CUDA_DEQUANTIZE",  # (on CUDA, int8) the dequantisation kernel | mx.dequantize
    "rms_frozen": "MFLUX2_FAST_RMS_FROZEN",  # rms_norm whose VJP forms no gradient for the frozen scale | autodiff of mx.fast.rms_norm
    "norm_rope": "MFLUX2_CUDA_NORM_ROPE",  # (on CUDA, with "rope_cuda") q/k's RMS norm + RoPE as one kernel each way, no scale gradient | rms_norm, then RoPE
    "modulate_ln": "MFLUX2_FAST_MODULATE_LN",  # the modulation as LayerNorm's weight and bias (one kernel; where shift/scale are one row, B = 1) | layer_norm(x)·(1 + scale) + shift
    "layer_norm_cuda": "MFLUX2_CUDA_LAYER_NORM",  # (on CUDA; wins over "modulate_ln") our weightless LayerNorm kernel pair, the modulation elementwise | MLX's layer_norm
    "conv_gemm": "MFLUX2_FAST_CONV",  # convolutions as GEMMs (mx.matmul) | mx.conv2d
    "group_norm": "MFLUX2_FAST_GROUPNORM",  # GroupNorm through mx.fast.layer_norm, unevaluated | chunked float32 statistics
    "sdpa_pad": "MFLUX2_SDPA_PAD",  # attention padded to 128-token multiples, the padding masked (cuDNN's backward on CUDA) | as it is
}
# Where a fast path is not the faster (or not measured) on a backend, its default there is the
# fallback; the environment variable and `using` still choose. Backends: "cuda", "metal", "cpu".
# "flat_transposed" is on everywhere without a measurement: it only removes copies (one per LoRA
# factor's gradient, no node added: scripts/kernel_profile.py census), the switch is for the A/B.
BACKEND_DEFAULTS = {  # measured: docs/performance.md, "The VAE" (H100, 2026-12-07)
    # CUDA: mx.conv2d (cuDNN) is 1.2-4.2x faster than the GEMMs per convolution; CPU: the GEMMs ~1.8x
    # faster in bf16; Metal: not measured, so MLX's own convolution
    "conv_gemm": {"cuda": False, "metal": False},
    # CUDA: 0.74 ms instead of 118 ms per GroupNorm at 512x512x128 (the fallback's ~16 evaluations);
    # CPU: mx.fast.layer_norm is composed of ops holding float32 copies; Metal: not measured (nor its
    # memory: a 512² decode's peak went 0.81 -> 2.24 GB on CUDA without the evaluations)
    "group_norm": {"cpu": False, "metal": False},
    # issue 33, not measured anywhere yet (the session's GPU never started; the shared 2-core CPU was
    # too loaded for a step-time comparison): off until `bash scripts/gpu_s10.sh ours` has timed it
    # against the fused q/k/v GEMM (MFLUX2_QKV_PARTS=1 turns it on)
    "qkv_parts": {"cuda": False, "metal": False, "cpu": False},
    # issue 33, not measured yet: off until gpu_s10.sh has timed it (MFLUX2_FAST_RMS_FROZEN=1 turns it on)
    "rms_frozen": {"cuda": False, "metal": False, "cpu": False},
    # a CUDA kernel (it never runs elsewhere); off until measured against rms_norm + the RoPE kernel
    "norm_rope": {"cuda": False},
    # H100 (2026-12-07): each norm alone 1.2-2.3x faster, the step within its run-to-run spread
    # either way, so both stay off; Metal not measured (MFLUX2_FAST_MODULATE_LN=1,
    # MFLUX2_CUDA_LAYER_NORM=1 turn them on); layer_norm_cuda never runs off CUDA
    "modulate_ln": {"cuda": False, "metal": False, "cpu": False},
    "layer_norm_cuda": {"cuda": False},
    # the padded attention (issue 34, buckets whose sequence is not a multiple of 128): on CUDA it
    # should turn the unfused backward into cuDNN's; not measured yet, so off until
    # `bash scripts/gpu_s16.sh` times it (MFLUX2_SDPA_PAD=1 turns it on). Metal's backward is
    # unfused at any length and the CPU has no fused one: there it only adds work. Sampling's
    # forward is fused at any length, so where it wins it belongs to the training step only.
    "sdpa_pad": {"cuda": False, "metal": False, "cpu": False},
}
_FORCED: dict[str, bool] = {}


def is_fast(name: str, override: bool | None = None, on: str | None = None) -> bool:
    """Whether op `name` takes its fast path: `override` if given, else `using`'s, else the
    environment, else the default of backend `on` (default: this machine's)."""
    if override is not None:
        return override
    if name in _FORCED:
        return _FORCED[name]
    env = os.environ.get(SWITCHES[name])
    if env is not None:
        return env != "0"
    return BACKEND_DEFAULTS.get(name, {}).get(on or backend(), True)


@contextmanager
def using(**ops: bool):
    """Force ops to their fast path (True) or fallback (False) inside the block: using(rope=False)."""
    unknown = set(ops) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; the switches are {', '.join(SWITCHES)}")
    saved = dict(_FORCED)
    _FORCED.update(ops)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def backend() -> str:
    """The default device's backend: "cuda", "metal" or "cpu"."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)  # (MLX builds before the CUDA backend have no mx.cuda)
    return cuda is not None and cuda.is_available() and hasattr(mx.fast, "cuda_kernel")


def on_cuda(name: str, fast: bool | None = None) -> bool:
    """Whether the CUDA kernel of switch `name` runs here: a CUDA default device and the switch on
    (`fast` overrides it, as in `is_fast`)."""
    return mx.default_device() == mx.gpu and cuda_available() and is_fast(name, fast)
