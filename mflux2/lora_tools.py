"""`mflux2-lora`: tools for LoRA files and the models they adapt.

    mflux2-lora merge MODEL OUT --lora style.safetensors:0.8 --lora face.safetensors
    mflux2-lora resize IN OUT --rank 8            (or --energy 0.99: per-layer ranks)
    mflux2-lora extract BASE TUNED OUT --rank 32
    mflux2-lora convert IN OUT --format kohya [--type lora --rank 16]
    mflux2-lora info FILE

Everything works on each layer's dense change ΔW [out, in] (the adapter's `delta(base)`, whatever
its type: LoRA, DoRA, LoKr, LoHa), so a type this module has never heard of works once
`mflux2.lora_formats` reads it. Models are read tensor by tensor (`mx.load` maps safetensors
lazily): a merge holds one output shard and one layer's delta, never two copies of the transformer.
Low-rank approximations are truncated SVDs in float32 (the best rank-r approximation in Frobenius
norm, Eckart–Young); the energy printed per layer is Σ kept σ² / Σ σ². docs/lora.md ("Tools").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import numpy as np

from mflux2.lora_formats import FORMATS, LoRAError, LoRAWeights, bfl_module, read_lora, scaled_delta, write_lora
from mflux2.weights import WeightsError, safetensors_files

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
MFLUX2_CONFIG = "mflux2.json"  # mflux2.model_files.MFLUX2_CONFIG (not imported: keeps `info` light)


def _bar(total: int, desc: str, quiet: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=quiet or None)


# ----------------------------------------------------------------------------------------------
# A transformer on disk, read lazily in BFL terms


class TransformerFiles:
    """The transformer tensors of a model folder (diffusers, BFL or mflux2 layout, or the transformer
    folder/file itself), mapped lazily: `weight(bfl_module)` is one linear layer's weight [out, in]
    in float32 in BFL's orientation (q/k/v fused, the final adaLN as [shift; scale]), dequantised
    when stored quantised."""

    def __init__(self, path: str | Path):
        self.root = _model_root(path)
        self.layout, self.files, self.bits = _transformer_files(self.root)
        self.tensors: dict[str, mx.array] = {}
        self.file_of: dict[str, Path] = {}
        self.metadata: dict[Path, dict] = {}
        for f in self.files:
            try:
                tensors, meta = mx.load(str(f), return_metadata=True)
            except Exception as e:  # mlx's message is long
                raise WeightsError(f"{f}: cannot read safetensors ({str(e).splitlines()[0]})") from None
            self.metadata[f] = meta
            for k, v in tensors.items():
                self.tensors[k] = v
                self.file_of[k] = f
        # BFL module -> [(file key, part)] for every 2-D linear weight we know
        self.parts: dict[str, list[tuple[str, object]]] = {}
        for k in self.tensors:
            target = self.target(k)
            if target is not None:
                self.parts.setdefault(target[0], []).append((k, target[1]))
        if not self.parts:
            raise WeightsError(f"{self.root}: no FLUX.2 transformer linear weights found in {', '.join(f.name for f in self.files)}")

    def as_base(self) -> "_BaseWeights":
        """{BFL module: weight} read on demand: what lora_formats needs for DoRA's ComfyUI form."""
        return _BaseWeights(self)

    def target(self, key: str) -> tuple[str, object] | None:
        """(BFL module, part) of a linear weight key; None for anything else (biases, norms, scales)."""
        if not key.endswith(".weight") or self.tensors[key].ndim != 2:
            return None
        return bfl_module(key[: -len(".weight")])

    def quantized(self, key: str) -> bool:
        return key.endswith(".weight") and key[: -len(".weight")] + ".scales" in self.tensors

    def dense(self, key: str) -> mx.array:
        """A weight tensor as stored, dequantised (float32) when it is packed."""
        w = self.tensors[key]
        if not self.quantized(key):
            return w
        mod = key[: -len(".weight")]
        scales, biases = self.tensors[mod + ".scales"], self.tensors.get(mod + ".biases")
        return mx.dequantize(w, scales, biases, group_size=self.group_size(key), bits=self.bits).astype(mx.float32)

    def group_size(self, key: str) -> int:
        w, scales = self.tensors[key], self.tensors[key[: -len(".weight")] + ".scales"]
        return w.shape[-1] * 32 // self.bits // scales.shape[-1]

    def weight(self, module: str) -> mx.array:
        parts = self.parts.get(module)
        if parts is None:
            raise WeightsError(f"{self.root}: the transformer has no layer {module}")
        if len(parts) == 1 and parts[0][1] is None:
            return self.dense(parts[0][0]).astype(mx.float32)
        if parts[0][1] == "swap":
            scale, shift = mx.split(self.dense(parts[0][0]).astype(mx.float32), 2, axis=0)
            return mx.concatenate([shift, scale], axis=0)
        by_part = {p: k for k, p in parts}
        return mx.concatenate([self.dense(by_part[i]).astype(mx.float32) for i in sorted(by_part)], axis=0)


