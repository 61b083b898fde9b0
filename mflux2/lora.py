"""LoRA for the FLUX.2 transformer: the MLX layer, target sets, and putting LoRA files in a model.

`LoRALinear` wraps a frozen `nn.Linear` or `nn.QuantizedLinear` (QLoRA). Module paths are BFL's
(`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, ...), so a LoRA on a fused projection is
one (A, B) pair over the whole fused output. The files themselves (layouts, names, alpha) are
`mflux2.lora_formats`; `save_lora` / `load_lora` here move their weights out of and into a model.
docs/lora.md has the rules; the sources are in docs/architecture.md ("Weight layouts", "LoRA file
conventions").
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mflux2.lora_formats import (DoRAWeights, LoHaWeights, LoKrWeights, LoRAError, LoRAWeights, SplitWeights, _report, read_lora,
                                 write_lora)
from mflux2.models.transformer import variant_of
from mflux2.ops import linear, split_views


# ----------------------------------------------------------------------------------------------
# The layer


def _dims(layer) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear, QuantizedLinear or adapter layer."""
    if isinstance(layer, AdapterLinear):
        return layer.input_dims, layer.output_dims
    if isinstance(layer, nn.QuantizedLinear):
        out, packed = layer.weight.shape
        return packed * 32 // layer.bits, out
    if isinstance(layer, nn.Linear):
        out, n_in = layer.weight.shape
        return n_in, out
    raise LoRAError(f"LoRA needs a Linear layer, got {type(layer).__name__}")


def _kaiming(shape) -> mx.array:
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)) of a [fan_out, fan_in] matrix: U(±1/sqrt(fan_in))
    (PEFT's lora_A, LyCORIS's lokr_w1 / lokr_w1_a / lokr_w1_b / lokr_w2_a)."""
    bound = 1.0 / math.sqrt(shape[1])
    return mx.random.uniform(-bound, bound, shape)


def _pad(x: mx.array, axis: int, before: int, after: int) -> mx.array:
    if not (before or after):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return mx.pad(x, widths)


def _inside(x: mx.array, axis: int, rng: tuple[int, int], path, name) -> mx.array:
    """Slice a factor to the adapter's range; what lies outside must be zero (the file pads it)."""
    lo, hi = rng
    outside = mx.concatenate([x[:lo], x[hi:]], axis=0) if axis == 0 else mx.concatenate([x[:, :lo], x[:, hi:]], axis=1)
    if outside.size and mx.any(outside != 0).item():
        raise LoRAError(f"{path}: {name} changes weights outside its 'attention' range {lo}:{hi}; load it with trainable=False")
    return x[lo:hi] if axis == 0 else x[:, lo:hi]


class AdapterLinear(nn.Module):
    """What every adapter type shares: the wrapped base, the output row / input column ranges,
    `enabled`, `scale`, `trainable`, `targets`, dropout on the adapter's input. A subclass names its
    trainable arrays (`param_names`), and gives `lora_forward(x)` (an additive delta for the input
    columns, over the output rows), `delta()` (dense [out, in] float32) and `weights()` (the
    mflux2.lora_formats class, whole-layer layout)."""

    type = "?"

    def __init__(self, base, rank: int, alpha: float | None, dropout: float, scale: float,
                 out_range: tuple[int, int] | None, in_range: tuple[int, int] | None, trainable: bool, targets: str | None):
        super().__init__()
        n_in, n_out = _dims(base)
        if int(rank) != rank or rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
        if alpha is not None and not alpha > 0:
            raise LoRAError(f"LoRA alpha must be > 0, got {alpha!r}")
        self.base = base
        self.input_dims, self.output_dims = n_in, n_out
        self.out_start, self.out_stop = out_range or (0, n_out)
        self.in_start, self.in_stop = in_range or (0, n_in)
        if not (0 <= self.out_start < self.out_stop <= n_out and 0 <= self.in_start < self.in_stop <= n_in):
            raise LoRAError(f"LoRA ranges out={out_range} in={in_range} do not fit a {n_in}->{n_out} layer")
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scale = float(scale)
        self.enabled = True
        self.trainable = trainable
        self.targets = targets
        self.split_part = False  # one part of a SplitWeights (lora_weights gathers the parts again)
        self.dropout = nn.Dropout(dropout)
        self.train(base.training)  # dropout follows the wrapped model's train/eval mode

    @property
    def sub_shape(self) -> tuple[int, int]:
        """(out, in) of the block the adapter covers."""
        return self.out_stop - self.out_start, self.in_stop - self.in_start

    @property
    def restricted(self) -> bool:
        return (self.out_start, self.out_stop, self.in_start, self.in_stop) != (0, self.output_dims, 0, self.input_dims)

    def param_names(self) -> list[str]:
        return [k for k in self._PARAMS if k in self]

    def __call__(self, x):
        # The delta enters the base GEMM as its accumulator (and a quantized base is dequantised
        # right before it at training token counts): mflux2.ops.linear.
        return linear(self, x)

    def _dropout(self, x):
        p = self.dropout.p if hasattr(self.dropout, "p") else 1 - self.dropout._p_1
        if not (_DROPOUT_KEYS and self.training and p > 0):
            return self.dropout(x)  # mx.random's global state
        key, _DROPOUT_KEYS[-1] = mx.random.split(_DROPOUT_KEYS[-1])
        mask = mx.random.bernoulli(1 - p, x.shape, key=key)
        return (mask * x) * (1 / (1 - p))  # as nn.Dropout

    def _full(self, m: mx.array) -> mx.array:
        """A dense [sub_out, sub_in] block padded with zeros to the whole layer."""
        m = _pad(m, 0, self.out_start, self.output_dims - self.out_stop)
        return _pad(m, 1, self.in_start, self.input_dims - self.in_stop)

    @classmethod
    def from_part(cls, base, part, rows: tuple[int, int], scale: float = 1.0, trainable: bool = False,
                  targets: str | None = None, source: str = "LoRA", name: str = ""):
        """The layer for one part of a SplitWeights: `part` adapts the rows `rows` of `base`."""
        n_in, _ = _dims(base)
        if tuple(part.shape) != (rows[1] - rows[0], n_in):
            raise LoRAError(f"{source}: {name}: a part for rows {rows[0]}:{rows[1]} has shape {tuple(part.shape)}")
        layer = cls._from_sub(base, part, rows, scale, trainable, targets)
        layer.split_part = True
        return layer

    def _extra_repr(self):
        ranges = f", out={self.out_start}:{self.out_stop}, in={self.in_start}:{self.in_stop}" if self.restricted else ""
        return f"type={self.type}, rank={self.rank}, alpha={self.alpha}, scale={self.scale}, enabled={self.enabled}{ranges}"


