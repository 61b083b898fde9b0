"""`lora.init_from`: start a new run from an existing adapter's weights.

The file's factors replace the fresh LoRA's (A Kaiming-uniform, B zero) before the first step; the
optimiser state and the step count start fresh, as ai-toolkit's `network.pretrained_lora_path`
does. A run that resumes from a checkpoint ignores it: the checkpoint holds the weights trained
from it, and loading the file again would throw that training away. The file must be the adapter
the `lora:` section describes — same type (lora, dora, lokr, loha), rank (LoKr: factor and
decompose_both) and target layers, each parameter the shape the layer has — else one line names
the first layer and parameter that differ; a different alpha is fine: the factor carrying the
scale is rescaled so the file's ΔW is exactly what training starts from. docs/lora.md ("Starting from an existing adapter").
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mflux2.lora_formats import LoRAError

def resolve(spec: str, local_only: bool = False) -> Path | None:
    """The adapter file `spec` names (mflux2.lora_formats.resolve_lora_file, as --lora: a file, a
    folder, an mflux2 output folder, a hub repo or a file in one); `local_only` (the dry run): the
    Hugging Face cache only, None when the file is not there."""
    from mflux2.lora_formats import resolve_lora_file

    return resolve_lora_file(spec, label="lora.init_from", local_only=local_only)


def read(path: Path, source, spec: str) -> dict:
    """The file's {BFL module: weights}. A DoRA in ComfyUI's form (dora_scale relative to the base
    weights) is read against the model's stored weights (`source`'s transformer files, read only
    for such a file); the run reads it again against the loaded model's own (`reread`)."""
    from mflux2.lora_formats import read_lora

    return read_lora(path, base=_StoredBase(source, spec))[0]


def read_checked(path: Path, source, lora_cfg, spec: str) -> dict:
    """The file's layers, checked against the `lora:` section and the model `source` before anything
    loads: what the run and the dry run both do (one line naming the first mismatch)."""
    from mflux2.training.memory import _source_config

    weights = read(path, source, spec)
    check(weights, expected_layers(_source_config(source), lora_cfg.target_layers), lora_cfg, spec)
    return weights


def reread(model, path: Path, weights: dict) -> dict:
    """A file with DoRA layers read again against the loaded model's own base weights (a quantized
    base differs from the stored one), as load_lora reads it."""
    from mflux2.lora import _ModelWeights
    from mflux2.lora_formats import read_lora

    if not any(w.type == "dora" for w in weights.values()):
        return weights
    return read_lora(path, base=_ModelWeights(model))[0]


class _StoredBase:
    """{BFL module: float32 weight} of the source model's transformer files, opened on first use."""

    def __init__(self, source, spec):
        self.source, self.spec, self.files = source, spec, None

    def _open(self):
        if self.files is None:
            root = getattr(self.source, "root", None)
            if root is None:
                raise LoRAError(f"lora.init_from {self.spec}: a DoRA file in ComfyUI's form (dora_scale) is read against the "
                                "base model's weights, which are not downloaded yet: download the model first")
            from mflux2.lora_tools import TransformerFiles

            self.files = TransformerFiles(root).as_base()
        return self.files

    def __contains__(self, name) -> bool:
        return name in self._open()

    def __getitem__(self, name):
        return self._open()[name]


def expected_layers(config, targets: str) -> dict[str, tuple[tuple[int, int], tuple | None, tuple | None]]:
    """{BFL module: ((out, in), output row range, input column range)} of the LoRA that `targets`
    puts on a transformer of `config`, from a lazily built model (no weight is allocated)."""
    from mflux2.lora import _dims, _get, target_spec
    from mflux2.models.transformer import Flux2Transformer

    model = Flux2Transformer(config)
    out = {}
    for name, (out_range, in_range) in target_spec(model, targets).items():
        n_in, n_out = _dims(_get(model, name))
        out[name] = ((n_out, n_in), out_range, in_range)
    return out


def _knobs(lora_cfg) -> str:
    t = getattr(lora_cfg, "type", "lora")
    extra = f", factor {lora_cfg.factor}, decompose_both {lora_cfg.decompose_both}" if t == "lokr" else ""
    return f"lora.type {t}, rank {lora_cfg.rank}{extra}"


