"""The training config: flux-2-swift-mlx's YAML schema as validated dataclasses.

A user's config file from the Swift trainer runs unchanged: every section and key keeps its name and
meaning (see /work/shared/spec/training.md). Ours in addition: model.path, model.validation_path,
model.transformer_quantization, training.seed, dataset.skip_bad_images and an int ("every n blocks")
for memory.gradient_checkpointing.

The rule for a key left out: the seed guide's default stands; where it is silent, the default is what
the Swift trainer really does with the same file (its training code, not only its parser).
_DEFAULT_NOTES records, per key, which of the two it is (or why ours differs); --print-config shows it.

Defaults live in one place: the dataclass field defaults below. A default of None on a field whose
comment says "derived" is filled by `_finalize` from the tables MODEL_DEFAULTS / OPTIMIZER_DEFAULTS
(per-model and per-optimizer defaults) or from another field. Everything wrong in a config raises a
`ConfigError` whose message is one line naming the file (and line), the key path and the bad value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import yaml

from mflux2.hub import REPOS


class ConfigError(ValueError):
    """A training config is invalid. The message is one line: `<file>[:line]: <key.path>: <problem>`."""


class ConfigWarning(UserWarning):
    """A key is accepted but not honoured (the Swift trainer reads it, mflux2 cannot), or is suspicious."""


# ---------------------------------------------------------------------------------------------
# Per-model and per-optimizer defaults: the ONE table each.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    repo: str  # Hugging Face repo id used when model.path is not given
    validation_steps: int  # sampling steps for the validation images made with this variant
    validation_guidance: float  # guidance for the validation images (1.0 = distilled klein, no CFG)


# Repo ids come from mflux2.hub.REPOS (the downloader's table), so the short names agree everywhere.
# Validation steps/guidance: the distilled klein models as the Swift trainer samples them (4 steps,
# guidance 1.0: TrainingConfigYAML.swift:453, SimpleLoRATrainer.swift:1804); dev and the klein-base
# models need more (ours: the Swift trainer samples dev at 4 steps / guidance 1.0 too, which is noise).
MODEL_DEFAULTS: dict[str, ModelDefaults] = {
    "klein-4b": ModelDefaults(REPOS["klein-4b"], 4, 1.0),
    "klein-9b": ModelDefaults(REPOS["klein-9b"], 4, 1.0),
    "dev": ModelDefaults(REPOS["dev"], 28, 4.0),
    "klein-base-4b": ModelDefaults(REPOS["klein-base-4b"], 50, 4.0),
    "klein-base-9b": ModelDefaults(REPOS["klein-base-9b"], 50, 4.0),
}

# model.name of a distilled klein model -> the undistilled weights the Swift trainer trains instead
# (Flux2Config.swift `trainingVariant`; TrainLoRACommand.swift loadTransformer always loads them).
BASE_OF = {"klein-4b": "klein-base-4b", "klein-9b": "klein-base-9b"}
DISTILLED_OF = {v: k for k, v in BASE_OF.items()}

# The Swift trainer's "smart defaults" per optimizer (lion: lr 3e-5, wd 0.1), used when the key is absent.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"learning_rate": 1e-4, "weight_decay": 1e-4},
    "lion": {"learning_rate": 3e-5, "weight_decay": 0.1},
}

MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096


def _check_resolution(v: int) -> str | None:
    if v % 16:
        return f"must be a multiple of 16 (VAE /8 then 2x2 patches), got {v}"
    if not MIN_RESOLUTION <= v <= MAX_RESOLUTION:
        return f"must be between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {v}"
    return None


def _check_nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _f(default: Any = None, **meta: Any):
    """A dataclass field with validation metadata: choices, aliases, ge/gt/le/lt, check, warn_aliases."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# The schema. Section classes may declare IGNORED (accepted with a warning, never used) and
# KEY_ALIASES (another spelling of a key, e.g. the Swift source's name).
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    # klein-4b | klein-9b | dev | klein-base-4b | klein-base-9b. Derived: klein-4b when neither name
    # nor path is given (as the Swift trainer); None with a path: the architecture comes from the folder.
    # klein-4b/klein-9b TRAIN the undistilled klein-base weights (use_base) and validate with the
    # distilled model, as the Swift trainer does. The Swift spellings klein-4b-base/klein-9b-base and
    # its klein-9b-kv (klein-9b's KV-cached image-editing variant; Swift trains it as klein-9b) work.
    name: str | None = _f(
        None,
        choices=tuple(MODEL_DEFAULTS),
        aliases={"klein-4b-base": "klein-base-4b", "klein-9b-base": "klein-base-9b", "klein-9b-kv": "klein-9b"},
        alias_notes={"klein-9b-kv": "klein-9b-kv is klein-9b's KV-cached image-editing inference variant, not a "
                                    "training model: trained as klein-9b (on klein-base-9b, validated with klein-9b), "
                                    "as the Swift trainer does"},
    )
    path: str | None = _f(None, check=_check_nonempty)  # ours: local model folder / safetensors file
    # Swift's key, honoured: true = train klein-4b/klein-9b on the klein-base weights (what the Swift
    # trainer always does), false = train the distilled weights. No meaning for dev or klein-base-*.
    use_base: bool = _f(True)
    # ours: a local folder or hub id of the model that renders the validation images when it differs
    # from the training model (None: the hub repo of TrainConfig.validation_variant).
    validation_path: str | None = _f(None, check=_check_nonempty)
    # The TEXT ENCODER's precision (the Swift trainer's key and default, int8: TrainingConfigYAML.swift:358).
    # auto (ours): the most precise that fits the machine while the embedding cache is filled.
    quantization: str = _f("int8", choices=("bf16", "int8", "int4", "auto"), aliases={"nf4": "int4"}, warn_aliases=("nf4",))
    transformer_quantization: str = _f("auto", choices=("bf16", "int8", "int4", "auto"))  # ours


