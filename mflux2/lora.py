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

from mflux2.lora_formats import LoRAError, LoRAWeights, _report, read_lora, write_lora
from mflux2.models.transformer import variant_of
from mflux2.ops import linear


# ----------------------------------------------------------------------------------------------
# The layer


def _dims(layer) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear, QuantizedLinear or LoRALinear."""
    if isinstance(layer, LoRALinear):
        return layer.input_dims, layer.output_dims
    if isinstance(layer, nn.QuantizedLinear):
        out, packed = layer.weight.shape
        return packed * 32 // layer.bits, out
    if isinstance(layer, nn.Linear):
        out, n_in = layer.weight.shape
        return n_in, out
    raise LoRAError(f"LoRA needs a Linear layer, got {type(layer).__name__}")


class LoRALinear(nn.Module):
    """y = base(x) + scale · (alpha / rank) · B(A(dropout(x))).

    lora_A [rank, in] starts Kaiming-uniform like PEFT (bound 1/sqrt(in)), lora_B [out, rank] starts
    at zero, both float32; the two small matmuls run in x's dtype. `out_start/out_stop` restrict the
    LoRA to a row range of the output (the q/k/v rows of single_blocks.linear1) and
    `in_start/in_stop` to a column range of the input (the attention columns of linear2): outside
    the ranges the delta is exactly zero. `enabled` and `scale` are plain Python values read when the
    forward runs (or is traced by mx.compile)."""

    def __init__(self, base, rank: int, alpha: float | None = None, dropout: float = 0.0, scale: float = 1.0,
                 out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None,
                 trainable: bool = True, targets: str | None = None):
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
        self.dropout = nn.Dropout(dropout)
        bound = 1.0 / math.sqrt(self.in_stop - self.in_start)  # kaiming_uniform_(a=sqrt(5)) as in PEFT
        self.lora_A = mx.random.uniform(-bound, bound, (self.rank, self.in_stop - self.in_start))
        self.lora_B = mx.zeros((self.out_stop - self.out_start, self.rank))
        self.train(base.training)  # dropout follows the wrapped model's train/eval mode

    @property
    def restricted(self) -> bool:
        return (self.out_start, self.out_stop, self.in_start, self.in_stop) != (0, self.output_dims, 0, self.input_dims)

    def __call__(self, x):
        # The delta enters the base GEMM as its accumulator (and a quantized base is dequantised
        # right before it at training token counts): mflux2.ops.linear.
        return linear(self, x)

    def lora_forward(self, x):
        """The delta for this layer's input columns x [..., in_stop - in_start] over its output
        rows: scale · (alpha / rank) · B(A(dropout(x))), in x's dtype."""
        return self.lora_up(self.lora_down(x))

    def lora_down(self, x):
        """A(dropout(x)) [..., rank], in x's dtype: shared by every output part (mflux2.ops.linear_split)."""
        return self._dropout(x) @ self.lora_A.astype(x.dtype).T

    def lora_up(self, h, rows: tuple[int, int] | None = None):
        """scale · (alpha / rank) · B h for the LoRA's output rows `rows` (relative to out_start;
        None: all of them), in h's dtype."""
        # alpha/rank·scale folded into the small B before the cast; gradients reach the float32 params.
        b = (self.lora_B * (self.scale * self.alpha / self.rank)).astype(h.dtype)
        return h @ (b if rows is None else b[rows[0] : rows[1]]).T

    def _dropout(self, x):
        p = self.dropout.p if hasattr(self.dropout, "p") else 1 - self.dropout._p_1
        if not (_DROPOUT_KEYS and self.training and p > 0):
            return self.dropout(x)  # mx.random's global state
        key, _DROPOUT_KEYS[-1] = mx.random.split(_DROPOUT_KEYS[-1])
        mask = mx.random.bernoulli(1 - p, x.shape, key=key)
        return (mask * x) * (1 / (1 - p))  # as nn.Dropout

    def full_factors(self) -> tuple[mx.array, mx.array]:
        """(A [rank, in], B [out, rank]) over the whole layer, zero outside the ranges (file layout)."""
        a, b = self.lora_A, self.lora_B
        if (self.in_start, self.in_stop) != (0, self.input_dims):
            a = mx.pad(a, [(0, 0), (self.in_start, self.input_dims - self.in_stop)])
        if (self.out_start, self.out_stop) != (0, self.output_dims):
            b = mx.pad(b, [(self.out_start, self.output_dims - self.out_stop), (0, 0)])
        return a, b

    def delta(self, with_scale: bool = True) -> mx.array:
        """The dense weight change [out, in] in float32: (scale·)alpha/rank · B @ A."""
        a, b = self.full_factors()
        s = self.alpha / self.rank * (self.scale if with_scale else 1.0)
        return (b.astype(mx.float32) @ a.astype(mx.float32)) * s

    def _extra_repr(self):
        ranges = f", out={self.out_start}:{self.out_stop}, in={self.in_start}:{self.in_stop}" if self.restricted else ""
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}, enabled={self.enabled}{ranges}"


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


