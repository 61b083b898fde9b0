"""Latent and text-embedding caches on disk.

Entries are safetensors files named by a hash of everything that determines their content (image
bytes + bucket + VAE identity; prompt + text-encoder identity), written atomically. An entry that
cannot be read (a crash on a filesystem without atomic rename, a truncated copy) is treated as
missing and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from mflux2.training.outputs import atomic_write


def weights_identity(path: str | Path, extra: dict | None = None) -> str:
    """Identity of a model component: its weight files' names, sizes and mtimes (hashing 8 GB of
    content would cost more than the cache saves), plus dtype/quantisation in `extra`."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".json"))
    desc = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps([desc, extra or {}], sort_keys=True).encode()).hexdigest()[:16]


class DiskCache:
    def __init__(self, folder: Path, identity: str):
        self.folder = Path(folder)
        self.identity = identity
        self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, *parts) -> str:
        return hashlib.sha256(json.dumps([self.identity, *parts]).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, mx.array] | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            arrays = mx.load(str(p))
            mx.eval(list(arrays.values()))
            return arrays
        except Exception:
            p.unlink(missing_ok=True)  # unreadable: rebuild it
            return None

    def put(self, key: str, arrays: dict[str, mx.array]) -> None:
        mx.eval(list(arrays.values()))
        atomic_write(self.path(key), lambda tmp: mx.save_safetensors(tmp, arrays))

    def has(self, key: str) -> bool:
        return self.path(key).exists()