@dataclass
class LoRAConfig:
    rank: int = _f(32, gt=0)
    alpha: float | None = _f(None, gt=0)  # derived: = rank when absent (as the Swift trainer)
    dropout: float = _f(0.0, ge=0, lt=1)
    # Default all: what the Swift trainer trains whatever this key says (SimpleLoRATrainer.swift:396).
    target_layers: str = _f("all", choices=("attention", "attention_output", "attention_ffn", "all"))


@dataclass
class DatasetConfig:
    path: str | None = _f(None, check=_check_nonempty)  # required: local folder or HF dataset repo id
    validation_path: str | None = _f(None, check=_check_nonempty)
    trigger_word: str | None = _f(None, check=_check_nonempty)
    caption_format: str = _f("txt", choices=("txt", "jsonl"), aliases={"json": "jsonl"})
    image_size: int = _f(512, check=_check_resolution)  # square size when bucketing is disabled
    skip_bad_images: bool = _f(False)  # ours: skip unreadable images with a listed warning

    IGNORED: ClassVar[dict[str, str]] = {
        "control_path": "image-to-image (control image) training is not supported by mflux2",
        "control_dropout": "image-to-image (control image) training is not supported by mflux2",
    }


@dataclass
class TrainingParams:
    batch_size: int = _f(1, ge=1)
    gradient_accumulation: int = _f(1, ge=1)
    epochs: int = _f(10, ge=1)  # without max_steps: epochs x 100 steps, as the Swift trainer
    max_steps: int | None = _f(None, gt=0)  # derived: epochs x 100 (TrainLoRACommand.swift:707)
    warmup_steps: int = _f(0, ge=0)  # the Swift trainer never warms up (it reads and drops the key)
    optimizer: str = _f("adamw", choices=tuple(OPTIMIZER_DEFAULTS))
    learning_rate: float | None = _f(None, gt=0, lt=1)  # derived: OPTIMIZER_DEFAULTS
    weight_decay: float | None = _f(None, ge=0)  # derived: OPTIMIZER_DEFAULTS
    caption_dropout: float = _f(0.0, ge=0, le=1)
    max_grad_norm: float = _f(1.0, ge=0)  # 0 disables clipping
    # constant: what the Swift trainer does whatever this says. cosine_with_restarts (Swift's value,
    # never applied there) is trained as cosine with a warning.
    lr_scheduler: str = _f("constant", choices=("constant", "cosine", "linear"),
                           aliases={"cosine_with_restarts": "cosine"},
                           alias_notes={"cosine_with_restarts": "trained as 'cosine' (one cycle, mflux2 has no restarts; "
                                                                "the Swift trainer reads it but trains at a constant rate)"})
    eval_every_n_steps: int = _f(10, ge=1)
    log_every_n_steps: int = _f(10, ge=1)
    seed: int = _f(42, ge=0)  # ours
    dtype: str = _f("bf16", choices=("bf16", "float32"))  # ours: activation/base-weight dtype (float32 for debugging)


@dataclass
class LossConfig:
    weighting: str = _f(
        "uniform",
        choices=("uniform", "bell_shaped", "snr_weighted"),
        aliases={"none": "uniform", "bellshaped": "bell_shaped", "bell-shaped": "bell_shaped",
                 "weighted": "bell_shaped", "snr": "snr_weighted"},
        fallback="uniform",  # the Swift trainer trains an unknown name as uniform (TrainingConfigYAML.swift:638)
    )
    timestep_sampling: str = _f(
        "balanced",
        choices=("uniform", "content", "style", "balanced", "logit_normal", "flux_shift"),
        aliases={"logit-normal": "logit_normal", "logitnormal": "logit_normal",
                 "flux-shift": "flux_shift", "fluxshift": "flux_shift"},
        fallback="uniform",  # the Swift trainer trains an unknown name as uniform (TrainingConfigYAML.swift:621)
    )
    logit_normal_mean: float = _f(0.0)
    logit_normal_std: float = _f(1.0, gt=0)
    flux_shift: float = _f(1.0, gt=0)  # the shift s of timestep_sampling: flux_shift (1.0 = uniform)
    diff_output_preservation: bool = _f(False)
    diff_output_preservation_class: str | None = _f(None, check=_check_nonempty)
    diff_output_preservation_multiplier: float = _f(1.0, ge=0)
    diff_output_preservation_every_n_steps: int = _f(1, ge=1)  # the seed guide's 1


@dataclass
class BucketingConfig:
    enabled: bool = _f(True)
    resolutions: list[int] | None = _f(None, item_check=_check_resolution)  # derived: [dataset.image_size]


