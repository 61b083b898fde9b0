"""LoRA files, independent of any model: {BFL module: LoRAWeights(A, B, alpha)} <-> safetensors.

Read in every common layout (ai-toolkit/BFL, diffusers/PEFT, kohya/musubi, mflux2's own), written in
three (`FORMATS`), converted between them without a model (`convert_lora`). Module names map through
one table per naming scheme to BFL's, which are the transformer's own (`double_blocks.0.img_attn.qkv`,
`single_blocks.3.linear1`, ...); split q/k/v are fused into one pair. Putting the weights into a
model is `mflux2.lora` (`load_lora`, `save_lora`). The rules for names, alpha and fused q/k/v are in
docs/lora.md; the sources are in docs/architecture.md ("Weight layouts", "LoRA file conventions").
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

import mlx.core as mx

from mflux2.weights import WeightsError

FORMATS = ("bfl", "diffusers", "kohya")


class LoRAError(WeightsError):
    """A LoRA file or request does not fit the model. The message is one line."""


# ----------------------------------------------------------------------------------------------
# Names. One table per naming scheme, `{i}` = block index; kohya names are the same with '.' -> '_'.

_BFL_NAMES = [
    "double_blocks.{i}.img_attn.qkv", "double_blocks.{i}.img_attn.proj", "double_blocks.{i}.img_mlp.0",
    "double_blocks.{i}.img_mlp.2", "double_blocks.{i}.txt_attn.qkv", "double_blocks.{i}.txt_attn.proj",
    "double_blocks.{i}.txt_mlp.0", "double_blocks.{i}.txt_mlp.2", "single_blocks.{i}.linear1", "single_blocks.{i}.linear2",
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
]
# diffusers module -> (BFL module, part): part 0/1/2 = q/k/v rows of a fused qkv; "swap" = the final
# adaLN whose output halves are [scale; shift] in diffusers but [shift; scale] in BFL.
_DIFFUSERS_NAMES = {
    "transformer_blocks.{i}.attn.to_q": ("double_blocks.{i}.img_attn.qkv", 0),
    "transformer_blocks.{i}.attn.to_k": ("double_blocks.{i}.img_attn.qkv", 1),
    "transformer_blocks.{i}.attn.to_v": ("double_blocks.{i}.img_attn.qkv", 2),
    "transformer_blocks.{i}.attn.add_q_proj": ("double_blocks.{i}.txt_attn.qkv", 0),
    "transformer_blocks.{i}.attn.add_k_proj": ("double_blocks.{i}.txt_attn.qkv", 1),
    "transformer_blocks.{i}.attn.add_v_proj": ("double_blocks.{i}.txt_attn.qkv", 2),
    "transformer_blocks.{i}.attn.to_out.0": ("double_blocks.{i}.img_attn.proj", None),
    "transformer_blocks.{i}.attn.to_add_out": ("double_blocks.{i}.txt_attn.proj", None),
    "transformer_blocks.{i}.ff.linear_in": ("double_blocks.{i}.img_mlp.0", None),
    "transformer_blocks.{i}.ff.linear_out": ("double_blocks.{i}.img_mlp.2", None),
    "transformer_blocks.{i}.ff_context.linear_in": ("double_blocks.{i}.txt_mlp.0", None),
    "transformer_blocks.{i}.ff_context.linear_out": ("double_blocks.{i}.txt_mlp.2", None),
    "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj": ("single_blocks.{i}.linear1", None),
    "single_transformer_blocks.{i}.attn.to_out": ("single_blocks.{i}.linear2", None),
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_guidance_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_guidance_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", None),
    "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", None),
    "single_stream_modulation.linear": ("single_stream_modulation.lin", None),
    "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
}


def _pattern(template: str, sep: str = ".") -> re.Pattern:
    return re.compile("^" + re.escape(template.replace(".", sep)).replace(r"\{i\}", r"(\d+)") + "$")


# (regex, BFL template, part); dotted names first, then their kohya underscore forms.
_NAME_RULES = (
    [(_pattern(t), t, None) for t in _BFL_NAMES]
    + [(_pattern(d), b, part) for d, (b, part) in _DIFFUSERS_NAMES.items()]
    + [(_pattern(t, "_"), t, None) for t in _BFL_NAMES]
    + [(_pattern(d, "_"), b, part) for d, (b, part) in _DIFFUSERS_NAMES.items()]
)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
             "lora_unet_", "lora_transformer_", "lycoris_")
# <module>.<kind>: LoRA/DoRA matrices with `.weight` (PEFT may put its adapter name before it), the
# magnitude with or without, LyCORIS's own tensors (lokr_*, hada_*, dora_scale, alpha) without.
_KEY = re.compile(r"^(?P<mod>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up|lora_magnitude_vector)(?:\.(?!weight$|bias$)[^.]+)?"
                  r"(?:\.weight)?|(?P<kind2>alpha|dora_scale|lokr_w[12](?:_[ab])?|hada_w[12]_[ab]))$")


def bfl_module(module: str) -> tuple[str, int | str | None] | None:
    """File module name (any prefix, dotted or kohya; a model's or an adapter's) -> (BFL module, part):
    part None for a whole module, 0/1/2 for the q/k/v rows of a fused qkv stored apart, "swap" for the final
    adaLN stored as [scale; shift]; None for a name that is no FLUX.2 transformer linear layer."""
    for p in _PREFIXES:
        if module.startswith(p):
            module = module[len(p) :]
            break
    for rx, template, part in _NAME_RULES:
        m = rx.match(module)
        if m:
            return template.replace("{i}", m.group(1)) if m.groups() else template, part
    return None


def _from_bfl(name: str) -> tuple[str, str]:
    """BFL module -> (template, block index or '')."""
    for t in _BFL_NAMES:
        m = _pattern(t).match(name)
        if m:
            return t, (m.group(1) if m.groups() else "")
    raise LoRAError(f"{name!r} is not a FLUX.2 transformer linear layer")


# ----------------------------------------------------------------------------------------------
# LoRA weights independent of the model: {BFL module: LoRAWeights}


# One class per adapter type, each with the tensors a file holds and `delta(base)`: the dense change
# [out, in] in float32 that the adapter makes to a layer whose weight is `base` (only DoRA reads it).
# The maths and the file keys of each type are in docs/lora.md.


@dataclass
class LoRAWeights:
    """ΔW = alpha / rank · B A."""

    A: mx.array  # [rank, in] (lora_A / lora_down)
    B: mx.array  # [out, rank] (lora_B / lora_up)
    alpha: float  # the effective scale is alpha / rank
    type: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the layer it adapts."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self, base: mx.array | None = None) -> mx.array:
        return (self.B.astype(mx.float32) @ self.A.astype(mx.float32)) * (self.alpha / self.rank)


@dataclass
class DoRAWeights(LoRAWeights):
    """W' = m · V / ‖V‖ with V = W + alpha / rank · B A, the norm over each output row (PEFT's
    `lora_magnitude_vector`, LyCORIS/ComfyUI's `dora_scale`); ΔW = W' − W needs the base W."""

    magnitude: mx.array | None = None  # m [out]
    type: ClassVar[str] = "dora"

    def delta(self, base: mx.array | None = None) -> mx.array:
        if base is None:
            raise LoRAError("a DoRA delta needs the base layer's weight")
        w = base.astype(mx.float32)
        v = w + super().delta()
        norm = mx.linalg.norm(v, axis=1, keepdims=True)
        return self.magnitude.astype(mx.float32).reshape(-1, 1) * v / norm - w


@dataclass
class LoKrWeights:
    """ΔW = scale · kron(W1, W2); each half whole (`lokr_w1`) or a low-rank product (`lokr_w1_a @
    lokr_w1_b`). scale = alpha / rank where a half is factored (rank = that factor's inner size),
    1 when both halves are whole (the stored alpha is then ignored, as LyCORIS and ComfyUI do)."""

    w1: mx.array | None = None  # [out_1, in_1]
    w1_a: mx.array | None = None  # [out_1, rank]
    w1_b: mx.array | None = None  # [rank, in_1]
    w2: mx.array | None = None  # [out_2, in_2]
    w2_a: mx.array | None = None
    w2_b: mx.array | None = None
    alpha: float | None = None
    type: ClassVar[str] = "lokr"

    def __post_init__(self):
        for half in ("w1", "w2"):
            whole, a, b = getattr(self, half), getattr(self, half + "_a"), getattr(self, half + "_b")
            if (whole is None) == (a is None or b is None):
                raise LoRAError(f"a LoKr layer needs lokr_{half} or both lokr_{half}_a and lokr_{half}_b")

    def half(self, i: int) -> mx.array:
        """W1 or W2 in float32."""
        whole, a, b = (self.w1, self.w1_a, self.w1_b) if i == 1 else (self.w2, self.w2_a, self.w2_b)
        return whole.astype(mx.float32) if whole is not None else a.astype(mx.float32) @ b.astype(mx.float32)

    @property
    def rank(self) -> int | None:
        """The factored halves' inner size; None when both halves are whole."""
        for b in (self.w1_b, self.w2_b):
            if b is not None:
                return b.shape[0]
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        return 1.0 if r is None or self.alpha is None else self.alpha / r

    @property
    def shape(self) -> tuple[int, int]:
        (o1, i1), (o2, i2) = self.half(1).shape, self.half(2).shape
        return o1 * o2, i1 * i2

    def delta(self, base: mx.array | None = None) -> mx.array:
        w1, w2 = self.half(1), self.half(2)
        (o1, i1), (o2, i2) = w1.shape, w2.shape
        kron = (w1[:, None, :, None] * w2[None, :, None, :]).reshape(o1 * o2, i1 * i2)
        return kron * self.scale


@dataclass
class LoHaWeights:
    """ΔW = alpha / rank · (w1_a w1_b) ⊙ (w2_a w2_b)."""

    w1_a: mx.array  # [out, rank] (hada_w1_a)
    w1_b: mx.array  # [rank, in]
    w2_a: mx.array
    w2_b: mx.array
    alpha: float
    type: ClassVar[str] = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def delta(self, base: mx.array | None = None) -> mx.array:
        f = lambda x: x.astype(mx.float32)  # noqa: E731
        return (f(self.w1_a) @ f(self.w1_b)) * (f(self.w2_a) @ f(self.w2_b)) * (self.alpha / self.rank)


@dataclass
class SplitWeights:
    """Adapters on row ranges of one fused layer: LyCORIS's LoKr/LoHa on diffusers' to_q/to_k/to_v
    land on the q, k and v rows of BFL's fused qkv, and a kron or Hadamard product of three cannot
    be rewritten as one. Rows no part covers are unchanged."""

    parts: list  # [((row_start, row_stop), weights of any type above)]
    out: int  # the fused layer's rows

    @property
    def type(self) -> str:
        return self.parts[0][1].type

    @property
    def rank(self):
        return self.parts[0][1].rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.out, self.parts[0][1].shape[1]

    def delta(self, base: mx.array | None = None) -> mx.array:
        d = mx.zeros(self.shape)
        for (r0, r1), w in self.parts:
            d[r0:r1] = w.delta(None if base is None else base[r0:r1])
        return d


AdapterWeights = LoRAWeights | DoRAWeights | LoKrWeights | LoHaWeights | SplitWeights


def _peft_alphas(metadata: dict) -> tuple[float | None, dict, bool]:
    """lora_alpha, alpha_pattern and use_rslora from diffusers' `lora_adapter_metadata` JSON."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise LoRAError("safetensors metadata 'lora_adapter_metadata' is not valid JSON") from None
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    return cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}, bool(cfg.get("use_rslora"))


def _pattern_alpha(module: str, patterns: dict) -> float | None:
    for pat, a in patterns.items():  # PEFT: a pattern matches the module name or its dotted suffix
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            return a
    return None


_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
def scaled_delta(w, scale: float, base: mx.array | None = None) -> mx.array:
    """The change [out, in] (float32) an adapter loaded at `scale` makes to a layer whose weight is
    `base`: what mflux2.lora's layers compute at generation (load_lora(scale=...)), so a merge
    agrees with them. scale · ΔW for LoRA, LoKr and LoHa; DoRA puts the scale on B A inside the
    norm, as PEFT's adapter scale does: m · (W + scale·s·B A) / ‖W + scale·s·B A‖ − W (not
    scale · ΔW_DoRA); scale 0 is no change at all (the layer is skipped)."""
    if scale == 0.0:
        return mx.zeros(w.shape)
    if isinstance(w, SplitWeights):
        d = mx.zeros(w.shape)
        for (r0, r1), p in w.parts:
            d[r0:r1] = scaled_delta(p, scale, None if base is None else base[r0:r1])
        return d
    if isinstance(w, DoRAWeights):
        return replace(w, B=w.B * scale).delta(base)
    return w.delta(base) * scale


# mflux2's ComfyUI form of DoRA: dora_scale relative to the base weight's row norms (see _comfy_dora_scale)
_DORA_BASE_RELATIVE = "dora_scale_relative_to_base"


def _adapter(g: dict, source: str, rank_alpha) -> object:
    """The tensors of one file module -> weights of the right class (LoRA, DoRA, LoKr, LoHa)."""
    f = lambda k: g[k].astype(mx.float32)  # noqa: E731
    alpha = float(g["alpha"].astype(mx.float32).reshape(-1)[0].item()) if "alpha" in g else None
    if any(k in g for k in _LOHA):
        missing = [k for k in _LOHA if k not in g]
        if missing:
            raise LoRAError(f"{source}: LoHa module {g['module']} has no {missing[0]} tensor")
        rank = g["hada_w1_b"].shape[0]  # no alpha: scale 1 (ComfyUI, LyCORIS)
        return LoHaWeights(f("hada_w1_a"), f("hada_w1_b"), f("hada_w2_a"), f("hada_w2_b"), float(rank) if alpha is None else alpha)
    if any(k in g for k in _LOKR):
        try:
            return LoKrWeights(**{k.removeprefix("lokr_"): f(k) for k in _LOKR if k in g}, alpha=alpha)
        except LoRAError as e:
            raise LoRAError(f"{source}: module {g['module']}: {e}") from None
    if "lora_A" not in g or "lora_B" not in g:
        missing = "lora_B/lora_up" if "lora_A" in g else "lora_A/lora_down"
        raise LoRAError(f"{source}: module {g['module']} has no {missing} tensor")
    a, b = f("lora_A"), f("lora_B")
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise LoRAError(f"{source}: {g['module']} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not multiply")
    alpha = rank_alpha(g["module"], a.shape[0]) if alpha is None else alpha
    if "lora_magnitude_vector" in g or "dora_scale" in g:
        key = "lora_magnitude_vector" if "lora_magnitude_vector" in g else "dora_scale"
        m = f(key)
        # PEFT: [out]; LyCORIS (wd_on_out, its default) and ComfyUI: [out, 1]. LyCORIS's other choice,
        # [1, in], normalises input columns, which is another adapter (OneTrainer's default DoRA too).
        if m.size != b.shape[0] or (m.ndim == 2 and m.shape[1] != 1) or m.ndim > 2:
            raise LoRAError(f"{source}: {g['module']}.{key} has shape {tuple(m.shape)}; mflux2 reads DoRA with one "
                            f"magnitude per output row ({b.shape[0]}), not per input column (LyCORIS wd_on_out=False)")
        return DoRAWeights(a, b, alpha, m.reshape(-1))
    return LoRAWeights(a, b, alpha)


def _swap_halves(w, source: str, module: str):
    """diffusers' norm_out.linear rows are [scale; shift], BFL's [shift; scale]: swap the output halves."""
    sw = lambda x: mx.concatenate(mx.split(x, 2, axis=0)[::-1], axis=0)  # noqa: E731
    if isinstance(w, DoRAWeights):
        return DoRAWeights(w.A, sw(w.B), w.alpha, sw(w.magnitude))
    if isinstance(w, LoRAWeights):
        return LoRAWeights(w.A, sw(w.B), w.alpha)
    if isinstance(w, LoHaWeights):
        return LoHaWeights(sw(w.w1_a), w.w1_b, sw(w.w2_a), w.w2_b, w.alpha)
    if isinstance(w, LoKrWeights) and w.half(1).shape[0] % 2 == 0:  # kron rows: W1's row halves swap
        return LoKrWeights(None if w.w1 is None else sw(w.w1), None if w.w1_a is None else sw(w.w1_a), w.w1_b,
                           w.w2, w.w2_a, w.w2_b, w.alpha)
    raise LoRAError(f"{source}: {module} is a LoKr whose first factor has an odd row count; its [scale; shift] "
                    "halves cannot be swapped into BFL's order")


def parse_lora(tensors: dict[str, mx.array], metadata: dict | None = None, source: str = "LoRA",
               base: dict[str, mx.array] | None = None) -> tuple[dict[str, AdapterWeights], list[str]]:
    """Any supported layout -> ({BFL module: weights of its adapter type}, keys not understood).

    Types: LoRA/LoCon (`lora_A/B`, `lora_down/up`), DoRA (those plus PEFT's `lora_magnitude_vector` or
    LyCORIS's `dora_scale`), LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]`), LoHa (`hada_w1_a/b`, `hada_w2_a/b`).
    Split q/k/v (diffusers names) are fused: a shared A (what our diffusers writer and diffusers' own
    ai-toolkit conversion produce) gives A and concatenated B rows; independent A's (PEFT training on
    to_q/to_k/to_v) give A stacked [3r, in] and B block-diagonal [3D, 3r]; DoRA magnitudes are
    concatenated (exact: the norm is per output row). LoKr/LoHa parts, or parts of different types,
    become SplitWeights. Alpha comes from `.alpha` keys, else from diffusers' adapter metadata, else
    alpha = rank (scale 1). mflux2's own files with alpha folded into B are unfolded with the alpha
    recorded in the metadata. `base` ({BFL module: weight}) is needed only for mflux2's ComfyUI form
    of DoRA, whose dora_scale is relative to the base weights."""
    metadata = dict(metadata or {})
    meta_alpha, alpha_pattern, rslora = _peft_alphas(metadata)

    def rank_alpha(module: str, rank: int) -> float:
        peft_alpha = _pattern_alpha(module, alpha_pattern)
        peft_alpha = meta_alpha if peft_alpha is None else peft_alpha
        # PEFT scale is lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA; no alpha at all means scale 1
        return float(rank) if peft_alpha is None else float(peft_alpha) * (math.sqrt(rank) if rslora else 1.0)

    groups: dict[tuple[str, object], dict] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        module = m and m.group("mod")
        target = bfl_module(module) if module else None
        if target is None:
            unknown.append(key)
            continue
        g = groups.setdefault(target, {"module": module, "keys": []})
        g["keys"].append(key)
        kind = m.group("kind") or m.group("kind2")
        kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(kind, kind)
        if kind in g:
            raise LoRAError(f"{source}: two tensors for {target[0]} {kind} (e.g. {key}) — several adapters in one file?")
        g[kind] = value
    parts: dict[str, dict] = {}
    for (name, part), g in groups.items():
        if set(g) <= {"module", "keys", "alpha"}:  # an alpha with nothing to scale
            unknown.extend(g["keys"])
            continue
        w = _adapter(g, source, rank_alpha)
        if part == "swap":
            w, part = _swap_halves(w, source, g["module"]), None
        parts.setdefault(name, {})[part] = w
    for name, p in parts.items():
        if None in p and len(p) > 1:
            raise LoRAError(f"{source}: {name} has both a fused qkv LoRA and split q/k/v LoRAs — two adapters in one file?")
    out = {name: (p[None] if None in p else _merge_qkv(p)) for name, p in parts.items()}

    if metadata.get("software") == "mflux2" and metadata.get("alpha_folded") == "true":
        try:
            train_alpha = float(metadata.get("alpha", ""))
        except ValueError:
            train_alpha = None
        if train_alpha:  # B was saved as B·alpha/rank: restore the trained B and alpha
            out = {k: _unfold(w, train_alpha) for k, w in out.items()}
    if metadata.get(_DORA_BASE_RELATIVE) == "true":
        out = {k: _dora_from_comfy(k, w, base, source) for k, w in out.items()}
    return out, unknown


def _unfold(w, alpha: float):
    if isinstance(w, SplitWeights):
        return SplitWeights([(rows, _unfold(p, alpha)) for rows, p in w.parts], w.out)
    if isinstance(w, LoRAWeights):  # DoRA too: the same B·alpha/rank fold
        return replace(w, B=w.B * (w.rank / alpha), alpha=alpha)
    return w


def _merge_qkv(parts: dict[int, object]):
    ws = [parts[i] for i in sorted(parts)]
    d = ws[0].shape[0]
    if len(ws) == 3 and all(type(w) is LoRAWeights for w in ws):
        return _merge_lora(ws, d)
    if len(ws) == 3 and all(type(w) is DoRAWeights for w in ws):  # per-row norms: the fused DoRA is exact
        w = _merge_lora(ws, d)
        return DoRAWeights(w.A, w.B, w.alpha, mx.concatenate([p.magnitude for p in ws], axis=0))
    # a part missing, LoKr/LoHa (a kron or Hadamard product of three is not one), or mixed types
    return SplitWeights([((i * d, (i + 1) * d), parts[i]) for i in sorted(parts)], 3 * d)


def _merge_lora(ws: list, d: int) -> LoRAWeights:
    if all(mx.array_equal(w.A, ws[0].A).item() for w in ws[1:]):
        if len({w.alpha / w.rank for w in ws}) == 1:
            return LoRAWeights(ws[0].A, mx.concatenate([w.B for w in ws], axis=0), ws[0].alpha)
        return LoRAWeights(ws[0].A, mx.concatenate([w.B * (w.alpha / w.rank) for w in ws], axis=0), float(ws[0].rank))
    # independent A's: stack them and place each B on the diagonal (rank = sum of ranks, scale folded)
    a = mx.concatenate([w.A for w in ws], axis=0)
    b = mx.zeros((3 * d, a.shape[0]))
    col = 0
    for i, w in enumerate(ws):
        b[i * d : (i + 1) * d, col : col + w.rank] = w.B * (w.alpha / w.rank)
        col += w.rank
    return LoRAWeights(a, b, float(a.shape[0]))


def _comfy_dora_scale(w: DoRAWeights, base: mx.array) -> mx.array:
    """The [out, 1] dora_scale that ComfyUI turns into this DoRA. ComfyUI's `weight_decompose`
    (comfy/weight_adapter/base.py) divides an output-axis dora_scale by the row norms of the *base*
    weight W, where DoRA (PEFT, LyCORIS's forward) divides m by those of V = W + ΔW; so the file holds
    m·‖W‖/‖V‖, which depends on the base model the file is written for."""
    w0 = base.astype(mx.float32)
    v = w0 + LoRAWeights.delta(w)
    norm = lambda x: mx.linalg.norm(x, axis=1)  # noqa: E731
    return (w.magnitude.astype(mx.float32) * norm(w0) / norm(v)).reshape(-1, 1)


def _dora_from_comfy(name: str, w, base: dict | None, source: str, rows: tuple | None = None):
    """Inverse of _comfy_dora_scale for a file mflux2 wrote in the ComfyUI form: m = s·‖V‖/‖W‖."""
    if isinstance(w, SplitWeights):
        return SplitWeights([(r, _dora_from_comfy(name, p, base, source, r)) for r, p in w.parts], w.out)
    if not isinstance(w, DoRAWeights):
        return w
    if base is None or name not in base:
        raise LoRAError(f"{source}: the DoRA dora_scale of {name} was written for ComfyUI relative to the base "
                        "model's weights; read it with base= (scripts/convert_lora.py: --base MODEL), or use a diffusers-layout file")
    w0 = base[name].astype(mx.float32)
    w0 = w0 if rows is None else w0[rows[0] : rows[1]]
    v = w0 + LoRAWeights.delta(w)
    s = w.magnitude.reshape(-1)
    return replace(w, magnitude=s * mx.linalg.norm(v, axis=1) / mx.linalg.norm(w0, axis=1))


# The diffusers names of the q/k/v rows of a double block's fused qkv, used for split adapters
_QKV_DIFFUSERS = {"double_blocks.{i}.img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                  "double_blocks.{i}.txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _tensors(w, alpha_key: bool, fold: bool) -> dict[str, mx.array]:
    """One adapter's tensors under their file suffixes. LoRA/DoRA: `lora_down/up` with `.alpha`
    (alpha_key) or `lora_A/B` with alpha/rank folded into B (fold); magnitude handled by the caller."""
    if isinstance(w, LoKrWeights):
        t = {f"lokr_{k}": getattr(w, k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b") if getattr(w, k) is not None}
        return t | ({"alpha": mx.array(w.alpha, dtype=mx.float32)} if w.alpha is not None else {})
    if isinstance(w, LoHaWeights):
        return {"hada_w1_a": w.w1_a, "hada_w1_b": w.w1_b, "hada_w2_a": w.w2_a, "hada_w2_b": w.w2_b,
                "alpha": mx.array(w.alpha, dtype=mx.float32)}
    if alpha_key:
        return {"lora_down.weight": w.A, "lora_up.weight": w.B, "alpha": mx.array(w.alpha, dtype=mx.float32)}
    scale = w.alpha / w.rank
    return {"lora_A.weight": w.A, "lora_B.weight": w.B * scale if fold and scale != 1.0 else w.B}


def to_file_tensors(weights: dict[str, AdapterWeights], format: str = "bfl", dtype: mx.Dtype = mx.float32,
                    base: dict[str, mx.array] | None = None) -> tuple[dict[str, mx.array], bool]:
    """{BFL module: weights} -> (file tensors, alpha folded into B).

    LoRA — bfl: `diffusion_model.<BFL name>.lora_A/B.weight`; diffusers: `transformer.<diffusers
    name>...` with q/k/v split (A shared, B rows chunked in 3); both fold alpha/rank into B because
    their loaders take scale = 1 without an alpha. kohya: `lora_unet_<name with _>.lora_down/up.weight`
    and `.alpha` (scale = alpha / rank, fused q/k/v kept).
    DoRA — diffusers: the LoRA keys plus `.lora_magnitude_vector` [out] (PEFT); bfl/kohya: the LoRA
    keys plus ComfyUI's `.dora_scale` [out, 1], which needs the base weights (`base`, see
    _comfy_dora_scale). LoKr/LoHa — bfl/kohya only: `lokr_*` / `hada_*` and `.alpha` under the same
    prefixes. SplitWeights (adapters on q/k/v rows of a double block's fused qkv) — kohya/bfl: each
    part under LyCORIS's names (`lycoris_transformer_blocks_<i>_attn_to_q.*`), which ComfyUI places on
    the rows; diffusers: LoRA/DoRA parts under their split names."""
    if format not in FORMATS:
        raise LoRAError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    out = {}
    for name, w in weights.items():
        template, i = _from_bfl(name)  # validates the name
        if isinstance(w, SplitWeights):
            if template not in _QKV_DIFFUSERS or w.out % 3:
                raise LoRAError(f"{name}: split adapters are only written on a double block's fused qkv")
            d = w.out // 3
            for (r0, r1), p in w.parts:
                if r1 - r0 != d or r0 % d:
                    raise LoRAError(f"{name}: a split part covers rows {r0}:{r1}, not one of q, k, v ({d} rows each)")
                dname = f"transformer_blocks.{i}." + _QKV_DIFFUSERS[template][r0 // d]
                pbase = None if base is None or name not in base else base[name][r0:r1]
                out.update(_module_tensors(name, dname, p, format, pbase, split=True))
            continue
        out.update(_module_tensors(name, None, w, format, None if base is None else base.get(name)))
    return {k: v.astype(dtype) if v.ndim else v for k, v in out.items()}, format != "kohya"


def _module_tensors(name: str, dname: str | None, w, format: str, base_w, split: bool = False) -> dict[str, mx.array]:
    """The file tensors of one adapter on BFL module `name` (or on its split part `dname`)."""
    dora = isinstance(w, DoRAWeights)
    if format == "diffusers":
        if not isinstance(w, LoRAWeights):
            raise LoRAError(f"{name}: a {w.type} adapter cannot be written in the diffusers/PEFT layout (split q/k/v "
                            "names hold LoRA and DoRA only); write it with format='bfl' (diffusers loads LoKr from it) or 'kohya'")
        if split:
            return {f"transformer.{dname}.{k}": v for k, v in _diffusers_part(w, None).items()}
        template, i = _from_bfl(name)
        t = {}
        for dn, (btemplate, part) in _DIFFUSERS_NAMES.items():
            if btemplate == template:
                t.update({f"transformer.{dn.replace('{i}', i)}.{k}": v for k, v in _diffusers_part(w, part).items()})
        return t
    if dora:
        if base_w is None:
            raise LoRAError(f"{name}: DoRA in the {format} layout stores ComfyUI's dora_scale, which is relative to the "
                            "base model's weights: pass base= (scripts/convert_lora.py: --base MODEL), or use format='diffusers'")
        if tuple(base_w.shape) != w.shape:
            raise LoRAError(f"{name}: base weight {tuple(base_w.shape)} does not fit the DoRA delta {w.shape}")
    if split:
        prefix = "lycoris_" + dname.replace(".", "_")
        t = _tensors(w, alpha_key=True, fold=False)
    elif format == "kohya":
        prefix = "lora_unet_" + name.replace(".", "_")
        t = _tensors(w, alpha_key=True, fold=False)
    else:
        prefix = f"diffusion_model.{name}"
        t = _tensors(w, alpha_key=False, fold=True)
    if dora:
        t["dora_scale"] = _comfy_dora_scale(w, base_w)
    return {f"{prefix}.{k}": v for k, v in t.items()}


def _diffusers_part(w, part) -> dict[str, mx.array]:
    """LoRA/DoRA under diffusers' names: alpha folded into B; part 0/1/2 = q/k/v rows, "swap" = halves swapped."""
    b = w.B * (w.alpha / w.rank) if w.alpha != w.rank else w.B
    m = w.magnitude if isinstance(w, DoRAWeights) else None
    if part == "swap":
        sw = lambda x: mx.concatenate(mx.split(x, 2, axis=0)[::-1], axis=0)  # noqa: E731
        b, m = sw(b), (None if m is None else sw(m))
    elif part is not None:
        n = b.shape[0] // 3
        b, m = b[part * n : (part + 1) * n], (None if m is None else m[part * n : (part + 1) * n])
    t = {"lora_A.weight": w.A, "lora_B.weight": b}
    return t | ({"lora_magnitude_vector": m} if m is not None else {})


def _leaves(weights: dict) -> list:
    return [p for w in weights.values() for p in ([q for _, q in w.parts] if isinstance(w, SplitWeights) else [w])]


def _common(values) -> str:
    values = set(values)
    return str(values.pop()) if len(values) == 1 else "mixed"


def _summary(weights: dict[str, AdapterWeights]) -> dict[str, str]:
    """type, rank, alpha (and LoKr's factor: W1's rows) for the metadata: the common value, or 'mixed'."""
    leaves = _leaves(weights)
    alphas = {w.alpha for w in leaves}
    meta = {"adapter_type": _common(w.type for w in leaves), "rank": _common(w.rank for w in leaves),
            "alpha": repr(alphas.pop()) if len(alphas) == 1 else "mixed"}
    lokr = [w for w in leaves if isinstance(w, LoKrWeights)]
    if lokr:
        meta["lokr_factor"] = _common(w.half(1).shape[0] for w in lokr)
    return meta


def _peft_metadata(tensors: dict[str, mx.array]) -> str:
    """diffusers' `lora_adapter_metadata` (PEFT LoraConfig kwargs) for a diffusers-layout file: alpha is
    folded into B, so lora_alpha = r per module (scale 1), as diffusers' own get_peft_kwargs does; each key
    prefixed `transformer.` as diffusers' save_lora_weights writes it."""
    ranks = {k.removeprefix("transformer.").removesuffix(".lora_B.weight"): v.shape[1]
             for k, v in tensors.items() if k.endswith(".lora_B.weight")}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {k: v for k, v in ranks.items() if v != r}
    cfg = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern, "target_modules": sorted(ranks),
           "use_dora": any(k.endswith(".lora_magnitude_vector") for k in tensors), "lora_bias": False}
    return json.dumps({f"transformer.{k}": v for k, v in cfg.items()})  # diffusers keys it by component


