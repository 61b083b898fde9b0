"""Text-to-image generation with FLUX.2 (klein-4b/9b distilled, klein-base-4b/9b, dev).

    pipe = Flux2Pipeline.from_pretrained("klein-4b")           # short name, repo id or local folder
    images = pipe.generate("a red fox in the snow", width=1024, height=1024, seed=0)

Where the weights come from (`from_pretrained`):
- a Hugging Face repo id or short name: only the diffusers subfolders are fetched (`mflux2.hub`);
- a local diffusers folder (`model_index.json` + transformer/ vae/ text_encoder/ tokenizer/);
- a local BFL folder: the transformer single file (`flux-2-klein-4b.safetensors`, ...) beside
  `ae.safetensors` and a `text_encoder/` folder (+ `tokenizer/`), or the transformer file itself;
- a folder written by `scripts/convert.py` (`mflux2.json`): MLX layout, possibly pre-quantised.

Components are loaded when first needed and can be released (`release`). With `low_memory`
(automatic when the components would not fit in memory together) `generate` encodes the prompts,
frees the text encoder, denoises, frees the transformer and decodes — so only one large component
is ever resident.

Sampling follows BFL/diffusers (spec §6): empirical-mu schedule, Euler steps in float32 latents;
dev embeds the guidance scale; klein-base runs real CFG against the negative prompt ("" by default);
distilled klein uses 4 steps and no guidance.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mflux2 import hub, sampling
from mflux2.hub import ModelLoadError
from mflux2.weights import check_keys, iter_tensors, read_config, safetensors_files

VARIANTS = ("klein-4b", "klein-9b", "dev", "klein-base-4b", "klein-base-9b")
QUANTIZATIONS = ("int8", "int4")
MFLUX2_CONFIG = "mflux2.json"  # marks a folder written by scripts/convert.py
MFLUX2_FORMAT_VERSION = 1

# Sampling defaults per family [BFL util.py / cli.py, spec §1]
DEFAULT_STEPS = {"klein": 4, "klein-base": 50, "dev": 50}
DEFAULT_GUIDANCE = {"klein": 1.0, "klein-base": 4.0, "dev": 4.0}


class GenerationWarning(UserWarning):
    """A generation setting was adjusted or ignored (e.g. guidance for distilled klein)."""


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
    _check_variant(variant)
    name = str(path_or_repo_id)
    p = Path(name).expanduser()
    if not p.exists():
        repo_id = hub.repo_id_for(name)
        if repo_id == name and not hub.looks_like_repo_id(name):
            raise ModelLoadError(
                f"{name}: no such file or folder, and not a model name ({', '.join(hub.REPOS)}) or a Hugging Face repo id (owner/name)"
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
    singles = _bfl_transformer_files(p)
    if singles:
        if len(singles) > 1:
            raise ModelLoadError(
                f"{p}: several transformer files ({', '.join(f.name for f in singles)}); pass the one to use as the path"
            )
        return _resolve_bfl(p, singles[0], variant)
    raise ModelLoadError(
        f"{p}: not a FLUX.2 model folder (no model_index.json, no {MFLUX2_CONFIG}, no transformer .safetensors file)"
    )


def _bfl_transformer_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.safetensors") if f.name != "ae.safetensors" and not f.name.startswith("model-"))


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
    if family not in DEFAULT_STEPS:
        raise ModelLoadError(f"{root / MFLUX2_CONFIG}: family {family!r} is not one of {', '.join(DEFAULT_STEPS)}")
    variant = _reconcile(root, variant, family, cfg.get("variant"))
    return ModelSource(root, "mflux2", family, variant, root / "transformer", root / "vae",
                       root / "text_encoder", root / "tokenizer", cfg)


def _reconcile(source, asked: str | None, family: str, detected: str | None) -> str | None:
    """The user's variant wins only if it agrees with what the files are."""
    if asked is None:
        return detected
    if detected is not None and asked != detected:
        raise ModelLoadError(f"{source}: you asked for variant {asked!r} but the files are {detected}")
    if detected is None and family_of(asked) != family:
        raise ModelLoadError(f"{source}: you asked for variant {asked!r} but the files are a {family} model")
    return asked


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
    mx.eval(module.parameters())
    module.eval()
    return module


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


# ----------------------------------------------------------------------------------------------
# The pipeline


