"""Linear layers as GEMMs: `linear`, `linear_split` and `linear_concat` for a Linear,
QuantizedLinear or LoRALinear (stacked ones too), which the blocks call instead of `layer(x)`.

- fallback (`linear_reference`): the layer's own matmul (quantized_matmul for a quantized base),
  each LoRA's delta added on its output rows, the parts sliced afterwards;
- adapters: any layer with `lora_forward(x)` (LoRA, LoKr, LoHa) adds that delta; a layer with
  `row_scale()` too (DoRA) rescales the sum per row: u = y + lora_forward(x), output
  g ⊙ (u − bias) + bias, in both paths, by a custom function whose VJP reads the output rather
  than u (`_rescale`: no un-rescaled copy kept; the output is, where its consumer keeps none — the
  output projections — and the magnitude's gradient is computed where the backward pass passes the layer);
- fast path (switch "linear"): a fused projection's output parts come from separate GEMMs on row
  slices of its weight (no slicing copies of a wide output; row slices of a weight are contiguous),
  a LoRA delta enters as the accumulator of the base GEMM (`mx.addmm`) and reads only the input
  columns it covers (so a concatenated input is not kept for the backward pass), and a quantized
  base is dequantised to bf16 right before its GEMM at training/generation token counts
  (`quantized_matmul` is slower there), tile by tile, in the forward each tile after the GEMM
  before it (one alive at a time: `ORDERED_TILES`); the dequantised weight is never kept for the backward pass,
  which dequantises again (a custom function, `_make_dequantized_gemm`);
- on CUDA (switch "dequantize_cuda", inside the fast path): int8 tiles are dequantised by one
  custom kernel (`dequantize_tile`; mx.dequantize otherwise).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from mflux2.ops.split import split_views
from mflux2.ops.switches import is_fast, on_cuda

DEQUANTIZE_MIN_ROWS = 256  # below this many tokens, quantized_matmul (small batch generation)


def _is_lora(layer) -> bool:
    return hasattr(layer, "lora_forward")  # an adapter layer (duck-typed: mflux2.lora imports this module)


def _is_rescaling(layer) -> bool:
    """DoRA: the base output is rescaled per row (not an additive accumulator)."""
    return hasattr(layer, "row_scale")


def _rescale_rows(layer, u, g, r0, r1, bias):
    """DoRA's output over the output rows r0:r1: g ⊙ (u − bias) + bias on the layer's rows, u
    elsewhere, where u is the base output plus the (un-rescaled) LoRA path there, bias included.
    g is padded with ones (and the rows outside the layer then come out as u exactly)."""
    s0, s1 = layer.out_start, layer.out_stop
    o0, o1 = _overlap(r0, r1, s0, s1)
    if o0 >= o1:
        return u
    gp = g if (o0, o1) == (s0, s1) else g[o0 - s0 : o1 - s0]
    if (o0, o1) != (r0, r1):
        gp = mx.pad(gp, [(o0 - r0, r1 - o1)], constant_values=1.0)
    if bias is None:
        return _rescale(u, gp)
    return _rescale_bias(u, gp, bias if (r0, r1) == (0, bias.shape[0]) else bias[r0:r1])


# DoRA's per-row rescale out = u + (g − 1) ⊙ (u − bias), as custom functions whose VJP reads the
# OUTPUT instead of u: d g = Σ_tokens dy ⊙ (out − bias) / g, d u = dy ⊙ g. The plain product's VJP
# would keep u, a [tokens, rows] array per DoRA layer, alive until the backward pass (a LoRA keeps
# none: its delta is an addend); the output is kept anyway wherever its consumer's VJP needs it
# (q/k norms, attention), so the rescale then costs nothing beyond LoRA's. Exact in exact
# arithmetic. g − 1 is formed in float32 and then cast, as g ≈ 1 would round in bf16 (the rows'
# small changes of m would vanish); the Σ runs in float32. g is never 0 in practice: g = m / ‖V‖
# with m starting at ‖W‖ (a zero row of W already gives 0 / 0 there, as in PEFT), and a float32 m
# moved by optimizer steps does not land on exactly 0; if it did, that row's d g would be
# non-finite (loud), not silently wrong.
#
# d g is computed BEFORE d u, and d u's input is tied to it (`mx.depends`): nothing downstream reads
# d g until the optimizer, so untied it was evaluated last — after every evaluated piece of the
# step's backward pass (mflux2.training.step) or checkpointed segment — and the cotangent and the
# output it reads, two [tokens, rows] arrays per DoRA layer, stayed alive until then. Tied, the
# backward pass computes it where it passes the layer and frees both there; first, so the product's
# temporary is gone before d u is formed. Same values, same kernels.
def _rescale_grads(cot, out, g, bias):
    lead = tuple(range(cot.ndim - 1))
    # the product in the compute dtype (one temporary of its size; each term rounded, not the
    # sum), the Σ over the tokens in float32; out − bias in float32 (it may cancel)
    w = out if bias is None else out.astype(mx.float32) - bias.astype(mx.float32)
    dg = (cot * w).astype(mx.float32).sum(axis=lead) / g
    cot = mx.depends(cot, dg)
    gm1 = (g - 1).astype(cot.dtype)
    du = cot + cot * gm1
    return du, dg


@mx.custom_function
def _rescale(u, g):
    return u + (g - 1).astype(u.dtype) * u


@_rescale.vjp
def _rescale_vjp(primals, cotangent, output):
    u, g = primals
    cot = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    out = output[0] if isinstance(output, (list, tuple)) else output
    du, dg = _rescale_grads(cot, out, g, None)
    return du.astype(u.dtype), dg.astype(g.dtype)


@mx.custom_function
def _rescale_bias(u, g, bias):
    return u + (g - 1).astype(u.dtype) * (u - bias)


@_rescale_bias.vjp
def _rescale_bias_vjp(primals, cotangent, output):
    u, g, bias = primals
    cot = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    out = output[0] if isinstance(output, (list, tuple)) else output
    du, dg = _rescale_grads(cot, out, g, bias)
    lead = tuple(range(cot.ndim - 1))
    db = -(cot.astype(mx.float32).sum(axis=lead) * (g - 1))  # (the base is frozen; for completeness)
    return du.astype(u.dtype), dg.astype(g.dtype), db.astype(bias.dtype)


def _lora_input(layer, xs: list):
    """The input columns in_start:in_stop of concat(xs), read from the parts."""
    bounds = [0]
    for x in xs:
        bounds.append(bounds[-1] + x.shape[-1])
    i0, i1 = layer.in_start, layer.in_stop
    parts = []
    for (c0, c1), x in zip(zip(bounds, bounds[1:]), xs):
        o0, o1 = _overlap(c0, c1, i0, i1)
        if o0 < o1:
            parts.append(x if (o0, o1) == (c0, c1) else x[..., o0 - c0 : o1 - c0])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _overlap(a0, a1, b0, b1):
    return max(a0, b0), min(a1, b1)


def _project(layer, xs: list, rows: list, accs: list) -> list:
    """[acc_j + (concat(xs) @ W^T)[..., rows_j]] for the output row ranges `rows`; acc_j may be None."""
    if _is_lora(layer):
        if not layer.enabled or layer.scale == 0.0:
            return _project(layer.base, xs, rows, accs)
        if _is_rescaling(layer):
            # DoRA: u = the base output plus the LoRA path (as a LoRA's, g not folded in), then
            # rescaled per row (`_rescale_rows`); outer accumulators are added after the rescale
            us = _project_lora(layer, xs, rows, [None] * len(rows))
            g, bias = layer.row_scale(), layer.plain_base.get("bias")
            outs = [_rescale_rows(layer, u, g, r0, r1, bias) for u, (r0, r1) in zip(us, rows)]
            return [o if a is None else a + o for o, a in zip(outs, accs)]
        return _project_lora(layer, xs, rows, accs)
    return _project_base(layer, xs, rows, accs)


def _project_lora(layer, xs, rows, accs):
    """The LoRA-like branch of `_project`: the delta as the accumulator of the base GEMM."""
    x_in = _lora_input(layer, xs)
    s0, s1 = layer.out_start, layer.out_stop
    if hasattr(layer, "lora_down") and getattr(layer, "factored", True):
        # LoRA (and LoHa's rank-r² form): the down-projection once for all output parts (q, k, v: one GEMM); the
        # up-projection per part, so each part's delta is contiguous (no strided slices).
        h = layer.lora_down(x_in)
        spans = [(o0 - s0, o1 - s0) for o0, o1 in (_overlap(r0, r1, s0, s1) for r0, r1 in rows) if o0 < o1]
        if len(spans) > 1 and hasattr(layer, "lora_up_parts"):
            # several parts: B's rows as split views, so B's gradient is one concatenation of
            # the parts' (not a zero-padded full-size cotangent per part, summed)
            deltas = dict(zip(spans, layer.lora_up_parts(h, spans)))
            up = lambda r: deltas[r]  # noqa: E731
        else:
            up = lambda r: layer.lora_up(h, r)  # noqa: E731
    else:  # LoKr, LoHa's dense form: one delta over the layer's rows, sliced per part
        z = layer.lora_forward(x_in)
        up = lambda r: z if r is None else z[..., r[0] : r[1]]  # noqa: E731
    new = []
    for (r0, r1), acc in zip(rows, accs):
        o0, o1 = _overlap(r0, r1, s0, s1)
        if o0 < o1:
            part = up(None if (o0, o1) == (s0, s1) else (o0 - s0, o1 - s0))
            if (o0, o1) != (r0, r1):
                part = mx.pad(part, [(0, 0)] * (part.ndim - 1) + [(o0 - r0, r1 - o1)])
            acc = part if acc is None else acc + part
        new.append(acc)
    return _project(layer.base, xs, rows, new)


def _project_base(layer, xs, rows, accs):
    """A plain base (Linear, QuantizedLinear): one GEMM per row range, accs as accumulators."""
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
ORDERED_TILES = True  # each tile dequantised after the GEMM before it (False: as the graph allows; tests/test_sampling.py)


def tile_bytes(out_dims: int, in_dims: int, itemsize: int = 2) -> int:
    """The largest dequantised tile of a quantized out_dims × in_dims weight (the row chunks of
    `_tiles`), in bytes."""
    return min(out_dims, max(1, DEQUANTIZE_TILE // in_dims)) * in_dims * itemsize


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
    return (on_cuda("dequantize_cuda") and mode == "affine" and qb is not None and bits == 8 and scales.dtype in (mx.bfloat16, mx.float16, mx.float32))


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
        after = list(xs)  # what the next tile's dequantisation waits for (below)
        for row_chunks, acc in zip(chunks, accs):
            parts = []
            for j, r in enumerate(row_chunks):
                y = None if acc is None else (acc if len(row_chunks) == 1 else acc[..., r[0] - row_chunks[0][0] : r[1] - row_chunks[0][0]])
                for x, c in zip(xs, col_ranges):
                    # A tile depends only on the weights, so MLX may dequantise it long before its
                    # GEMM: a forward's graph then held most of its blocks' bf16 weights at once
                    # (issue 34). Each tile waits for the GEMM before it (the first for the input).
                    w = mx.depends([wq, scales] + ([qb] if has_qb else []), after) if ORDERED_TILES else [wq, scales, qb]
                    wt = tile(w[0], w[1], w[2] if has_qb else None, r, c).T
                    y = x @ wt if y is None else mx.addmm(y, x, wt)
                    after = [y]
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


def linear(layer, x: mx.array, fast: bool | None = None) -> mx.array:
    """layer(x) for a Linear, QuantizedLinear or LoRALinear (stacked ones too)."""
    if not is_fast("linear", fast):
        return linear_reference(layer, x)
    return _project(layer, [x], [(0, _out_dims(layer))], [None])[0]


def linear_split(layer, x: mx.array, sizes: list[int], fast: bool | None = None) -> list[mx.array]:
    """layer(x) split along the output into parts of `sizes`, each from its own GEMM."""
    rows, r0 = [], 0
    for n in sizes:
        rows.append((r0, r0 + n))
        r0 += n
    if not is_fast("linear", fast):
        y = linear_reference(layer, x)
        return [y[..., a:b] for a, b in rows]
    return _project(layer, [x], rows, [None] * len(rows))


def qkv_split(layer, x: mx.array, d: int, rest: tuple[int, ...] = (), fast: bool | None = None,
              heads: int | None = None) -> list[mx.array]:
    """[q, k, v, *rest] of a fused projection whose first 3·d output rows are q | k | v; with
    `heads`, q, k and v come as [..., heads, d / heads].

    Fast path (switch "qkv_parts"): one GEMM per part on row slices of the weight, so q, k and v
    are contiguous (the norms and attention copy nothing) and a LoRA's down-projection is computed
    once for all parts (`_project`); fallback: q | k | v from one GEMM, split into strided views —
    with `heads`, views of its [..., 3·heads, d / heads] form, so the split's VJP concatenates the
    cotangents in that form: v's, transposed by the attention's VJP, is copied once, by that
    concatenation, instead of first by a reshape to [..., d] (an implicit copy per block and stream)."""
    if is_fast("qkv_parts", fast):
        parts = _qkv_parts(layer, x, [d, d, d, *rest])
        return [p.reshape(*p.shape[:-1], heads, -1) for p in parts[:3]] + parts[3:] if heads else parts
    qkv, *others = linear_split(layer, x, [3 * d, *rest]) if rest else [linear(layer, x)]
    if heads:
        return [*split_views(qkv.reshape(*qkv.shape[:-1], 3 * heads, d // heads), (heads,) * 3, axis=-2), *others]
    return [*split_views(qkv, (d, d, d)), *others]


def _qkv_parts(layer, x, sizes):
    return linear_split(layer, x, sizes)


def linear_concat(layer, xs: list[mx.array], fast: bool | None = None) -> mx.array:
    """layer(concatenate(xs, axis=-1)), the concatenation only a temporary of the base GEMM: a
    LoRA reads its columns from the parts, so the backward pass keeps no concatenated copy."""
    if not is_fast("linear", fast):
        return linear_reference(layer, mx.concatenate(list(xs), axis=-1))
    return _project(layer, list(xs), [(0, _out_dims(layer))], [None])[0]


def linear_reference(layer, x: mx.array) -> mx.array:
    """The fallback: the base layer's own matmul plus each LoRA's delta on its output rows."""
    if not _is_lora(layer):
        return layer(x)
    y = linear_reference(layer.base, x)
    if not layer.enabled or layer.scale == 0.0:
        return y
    z = layer.lora_forward(x[..., layer.in_start : layer.in_stop])
    pad = [(0, 0)] * (z.ndim - 1) + [(layer.out_start, y.shape[-1] - layer.out_stop)]
    u = y + mx.pad(z, pad)
    if _is_rescaling(layer):  # DoRA: base + LoRA path, rescaled per row (the fast path's `_rescale_rows`)
        return _rescale_rows(layer, u, layer.row_scale(), 0, y.shape[-1], layer.plain_base.get("bias"))
    return u


def _out_dims(layer) -> int:
    return layer.output_dims if _is_lora(layer) else layer.weight.shape[0]
