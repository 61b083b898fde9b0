"""The training config: flux-2-swift-mlx's YAML schema as validated dataclasses.

A user's config file from the Swift trainer runs unchanged: every section and key keeps its name and
meaning (docs/training.md, "The seed guide: schema and semantics"). Ours in addition: model.path,
model.validation_path, model.transformer_quantization, training.seed, dataset.skip_bad_images,
dataset.auto_caption / caption_model / caption_style, validation.vlm_scoring.model / score_bleed and
an int ("every n blocks") for memory.gradient_checkpointing.

The rule for a key left out: the seed guide's default stands; where it is silent, the default is what
the Swift trainer really does with the same file (its training code, not only its parser).
_DEFAULT_NOTES records, per key, which of the two it is (or why ours differs); --print-config shows it.

Defaults live in one place: the dataclass field defaults below. A default of None on a field whose
comment says "derived" is filled by `_finalize` (config_loading.py) from the tables MODEL_DEFAULTS / OPTIMIZER_DEFAULTS
(per-model and per-optimizer defaults) or from another field. Everything wrong in a config raises a
`ConfigError` whose message is one line naming the file (and line), the key path and the bad value.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union, get_type_hints

import yaml

from mflux2.hub import REPOS
from mflux2.vlm import DEFAULT_VLM


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


def _check_lokr_factor(v: int) -> str | None:
    return None if v == -1 or v > 0 else f"must be -1 (automatic, LyCORIS's factor) or a positive integer, got {v}"


def _check_nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _check_caption_ext(v: str) -> str | None:
    e = v.strip().lstrip(".")
    if not e or not e.replace("_", "").replace("-", "").isalnum():
        return f"must be a file extension like txt or caption, got {v!r}"
    return None


# The most reference images per sample: the Swift CLI's limits for generation (Flux2Config.swift),
# which mflux2 applies to edit training's control folders too.
MAX_REFERENCES = {"klein": 4, "klein-base": 4, "dev": 6}


def family_of(variant: str) -> str:
    """klein-4b -> klein, klein-base-9b -> klein-base, dev -> dev."""
    return "dev" if variant == "dev" else ("klein-base" if variant.startswith("klein-base") else "klein")


def check_reference_count(cfg: "TrainConfig", model: str) -> None:
    """dataset.control_path names at most MAX_REFERENCES of the model's family folders (ConfigError
    otherwise). `model`: a variant or family name. load_config checks it for a named model; the
    trainer again once model.path's family is known."""
    n, most = len(cfg.dataset.control_path or ()), MAX_REFERENCES[family_of(model)]
    if n > most:
        raise ConfigError(f"{cfg.source}: dataset.control_path: {n} folders, but {model} takes at most "
                          f"{most} reference images; give at most {most}")


def _f(default: Any = None, **meta: Any):
    """A dataclass field with validation metadata: choices, aliases, ge/gt/le/lt, check, warn_aliases,
    empty_ok (a list of str/int that may be empty)."""
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
    # ours (no Swift key): the adapter type. lora = every existing file's meaning; lokr / loha as
    # LyCORIS, dora as PEFT (docs/lora.md "Adapter types").
    type: str = _f("lora", choices=("lora", "lokr", "loha", "dora"))
    factor: int = _f(-1, check=_check_lokr_factor)  # LoKr: LyCORIS's factor (-1 = automatic)
    decompose_both: bool = _f(False)  # LoKr: LyCORIS's decompose_both (factor W1 too)
    # ours: start a new run from an existing adapter (a .safetensors file, a folder holding one, or a
    # hub repo owner/name[/file.safetensors]); a resumed run ignores it (mflux2/training/init_from.py)
    init_from: str | None = _f(None, check=_check_nonempty)


