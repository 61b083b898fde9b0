"""The FLUX.2 MM-DiT transformer (klein-4b, klein-9b, dev) in one file.

Layout follows BFL's `flux2/model.py`, so parameter paths equal the official checkpoint keys
(`double_blocks.0.img_attn.qkv.weight`, `single_blocks.3.linear1.weight`, ...) and LoRA files in
BFL names (ai-toolkit, ComfyUI) address our modules directly. q/k/v stay fused in one matmul and the
single blocks keep the fused qkv+MLP weight (run as two GEMMs on its row slices). Diffusers
checkpoints are mapped on load (`sanitize`). Spec: shared/spec/flux2-architecture.md §2–3.
The forward pass is written for training memory and speed (saved activations, copies, quantized
bases): docs/performance.md.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mflux2.weights import WeightsError, check_keys, iter_tensors, read_config, resolve_component, safetensors_files


@dataclass
class TransformerConfig:
    num_layers: int = 5  # double-stream blocks
    num_single_layers: int = 20
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 7680  # context dim = 3 x text-encoder hidden size
    in_channels: int = 128
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    timestep_guidance_channels: int = 256
    guidance_embeds: bool = False
    eps: float = 1e-6

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim {self.attention_head_dim}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """From a diffusers `config.json` (unknown keys such as `_class_name` are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


PRESETS = {
    "klein-4b": TransformerConfig(),
    "klein-9b": TransformerConfig(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
    "dev": TransformerConfig(
        num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True
    ),
}
PRESETS["klein-base-4b"] = PRESETS["klein-4b"]
PRESETS["klein-base-9b"] = PRESETS["klein-9b"]


def preset(name: str) -> TransformerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX.2 variant {name!r}; choose one of {', '.join(PRESETS)}")
    return TransformerConfig(**asdict(PRESETS[name]))


# ----------------------------------------------------------------------------------------------
# Pieces


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding of t·1000, cos half first, in float32 [BFL `timestep_embedding`]."""
    half = dim // 2
    # Frequencies rounded once from float64: t·1000 (and guidance·1000 up to ~4000) amplifies any
    # ulp difference in exp() into the angle.
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / half
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = (t.astype(mx.float32) * 1000.0)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


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


def apply_rope(x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of the head dim of x [B, N, H, d], in float32 [BFL
    `apply_rope`]. Written as x·c + swap(x)·s — elementwise with a strided read, no stack — so
    mx.compile makes it one kernel whose float32 intermediates never reach memory; on CUDA a
    custom kernel instead (below)."""
    return _rope(x, *rope)


@mx.custom_function
def _rope(x, c, s):
    if _rope_on_cuda(x):
        return _rope_cuda(x, c, s, 1)
    shape = x.shape
    xp = x.reshape(*shape[:-1], -1, 2)
    xf, xs = xp.astype(mx.float32), xp[..., ::-1].astype(mx.float32)
    return (xf * c + xs * s).astype(x.dtype).reshape(shape)


@_rope.vjp
def _rope_vjp(primals, cotangent, output):
    """dx = g·c + swap(g·s) = g·c − swap(g)·s (s holds (−sin, +sin) per pair, so swap(s) = −s):
    the rotation by the opposite angle, one elementwise pass like the forward. (Autodiff's VJP of
    the strided read fills a zero array and scatters into it, per q and k of every block.) The
    tables get no gradient."""
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


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)  # (MLX builds before the CUDA backend have no mx.cuda)
    return cuda is not None and cuda.is_available() and hasattr(mx.fast, "cuda_kernel")


def _rope_on_cuda(x) -> bool:
    """The CUDA kernel, unless MFLUX2_CUDA_ROPE=0 (then the elementwise formula, as elsewhere)."""
    return (mx.default_device() == mx.gpu and cuda_available() and os.environ.get("MFLUX2_CUDA_ROPE", "1") != "0"
            and x.dtype in (mx.bfloat16, mx.float16, mx.float32))


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


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def attention(q: mx.array, k: mx.array, v: mx.array, rope) -> mx.array:
    """RoPE on q/k, SDPA, heads merged back: [B, N, H, d] -> [B, N, H·d].

    q/k/v stay in the token-major layout of the projections; SDPA reads them through transposed
    views and (on CUDA) writes its output in the same layout, so merging the heads is free."""
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    t = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731  [B, N, H, d] -> [B, H, N, d] (a view)
    out = mx.fast.scaled_dot_product_attention(t(q), t(k), t(v), scale=q.shape[-1] ** -0.5)
    b, h, n, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


_SPLITS = {}


def split_views(y: mx.array, sizes: tuple[int, ...], axis: int = -1) -> list[mx.array]:
    """y split along `axis` (the last by default) into parts of `sizes` (views). Its VJP concatenates
    the parts' cotangents once; plain slicing would give each part a zero-padded full-size cotangent."""
    sizes, axis = tuple(int(n) for n in sizes), axis % y.ndim
    if (sizes, axis) not in _SPLITS:
        edges = [0]
        for n in sizes:
            edges.append(edges[-1] + n)
        lead = (slice(None),) * axis

        @mx.custom_function
        def split(y):
            return tuple(y[lead + (slice(a, b),)] for a, b in zip(edges, edges[1:]))

        @split.vjp
        def split_vjp(primals, cotangents, outputs):
            cots = [mx.zeros_like(o) if c is None else c for c, o in zip(cotangents, outputs)]
            return mx.concatenate(cots, axis=axis)

        _SPLITS[(sizes, axis)] = split
    return list(_SPLITS[(sizes, axis)](y))


@mx.custom_function
def swiglu(h: mx.array) -> mx.array:
    """silu(gate) · up for h = [gate | up] (the fused MLP projection, last axis). The custom VJP
    recomputes the sigmoid from `gate` instead of keeping sigmoid(gate) and silu(gate) alive from
    the forward pass (1.5 × the MLP width per token), and writes the gradient of h in one pass:
    both halves come out of one elementwise kernel (no concatenation of two halves)."""
    m = h.shape[-1] // 2
    return nn.silu(h[..., :m]) * h[..., m:]


@swiglu.vjp
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


# ----------------------------------------------------------------------------------------------
# Linear layers as GEMMs. The blocks call `linear`, `linear_split` and `linear_concat` instead of
# `layer(x)`: a fused projection's output parts come from separate GEMMs on row slices of its
# weight (no slicing copies of a wide output; row slices of a weight are contiguous), a LoRA delta
# enters as the accumulator of the base GEMM (`mx.addmm`) and reads only the input columns it
# covers (so a concatenated input is not kept for the backward pass), and a quantized base is
# dequantised to bf16 right before its GEMM at training/generation token counts
# (`quantized_matmul` is slower there); the dequantised weight is never kept for the backward
# pass, which dequantises again.

DEQUANTIZE_MIN_ROWS = 256  # below this many tokens, quantized_matmul (small batch generation)


def _is_lora(layer) -> bool:
    return hasattr(layer, "lora_forward")  # a LoRALinear (duck-typed: mflux2.lora imports this module)


def _overlap(a0, a1, b0, b1):
    return max(a0, b0), min(a1, b1)


def _project(layer, xs: list, rows: list, accs: list) -> list:
    """[acc_j + (concat(xs) @ W^T)[..., rows_j]] for the output row ranges `rows`; acc_j may be None."""
    if _is_lora(layer):
        if not layer.enabled or layer.scale == 0.0:
            return _project(layer.base, xs, rows, accs)
        bounds = [0]
        for x in xs:
            bounds.append(bounds[-1] + x.shape[-1])
        i0, i1 = layer.in_start, layer.in_stop
        parts = []
        for (c0, c1), x in zip(zip(bounds, bounds[1:]), xs):  # the input columns the LoRA reads
            o0, o1 = _overlap(c0, c1, i0, i1)
            if o0 < o1:
                parts.append(x if (o0, o1) == (c0, c1) else x[..., o0 - c0 : o1 - c0])
        z = layer.lora_forward(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1))
        s0, s1 = layer.out_start, layer.out_stop
        new = []
        for (r0, r1), acc in zip(rows, accs):
            o0, o1 = _overlap(r0, r1, s0, s1)
            if o0 < o1:
                part = z if (o0, o1) == (s0, s1) else z[..., o0 - s0 : o1 - s0]
                if (o0, o1) != (r0, r1):
                    part = mx.pad(part, [(0, 0)] * (part.ndim - 1) + [(o0 - r0, r1 - o1)])
                acc = part if acc is None else acc + part
            new.append(acc)
        return _project(layer.base, xs, rows, new)

    if isinstance(layer, nn.QuantizedLinear) and xs[0].size // xs[0].shape[-1] >= DEQUANTIZE_MIN_ROWS:
        return _dequantized_gemm(layer, xs, rows, accs)
    # A bf16 base: one GEMM per row range on the concatenated input. (A sum of GEMMs over column
    # slices of W would avoid the concatenation, but MLX's CUDA GEMM copies a column slice.)
    x = xs[0] if len(xs) == 1 else mx.concatenate(xs, axis=-1)
    if isinstance(layer, nn.QuantizedLinear):
        y = layer(x)
        outs = [y if (r0, r1) == (0, y.shape[-1]) else y[..., r0:r1] for r0, r1 in rows]
        return [o if a is None else a + o for o, a in zip(outs, accs)]
    if isinstance(layer, nn.Linear):
        return _gemms(layer.weight, x, rows, accs, layer.get("bias"))
    raise TypeError(f"cannot project through a {type(layer).__name__}")


