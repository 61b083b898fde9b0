"""SwiGLU: silu(gate) · up for h = [gate | up], the fused MLP projection split on its last axis.

- fallback (`swiglu_reference`): the formula, differentiated by autodiff;
- fast path (switch "swiglu"): a custom VJP that recomputes the sigmoid from `gate` instead of
  keeping sigmoid(gate) and silu(gate) alive from the forward pass (1.5 × the MLP width per token),
  and writes the gradient of h in one pass: both halves come out of one elementwise kernel (no
  concatenation of two halves).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mflux2.ops.switches import is_fast


def swiglu(h: mx.array, fast: bool | None = None) -> mx.array:
    return (_swiglu if is_fast("swiglu", fast) else swiglu_reference)(h)


def swiglu_reference(h: mx.array) -> mx.array:
    m = h.shape[-1] // 2
    return nn.silu(h[..., :m]) * h[..., m:]


@mx.custom_function
def _swiglu(h: mx.array) -> mx.array:
    return swiglu_reference(h)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    h = primals[0] if isinstance(primals, (list, tuple)) else primals
    m = h.shape[-1] // 2
    hv = h.reshape(*h.shape[:-1], 2, m)
    g, u = hv[..., :1, :].astype(mx.float32), hv[..., 1:, :].astype(mx.float32)
    c = cotangent[..., None, :].astype(mx.float32)
    sig = mx.sigmoid(g)
    d_gate = c * u * sig * (1 + g * (1 - sig))
    d_up = c * g * sig
    first = (mx.arange(2) == 0)[:, None]  # [2, 1]: row 0 the gate half, row 1 the up half
    return mx.where(first, d_gate, d_up).astype(h.dtype).reshape(h.shape)
