"""The files of a FLUX.2 model: where its components are, which variant they are, and the MLX layout.

`resolve_source` turns what the user names into a `ModelSource` (paths + family + variant):
- a Hugging Face repo id or short name: only the diffusers subfolders are fetched (`mflux2.hub`);
- a local diffusers folder (`model_index.json` + transformer/ vae/ text_encoder/ tokenizer/);
- a local BFL folder: the transformer single file (`flux-2-klein-4b.safetensors`, ...) beside
  `ae.safetensors` and a `text_encoder/` folder (+ `tokenizer/`), or the transformer file itself;
- a folder written by `scripts/convert.py` (`mflux2.json`): MLX layout, possibly pre-quantised,
  written by `save_component` and read back by `load_component`.

Nothing here keeps a model in memory: `mflux2.components` decides when components load and are freed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mflux2 import hub
from mflux2.hub import ModelLoadError
from mflux2.weights import check_keys, iter_tensors, read_config, safetensors_files

VARIANTS = ("klein-4b", "klein-9b", "dev", "klein-base-4b", "klein-base-9b")
FAMILIES = ("klein", "klein-base", "dev")
MFLUX2_CONFIG = "mflux2.json"  # marks a folder written by scripts/convert.py
# A model's own generation defaults, for a model whose family defaults do not suit it (the toy model:
# 64², 20 steps, CFG 2.0, where klein-base's 1024² and 50 steps take half an hour a CPU image and
# over-saturate). Keys: width, height, steps, guidance; each used only when the caller gives none.
SAMPLING_FILE = "mflux2_sampling.json"
MFLUX2_FORMAT_VERSION = 1


def family_of(variant: str) -> str:
    """'klein-4b' -> 'klein', 'klein-base-9b' -> 'klein-base', 'dev' -> 'dev'."""
    if variant == "dev":
        return "dev"
    return "klein-base" if variant.startswith("klein-base") else "klein"


# ----------------------------------------------------------------------------------------------
# Where the components are


@dataclass
class ModelSource:
    """The resolved files of one model and what kind of FLUX.2 it is."""

    root: Path
    layout: str  # "diffusers" | "bfl" | "mflux2"
    family: str  # "klein" (step-distilled) | "klein-base" | "dev"
    variant: str | None  # full preset name, None for an unknown (e.g. tiny test) architecture
    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path | None
    config: dict = field(default_factory=dict)  # mflux2.json of a converted folder
    sampling: dict = field(default_factory=dict)  # SAMPLING_FILE's defaults (width, height, steps, guidance)

    @property
    def name(self) -> str:
        return self.variant or self.family


def _fail_missing(root: Path, what: str, hint: str) -> None:
    raise ModelLoadError(f"{root}: {what} is missing — {hint}")


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise ModelLoadError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def _size_variant(transformer_config: dict | None, shapes_variant: str | None, family: str) -> str | None:
    """Combine the family with the size inferred from the transformer's architecture."""
    from mflux2.models.transformer import TransformerConfig, variant_of

    arch = shapes_variant
    if arch is None and transformer_config:
        arch = variant_of(TransformerConfig.from_dict(transformer_config))
    if arch is None:
        return None
    if arch == "dev":
        return "dev" if family == "dev" else None
    size = arch.split("-")[-1]  # 4b / 9b
    return f"{family}-{size}" if family in ("klein", "klein-base") else None


def resolve_source(path_or_repo_id: str | os.PathLike, variant: str | None = None, revision: str | None = None) -> ModelSource:
    """Find the components of a model (downloading from the hub if needed) and detect its variant."""
    source = _resolve_source(path_or_repo_id, variant, revision)
    source.sampling = read_sampling(source.root)
    return source


def read_sampling(root: Path) -> dict:
    """SAMPLING_FILE of a model folder ({} without one), checked: one line naming the file and key."""
    path = Path(root) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({str(e).splitlines()[0]})") from None
    kinds = {"width": int, "height": int, "steps": int, "guidance": (int, float)}
    for k, v in (d.items() if isinstance(d, dict) else [("(the file)", d)]):
        if k not in kinds:
            raise ModelLoadError(f"{path}: unknown key {k!r} (the keys are {', '.join(kinds)})")
        ok = isinstance(v, kinds[k]) and not isinstance(v, bool) and v > 0
        if not ok or (k in ("width", "height") and v % 16):
            raise ModelLoadError(f"{path}: {k}: {v!r} is not a positive {'multiple of 16' if k in ('width', 'height') else 'number'}")
    return d


