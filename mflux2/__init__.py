"""mflux2: FLUX.2 (klein-4b, klein-9b, dev) LoRA training and generation on Apple MLX."""

__version__ = "0.1.0"

import os as _os

# MLX's CUDA backend reads these once, at its first kernel, so they are set before any mflux2 code runs
# one; a value the user exported wins. CUDA graphs off: on an H100 the klein-4b training step ran
# 0.057 s without them against 0.061-0.066 s with MLX's defaults (docs/performance.md, "CUDA graphs off").
# Only the CUDA backend reads them (Metal and the CPU ignore them).
MLX_RUNTIME_DEFAULTS = {"MLX_USE_CUDA_GRAPHS": "0"}
for _k, _v in MLX_RUNTIME_DEFAULTS.items():
    _os.environ.setdefault(_k, _v)

# Public entry points, imported lazily so `import mflux2` stays cheap (no model code, no mlx-lm).
_EXPORTS = {
    "load_transformer": "mflux2.models.transformer",
    "Flux2Transformer": "mflux2.models.transformer",
    "TransformerConfig": "mflux2.models.transformer",
    "load_vae": "mflux2.models.vae",
    "load_text_encoder": "mflux2.models.text_encoder",
    "Flux2Pipeline": "mflux2.pipeline",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mflux2' has no attribute {name!r}")


__all__ = list(_EXPORTS)
