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
from dataclasses import dataclass
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
             "lora_unet_", "lora_transformer_")
_KEY = re.compile(r"^(?P<mod>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight$|^(?P<amod>.+)\.alpha$")


def _to_bfl(module: str) -> tuple[str, int | str | None] | None:
    """File module name (any prefix, dotted or kohya) -> (BFL module, part)."""
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
    if cfg.get("use_dora"):
        raise LoRAError("this is a DoRA adapter (use_dora=true), which mflux2 does not load")
    return cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}, bool(cfg.get("use_rslora"))


def _pattern_alpha(module: str, patterns: dict) -> float | None:
    for pat, a in patterns.items():  # PEFT: a pattern matches the module name or its dotted suffix
        if re.fullmatch(rf"(.*\.)?{pat}", module):
            return a
    return None


def parse_lora(tensors: dict[str, mx.array], metadata: dict | None = None, source: str = "LoRA") -> tuple[dict[str, LoRAWeights], list[str]]:
    """Any supported layout -> ({BFL module: LoRAWeights}, keys not understood).

    Split q/k/v (diffusers) are fused: a shared A (what our diffusers writer and diffusers' own
    ai-toolkit conversion produce) gives A and concatenated B rows; independent A's (PEFT training on
    to_q/to_k/to_v) give A stacked [3r, in] and B block-diagonal [3D, 3r]. Alpha comes from `.alpha`
    keys, else from diffusers' adapter metadata, else alpha = rank (scale 1). mflux2's own files with
    alpha folded into B are unfolded with the alpha recorded in the metadata."""
    metadata = dict(metadata or {})
    meta_alpha, alpha_pattern, rslora = _peft_alphas(metadata)
    groups: dict[tuple[str, object], dict] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        module = m and (m.group("mod") or m.group("amod"))
        target = _to_bfl(module) if module else None
        if target is None:
            unknown.append(key)
            continue
        g = groups.setdefault(target, {"module": module})
        kind = m.group("kind") or "alpha"
        kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(kind, kind)
        if kind in g:
            raise LoRAError(f"{source}: two tensors for {target[0]} {kind} (e.g. {key}) — several adapters in one file?")
        g[kind] = value
    parts: dict[str, dict] = {}
    for (name, part), g in groups.items():
        if "lora_A" not in g or "lora_B" not in g:
            missing = "lora_B/lora_up" if "lora_A" in g else "lora_A/lora_down"
            raise LoRAError(f"{source}: module {g['module']} has no {missing} tensor")
        a, b = g["lora_A"].astype(mx.float32), g["lora_B"].astype(mx.float32)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise LoRAError(f"{source}: {g['module']} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not multiply")
        rank = a.shape[0]
        if "alpha" in g:
            alpha = float(g["alpha"].astype(mx.float32).reshape(-1)[0].item())
        else:
            peft_alpha = _pattern_alpha(g["module"], alpha_pattern)
            peft_alpha = meta_alpha if peft_alpha is None else peft_alpha
            # PEFT scale is lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA; no alpha at all means scale 1
            alpha = float(rank) if peft_alpha is None else float(peft_alpha) * (math.sqrt(rank) if rslora else 1.0)
        if part == "swap":
            top, bottom = mx.split(b, 2, axis=0)
            b, part = mx.concatenate([bottom, top], axis=0), None
        parts.setdefault(name, {})[part] = LoRAWeights(a, b, alpha)
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
            out = {k: LoRAWeights(w.A, w.B * (w.rank / train_alpha), train_alpha) for k, w in out.items()}
    return out, unknown


def _merge_qkv(parts: dict[int, LoRAWeights]) -> LoRAWeights:
    ws = [parts[i] for i in sorted(parts)]
    d = ws[0].B.shape[0]
    if len(ws) == 3 and all(mx.array_equal(w.A, ws[0].A).item() for w in ws[1:]):
        if len({w.alpha / w.rank for w in ws}) == 1:
            return LoRAWeights(ws[0].A, mx.concatenate([w.B for w in ws], axis=0), ws[0].alpha)
        return LoRAWeights(ws[0].A, mx.concatenate([w.B * (w.alpha / w.rank) for w in ws], axis=0), float(ws[0].rank))
    # independent A's: stack them and place each B on the diagonal (rank = sum of ranks, scale folded)
    a = mx.concatenate([w.A for w in ws], axis=0)
    b = mx.zeros((3 * d, a.shape[0]))
    col = 0
    for i in sorted(parts):
        w = parts[i]
        b[i * d : (i + 1) * d, col : col + w.rank] = w.B * (w.alpha / w.rank)
        col += w.rank
    return LoRAWeights(a, b, float(a.shape[0]))


