"""Attention over token-major q/k/v, and a padded path for MLX's fused attention backward on CUDA.

MLX's CUDA backend runs the attention VJP through cuDNN only when the sequence length is a multiple
of 128 (`ScaledDotProductAttentionVJP::use_fallback`); otherwise it differentiates the unfused
formula (Q Kᵀ, softmax, · V, with the [B, H, L, L] scores in memory). A training sequence is the text
tokens plus the image tokens, so a bucket such as 576 × 448 (1,008 image tokens + 512 text = 1,520)
takes that path: its steps measured 0.070 s against 0.055 s at 1,024 image tokens on an H100
(docs/performance.md, "Buckets"). The fast path pads q, k and v with zero tokens up to the next
multiple of 128 and hides the padding as keys with a mask, so every real token's output is exactly
the unpadded attention's and the padded queries' outputs are dropped (their cotangents are zero).
Metal's attention VJP is always the unfused formula, so there the padding would only add work."""

from __future__ import annotations

import mlx.core as mx

from mflux2.ops.switches import is_fast

TILE = 128  # the sequence multiple MLX's CUDA backend needs for cuDNN's attention backward


def _heads_first(a: mx.array) -> mx.array:
    return a.transpose(0, 2, 1, 3)  # [B, N, H, d] <-> [B, H, N, d] (a view)


def attention_tokens(q: mx.array, k: mx.array, v: mx.array, scale: float, fast: bool | None = None) -> mx.array:
    """softmax(q kᵀ · scale) v over token-major [B, N, H, d] inputs -> [B, N, H, d]. SDPA reads them
    through transposed views and (on CUDA) writes its output in the token-major layout, so merging
    the heads afterwards is free. Switch "sdpa_pad": pad N to a multiple of TILE (see the module)."""
    n = q.shape[1]
    pad = -n % TILE
    if pad and is_fast("sdpa_pad", fast):
        return _padded(q, k, v, scale, n, pad)
    return _heads_first(mx.fast.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), scale=scale))


def _padded(q, k, v, scale, n, pad):
    widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
    q, k, v = (mx.pad(a, widths) for a in (q, k, v))
    # additive, in the inputs' dtype: 0 on the real keys, -inf on the padding; one row broadcast to
    # every query (cuDNN reads it as a bias)
    keys = mx.where(mx.arange(n + pad) < n, 0.0, -mx.inf).astype(q.dtype)
    mask = mx.broadcast_to(keys[None, None, None, :], (1, 1, n + pad, n + pad))
    out = mx.fast.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v), scale=scale, mask=mask)
    return _heads_first(out)[:, :n]

