"""RMS norm with a frozen scale: q/k's norms in every block (mflux2 trains LoRA matrices only).

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

import mlx.core as mx

from mflux2.ops.switches import is_fast

_FNS: dict = {}


def rms_norm_frozen(x: mx.array, scale: mx.array, eps: float, fast: bool | None = None) -> mx.array:
    """mx.fast.rms_norm(x, scale, eps) for a frozen `scale` (it gets no gradient on the fast path)."""
    if not is_fast("rms_frozen", fast):
        return mx.fast.rms_norm(x, scale, eps)
    if eps not in _FNS:
        _FNS[eps] = _make(eps)
    return _FNS[eps](x, scale)


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