class _UpProjection:
    """The up-projection of an adapter whose delta is h Uᵀ with h = `lora_down(x)` [..., k] and
    U = `_up_matrix(dtype)` [out, k] (LoRA's scaled B; LoHa's rank-r² U): the fused projections
    (mflux2.ops.linear_split) call it once per output part."""

    def lora_up(self, h, rows: tuple[int, int] | None = None):
        """U h for the output rows `rows` (relative to out_start; None: all of them), in h's dtype."""
        u = self._up_matrix(h.dtype)
        return h @ (u if rows is None else u[rows[0] : rows[1]]).T

    def lora_up_parts(self, h, spans: list[tuple[int, int]]) -> list:
        """[lora_up(h, span) for span in spans] (spans relative to out_start, in order). Spans that
        tile U's rows read them as split views of Uᵀ: U's gradient is then one concatenation of the
        parts' (their GEMMs give them as Uᵀ's column blocks, the layout the flat parameters store
        LoRA's B in) instead of a zero-padded full-size cotangent per part."""
        edges = [a for a, _ in spans] + [spans[-1][1]]
        if edges[0] != 0 or edges[-1] != self.sub_shape[0] or any(b != a for (_, b), (a, _) in zip(spans, spans[1:])):
            return [self.lora_up(h, span) for span in spans]
        ut = self._up_matrix(h.dtype).T
        return [h @ p for p in split_views(ut, [b - a for a, b in spans], axis=1)]


class LoRALinear(_UpProjection, AdapterLinear):
    """y = base(x) + scale · (alpha / rank) · B(A(dropout(x))).

    lora_A [rank, in] starts Kaiming-uniform like PEFT (bound 1/sqrt(in)), lora_B [out, rank] starts
    at zero, both float32; the two small matmuls run in x's dtype. `out_start/out_stop` restrict the
    LoRA to a row range of the output (the q/k/v rows of single_blocks.linear1) and
    `in_start/in_stop` to a column range of the input (the attention columns of linear2): outside
    the ranges the delta is exactly zero. `enabled` and `scale` are plain Python values read when the
    forward runs (or is traced by mx.compile)."""

    type = "lora"
    _PARAMS = ("lora_A", "lora_B")

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                 out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None,
                 trainable: bool = True, targets: str | None = None):
        super().__init__(base, rank, alpha, dropout, scale, out_range, in_range, trainable, targets)
        n_out, n_in = self.sub_shape
        self.lora_A = _kaiming((self.rank, n_in))  # kaiming_uniform_(a=sqrt(5)) as in PEFT
        self.lora_B = mx.zeros((n_out, self.rank))

    def lora_forward(self, x):
        """The delta for this layer's input columns x [..., in_stop - in_start] over its output
        rows: scale · (alpha / rank) · B(A(dropout(x))), in x's dtype."""
        return self.lora_up(self.lora_down(x))

    def lora_down(self, x):
        """A(dropout(x)) [..., rank], in x's dtype: shared by every output part (mflux2.ops.linear_split)."""
        return self._dropout(x) @ self.lora_A.astype(x.dtype).T

    def _up_matrix(self, dtype) -> mx.array:
        """B·(scale·alpha/rank) in `dtype`: the factor folded into the small B before the cast
        (gradients reach the float32 params), and left out where it is 1 — alpha = rank, the
        default — so the step has no multiplication by one (a kernel per LoRA layer each way)."""
        s = self.scale * self.alpha / self.rank
        return (self.lora_B if s == 1.0 else self.lora_B * s).astype(dtype)

    def full_factors(self) -> tuple[mx.array, mx.array]:
        """(A [rank, in], B [out, rank]) over the whole layer, zero outside the ranges (file layout)."""
        a = _pad(self.lora_A, 1, self.in_start, self.input_dims - self.in_stop)
        b = _pad(self.lora_B, 0, self.out_start, self.output_dims - self.out_stop)
        return a, b

    def delta(self, with_scale: bool = True) -> mx.array:
        """The dense weight change [out, in] in float32: (scale·)alpha/rank · B @ A."""
        a, b = self.full_factors()
        s = self.alpha / self.rank * (self.scale if with_scale else 1.0)
        return (b.astype(mx.float32) @ a.astype(mx.float32)) * s

    def weights(self) -> LoRAWeights:
        a, b = self.full_factors()
        return LoRAWeights(a, b, self.alpha)

    def part_weights(self) -> LoRAWeights:
        """The weights of the rows out_start:out_stop alone (a SplitWeights part)."""
        return LoRAWeights(self.full_factors()[0], self.lora_B, self.alpha)

    @classmethod
    def _from_sub(cls, base, w, rows, scale, trainable, targets):
        layer = cls(base, w.rank, w.alpha, 0.0, scale, rows, None, trainable=trainable, targets=targets)
        layer.lora_A, layer.lora_B = w.A.astype(mx.float32), w.B.astype(mx.float32)
        return layer

    @classmethod
    def from_weights(cls, base, w, scale: float = 1.0, out_range=None, in_range=None, trainable: bool = False,
                     targets: str | None = None, source: str = "LoRA", name: str = ""):
        """The layer for whole-layer weights `w` (sliced to the ranges, which must hold all of it)."""
        layer = cls(base, w.rank, w.alpha, 0.0, scale, out_range, in_range, trainable=trainable, targets=targets)
        a, b = w.A, w.B
        if out_range:
            b = _inside(b, 0, out_range, source, name)
        if in_range:
            a = _inside(a, 1, in_range, source, name)
        layer.lora_A, layer.lora_B = a.astype(mx.float32), b.astype(mx.float32)
        return layer


def _base_matrix(layer) -> mx.array:
    """The dense weight of a Linear or QuantizedLinear, in float32 (fusing; the DoRA delta)."""
    if isinstance(layer, nn.QuantizedLinear):
        mode = {"mode": layer.mode} if hasattr(layer, "mode") else {}
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, **mode).astype(mx.float32)
    if isinstance(layer, nn.Linear):
        return layer.weight.astype(mx.float32)
    raise LoRAError(f"DoRA needs a Linear or QuantizedLinear base (not stacked on another adapter), got {type(layer).__name__}")


