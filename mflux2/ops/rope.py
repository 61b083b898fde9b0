"""Rotary position embedding: the tables and the rotation of q/k.

What the model needs: `rope_table(ids, axes_dims, theta)` once per forward pass, then
`apply_rope(x, tables)` on q and k [B, N, H, d] of every block. The rotation turns adjacent pairs
(x[2j], x[2j+1]) of the head dim, in float32 [BFL `apply_rope`].

- fallback (`rope_reference`): x·c + swap(x)·s, differentiated by autodiff;
- fast path (switch "rope"): the same forward with a custom VJP, the rotation by the opposite angle
  in one elementwise pass (autodiff's VJP of the strided read fills a zero array and scatters into
  it, per q and k of every block);
- on CUDA (switch "rope_cuda", inside the fast path): one custom kernel for both directions.
"""

from __future__ import annotations

import mlx.core as mx

from mflux2.ops.switches import is_fast, on_cuda


def rope_table(ids: mx.array, axes_dims: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """Rotation tables (c, s) [B, N, 1, head_dim/2, 2] (float32) for 4-axis position ids [B, N, 4]:
    c = (cos, cos) and s = (-sin, +sin) per adjacent pair, so RoPE is two products and a sum."""
    ids = ids.astype(mx.float32)
    angles = []
    for axis, dim in enumerate(axes_dims):
        omega = 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
        angles.append(ids[..., axis : axis + 1] * omega)
    angles = mx.concatenate(angles, axis=-1)[:, :, None, :, None]  # [B, N, 1, head_dim/2, 1]
    cos, sin = mx.cos(angles), mx.sin(angles)
    return mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)


def apply_rope(x: mx.array, rope: tuple[mx.array, mx.array], fast: bool | None = None) -> mx.array:
    """x [B, N, H, d] rotated by the tables `rope` = (c, s) of `rope_table`, in x's dtype. Written as
    x·c + swap(x)·s — elementwise with a strided read, no stack — so mx.compile makes it one kernel
    whose float32 intermediates never reach memory."""
    return (_rope if is_fast("rope", fast) else rope_reference)(x, *rope)


def rope_reference(x, c, s):
    """The fallback: the rotation as a formula (and autodiff for its gradient)."""
    shape = x.shape
    xp = x.reshape(*shape[:-1], -1, 2)
    xf, xs = xp.astype(mx.float32), xp[..., ::-1].astype(mx.float32)
    return (xf * c + xs * s).astype(x.dtype).reshape(shape)


@mx.custom_function
def _rope(x, c, s):
    if _rope_on_cuda(x):
        return _rope_cuda(x, c, s, 1)
    return rope_reference(x, c, s)


@_rope.vjp
def _rope_vjp(primals, cotangent, output):
    """dx = g·c + swap(g·s) = g·c − swap(g)·s (s holds (−sin, +sin) per pair, so swap(s) = −s):
    the rotation by the opposite angle, one elementwise pass like the forward. The tables get no
    gradient."""
    x, c, s = primals
    if _rope_on_cuda(cotangent):
        return _rope_cuda(cotangent, c, s, -1), mx.zeros_like(c), mx.zeros_like(s)
    shape = x.shape
    gp = cotangent.reshape(*shape[:-1], -1, 2)
    dx = gp.astype(mx.float32) * c - gp[..., ::-1].astype(mx.float32) * s
    return dx.astype(x.dtype).reshape(shape), mx.zeros_like(c), mx.zeros_like(s)


# On CUDA, RoPE is one custom kernel: MLX's fused elementwise kernel for x·c + swap(x)·s has to use
# its general strided indexing (the swapped read and the tables broadcast over heads) and took
# 55 µs per q or k of klein-4b at 512² on an H100; this kernel saved 3.7 ms of a 68 ms step
# (docs/performance.md). One thread per (even, odd) pair; float32 arithmetic; the tables are
# rope_table's (c, s) as they are, read at their token (modulo their count: a batch may share one).
_ROPE_KERNEL = []
_ROPE_SOURCE = """
    size_t p = cooperative_groups::this_grid().thread_rank();
    if (p >= NP) return;
    size_t j = ((p / PT) % NT) * PH + p % PH;
    float c = tc[2 * j];
    float s = NEG ? -ts[2 * j + 1] : ts[2 * j + 1];
    float a = static_cast<float>(x[2 * p]);
    float b = static_cast<float>(x[2 * p + 1]);
    out[2 * p] = static_cast<T>(a * c - b * s);
    out[2 * p + 1] = static_cast<T>(b * c + a * s);
"""


