"""mflux2: FLUX.2 (klein-4b, klein-9b, dev) LoRA training and generation on Apple MLX."""

__version__ = "0.1.0"

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