@dataclass
class MemoryConfig:
    # false/0: off; true: every transformer block; an int n: every n-th block (ours)
    gradient_checkpointing: Union[bool, int] = _f(False, ge=0)
    # mflux2 always caches latents and text embeddings and releases the text encoder once the cache
    # is filled (the Swift trainer's train-lora, too, whatever these say); false warns that it is ignored.
    cache_latents: bool = _f(True, ignored_value=False)
    cache_text_embeddings: bool = _f(True, ignored_value=False)
    cpu_offload: bool = _f(True, ignored_value=False)
    compile_training: bool = _f(True)
    bucketing: BucketingConfig = field(default_factory=BucketingConfig)

    @property
    def checkpoint_every(self) -> int:
        """0 = no gradient checkpointing, n = checkpoint every n-th transformer block."""
        g = self.gradient_checkpointing
        return int(g) if not isinstance(g, bool) else (1 if g else 0)


@dataclass
class CheckpointsConfig:
    output: str | None = _f(None, check=_check_nonempty)  # derived: output/<config file stem>
    save_every: int = _f(125, ge=0)  # 0: only the final checkpoint
    keep_last: int = _f(0, ge=0)  # 0: keep all
    learning_curve: bool = _f(True)
    learning_curve_smoothing_window: int = _f(20, ge=1)

    # The Swift source reads `learning_curve_smoothing`; the spec writes `..._window`. Both work.
    KEY_ALIASES: ClassVar[dict[str, str]] = {"learning_curve_smoothing": "learning_curve_smoothing_window"}


@dataclass
class ValidationPrompt:
    prompt: str | None = _f(None, required=True, check=_check_nonempty)
    apply_trigger: bool = _f(True)  # prepend "<trigger_word>, "
    is_512: bool = _f(True)
    is_1024: bool = _f(False)
    seed: int | None = _f(None, ge=0)  # overrides validation.seed
    sizes: list[int] | None = _f(None, item_check=_check_resolution)  # ours: square sizes, replaces is_512/is_1024

    IGNORED: ClassVar[dict[str, str]] = {
        "reference_image": "image-to-image validation is not supported by mflux2",
        "is_vlm_generated": "it marks prompts for VLM scoring, which mflux2 does not do",
    }


@dataclass
class ValidationConfig:
    prompts: list[ValidationPrompt] = _f([])  # each a mapping or a plain string
    every_n_steps: int | None = _f(None, ge=0)  # derived: checkpoints.save_every; 0 = never
    seed: int = _f(42, ge=0)
    guidance: float | None = _f(None, gt=0)  # derived: MODEL_DEFAULTS
    steps: int | None = _f(None, ge=1)  # derived: MODEL_DEFAULTS

    IGNORED: ClassVar[dict[str, str]] = {
        "vlm_scoring": "VLM scoring of validation images is not supported by mflux2",
        "width": "legacy single-size validation; use is_512/is_1024 per prompt",
        "height": "legacy single-size validation; use is_512/is_1024 per prompt",
    }


@dataclass
class EMAConfig:
    enabled: bool = _f(False)
    decay: float = _f(0.99, gt=0, lt=1)


@dataclass
class EarlyStopConfig:
    enabled: bool = _f(False)  # stop when the training loss plateaus
    patience: int = _f(5, ge=1)
    min_delta: float = _f(0.01, ge=0)
    on_overfit: bool = _f(False)  # stop when validation loss - training loss stays above max_gap
    max_gap: float = _f(0.5, ge=0)
    gap_patience: int = _f(3, ge=1)
    on_val_stagnation: bool = _f(False)  # stop when the validation loss stops improving
    min_val_improvement: float = _f(0.1, ge=0)
    val_patience: int = _f(2, ge=1)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    training: TrainingParams = field(default_factory=TrainingParams)
    loss: LossConfig = field(default_factory=LossConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # Not part of the schema: where the config came from and its raw mapping (for apply_overrides).
    source: str = field(default="<config>", repr=False, compare=False, metadata={"internal": True})
    raw: dict = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})
    # dotted key -> "file" | "override" | None (Swift default) | a reason (mflux2 default); see dump_yaml.
    provenance: dict = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})

    @property
    def resolutions(self) -> list[int]:
        """The training resolutions: the bucketing list, or [dataset.image_size] with bucketing off."""
        b = self.memory.bucketing
        return list(b.resolutions) if b.enabled else [self.dataset.image_size]

    @property
    def training_variant(self) -> str | None:
        """The variant of the transformer that trains: klein-4b/klein-9b train the klein-base weights
        unless model.use_base is false (the Swift trainer always trains them); None without a name."""
        name = self.model.name
        if name in BASE_OF and self.model.use_base:
            return BASE_OF[name]
        return name

    @property
    def validation_variant(self) -> str | None:
        """The variant that renders the validation images: the distilled klein model for klein-4b/
        klein-9b (even when the base trains, as the Swift trainer does), dev for dev, a klein-base name
        as named; None without a name (model.path alone: the training model itself)."""
        return self.model.name

    @property
    def model_repo(self) -> str | None:
        """The hub repo of the training transformer (follows training_variant)."""
        v = self.training_variant
        return MODEL_DEFAULTS[v].repo if v else None

    @property
    def validation_repo(self) -> str | None:
        """model.validation_path, else the hub repo of validation_variant when it differs from the
        training variant; None when validation uses the training model itself."""
        if self.model.validation_path:
            return self.model.validation_path
        v = self.validation_variant
        return MODEL_DEFAULTS[v].repo if v and v != self.training_variant else None

    def resolve_model_defaults(self, variant: str) -> "TrainConfig":
        """Fill the still-unset per-model defaults (validation steps/guidance) for `variant` (a
        MODEL_DEFAULTS name: the variant that renders the validation images). load_config does this
        when model.name is given; with model.path alone the caller does it once the architecture is
        read from the folder."""
        if variant not in MODEL_DEFAULTS:
            raise ConfigError(f"{self.source}: model: unknown model variant {variant!r} (one of {', '.join(MODEL_DEFAULTS)})")
        d = MODEL_DEFAULTS[variant]
        swift = variant in ("klein-4b", "klein-9b")  # the Swift trainer: 4 steps, guidance 1.0 for every model
        why = None if swift else f"mflux2 default: {variant} needs more than the Swift trainer's 4 steps at guidance 1.0"
        if self.validation.steps is None:
            self.validation.steps = d.validation_steps
            self.provenance.setdefault("validation.steps", why)
        if self.validation.guidance is None:
            self.validation.guidance = d.validation_guidance
            self.provenance.setdefault("validation.guidance", why)
        return self

    def to_dict(self) -> dict:
        """The fully resolved config as plain YAML-able data (what --print-config shows)."""
        return _to_plain(self)

    def dump_yaml(self, annotate: bool = False) -> str:
        """The resolved config as YAML; with `annotate`, each value carries a comment saying where it
        came from: `# from file`, `# from override`, `# Swift default` or `# mflux2 default: <why>`."""
        d = self.to_dict()
        for unicode in (True, False):  # PyYAML writes some line breaks (U+0085, U+2028) raw: escape them
            if annotate:
                text = _annotated_yaml(d, self.provenance_labels(), unicode)
            else:
                text = yaml.safe_dump(d, sort_keys=False, allow_unicode=unicode, width=120)
            if yaml.safe_load(text) == d:
                break
        return text

    def provenance_labels(self) -> dict[str, str]:
        """Dotted key -> where its value came from (the comments of dump_yaml(annotate=True))."""
        out = {}
        for path in _leaf_paths(self.to_dict()):
            src = self.provenance.get(path, _DEFAULT_NOTES.get(path, "mflux2 default"))
            if src in ("file", "override"):
                out[path] = f"from {src}"
            elif src is not None and src.startswith("from "):
                out[path] = src
            elif src is None:
                out[path] = "Swift default"
            elif src.startswith("swift: "):
                out[path] = "Swift default: " + src[len("swift: "):]
            else:
                out[path] = src if src.startswith("mflux2 default") else f"mflux2 default: {src}"
        return out