def _rope_on_cuda(x) -> bool:
    """The CUDA kernel, unless MFLUX2_CUDA_ROPE=0 (then the elementwise formula, as elsewhere)."""
    return on_cuda("rope_cuda") and x.dtype in (mx.bfloat16, mx.float16, mx.float32)


def _rope_cuda(x: mx.array, c: mx.array, s: mx.array, sign: int) -> mx.array:
    """Rotate the pairs of x [B, N, H, d] by the angles of the tables (sign -1: the opposite angle)."""
    if not _ROPE_KERNEL:
        _ROPE_KERNEL.append(mx.fast.cuda_kernel(name="mflux2_rope", input_names=["x", "tc", "ts"],
                                                output_names=["out"], source=_ROPE_SOURCE))
    b, n, h, d = x.shape
    pairs_per_token, pairs_per_head = h * d // 2, d // 2
    table_tokens = c.size // d
    if (b * n) % table_tokens or c.size != table_tokens * d or s.size != c.size:
        raise ValueError(f"RoPE tables {c.shape} do not fit x {x.shape}")
    n_pairs = x.size // 2
    return _ROPE_KERNEL[0](
        inputs=[x, c, s], output_shapes=[x.shape], output_dtypes=[x.dtype],
        template=[("T", x.dtype), ("NP", n_pairs), ("PT", pairs_per_token), ("PH", pairs_per_head),
                  ("NT", table_tokens), ("NEG", int(sign < 0))],  # (template values name the kernel: no minus sign)
        grid=(n_pairs, 1, 1), threadgroup=(256, 1, 1),
    )[0]


# ---- RMS norm + RoPE in one CUDA kernel per direction (switch "norm_rope", CUDA only) -------------
# q and k of every block are RMS-normalised over the head dim with a frozen scale, then rotated. As
# two ops that is, per q or k: MLX's rms_norm (forward), the RoPE kernel, and backward the RoPE VJP
# kernel, MLX's rms_norm VJP — which also writes the scale's gradient, a full-size array reduced by
# another kernel, though the scale is frozen. Here: one warp per (token, head) row, both reductions
# (Σx², Σ(w·dy)·x) by warp shuffles, float32 arithmetic, no scale gradient.
_NORM_ROPE_KERNELS = {}
_NORM_ROPE_HEAD = """
    size_t gid = cooperative_groups::this_grid().thread_rank();
    size_t row = gid / 32;
    int lane = gid % 32;
    if (row >= NR) return;
    size_t j0 = ((row / H) % NT) * (D / 2);
    const float e = eps[0];
"""
_NORM_ROPE_FORWARD = _NORM_ROPE_HEAD + """
    const T* xr = x + row * D;
    T* o = out + row * D;
    float ss = 0.f;
    for (int k = lane; k < D / 2; k += 32) {
        float a = static_cast<float>(xr[2 * k]), b = static_cast<float>(xr[2 * k + 1]);
        ss += a * a + b * b;
    }
    for (int m = 16; m > 0; m >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, m);
    float n = rsqrtf(ss / D + e);
    for (int k = lane; k < D / 2; k += 32) {
        float a = static_cast<float>(xr[2 * k]) * n * static_cast<float>(w[2 * k]);
        float b = static_cast<float>(xr[2 * k + 1]) * n * static_cast<float>(w[2 * k + 1]);
        float c = tc[2 * (j0 + k)], s = ts[2 * (j0 + k) + 1];
        o[2 * k] = static_cast<T>(a * c - b * s);
        o[2 * k + 1] = static_cast<T>(b * c + a * s);
    }
"""
_NORM_ROPE_BACKWARD = _NORM_ROPE_HEAD + """
    const T* xr = x + row * D;
    const T* gr = g + row * D;
    T* o = out + row * D;
    float ss = 0.f, su = 0.f;
    for (int k = lane; k < D / 2; k += 32) {
        float a = static_cast<float>(xr[2 * k]), b = static_cast<float>(xr[2 * k + 1]);
        float g0 = static_cast<float>(gr[2 * k]), g1 = static_cast<float>(gr[2 * k + 1]);
        float c = tc[2 * (j0 + k)], s = ts[2 * (j0 + k) + 1];
        float u0 = (g0 * c + g1 * s) * static_cast<float>(w[2 * k]);
        float u1 = (g1 * c - g0 * s) * static_cast<float>(w[2 * k + 1]);
        ss += a * a + b * b;
        su += u0 * a + u1 * b;
    }
    for (int m = 16; m > 0; m >>= 1) {
        ss += __shfl_xor_sync(0xffffffff, ss, m);
        su += __shfl_xor_sync(0xffffffff, su, m);
    }
    float n = rsqrtf(ss / D + e);
    float t = n * n * n * su / D;
    for (int k = lane; k < D / 2; k += 32) {
        float a = static_cast<float>(xr[2 * k]), b = static_cast<float>(xr[2 * k + 1]);
        float g0 = static_cast<float>(gr[2 * k]), g1 = static_cast<float>(gr[2 * k + 1]);
        float c = tc[2 * (j0 + k)], s = ts[2 * (j0 + k) + 1];
        float u0 = (g0 * c + g1 * s) * static_cast<float>(w[2 * k]);
        float u1 = (g1 * c - g0 * s) * static_cast<float>(w[2 * k + 1]);
        o[2 * k] = static_cast<T>(n * u0 - a * t);
        o[2 * k + 1] = static_cast<T>(n * u1 - b * t);
    }
"""