def _resolve_source(path_or_repo_id: str | os.PathLike, variant: str | None, revision: str | None) -> ModelSource:
    _check_variant(variant)
    name = str(path_or_repo_id)
    p = Path(name).expanduser()
    if not p.exists():
        repo_id = hub.repo_id_for(name)
        if repo_id == name and hub.parent_folder_exists(name):  # a mistyped local path, not a repo id
            raise ModelLoadError(f"{name}: no such file or folder{hub.missing_path_note(name)}")
        if repo_id == name and not hub.looks_like_repo_id(name):
            raise ModelLoadError(
                f"{name}: no such file or folder{hub.missing_path_note(name)}, and not a model name "
                f"({', '.join(hub.REPOS)}) or a Hugging Face repo id (owner/name)"
            )
        if variant is None and name.strip().lower() in hub.REPOS:
            variant = name.strip().lower()
        p = hub.download(repo_id, revision=revision)
    if p.is_file():
        return _resolve_bfl(p.parent, p, variant)
    if (p / MFLUX2_CONFIG).is_file():
        return _resolve_mflux2(p, variant)
    if (p / "model_index.json").is_file():
        return _resolve_diffusers(p, variant)
    singles = bfl_transformer_files(p)
    if singles:
        if len(singles) > 1:
            raise ModelLoadError(
                f"{p}: several transformer files ({', '.join(f.name for f in singles)}); pass the one to use as the path"
            )
        return _resolve_bfl(p, singles[0], variant)
    raise ModelLoadError(
        f"{p}: not a FLUX.2 model folder (no model_index.json, no {MFLUX2_CONFIG}, no transformer .safetensors file)"
    )


def bfl_transformer_files(folder: Path) -> list[Path]:
    """The transformer files a BFL folder may hold: its .safetensors but the VAE (ae.safetensors), a
    text encoder's shards (model-*) and a diffusers component's (diffusion_pytorch_model*)."""
    return sorted(f for f in folder.glob("*.safetensors")
                  if f.name != "ae.safetensors" and not f.name.startswith(("model-", "diffusion_pytorch_model")))


def _tokenizer_folder(root: Path, text_encoder: Path) -> Path | None:
    if (root / "tokenizer").is_dir():
        return root / "tokenizer"
    if (text_encoder / "tokenizer_config.json").is_file() or (text_encoder / "tokenizer.json").is_file():
        return text_encoder  # a plain Qwen3/Mistral model folder carries its tokenizer
    return None