class _BaseWeights(Mapping):
    """A TransformerFiles as a read-only {BFL module: float32 weight} mapping, each weight read when asked."""

    def __init__(self, files: TransformerFiles):
        self.files = files

    def __getitem__(self, name: str) -> mx.array:
        if name not in self.files.parts:
            raise KeyError(name)
        return self.files.weight(name)

    def __iter__(self):
        return iter(self.files.parts)

    def __len__(self) -> int:
        return len(self.files.parts)


def _model_root(path: str | Path) -> Path:
    """A local folder or file as given; otherwise a hub id / short name, resolved (offline-aware)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    from mflux2.model_files import resolve_source

    return resolve_source(str(path)).root


def _transformer_files(root: Path) -> tuple[str, list[Path], int | None]:
    """(layout, transformer safetensors files, quantisation bits) of a model folder or file."""
    if root.is_file():
        if root.suffix != ".safetensors":
            raise WeightsError(f"{root}: expected a model folder or a transformer .safetensors file")
        return "bfl", [root], None
    if (root / MFLUX2_CONFIG).is_file():
        try:
            cfg = json.loads((root / MFLUX2_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{root / MFLUX2_CONFIG}: not valid JSON ({e.msg})") from None
        q = (cfg.get("transformer") or {}).get("quantization") or {}
        return "mflux2", safetensors_files(root / "transformer"), q.get("bits")
    if (root / "transformer").is_dir():
        return "diffusers", safetensors_files(root / "transformer"), None
    if (root / "config.json").is_file():  # the transformer folder itself
        return "diffusers", safetensors_files(root), None
    from mflux2.model_files import bfl_transformer_files

    singles = bfl_transformer_files(root)
    if len(singles) == 1:  # a BFL folder: the transformer file beside ae.safetensors
        return "bfl", singles, None
    if len(singles) > 1:
        raise WeightsError(f"{root}: several transformer files ({', '.join(f.name for f in singles)}); pass the one to use")
    raise WeightsError(f"{root}: not a FLUX.2 model folder (no {MFLUX2_CONFIG}, no transformer/ folder, no transformer .safetensors file)")


# ----------------------------------------------------------------------------------------------
# merge


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:SCALE` (a path may itself contain ':' — only a numeric tail is a scale)."""
    path, sep, tail = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        return path, float(tail)
    return text, 1.0