def to_file_tensors(weights: dict[str, LoRAWeights], format: str = "bfl", dtype: mx.Dtype = mx.float32) -> tuple[dict[str, mx.array], bool]:
    """{BFL module: LoRAWeights} -> (file tensors, alpha folded into B).

    bfl: `diffusion_model.<BFL name>.lora_A/B.weight`; diffusers: `transformer.<diffusers name>...`
    with q/k/v split (A shared, B rows chunked in 3); both fold alpha/rank into B because their
    loaders take scale = 1 without an alpha. kohya: `lora_unet_<name with _>.lora_down/up.weight` and
    `.alpha` (scale = alpha / rank, fused q/k/v kept)."""
    if format not in FORMATS:
        raise LoRAError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    out = {}
    for name, w in weights.items():
        _from_bfl(name)  # validates the name
        fold = w.alpha / w.rank
        if format == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            out[f"{k}.lora_down.weight"] = w.A.astype(dtype)
            out[f"{k}.lora_up.weight"] = w.B.astype(dtype)
            out[f"{k}.alpha"] = mx.array(w.alpha, dtype=mx.float32)
            continue
        b = w.B * fold if fold != 1.0 else w.B
        if format == "bfl":
            out[f"diffusion_model.{name}.lora_A.weight"] = w.A.astype(dtype)
            out[f"diffusion_model.{name}.lora_B.weight"] = b.astype(dtype)
            continue
        template, i = _from_bfl(name)
        for dname, (btemplate, part) in _DIFFUSERS_NAMES.items():
            if btemplate != template:
                continue
            dname = "transformer." + dname.replace("{i}", i)
            if part == "swap":
                top, bottom = mx.split(b, 2, axis=0)
                bp = mx.concatenate([bottom, top], axis=0)
            elif part is not None:
                n = b.shape[0] // 3
                bp = b[part * n : (part + 1) * n]
            else:
                bp = b
            out[f"{dname}.lora_A.weight"] = w.A.astype(dtype)
            out[f"{dname}.lora_B.weight"] = bp.astype(dtype)
    return out, format != "kohya"


def _summary(weights: dict[str, LoRAWeights]) -> tuple[str, str]:
    """rank and alpha for the metadata: the common value, or 'mixed'."""
    ranks = {w.rank for w in weights.values()}
    alphas = {w.alpha for w in weights.values()}
    return (str(ranks.pop()) if len(ranks) == 1 else "mixed"), (repr(alphas.pop()) if len(alphas) == 1 else "mixed")


def write_lora(path: str | Path, weights: dict[str, LoRAWeights], format: str = "bfl", metadata: dict | None = None,
               dtype: mx.Dtype = mx.float32) -> Path:
    """Write a LoRA file atomically (temp file + os.replace). Metadata values are stored as strings."""
    if not weights:
        raise LoRAError("no LoRA layers to save")
    tensors, folded = to_file_tensors(weights, format, dtype)
    rank, alpha = _summary(weights)
    meta = {k: str(v) for k, v in (metadata or {}).items() if v is not None}
    meta.update({"format": "pt", "software": "mflux2", "lora_format": format, "rank": rank, "alpha": alpha,
                 "alpha_folded": "true" if folded else "false"})
    if format == "kohya":
        meta.update({"ss_network_dim": rank, "ss_network_alpha": alpha})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.safetensors")  # mlx appends .safetensors otherwise
    try:
        mx.save_safetensors(str(tmp), tensors, metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_lora(path: str | Path, strict: bool = True) -> tuple[dict[str, LoRAWeights], dict]:
    """Read any supported LoRA file -> ({BFL module: LoRAWeights}, safetensors metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file")
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with a long text
        raise LoRAError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    weights, unknown = parse_lora(tensors, metadata, source=str(path))
    _report(path, unknown, strict, "key(s) not understood", "not a FLUX.2 LoRA, or LoKr/LoHa/DoRA, which mflux2 does not load")
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


def convert_lora(src: str | Path, dst: str | Path, format: str = "bfl", dtype: mx.Dtype | None = None, strict: bool = True) -> Path:
    """Rewrite a LoRA file in another layout; no model needed (shapes come from the file)."""
    weights, metadata = read_lora(src, strict=strict)
    if dtype is None:  # keep the source precision
        dtype = next((v.dtype for v in mx.load(str(src), format="safetensors").values() if v.ndim == 2), mx.float32)
        dtype = dtype if dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
    # alpha conventions are rewritten by write_lora; drop the source's own alpha records
    keep = {k: v for k, v in metadata.items() if k not in ("lora_adapter_metadata", "format") and not k.startswith("ss_network_")}
    return write_lora(dst, weights, format, keep, dtype)
