"""The three models of a FLUX.2 pipeline in memory: loaded when first needed, freed on request.

`PipelineComponents` holds a resolved `ModelSource` (`mflux2.model_files`) and builds the
transformer, VAE and text encoder from it on first access, quantised as asked (`quantize`,
`text_encoder_quantize`; a converted folder loads as stored). `release` frees them; LoRAs added
with `load_lora` are re-applied whenever the transformer is loaded again.

The memory policy: `low_memory` (automatic when the transformer and the text encoder would not fit
in memory together, by `loaded_bytes` against `_available_memory`) tells `Flux2Pipeline.generate`
to free each large component after use, so only one is ever resident.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Self

import mlx.core as mx

from mflux2.hub import ModelLoadError
from mflux2.model_files import ModelSource, load_component, resolve_source
from mflux2.weights import read_config

QUANTIZATIONS = ("int8", "int4")


def _quant_bits(q: str | None, what: str) -> int | None:
    if q in (None, "", "none", "bf16", "bfloat16"):
        return None
    if q not in QUANTIZATIONS:
        raise ValueError(f"{what}={q!r}: choose int8 or int4 (or None for full precision)")
    return int(q[3:])


def _available_memory() -> int | None:
    """Bytes the accelerator can use (Metal's recommended working set), else physical RAM."""
    try:
        info = mx.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return int(size)
    except Exception:  # older mlx without device_info, or no Metal
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _weights_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


class PipelineComponents:
    """The components of one model. Build it (or `Flux2Pipeline`) with `from_pretrained`; each
    component loads on first use."""

    def __init__(self, source: ModelSource, dtype: mx.Dtype = mx.bfloat16, quantize: str | None = None,
                 text_encoder_quantize: str | None = None, low_memory: bool | None = None,
                 max_sequence_length: int | None = None, text_encoder_out_layers: tuple[int, ...] | None = None):
        self.source = source
        # Prompt length and hidden-state layers: 512 and the family's layers unless overridden
        # (tests with tiny encoders; a converted folder records its own).
        te = dict(source.config.get("text_encoder_options", {}))
        if max_sequence_length is not None:
            te["max_length"] = int(max_sequence_length)
        if text_encoder_out_layers is not None:
            te["hidden_layers"] = tuple(text_encoder_out_layers)
        self.text_encoder_options = te
        self.dtype = dtype
        # "bf16"/"none" mean full precision (None); anything but int8/int4 is an error
        self.quantize = quantize if _quant_bits(quantize, "quantize") else None
        self.text_encoder_quantize = text_encoder_quantize if _quant_bits(text_encoder_quantize, "text_encoder_quantize") else None
        self._low_memory = low_memory
        self._transformer = self._vae = self._text_encoder = None
        self._loras: list[tuple[str, float]] = []  # re-applied whenever the transformer is (re)loaded

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, variant: str | None = None,
                        dtype: mx.Dtype = mx.bfloat16, quantize: str | None = None,
                        text_encoder_quantize: str | None = None, low_memory: bool | None = None,
                        revision: str | None = None, max_sequence_length: int | None = None,
                        text_encoder_out_layers: tuple[int, ...] | None = None) -> Self:
        """Resolve (and download if needed) a model without loading it yet.

        `variant` (klein-4b, klein-9b, dev, klein-base-4b, klein-base-9b) is detected from the
        files; pass it to check, or where the files cannot tell (a BFL klein file without "base"
        in its name). `quantize` / `text_encoder_quantize`: "int8" or "int4" for the transformer /
        text encoder (ignored for a converted folder that is already quantised the same way).
        `low_memory`: free each large component after use; None = only when they would not fit
        in memory together. `max_sequence_length` (512) and `text_encoder_out_layers` ((9, 18, 27)
        for Qwen3, (10, 20, 30) for Mistral) are diffusers' arguments of the same names."""
        return cls(resolve_source(path_or_repo_id, variant, revision), dtype, quantize, text_encoder_quantize,
                   low_memory, max_sequence_length, text_encoder_out_layers)

    # -- facts ------------------------------------------------------------------------------

    @property
    def variant(self) -> str | None:
        return self.source.variant

    @property
    def family(self) -> str:
        return self.source.family

    @property
    def is_distilled(self) -> bool:
        return self.family == "klein"

    @property
    def guidance_embeds(self) -> bool:
        return self.family == "dev"

    @property
    def low_memory(self) -> bool:
        if self._low_memory is not None:
            return self._low_memory
        budget = _available_memory()
        if budget is None:
            return False
        need = (self.loaded_bytes(self.source.transformer, self.quantize)
                + self.loaded_bytes(self.source.text_encoder, self.text_encoder_quantize))
        return need > 0.66 * budget  # leave a third for activations, the VAE and the OS

    def loaded_bytes(self, path, quantize: str | None) -> float:
        """A component's weights in memory once loaded with `quantize`, from its files (bf16, or
        already quantised in a converted folder, which loads as stored): int8 ~0.53×, int4 ~0.28×
        of bf16 (scales included); float32 doubles them."""
        bits = None if self.source.layout == "mflux2" else _quant_bits(quantize, "quantize")
        return {None: self.dtype.size / 2, 8: 0.53, 4: 0.28}[bits] * _weights_bytes(Path(path))

    # -- components -------------------------------------------------------------------------

    @property
    def transformer(self):
        if self._transformer is None:
            self._transformer = self._load_transformer()
            if self._loras:
                from mflux2 import lora

                for path, scale in self._loras:
                    lora.load_lora(self._transformer, path, scale)
        return self._transformer

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self._load_vae()
        return self._vae

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = self._load_text_encoder()
        return self._text_encoder

    def release(self, *components: str) -> None:
        """Free components ("text_encoder", "transformer", "vae"; all if none named). They are
        loaded again when next needed (LoRAs are re-applied)."""
        for name in components or ("text_encoder", "transformer", "vae"):
            if name not in ("text_encoder", "transformer", "vae"):
                raise ValueError(f"release({name!r}): choose text_encoder, transformer or vae")
            module = getattr(self, f"_{name}")
            if module is not None and hasattr(module, "release"):
                module.release()  # the text encoder drops its weights even if someone holds the object
            setattr(self, f"_{name}", None)
        gc.collect()
        mx.clear_cache()

    def _component_config(self, name: str) -> dict:
        return self.source.config.get(name, {}) if self.source.layout == "mflux2" else {}

    def _load_transformer(self):
        from mflux2.models.transformer import Flux2Transformer, TransformerConfig, load_transformer

        if self.source.layout != "mflux2":
            return load_transformer(self.source.transformer, variant=self.variant, dtype=self.dtype, quantize=self.quantize)
        meta = self._component_config("transformer")
        self._check_prequantized("transformer", meta, self.quantize)
        config = TransformerConfig.from_dict(read_config(self.source.transformer))
        model = load_component(Flux2Transformer(config), self.source.transformer, self.dtype, meta.get("quantization"))
        model.quantization = (meta.get("quantization") or {}).get("name")
        return model

    def _load_vae(self):
        from mflux2.models.vae import Flux2VAE, VAEConfig, load_vae

        if self.source.layout != "mflux2":
            return load_vae(self.source.vae, dtype=self.dtype)
        config = VAEConfig(**read_config(self.source.vae))
        return load_component(Flux2VAE(config), self.source.vae, self.dtype, keep_float32=lambda k: k.startswith("bn."))

    def _load_text_encoder(self):
        from mflux2.models.text_encoder import load_text_encoder

        quantize = self.text_encoder_quantize
        if self.source.layout == "mflux2":  # an mlx-lm layout folder, possibly pre-quantised
            self._check_prequantized("text_encoder", self._component_config("text_encoder"), quantize)
            quantize = None
        return load_text_encoder(
            self.source.text_encoder,
            self.variant or ("mistral" if self.family == "dev" else "qwen3"),
            dtype=self.dtype,
            quantize=quantize,
            tokenizer_path=self.source.tokenizer,
            **self.text_encoder_options,
        )

    def _check_prequantized(self, name: str, meta: dict, asked: str | None) -> None:
        have = (meta.get("quantization") or {}).get("name")
        if asked and asked != have:
            raise ModelLoadError(
                f"{self.source.root}: the {name} was converted {'as ' + have if have else 'without quantisation'}; "
                f"it cannot be loaded as {asked} — convert again with that setting or drop the option"
            )

    # -- LoRA -------------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Add an adapter file (ai-toolkit / diffusers / kohya / LyCORIS / mflux2 layouts) to the transformer:
        a local path, or a hub id `user/repo` (one .safetensors in it) / `user/repo/file.safetensors`."""
        from mflux2 import lora
        from mflux2.lora_formats import resolve_lora_file

        path = resolve_lora_file(path)
        if self._transformer is not None:
            lora.load_lora(self._transformer, path, scale)
        else:
            lora.read_lora(path)  # check the file now; it is applied when the transformer loads
        self._loras.append((str(path), float(scale)))

    def unload_loras(self) -> None:
        from mflux2 import lora

        if self._transformer is not None and self._loras:
            lora.remove_lora(self._transformer)
        self._loras = []
