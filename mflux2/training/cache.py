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


FINGERPRINT_SAMPLES = 8  # chunks read from each weights file
FINGERPRINT_CHUNK = 1 << 16


def weights_fingerprint(path: str | Path) -> str:
    """A fingerprint of a component's weights by content, not by where or when they were written:
    each safetensors file's size, header (tensor names, dtypes, shapes, offsets) and 8 chunks of
    64 KiB spread over its data. The same for a moved or copied folder (unlike `weights_identity`,
    which counts modification times); cheap for an 8 GB model (a few reads per file)."""
    from mflux2.weights import safetensors_files

    h = hashlib.sha256()
    for f in sorted(safetensors_files(Path(path)), key=lambda f: f.name):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = fh.read(min(n, size))
            h.update(json.dumps([size, n]).encode())
            h.update(header)
            start = 8 + len(header)
            span = max(size - start - FINGERPRINT_CHUNK, 0)
            for i in range(FINGERPRINT_SAMPLES):
                fh.seek(start + span * i // max(FINGERPRINT_SAMPLES - 1, 1))
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()[:16]


def model_identity(source) -> dict[str, str]:
    """What a LoRA checkpoint was trained on, independent of where the model lies: the transformer's
    architecture (family, variant, config) and a fingerprint of its weights (`weights_fingerprint`).
    `resume_signature` compares it, so a run resumes from a moved folder but not on another model."""
    from mflux2.training.memory import _source_config

    config = {"family": source.family, "variant": source.variant, **_source_config(source).to_dict()}
    return {
        "model.config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        "model.weights": weights_fingerprint(source.transformer),
    }


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