def write_lora(path: str | Path, weights: dict[str, AdapterWeights], format: str = "bfl", metadata: dict | None = None,
               dtype: mx.Dtype = mx.float32, base: dict[str, mx.array] | None = None) -> Path:
    """Write an adapter file atomically (temp file + os.replace). Metadata values are stored as strings.
    `base` ({BFL module: weight}): needed only for DoRA in the bfl/kohya (ComfyUI) layouts."""
    if not weights:
        raise LoRAError("no LoRA layers to save")
    tensors, folded = to_file_tensors(weights, format, dtype, base)
    summary = _summary(weights)
    meta = {k: str(v) for k, v in (metadata or {}).items() if v is not None}
    meta.pop(_DORA_BASE_RELATIVE, None)
    meta.update({"format": "pt", "software": "mflux2", "lora_format": format, **summary,
                 "alpha_folded": "true" if folded else "false"})
    if any(k.endswith(".dora_scale") for k in tensors):
        meta[_DORA_BASE_RELATIVE] = "true"
    if format == "kohya":
        meta.update({"ss_network_dim": summary["rank"], "ss_network_alpha": summary["alpha"]})
    if format == "diffusers" and any(k.endswith(".lora_magnitude_vector") for k in tensors):
        meta["lora_adapter_metadata"] = _peft_metadata(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.safetensors")  # mlx appends .safetensors otherwise
    # Key order matters to diffusers: it reads a file whose first tensor name lacks "lora_A" as an old
    # UNet LoRA and renames `.to_out.lora_magnitude_vector` to `.to_out.0...` (convert_unet_state_dict_to_peft),
    # which loses the single blocks' DoRA magnitudes. mlx lays tensors out in reverse insertion order, so
    # inserting in descending name order puts the alphabetically first name (a lora_A / lora_down) first.
    tensors = dict(sorted(tensors.items(), reverse=True))
    try:
        mx.save_safetensors(str(tmp), tensors, metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_lora(path: str | Path, strict: bool = True, base: dict[str, mx.array] | None = None) -> tuple[dict[str, AdapterWeights], dict]:
    """Read any supported adapter file -> ({BFL module: weights of its type}, safetensors metadata).
    `base` ({BFL module: weight}) only for DoRA files mflux2 wrote in the ComfyUI form (dora_scale)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with a long text
        raise LoRAError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    weights, unknown = parse_lora(tensors, metadata, source=str(path), base=base)
    _report(path, unknown, strict, "key(s) not understood",
            "not a FLUX.2 LoRA/LoCon/DoRA/LoKr/LoHa tensor (e.g. Tucker lokr_t2/hada_t1, biases, text encoder)")
    if not weights:
        raise LoRAError(f"{path}: no LoRA tensors found")
    return weights, metadata


def _report(source, keys, strict: bool, what: str, why: str) -> None:
    if not keys:
        return
    keys = sorted(keys)
    few = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    if strict:
        raise LoRAError(f"{source}: {len(keys)} {what}: {few} — {why}; pass strict=False to skip them")
    warnings.warn(f"{source}: skipping {len(keys)} {what}: {', '.join(keys)}", stacklevel=3)


def convert_lora(src: str | Path, dst: str | Path, format: str = "bfl", dtype: mx.Dtype | None = None, strict: bool = True,
                 base: dict[str, mx.array] | None = None) -> Path:
    """Rewrite an adapter file in another layout; no model needed (shapes come from the file), except
    for DoRA to or from the bfl/kohya (ComfyUI dora_scale) layouts, which need `base`."""
    weights, metadata = read_lora(src, strict=strict, base=base)
    if dtype is None:  # keep the source precision
        dtype = next((v.dtype for v in mx.load(str(src), format="safetensors").values() if v.ndim == 2), mx.float32)
        dtype = dtype if dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
    # alpha conventions are rewritten by write_lora; drop the source's own alpha records
    keep = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "format") and not k.startswith("ss_network_")}
    keep = {k: v for k, v in keep.items() if k not in ("adapter_type", "lokr_factor")}
    return write_lora(dst, weights, format, keep, dtype, base)


# The file an mflux2 output or checkpoint folder holds (picked in a folder or repo with several)
KNOWN_NAMES = ("lora_final.safetensors", "lora.safetensors")


def resolve_lora_file(spec: str | os.PathLike, label: str = "", local_only: bool = False) -> Path | None:
    """The adapter file `spec` names (`--lora`, `lora.init_from`, Flux2Pipeline.load_lora): a local
    .safetensors file; a local folder holding one (an mflux2 output / checkpoint folder: its
    lora_final / lora.safetensors); a Hugging Face repo id `user/repo` (its one .safetensors file, or
    lora_final / lora.safetensors) or a file in a repo `user/repo/sub/file.safetensors`. Hub files come
    through the Hugging Face cache, which honours HF_HOME / HF_HUB_CACHE, HF_TOKEN and
    HF_HUB_OFFLINE=1 (cache only), as models do (mflux2/hub.py). `local_only` (the dry run): the cache
    only, None when the file is not there. Errors are one line starting with `label spec:`."""
    from mflux2 import hub

    text = str(spec)
    where_from = f"{label} {text}" if label else text
    path = Path(text).expanduser()
    if path.exists():
        return _file_in(path, where_from)
    parts = text.split("/")
    if (len(parts) < 2 or not all(parts) or text.startswith((".", "~", "/")) or "\\" in text or Path(parts[0]).is_dir()
            or hub.parent_folder_exists(text)):  # a mistyped local path, not a repo id
        raise LoRAError(f"{where_from}: no such file or folder{hub.missing_path_note(text)}, and not a Hugging Face repo "
                        "(user/repo or user/repo/file.safetensors)")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache_only = local_only or constants.HF_HUB_OFFLINE
    where = f"the Hugging Face cache {constants.HF_HUB_CACHE} (offline mode is on)" if constants.HF_HUB_OFFLINE else (
        f"the Hugging Face cache {constants.HF_HUB_CACHE}" if local_only else "the Hugging Face hub")
    try:
        if filename is None:
            if cache_only:  # what the cached snapshot holds
                folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=["*.safetensors"], local_files_only=True))
                names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
            else:
                names = sorted(f for f in huggingface_hub.list_repo_files(repo) if f.endswith(".safetensors"))
            known = [n for n in KNOWN_NAMES if n in names]
            if known:
                names = known[:1]
            if len(names) != 1:
                if not names and local_only:
                    return None
                found = f"{len(names)} .safetensors files ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else "no .safetensors file"
                raise LoRAError(f"{where_from}: {where} has {found} in {repo}; name one as {repo}/<file>.safetensors")
            filename = names[0]
        if not filename.endswith(".safetensors"):
            raise LoRAError(f"{where_from}: {filename} is not a .safetensors adapter file")
        return Path(huggingface_hub.hf_hub_download(repo, filename, **({"local_files_only": True} if local_only else {})))
    except GatedRepoError:  # (a subclass of RepositoryNotFoundError)
        raise LoRAError(f"{where_from}: {repo} is gated: accept its licence on huggingface.co and run `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise LoRAError(f"{where_from}: no such local file, and no repo {repo} on the Hugging Face hub (a private repo needs `hf auth login`)") from None
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
        if local_only:
            return None
        raise LoRAError(f"{where_from}: {filename or repo} is not in {where}: download it once with network access, "
                        "or pass a local file") from None
    except EntryNotFoundError:
        raise LoRAError(f"{where_from}: the hub repo {repo} has no file {filename}") from None
    except HfHubHTTPError as e:
        raise LoRAError(f"{where_from}: downloading from {repo} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def _file_in(p: Path, where_from: str) -> Path:
    """A .safetensors file as is; in a folder: lora_final / lora.safetensors, else its one .safetensors."""
    if p.is_file():
        if p.suffix != ".safetensors":
            raise LoRAError(f"{where_from}: {p.name} is not a .safetensors adapter file")
        return p
    for name in KNOWN_NAMES:
        if (p / name).is_file():
            return p / name
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise LoRAError(f"{where_from}: no .safetensors file in {p}")
    raise LoRAError(f"{where_from}: several .safetensors files in {p} ({', '.join(f.name for f in files[:3])}"
                    f"{', ...' if len(files) > 3 else ''}); name the one to use")