def _leaf_paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _leaf_paths(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def _flow(v: Any, unicode: bool) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, allow_unicode=unicode, width=1 << 30)
    text = text.rstrip("\n")
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].rstrip("\n")
    return text


def _annotated_yaml(d: dict, labels: dict[str, str], unicode: bool) -> str:
    rows: list[tuple[str, str | None]] = []

    def emit(obj: dict, prefix: str, indent: int) -> None:
        for k, v in obj.items():
            pad = "  " * indent
            if isinstance(v, dict):
                rows.append((f"{pad}{k}:", None))
                emit(v, f"{prefix}{k}.", indent + 1)
            else:
                rows.append((f"{pad}{k}: {_flow(v, unicode)}", labels.get(prefix + k)))

    emit(d, "", 0)
    width = min(max((len(r) for r, c in rows if c), default=0), 60)
    return "".join(f"{r.ljust(width)}  # {c}\n" if c else f"{r}\n" for r, c in rows)


# Where a default comes from when a key is absent from the file: None = the Swift trainer's real
# behaviour with the same file (file:line of flux-2-swift-mlx in docs/training.md); a string = ours,
# with the reason. Derived values (_finalize) record their own note in TrainConfig.provenance.
_DEFAULT_NOTES: dict[str, str | None] = {
    "model.name": None,
    "model.path": "no Swift key; the weights come from the hub",
    "model.use_base": None,
    "model.validation_path": "no Swift key; the hub repo of the validation variant",
    "model.quantization": None,
    "model.transformer_quantization": "no Swift key; bf16 when it fits (as the Swift trainer always), quantized only when it would not",
    "lora.rank": "the seed guide's 32 (Swift: 16)",
    "lora.alpha": None,
    "lora.dropout": None,
    "lora.target_layers": None,
    "dataset.path": None,
    "dataset.validation_path": None,
    "dataset.trigger_word": None,
    "dataset.caption_format": None,
    "dataset.image_size": None,
    "dataset.skip_bad_images": "no Swift key",
    "training.batch_size": None,
    "training.gradient_accumulation": None,
    "training.epochs": None,
    "training.max_steps": None,
    "training.warmup_steps": None,
    "training.optimizer": None,
    "training.learning_rate": None,
    "training.weight_decay": None,
    "training.caption_dropout": None,
    "training.max_grad_norm": None,
    "training.lr_scheduler": None,
    "training.eval_every_n_steps": None,
    "training.log_every_n_steps": None,
    "training.seed": "no Swift key",
    "training.dtype": "no Swift key",
    "loss.weighting": None,
    "loss.timestep_sampling": "the seed guide's balanced (Swift: uniform)",
    "loss.logit_normal_mean": None,
    "loss.logit_normal_std": None,
    "loss.flux_shift": None,
    "loss.diff_output_preservation": None,
    "loss.diff_output_preservation_class": None,
    "loss.diff_output_preservation_multiplier": None,
    "loss.diff_output_preservation_every_n_steps": None,
    "memory.gradient_checkpointing": None,
    "memory.cache_latents": None,
    "memory.cache_text_embeddings": None,
    "memory.cpu_offload": "the text encoder is always released once the embedding cache is filled (Swift: false)",
    "memory.compile_training": "the seed guide's true (Swift: false)",
    "memory.bucketing.enabled": "the seed guide's true (Swift: false)",
    "memory.bucketing.resolutions": "the seed guide's [512], or [dataset.image_size] (Swift: [512, 768, 1024])",
    "checkpoints.output": "output/<config file name> (the Swift trainer requires the key)",
    "checkpoints.save_every": "the seed guide's 125 (Swift: 500)",
    "checkpoints.keep_last": None,
    "checkpoints.learning_curve": None,
    "checkpoints.learning_curve_smoothing_window": None,
    "validation.prompts": None,
    "validation.every_n_steps": "checkpoints.save_every: every checkpoint gets its images (Swift: 500)",
    "validation.seed": None,
    "validation.guidance": None,
    "validation.steps": None,
    "ema.enabled": None,  # the Swift parser's true is never used: its trainer has no EMA
    "ema.decay": None,
    **{f"early_stop.{f.name}": None for f in fields(EarlyStopConfig)},
}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)  # field types are strings under `from __future__ import annotations`