def _row_norms_sq(layer, rows: tuple[int, int]) -> mx.array:
    """Σ_j W[i, j]² for the rows, float32, dequantised / upcast a block of rows at a time."""
    n_in, _ = _dims(layer)
    step = max(1, (1 << 22) // n_in)
    out = []
    for r0 in range(rows[0], rows[1], step):
        r1 = min(rows[1], r0 + step)
        if isinstance(layer, nn.QuantizedLinear):
            mode = {"mode": layer.mode} if hasattr(layer, "mode") else {}
            qb = layer.get("biases")
            w = mx.dequantize(layer.weight[r0:r1], layer.scales[r0:r1], None if qb is None else qb[r0:r1],
                              layer.group_size, layer.bits, **mode)
        else:
            w = layer.weight[r0:r1]
        out.append(mx.square(w.astype(mx.float32)).sum(axis=1))
        mx.eval(out[-1])
    return mx.concatenate(out)


def _base_times(layer, a: mx.array) -> mx.array:
    """a @ W^T (no bias) for a small a [r, in]: the base's own GEMM, quantized_matmul for a
    quantized base, in the base's precision with a float32 result."""
    if isinstance(layer, nn.QuantizedLinear):
        mode = {"mode": layer.mode} if hasattr(layer, "mode") else {}
        y = mx.quantized_matmul(a.astype(layer.scales.dtype), layer.weight, layer.scales, layer.get("biases"),
                                transpose=True, group_size=layer.group_size, bits=layer.bits, **mode)
    else:
        y = a.astype(layer.weight.dtype) @ layer.weight.T
    return y.astype(mx.float32)


class DoRALinear(LoRALinear):
    """DoRA as PEFT does it (`use_dora=True`): W' = m · V / ‖V‖_row with V = W + s·B A, s = scale ·
    alpha / rank. The forward never builds W': y = g ⊙ (x Wᵀ + s·B A x) + bias with g = m / ‖V‖
    per output row, i.e. a LoRA's output (`lora_forward`, `lora_down`/`lora_up` are LoRALinear's:
    the path without g) rescaled per row by mflux2.ops.gemm (`row_scale()` marks the layer as
    rescaling). The rescale's VJP reads its output, not the un-rescaled sum, so the backward pass
    keeps no un-rescaled copy (the output itself is kept for the magnitude's gradient, beyond what
    LoRA keeps where nothing else needs it: the output projections; mflux2.ops.gemm `_rescale`).

    The norm ‖V‖ is detached from the gradient (PEFT, after the DoRA paper §4.3): gradients reach m
    through g and A, B through the LoRA path only. LyCORIS's DoRA (`weight_decompose`, `dora_scale`)
    differs: it differentiates through ‖V‖ (and adds float eps to it); its forward value is the same.
    We follow PEFT because that is what the paper recommends and diffusers/PEFT train.

    ‖V‖² per row is ‖W‖² + 2s·Σ_k (A Wᵀ)_k ⊙ B_k + s²·rowsum((B A Aᵀ) ⊙ B): ‖W‖² is computed once
    when the layer is built (a vector, `_base_norm_sq`; the base is frozen), A Wᵀ is the base's own
    GEMM of the rank rows of A (quantized_matmul for a QLoRA base), so no dense copy of W or V
    exists at any time. magnitude [out] starts at ‖W‖ (PEFT) and stays float32. Ranges: the LoRA
    path reads the input columns in_start:in_stop as LoRALinear; m and the norm cover the output
    rows out_start:out_stop and the WHOLE row (V = W + s·B A zero-padded, as the file's DoRAWeights
    says), so rows outside the range are unchanged. Dropout applies to the LoRA path only (PEFT's
    rescaled base term uses the dropped-out x when dropout > 0)."""

    type = "dora"
    _PARAMS = ("lora_A", "lora_B", "magnitude")

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                 out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None,
                 trainable: bool = True, targets: str | None = None):
        super().__init__(base, rank, alpha, dropout, scale, out_range, in_range, trainable, targets)
        plain = base
        while isinstance(plain, AdapterLinear):  # only parts of a split layer on other rows (W unchanged on ours)
            if plain.out_start < self.out_stop and self.out_start < plain.out_stop:
                raise LoRAError("a DoRA layer cannot stack on another adapter over the same rows (its norm needs the base weight)")
            plain = plain.base
        if not isinstance(plain, (nn.Linear, nn.QuantizedLinear)):
            raise LoRAError(f"DoRA needs a Linear or QuantizedLinear base, got {type(plain).__name__}")
        object.__setattr__(self, "_plain", plain)  # a plain attribute: not a child module (no second path to the base)
        self._base_norm_sq = _row_norms_sq(plain, (self.out_start, self.out_stop))
        self.magnitude = mx.sqrt(self._base_norm_sq)

    @property
    def plain_base(self):
        """The Linear / QuantizedLinear under this layer (and under any split parts below it)."""
        return self._plain

    def row_scale(self) -> mx.array:
        """g = m / ‖W + s·B A‖ over the adapter's rows, float32; the norm carries no gradient."""
        s = self.scale * self.alpha / self.rank
        a, b = mx.stop_gradient(self.lora_A.astype(mx.float32)), mx.stop_gradient(self.lora_B.astype(mx.float32))
        a_full = _pad(a, 1, self.in_start, self.input_dims - self.in_stop)
        wa = _base_times(self.plain_base, a_full)[:, self.out_start : self.out_stop].T  # [rows, rank] = W A^T
        norm_sq = self._base_norm_sq + (2 * s) * (wa * b).sum(axis=1) + (s * s) * ((b @ (a @ a.T)) * b).sum(axis=1)
        return self.magnitude.astype(mx.float32) / mx.stop_gradient(mx.sqrt(mx.maximum(norm_sq, 0.0)))

    def delta(self, with_scale: bool = True) -> mx.array:
        """W' − W [out, in] in float32 (needs the dense base weight: fusing, tests)."""
        w = _base_matrix(self.plain_base)
        return self.weights_at(self.scale if with_scale else 1.0).delta(w)

    def weights_at(self, scale: float = 1.0) -> DoRAWeights:
        a, b = self.full_factors()
        m = self.magnitude
        if (self.out_start, self.out_stop) != (0, self.output_dims):  # rows outside keep W: m = ‖W‖ there (V = W)
            base = self.plain_base
            m = mx.concatenate([mx.sqrt(_row_norms_sq(base, (0, self.out_start))) if self.out_start else mx.zeros(0), m,
                                mx.sqrt(_row_norms_sq(base, (self.out_stop, self.output_dims))) if self.out_stop < self.output_dims else mx.zeros(0)])
        return DoRAWeights(a, b * scale, self.alpha, magnitude=m)

    def weights(self) -> DoRAWeights:
        return self.weights_at(1.0)

    def part_weights(self) -> DoRAWeights:
        return DoRAWeights(self.full_factors()[0], self.lora_B, self.alpha, magnitude=self.magnitude)

    @classmethod
    def _from_sub(cls, base, w, rows, scale, trainable, targets):
        layer = super()._from_sub(base, w, rows, scale, trainable, targets)
        layer.magnitude = w.magnitude.astype(mx.float32).reshape(-1)
        return layer

    @classmethod
    def from_weights(cls, base, w, scale: float = 1.0, out_range=None, in_range=None, trainable: bool = False,
                     targets: str | None = None, source: str = "LoRA", name: str = ""):
        layer = super().from_weights(base, w, scale, out_range, in_range, trainable, targets, source, name)
        m = w.magnitude.astype(mx.float32)
        if m.shape != (layer.output_dims,):
            raise LoRAError(f"{source}: {name}: DoRA magnitude has shape {tuple(m.shape)}, the layer {layer.output_dims} rows")
        layer.magnitude = m[layer.out_start : layer.out_stop]
        return layer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's `factorization`: dimension = m · n with m <= n, m the divisor closest to `factor`
    (−1: as close to sqrt(dimension) as the divisors allow)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLinear(AdapterLinear):
    """LoKr (LyCORIS `LokrModule`, linear): ΔW = s · kron(W1, W2), W1 [o1, i1], W2 [o2, i2], with
    (o1, o2) = factorization(out, factor), (i1, i2) = factorization(in, factor) (LyCORIS's `factor`,
    −1 automatic). W2 is factored lokr_w2_a [o2, r] @ lokr_w2_b [r, i2] when r < max(o2, i2)/2, else
    whole (LyCORIS's rule); W1 is factored only with `decompose_both` and r < max(o1, i1)/2.
    s = scale · alpha / r, except scale · 1 when both halves are whole (LyCORIS ignores alpha then).
    Init as LyCORIS: W1 (or its factors) and lokr_w2_a Kaiming-uniform, lokr_w2 / lokr_w2_b zero.

    The forward never builds the kron matrix: x [..., in] viewed as X [..., i1, i2], Y = W1 X W2ᵀ
    [..., o1, o2] (X W2ᵀ through the factors when W2 is factored, W1 applied between them on the
    rank-r rows), without a transpose. Ranges: the kron covers the block out_start:out_stop × in_start:in_stop; in the
    file (`weights()`) W1 is zero-padded to the whole layer, which needs the range edges to be
    multiples of o2 / i2 (true of FLUX.2's attention ranges)."""

    type = "lokr"
    _PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                 out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None,
                 trainable: bool = True, targets: str | None = None, factor: int = -1, decompose_both: bool = False,
                 init: bool = True):
        super().__init__(base, rank, alpha, dropout, scale, out_range, in_range, trainable, targets)
        if int(factor) != factor or factor == 0 or factor < -1:
            raise LoRAError(f"LoKr factor must be -1 (automatic) or a positive integer, got {factor!r}")
        self.factor, self.decompose_both = int(factor), bool(decompose_both)
        if not init:
            return
        n_out, n_in = self.sub_shape
        (o1, o2), (i1, i2) = factorization(n_out, self.factor), factorization(n_in, self.factor)
        r = self.rank
        if self.decompose_both and r < max(o1, i1) / 2:
            self.lokr_w1_a, self.lokr_w1_b = _kaiming((o1, r)), _kaiming((r, i1))
        else:
            self.lokr_w1 = _kaiming((o1, i1))
        if r < max(o2, i2) / 2:
            self.lokr_w2_a, self.lokr_w2_b = _kaiming((o2, r)), mx.zeros((r, i2))
        else:
            self.lokr_w2 = mx.zeros((o2, i2))

    @property
    def kron_scale(self) -> float:
        """alpha / rank, or 1 when both halves are whole (before `scale`)."""
        return 1.0 if ("lokr_w1" in self and "lokr_w2" in self) else self.alpha / self.rank

    def _w1(self, dtype) -> mx.array:
        return self.lokr_w1.astype(dtype) if "lokr_w1" in self else self.lokr_w1_a.astype(dtype) @ self.lokr_w1_b.astype(dtype)

    def _shapes(self):
        o1, i1 = self._w1_shape()
        o2, i2 = self.lokr_w2.shape if "lokr_w2" in self else (self.lokr_w2_a.shape[0], self.lokr_w2_b.shape[1])
        return (o1, i1), (o2, i2)

    def _w1_shape(self):
        return self.lokr_w1.shape if "lokr_w1" in self else (self.lokr_w1_a.shape[0], self.lokr_w1_b.shape[1])

    def lora_forward(self, x):
        (o1, i1), (o2, i2) = self._shapes()
        s = self.scale * self.kron_scale
        w1 = (self._w1(mx.float32) * s).astype(x.dtype)  # s folded into the small W1
        lead = x.shape[:-1]
        h = self._dropout(x).reshape(-1, i1, i2)
        # W1 mixes the i1 axis by a matmul broadcast over tokens (W1 [o1, i1] @ h [N, i1, ·]), so
        # nothing is transposed; with W2 factored it mixes the rank-r rows, before W2's up-projection.
        if "lokr_w2" in self:
            y = w1 @ (h @ self.lokr_w2.astype(x.dtype).T)  # [N, o1, o2]
        else:
            y = (w1 @ (h @ self.lokr_w2_b.astype(x.dtype).T)) @ self.lokr_w2_a.astype(x.dtype).T  # [N, o1, r] -> [N, o1, o2]
        return y.reshape(*lead, o1 * o2)

    def delta(self, with_scale: bool = True) -> mx.array:
        w = self.weights()
        return w.delta() * (self.scale if with_scale else 1.0)

    def _pads(self, shape2=None):
        """(W1 rows before/after, W1 columns before/after) that place the kron block in the whole
        layer: the range edges must be multiples of W2's (o2, i2)."""
        o2, i2 = shape2 or self._shapes()[1]
        edges = [(self.out_start, o2), (self.output_dims - self.out_stop, o2), (self.in_start, i2), (self.input_dims - self.in_stop, i2)]
        if any(e % d for e, d in edges):
            raise LoRAError(f"a LoKr with W2 {o2}x{i2} on the block out={self.out_start}:{self.out_stop}, in={self.in_start}:{self.in_stop} "
                            f"of a {self.input_dims}->{self.output_dims} layer cannot be written as one kron of the whole layer")
        return [e // d for e, d in edges]

    def weights(self) -> LoKrWeights:
        rb, ra, cb, ca = self._pads()
        kw = {"alpha": self.alpha}
        if "lokr_w1" in self:
            kw["w1"] = _pad(_pad(self.lokr_w1, 0, rb, ra), 1, cb, ca)
        else:
            kw["w1_a"], kw["w1_b"] = _pad(self.lokr_w1_a, 0, rb, ra), _pad(self.lokr_w1_b, 1, cb, ca)
        for k in ("w2", "w2_a", "w2_b"):
            if "lokr_" + k in self:
                kw[k] = self["lokr_" + k]
        return LoKrWeights(**kw)

    def part_weights(self) -> LoKrWeights:
        kw = {k: self["lokr_" + k] for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b") if "lokr_" + k in self}
        return LoKrWeights(**kw, alpha=self.alpha)

    @classmethod
    def _from_sub(cls, base, w, rows, scale, trainable, targets):
        return cls._holding(base, w, scale, rows, None, trainable, targets)

    @classmethod
    def _holding(cls, base, w, scale, out_range, in_range, trainable, targets):
        """A layer holding w's halves as they are (whole or factored) with w's kron scale."""
        rank = w.rank
        layer = cls(base, rank or 1, w.alpha if (rank and w.alpha) else None, 0.0, scale, out_range, in_range,
                    trainable=trainable, targets=targets, init=False)
        for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"):
            if getattr(w, k) is not None:
                layer["lokr_" + k] = getattr(w, k).astype(mx.float32)
        if layer.kron_scale != w.scale:  # e.g. a factored half without an alpha in the file: alpha = rank
            layer.alpha = w.scale * layer.rank
        return layer

    @classmethod
    def from_weights(cls, base, w, scale: float = 1.0, out_range=None, in_range=None, trainable: bool = False,
                     targets: str | None = None, source: str = "LoRA", name: str = ""):
        layer = cls._holding(base, w, scale, out_range, in_range, trainable, targets)
        (o1, i1), (o2, i2) = layer._shapes()
        if (o1 * o2, i1 * i2) != (layer.output_dims, layer.input_dims):
            raise LoRAError(f"{source}: shape mismatch for {name}: LoKr delta ({o1 * o2}, {i1 * i2}), model layer "
                            f"({layer.output_dims}, {layer.input_dims}) — an adapter for another model?")
        if out_range or in_range:  # slice W1 to the block; the rest of it must be zero
            rb, _, cb, _ = layer._pads((o2, i2))
            rows = (rb, rb + (layer.out_stop - layer.out_start) // o2)
            cols = (cb, cb + (layer.in_stop - layer.in_start) // i2)
            if "lokr_w1" in layer:
                layer.lokr_w1 = _inside(_inside(layer.lokr_w1, 0, rows, source, name), 1, cols, source, name)
            else:
                layer.lokr_w1_a = _inside(layer.lokr_w1_a, 0, rows, source, name)
                layer.lokr_w1_b = _inside(layer.lokr_w1_b, 1, cols, source, name)
        return layer

    def _extra_repr(self):
        (o1, i1), (o2, i2) = self._shapes()
        return super()._extra_repr() + f", w1={o1}x{i1}{'' if 'lokr_w1' in self else ' factored'}, w2={o2}x{i2}{'' if 'lokr_w2' in self else ' factored'}"


# LoHa: above this rank, (w1_a ⊙ w2_a)(w1_b ⊙ w2_b) of rank r² costs more than the dense ΔW.
class LoHaLinear(_UpProjection, AdapterLinear):
    """LoHa (LyCORIS `LohaModule`, linear): ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b), s = scale · alpha / r.
    Init as LyCORIS: hada_w1_a ~ N(0, 0.1), hada_w1_b ~ N(0, 1), hada_w2_a = 0, hada_w2_b ~ N(0, 1).

    The Hadamard product of two rank-r products is a rank-r² product: ΔW = U V with
    U[:, (i,j)] = w1_a[:, i] ⊙ w2_a[:, j] and V[(i,j), :] = w1_b[i] ⊙ w2_b[j]; the forward is
    x Vᵀ Uᵀ (an additive delta like LoRA's, r² · (in + out) per token) while r² · (in + out) <
    in · out, else x ΔWᵀ with the dense ΔW built once per step. Ranges: as LoRALinear (zero outside;
    in the file w1_a is zero-padded over rows and w1_b over columns)."""

    type = "loha"
    _PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                 out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None,
                 trainable: bool = True, targets: str | None = None):
        super().__init__(base, rank, alpha, dropout, scale, out_range, in_range, trainable, targets)
        n_out, n_in = self.sub_shape
        r = self.rank
        self.hada_w1_a = mx.random.normal((n_out, r)) * 0.1
        self.hada_w1_b = mx.random.normal((r, n_in))
        self.hada_w2_a = mx.zeros((n_out, r))
        self.hada_w2_b = mx.random.normal((r, n_in))

    @property
    def factored(self) -> bool:
        """Whether the forward uses the rank-r² factors (else the dense ΔW)."""
        n_out, n_in = self.sub_shape
        return self.rank ** 2 * (n_in + n_out) < n_in * n_out

    def lora_forward(self, x):
        if self.factored:
            return self.lora_up(self.lora_down(x))
        s = self.scale * self.alpha / self.rank
        dw = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * s
        return self._dropout(x) @ dw.astype(x.dtype).T

    # The factored path as a rank-r² LoRA (V down, U up), so the fused projections treat it as they
    # treat a LoRA (mflux2.ops.linear_split): one down-projection for q, k and v, and each part's
    # up-projection on U's rows (`_UpProjection`) — no strided slices of a full-width delta.
    def lora_down(self, x):
        """x Vᵀ [..., r²], V[(i,j), :] = w1_b[i] ⊙ w2_b[j] (the factored path only)."""
        r = self.rank
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, self.sub_shape[1])
        return self._dropout(x) @ v.astype(x.dtype).T

    def _up_matrix(self, dtype) -> mx.array:
        """U·s [out, r²], U[:, (i,j)] = w1_a[:, i] ⊙ w2_a[:, j], s = scale · alpha / r folded into w2_a."""
        r = self.rank
        s = self.scale * self.alpha / self.rank
        return (self.hada_w1_a[:, :, None] * (self.hada_w2_a * s)[:, None, :]).reshape(self.sub_shape[0], r * r).astype(dtype)

    def weights(self) -> LoHaWeights:
        rows = lambda m: _pad(m, 0, self.out_start, self.output_dims - self.out_stop)  # noqa: E731
        cols = lambda m: _pad(m, 1, self.in_start, self.input_dims - self.in_stop)  # noqa: E731
        return LoHaWeights(rows(self.hada_w1_a), cols(self.hada_w1_b), rows(self.hada_w2_a), cols(self.hada_w2_b), self.alpha)

    def delta(self, with_scale: bool = True) -> mx.array:
        return self.weights().delta() * (self.scale if with_scale else 1.0)

    def part_weights(self) -> LoHaWeights:
        cols = lambda m: _pad(m, 1, self.in_start, self.input_dims - self.in_stop)  # noqa: E731
        return LoHaWeights(self.hada_w1_a, cols(self.hada_w1_b), self.hada_w2_a, cols(self.hada_w2_b), self.alpha)

    @classmethod
    def _from_sub(cls, base, w, rows, scale, trainable, targets):
        layer = cls(base, w.rank, w.alpha, 0.0, scale, rows, None, trainable=trainable, targets=targets)
        f = lambda m: m.astype(mx.float32)  # noqa: E731
        layer.hada_w1_a, layer.hada_w1_b, layer.hada_w2_a, layer.hada_w2_b = f(w.w1_a), f(w.w1_b), f(w.w2_a), f(w.w2_b)
        return layer

    @classmethod
    def from_weights(cls, base, w, scale: float = 1.0, out_range=None, in_range=None, trainable: bool = False,
                     targets: str | None = None, source: str = "LoRA", name: str = ""):
        layer = cls(base, w.rank, w.alpha, 0.0, scale, out_range, in_range, trainable=trainable, targets=targets)
        if w.shape != (layer.output_dims, layer.input_dims):
            raise LoRAError(f"{source}: shape mismatch for {name}: LoHa delta {w.shape}, model layer "
                            f"({layer.output_dims}, {layer.input_dims}) — an adapter for another model?")
        f = lambda m: m.astype(mx.float32)  # noqa: E731
        a1, b1, a2, b2 = f(w.w1_a), f(w.w1_b), f(w.w2_a), f(w.w2_b)
        if out_range:
            a1, a2 = _inside(a1, 0, out_range, source, name), a2[out_range[0] : out_range[1]]
        if in_range:
            b1, b2 = _inside(b1, 1, in_range, source, name), b2[:, in_range[0] : in_range[1]]
        layer.hada_w1_a, layer.hada_w1_b, layer.hada_w2_a, layer.hada_w2_b = a1, b1, a2, b2
        return layer


def adapter_shapes(type: str, n_out: int, n_in: int, rank: int, factor: int = -1, decompose_both: bool = False) -> dict:
    """{parameter: shape} of one adapter layer of `type` on an n_out x n_in block: the arrays each
    class above creates (LoKr by LyCORIS's factorisation rule)."""
    if type in ("lora", "dora"):
        return {"lora_A": (rank, n_in), "lora_B": (n_out, rank), **({"magnitude": (n_out,)} if type == "dora" else {})}
    if type == "loha":
        return {"hada_w1_a": (n_out, rank), "hada_w1_b": (rank, n_in), "hada_w2_a": (n_out, rank), "hada_w2_b": (rank, n_in)}
    if type == "lokr":
        (o1, o2), (i1, i2) = factorization(n_out, factor), factorization(n_in, factor)
        w1 = {"lokr_w1_a": (o1, rank), "lokr_w1_b": (rank, i1)} if decompose_both and rank < max(o1, i1) / 2 else {"lokr_w1": (o1, i1)}
        w2 = {"lokr_w2_a": (o2, rank), "lokr_w2_b": (rank, i2)} if rank < max(o2, i2) / 2 else {"lokr_w2": (o2, i2)}
        return {**w1, **w2}
    raise LoRAError(f"unknown adapter type {type!r}; choose one of lora, lokr, loha, dora")


def adapter_parameter_count(type: str, n_out: int, n_in: int, rank: int, factor: int = -1, decompose_both: bool = False) -> int:
    """The trainable parameters one adapter layer of `type` has on an n_out x n_in block."""
    return sum(math.prod(shape) for shape in adapter_shapes(type, n_out, n_in, rank, factor, decompose_both).values())


def adapter_arrays(w) -> dict:
    """{layer parameter name: file tensor} of one adapter's weights (whole-layer layout): the names
    the layer classes above give their arrays."""
    if isinstance(w, DoRAWeights):
        return {"lora_A": w.A, "lora_B": w.B, "magnitude": w.magnitude.reshape(-1)}
    if isinstance(w, LoRAWeights):
        return {"lora_A": w.A, "lora_B": w.B}
    if isinstance(w, LoHaWeights):
        return {f"hada_{k}": getattr(w, k) for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
    if isinstance(w, LoKrWeights):
        return {f"lokr_{k}": getattr(w, k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b") if getattr(w, k) is not None}
    raise LoRAError(f"no adapter arrays for {type(w).__name__}")


ADAPTERS = {"lora": LoRALinear, "lokr": LoKrLinear, "loha": LoHaLinear, "dora": DoRALinear}
WEIGHTS_TYPES = {LoRAWeights: "lora", DoRAWeights: "dora", LoKrWeights: "lokr", LoHaWeights: "loha"}
# The trainable matrices of every type (the step casts these to the compute dtype; DoRA's magnitude
# stays float32: m / ‖V‖ ≈ 1 rescales the whole base output and bf16 would round it by up to 0.4%).
ADAPTER_MATRICES = frozenset(k for cls in (LoRALinear, LoKrLinear, LoHaLinear) for k in cls._PARAMS)


_DROPOUT_KEYS: list = []


@contextlib.contextmanager
def dropout_key(key: mx.array):
    """Draw LoRA dropout masks from `key` — split once per layer, in call order — instead of
    mx.random's global state, so a recomputation (checkpointed backward) draws the same masks."""
    _DROPOUT_KEYS.append(key)
    try:
        yield
    finally:
        _DROPOUT_KEYS.pop()


# ----------------------------------------------------------------------------------------------
# Module paths, target sets


def _get(model, path: str):
    cur = model
    for part in path.split("."):
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return cur


def _set(model, path: str, module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        parent[last] = module


def lora_layers(model) -> list[tuple[str, AdapterLinear]]:
    """Every adapter layer (any type) in the model with its path (stacked ones appear as `<path>.base`)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLinear)]


def _outermost(model) -> list[tuple[str, AdapterLinear]]:
    layers = lora_layers(model)
    paths = [p for p, _ in layers]
    return [(p, m) for p, m in layers if not any(p.startswith(q + ".") for q in paths)]


def _bfl_name(path: str) -> str:
    """A stacked LoRA's path `x.qkv.base` is still the module `x.qkv`."""
    return re.sub(r"(\.base)+$", "", path)


TARGETS = {
    "attention": "Q, K, V and output projections everywhere (single blocks: q/k/v rows of linear1, attention columns of linear2)",
    "attention_output": "same as attention (flux-2-swift-mlx: attention includes the output projections)",
    "attention_ffn": "same as all (attention + every feed-forward projection)",
    "all": "attention + double-block MLPs, single-block linear1/linear2 whole",
}


def target_spec(model, targets: str) -> dict[str, tuple[tuple[int, int] | None, tuple[int, int] | None]]:
    """{BFL module path: (output row range, input column range)} for a target set (None = whole)."""
    if targets not in TARGETS:
        raise LoRAError(f"unknown LoRA target_layers {targets!r}; choose one of {', '.join(TARGETS)}")
    full = targets in ("all", "attention_ffn")
    spec = {}
    for i, _ in enumerate(model.double_blocks):
        for s in ("img", "txt"):
            spec[f"double_blocks.{i}.{s}_attn.qkv"] = (None, None)
            spec[f"double_blocks.{i}.{s}_attn.proj"] = (None, None)
            if full:
                spec[f"double_blocks.{i}.{s}_mlp.0"] = (None, None)
                spec[f"double_blocks.{i}.{s}_mlp.2"] = (None, None)
    for i, block in enumerate(model.single_blocks):
        d = block.dim  # linear1 rows = [q|k|v|gate|up], linear2 columns = [attn|mlp]
        spec[f"single_blocks.{i}.linear1"] = (None, None) if full else ((0, 3 * d), None)
        spec[f"single_blocks.{i}.linear2"] = (None, None) if full else (None, (0, d))
    return spec


def apply_lora(model, rank: int, alpha: float | None = None, targets: str = "attention", dropout: float = 0.0,
               type: str = "lora", factor: int = -1, decompose_both: bool = False) -> list[str]:
    """Wrap the target layers in trainable adapter layers of `type` (lora, lokr, loha, dora), freeze
    everything else; returns the paths. `factor` and `decompose_both` are LoKr's (LyCORIS's names).
    The factors are drawn from mx.random: seed it first for a reproducible start."""
    if type not in ADAPTERS:
        raise LoRAError(f"unknown adapter type {type!r}; choose one of {', '.join(ADAPTERS)}")
    spec = target_spec(model, targets)
    if any(m.trainable for _, m in lora_layers(model)):
        raise LoRAError("the model already has a trainable LoRA: call remove_lora(model) first")
    knobs = {"factor": factor, "decompose_both": decompose_both} if type == "lokr" else {}
    for path, (out_range, in_range) in spec.items():
        layer = _get(model, path)
        _set(model, path, ADAPTERS[type](layer, rank, alpha, dropout, 1.0, out_range, in_range, trainable=True,
                                         targets=targets, **knobs))
    freeze_for_lora(model)
    return list(spec)


def freeze_for_lora(model) -> None:
    """Freeze the model, then unfreeze only the adapter arrays of trainable adapter layers."""
    model.freeze()
    for _, m in lora_layers(model):
        if m.trainable:
            m.unfreeze(recurse=False, keys=m.param_names())


def lora_parameters(model) -> dict:
    """The trainable adapter parameters as a tree shaped like model.parameters()."""
    flat = [(f"{p}.{k}", m[k]) for p, m in lora_layers(model) if m.trainable for k in m.param_names()]
    return tree_unflatten(flat)


@contextlib.contextmanager
def swapped_parameters(model, params: dict):
    """Put `params` (a tree shaped like lora_parameters / trainable_parameters, e.g. EMA weights)
    into the model for the duration, then restore the current ones; nothing is copied."""
    saved = lora_parameters(model)
    model.update(params)
    try:
        yield model
    finally:
        model.update(saved)


def set_lora_enabled(model, enabled: bool) -> None:
    for _, m in lora_layers(model):
        m.enabled = bool(enabled)


@contextlib.contextmanager
def lora_disabled(model):
    """Run the base model for the duration (DOP's prior pass); no weight is copied.

    The flag is a Python value read when the forward runs. Under mx.compile it is read while tracing,
    so put the `with` INSIDE the compiled function (one compiled function for the prior pass, another
    for the LoRA passes); never flip it around calls of one compiled function."""
    layers = lora_layers(model)
    before = [m.enabled for _, m in layers]
    for _, m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for (_, m), flag in zip(layers, before):
            m.enabled = flag


def remove_lora(model) -> list[str]:
    """Replace every adapter layer (stacked ones too) by its original base layer; returns the paths."""
    removed = []
    for path, m in _outermost(model):
        base = m
        while isinstance(base, AdapterLinear):
            base = base.base
        _set(model, path, base)
        removed.append(path)
    return removed


unload = remove_lora


def fuse_lora(model) -> list[str]:
    """Add every enabled LoRA delta (with its scale) into the base weights and drop the LoRA layers.

    A Linear base keeps its dtype; a QuantizedLinear base is dequantised, summed in float32 and
    requantised with its own bits/group size, so the fused layer carries a fresh rounding error.
    The base layer objects are updated in place. (A DoRA layer sits right on the base, so its delta
    W' − W is taken against the unfused base weight.)"""
    fused = []
    for path, m in _outermost(model):
        deltas, base = [], m
        while isinstance(base, AdapterLinear):
            if base.enabled and base.scale != 0.0:
                deltas.append(base.delta())
            base = base.base
        if deltas:
            total = deltas[0]
            for d in deltas[1:]:
                total = total + d
            _add_to_weight(base, total)
        _set(model, path, base)
        fused.append(path)
    mx.eval(model.parameters())
    return fused


def _add_to_weight(layer, delta: mx.array) -> None:
    if isinstance(layer, nn.QuantizedLinear):
        mode = {"mode": layer.mode} if hasattr(layer, "mode") else {}
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, **mode)
        w = (w.astype(mx.float32) + delta).astype(layer.scales.dtype)
        layer.weight, layer.scales, *biases = mx.quantize(w, layer.group_size, layer.bits, **mode)
        layer.biases = biases[0] if biases else None
    elif isinstance(layer, nn.Linear):
        layer.weight = (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)
    else:
        raise LoRAError(f"cannot fuse a LoRA into a {type(layer).__name__}")


# ----------------------------------------------------------------------------------------------
# Model-level save / load


@dataclass
class LoadedLoRA:
    """What load_lora put into the model."""

    paths: list[str]
    rank: int
    alpha: float
    targets: str | None
    metadata: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def lora_weights(model) -> dict:
    """The trainable adapter of a model in file layout: {BFL module: LoRAWeights | DoRAWeights |
    LoKrWeights | LoHaWeights | SplitWeights} (whole-layer tensors, raw alpha). Layers loaded from a
    SplitWeights (several stacked parts on row ranges) give a SplitWeights again."""
    out, parts = {}, {}
    for path, m in lora_layers(model):
        if not m.trainable:
            continue
        name = _bfl_name(path)
        if m.split_part:
            parts.setdefault(name, []).append(m)
        else:
            out[name] = m.weights()
    for name, ms in parts.items():
        ms = sorted(ms, key=lambda m: m.out_start)
        out[name] = SplitWeights([((m.out_start, m.out_stop), m.part_weights()) for m in ms], ms[0].output_dims)
    return out


def save_lora(path: str | Path, model, format: str = "bfl", metadata: dict | None = None, dtype: mx.Dtype = mx.float32) -> Path:
    """Save the model's trainable adapter (any type: mflux2.lora_formats writes each). `metadata` (e.g.
    base_model, trigger_word, training_steps) is stored as strings next to rank, alpha and targets.
    Default layout: BFL names, `diffusion_model.` prefix, lora_A/lora_B, alpha folded into B
    (ai-toolkit; ComfyUI, diffusers and mflux read it); LoKr/LoHa/DoRA as lora_formats writes them."""
    weights = lora_weights(model)
    if not weights:
        raise LoRAError("the model has no trainable LoRA layers: call apply_lora or load_lora(trainable=True) first")
    meta = dict(metadata or {})
    targets = {m.targets for _, m in lora_layers(model) if m.trainable}
    meta.setdefault("targets", targets.pop() if len(targets) == 1 and None not in targets else "custom")
    if "base_model" not in meta and hasattr(model, "config"):
        meta["base_model"] = variant_of(model.config) or "custom"
    # DoRA in the bfl/kohya layouts is ComfyUI's dora_scale, relative to the base weight: the base
    # layers' weights, lazily (dequantised one layer at a time as the file's tensors are computed)
    base = {_bfl_name(p): _base_matrix(m.plain_base) for p, m in lora_layers(model) if m.trainable and isinstance(m, DoRALinear)}
    return write_lora(path, weights, format, meta, dtype, base=base or None)


def load_lora(model, path: str | Path, scale: float = 1.0, trainable: bool = False, strict: bool = True) -> LoadedLoRA:
    """Add a LoRA file to the model (any supported layout). Repeat for several LoRAs: each stacks on
    top with its own `scale`. `trainable=True` continues training it (restores rank, alpha, targets and
    the single-block ranges of mflux2's `attention` target). Unknown keys and layers this model lacks
    raise one line (strict) or are listed in a warning (strict=False); a shape mismatch always raises."""
    weights, metadata = read_lora(path, strict=strict, base=_ModelWeights(model))
    return load_adapters(model, weights, metadata, scale=scale, trainable=trainable, strict=strict, source=str(path))


class _ModelWeights:
    """{BFL module: its base weight in float32}, computed on demand (a DoRA file in the ComfyUI form,
    dora_scale, is relative to the base model's weights: mflux2.lora_formats reads it with these)."""

    def __init__(self, model):
        self.model = model

    def _plain(self, name):
        layer = _get(self.model, name)
        while isinstance(layer, AdapterLinear):
            layer = layer.base
        return layer if isinstance(layer, (nn.Linear, nn.QuantizedLinear)) else None

    def __contains__(self, name) -> bool:
        return self._plain(name) is not None

    def __getitem__(self, name) -> mx.array:
        return _base_matrix(self._plain(name))

    def get(self, name, default=None):
        return self[name] if name in self else default


def load_adapters(model, weights: dict, metadata: dict | None = None, scale: float = 1.0, trainable: bool = False,
                  strict: bool = True, source: str = "LoRA") -> LoadedLoRA:
    """Put {BFL module: weights of any type (mflux2.lora_formats)} into the model, as load_lora does
    with a file's. A SplitWeights becomes one layer per part, stacked, each on its row range."""
    metadata = dict(metadata or {})
    if trainable and any(m.trainable for _, m in lora_layers(model)):
        raise LoRAError("the model already has a trainable LoRA: call remove_lora(model) first")
    absent = [k for k in weights if _get(model, k) is None]
    _report(source, absent, strict, "LoRA layer(s) absent from this model", "a LoRA for another FLUX.2 variant?")
    targets = metadata.get("targets") if metadata.get("software") == "mflux2" else None
    spec = target_spec(model, targets) if trainable and targets in TARGETS else {}
    placed = []
    for name, w in weights.items():
        layer = _get(model, name)
        if layer is None:
            continue
        n_in, n_out = _dims(layer)
        if tuple(w.shape) != (n_out, n_in):
            raise LoRAError(f"{source}: shape mismatch for {name}: LoRA delta {tuple(w.shape)}, "
                            f"model layer ({n_out}, {n_in}) — a LoRA for another model?")
        kw = dict(scale=scale, trainable=trainable, targets=targets if trainable else None, source=source, name=name)
        if isinstance(w, SplitWeights):
            for (r0, r1), part in w.parts:
                cls = ADAPTERS[WEIGHTS_TYPES[type(part)]]
                layer = cls.from_part(layer, part, (r0, r1), **kw)
        else:
            out_range, in_range = spec.get(name, (None, None))
            layer = ADAPTERS[WEIGHTS_TYPES[type(w)]].from_weights(layer, w, out_range=out_range, in_range=in_range, **kw)
        cur = layer
        while isinstance(cur, AdapterLinear):
            if not trainable:
                cur.freeze()
            cur = cur.base
        _set(model, name, layer)
        placed.append(name)
    if trainable:
        freeze_for_lora(model)
    mx.eval([m.parameters() for _, m in lora_layers(model)])
    common = lambda values: Counter(values).most_common(1)[0][0] if placed else 0  # noqa: E731
    return LoadedLoRA(placed, common(weights[k].rank or 0 for k in placed),
                      float(common(getattr(weights[k], "alpha", None) or 0 for k in placed)), targets, metadata, absent)