def norm_rope(x: mx.array, weight: mx.array, eps: float, rope: tuple[mx.array, mx.array], fast: bool | None = None) -> mx.array:
    """apply_rope(rms_norm(x, weight, eps), rope) for x [B, N, H, d] with a frozen weight [d] (it gets
    no gradient): on CUDA one kernel each way (switch "norm_rope"), else the two ops."""
    if _norm_rope_on_cuda(x, fast):
        return _norm_rope(x, weight, mx.array([eps], dtype=mx.float32), *rope)
    return apply_rope(mx.fast.rms_norm(x, weight, eps), rope)


def norm_rope_fused(dtype, head_dim: int, fast: bool | None = None) -> bool:
    """Whether norm_rope runs its CUDA kernels for q/k of this dtype and head dim (else the two ops):
    the model then applies RoPE per stream, right after each stream's norm."""
    return (on_cuda("rope_cuda") and is_fast("norm_rope", fast) and is_fast("rope")
            and dtype in (mx.bfloat16, mx.float16, mx.float32) and head_dim % 64 == 0)


def _norm_rope_on_cuda(x, fast=None) -> bool:
    return norm_rope_fused(x.dtype, x.shape[-1], fast)


def _norm_rope_kernel(direction: str, x, w, tc, ts, eps, g=None):
    if direction not in _NORM_ROPE_KERNELS:
        names = ["x", "w", "tc", "ts", "eps"] + (["g"] if direction == "backward" else [])
        source = _NORM_ROPE_FORWARD if direction == "forward" else _NORM_ROPE_BACKWARD
        _NORM_ROPE_KERNELS[direction] = mx.fast.cuda_kernel(name=f"mflux2_norm_rope_{direction}", input_names=names,
                                                            output_names=["out"], source=source)
    b, n, h, d = x.shape
    table_tokens = tc.size // d
    if (b * n) % table_tokens or tc.size != table_tokens * d or ts.size != tc.size:
        raise ValueError(f"RoPE tables {tc.shape} do not fit x {x.shape}")
    rows = b * n * h
    inputs = [x, w, tc, ts, eps] + ([g] if g is not None else [])
    return _NORM_ROPE_KERNELS[direction](
        inputs=inputs, output_shapes=[x.shape], output_dtypes=[x.dtype],
        template=[("T", x.dtype), ("NR", rows), ("D", d), ("H", h), ("NT", table_tokens)],
        grid=(rows * 32, 1, 1), threadgroup=(256, 1, 1),
    )[0]


@mx.custom_function
def _norm_rope(x, w, eps, c, s):
    return _norm_rope_kernel("forward", x, w, c, s, eps)


@_norm_rope.vjp
def _norm_rope_vjp(primals, cotangent, output):
    x, w, eps, c, s = primals
    dx = _norm_rope_kernel("backward", x, w, c, s, eps, g=cotangent)
    return dx, mx.zeros_like(w), mx.zeros_like(eps), mx.zeros_like(c), mx.zeros_like(s)