def _schema_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls) if not f.metadata.get("internal")}


SECTIONS: dict[str, type] = {name: _hints(TrainConfig)[name] for name in _schema_fields(TrainConfig)}


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, list):
        return [_to_plain(x) for x in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _Ctx:
    """Where we are: the source name and a map from key paths to YAML line numbers."""

    def __init__(self, source: str, lines: dict[tuple, int] | None = None):
        self.source = source
        self.lines = lines or {}
        self.overridden: set[tuple] = set()
        self.given: set[tuple] = set()  # key paths (canonical names) the file or an override set
        self._warned: set[tuple] = set()

    def where(self, path: tuple) -> str:
        for n in range(len(path), 0, -1):  # the nearest enclosing key that has a line
            if path[:n] in self.overridden:
                return f"{self.source} (override)"
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source

    def error(self, path: tuple, msg: str) -> ConfigError:
        p = _path_str(path)
        return ConfigError(f"{self.where(path)}: {p + ': ' if p else ''}{msg}")

    def warn(self, path: tuple, msg: str) -> None:
        """One warning line per key: the same key in several list items (prompts[0], prompts[1], ...)
        warns once, at the first."""
        key = tuple(p for p in path if not isinstance(p, int))
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(f"{self.where(path)}: {_path_str(path)}: {msg}", ConfigWarning, stacklevel=4)

    def source_of(self, path: tuple) -> str | None:
        if any(path[:n] in self.overridden for n in range(1, len(path) + 1)):
            return "override"
        return "file" if path in self.given else None


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(v: Any) -> str:
    s = repr(v)
    s = s.replace("\n", "\\n")
    return s if len(s) <= 60 else s[:57] + "..."


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "empty"}.get(type(v), type(v).__name__)


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce_scalar(v: Any, typ: type, ctx: _Ctx, path: tuple) -> Any:
    if typ is bool:
        if isinstance(v, bool):
            return v
        raise ctx.error(path, f"must be true or false, got {_type_name(v)} {_show(v)}")
    if typ is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        raise ctx.error(path, f"must be an integer, got {_type_name(v)} {_show(v)}")
    if typ is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; the Swift trainer's users write it that way.
        if isinstance(v, str) and _FLOAT_RE.match(v.strip()):
            v = float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:  # an int with hundreds of digits
                f = math.inf
            if not math.isfinite(f):
                raise ctx.error(path, f"must be a finite number, got {_show(v)}")
            return f
        raise ctx.error(path, f"must be a number, got {_type_name(v)} {_show(v)}")
    if typ is str:
        if isinstance(v, str):
            return v
        raise ctx.error(path, f"must be a string, got {_type_name(v)} {_show(v)} (quote it in YAML)")
    raise AssertionError(typ)


def _check_meta(v: Any, meta: dict, ctx: _Ctx, path: tuple) -> Any:
    if "choices" in meta and isinstance(v, str):
        key = v.strip().lower()
        aliases = meta.get("aliases", {})
        if key in aliases:
            if key in meta.get("warn_aliases", ()):
                ctx.warn(path, f"{v!r} is treated as {aliases[key]!r}")
            elif key in meta.get("alias_notes", {}):
                ctx.warn(path, meta["alias_notes"][key])
            key = aliases[key]
        if key not in meta["choices"]:
            near = difflib.get_close_matches(key, list(meta["choices"]) + list(aliases), n=1, cutoff=0.5)
            hint = f" (did you mean {aliases.get(near[0], near[0])!r}?)" if near else ""
            if "fallback" in meta:  # the Swift trainer runs such a file: so do we, and say so
                ctx.warn(path, f"unknown value {_show(v)} (expected one of {', '.join(meta['choices'])}){hint}: "
                               f"trained as {meta['fallback']!r}, as the Swift trainer does")
                return meta["fallback"]
            raise ctx.error(path, f"invalid value {_show(v)}: expected one of {', '.join(meta['choices'])}{hint}")
        v = key
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        for op, test, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                               ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            if op in meta and not test(v, meta[op]):
                raise ctx.error(path, f"must be {word} {meta[op]}, got {_show(v)}")
    if "check" in meta:
        msg = meta["check"](v)
        if msg:
            raise ctx.error(path, msg)
    return v