@dataclass
class DatasetConfig:
    path: str | None = _f(None, check=_check_nonempty)  # required: local folder or HF dataset repo id
    validation_path: str | None = _f(None, check=_check_nonempty)
    trigger_word: str | None = _f(None, check=_check_nonempty)
    caption_format: str = _f("txt", choices=("txt", "jsonl"), aliases={"json": "jsonl"})
    image_size: int = _f(512, check=_check_resolution)  # square size when bucketing is disabled
    skip_bad_images: bool = _f(False)  # ours: skip unreadable images with a listed warning
    # Edit (image-to-image) training, the Swift trainer's keys: the folder of control (reference)
    # images, each paired with the target of the same file stem; absent = text-to-image. Ours also: a
    # list of folders, reference j of a target coming from folder j (t = 10, 20, ... in list order).
    # A single folder is stored as a one-item list. Relative paths are resolved against the working
    # directory, as dataset.path (and as the Swift trainer does).
    control_path: list[str] | None = _f(None, item_check=_check_nonempty)
    control_dropout: float = _f(0.0, ge=0, le=1)  # per micro-batch: train it without its references
    # ours: the controls of dataset.validation_path, for the held-out loss (same rules)
    validation_control_path: list[str] | None = _f(None, item_check=_check_nonempty)
    # ours: caption the images that have no caption with a VLM before the caches are filled
    # (mflux2/captions.py); the VLM is freed before the transformer loads
    auto_caption: bool = _f(False)
    caption_model: str = _f(DEFAULT_VLM, check=_check_nonempty)  # ours: hub id, short name or folder
    caption_style: str = _f("subject", choices=("subject", "style", "edit"))  # ours: what the captions describe
    # ours (ai-toolkit's names where the meaning is the same, its spellings accepted as
    # KEY_ALIASES). Semantics: docs/training.md "Datasets".
    name: str | None = _f(None, check=_check_nonempty)  # derived: the folder's name (metrics.jsonl, report)
    repeats: int = _f(1, ge=1)  # times each image appears per epoch
    loss_weight: float = _f(1.0, gt=0)  # multiplies the loss of this dataset's samples
    is_regularization: bool = _f(False)  # a prior-preservation set: own captions, no trigger word
    mask_path: str | None = _f(None, check=_check_nonempty)  # folder of masks paired by file stem
    alpha_mask: bool = _f(False)  # the image's alpha channel is its mask
    mask_min: float = _f(0.0, ge=0, lt=1)  # the loss weight of black mask pixels (white = 1)
    mask_missing: str = _f("error", choices=("error", "full"))  # an image without a mask: refuse, or train it unmasked
    caption_ext: str = _f("txt", check=_check_caption_ext)  # caption file extension (caption_format: txt)
    caption_dropout: float | None = _f(None, ge=0, le=1)  # derived: training.caption_dropout
    shuffle_tokens: bool = _f(False)  # shuffle the caption's comma-separated tags
    keep_tokens: int = _f(0, ge=0)  # leading tags kept in place when shuffling
    shuffle_variants: int = _f(4, ge=1, le=64)  # shuffled captions encoded per caption (the text cache)

    KEY_ALIASES: ClassVar[dict[str, str]] = {
        "num_repeats": "repeats", "is_reg": "is_regularization", "loss_multiplier": "loss_weight",
        "mask_min_value": "mask_min", "caption_dropout_rate": "caption_dropout", "folder_path": "path",
    }

    @property
    def edit(self) -> bool:
        """Edit (image-to-image) training: targets are paired with control images."""
        return bool(self.control_path)


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
    # ours: more prompts to preserve besides the class prompt ("" = the empty prompt): in DOP's
    # preservation pass, the class prompt on every other DOP step, these in turn on the others
    # (data.preservation_prompts; docs/training.md).
    diff_output_preservation_prompts: list[str] = _f([], empty_ok=True)  # [] = the class prompt only


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

    # The Swift source reads `learning_curve_smoothing`; the seed guide writes `..._window`. Both work.
    KEY_ALIASES: ClassVar[dict[str, str]] = {"learning_curve_smoothing": "learning_curve_smoothing_window"}


@dataclass
class ValidationPrompt:
    prompt: str | None = _f(None, required=True, check=_check_nonempty)
    apply_trigger: bool = _f(True)  # prepend "<trigger_word>, "
    is_512: bool = _f(True)
    is_1024: bool = _f(False)
    seed: int | None = _f(None, ge=0)  # overrides validation.seed
    sizes: list[int] | None = _f(None, item_check=_check_resolution)  # ours: square sizes, replaces is_512/is_1024
    # Editing: the prompt's image is made from these reference images (t = 10, 20, ...) and named
    # prompt_<i>_i2i_<S>x<S>.png. Swift's key takes one path; ours also a list. Relative paths are read
    # from the current folder, as the Swift trainer does (and as dataset.path).
    reference_image: list[str] | None = _f(None, item_check=_check_nonempty)
    # Swift's: the prompt describes a reference image (written by a VLM); when any prompt has it,
    # VLM scoring scores exactly those prompts (training/scoring.py)
    is_vlm_generated: bool = _f(False)


@dataclass
class VLMScoringConfig:
    """The Swift trainer's `validation.vlm_scoring` (TrainingConfigYAML.swift YAMLVLMScoringConfig,
    its defaults), honoured by training/scoring.py; `model` and `score_bleed` are ours."""
    enabled: bool = _f(False)
    scene_weight: float = _f(0.5, ge=0, le=1)  # composite = w * scene + (1 - w) * style
    reference_images: list[str] | None = _f(None, item_check=_check_nonempty)  # None: picked from dataset.path
    max_reference_images: int = _f(3, ge=1)
    compare_to_baseline: bool = _f(True)
    save_best_checkpoint: bool = _f(True)
    early_stopping: bool = _f(False)
    early_stopping_patience: int = _f(3, ge=1)
    early_stopping_min_delta: float = _f(3.0, ge=0)  # 0-100 scale
    degradation_threshold: float = _f(15.0, ge=0)  # 0-100 scale
    model: str = _f(DEFAULT_VLM, check=_check_nonempty)  # ours: hub id, short name or folder
    score_bleed: bool = _f(True)  # ours: with DOP, the no-trigger images are scored for absence of the subject