def _resolve_diffusers(root: Path, variant: str | None) -> ModelSource:
    try:
        index = json.loads((root / "model_index.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{root / 'model_index.json'}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            _fail_missing(root, f"the {sub}/ folder", "re-download the model (an interrupted download?) or pass the complete folder")
    tcfg = read_config(root / "transformer")
    if tcfg is None:
        _fail_missing(root, "transformer/config.json", "re-download the model")
    cls = index.get("_class_name", "")
    if cls == "Flux2Pipeline" or (cls == "" and tcfg.get("guidance_embeds")):
        family = "dev"
    elif cls.startswith("Flux2Klein"):
        family = "klein" if index.get("is_distilled", False) else "klein-base"
    else:
        raise ModelLoadError(f"{root / 'model_index.json'}: pipeline class {cls!r} is not a FLUX.2 text-to-image pipeline")
    if bool(tcfg.get("guidance_embeds")) != (family == "dev"):
        raise ModelLoadError(
            f"{root}: model_index.json says {cls} but the transformer {'has' if tcfg.get('guidance_embeds') else 'lacks'} a guidance embedding"
        )
    detected = _size_variant(tcfg, None, family)
    variant = _reconcile(root, variant, family, detected)
    return ModelSource(root, "diffusers", family_of(variant) if variant else family, variant or detected,
                       root / "transformer", root / "vae", root / "text_encoder", root / "tokenizer")


def _resolve_bfl(root: Path, transformer_file: Path, variant: str | None) -> ModelSource:
    from mflux2.models.transformer import config_from_weights, variant_of

    if not (root / "ae.safetensors").is_file():
        _fail_missing(root, "ae.safetensors (the VAE)", f"put it beside {transformer_file.name} (it is in every FLUX.2 repo)")
    te = root / "text_encoder"
    if not te.is_dir():
        _fail_missing(root, "the text_encoder/ folder", "download the text_encoder/ (and tokenizer/) folders of the model's repo beside the transformer file")
    tok = _tokenizer_folder(root, te)
    if tok is None:
        _fail_missing(root, "the tokenizer/ folder", "download the tokenizer/ folder of the model's repo beside text_encoder/")
    shapes = _bfl_shapes(transformer_file)
    arch = variant_of(config_from_weights(shapes)) if "img_in.weight" in shapes else None
    has_guidance = "guidance_in.in_layer.weight" in shapes or any("guidance_embedder" in k for k in shapes)
    stem = transformer_file.stem.lower()
    if has_guidance:
        family = "dev"
    elif "base" in stem:
        family = "klein-base"
    elif variant is not None:
        family = family_of(variant)
    elif "klein" in stem:
        family = "klein"
    else:
        raise ModelLoadError(
            f"{transformer_file}: cannot tell distilled klein from klein-base by the file name; pass variant= "
            "(e.g. klein-4b or klein-base-4b)"
        )
    detected = _size_variant(None, arch, family)
    variant = _reconcile(transformer_file, variant, family, detected)
    return ModelSource(root, "bfl", family_of(variant) if variant else family, variant or detected,
                       transformer_file, root / "ae.safetensors", te, tok)


def _bfl_shapes(file: Path) -> dict[str, tuple]:
    """Key -> shape of a single-file transformer, BFL prefixes stripped (nothing is read but the header)."""
    from mflux2.models.transformer import _BFL_PREFIXES

    out = {}
    for k, v, _ in iter_tensors([file]):
        for prefix in _BFL_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = tuple(v.shape)
    return out


def _resolve_mflux2(root: Path, variant: str | None) -> ModelSource:
    try:
        cfg = json.loads((root / MFLUX2_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{root / MFLUX2_CONFIG}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("format") != "mflux2" or cfg.get("version", 0) > MFLUX2_FORMAT_VERSION:
        raise ModelLoadError(f"{root / MFLUX2_CONFIG}: unsupported format {cfg.get('format')!r} version {cfg.get('version')!r} — upgrade mflux2")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            _fail_missing(root, f"the {sub}/ folder", "convert the model again with scripts/convert.py")
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ModelLoadError(f"{root / MFLUX2_CONFIG}: family {family!r} is not one of {', '.join(FAMILIES)}")
    variant = _reconcile(root, variant, family, cfg.get("variant"))
    return ModelSource(root, "mflux2", family, variant, root / "transformer", root / "vae",
                       root / "text_encoder", root / "tokenizer", cfg)


def _reconcile(source, asked: str | None, family: str, detected: str | None) -> str | None:
    """The user's variant wins only if it agrees with what the files are."""
    if asked is None:
        return detected
    if detected is not None and asked != detected:
        raise ModelLoadError(f"{source}: you asked for variant {asked!r} but the files are {detected}{_base_hint(asked, detected)}")
    if detected is None and family_of(asked) != family:
        raise ModelLoadError(f"{source}: you asked for variant {asked!r} but the files are a {family} model{_base_hint(asked, family)}")
    return asked


def _base_hint(asked: str, found: str) -> str:
    """Training configs name klein-4b/-9b and train the klein-base weights: say how to use a
    distilled folder instead (or where the base weights are)."""
    if asked.startswith("klein-base") and not found.startswith("klein-base") and found.startswith("klein"):
        return (" (a training config's klein-4b/klein-9b trains the klein-base weights: point model.path at "
                "FLUX.2-klein-base-*, or set model.use_base: false to train these distilled weights)")
    return ""


# ----------------------------------------------------------------------------------------------
# MLX-layout components (folders written by scripts/convert.py)


def save_component(module: nn.Module | list[tuple[str, mx.array]], folder: Path, config: dict,
                   shard_bytes: int = 4 << 30, progress=None) -> None:
    """Write a module's parameters (or (key, array) pairs) as MLX-layout safetensors shards
    (+ an index when there are several) and its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    params = tree_flatten(module.parameters()) if isinstance(module, nn.Module) else list(module)
    shards, current, size = [], {}, 0
    for k, v in params:
        if current and size + v.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += v.nbytes
    shards.append(current)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(folder / fname), shard, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
        if progress is not None:
            progress.update(sum(v.nbytes for v in shard.values()))
    if n > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(v.nbytes for _, v in params)}, "weight_map": weight_map}, indent=1)
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_component(module: nn.Module, folder: Path, dtype: mx.Dtype, quantization: dict | None = None,
                   keep_float32=lambda key: False) -> nn.Module:
    """Fill `module` (freshly built, lazily initialised) from an MLX-layout folder written by
    `save_component`. Quantised layers are recreated where the files hold `<layer>.scales`;
    floating-point tensors are cast to `dtype` unless `keep_float32(key)` (e.g. the VAE's
    batch-norm statistics); packed quantised weights keep their integer type."""
    files = safetensors_files(folder)
    weights = {k: v for k, v, _ in iter_tensors(files)}
    if quantization:
        def quantized_as_stored(p, m):  # each layer's group size from its stored shapes (they may differ)
            if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
                return False
            group = m.weight.shape[-1] // weights[f"{p}.scales"].shape[-1]
            return {"group_size": group, "bits": quantization["bits"], "mode": "affine"}

        nn.quantize(module, class_predicate=quantized_as_stored)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}
    check_keys(expected, {k: tuple(v.shape) for k, v in weights.items()}, folder)
    loaded = [
        (k, v.astype(mx.float32 if keep_float32(k) else dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in weights.items()
    ]
    module.load_weights(loaded, strict=True)
    # The module must hold the only references: a file tensor still named in `weights` would stay in
    # memory beside its cast once evaluated.
    del weights, loaded
    mx.eval(module.parameters())
    module.eval()
    return module