def merge(model: str | Path, out: str | Path, loras: list[tuple[str, float]], dtype: str | None = None,
          force: bool = False, quiet: bool = False, log=print) -> Path:
    """Bake `loras` [(file, scale)] into the transformer of `model` and write the whole model to `out`
    in the source's layout (diffusers, BFL or mflux2): the transformer's shards rewritten with the
    same names and keys, every other file hard-linked (or copied). Merged weights keep each
    tensor's dtype (quantised ones are requantised with their bits and group size) unless `dtype`
    names one: then every floating transformer tensor is written in it, and a quantised transformer
    is written dequantised. Several LoRAs add up: W + Σ ΔW_i(scale_i), each against the original W:
    scale_i · ΔW_i, except DoRA, whose scale goes on B A inside its norm as when the file is loaded
    at that scale (lora_formats.scaled_delta)."""
    if not loras:
        raise LoRAError("merge: give at least one --lora FILE[:SCALE]")
    if dtype is not None and dtype not in DTYPES:
        raise LoRAError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    src = TransformerFiles(model)
    if src.root.is_file():
        raise WeightsError(f"{src.root}: merge needs the model folder (the transformer file's folder holds the other components)")
    out = Path(out).expanduser().resolve()
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not force:
            raise LoRAError(f"{out} already exists: choose another output or pass --force to replace it")
        if out.is_file() or not (out / "mflux2_merge.json").is_file():
            raise LoRAError(f"{out} exists and is not an earlier merge; --force only replaces those — remove it yourself")
    if out == src.root.resolve() or src.root.resolve() in out.parents:
        raise LoRAError(f"{out}: the output must not be the source folder or lie inside it")

    adapters = []  # [(file, scale, {BFL module: weights})]
    for path, scale in loras:
        weights, _ = read_lora(path, base=src.as_base())
        for name, w in weights.items():
            if name not in src.parts:
                raise LoRAError(f"{path}: layer {name} is not in the model {src.root} — a LoRA for another FLUX.2 variant?")
            if tuple(w.shape) != _shape(src, name):
                raise LoRAError(f"{path}: shape mismatch for {name}: LoRA delta {tuple(w.shape)}, model layer {_shape(src, name)}")
        adapters.append((path, scale, weights))
    touched = {name for _, _, ws in adapters for name in ws}
    target_dtype = DTYPES.get(dtype)
    log(f"merging {len(loras)} LoRA(s) into {len(touched)} layer(s) of {src.root} ({src.layout} layout"
        + (f", int{src.bits} requantised" if src.bits and target_dtype is None else "")
        + (f", written as {dtype}" if dtype else ", each tensor in its stored dtype") + ")")

    cache: dict[str, mx.array] = {}

    def delta(name: str) -> mx.array:  # the summed delta of one BFL module; q/k/v parts share it
        if name not in cache:
            cache.clear()
            dora = any(name in ws and ws[name].type == "dora" for _, _, ws in adapters)
            base = src.weight(name) if dora else None
            total = None
            for _, scale, ws in adapters:
                if name in ws:
                    d = scaled_delta(ws[name], scale, base)  # as load_lora(scale=...): DoRA's inside the norm
                    total = d if total is None else total + d
            cache[name] = total
        return cache[name]

    def merged(key: str) -> mx.array:  # W + Δ for one stored weight (its rows of the BFL module), float32
        name, part = src.target(key)
        d = delta(name)
        if part == "swap":
            shift, scale = mx.split(d, 2, axis=0)
            d = mx.concatenate([scale, shift], axis=0)
        elif part is not None:
            n = src.tensors[key].shape[0]
            d = d[part * n : (part + 1) * n]
        return src.dense(key).astype(mx.float32) + d

    requantized: dict[str, dict] = {}

    def quantized_tensor(mod: str, leaf: str) -> mx.array | None:  # weight/scales/biases of a requantised layer
        if mod not in requantized:
            requantized.clear()
            k = mod + ".weight"
            w = merged(k).astype(src.tensors[mod + ".scales"].dtype)
            q = mx.quantize(w, group_size=src.group_size(k), bits=src.bits)
            requantized[mod] = {"weight": q[0], "scales": q[1], "biases": q[2] if len(q) > 2 else None}
        return requantized[mod][leaf]

    def touched_key(k: str) -> bool:
        t = src.target(k) if k.endswith(".weight") else None
        return t is not None and t[0] in touched

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        _link_tree(src.root, tmp, skip=set(src.files))
        with _bar(sum(len(src.parts[n]) for n in touched), "merge", quiet) as bar:
            for f in src.files:
                shard = {}
                for k in [k for k in src.tensors if src.file_of[k] == f]:
                    mod, _, leaf = k.rpartition(".")
                    packed = leaf in ("weight", "scales", "biases") and src.quantized(mod + ".weight")
                    v = src.tensors[k]
                    if packed and target_dtype is not None:  # written dequantised: no scales/biases
                        if leaf != "weight":
                            continue
                        v = merged(k) if touched_key(k) else src.dense(k)
                    elif packed and touched_key(mod + ".weight"):
                        v = quantized_tensor(mod, leaf)
                        if v is None:
                            continue
                    elif not packed and touched_key(k):
                        v = merged(k).astype(v.dtype)
                    if target_dtype is not None and mx.issubdtype(v.dtype, mx.floating):
                        v = v.astype(target_dtype)
                    shard[k] = v
                    if leaf == "weight" and touched_key(k):
                        bar.update(1)
                dest = tmp / f.relative_to(src.root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                mx.save_safetensors(str(dest), shard, metadata=src.metadata[f] or {"format": "pt"})
                del shard
                mx.clear_cache()
        _rewrite_records(src, tmp, loras, dtype)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def _link_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Every file of `src` but `skip` into `dst`: hard links where the disk allows (the files are
    never written in place), else copies. Symlinks (a hub snapshot's) are followed."""
    for p in sorted(src.rglob("*")):
        if p in skip or p.is_dir() or any(part.startswith(".") for part in p.relative_to(src).parts):
            continue
        d = dst / p.relative_to(src)
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p.resolve(), d)
        except OSError:
            shutil.copy2(p, d)


def _rewrite_records(src: TransformerFiles, tmp: Path, loras, dtype: str | None) -> None:
    """The index's total size, mflux2.json's transformer record, and a note of what was merged."""
    folder = tmp / src.files[0].parent.relative_to(src.root)
    for index in folder.glob("*.safetensors.index.json"):
        idx = json.loads(index.read_text())
        idx.setdefault("metadata", {})["total_size"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        index.unlink()  # a hard link to the source's: replace, never write through it
        index.write_text(json.dumps(idx, indent=1))
    record = {"merged_loras": [{"path": str(Path(p).resolve()), "scale": s} for p, s in loras], "dtype": dtype or "as stored",
              "merged_by": "mflux2-lora merge"}
    if src.layout == "mflux2":
        cfg_path = tmp / MFLUX2_CONFIG
        cfg = json.loads(cfg_path.read_text())
        cfg_path.unlink()
        if dtype is not None:
            cfg.setdefault("transformer", {})["quantization"] = None
        cfg["transformer"]["merged_loras"] = record["merged_loras"]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    (tmp / "mflux2_merge.json").write_text(json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Low-rank approximations: resize, extract, convert --type lora


def low_rank(delta: mx.array | np.ndarray, rank: int | None = None, energy: float | None = None) -> tuple[LoRAWeights, float, int]:
    """The best rank-r approximation of ΔW as LoRAWeights (alpha = rank: scale 1), the energy it
    keeps (Σ kept σ² / Σ σ²) and r. `energy` picks the smallest r that keeps at least that share.
    The factors split √σ evenly (B = U√Σ, A = √Σ Vᵀ); a rank above min(out, in) is padded with
    zero rows/columns so every layer has the asked rank."""
    d = np.asarray(delta, dtype=np.float32)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    s2 = s.astype(np.float64) ** 2
    total = s2.sum()
    if energy is not None:
        r = int(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1) if total > 0 else 1
        r = min(max(r, 1), len(s))
    else:
        r = int(rank)
    k = min(r, len(s))
    kept = float(s2[:k].sum() / total) if total > 0 else 1.0
    root = np.sqrt(s[:k])
    b = np.zeros((d.shape[0], r), np.float32)
    a = np.zeros((r, d.shape[1]), np.float32)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    return LoRAWeights(mx.array(a), mx.array(b), float(r)), kept, r


def _approximate(deltas, rank, energy, quiet, log, label="") -> dict[str, LoRAWeights]:
    """{name: low-rank LoRA} from an iterable of (name, ΔW), printing each layer's retained energy."""
    if (rank is None) == (energy is None):
        raise LoRAError("give either --rank R or --energy E")
    if rank is not None and rank < 1:
        raise LoRAError(f"--rank {rank}: must be a positive integer")
    if energy is not None and not 0 < energy <= 1:
        raise LoRAError(f"--energy {energy}: must be in (0, 1]")
    out, kept = {}, []
    items = list(deltas)
    with _bar(len(items), label or "svd", quiet) as bar:
        for name, get in items:
            w, e, r = low_rank(get(), rank, energy)
            out[name] = w
            kept.append(e)
            log(f"  {name}: rank {r}, energy {e:.6f}")
            bar.update(1)
    if not out:
        raise LoRAError("no layers to approximate")
    ranks = Counter(w.rank for w in out.values())
    log(f"{len(out)} layer(s); rank {_ranks(ranks)}; retained energy mean {np.mean(kept):.6f}, min {np.min(kept):.6f}")
    return out


def _ranks(ranks: Counter) -> str:
    if len(ranks) == 1:
        return str(next(iter(ranks)))
    return f"{min(ranks)}–{max(ranks)} (" + ", ".join(f"{r}×{n}" for r, n in sorted(ranks.items())) + ")"


def _base_for(weights: dict, base: str | None, path) -> TransformerFiles | None:
    """A DoRA delta needs the base weights: `--base MODEL`."""
    if any(w.type == "dora" for w in weights.values()):
        if base is None:
            raise LoRAError(f"{path}: a DoRA adapter's delta depends on the base weights: pass --base MODEL")
        return TransformerFiles(base)
    return None


def _meta_for_lora(metadata: dict, **extra) -> dict:
    """Training metadata carried over; the source's own layout/alpha records dropped (write_lora
    writes its own)."""
    drop = ("format", "lora_format", "rank", "alpha", "alpha_folded", "lora_adapter_metadata", "software")
    keep = {k: v for k, v in metadata.items() if k not in drop and not k.startswith("ss_network_")}
    keep.update({k: str(v) for k, v in extra.items()})
    return keep


def resize(src: str | Path, dst: str | Path, rank: int | None = None, energy: float | None = None, format: str = "bfl",
           base: str | None = None, quiet: bool = False, log=print) -> Path:
    """A LoRA of any type -> a plain LoRA of `rank` (or per-layer ranks keeping `energy`)."""
    model = TransformerFiles(base) if base else None
    weights, metadata = read_lora(src, base=model.as_base() if model else None)
    model = model or _base_for(weights, base, src)
    log(f"{src}: {len(weights)} layer(s), type {_types(weights)}, rank {_ranks(Counter(w.rank for w in weights.values()))}")
    approx = _approximate(((n, lambda w=weights[n], n=n: w.delta(model.weight(n) if model else None))
                           for n in sorted(weights, key=_natural)), rank, energy, quiet, log, "resize")
    meta = _meta_for_lora(metadata, resized_from=f"{_types(weights)} rank {_ranks(Counter(w.rank for w in weights.values()))}")
    out = write_lora(dst, approx, format, meta, _file_dtype(src))
    log(f"wrote {out}")
    return out


def extract(base: str | Path, tuned: str | Path, dst: str | Path, rank: int | None = None, energy: float | None = None,
            format: str = "bfl", quiet: bool = False, log=print) -> Path:
    """A LoRA from the difference of two transformers, layer by layer (only changed layers)."""
    a, b = TransformerFiles(base), TransformerFiles(tuned)
    missing = sorted(set(a.parts) ^ set(b.parts))
    if missing:
        raise WeightsError(f"{tuned}: layer {missing[0]} is in only one of the two transformers — not the same architecture")
    layers = []
    for name in sorted(a.parts, key=_natural):
        if _shape(a, name) != _shape(b, name):
            raise WeightsError(f"{tuned}: shape mismatch for {name}: {_shape(b, name)} vs base {_shape(a, name)}")
        layers.append(name)
    unchanged, changed = [], []
    with _bar(len(layers), "compare", quiet) as bar:
        for name in layers:
            diff = b.weight(name) - a.weight(name)
            (changed if mx.any(diff != 0).item() else unchanged).append(name)
            bar.update(1)
    if not changed:
        raise LoRAError(f"{tuned}: every linear layer equals the base's ({base}): nothing to extract")
    log(f"{len(changed)} changed layer(s), {len(unchanged)} unchanged")
    approx = _approximate(((n, lambda n=n: b.weight(n) - a.weight(n)) for n in changed), rank, energy, quiet, log, "extract")
    meta = {"base_model": _model_name(a), "extracted_from": str(Path(str(tuned)).expanduser()),
            "extracted_rank": str(rank) if rank is not None else f"energy {energy}", "targets": "custom"}
    out = write_lora(dst, approx, format, meta)
    log(f"wrote {out}")
    return out


def convert(src: str | Path, dst: str | Path, format: str = "bfl", type: str | None = None, rank: int | None = None,
            energy: float | None = None, base: str | None = None, dtype: str | None = None, strict: bool = True,
            quiet: bool = False, log=print) -> Path:
    """Rewrite a LoRA file in another layout (scripts/convert_lora.py); with `type="lora"`, layers of
    other types (LoKr, LoHa, DoRA) become plain LoRA by truncated SVD at `rank` / `energy`."""
    from mflux2.lora_formats import convert_lora

    if dtype is not None and dtype not in DTYPES:
        raise LoRAError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if type not in (None, "lora"):
        raise LoRAError(f"--type {type}: only 'lora' (conversion to plain LoRA by SVD) is supported")
    base_model = TransformerFiles(base) if base else None
    base_map = base_model.as_base() if base_model else None
    weights, metadata = read_lora(src, strict=strict, base=base_map)
    others = {n: w for n, w in weights.items() if w.type != "lora"}
    if type is None or not others:  # the layout only (plain LoRA layers are kept exact: `resize` changes ranks)
        out = convert_lora(src, dst, format, DTYPES.get(dtype), strict=strict, base=base_map)
        log(f"wrote {out} ({format})")
        return out
    if rank is None and energy is None:
        raise LoRAError(f"{src}: {len(others)} layer(s) are {_types(others)}: give --rank R or --energy E for the SVD")
    model = base_model or _base_for(others, base, src)
    approx = _approximate(((n, lambda w=others[n], n=n: w.delta(model.weight(n) if model else None))
                           for n in sorted(others, key=_natural)), rank, energy, quiet, log, "convert")
    merged = {n: approx.get(n, w) for n, w in weights.items()}
    meta = _meta_for_lora(metadata, converted_from=_types(weights))
    out = write_lora(dst, merged, format, meta, DTYPES.get(dtype) or _file_dtype(src))
    log(f"wrote {out} ({format}, lora)")
    return out


def _shape(t: TransformerFiles, name: str) -> tuple[int, int]:
    ks = t.parts[name]
    k0 = ks[0][0]
    n_in = t.tensors[k0].shape[1] * (32 // t.bits if t.quantized(k0) else 1)
    return sum(t.tensors[k].shape[0] for k, _ in ks), n_in


def _model_name(t: TransformerFiles) -> str:
    """The variant when the shapes tell it (klein-4b, klein-9b, dev), else the folder."""
    from mflux2.models.transformer import config_from_weights, variant_of

    shapes = {name + ".weight": _shape(t, name) for name in t.parts}
    for k, v in t.tensors.items():
        if k.endswith(("query_norm.scale", "norm_q.weight")):
            shapes.setdefault("double_blocks.0.img_attn.norm.query_norm.scale", tuple(v.shape))
    try:
        variant = variant_of(config_from_weights(shapes))
    except WeightsError:
        variant = None
    return variant or str(t.root)


def _types(weights: dict) -> str:
    return "+".join(sorted({w.type for w in weights.values()}))


def _file_dtype(path) -> mx.Dtype:
    tensors = mx.load(str(path))
    dt = next((v.dtype for v in tensors.values() if v.ndim == 2), mx.float32)
    return dt if dt in (mx.float32, mx.float16, mx.bfloat16) else mx.float32


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------
# info

# Key markers of each adapter type (LyCORIS/PEFT names), for files `read_lora` cannot read yet.
_TYPE_MARKERS = [("dora", (".dora_scale", "lora_magnitude_vector")), ("lokr", (".lokr_w1", ".lokr_w2")),
                 ("loha", (".hada_w1_a", ".hada_w2_a")), ("lora", (".lora_A", ".lora_down", ".lora_B", ".lora_up"))]
_TRAINING_KEYS = ("base_model", "trigger_word", "training_steps", "steps", "targets", "ss_base_model_version",
                  "ss_steps", "ss_epoch", "ss_output_name", "ss_learning_rate", "modelspec.architecture",
                  "modelspec.title", "extracted_from", "resized_from", "converted_from")


def detect_layout(keys) -> str:
    """The key layout: bfl (`diffusion_model.`/BFL names), diffusers (`transformer.`/diffusers names)
    or kohya (`lora_unet_`); 'mixed' or 'unknown' otherwise."""
    found = set()
    for k in keys:
        mod = re.sub(r"\.(lora_[AB]|lora_down|lora_up|alpha|lokr_\w+|hada_\w+|dora_scale|lora_magnitude_vector)(\.\w+)*$", "", k)
        if mod.startswith(("lora_unet_", "lora_transformer_")):
            found.add("kohya")
            continue
        t = bfl_module(mod)
        if t is None:
            continue
        bare = re.sub(r"^(base_model\.model\.|model\.diffusion_model\.|diffusion_model\.|transformer\.|unet\.)", "", mod)
        found.add("bfl" if bare.startswith(("double_blocks", "single_blocks")) or bare == t[0] else "diffusers")
    return found.pop() if len(found) == 1 else ("mixed" if found else "unknown")


def info(path: str | Path, log=print) -> dict:
    """The facts of a LoRA file; printed and returned."""
    from mflux2.weights import tensor_shapes

    path = Path(path).expanduser()
    if not path.is_file():
        raise LoRAError(f"{path}: no such LoRA file")
    header = tensor_shapes([path])
    try:
        _, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise LoRAError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    facts: dict = {"file": str(path), "layout": detect_layout(header), "tensors": len(header),
                   "parameters": int(sum(int(np.prod(s)) for s, _ in header.values())),
                   "file_dtype": "+".join(sorted({d for s, d in header.values() if len(s) == 2})) or "?"}
    if metadata.get("software") == "mflux2":
        facts["written_by"] = f"mflux2 ({metadata.get('lora_format', '?')} layout)"
    try:
        weights, _ = read_lora(path)
    except LoRAError as e:  # unreadable (incomplete, or DoRA in ComfyUI's form, which needs the base): what the keys tell
        weights = None
        types = [t for t, marks in _TYPE_MARKERS if any(m in k for k in header for m in marks)]
        facts["type"] = types[0] if types else "unknown"
        facts["note"] = f"not readable by this mflux2: {e}"
    if weights is not None:
        facts["type"] = _types(weights)
        facts["rank"] = _ranks(Counter(w.rank for w in weights.values()))
        alphas = Counter(getattr(w, "alpha", None) for w in weights.values())
        facts["alpha"] = _ranks(alphas) if None not in alphas else "none (scale 1)"
        if metadata.get("alpha_folded") == "true" and metadata.get("software") == "mflux2":
            facts["alpha"] += " (folded into B in the file)"
        facts["layers"] = len(weights)
        facts["targets"] = _targets(weights)
    facts["training"] = {k: metadata[k] for k in _TRAINING_KEYS if metadata.get(k)}
    width = max(len(k) for k in facts)
    for k, v in facts.items():
        if k == "targets":
            log(f"{'targets'.ljust(width)}  " + "; ".join(f"{t}: {n}" for t, n in v.items()))
        elif k == "training":
            log(f"{'training'.ljust(width)}  " + (", ".join(f"{a}={b}" for a, b in v.items()) or "no metadata"))
        else:
            log(f"{k.ljust(width)}  {v}")
    return facts


def _targets(weights: dict) -> dict[str, str]:
    """{layer kind: 'N layers (blocks a–b)'} in model order."""
    kinds: dict[str, list[int]] = {}
    for name in sorted(weights, key=_natural):
        m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", name)
        kind, idx = (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (name, -1)
        kinds.setdefault(kind, []).append(idx)
    out = {}
    for kind, idx in kinds.items():
        blocks = [i for i in idx if i >= 0]
        out[kind] = f"{len(idx)} ({_spans(blocks)})" if blocks else "1"
    return out


def _spans(ids: list[int]) -> str:
    ids, parts, start = sorted(set(ids)), [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return "blocks " + ",".join(parts)


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mflux2-lora", description="LoRA tools for FLUX.2: merge, resize, extract, convert, info.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("merge", help="bake LoRAs into a model's transformer and write the model")
    p.add_argument("model", help="model folder (diffusers, BFL or mflux2 layout), short name or hub id")
    p.add_argument("out", help="output folder (written to a temp folder, then renamed)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]", help="repeat for several LoRAs")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="write the transformer in this precision (default: as stored; quantised layers are requantised)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")

    p = sub.add_parser("resize", help="a LoRA (any type) to a LoRA of another rank by truncated SVD")
    p.add_argument("src")
    p.add_argument("dst")
    _rank_args(p)
    p.add_argument("--format", choices=FORMATS, default="bfl")
    p.add_argument("--base", help="the base model (needed for DoRA only)")

    p = sub.add_parser("extract", help="a LoRA from the difference of two transformers")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("dst")
    _rank_args(p)
    p.add_argument("--format", choices=FORMATS, default="bfl")

    p = sub.add_parser("convert", help="rewrite a LoRA in another layout (and/or as plain LoRA)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=FORMATS, default="bfl")
    p.add_argument("--type", choices=("lora",), help="convert every layer to plain LoRA by SVD (needs --rank or --energy)")
    p.add_argument("--rank", type=int)
    p.add_argument("--energy", type=float)
    p.add_argument("--base", help="the base model (needed for DoRA only)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output precision (default: that of the input)")
    p.add_argument("--lenient", action="store_true", help="skip keys that are not FLUX.2 LoRA tensors (listed as a warning)")

    p = sub.add_parser("info", help="what a LoRA file is")
    p.add_argument("file")
    for p in sub.choices.values():
        p.add_argument("--quiet", action="store_true", help="no progress bars or per-layer lines")
        p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = ap.parse_args(argv)
    log = print if not args.quiet or args.cmd == "info" else (lambda *a, **k: None)
    try:
        if args.cmd == "merge":
            merge(args.model, args.out, [parse_lora_arg(x) for x in args.lora], args.dtype, args.force, args.quiet, log)
        elif args.cmd == "resize":
            resize(args.src, args.dst, args.rank, args.energy, args.format, args.base, args.quiet, log)
        elif args.cmd == "extract":
            extract(args.base, args.tuned, args.dst, args.rank, args.energy, args.format, args.quiet, log)
        elif args.cmd == "convert":
            convert(args.src, args.dst, args.format, args.type, args.rank, args.energy, args.base, args.dtype,
                    not args.lenient, args.quiet, log)
        else:
            info(args.file, log)
    except (LoRAError, WeightsError, OSError, RuntimeError) as e:  # hub.ModelLoadError is a RuntimeError
        if args.debug:
            raise
        text = str(e).strip()
        print(f"mflux2-lora {args.cmd}: error: {text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
        return 1
    return 0


def _rank_args(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="the rank of every layer")
    g.add_argument("--energy", type=float, help="per layer, the smallest rank keeping this share of Σσ² (e.g. 0.99)")


if __name__ == "__main__":
    sys.exit(main())