def lora_layers(model) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its path (stacked ones appear as `<path>.base`)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def _outermost(model) -> list[tuple[str, LoRALinear]]:
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


def apply_lora(model, rank: int, alpha: float | None = None, targets: str = "attention", dropout: float = 0.0) -> list[str]:
    """Wrap the target layers in trainable LoRALinear layers, freeze everything else; returns the paths.
    A and B are drawn from mx.random: seed it first for a reproducible start."""
    spec = target_spec(model, targets)
    if any(m.trainable for _, m in lora_layers(model)):
        raise LoRAError("the model already has a trainable LoRA: call remove_lora(model) first")
    for path, (out_range, in_range) in spec.items():
        layer = _get(model, path)
        _set(model, path, LoRALinear(layer, rank, alpha, dropout, 1.0, out_range, in_range, trainable=True, targets=targets))
    freeze_for_lora(model)
    return list(spec)


def freeze_for_lora(model) -> None:
    """Freeze the model, then unfreeze only the A/B of trainable LoRA layers."""
    model.freeze()
    for _, m in lora_layers(model):
        if m.trainable:
            m.unfreeze(recurse=False, keys=["lora_A", "lora_B"])


def lora_parameters(model) -> dict:
    """The trainable LoRA parameters as a tree shaped like model.parameters()."""
    flat = [(f"{p}.{k}", getattr(m, k)) for p, m in lora_layers(model) if m.trainable for k in ("lora_A", "lora_B")]
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
    """Replace every LoRALinear (stacked ones too) by its original base layer; returns the paths."""
    removed = []
    for path, m in _outermost(model):
        base = m
        while isinstance(base, LoRALinear):
            base = base.base
        _set(model, path, base)
        removed.append(path)
    return removed


unload = remove_lora


def fuse_lora(model) -> list[str]:
    """Add every enabled LoRA delta (with its scale) into the base weights and drop the LoRA layers.

    A Linear base keeps its dtype; a QuantizedLinear base is dequantised, summed in float32 and
    requantised with its own bits/group size, so the fused layer carries a fresh rounding error.
    The base layer objects are updated in place."""
    fused = []
    for path, m in _outermost(model):
        deltas, base = [], m
        while isinstance(base, LoRALinear):
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


def lora_weights(model) -> dict[str, LoRAWeights]:
    """The trainable LoRA of a model in file layout (whole-layer A/B, raw alpha)."""
    out = {}
    for path, m in lora_layers(model):
        if m.trainable:
            a, b = m.full_factors()
            out[_bfl_name(path)] = LoRAWeights(a, b, m.alpha)
    return out


