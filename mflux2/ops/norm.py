"""The norms: RMS norm with a frozen scale (q/k's norms in every block; mflux2 trains LoRA matrices
only), and the blocks' modulation, LayerNorm then shift and scale (`modulate`, below).

rms_norm_frozen:
- fallback: `mx.fast.rms_norm(x, scale, eps)`, differentiated by autodiff. MLX's VJP of it computes
  the scale's gradient too — a full-size array and a column reduction per norm — although nothing
  asks for it;
- fast path (switch "rms_frozen"): the same forward; its VJP is the VJP of the unscaled norm applied
  to cotangent·scale (exact: d/dx [n(x)·w]ᵀg = J_nᵀ(g·w)), so no scale gradient is formed. The
  multiplication is elementwise, so mx.compile fuses it with the RoPE VJP before it where RoPE is
  elementwise (Metal, the CPU). The scale gets a zero gradient: callers use it only for a frozen
  scale (`RMSNormScale` checks).
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from mflux2.ops.switches import is_fast, on_cuda


def rms_norm_frozen(x: mx.array, scale: mx.array, eps: float, fast: bool | None = None) -> mx.array:
    """mx.fast.rms_norm(x, scale, eps) for a frozen `scale` (it gets no gradient on the fast path)."""
    if not is_fast("rms_frozen", fast):
        return mx.fast.rms_norm(x, scale, eps)
    return _make(eps)(x, scale)


@cache  # one custom function per eps (the VJP closes over it)
def _make(eps: float):
    @mx.custom_function
    def fn(x, scale):
        return mx.fast.rms_norm(x, scale, eps)

    @fn.vjp
    def fn_vjp(primals, cotangent, output):
        x, scale = primals
        _, (dx,) = mx.vjp(lambda x: mx.fast.rms_norm(x, None, eps), [x], [cotangent * scale.astype(cotangent.dtype)])
        return dx, mx.zeros_like(scale)

    return fn


# ---- the blocks' modulation: LayerNorm (no affine), then · (1 + scale) + shift ---------------------
# Every block modulates its inputs so: x [B, N, D], shift and scale [B, 1, D] (per sample, from the
# timestep). An H100 profile of a klein-4b step put MLX's CUDA LayerNorm kernels at ~33-43 µs each
# however many rows (a per-row latency cost, not bandwidth: ~3-6 µs would move the bytes), forward and
# VJP alike. Two switches, both off: timed on an H100 (2026-12-07, docs/performance.md "Session 12"),
# each norm alone got 1.2-2.3x faster (scripts/kernel_profile.py norms) but the step did not move
# beyond its run-to-run spread:
# - "modulate_ln" (every backend): where shift and scale hold one row for all of x's rows (B = 1),
#   the modulation becomes LayerNorm's own weight and bias: one kernel instead of LayerNorm and an
#   elementwise kernel. Its VJP is ours, not MLX's: MLX's LayerNorm VJP, given a weight and a bias,
#   always forms their gradients (a [rows, D] temporary and column reductions), which LoRA training
#   rarely needs. Ours is the weightless VJP of cotangent·(1 + scale) — today's backward — and forms
#   shift's and scale's gradients as separate arrays, so they cost nothing unless something uses them.
# - "layer_norm_cuda" (CUDA only; it wins over "modulate_ln" there): our own weightless LayerNorm,
#   a kernel each way, the modulation left as the elementwise formula mx.compile fuses. One thread
#   block per row: the row read once into registers, float32 sums by warp shuffles and one step
#   through shared memory, the result written once; the VJP reads x and the cotangent once each.


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float, fast: bool | None = None) -> mx.array:
    """layer_norm(x) · (1 + scale) + shift, LayerNorm without affine over the last axis. `fast`
    overrides both switches ("layer_norm_cuda", then "modulate_ln"); False: the formula with MLX's
    LayerNorm."""
    if _layer_norm_on_cuda(x, fast):
        return layer_norm_cuda(x, eps) * (1 + scale) + shift
    if is_fast("modulate_ln", fast) and _one_row(x, shift, scale):
        return _make_fold(eps)(x, shift, scale)
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def _one_row(x, shift, scale) -> bool:
    """Whether shift and scale are one row [D] broadcast over all of x's rows (B = 1), the output
    keeping x's shape — what a LayerNorm weight and bias can express."""
    d = x.shape[-1]
    return shift.size == d and scale.size == d and x.ndim >= max(shift.ndim, scale.ndim)


@cache  # one custom function per eps, as rms_norm_frozen's
def _make_fold(eps: float):
    @mx.custom_function
    def fold(x, shift, scale):
        d = x.shape[-1]
        return mx.fast.layer_norm(x, (1 + scale).reshape(d), shift.reshape(d), eps)

    @fold.vjp
    def fold_vjp(primals, cotangent, output):
        """dx: the weightless LayerNorm VJP of cotangent·(1 + scale); d shift = Σ g and d scale = Σ g·n
        over the rows (n the normalised x, recomputed), evaluated only if used."""
        x, shift, scale = primals
        d = x.shape[-1]
        g = cotangent
        gw = (g * (1 + scale).reshape(d).astype(g.dtype)).astype(x.dtype)
        _, (dx,) = mx.vjp(lambda x: mx.fast.layer_norm(x, None, None, eps), [x], [gw])
        rows = tuple(range(g.ndim - 1))
        g32 = g.astype(mx.float32)
        n = mx.fast.layer_norm(x, None, None, eps).astype(mx.float32)
        dshift = g32.sum(rows).reshape(shift.shape).astype(shift.dtype)
        dscale = (g32 * n).sum(rows).reshape(scale.shape).astype(scale.dtype)
        return dx, dshift, dscale

    return fold


