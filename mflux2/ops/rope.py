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