def file_shapes(lora_cfg, shape, out_range, in_range) -> tuple[dict, tuple[int, int]]:
    """({parameter: shape in the file's whole-layer layout}, LoKr's W2 (o2, i2) or (1, 1)) of the
    adapter the lora: section puts on a layer of `shape` with these ranges: the layer's own
    parameters (mflux2.lora.adapter_shapes on the block) with the row / column axes widened to the
    whole layer, as the file pads them (LoKr's W1 in units of W2's rows / columns)."""
    from mflux2.lora import adapter_shapes

    t = getattr(lora_cfg, "type", "lora")
    n_out, n_in = shape
    lo, hi = out_range or (0, n_out)
    li, hi_in = in_range or (0, n_in)
    sub = adapter_shapes(t, hi - lo, hi_in - li, lora_cfg.rank, getattr(lora_cfg, "factor", -1), getattr(lora_cfg, "decompose_both", False))
    o2, i2 = 1, 1
    if t == "lokr":
        o2, i2 = sub.get("lokr_w2") or (sub["lokr_w2_a"][0], sub["lokr_w2_b"][1])
    out = {}
    for k, s in sub.items():
        s = list(s)
        if _ROWS.get(k):  # the rows axis: whole layer
            s[0] = n_out // o2
        if _COLS.get(k):
            s[-1] = n_in // i2
        out[k] = tuple(s)
    return out, (o2, i2)


# The file tensors whose rows / columns are the layer's (zero outside a range; LoKr's W1 in units of W2)
_ROWS = {"lora_B": True, "magnitude": True, "hada_w1_a": True, "hada_w2_a": True, "lokr_w1": True, "lokr_w1_a": True}
_COLS = {"lora_A": True, "hada_w1_b": True, "hada_w2_b": True, "lokr_w1": True, "lokr_w1_b": True}
# what must be zero outside a range (the rest is sliced: the delta is zero there anyway), as lora.py's from_weights
_ZERO_OUTSIDE_ROWS = ("lora_B", "hada_w1_a", "lokr_w1", "lokr_w1_a")
_ZERO_OUTSIDE_COLS = ("lora_A", "hada_w1_b", "lokr_w1", "lokr_w1_b")