def save_lora(path: str | Path, model, format: str = "bfl", metadata: dict | None = None, dtype: mx.Dtype = mx.float32) -> Path:
    """Save the model's trainable LoRA. `metadata` (e.g. base_model, trigger_word, training_steps) is
    stored as strings next to rank, alpha and targets. Default layout: BFL names, `diffusion_model.`
    prefix, lora_A/lora_B, alpha folded into B (ai-toolkit; ComfyUI, diffusers and mflux read it)."""
    weights = lora_weights(model)
    if not weights:
        raise LoRAError("the model has no trainable LoRA layers: call apply_lora or load_lora(trainable=True) first")
    meta = dict(metadata or {})
    targets = {m.targets for _, m in lora_layers(model) if m.trainable}
    meta.setdefault("targets", targets.pop() if len(targets) == 1 and None not in targets else "custom")
    if "base_model" not in meta and hasattr(model, "config"):
        meta["base_model"] = variant_of(model.config) or "custom"
    return write_lora(path, weights, format, meta, dtype)


def load_lora(model, path: str | Path, scale: float = 1.0, trainable: bool = False, strict: bool = True) -> LoadedLoRA:
    """Add a LoRA file to the model (any supported layout). Repeat for several LoRAs: each stacks on
    top with its own `scale`. `trainable=True` continues training it (restores rank, alpha, targets and
    the single-block ranges of mflux2's `attention` target). Unknown keys and layers this model lacks
    raise one line (strict) or are listed in a warning (strict=False); a shape mismatch always raises."""
    weights, metadata = read_lora(path, strict=strict)
    if trainable and any(m.trainable for _, m in lora_layers(model)):
        raise LoRAError("the model already has a trainable LoRA: call remove_lora(model) first")
    absent = [k for k in weights if _get(model, k) is None]
    _report(path, absent, strict, "LoRA layer(s) absent from this model", "a LoRA for another FLUX.2 variant?")
    targets = metadata.get("targets") if metadata.get("software") == "mflux2" else None
    spec = target_spec(model, targets) if trainable and targets in TARGETS else {}
    placed = []
    for name, w in weights.items():
        layer = _get(model, name)
        if layer is None:
            continue
        n_in, n_out = _dims(layer)
        if (w.B.shape[0], w.A.shape[1]) != (n_out, n_in):
            raise LoRAError(f"{path}: shape mismatch for {name}: LoRA delta ({w.B.shape[0]}, {w.A.shape[1]}), "
                            f"model layer ({n_out}, {n_in}) — a LoRA for another model?")
        a, b = w.A, w.B
        out_range, in_range = spec.get(name, (None, None))
        if out_range:
            b = _inside(b, 0, out_range, path, name)
        if in_range:
            a = _inside(a, 1, in_range, path, name)
        lora = LoRALinear(layer, w.rank, w.alpha, 0.0, scale, out_range, in_range, trainable=trainable,
                          targets=targets if trainable else None)
        lora.lora_A, lora.lora_B = a.astype(mx.float32), b.astype(mx.float32)
        if not trainable:
            lora.freeze()
        _set(model, name, lora)
        placed.append(name)
    if trainable:
        freeze_for_lora(model)
    mx.eval([m.parameters() for _, m in lora_layers(model)])
    common = lambda values: Counter(values).most_common(1)[0][0] if placed else 0  # noqa: E731
    return LoadedLoRA(placed, common(weights[k].rank for k in placed), float(common(weights[k].alpha for k in placed)),
                      targets, metadata, absent)


def _inside(x: mx.array, axis: int, rng: tuple[int, int], path, name) -> mx.array:
    """Slice a factor to the LoRA's range; what lies outside must be zero (the file pads it)."""
    lo, hi = rng
    outside = mx.concatenate([x[:lo], x[hi:]], axis=0) if axis == 0 else mx.concatenate([x[:, :lo], x[:, hi:]], axis=1)
    if outside.size and mx.any(outside != 0).item():
        raise LoRAError(f"{path}: {name} changes weights outside its 'attention' range {lo}:{hi}; load it with trainable=False")
    return x[lo:hi] if axis == 0 else x[:, lo:hi]