# ---- LayerNorm without affine as a CUDA kernel pair (switch "layer_norm_cuda") ---------------------
# (Template constants arrive as `constexpr int` / `using T = ...` at the top of the kernel body; the
# grid counts threads, so rows·TPB threads in blocks of TPB are one block per row.)
_LN_HEADER = """
// The sums of (a, b) over the thread block: warp shuffles, then one step through shared memory.
__device__ __forceinline__ float2 mflux2_block_sum(float a, float b, float2* partial) {
    for (int m = 16; m > 0; m >>= 1) {
        a += __shfl_xor_sync(0xffffffff, a, m);
        b += __shfl_xor_sync(0xffffffff, b, m);
    }
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = make_float2(a, b);
    __syncthreads();
    float2 s = make_float2(0.f, 0.f);
    for (int w = 0; w < blockDim.x / 32; ++w) {
        s.x += partial[w].x;
        s.y += partial[w].y;
    }
    __syncthreads();  // (the next call overwrites the partial sums)
    return s;
}
"""
_LN_HEAD = """
    constexpr int E = (D + TPB - 1) / TPB;  // elements per thread: x[i], i = threadIdx.x + k·TPB
    __shared__ float2 partial[32];
    const size_t base = size_t(blockIdx.x) * D;
    float v[E];
"""
_LN_FORWARD = _LN_HEAD + """
    float s = 0.f;
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        v[k] = i < D ? static_cast<float>(x[base + i]) : 0.f;
        s += v[k];
    }
    const float mean = mflux2_block_sum(s, 0.f, partial).x / D;
    float q = 0.f;
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        v[k] = i < D ? v[k] - mean : 0.f;  // (0 beyond the row: it adds nothing below)
        q += v[k] * v[k];
    }
    const float rstd = rsqrtf(mflux2_block_sum(q, 0.f, partial).x / D + eps[0]);
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        if (i < D) out[base + i] = static_cast<T>(v[k] * rstd);
    }
"""
# dx = rstd·(g − mean(g) − n·mean(g·n)), n = (x − mean)·rstd; mean(g·n) = rstd·Σ g·(x − mean) / D
_LN_BACKWARD = _LN_HEAD + """
    float u[E];
    float s = 0.f, sg = 0.f;
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        v[k] = i < D ? static_cast<float>(x[base + i]) : 0.f;
        u[k] = i < D ? static_cast<float>(g[base + i]) : 0.f;
        s += v[k];
        sg += u[k];
    }
    const float2 r1 = mflux2_block_sum(s, sg, partial);
    const float mean = r1.x / D, mean_g = r1.y / D;
    float q = 0.f, qg = 0.f;
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        v[k] = i < D ? v[k] - mean : 0.f;  // (0 beyond the row: it adds nothing below)
        q += v[k] * v[k];
        qg += v[k] * u[k];
    }
    const float2 r2 = mflux2_block_sum(q, qg, partial);
    const float rstd = rsqrtf(r2.x / D + eps[0]);
    const float c = rstd * rstd * r2.y / D;  // mean(g·n) / rstd
    #pragma unroll
    for (int k = 0; k < E; ++k) {
        int i = threadIdx.x + k * TPB;
        if (i < D) out[base + i] = static_cast<T>(rstd * (u[k] - mean_g - v[k] * c));
    }
"""
_LN_KERNELS: dict = {}
LN_CUDA_MAX_D = 8192  # 32 floats per thread (64 in the VJP) at 256 threads: wider rows take MLX's kernel


def _layer_norm_on_cuda(x, fast=None) -> bool:
    """Our kernel for this x: a CUDA device, the switch on, a float dtype and a row it holds."""
    return (on_cuda("layer_norm_cuda", fast)
            and x.dtype in (mx.bfloat16, mx.float16, mx.float32) and 0 < x.shape[-1] <= LN_CUDA_MAX_D and x.size > 0)


def layer_norm_cuda(x: mx.array, eps: float) -> mx.array:
    """mx.fast.layer_norm(x, None, None, eps) through our kernels (CUDA only: see _layer_norm_on_cuda)."""
    return _ln_cuda(x, mx.array([eps], dtype=mx.float32))


def _ln_kernel(direction: str, x, eps, g=None):
    if direction not in _LN_KERNELS:
        names = ["x", "eps"] + (["g"] if direction == "backward" else [])
        _LN_KERNELS[direction] = mx.fast.cuda_kernel(
            name=f"mflux2_layer_norm_{direction}", input_names=names, output_names=["out"],
            source=_LN_FORWARD if direction == "forward" else _LN_BACKWARD, header=_LN_HEADER)
    d = x.shape[-1]
    rows = x.size // d
    tpb = min(256, 32 * -(-d // 32))  # (a narrow row: fewer threads, not idle ones)
    return _LN_KERNELS[direction](  # (inputs are made row-contiguous by MLX: ensure_row_contiguous)
        inputs=[x, eps] + ([g] if g is not None else []), output_shapes=[x.shape], output_dtypes=[x.dtype],
        template=[("T", x.dtype), ("D", d), ("TPB", tpb)], grid=(rows * tpb, 1, 1), threadgroup=(tpb, 1, 1),
    )[0]


@mx.custom_function
def _ln_cuda(x, eps):
    return _ln_kernel("forward", x, eps)


@_ln_cuda.vjp
def _ln_cuda_vjp(primals, cotangent, output):
    x, eps = primals
    return _ln_kernel("backward", x, eps, g=cotangent.astype(x.dtype)), mx.zeros_like(eps)