def _coerce(v: Any, hint: Any, meta: dict, ctx: _Ctx, path: tuple) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build_section(hint, v, ctx, path)
    if origin in (Union, types.UnionType):  # Optional[X], X | None or Union[bool, int]
        non_none = [a for a in args if a is not type(None)]
        if non_none == [bool, int] or set(non_none) == {bool, int}:
            if isinstance(v, bool):
                return v
            return _check_meta(_coerce_scalar(v, int, ctx, path), meta, ctx, path)
        assert len(non_none) == 1
        return _coerce(v, non_none[0], meta, ctx, path)
    if origin is list:
        (item,) = args
        if item is int and isinstance(v, int) and not isinstance(v, bool):
            v = [v]  # `resolutions: 512` means [512]
        if not isinstance(v, list):
            raise ctx.error(path, f"must be a list, got {_type_name(v)} {_show(v)}")
        if not v and item is int:
            raise ctx.error(path, "must not be empty")
        out = []
        for i, x in enumerate(v):
            if item is ValidationPrompt and isinstance(x, str):
                x = {"prompt": x}  # a plain string is a prompt with the defaults
            if x is None:
                raise ctx.error(path + (i,), "empty list item")
            y = _coerce(x, item, {}, ctx, path + (i,))
            if "item_check" in meta:
                msg = meta["item_check"](y)
                if msg:
                    raise ctx.error(path + (i,), msg)
            out.append(y)
        if item is int:
            out = sorted(set(out))
        return out
    return _check_meta(_coerce_scalar(v, hint, ctx, path), meta, ctx, path)


def _all_keys() -> dict[str, list[str]]:
    """key name -> the section paths that own it (for 'did you mean dataset.trigger_word?')."""
    owners: dict[str, list[str]] = {}

    def walk(cls, prefix):
        for name in _schema_fields(cls):
            owners.setdefault(name, []).append(prefix)
            if dataclasses.is_dataclass(_hints(cls)[name]):
                walk(_hints(cls)[name], f"{prefix}.{name}")

    for name, cls in SECTIONS.items():
        walk(cls, name)
    return owners


def _unknown_key(cls, key: Any, ctx: _Ctx, path: tuple) -> ConfigError:
    valid = list(_schema_fields(cls)) + list(getattr(cls, "IGNORED", {})) + list(getattr(cls, "KEY_ALIASES", {}))
    k = str(key)
    near = difflib.get_close_matches(k.lower(), valid, n=1, cutoff=0.6)
    if near:
        hint = f" (did you mean {near[0]!r}?)"
    elif k in _KEY_OWNERS:
        hint = f" (it belongs in {' or '.join(o + '.' + k for o in _KEY_OWNERS[k])})"
    else:
        hint = f" (valid keys: {', '.join(valid)})"
    what = "unknown section" if cls is TrainConfig else "unknown key"
    return ctx.error(path, f"{what} {k!r}{hint}")


def _build_section(cls, data: Any, ctx: _Ctx, path: tuple):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if path:
            raise ctx.error(path, f"must be a mapping of keys, got {_type_name(data)} {_show(data)}")
        raise ctx.error(path, f"the config must be a mapping of sections ({', '.join(SECTIONS)}), got {_type_name(data)}")
    hints = _hints(cls)
    fmap = _schema_fields(cls)
    ignored = getattr(cls, "IGNORED", {})
    aliases = getattr(cls, "KEY_ALIASES", {})
    values: dict[str, Any] = {}
    for key, v in data.items():
        kpath = path + (key,)
        if not isinstance(key, str) or key not in fmap:
            if isinstance(key, str) and key in ignored:
                ctx.warn(kpath, f"accepted but ignored: {ignored[key]}")
                continue
            if isinstance(key, str) and key in aliases:
                target = aliases[key]
                if target in data:
                    raise ctx.error(kpath, f"give either {key!r} or {target!r}, not both")
                key, kpath = target, path + (key,)
            else:
                raise _unknown_key(cls, key, ctx, kpath)
        if v is None:  # `key:` with no value keeps the default (as the Swift trainer's optional fields)
            continue
        values[key] = _coerce(v, hints[key], fmap[key].metadata, ctx, kpath)
        ctx.given.add(path + (key,))
        if "ignored_value" in fmap[key].metadata and values[key] == fmap[key].metadata["ignored_value"]:
            ctx.warn(kpath, f"{str(v).lower()} is ignored: mflux2 always caches latents and text embeddings and releases "
                            f"the text encoder once they are cached (so does the Swift trainer, whatever this says)")
    for name, f in fmap.items():
        if f.metadata.get("required") and name not in values:
            raise ctx.error(path + (name,), "is required")
    return cls(**values)


def _line_map(node: yaml.Node) -> tuple[dict[tuple, int], tuple[tuple, int] | None]:
    """Key path -> 1-based line, from the composed YAML node tree, and the first duplicated key
    (PyYAML would silently keep the last one)."""
    lines: dict[tuple, int] = {}
    dup = None
    seen_nodes: set[int] = set()  # YAML aliases share nodes (and may be recursive): visit each once
    stack: list[tuple[yaml.Node, tuple]] = [(node, ())]
    while stack:
        n, p = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                if k.value in seen and dup is None:
                    dup = (p + (k.value,), k.start_mark.line + 1)
                seen.add(k.value)
                lines[p + (k.value,)] = k.start_mark.line + 1
                stack.append((v, p + (k.value,)))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[p + (i,)] = v.start_mark.line + 1
                stack.append((v, p + (i,)))
    return lines, dup


