"""Finding and reading safetensors checkpoints, shared by every model loader.

Each model file owns its key mapping (a `sanitize` of a few rules); this module only knows
where the tensors live and how to report problems in one actionable line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx


class WeightsError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model. The message is one line."""


def resolve_component(path: str | Path, subfolder: str, marker_files: Iterable[str] = ("config.json",)) -> Path:
    """Return the file or folder holding one component's weights.

    `path` may be a single .safetensors file, the component folder itself (holding one of
    `marker_files` or safetensors), or a model folder with `subfolder/` inside.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise WeightsError(f"{p}: expected a .safetensors file or a folder")
        return p
    if (p / subfolder).is_dir():
        return p / subfolder
    if any((p / m).exists() for m in marker_files) or any(p.glob("*.safetensors")):
        return p
    raise WeightsError(f"{p}: no '{subfolder}/' folder and no safetensors weights inside")


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a component: a single file, the shards named by an
    `*.safetensors.index.json`, or every `*.safetensors` in the folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise WeightsError(f"{indexes[0]}: index has an empty weight_map")
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise WeightsError(f"{indexes[0]}: shard(s) missing: {', '.join(missing[:3])} — re-download the model")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no .safetensors files")
    return files


def read_config(path: Path, name: str = "config.json") -> dict | None:
    f = Path(path) / name if Path(path).is_dir() else Path(path).parent / name
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, mx.array, Path]]:
    """Yield (key, lazy array, file). `mx.load` maps the file lazily: nothing is read until a
    tensor is evaluated, so converting tensor by tensor never holds two copies of the weights."""
    for f in files:
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a long text
            raise WeightsError(f"{f}: cannot read safetensors ({str(e).splitlines()[0]}) — the file is corrupt or truncated") from None
        for k, v in tensors.items():
            yield k, v, f


def tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name)} from the safetensors headers alone (no tensor is read or mapped):
    what the dry run weighs components with."""
    import json
    import struct

    out = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise WeightsError(f"{f}: cannot read the safetensors header ({e}) — the file is corrupt or truncated") from None
        out.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return out


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], source: str | Path) -> None:
    """Compare {key: shape} dicts and raise one line naming the first offending keys."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    if missing:
        raise WeightsError(f"{source}: missing key(s) {_few(missing)} — incomplete checkpoint or wrong model")
    if unexpected:
        raise WeightsError(f"{source}: unexpected key(s) {_few(unexpected)} — not a checkpoint of this model")
    bad = [k for k in expected if tuple(expected[k]) != tuple(found[k])]
    if bad:
        k = sorted(bad)[0]
        raise WeightsError(
            f"{source}: shape mismatch for {k}: checkpoint {tuple(found[k])}, model {tuple(expected[k])}"
            + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
        )
