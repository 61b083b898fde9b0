"""`lora.init_from`: start a new run from an existing adapter's weights.

The file's factors replace the fresh LoRA's (A Kaiming-uniform, B zero) before the first step; the
optimiser state and the step count start fresh, as ai-toolkit's `network.pretrained_lora_path`
does. A run that resumes from a checkpoint ignores it: the checkpoint holds the weights trained
from it, and loading the file again would throw that training away. The file must be the adapter
the `lora:` section describes — same type, rank and target layers, each layer the model's shape —
else one line names the first layer that differs; a different alpha is fine: B is rescaled so
the file's ΔW is exactly what training starts from. docs/lora.md ("Starting from an existing adapter").
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from mflux2.lora_formats import LoRAError

KNOWN_NAMES = ("lora_final.safetensors", "lora.safetensors")  # an mflux2 output or checkpoint folder


def resolve(spec: str, local_only: bool = False) -> Path | None:
    """The LoRA file `spec` names: a .safetensors file; a folder holding one (or an mflux2 output /
    checkpoint folder: lora_final / lora.safetensors); or a Hugging Face repo `owner/name` (its one
    .safetensors file) or `owner/name/path/in/repo.safetensors`, downloaded like models (mflux2.hub:
    the cache, HF_HUB_OFFLINE, one-line errors). `local_only` (the dry run): the cache only; None
    when the file is not there."""
    from mflux2 import hub

    p = Path(spec).expanduser()
    if p.exists():
        return _file_in(p, spec)
    parts = spec.strip("/").split("/")
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    local = hub.parent_folder_exists(spec) or Path(parts[0]).expanduser().is_dir()  # a mistyped local path
    if local or len(parts) < 2 or not hub.looks_like_repo_id(repo):
        raise LoRAError(f"lora.init_from {spec}: no such file or folder{hub.missing_path_note(spec)}, "
                        "and not a Hugging Face repo (owner/name or owner/name/file.safetensors)")
    patterns = [inner] if inner else ["*.safetensors"]
    if local_only:
        import huggingface_hub
        from huggingface_hub import constants

        try:
            folder = huggingface_hub.snapshot_download(repo, allow_patterns=patterns, cache_dir=constants.HF_HUB_CACHE,
                                                       local_files_only=True)
        except Exception:  # not cached (LocalEntryNotFoundError and kin)
            return None
    else:
        folder = hub.download(repo, allow_patterns=patterns, names={})
    folder = Path(folder)
    target = folder / inner if inner else folder
    if not target.exists():
        return None if local_only else _fail(f"lora.init_from {spec}: the repo {repo} has no file {inner}")
    return _file_in(target, spec)


def _fail(msg: str):
    raise LoRAError(msg)


def _file_in(p: Path, spec: str) -> Path:
    if p.is_file():
        if p.suffix != ".safetensors":
            raise LoRAError(f"lora.init_from {spec}: {p.name} is not a .safetensors LoRA file")
        return p
    files = sorted(p.glob("*.safetensors"))
    for name in KNOWN_NAMES:
        if (p / name).is_file():
            return p / name
    if len(files) == 1:
        return files[0]
    if not files:
        raise LoRAError(f"lora.init_from {spec}: no .safetensors file in {p}")
    raise LoRAError(f"lora.init_from {spec}: several .safetensors files in {p} ({', '.join(f.name for f in files[:3])}"
                    f"{', ...' if len(files) > 3 else ''}); name the one to start from")


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


def check(weights: dict, expected: dict, lora_cfg, source) -> None:
    """One line naming the first layer (in model order) where the file and the `lora:` section differ."""
    want_type = getattr(lora_cfg, "type", "lora")  # lora.type arrives with the LoKr/LoHa/DoRA trainer
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
            raise LoRAError(f"{where}: layer {name} is a {w.type} adapter, lora.type is {want_type}")
        if tuple(w.shape) != tuple(shape):
            raise LoRAError(f"{where}: shape mismatch for {name}: file {tuple(w.shape)}, model {tuple(shape)} — a LoRA for another model?")
        if w.rank != lora_cfg.rank:
            raise LoRAError(f"{where}: layer {name} has rank {w.rank}, lora.rank is {lora_cfg.rank}")
        for axis, rng in ((0, out_range), (1, in_range)):
            if rng is not None and _outside(w.B if axis == 0 else w.A, axis, rng):
                raise LoRAError(f"{where}: {name} changes weights outside lora.target_layers {lora_cfg.target_layers!r}'s "
                                f"range {rng[0]}:{rng[1]} — the file was trained with target_layers all?")


def _outside(x: mx.array, axis: int, rng) -> bool:
    lo, hi = rng
    rest = mx.concatenate([x[:lo], x[hi:]], axis=0) if axis == 0 else mx.concatenate([x[:, :lo], x[:, hi:]], axis=1)
    return bool(rest.size and mx.any(rest != 0).item())


def apply(model, weights: dict) -> None:
    """Put the file's factors into the model's trainable LoRA layers (after `apply_lora`); B is
    rescaled by file alpha / configured alpha so the delta is the file's exactly."""
    from mflux2.lora import LoRALinear, _get

    for name, w in weights.items():
        layer = _get(model, name)
        if not isinstance(layer, LoRALinear):
            raise LoRAError(f"lora.init_from: {name} has no LoRA layer in the model")
        a = w.A[:, layer.in_start : layer.in_stop]
        b = w.B[layer.out_start : layer.out_stop] * (w.alpha / layer.alpha)
        layer.lora_A, layer.lora_B = a.astype(mx.float32), b.astype(mx.float32)
    mx.eval([(m.lora_A, m.lora_B) for m in (_get(model, n) for n in weights)])


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