def _read_yaml(path: str | Path) -> tuple[Any, _Ctx]:
    p = Path(path).expanduser()
    src = str(path)
    if not p.exists():
        raise ConfigError(f"{src}: config file not found")
    if p.is_dir():
        raise ConfigError(f"{src}: is a folder, expected a YAML config file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{src}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{src}: not a UTF-8 text file (bad byte at offset {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise ConfigError(f"{src}{line}: invalid YAML: {problem}") from None
    except Exception as e:  # noqa: BLE001 - e.g. ValueError from an impossible timestamp, RecursionError
        raise ConfigError(f"{src}: invalid YAML: {' '.join(str(e).split()) or type(e).__name__}") from None
    lines, dup = _line_map(node) if node is not None else ({}, None)
    if dup is not None:
        raise ConfigError(f"{src}:{dup[1]}: {_path_str(dup[0])}: key given twice")
    return raw, _Ctx(src, lines)


def _override_path(key: str, source: str) -> tuple[tuple[str, ...], type]:
    """Check a dotted override key against the schema; return its parts and the owning section
    class. The error names the override."""
    parts = tuple(key.split("."))
    cls: Any = TrainConfig
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"{source}: override {key!r}: {_path_str(parts[:i])} is a value, not a section")
        aliases = getattr(cls, "KEY_ALIASES", {})
        fmap = _schema_fields(cls)
        if part not in fmap and part not in aliases:
            err = _unknown_key(cls, part, _Ctx(source), parts[: i + 1])
            raise ConfigError(f"{source}: override {key!r}: {str(err).split(': ', 2)[-1]}")
        owner = cls
        hint = _hints(cls)[aliases.get(part, part)]
        cls = hint if dataclasses.is_dataclass(hint) else None
    if cls is not None:
        raise ConfigError(f"{source}: override {key!r} names a whole section; name a key inside it")
    return parts, owner


def _apply_raw_overrides(raw: Any, overrides: dict[str, Any] | None, ctx: _Ctx) -> Any:
    if not overrides:
        return raw
    if not isinstance(raw, dict):
        return raw  # the section check reports it
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{ctx.source}: override key must be a dotted string like 'training.max_steps', got {_show(key)}")
        parts, owner = _override_path(key, ctx.source)
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        aliases = getattr(owner, "KEY_ALIASES", {})
        canonical = aliases.get(parts[-1], parts[-1])
        for spelling in [canonical, *(a for a, t in aliases.items() if t == canonical)]:  # the override's spelling wins
            node.pop(spelling, None)
        node[parts[-1]] = value
        ctx.overridden.add(parts)
    return raw


def _finalize(cfg: TrainConfig, ctx: _Ctx) -> TrainConfig:
    """Derived defaults and the rules that span several keys. Where the Swift trainer silently
    repairs a config (DOP without a class word or a trigger word), the same file runs here, with one
    warning line that says what was assumed."""
    prov = cfg.provenance
    for path in _leaf_paths(cfg.to_dict()):
        src = ctx.source_of(tuple(path.split(".")))
        if src:
            prov[path] = src

    def derived(path: str, note: str | None) -> None:  # a value filled here: record why
        if path not in prov:
            prov[path] = note

    if cfg.model.name is None and cfg.model.path is None:
        cfg.model.name = "klein-4b"
    if cfg.model.name is None:
        derived("model.name", "none: the architecture is read from model.path")
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().exists():
        raise ctx.error(("model", "path"), f"no such file or folder: {cfg.model.path}")
    name = cfg.model.name
    if not cfg.model.use_base:
        if name in BASE_OF:
            ctx.warn(("model", "use_base"), f"false: trains the distilled {name} weights; the Swift trainer would "
                                            f"train {BASE_OF[name]} (it always trains the undistilled base)")
        elif name is not None:
            ctx.warn(("model", "use_base"), f"false has no effect on {name} (it has no distilled/base pair)")
    if cfg.lora.alpha is None:
        cfg.lora.alpha = float(cfg.lora.rank)
    opt = OPTIMIZER_DEFAULTS[cfg.training.optimizer]
    if cfg.training.learning_rate is None:
        cfg.training.learning_rate = opt["learning_rate"]
    if cfg.training.weight_decay is None:
        cfg.training.weight_decay = opt["weight_decay"]
        if cfg.training.optimizer == "adamw":
            derived("training.weight_decay", "the seed guide's 1e-4 (Swift: 0.01)")
    if cfg.training.max_steps is None:  # the Swift trainer: epochs x 100 steps, whatever the dataset size
        cfg.training.max_steps = cfg.training.epochs * 100
        derived("training.max_steps", "swift: epochs x 100")
        if prov.get("training.epochs") in ("file", "override"):
            ctx.warn(("training", "epochs"), f"{cfg.training.epochs} without max_steps trains {cfg.training.max_steps} steps "
                                             f"(epochs x 100, as the Swift trainer does; not passes over the data)")
    if cfg.dataset.path is None:
        raise ctx.error(("dataset", "path"), "is required (a folder of images or a Hugging Face dataset id)")
    if cfg.checkpoints.output is None:
        stem = Path(ctx.source).stem if ctx.source and not ctx.source.startswith("<") else "run"
        cfg.checkpoints.output = f"output/{stem}"
    if cfg.memory.bucketing.resolutions is None:  # the spec's [512], or the size the user asked for
        cfg.memory.bucketing.resolutions = [cfg.dataset.image_size]
    if cfg.validation.every_n_steps is None:
        cfg.validation.every_n_steps = cfg.checkpoints.save_every
        if prov.get("checkpoints.save_every") in ("file", "override"):
            derived("validation.every_n_steps", "= checkpoints.save_every: every checkpoint gets its images (Swift: 500)")
    if cfg.loss.diff_output_preservation:
        if not cfg.dataset.trigger_word:  # TrainLoRACommand.swift:753: DOP only with a trigger word
            ctx.warn(("loss", "diff_output_preservation"),
                     "true but dataset.trigger_word is not set: DOP is turned off (it replaces the trigger word by the "
                     "class word), as the Swift trainer does; set a trigger word to use DOP")
            cfg.loss.diff_output_preservation = False
            prov["loss.diff_output_preservation"] = "from file (true), turned off as the Swift trainer does: no dataset.trigger_word"
        elif not cfg.loss.diff_output_preservation_class:  # TrainLoRACommand.swift:756: class "object"
            ctx.warn(("loss", "diff_output_preservation"),
                     "true but loss.diff_output_preservation_class is not set: the class word 'object' is assumed, "
                     "as the Swift trainer does; set it (e.g. \"cat\", \"person\") to say what the subject is")
            cfg.loss.diff_output_preservation_class = "object"
            derived("loss.diff_output_preservation_class", "swift: assumed, DOP is on without a class word")
    if cfg.validation.prompts and not cfg.dataset.trigger_word and any(p.apply_trigger for p in cfg.validation.prompts):
        ctx.warn(("validation", "prompts"), "apply_trigger is true but dataset.trigger_word is not set: the prompts are used as written")
    for i, p in enumerate(cfg.validation.prompts):
        if not (p.is_512 or p.is_1024):
            ctx.warn(("validation", "prompts", i), "is_512 and is_1024 are both false: this prompt makes no image")
    if cfg.validation_variant is not None:
        cfg.resolve_model_defaults(cfg.validation_variant)
    return cfg