@dataclass
class ValidationConfig:
    prompts: list[ValidationPrompt] = _f([])  # each a mapping or a plain string
    every_n_steps: int | None = _f(None, ge=0)  # derived: checkpoints.save_every; 0 = never
    seed: int = _f(42, ge=0)
    guidance: float | None = _f(None, gt=0)  # derived: MODEL_DEFAULTS
    steps: int | None = _f(None, ge=1)  # derived: MODEL_DEFAULTS
    vlm_scoring: VLMScoringConfig = field(default_factory=VLMScoringConfig)

    IGNORED: ClassVar[dict[str, str]] = {
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
    # ours: several datasets. Absent or []: `dataset` is the one dataset (what it always meant). Given:
    # each entry is a dataset, and the keys given in `dataset` (never its path or name) are every
    # entry's defaults (config_loading._finalize). Omitted from to_dict when empty.
    datasets: list[DatasetConfig] = _f([], empty_ok=True)
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
    # dotted key -> where its value was written ("file.yaml:12", "file.yaml (override)"): for errors found later
    locations: dict = field(default_factory=dict, repr=False, compare=False, metadata={"internal": True})

    @property
    def dataset_list(self) -> list[DatasetConfig]:
        """The datasets that train: `datasets`, or the one `dataset`."""
        return list(self.datasets) if self.datasets else [self.dataset]

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
        """The fully resolved config as plain YAML-able data (what --print-config shows); `datasets`
        only when it is used."""
        d = _to_plain(self)
        if not d["datasets"]:
            del d["datasets"]
        return d

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
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # `datasets`: block items
                rows.append((f"{pad}{k}:", labels.get(prefix + k)))
                for item in v:
                    for j, (ik, iv) in enumerate(item.items()):
                        rows.append((f"{pad}  {'- ' if j == 0 else '  '}{ik}: {_flow(iv, unicode)}", None))
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
    "lora.type": "no Swift key; LoRA, what the Swift trainer trains",
    "lora.factor": "no Swift key; LyCORIS's default (automatic)",
    "lora.decompose_both": "no Swift key; LyCORIS's default",
    "lora.init_from": "no Swift key; a fresh LoRA (A random, B zero)",
    "dataset.path": None,
    "dataset.validation_path": None,
    "dataset.trigger_word": None,
    "dataset.caption_format": None,
    "dataset.image_size": None,
    "dataset.skip_bad_images": "no Swift key",
    "dataset.control_path": None,  # absent: text-to-image training
    "dataset.control_dropout": None,
    "dataset.validation_control_path": "no Swift key; the validation loss is computed without references",
    "dataset.auto_caption": "no Swift key",
    "dataset.caption_model": "no Swift key; the Swift trainer's scoring VLM",
    "dataset.caption_style": "no Swift key",
    **{f"dataset.{k}": "no Swift key" for k in ("repeats", "loss_weight", "is_regularization", "mask_path", "alpha_mask",
                                                "mask_min", "mask_missing", "caption_ext", "shuffle_tokens", "keep_tokens",
                                                "shuffle_variants")},
    "dataset.name": "no Swift key; the folder's name",
    "dataset.caption_dropout": "no Swift key; training.caption_dropout",
    "datasets": "no Swift key; dataset is the one dataset",
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
    "loss.diff_output_preservation_prompts": "no Swift key; none: DOP preserves the class prompt only",
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
    **{f"validation.vlm_scoring.{f.name}": None for f in fields(VLMScoringConfig)},
    "validation.vlm_scoring.model": "no Swift key; the Swift trainer's Qwen3.5-4B 4-bit",
    "validation.vlm_scoring.score_bleed": "no Swift key",
    "ema.enabled": None,  # the Swift parser's true is never used: its trainer has no EMA
    "ema.decay": None,
    **{f"early_stop.{f.name}": None for f in fields(EarlyStopConfig)},
}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)  # field types are strings under `from __future__ import annotations`


def _schema_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls) if not f.metadata.get("internal")}


# The sections (dataclasses); `datasets`, a list of DatasetConfig, is a TrainConfig field beside them.
SECTIONS: dict[str, type] = {name: _hints(TrainConfig)[name] for name in _schema_fields(TrainConfig)
                             if dataclasses.is_dataclass(_hints(TrainConfig)[name])}


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, list):
        return [_to_plain(x) for x in obj]
    return obj


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
    if cfg.lora.type != "lora":  # (only then: a LoRA run's signature, and its checkpoints' hash, stay as they were)
        sig.update({"lora.type": cfg.lora.type, "lora.factor": cfg.lora.factor, "lora.decompose_both": cfg.lora.decompose_both})
    return sig


def config_hash(cfg: TrainConfig, model: dict[str, str] | None = None) -> str:
    """A short hash of `resume_signature(cfg, model)`, stored in training_state.json."""
    blob = json.dumps(resume_signature(cfg, model), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: TrainConfig) -> str:
    return cfg.dump_yaml()
