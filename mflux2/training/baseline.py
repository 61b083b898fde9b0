"""The baseline images (the validation prompts rendered before training, step 0) as a cache.

Like the latent and text caches, an entry is named by a hash of everything its content depends on
(`baseline_key`): the model that renders (its weights' identity as the caches identify models, its
quantisation and dtype), the VAE that decodes and encodes the references, the text encoder that
embedded the prompts, every validation item (prompt as rendered — the trigger applied —, size,
seed, reference images by content), the sampler (steps, guidance, CFG), the LoRA layers in place
while it renders (type and shape, lora.init_from), and the mflux2 and MLX versions. A fresh run
whose key matches an entry copies (hard-links) its images into `baseline/` instead of rendering
them; any change renders anew, so an output folder never keeps a baseline of other settings.

Entries live in `<output>/.baseline_cache/<key>/` (the images and `key.json`, the key's parts),
written as `<key>.partial/` and renamed when complete; an entry with an image missing is rendered
again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

FOLDER = ".baseline_cache"
FORMAT = 1  # bump when the rendering code changes what the same settings produce


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (reference images: small)."""
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def baseline_parts(cfg, validation, *, renderer_identity: str, transformer_quantization: str, dtype: str,
                   vae_id: str, te_id: str) -> dict:
    """Everything the baseline images depend on, as a JSON-able dict (`key.json` of an entry).
    `validation` is the run's `validation.Validation` (its items and sampler settings)."""
    import mlx.core as mx

    import mflux2

    lc = cfg.lora
    lora = {"type": lc.type, "rank": lc.rank, "alpha": lc.alpha, "targets": lc.target_layers}
    if lc.type != "lora":  # other adapters' initial delta may depend on their factors and the seed
        lora.update(factor=lc.factor, decompose_both=lc.decompose_both, seed=cfg.training.seed)
    if lc.init_from:  # the baseline is rendered with the weights it starts from
        src = Path(lc.init_from).expanduser()
        lora["init_from"] = [lc.init_from, file_digest(src) if src.is_file() else None]
    return {
        "format": FORMAT, "mflux2": getattr(mflux2, "__version__", "?"), "mlx": mx.__version__,
        "model": {"family": validation.family, "variant": validation.variant, "weights": renderer_identity,
                  "quantization": transformer_quantization, "dtype": dtype},
        "vae": vae_id, "text_encoder": te_id,
        "sampler": {"steps": cfg.validation.steps, "guidance": validation.guidance, "cfg": validation.cfg_scale},
        "lora": lora,
        "items": [{"file": it.file_name, "prompt": it.prompt, "size": [it.width, it.height], "seed": it.seed,
                   "trigger": it.with_trigger, "references": [[r, file_digest(r)] for r in it.references]}
                  for it in validation.items],
    }


def baseline_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the images are never rewritten in place (atomic_write replaces them)
    except OSError:
        shutil.copy2(src, dst)


class BaselineCache:
    def __init__(self, output: Path):
        self.folder = Path(output) / FOLDER

    def entry(self, key: str) -> Path:
        return self.folder / key

    def has(self, key: str, names: list[str]) -> bool:
        e = self.entry(key)
        return all((e / n).is_file() and (e / n).stat().st_size > 0 for n in names)

    def get(self, key: str, names: list[str], dst: Path) -> None:
        """Put the entry's images `names` into the (new) folder `dst` (the entry `has` them)."""
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            _link_or_copy(self.entry(key) / n, dst / n)

    def put(self, key: str, parts: dict, src: Path, names: list[str]) -> None:
        """Store the images `names` of folder `src` under `key`, atomically (an entry is whole or absent)."""
        from mflux2.training.outputs import _fsync_dir

        final, partial = self.entry(key), self.entry(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for n in names:
            _link_or_copy(src / n, partial / n)
        (partial / "key.json").write_text(json.dumps(parts, indent=1, sort_keys=True))
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(self.folder)