def _legacy_validation_prompt(raw: Any, ctx: _Ctx) -> Any:
    """The Swift trainer's legacy `validation.prompt: "..."` becomes one prompt at 512 and 1024."""
    if not isinstance(raw, dict) or not isinstance(raw.get("validation"), dict) or "prompt" not in raw["validation"]:
        return raw
    raw = copy.copy(raw)
    val = dict(raw["validation"])
    legacy = val.pop("prompt")
    if val.get("prompts"):
        ctx.warn(("validation", "prompt"), "ignored because validation.prompts is given (as in the Swift trainer)")
    elif legacy is not None:
        if not isinstance(legacy, str):
            raise ctx.error(("validation", "prompt"), f"must be a string, got {_type_name(legacy)} {_show(legacy)}")
        val["prompts"] = [{"prompt": legacy, "is_512": True, "is_1024": True, "apply_trigger": True}]
    raw["validation"] = val
    return raw


def _build(raw: Any, ctx: _Ctx, overrides: dict[str, Any] | None) -> TrainConfig:
    raw = _apply_raw_overrides(raw, overrides, ctx)
    raw_for_rebuild = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    raw = _legacy_validation_prompt(raw, ctx)
    cfg = _build_section(TrainConfig, raw, ctx, ())
    cfg.source, cfg.raw = ctx.source, raw_for_rebuild
    return _finalize(cfg, ctx)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read, validate and resolve a YAML training config. `overrides` maps dotted key paths to
    values (`{"training.max_steps": 10}`) and is applied before validation."""
    raw, ctx = _read_yaml(path)
    return _build(raw, ctx, overrides)


def config_from_dict(data: Any, source: str = "<config>", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate a config given as a mapping (as YAML would load it)."""
    return _build(copy.deepcopy(data), _Ctx(source), overrides)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config: `cfg`'s source mapping with dotted-key overrides, validated like the file.
    (The file's warnings were given when it was loaded; they are not repeated.)"""
    raw = cfg.raw if cfg.raw else cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return config_from_dict(raw, source=cfg.source, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Resume identity
# ---------------------------------------------------------------------------------------------


def resume_signature(cfg: TrainConfig, model: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields a run cannot change and still resume its LoRA and optimiser state. `model`: the
    model's identity (`cache.model_identity`: its architecture and a fingerprint of its weights), so
    a moved or copied model folder still resumes while another model does not. Without it, the form
    written before the identity was recorded (model.name and model.path), to check such checkpoints."""
    sig: dict[str, Any] = dict(model) if model is not None else {"model.name": cfg.model.name, "model.path": cfg.model.path}
    sig.update({
        "lora.rank": cfg.lora.rank,
        "lora.alpha": cfg.lora.alpha,
        "lora.target_layers": cfg.lora.target_layers,
    })
    return sig


def config_hash(cfg: TrainConfig, model: dict[str, str] | None = None) -> str:
    """A short hash of `resume_signature(cfg, model)`, stored in training_state.json."""
    blob = json.dumps(resume_signature(cfg, model), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: TrainConfig) -> str:
    return cfg.dump_yaml()


_KEY_OWNERS = _all_keys()
