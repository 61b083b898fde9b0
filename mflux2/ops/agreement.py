"""Each fast path against its plain-MLX fallback: values and gradients on random float32 inputs.

One definition, run on the CPU by tests/test_ops.py and on any device by scripts/ops_check.py
(the CUDA kernels where mx.cuda is available). `check(op)` -> {"max_rel_err", "ok", "values_rel_err",
"gradients_rel_err"} (or "skipped"): the largest max|fast − fallback| / max|fallback| over the outputs
and the input gradients, and each of the two alone.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mflux2.ops import conv as C
from mflux2.ops import gemm as L
from mflux2.ops.rope import apply_rope, rope_table
from mflux2.ops.split import Transposed, flat_views, split_views
from mflux2.ops.glu import swiglu
from mflux2.ops.attention import attention_tokens
from mflux2.ops.switches import cuda_available, using

TOLERANCE = 1e-4
# A quantized base: the fallback is MLX's own quantized matmul, which on CUDA (MLX 0.32.4, H100,
# 2026-12-05) differs from dequantize + float32 GEMM by 1.8e-4 (the same figure with and without our
# dequantisation kernel, so it is MLX's kernel, not ours: the float32 GEMMs agree to 1.4e-7).
TOLERANCE_QUANTIZED = 5e-4


def _rel_err(got, ref) -> float:
    worst = 0.0
    for a, b in zip(got, ref):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        scale = mx.abs(b).max().item()
        diff = mx.abs(a - b).max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


_SPLIT = {"values": 0.0, "gradients": 0.0}  # the worst of each since check() started (reported beside the max)


def _agree(fn, primals, fast: dict, slow: dict) -> float:
    """max rel err between fn's outputs and input gradients (VJP of random cotangents) under the
    two settings of the switches."""
    outs = fn(*primals)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    cots = [mx.random.normal(o.shape).astype(o.dtype) for o in outs]
    results = []
    for switches in (fast, slow):
        with using(**switches):
            y, g = mx.vjp(lambda *a: fn(*a), primals, cots)
            mx.eval(y, g)
            results.append((list(y), list(g)))
    (y0, g0), (y1, g1) = results
    values, grads = _rel_err(y0, y1), _rel_err(g0, g1)
    _SPLIT["values"], _SPLIT["gradients"] = max(_SPLIT["values"], values), max(_SPLIT["gradients"], grads)
    return max(values, grads)


def _rope(kernel: bool) -> float:
    errs = []
    for batch_tables in (2, 1):  # the tables per sample, or one shared by the batch
        ids = mx.random.randint(0, 50, (batch_tables, 40, 4)).astype(mx.float32)
        rope = rope_table(ids, (8, 8, 8, 8), 2000.0)
        x = mx.random.normal((2, 40, 3, 32))
        errs.append(_agree(lambda x: apply_rope(x, rope), [x], {"rope": True, "rope_cuda": kernel}, {"rope": False}))
    return max(errs)


def _norm_rope() -> float:
    """q/k's RMS norm + RoPE kernels against rms_norm then RoPE: values and the input gradient (the
    frozen scale gets none), tables per sample, shared, and sliced along the tokens (a stream's part)."""
    from mflux2.ops.rope import norm_rope

    errs = []
    for batch_tables, start in ((2, 0), (1, 0), (1, 3), (2, 3)):
        ids = mx.random.randint(0, 50, (batch_tables, 40, 4)).astype(mx.float32)
        rope = tuple(t[:, start:] for t in rope_table(ids, (32, 32, 32, 32), 2000.0))
        x = mx.random.normal((2, 40 - start, 3, 128)) * 2
        w = mx.random.normal((128,))
        errs.append(_agree(lambda x: norm_rope(x, w, 1e-6, rope), [x], {"norm_rope": True, "rope": True, "rope_cuda": True},
                           {"norm_rope": False}))
    return max(errs)


def _rms_frozen() -> float:
    """The frozen-scale RMS norm's values and input gradient against mx.fast.rms_norm's (the scale a
    constant of the function, as in training), then RoPE after it, as in the blocks."""
    from mflux2.ops.norm import rms_norm_frozen

    errs = []
    for d in (16, 32):
        x, w = mx.random.normal((2, 7, 3, d)) * 3, mx.random.normal((d,))
        rope = rope_table(mx.random.randint(0, 9, (1, 7, 4)).astype(mx.float32), (d // 4,) * 4, 2000.0)
        fn = lambda x, w=w, rope=rope: apply_rope(rms_norm_frozen(x, w, 1e-6), rope)  # noqa: E731
        errs.append(_agree(fn, [x], {"rms_frozen": True}, {"rms_frozen": False}))
    return max(errs)


def _modulate(fast: dict, slow: dict) -> float:
    """The blocks' modulation, layer_norm(x)·(1 + scale) + shift, values and the gradients of x,
    shift and scale (LoRA may target the modulation layers): shift/scale one row shared by the batch
    (B = 1, and B = 2 with [1, 1, D]) and per sample (B = 2, [2, 1, D]), at klein-4b's width and a
    small one, x with a mean far from zero."""
    from mflux2.ops.norm import modulate

    errs = []
    for d in (3072, 48):
        for b, bm in ((1, 1), (2, 1), (2, 2)):
            x = mx.random.normal((b, 6, d)) * 2 + 3
            shift, scale = mx.random.normal((bm, 1, d)), mx.random.normal((bm, 1, d)) * 0.5
            errs.append(_agree(lambda x, sh, sc: modulate(x, sh, sc, 1e-6), [x, shift, scale], fast, slow))
    return max(errs)


def _swiglu() -> float:
    h = mx.concatenate([mx.random.normal((3, 5, 16)) * 3, mx.random.normal((3, 5, 16))], axis=-1)
    return _agree(swiglu, [h], {"swiglu": True}, {"swiglu": False})


def _split_views() -> float:
    y, z = mx.random.normal((2, 3, 9)), mx.random.normal((2, 5, 9))
    return _agree(lambda y, z: split_views(y, (2, 3, 4)) + split_views(z, (1, 4), axis=1), [y, z],
                  {"split_views": True}, {"split_views": False})


def _flat_views() -> float:
    groups = {"float32": [(0, 0, 6, (2, 3)), (2, 6, 4, (4,))], "float32_lora": [(1, 0, 12, (3, 4)), (3, 12, 10, Transposed((5, 2)))]}
    fn = flat_views(groups, {"float32_lora": mx.bfloat16})  # (a Transposed shape: stored transposed, as LoRA's factors)
    flats = [mx.random.normal((10,)), mx.random.normal((22,))]
    return _agree(fn, flats, {"flat_views": True}, {"flat_views": False})


def _lora_stack(base, types: tuple = ("lora", "lora")):
    """Two or three stacked, restricted adapters (returned outermost first) with random non-zero factors."""
    from mflux2.lora import ADAPTERS  # (mflux2.lora imports mflux2.ops)

    ranges = [dict(out_range=(8, 30), in_range=(10, 40)), dict(in_range=(0, 20)), dict(out_range=(4, 36))]
    layers, layer = [], base
    for kind, kw, rank in zip(types, ranges, (3, 2, 2)):  # the first overlaps both parts of each split
        layer = ADAPTERS[kind](layer, rank, **kw)
        for k in layer.param_names():
            layer[k] = mx.random.normal(layer[k].shape) * (0.3 if k != "magnitude" else 1.0) + (layer[k] if k == "magnitude" else 0)
        layers.append(layer)
    return layers[::-1]


_STACKS = (("lora", "lora"), ("dora", "lokr", "loha"))  # DoRA rescales its base: innermost


def _linear(quantized: bool, kernel: bool = False) -> float:
    """linear, linear_split and linear_concat through stacked, restricted adapters (two LoRAs; a DoRA
    under a LoKr under a LoHa); the base a Linear, or an int8/int4 QuantizedLinear at enough tokens
    to be dequantised by tiles."""
    errs = []
    for bits in ((8, 4) if quantized and not kernel else (8,) if quantized else (None,)):
        for types in _STACKS:
            base = nn.QuantizedLinear(64, 40, bias=bits == 8, group_size=32, bits=bits) if bits else nn.Linear(48, 40, bias=True)
            n_in = 64 if bits else 48
            if "bias" in base:
                base.bias = mx.random.normal(base.bias.shape)  # (QuantizedLinear's starts at zero)
            layers = _lora_stack(base, types)
            names = [(m, k) for m in layers for k in m.param_names()]
            x = mx.random.normal((1, max(L.DEQUANTIZE_MIN_ROWS, 8) + 44 if bits else 5, n_in))

            def fn(x, *params, layers=layers, names=names):
                for (m, k), p in zip(names, params):
                    m[k] = p
                outer = layers[0]
                return [L.linear(outer, x), *L.linear_split(outer, x, [5, 20, 15]),
                        L.linear_concat(outer, [x[..., :16], x[..., 16:]])]

            primals = [x] + [m[k] for m, k in names]
            errs.append(_agree(fn, primals, {"linear": True, "dequantize_cuda": kernel}, {"linear": False}))
    return max(errs)


def _qkv_parts() -> float:
    """q, k, v (and a fourth part) of a fused projection under a LoRA restricted to the q/k/v rows
    (the single blocks' linear1) and under a full one (the double blocks' qkv), bf16-free float32."""
    from mflux2.lora import LoRALinear

    errs = []
    for out_range, rest in (((0, 24), (10,)), (None, ())):
        layer = LoRALinear(nn.Linear(16, 24 + sum(rest), bias=False), 3, out_range=out_range)
        layer.lora_B = mx.random.normal(layer.lora_B.shape)
        x = mx.random.normal((2, 5, 16))

        def fn(x, a, b, w, layer=layer, rest=rest):
            layer.lora_A, layer.lora_B, layer.base.weight = a, b, w
            return L.qkv_split(layer, x, 8, rest)

        errs.append(_agree(fn, [x, layer.lora_A, layer.lora_B, layer.base.weight], {"qkv_parts": True}, {"qkv_parts": False}))
    return max(errs)


def _dequantize_tile() -> float:
    """The kernel's tiles against mx.dequantize's (bf16, exact but for the float32 rounding)."""
    w = mx.random.normal((384, 512)).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=128, bits=8)
    ref = mx.dequantize(wq, scales, biases, group_size=128, bits=8)
    errs = []
    for rows, cols in [((0, 384), (0, 512)), ((128, 320), (128, 384)), ((5, 6), (384, 512))]:
        with using(dequantize_cuda=True):
            tile = L.dequantize_tile(wq, scales, biases, rows, cols, 128, 8)
        errs.append(_rel_err([tile], [ref[rows[0] : rows[1], cols[0] : cols[1]]]))
    return max(errs)


def _conv_gemm() -> float:
    """The VAE's convolutions (3x3 with padding 1, 1x1, 3x3 at stride 2 on a pre-padded input, a
    non-square kernel) as GEMMs against mx.conv2d, whole and in bands of rows."""
    errs = []
    for (o, kh, kw, c), stride, pad, shape in [((6, 3, 3, 5), 1, 1, (2, 9, 7)), ((4, 1, 1, 5), 1, 0, (1, 6, 8)),
                                               ((6, 3, 3, 5), 2, 0, (2, 11, 9)), ((3, 3, 2, 4), 1, (1, 0), (1, 5, 6))]:
        x = mx.random.normal((shape[0], shape[1], shape[2], c))
        w, b = mx.random.normal((o, kh, kw, c)), mx.random.normal((o,))
        fn = lambda x, w, b, s=stride, p=pad: C.conv2d(x, w, b, s, p)  # noqa: E731
        errs.append(_agree(fn, [x, w, b], {"conv_gemm": True}, {"conv_gemm": False}))
        saved, C.BAND_ELEMENTS = C.BAND_ELEMENTS, 1  # one output row per band
        try:
            errs.append(_agree(fn, [x, w, b], {"conv_gemm": True}, {"conv_gemm": False}))
        finally:
            C.BAND_ELEMENTS = saved
    return max(errs)


def _group_norm() -> float:
    """GroupNorm through mx.fast.layer_norm against the chunked float32 statistics, with and without
    the SiLU, on inputs with a large mean (where a one-pass variance would lose digits)."""
    errs = []
    for silu in (False, True):
        x = mx.random.normal((2, 5, 7, 12)) * 3 + 20
        w, b = mx.random.normal((12,)), mx.random.normal((12,))
        fn = lambda x, w, b, s=silu: C.group_norm(x, w, b, 4, 1e-6, silu=s)  # noqa: E731
        errs.append(_agree(fn, [x, w, b], {"group_norm": True}, {"group_norm": False}))
    return max(errs)


def _sdpa_pad() -> float:
    """Sequences of 1 to 127 tokens past a multiple of 128 (text + image tokens as a bucket gives),
    and an exact multiple (nothing padded)."""
    errs = []
    for n in (200, 130, 256):
        q, k, v = (mx.random.normal((2, n, 3, 16)) for _ in range(3))
        errs.append(_agree(lambda q, k, v: attention_tokens(q, k, v, 0.25), [q, k, v], {"sdpa_pad": True}, {"sdpa_pad": False}))
    return max(errs)


CHECKS = {  # name -> (check, whether it needs CUDA)
    "rope": (lambda: _rope(kernel=False), False),
    "rope_cuda": (lambda: _rope(kernel=True), True),
    "rms_frozen": (_rms_frozen, False),
    "norm_rope": (_norm_rope, True),
    "modulate_ln": (lambda: _modulate({"modulate_ln": True, "layer_norm_cuda": False}, {"modulate_ln": False, "layer_norm_cuda": False}), False),
    "layer_norm_cuda": (lambda: _modulate({"layer_norm_cuda": True}, {"modulate_ln": False, "layer_norm_cuda": False}), True),
    "swiglu": (_swiglu, False),
    "split_views": (_split_views, False),
    "flat_views": (_flat_views, False),
    "qkv_parts": (_qkv_parts, False),
    "linear": (lambda: _linear(quantized=False), False),
    "linear_quantized": (lambda: _linear(quantized=True), False),
    "dequantize_cuda": (lambda: max(_linear(quantized=True, kernel=True), _dequantize_tile()), True),
    "conv_gemm": (_conv_gemm, False),
    "group_norm": (_group_norm, False),
    "sdpa_pad": (_sdpa_pad, False),
}


QUANTIZED = ("linear_quantized", "dequantize_cuda")


def check(name: str, seed: int = 0) -> dict:
    fn, needs_cuda = CHECKS[name]
    if needs_cuda and not (cuda_available() and mx.default_device() == mx.gpu):
        return {"max_rel_err": None, "ok": True, "skipped": "a CUDA kernel: no CUDA device here"}
    mx.random.seed(seed)
    _SPLIT.update(values=0.0, gradients=0.0)
    err = fn()
    return {"max_rel_err": err, "ok": err <= (TOLERANCE_QUANTIZED if name in QUANTIZED else TOLERANCE),
            "values_rel_err": _SPLIT["values"], "gradients_rel_err": _SPLIT["gradients"]}