class Flux2Pipeline:
    """FLUX.2 text-to-image. Build it with `from_pretrained`; components load on first use."""

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
                        text_encoder_out_layers: tuple[int, ...] | None = None) -> "Flux2Pipeline":
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
        """Add a LoRA (ai-toolkit / diffusers / kohya / mflux2 files) to the transformer."""
        from mflux2 import lora

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

    # -- generation -------------------------------------------------------------------------

    def encode_prompt(self, prompts: str | list[str]) -> tuple[mx.array, mx.array]:
        """prompts -> (prompt_embeds [B, L, 3·hidden], text_ids [B, L, 4]) with L = 512."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, ids = self.text_encoder.encode(prompts)
        mx.eval(embeds, ids)
        return embeds, ids

    def sampling_settings(self, num_inference_steps: int | None, guidance_scale: float | None,
                          negative_prompt: str | list[str] | None = None) -> tuple[int, float, bool]:
        """(steps, guidance, use_cfg) after the variant's defaults and rules; warns on ignored settings."""
        fam = self.family
        steps = DEFAULT_STEPS[fam] if num_inference_steps is None else int(num_inference_steps)
        guidance = DEFAULT_GUIDANCE[fam] if guidance_scale is None else float(guidance_scale)
        if fam == "klein":
            if steps != 4:
                warnings.warn(f"{self.source.name} is step-distilled for 4 steps; using 4 instead of {steps}", GenerationWarning, stacklevel=3)
                steps = 4
            if guidance != 1.0:
                warnings.warn(f"{self.source.name} is guidance-distilled: guidance {guidance} is ignored", GenerationWarning, stacklevel=3)
                guidance = 1.0
        if negative_prompt is not None and not (fam == "klein-base" and guidance > 1.0):
            warnings.warn(f"negative_prompt is ignored: {self.source.name} runs no classifier-free guidance"
                          + (" at guidance <= 1" if fam == "klein-base" else ""), GenerationWarning, stacklevel=3)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        return steps, guidance, fam == "klein-base" and guidance > 1.0

    def generate(self, prompt: str | list[str], width: int = 1024, height: int = 1024,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 latents: mx.array | None = None, negative_prompt: str | list[str] | None = None,
                 progress: bool = True, output_type: str = "pil") -> list:
        """Generate one image per prompt; returns PIL images.

        Defaults per variant: distilled klein 4 steps / no guidance (other values are ignored with
        a warning); klein-base 50 steps, real CFG with scale 4.0 against `negative_prompt` (""
        by default); dev 50 steps, embedded guidance 4.0. Image i uses the noise of `seed + i`,
        or `latents` [B, H/16·W/16, 128] (packed, row-major) if given. `output_type`: "pil", or
        "array" for float32 mx arrays [H, W, 3] in [0, 1], or "latent" for the packed latents."""
        if output_type not in ("pil", "array", "latent"):
            raise ValueError(f"output_type={output_type!r}: choose pil, array or latent")
        from tqdm.auto import tqdm

        from mflux2.models.vae import image_ids

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        sampling.check_size(height, width)
        steps, guidance, cfg = self.sampling_settings(num_inference_steps, guidance_scale, negative_prompt)
        b, n = len(prompts), sampling.image_seq_len(height, width)
        if latents is None:
            latents = sampling.initial_noise(seed, b, height, width)
        elif tuple(latents.shape) != (b, n, sampling.LATENT_CHANNELS):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {b} prompt(s) at {width}x{height}: expected {(b, n, sampling.LATENT_CHANNELS)}")
        latents = latents.astype(mx.float32)

        embeds, txt_ids = self.encode_prompt(prompts)
        neg_embeds = neg_ids = None
        if cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * b if isinstance(neg, str) else list(neg)
            if len(neg) != b:
                raise ValueError(f"{len(neg)} negative prompts for {b} prompts: give one, or one per prompt")
            neg_embeds, neg_ids = self.encode_prompt(neg)
        if self.low_memory:
            self.release("text_encoder")

        sigmas = sampling.get_sigmas(steps, n)
        img_ids = image_ids(height, width)
        model = self.transformer
        out = []
        bar = tqdm(total=steps * b, desc="denoising", unit="step", disable=not progress, leave=False)
        for i in range(b):  # one image at a time: image i depends only on its own noise
            neg = (neg_embeds[i : i + 1], neg_ids[i : i + 1]) if cfg else (None, None)
            out.append(sampling.denoise(
                model, latents[i : i + 1], embeds[i : i + 1], txt_ids[i : i + 1], img_ids, sigmas,
                guidance=guidance if self.guidance_embeds else None, neg_embeds=neg[0], neg_txt_ids=neg[1],
                cfg_scale=guidance if cfg else None, on_step=lambda: bar.update(1)))
        bar.close()
        if output_type == "latent":
            return [x[0] for x in out]
        if self.low_memory:
            self.release("transformer")
        return [self.decode(x, height, width, output_type)[0] for x in out]

    def decode(self, latents: mx.array, height: int, width: int, output_type: str = "pil") -> list:
        """Packed latents [B, N, 128] -> images (PIL, or float32 [H, W, 3] arrays in [0, 1])."""
        vae = self.vae
        pixels = vae.decode(vae.unpack(latents, height, width))  # [B, H, W, 3], about [-1, 1]
        pixels = mx.clip(pixels.astype(mx.float32), -1.0, 1.0)
        mx.eval(pixels)
        if output_type == "array":
            return [pixels[j] / 2 + 0.5 for j in range(pixels.shape[0])]
        from mflux2.images import array_to_pil

        return [array_to_pil(pixels[j]) for j in range(pixels.shape[0])]