def _gemms(w, x, rows, accs, bias=None):
    outs = []
    for (r0, r1), acc in zip(rows, accs):
        wr = (w if (r0, r1) == (0, w.shape[0]) else w[r0:r1]).T
        y = x @ wr if acc is None else mx.addmm(acc, x, wr)
        outs.append(y if bias is None else y + bias[r0:r1])
    return outs


_DEQUANT_FNS = {}
# Weights dequantised at most 64M at a time (128 MB of bf16); MFLUX2_DEQUANTIZE_TILE for experiments
# (16M took klein-4b int8's serialised checkpointed peak from 5.69 to 5.64 GB: docs/performance.md).
DEQUANTIZE_TILE = int(os.environ.get("MFLUX2_DEQUANTIZE_TILE", 1 << 26))


def _tiles(rows, cols, n_in, bits, group_size):
    """Output row chunks of each row range, and input column blocks: (row ranges per output, column
    ranges). Columns follow the input parts when they fall on quantization group boundaries."""
    step = 32 // bits
    if not all(c % group_size == 0 and c % step == 0 for c in cols[1:-1]):
        cols = [0, n_in]
    max_rows = max(1, DEQUANTIZE_TILE // n_in)
    chunks = []
    for r0, r1 in rows:
        n = -(-(r1 - r0) // max_rows)
        edges = [r0 + (r1 - r0) * i // n for i in range(n + 1)]
        chunks.append(list(zip(edges, edges[1:])))
    return chunks, list(zip(cols, cols[1:]))


def _dequantized_gemm(layer, xs, rows, accs):
    n_in = layer.weight.shape[1] * 32 // layer.bits
    cols = [0]
    for x in xs:
        cols.append(cols[-1] + x.shape[-1])
    chunks, col_ranges = _tiles(rows, cols, n_in, layer.bits, layer.group_size)
    if len(col_ranges) != len(xs):
        xs = [mx.concatenate(xs, axis=-1)]
    has_acc = tuple(a is not None for a in accs)
    has_qb = layer.get("biases") is not None
    has_bias = layer.get("bias") is not None
    key = (tuple(map(tuple, chunks)), tuple(col_ranges), has_acc, has_qb, has_bias, layer.group_size, layer.bits,
           getattr(layer, "mode", "affine"))
    if key not in _DEQUANT_FNS:
        _DEQUANT_FNS[key] = _make_dequantized_gemm(*key)
    args = list(xs) + [a for a in accs if a is not None] + [layer.weight, layer.scales]
    args += [layer.get("biases")] if has_qb else []
    args += [layer.get("bias")] if has_bias else []
    return list(_DEQUANT_FNS[key](*args))


def dequantize_tile(wq, scales, qb, rows: tuple[int, int], cols: tuple[int, int], group_size: int, bits: int,
                    mode: str = "affine") -> mx.array:
    """W[r0:r1, c0:c1] of a quantized weight (wq packed uint32, scales and biases per group of the
    input dimension), in the scales' dtype."""
    (r0, r1), (c0, c1) = rows, cols
    if _dequantize_on_cuda(wq, scales, qb, bits, mode):
        return _dequantize_cuda(wq, scales, qb, rows, cols, group_size, bits)
    step = 32 // bits
    return mx.dequantize(wq[r0:r1, c0 // step : c1 // step], scales[r0:r1, c0 // group_size : c1 // group_size],
                         None if qb is None else qb[r0:r1, c0 // group_size : c1 // group_size], group_size, bits, mode=mode)


# On CUDA, a tile is dequantised by one custom kernel that reads the packed weight, scales and
# biases where the tile lies in them (mx.dequantize needs its inputs sliced first: copies for
# column tiles, three more graph nodes a tile). On an H200 it dequantised klein-4b's linear1 (85M
# int8 weights) in 0.137 ms against mx.dequantize's 0.315, and took the int8 + checkpointing step
# from 0.114 to 0.097 s (docs/performance.md). One thread per packed uint32 (4 int8 or 8 int4
# values, the lowest bits first: MLX's affine packing), w = scale·q + bias in float32.
_DEQUANT_KERNEL = []
_DEQUANT_SOURCE = """
    size_t p = cooperative_groups::this_grid().thread_rank();
    if (p >= NW) return;
    size_t row = p / TW, wc = p % TW;
    uint32_t word = wq[(R0 + row) * FW + C0W + wc];
    size_t col = (C0W + wc) * VPW;
    size_t g = (R0 + row) * FG + col / GS;
    float scale = static_cast<float>(scales[g]);
    float bias = static_cast<float>(biases[g]);
    size_t o = row * (TW * VPW) + wc * VPW;
    alignas(16) T vals[VPW];
    #pragma unroll
    for (int k = 0; k < VPW; k++) {
        float q = static_cast<float>((word >> (BITS * k)) & ((1u << BITS) - 1u));
        vals[k] = static_cast<T>(scale * q + bias);
    }
    if (VEC && sizeof(T) * VPW == 8) {
        *reinterpret_cast<uint2*>(out + o) = *reinterpret_cast<const uint2*>(vals);
    } else if (VEC && sizeof(T) * VPW == 16) {
        *reinterpret_cast<uint4*>(out + o) = *reinterpret_cast<const uint4*>(vals);
    } else {
        #pragma unroll
        for (int k = 0; k < VPW; k++) out[o + k] = vals[k];
    }
"""


def _dequantize_on_cuda(wq, scales, qb, bits, mode) -> bool:
    """The CUDA kernel for affine int8 (unless MFLUX2_CUDA_DEQUANTIZE=0). It handles int4 too, but
    with scalar stores it took 0.325 ms for linear1 against mx.dequantize's 0.180 (H200): int4
    stays with mx.dequantize until its vectorised stores are measured (scripts/quant_gemm_bench.py)."""
    return (mx.default_device() == mx.gpu and cuda_available() and os.environ.get("MFLUX2_CUDA_DEQUANTIZE", "1") != "0"
            and mode == "affine" and qb is not None and bits == 8 and scales.dtype in (mx.bfloat16, mx.float16, mx.float32))


def _dequantize_cuda(wq, scales, qb, rows, cols, group_size, bits):
    if not _DEQUANT_KERNEL:
        _DEQUANT_KERNEL.append(mx.fast.cuda_kernel(name="mflux2_dequantize", input_names=["wq", "scales", "biases"],
                                                   output_names=["out"], source=_DEQUANT_SOURCE))
    (r0, r1), (c0, c1) = rows, cols
    vpw = 32 // bits
    if c0 % group_size or c1 % group_size or c0 % vpw or c1 % vpw:
        raise ValueError(f"dequantize tile columns {cols} do not fall on groups of {group_size}")
    n_words = (r1 - r0) * (c1 - c0) // vpw
    return _DEQUANT_KERNEL[0](
        inputs=[wq, scales, qb], output_shapes=[(r1 - r0, c1 - c0)], output_dtypes=[scales.dtype],
        template=[("T", scales.dtype), ("NW", n_words), ("TW", (c1 - c0) // vpw), ("FW", wq.shape[1]), ("R0", r0),
                  ("C0W", c0 // vpw), ("FG", scales.shape[1]), ("GS", group_size), ("VPW", vpw), ("BITS", bits),
                  ("VEC", int(os.environ.get("MFLUX2_DEQUANTIZE_VEC", "1") != "0"))],  # 0: scalar stores (the bench's comparison)
        grid=(n_words, 1, 1), threadgroup=(256, 1, 1),
    )[0]


def _make_dequantized_gemm(chunks, col_ranges, has_acc, has_qb, has_bias, group_size, bits, mode):
    """A custom function: outputs [acc_j + x @ W[rows_j]^T], W dequantised tile by tile (row chunks
    × input parts) just before each GEMM, again in the VJP (which needs no x: the base is frozen)."""
    n_x, n_acc = len(col_ranges), sum(has_acc)

    def unpack(args):
        xs, it = list(args[:n_x]), iter(args[n_x : n_x + n_acc])
        accs = [next(it) if h else None for h in has_acc]
        rest = list(args[n_x + n_acc :])
        return xs, accs, rest[0], rest[1], (rest[2] if has_qb else None), (rest[-1] if has_bias else None)

    def tile(wq, scales, qb, r, c):
        return dequantize_tile(wq, scales, qb, r, c, group_size, bits, mode)

    @mx.custom_function
    def fn(*args):
        xs, accs, wq, scales, qb, bias = unpack(args)
        outs = []
        for row_chunks, acc in zip(chunks, accs):
            parts = []
            for j, r in enumerate(row_chunks):
                y = None if acc is None else (acc if len(row_chunks) == 1 else acc[..., r[0] - row_chunks[0][0] : r[1] - row_chunks[0][0]])
                for x, c in zip(xs, col_ranges):
                    wt = tile(wq, scales, qb, r, c).T
                    y = x @ wt if y is None else mx.addmm(y, x, wt)
                if bias is not None:
                    y = y + bias[r[0] : r[1]]
                parts.append(y)
            outs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1))
        return tuple(outs)

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        xs, accs, wq, scales, qb, bias = unpack(primals)
        cots = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        # Dequantise again once the cotangent exists: each bf16 tile lives for one GEMM only.
        deps = mx.depends([wq, scales] + ([qb] if has_qb else []), cots[:1])
        wq, scales, qb = deps[0], deps[1], (deps[2] if has_qb else None)
        dxs = [None] * n_x
        for row_chunks, cot in zip(chunks, cots):
            base = row_chunks[0][0]
            for r in row_chunks:
                cr = cot if len(row_chunks) == 1 else cot[..., r[0] - base : r[1] - base]
                for i, c in enumerate(col_ranges):
                    wt = tile(wq, scales, qb, r, c)
                    dxs[i] = cr @ wt if dxs[i] is None else mx.addmm(dxs[i], cr, wt)
        grads = [d.astype(x.dtype) for d, x in zip(dxs, xs)] + [c for c, h in zip(cots, has_acc) if h]
        grads += [mx.zeros_like(primals[n_x + n_acc]), mx.zeros_like(primals[n_x + n_acc + 1])]
        grads += [mx.zeros_like(primals[n_x + n_acc + 2])] if has_qb else []
        if has_bias:  # (the base is frozen; for completeness)
            gb = mx.zeros_like(bias)
            for row_chunks, cot in zip(chunks, cots):
                r0, r1 = row_chunks[0][0], row_chunks[-1][1]
                gb = gb + mx.pad(cot.reshape(-1, cot.shape[-1]).sum(axis=0).astype(bias.dtype), [(r0, bias.shape[0] - r1)])
            grads.append(gb)
        return tuple(grads)

    return fn


def linear(layer, x: mx.array) -> mx.array:
    """layer(x) for a Linear, QuantizedLinear or LoRALinear (stacked ones too)."""
    return _project(layer, [x], [(0, _out_dims(layer))], [None])[0]


def linear_split(layer, x: mx.array, sizes: list[int]) -> list[mx.array]:
    """layer(x) split along the output into parts of `sizes`, each from its own GEMM."""
    rows, r0 = [], 0
    for n in sizes:
        rows.append((r0, r0 + n))
        r0 += n
    return _project(layer, [x], rows, [None] * len(rows))


def linear_concat(layer, xs: list[mx.array]) -> mx.array:
    """layer(concatenate(xs, axis=-1)), the concatenation only a temporary of the base GEMM: a
    LoRA reads its columns from the parts, so the backward pass keeps no concatenated copy."""
    return _project(layer, list(xs), [(0, _out_dims(layer))], [None])[0]


def _out_dims(layer) -> int:
    return layer.output_dims if _is_lora(layer) else layer.weight.shape[0]


class RMSNormScale(nn.Module):
    """RMSNorm whose weight is called `scale` (BFL's name)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.scale, self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.query_norm = RMSNormScale(dim, eps)
        self.key_norm = RMSNormScale(dim, eps)


class SwiGLU(nn.Module):
    """silu(first half) · second half. Parameter-free; sits at index 1 of the MLP list so the
    linears keep BFL's `mlp.0` / `mlp.2` names."""

    def __call__(self, x):
        return swiglu(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def __call__(self, x):
        return self.out_layer(nn.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """One of the three shared modulation heads: SiLU, Linear D -> n·D, split into n [B, 1, D]."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=False)

    def __call__(self, vec):
        return mx.split(self.lin(nn.silu(vec))[:, None, :], self.n, axis=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x):
        """[B, N, D] -> normalised q, k and v, each [B, N, H, d] (views of one fused GEMM)."""
        b, n, d = x.shape
        q, k, v = (a.reshape(b, n, self.heads, -1) for a in split_views(linear(self.qkv, x), (d, d, d)))
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, m, h = cfg.hidden_size, cfg.mlp_hidden, cfg.num_attention_heads
        self.eps = cfg.eps
        self.img_attn = SelfAttention(d, h, cfg.eps)
        self.txt_attn = SelfAttention(d, h, cfg.eps)
        self.img_mlp = [nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False)]
        self.txt_mlp = [nn.Linear(d, 2 * m, bias=False), SwiGLU(), nn.Linear(m, d, bias=False)]

    def __call__(self, img, txt, mod_img, mod_txt, rope):
        sh1_i, sc1_i, g1_i, sh2_i, sc2_i, g2_i = mod_img
        sh1_t, sc1_t, g1_t, sh2_t, sc2_t, g2_t = mod_txt
        qi, ki, vi = self.img_attn.qkv_heads(modulate(img, sh1_i, sc1_i, self.eps))
        qt, kt, vt = self.txt_attn.qkv_heads(modulate(txt, sh1_t, sc1_t, self.eps))
        # Joint attention over [text; image], RoPE applied once to the joint q/k.
        cat = lambda a, b: mx.concatenate([a, b], axis=1)  # noqa: E731
        attn = attention(cat(qt, qi), cat(kt, ki), cat(vt, vi), rope)
        attn_txt, attn_img = split_views(attn, (txt.shape[1], img.shape[1]), axis=1)

        img = img + g1_i * linear(self.img_attn.proj, attn_img)
        img = img + g2_i * _mlp(self.img_mlp, modulate(img, sh2_i, sc2_i, self.eps))
        txt = txt + g1_t * linear(self.txt_attn.proj, attn_txt)
        txt = txt + g2_t * _mlp(self.txt_mlp, modulate(txt, sh2_t, sc2_t, self.eps))
        return img, txt


def _mlp(layers, x):
    return linear(layers[2], layers[1](linear(layers[0], x)))


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: linear1 -> [q|k|v|gate|up], linear2 <- [attn|silu(gate)·up]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, m = cfg.hidden_size, cfg.mlp_hidden
        self.heads, self.dim, self.mlp_dim, self.eps = cfg.num_attention_heads, d, m, cfg.eps
        self.linear1 = nn.Linear(d, 3 * d + 2 * m, bias=False)
        self.linear2 = nn.Linear(d + m, d, bias=False)
        self.norm = QKNorm(cfg.attention_head_dim, cfg.eps)
        self.mlp_act = SwiGLU()

    def __call__(self, x, mod, rope):
        shift, scale, gate = mod
        b, n, _ = x.shape
        # linear1's q/k/v rows and MLP rows as two GEMMs (no slicing copies of the wide output);
        # linear2's concatenated input only a temporary (its LoRA reads the attention part).
        qkv, mlp = linear_split(self.linear1, modulate(x, shift, scale, self.eps), [3 * self.dim, 2 * self.mlp_dim])
        q, k, v = (a.reshape(b, n, self.heads, -1) for a in split_views(qkv, (self.dim,) * 3))
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope)
        return x + gate * linear_concat(self.linear2, [attn, self.mlp_act(mlp)])


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False)]
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def __call__(self, x, vec):
        shift, scale = mx.split(self.adaLN_modulation[1](self.adaLN_modulation[0](vec))[:, None, :], 2, axis=-1)  # BFL order
        return linear(self.linear, modulate(x, shift, scale, self.eps))


# ----------------------------------------------------------------------------------------------
# The model


class Flux2Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d, bias=False)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, d, bias=False)
        self.time_in = MLPEmbedder(cfg.timestep_guidance_channels, d)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(cfg.timestep_guidance_channels, d)
        self.double_stream_modulation_img = Modulation(d, 6)
        self.double_stream_modulation_txt = Modulation(d, 6)
        self.single_stream_modulation = Modulation(d, 3)
        self.double_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.final_layer = LastLayer(d, cfg.in_channels, cfg.eps)
        self.checkpoint_every = 0  # gradient checkpointing: every n-th block recomputed in backward (0 = off)

    def set_gradient_checkpointing(self, every: int | bool = 1) -> None:
        """Recompute every n-th block's activations during the backward pass (True = every block).
        Uses `mlx.nn.utils.checkpoint`, which keeps the gradients of trainable parameters; the
        training step can instead run its block-by-block backward (`mflux2.training.step`)."""
        self.checkpoint_every = int(every)

    @property
    def dtype(self) -> mx.Dtype:
        first = self.img_in  # a quantized layer keeps its scales in the weights' dtype
        return first.scales.dtype if isinstance(first, nn.QuantizedLinear) else first.weight.dtype

    @property
    def num_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    # The forward pass in three parts — embed, one block at a time, head — so the training step
    # can run the blocks itself (checkpointed block-by-block backward). __call__ chains them.

    def embed(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        """Inputs -> (state, ctx): state = (img, txt) streams [B, N|L, D]; ctx = the arrays every
        block reads: (vec, 6 double-img, 6 double-txt and 3 single modulations, 2 RoPE tables)."""
        cfg = self.config
        dtype = hidden_states.dtype
        b = hidden_states.shape[0]
        timestep = mx.broadcast_to(mx.array(timestep).reshape(-1), (b,))
        # Like the reference pipelines, the timestep is quantised to the activation dtype first.
        vec = self.time_in(timestep_embedding(timestep.astype(dtype), cfg.timestep_guidance_channels).astype(dtype))
        if cfg.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX.2 model is guidance-distilled (dev): pass guidance=[B] (e.g. 4.0)")
            guidance = mx.broadcast_to(mx.array(guidance).reshape(-1), (b,))
            vec = vec + self.guidance_in(timestep_embedding(guidance.astype(dtype)).astype(dtype))

        mods = (*self.double_stream_modulation_img(vec), *self.double_stream_modulation_txt(vec),
                *self.single_stream_modulation(vec))
        img = self.img_in(hidden_states)
        txt = self.txt_in(encoder_hidden_states.astype(dtype))
        ids = mx.concatenate([_batched(txt_ids, b), _batched(img_ids, b)], axis=1)  # text first
        rope = rope_table(ids, cfg.axes_dims_rope, cfg.rope_theta)
        return (img, txt), (vec, *mods, *rope)

    def block(self, i: int, state: tuple, ctx: tuple, checkpoint: bool = False) -> tuple:
        """Block i of all (double blocks, then single blocks): state (img, txt) -> (img, txt) for a
        double block; the first single block joins the streams ([txt; img]) into (x,)."""
        mod_img, mod_txt, mod_single, rope = ctx[1:7], ctx[7:13], ctx[13:16], ctx[16:18]
        nd = len(self.double_blocks)
        if i < nd:
            blk = self.double_blocks[i]
            fn = nn.utils.checkpoint(blk) if checkpoint else blk
            return fn(*state, mod_img, mod_txt, rope)
        if len(state) == 2:
            state = (mx.concatenate([state[1], state[0]], axis=1),)
        blk = self.single_blocks[i - nd]
        fn = nn.utils.checkpoint(blk) if checkpoint else blk
        return (fn(state[0], mod_single, rope),)

    def head(self, state: tuple, ctx: tuple, n_img: int) -> mx.array:
        """The final layer on the image tokens of the last block's state."""
        img = state[0] if len(state) == 2 else state[0][:, -n_img:]
        return self.final_layer(img, ctx[0])

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        timestep: mx.array,
        img_ids: mx.array,
        txt_ids: mx.array,
        guidance: mx.array | None = None,
    ) -> mx.array:
        """Velocity prediction [B, N, 128] (diffusers' `Flux2Transformer2DModel` conventions).

        hidden_states [B, N, 128] packed latents; encoder_hidden_states [B, L, ctx]; timestep [B]
        sigma in [0, 1]; img_ids [B, N, 4] / txt_ids [B, L, 4] (or without the batch dim);
        guidance [B] for dev (guidance-distilled), ignored by klein.
        """
        state, ctx = self.embed(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance)
        n, nd = self.checkpoint_every, len(self.double_blocks)
        for i in range(self.num_blocks):
            j = i if i < nd else i - nd  # every n-th block of each kind, as nn.utils.checkpoint per list
            state = self.block(i, state, ctx, checkpoint=bool(n) and j % n == 0)
            if BLOCK_OUTPUTS is not None:
                BLOCK_OUTPUTS.append(state[0])
        return self.head(state, ctx, hidden_states.shape[1])


# A list while a training step is traced (mflux2.training.step): every block's output, in order,
# so the step can be evaluated block by block.
BLOCK_OUTPUTS: list | None = None


def _batched(ids: mx.array, b: int) -> mx.array:
    ids = mx.array(ids)
    return mx.broadcast_to(ids[None], (b, *ids.shape)) if ids.ndim == 2 else ids


def count_parameters(model: nn.Module) -> int:
    """Counts from shapes only; a lazily built model is never materialised."""
    return sum(v.size for _, v in tree_flatten(model.parameters()))


# ----------------------------------------------------------------------------------------------
# Weights: diffusers -> BFL (= our) names. Plain renames are regex rules; two transforms remain:
# q/k/v concatenated into one qkv weight, and the final adaLN halves swapped (diffusers [scale; shift]).

_DIFFUSERS_RULES = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_guidance_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"^time_guidance_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.", r"\1.lin."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_in\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.linear_out\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_in\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.linear_out\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.", r"single_blocks.\1.linear1."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.to_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^proj_out\.", "final_layer.linear."),
]
# diffusers split projections that are fused in BFL: (pattern, fused name, part index)
_DIFFUSERS_QKV = re.compile(r"^transformer_blocks\.(\d+)\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.weight$")
_QKV_PART = {"to_q": ("img", 0), "to_k": ("img", 1), "to_v": ("img", 2), "add_q_proj": ("txt", 0), "add_k_proj": ("txt", 1), "add_v_proj": ("txt", 2)}
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in keys)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map a BFL (optionally prefixed) or diffusers state dict to our (BFL) parameter names."""
    if not is_diffusers_layout(weights):
        out = {}
        for k, v in weights.items():
            for p in _BFL_PREFIXES:
                if k.startswith(p):
                    k = k[len(p) :]
                    break
            out[k] = v
        return out
    out, qkv_parts = {}, {}
    for k, v in weights.items():
        m = _DIFFUSERS_QKV.match(k)
        if m:
            stream, i = _QKV_PART[m.group(2)]
            qkv_parts.setdefault(f"double_blocks.{m.group(1)}.{stream}_attn.qkv.weight", [None] * 3)[i] = v
            continue
        for pattern, repl in _DIFFUSERS_RULES:
            new, n = re.subn(pattern, repl, k)
            if n:
                k = new
                break
        if k == "final_layer.adaLN_modulation.1.weight":
            scale, shift = mx.split(v, 2, axis=0)
            v = mx.concatenate([shift, scale], axis=0)
        out[k] = v
    for k, parts in qkv_parts.items():
        if any(p is None for p in parts):
            raise WeightsError(f"diffusers checkpoint has only part of the q/k/v projections for {k}")
        out[k] = mx.concatenate(parts, axis=0)
    return out


def config_from_weights(shapes: dict[str, tuple]) -> TransformerConfig:
    """Infer the architecture of a BFL-named state dict from its tensor shapes."""
    try:
        d, in_ch = shapes["img_in.weight"]
        ctx = shapes["txt_in.weight"][1]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        temb = shapes["time_in.in_layer.weight"][1]
        mlp2 = shapes["double_blocks.0.img_mlp.0.weight"][0]
    except KeyError as e:
        raise WeightsError(f"not a FLUX.2 transformer checkpoint: key {e.args[0]} missing") from None
    depth = lambda prefix: len({int(k.split(".")[1]) for k in shapes if k.startswith(prefix)})  # noqa: E731
    return TransformerConfig(
        num_layers=depth("double_blocks."),
        num_single_layers=depth("single_blocks."),
        num_attention_heads=d // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=ctx,
        in_channels=in_ch,
        mlp_ratio=mlp2 / 2 / d,
        axes_dims_rope=(head_dim // 4,) * 4,
        timestep_guidance_channels=temb,
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )


def variant_of(config: TransformerConfig) -> str | None:
    """The preset name whose shapes match `config` (klein-base-* share klein's shapes)."""
    for name in ("klein-4b", "klein-9b", "dev"):
        if PRESETS[name] == config:
            return name
    return None


QUANT_BITS = {"int8": 8, "int4": 4}
# Weights per scale/bias pair. int8 in groups of 128: 1.03 instead of 1.06 bytes a weight (0.28 GB
# less for klein-9b, 1.0 GB for dev) for a relative RMS error of 0.59% instead of 0.54% (random
# normal weights; int4's is 9.1% at 64); int4 keeps MLX's default of 64.
QUANT_GROUP_SIZE = {"int8": 128, "int4": 64}


def layer_group_size(in_dims: int, group_size: int) -> int | None:
    """The group size a Linear of `in_dims` inputs is quantized with: `group_size`, else MLX's
    default 64 where only that divides the width (small test models), else None (not quantized).
    Every FLUX.2 projection's width is a multiple of 128."""
    return next((g for g in (group_size, 64) if in_dims % g == 0), None)


def quantize_predicate(group_size: int, bits: int, mode: str = "affine"):
    """nn.quantize's class_predicate: Linear layers, each with its `layer_group_size`."""

    def predicate(path, m):
        g = isinstance(m, nn.Linear) and layer_group_size(m.weight.shape[1], group_size)
        return {"group_size": g, "bits": bits, "mode": mode} if g else False

    return predicate


# Outside the blocks, only the large layers are quantized: txt_in, the three shared modulations and
# the final layer's adaLN (0.37 GB of klein-4b's bf16 weights, 1.5 GB of dev's). img_in, the
# timestep embedder's first layer and the final projection stay in the activation dtype (tiny, and
# they are ~0.1% of the weights).
OUTSIDE_BLOCKS_MIN_WEIGHTS = 1 << 22


def quantize_outside_blocks(model, bits: int, group_size: int, min_weights: int | None = None) -> None:
    inner = quantize_predicate(group_size, bits)
    least = OUTSIDE_BLOCKS_MIN_WEIGHTS if min_weights is None else min_weights

    def predicate(path, m):
        big = not path.startswith(("double_blocks", "single_blocks")) and isinstance(m, nn.Linear) and m.weight.size >= least
        return big and inner(path, m)

    nn.quantize(model, class_predicate=predicate)


def load_transformer(
    path: str | Path,
    variant: str | None = None,
    dtype: mx.Dtype = mx.bfloat16,
    quantize: str | None = None,
    group_size: int | None = None,
) -> Flux2Transformer:
    """Load a FLUX.2 transformer from a BFL single file, a diffusers `transformer/` folder, or a
    model folder holding `transformer/`. Tensors are converted one at a time (mx.load is lazy) and,
    with `quantize` ('int8'/'int4'), each block is quantised as soon as it is loaded, so peak memory
    stays near the final model's size. `group_size`: QUANT_GROUP_SIZE's for `quantize` unless given."""
    src = resolve_component(path, "transformer")
    if src.is_dir() and not (src / "config.json").exists():
        singles = [f for f in src.glob("*.safetensors") if not f.name.startswith(("ae", "diffusion_pytorch_model", "model-"))]
        if len(singles) == 1:  # a BFL folder: one transformer file (+ ae.safetensors)
            src = singles[0]
    files = safetensors_files(src)
    raw = {k: (v, f) for k, v, f in iter_tensors(files)}
    weights = sanitize({k: v for k, (v, _) in raw.items()})
    shapes = {k: tuple(v.shape) for k, v in weights.items()}

    cfg_json = read_config(src) if src.is_dir() else None
    config = TransformerConfig.from_dict(cfg_json) if cfg_json else config_from_weights(shapes)
    if variant is not None:
        want = preset(variant)
        if want != config:
            found = variant_of(config) or "a custom architecture"
            raise WeightsError(f"{src}: you asked for variant {variant!r} but the weights are {found}")

    model = Flux2Transformer(config)  # lazily initialised: nothing is allocated until replaced
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_keys(expected, shapes, src)

    bits = None
    if quantize:
        if quantize not in QUANT_BITS:
            raise ValueError(f"quantize={quantize!r}: choose int8 or int4 (or None for {dtype})")
        bits = QUANT_BITS[quantize]
        group_size = group_size or QUANT_GROUP_SIZE[quantize]

    def load(prefix: str, module: nn.Module) -> None:
        p = prefix + "."
        module.update(tree_unflatten([(k[len(p) :], weights[k].astype(dtype)) for k in weights if k.startswith(p)]))
        mx.eval(module.parameters())

    # Module by module: the top-level layers (their large ones then quantised), then each block
    # (quantised as soon as it is loaded), so peak memory stays near the final model's size.
    top = {name: m for name, m in model.children().items() if isinstance(m, nn.Module)}
    for name, module in top.items():
        load(name, module)
    if bits:
        quantize_outside_blocks(model, bits, group_size)
        mx.eval({name: model[name].parameters() for name in top})
    for kind in ("double_blocks", "single_blocks"):
        for i, block in enumerate(model[kind]):
            load(f"{kind}.{i}", block)
            if bits:
                nn.quantize(block, class_predicate=quantize_predicate(group_size, bits))
                mx.eval(block.parameters())
    model.eval()
    model.quantization = quantize  # recorded for LoRA files and the converter
    return model