def check(weights: dict, expected: dict, lora_cfg, source) -> None:
    """One line naming the first layer (in model order), and parameter, where the file and the
    `lora:` section differ: the layer set, the type, rank, each parameter's shape, and nothing
    outside a range-restricted layer's rows / columns."""
    from mflux2.lora import adapter_arrays
    from mflux2.lora_formats import SplitWeights

    want_type = getattr(lora_cfg, "type", "lora")
    where = f"lora.init_from {source}"
    for name in list(expected) + sorted((n for n in weights if n not in expected), key=_natural):  # model order
        if name not in weights:
            raise LoRAError(f"{where}: layer {name} is in lora.target_layers {lora_cfg.target_layers!r} but not in the file "
                            f"({len(weights)} layer(s)) — set target_layers to what the file was trained with")
        if name not in expected:
            raise LoRAError(f"{where}: layer {name} is in the file but not in lora.target_layers {lora_cfg.target_layers!r} "
                            "— set target_layers to what the file was trained with")
    for name in expected:
        w, (shape, out_range, in_range) = weights[name], expected[name]
        if w.type != want_type:
            raise LoRAError(f"{where}: layer {name} is a {w.type} adapter, lora.type is {want_type} — set lora.type to the file's")
        if isinstance(w, SplitWeights):
            raise LoRAError(f"{where}: layer {name} holds {len(w.parts)} adapters on row ranges (q/k/v trained apart); "
                            "lora.init_from starts from one adapter per layer, as mflux2 trains them")
        if tuple(w.shape) != tuple(shape):
            raise LoRAError(f"{where}: shape mismatch for {name}: file {tuple(w.shape)}, model {tuple(shape)} — a LoRA for another model?")
        if want_type != "lokr" and w.rank != lora_cfg.rank:
            raise LoRAError(f"{where}: layer {name} has rank {w.rank}, lora.rank is {lora_cfg.rank}")
        want, (o2, i2) = file_shapes(lora_cfg, shape, out_range, in_range)
        got = {k: tuple(v.shape) for k, v in adapter_arrays(w).items()}
        if set(got) != set(want):
            raise LoRAError(f"{where}: layer {name} has {', '.join(sorted(got))} in the file, the lora: section ({_knobs(lora_cfg)}) "
                            f"gives {', '.join(sorted(want))} — set lora.rank / factor / decompose_both to the file's")
        for k in want:
            if got[k] != want[k]:
                raise LoRAError(f"{where}: layer {name}: {k} is {got[k]} in the file, the lora: section ({_knobs(lora_cfg)}) "
                                f"gives {want[k]} — set lora.rank / factor / decompose_both to the file's")
        arrays = adapter_arrays(w)
        for names, axis, rng, unit in ((_ZERO_OUTSIDE_ROWS, 0, out_range, o2), (_ZERO_OUTSIDE_COLS, 1, in_range, i2)):
            for k in (k for k in names if k in arrays and rng is not None):
                x = arrays[k]
                if _outside(x, axis if x.ndim > 1 else 0, (rng[0] // unit, rng[1] // unit)):
                    raise LoRAError(f"{where}: {name} changes weights outside lora.target_layers {lora_cfg.target_layers!r}'s "
                                    f"range {rng[0]}:{rng[1]} ({k}) — the file was trained with target_layers all?")


def _outside(x: mx.array, axis: int, rng) -> bool:
    lo, hi = rng
    rest = mx.concatenate([x[:lo], x[hi:]], axis=0) if axis == 0 else mx.concatenate([x[:, :lo], x[:, hi:]], axis=1)
    return bool(rest.size and mx.any(rest != 0).item())


# The parameter that carries each type's scale (ΔW is linear in it): rescaled when alphas differ
_SCALED = {"lora": ("lora_B",), "dora": ("lora_B",), "loha": ("hada_w2_a",), "lokr": ("lokr_w1", "lokr_w1_a")}


def _unit_scale(layer) -> float:
    return layer.kron_scale if layer.type == "lokr" else layer.alpha / layer.rank


def apply(model, weights: dict) -> None:
    """Put the file's adapter into the model's trainable adapter layers (after `apply_lora`, checked
    by `check`). Each layer's parameters come from the type's own `from_weights` (its range slicing,
    DoRA's magnitude) on the same base and ranges, then replace the fresh ones; the layer keeps the
    configured alpha, dropout and knobs, and the factor carrying the scale is rescaled by file
    scale / configured scale, so the delta is the file's exactly."""
    from mflux2.lora import ADAPTERS, AdapterLinear, _get

    for name, w in weights.items():
        layer = _get(model, name)
        if not isinstance(layer, AdapterLinear) or not layer.trainable or layer.type != w.type:
            raise LoRAError(f"lora.init_from: {name} has no trainable {w.type} layer in the model")
        ranges = lambda lo, hi, n: None if (lo, hi) == (0, n) else (lo, hi)  # noqa: E731
        loaded = ADAPTERS[layer.type].from_weights(layer.base, w, out_range=ranges(layer.out_start, layer.out_stop, layer.output_dims),
                                                   in_range=ranges(layer.in_start, layer.in_stop, layer.input_dims),
                                                   source="lora.init_from", name=name)
        if set(loaded.param_names()) != set(layer.param_names()):
            raise LoRAError(f"lora.init_from: {name}: the file gives {', '.join(loaded.param_names())}, "
                            f"the layer has {', '.join(layer.param_names())}")
        ratio = _unit_scale(loaded) / _unit_scale(layer)
        for k in layer.param_names():
            if loaded[k].shape != layer[k].shape:
                raise LoRAError(f"lora.init_from: {name}: {k} is {tuple(loaded[k].shape)} in the file, {tuple(layer[k].shape)} in the layer")
            layer[k] = (loaded[k] * ratio if k in _SCALED[layer.type] else loaded[k]).astype(mx.float32)
    mx.eval([_get(model, n).parameters() for n in weights])


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
