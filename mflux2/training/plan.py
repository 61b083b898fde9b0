"""The run's plan: every decision that depends on the config, the model and the machine, made once.

`make_plan(cfg, source, machine, ...)` decides the transformer's and the text encoder's precision,
gradient checkpointing and its segment mode, how validation images are rendered (the separate
validation model kept loaded beside training, or loaded for each validation and freed), the bucket
shapes, how many prompts are embedded, the disk needed, and each phase's predicted peak memory.
`mflux2-train` takes its decisions from it and logs `plan.lines()`; `mflux2-train --dry-run` prints
the very same lines, so what the dry run says is what the run does.

Nothing here loads weights: the models are weighed from their config files or safetensors headers
(or, for a released model not downloaded yet, from its known architecture), which is what lets
`--dry-run --memory 32` answer "does it fit a 32 GB Mac?" before a download.

How each phase's peak is predicted (the terms and the jobs they were fitted on are in
docs/performance.md, "What the plan predicts"):
- text-encoder cache: its weights as loaded (the layers used, no LM head, at the chosen precision)
  × (1 + TEXT_ENCODER_WORKING), plus its largest tensor in bf16 when it is quantized on load (held
  beside its quantized copy);
- latent cache: the VAE plus its encoder's activations per pixel of the largest bucket (they depend
  on the VAE's GroupNorm path on that backend: VAE_BYTES_PER_PIXEL);
- training step: `memory.estimate_peak_gb` (fitted on single steps) plus JOB_STEP_GB (what a step
  inside the whole job holds beyond a lone step), plus the validation model when it stays loaded;
- validation images: the training model and its LoRA state, the VAE and the validation model, plus
  the larger of what sampling holds (`sampling_bytes`: the memory limit it runs under) and the VAE
  decode's working set;
- VLM captions / scoring: the VLM's weights and working set on top of what stays resident.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mflux2.training import memory

GB = 1e9
PRECISIONS = ("bf16", "int8", "int4")

# Fitted on the full-size jobs measured on an H100 (docs/bench/h100-2026-12-0*-job-*.json) and checked
# out of sample on the others: the text encoder on klein-4b and dev, checked on klein-9b; the rest on
# klein-4b, checked on klein-9b and dev. tests/test_plan.py asserts every ratio; docs/performance.md
# ("What the plan predicts") has the table.
TEXT_ENCODER_WORKING = 0.175  # beyond the loaded weights while the cache fills, × those weights (0.15 klein-4b, 0.17 dev)
VAE_BYTES_PER_PIXEL = {  # the VAE's activations per pixel (encode: of the bucket; decode: of the output), by GroupNorm path
    "reference": {"encode": 1600, "decode": 2500},  # (0.39 and 0.64 GB at 512² on klein-4b's jobs)
    "fast": {"encode": 4900, "decode": 9200},  # one graph, nothing evaluated per chunk (1.27 and 2.39 GB at 512²: dev)
}
JOB_STEP_GB = 3.1  # a step in the job beyond a lone step (3.03 GB on klein-4b)
JOB_STEP_SHARE = 0.35  # ... and at most this share of the lone step (models below klein-4b: unmeasured)
# A sampling forward runs under a memory limit RUN_AHEAD × its live set above what is allocated
# (`sampling.bounded_run_ahead`); MLX checks the limit only between the operations it hands over in
# batches, so more passes it: on the CPU 0.48× the live set at hidden 1024 (tests/test_sampling.py)
# and 1.26× at dev's widths with 32 tokens (docs/performance.md, "Whole job"). Before that limit
# (and the ordered dequantisation tiles) the jobs' forwards held 680 units of tokens × hidden × 2
# bytes: 12.9 GB on dev, 6.4 GB on klein-4b.
SAMPLING_OVERSHOOT = 1.5


# ------------------------------------------------------------------------------------------------
# The machine


@dataclass(frozen=True)
class Machine:
    usable_gb: float
    what: str  # how usable_gb was found, for the plan's heading
    backend: str = "cpu"  # "cuda" | "metal" | "cpu": which fast paths run there (`ops.switches`)

    @property
    def cuda(self) -> bool:
        return self.backend == "cuda"

    def vae_bytes_per_pixel(self, what: str) -> int:
        from mflux2.ops.switches import is_fast

        return VAE_BYTES_PER_PIXEL["fast" if is_fast("group_norm", on=self.backend) else "reference"][what]


def this_machine() -> Machine:
    """The machine this runs on: Metal's recommended working set, else 90% of the device's (or, on
    the CPU, the machine's) memory (`memory.available_gb`)."""
    import mlx.core as mx

    from mflux2.ops.switches import backend, cuda_available

    where = "cuda" if cuda_available() else backend()
    info = mx.device_info()
    if info.get("max_recommended_working_set_size"):
        what = "this Mac: Metal's recommended working set"
    else:
        what = f"this machine: 90% of its {'GPU' if where == 'cuda' else ''} memory".replace("  ", " ")
    return Machine(memory.available_gb(), what, backend=where)


def mac_working_set_gb(total_gb: float) -> float:
    """macOS's recommended GPU working set (Metal's `recommendedMaxWorkingSetSize`) for a Mac with
    `total_gb` of unified memory: two thirds of it up to 36 GB, three quarters above (the values
    Apple Silicon Macs report: 16 GB → 10.7, 32 GB → 21.3, 64 GB → 48, 128 GB → 96)."""
    return total_gb * (2 / 3 if total_gb <= 36 else 3 / 4)


def mac(total_gb: float) -> Machine:
    usable = mac_working_set_gb(total_gb)
    share = "two thirds" if total_gb <= 36 else "three quarters"
    return Machine(usable, f"a Mac with {total_gb:g} GB of unified memory: macOS's recommended GPU working set, {share} of it",
                   backend="metal")


# ------------------------------------------------------------------------------------------------
# The models, weighed without loading them


class Preset:
    """A model known only by its variant (a hub model not downloaded yet)."""

    layout = "diffusers"
    config: dict = {}

    def __init__(self, variant: str):
        from mflux2.models.transformer import PRESETS

        self.variant = variant
        self.family = "dev" if variant == "dev" else ("klein-base" if variant.startswith("klein-base") else "klein")
        self.root = None
        if variant not in PRESETS:
            raise ValueError(f"unknown variant {variant!r}")


@dataclass
class ModelFacts:
    name: str  # the training model as the plan names it
    family: str
    transformer: object  # TransformerConfig
    stored: str | None  # a converted folder's transformer precision (it loads only so)
    te_stored: str | None  # a converted folder's text-encoder precision
    te: dict  # precision -> {"weights", "largest"} bytes, or a QuantizationError's text
    vae_gb: float
    validation: object | None = None  # the separate validation model's TransformerConfig
    validation_name: str | None = None
    validation_family: str | None = None
    vlm_gb: dict = field(default_factory=dict)  # "captions"/"scoring" -> the VLM's weights in GB (None: unknown)
    root: object = None  # the model's folder (None for a Preset)


def _te_variant(source) -> str:
    return source.variant or ("mistral" if source.family == "dev" else "qwen3")


def weigh_models(cfg, source, validation_source=None) -> ModelFacts:
    """What the plan needs to know of the training model (a ModelSource or a Preset), and of the
    separate validation model if there is one."""
    import mlx.core as mx

    from mflux2.models import text_encoder as te_mod

    dtype = mx.float32 if cfg.training.dtype == "float32" else mx.bfloat16
    folder = None if isinstance(source, Preset) else source.text_encoder
    te_stored = memory.stored_quantization(source, "text_encoder")
    te = {}
    for q in ((te_stored,) if te_stored else PRECISIONS):
        try:
            te[q] = te_mod.loaded_bytes(_te_variant(source), None if q == "bf16" or te_stored else q, dtype, folder=folder)
        except te_mod.QuantizationError as e:
            te[q] = str(e)
    facts = ModelFacts(
        name=source.variant or f"custom ({source.family})", family=source.family,
        transformer=memory._source_config(source), stored=memory.stored_quantization(source), te_stored=te_stored, te=te,
        vae_gb=_vae_bytes(None if isinstance(source, Preset) else source.vae, dtype) / GB, root=getattr(source, "root", None),
    )
    if validation_source is not None:
        facts.validation = memory._source_config(validation_source)
        facts.validation_name = validation_source.variant or str(getattr(validation_source, "root", "") or "")
        facts.validation_family = validation_source.family
    return facts


def _vae_bytes(path, dtype) -> float:
    """The VAE as loaded in `dtype` (its batch-norm statistics stay float32): from its files' shapes,
    or the released VAE's architecture."""
    from mlx.utils import tree_flatten

    if path is None:
        from mflux2.models.vae import Flux2VAE, VAEConfig

        return sum(v.size * dtype.size for _, v in tree_flatten(Flux2VAE(VAEConfig()).parameters()))
    from mflux2.models.vae import _vae_files
    from mflux2.weights import tensor_shapes

    return sum(math.prod(shape) * (4 if dt == "F32" and "running" in k else dtype.size)
               for k, (shape, dt) in tensor_shapes(_vae_files(path)).items())


def vlm_size(name: str) -> tuple[float | None, bool]:
    """(a VLM's weights in GB, whether they are here): from its local folder or the Hugging Face
    cache, else the hub's metadata (a download), else (None, False)."""
    from mflux2 import vlm

    folder = vlm.cached_folder(name)
    if folder is not None:
        return vlm.weights_bytes(folder) / GB, True
    size = vlm.hub_weights_bytes(name)
    return (size / GB if size else None), False


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Phase:
    name: str
    gb: float | None
    how: str


@dataclass
class RunPlan:
    machine: Machine
    model: str
    transformer_quantization: str
    text_encoder_quantization: str  # bf16 / int8 / int4
    text_encoder_as_stored: bool  # a converted folder's text encoder: it loads as stored, nothing to quantize
    checkpoint_every: int
    checkpointing_turned_on: bool  # by `transformer_quantization: auto`
    blockwise_ahead: int  # 1: the host encodes the next checkpointed segment while one runs; 0: one at a time
    small_command_batches: bool  # CUDA + checkpointing: MLX command batches of 4 operations
    validation: str  # "none" | "training model" | "kept loaded" | "loaded per validation"
    validation_model_gb: float
    keep_validation_model: bool
    buckets: dict  # (W, H) -> images
    prompt_list: list  # the prompts to embed (`data.prompts_to_embed`); captions a VLM writes first join them then
    pending_captions: int  # images the VLM captions before the cache fills (a prompt each)
    disk_gb: float
    checkpoints_kept: int
    phases: list[Phase]
    choices: list[str]  # why each decision was made, one line each
    problems: list[str] = field(default_factory=list)  # what stops the run before its first step, one line each
    suggestions: list[str] = field(default_factory=list)  # changes that make it fit, each re-planned

    @property
    def prompts(self) -> int:
        """Distinct prompts the text cache holds."""
        return len(set(self.prompt_list)) + self.pending_captions

    @property
    def text_encoder_quantize(self) -> str | None:
        """What the text encoder's loader quantizes to (None: nothing)."""
        q = self.text_encoder_quantization
        return None if q == "bf16" or self.text_encoder_as_stored else q

    @property
    def memory_verdict(self) -> str | None:
        """None when every phase fits, else one line saying which do not."""
        if self.fits:
            return None
        names = ", ".join(p.name for p in self.over)
        return f"does not fit: {names} need(s) more than the {self.machine.usable_gb:.1f} GB usable ({self.peak_gb:.1f} GB)"

    @property
    def over(self) -> list[Phase]:
        return [p for p in self.phases if p.gb is not None and p.gb > self.machine.usable_gb]

    @property
    def fits(self) -> bool:
        return not self.over

    @property
    def peak_gb(self) -> float:
        return max((p.gb for p in self.phases if p.gb is not None), default=0.0)

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def lines(self) -> list[str]:
        """The plan as the run logs it and the dry run prints it."""
        ckpt = (f"every {self.checkpoint_every} block(s)" + (" (turned on: the precision fits only with it)" if self.checkpointing_turned_on else "")
                + ("; segments one at a time (only that fits)" if not self.blockwise_ahead else "")
                + ("; MLX command batches of 4" if self.small_command_batches else "")) if self.checkpoint_every else "off"
        out = [f"plan for {self.machine.what}: {self.machine.usable_gb:.1f} GB usable",
               f"transformer: {self.model}, {self.transformer_quantization}; gradient checkpointing {ckpt}",
               f"text encoder: {self.text_encoder_quantization}{' (as stored)' if self.text_encoder_as_stored else ''}",
               f"validation images: {self.validation}" + (f" ({self.validation_model_gb:.1f} GB)" if self.validation_model_gb else ""),
               "buckets: " + (", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(self.buckets.items())) or "-"),
               f"text cache: {self.prompts} prompt(s); disk: {self.disk_gb:.2f} GB for the caches and {self.checkpoints_kept} checkpoint(s)"]
        if self.machine.cuda:  # MLX's CUDA settings, read once per process (mflux2/__init__.py sets the default)
            out.append("MLX on CUDA: graphs " + ("on" if os.environ.get("MLX_USE_CUDA_GRAPHS", "1") != "0" else "off")
                       + " (MLX_USE_CUDA_GRAPHS)")
        out += self.choices
        out.append("peak memory per phase:")
        for p in self.phases:
            gb = "     ?   " if p.gb is None else f"{p.gb:6.2f} GB" if p.gb >= 0.01 else f"{p.gb:6.4f} GB"  # (toy models)
            mark = "" if p.gb is None else (" ok " if p.gb <= self.machine.usable_gb else " TOO MUCH")
            out.append(f"  {p.name:<20} {gb}{mark} ({p.how})")
        return out


def _run_args(cfg, resolution: int | None = None) -> dict:
    """estimate_peak_gb's arguments for the run (its largest training resolution)."""
    reg = any(d.is_regularization for d in cfg.dataset_list)  # a reg batch beside every subject batch (PairedSampler)
    return dict(resolution=resolution or max(cfg.resolutions), batch=cfg.training.batch_size * (2 if reg else 1), rank=cfg.lora.rank,
                targets=cfg.lora.target_layers, dop=bool(cfg.loss.diff_output_preservation),
                references=max(len(d.control_path or ()) for d in cfg.dataset_list), adapter=_adapter(cfg))


def _adapter(cfg) -> tuple:
    """(type, factor, decompose_both) of the run's adapter, for the parameter counts."""
    return cfg.lora.type, cfg.lora.factor, cfg.lora.decompose_both


def _lora_state_gb(f: ModelFacts, cfg) -> float:
    """The adapter in float32 with AdamW's two moments (and the EMA copy)."""
    n = memory.lora_parameters(f.transformer, cfg.lora.rank, cfg.lora.target_layers, *_adapter(cfg))
    return n * 4 * (4 if cfg.ema.enabled else 3) / GB


def _text_encoder(f: ModelFacts, cfg, budget: float) -> tuple[str, Phase | None, list[str], list[str]]:
    """(precision, its phase, choice lines, problems)."""
    choices, problems = [], []
    if f.te_stored:
        q = f.te_stored
        asked = cfg.model.quantization
        if asked not in ("auto", q) and cfg.provenance.get("model.quantization") in ("file", "override"):
            problems.append(_stored_precision_problem(f.root, "text encoder", "model.quantization", asked, q, "--text-encoder-quantize"))
    elif cfg.model.quantization == "auto":
        ok = [q for q in PRECISIONS if isinstance(f.te[q], dict)]
        for q in PRECISIONS:
            if not isinstance(f.te[q], dict):
                choices.append(f"warning: {f.te[q].split(' — ')[0]}: auto leaves it out")
        fitting = [q for q in ok if _te_gb(f, q) <= budget]
        q = fitting[0] if fitting else ok[-1]
        choices.append(f"text encoder auto: {q} — the most precise whose phase fits "
                       f"({', '.join(f'{p} {_te_gb(f, p):.1f} GB' for p in ok)})")
    else:
        q = cfg.model.quantization
        if not isinstance(f.te[q], dict):
            problems.append(f"model.quantization: {f.te[q]}")
            return q, None, choices, problems
    quantizing = not f.te_stored and q != "bf16"
    how = (f"weights {f.te[q]['weights'] / GB:.2f} GB{f' + {_largest(f, q):.2f} GB quantized on load' if quantizing else ''}"
           f" + {_te_working_gb(f, q):.2f} GB working")
    return q, Phase("text-encoder cache", _te_gb(f, q), how), choices, problems


def _largest(f: ModelFacts, q: str) -> float:
    return f.te[q]["largest"] / GB


def _te_working_gb(f: ModelFacts, q: str) -> float:
    return TEXT_ENCODER_WORKING * f.te[q]["weights"] / GB


def _te_gb(f: ModelFacts, q: str) -> float:
    quantizing = not f.te_stored and q != "bf16"
    return f.te[q]["weights"] / GB + (_largest(f, q) if quantizing else 0.0) + _te_working_gb(f, q)


def _stored_precision_problem(root, component: str, key: str, asked: str, stored: str, flag: str) -> str:
    """A converted folder's component loads only at the precision it was converted with."""
    return (f"{key}: {asked}, but the {component} of {root} was converted as {stored} (mflux2.json) and loads "
            f"only so — set {key} to {stored} or auto, or convert the model again "
            f"{f'with {flag} {asked}' if asked != 'bf16' else f'without {flag}'}")


def reference_tokens(paths) -> int:
    """Image tokens of an editing prompt's reference images once prepared for the model (area capped
    as `Flux2Pipeline.prepare_references` caps it, sides floored to 16); from the files' headers."""
    from PIL import Image

    from mflux2.pipeline import reference_area, reference_scaled_size

    area, n = reference_area("diffusers", len(paths)), 0
    for path in paths:
        try:
            with Image.open(path) as im:
                w, h = reference_scaled_size(*im.size, area)
        except OSError:  # the run stops on it with its own error; count the largest reference meanwhile
            w = h = 1024
        n += (w // 16) * (h // 16)
    return n


def _validation_tokens(items) -> int:
    return max((it.width // 16) * (it.height // 16) + reference_tokens(it.references) for it in items) + memory.TEXT_TOKENS


def sampling_bytes(t, q: str, tokens: int) -> float:
    """What sampling holds beyond the loaded models: the memory limit above them while it runs
    (`sampling.RUN_AHEAD` × one forward's live set, `sampling.forward_live_bytes`) plus what passes
    the limit (SAMPLING_OVERSHOOT live sets). `t` a TransformerConfig, `q` its base's precision,
    `tokens` the sequence (image + references + text)."""
    from mflux2 import sampling
    from mflux2.ops.gemm import tile_bytes

    d, m = t.hidden_size, t.mlp_hidden
    tile = 0 if q == "bf16" else tile_bytes(3 * d + 2 * m, d)  # the largest layer: a single block's linear1
    live = sampling.forward_live_bytes(d, m, tokens, tile)
    if tokens % 128:  # unfused attention: the [B, H, N, N] scores exist
        live += t.num_attention_heads * tokens**2 * 6
    return ((sampling.RUN_AHEAD or 0) + SAMPLING_OVERSHOOT) * live


def _candidate(f: ModelFacts, cfg, machine: Machine, q: str, every: int, synchronous: bool, items, tokens: int,
               fixed: list[Phase]) -> dict:
    """The phases of one choice of precision × checkpointing × segment mode (the validation
    rendering follows from it); `tokens` the largest validation image's sequence."""
    budget = machine.usable_gb
    small = bool(every) and memory.small_command_batches(machine.cuda)
    args = _run_args(cfg)
    lone = memory.estimate_peak_gb(f.transformer, q, checkpointing=every, synchronous=synchronous, small_batches=small, **args)
    job = min(JOB_STEP_GB, JOB_STEP_SHARE * lone)
    step = lone + job
    train_w = memory.weights_bytes(f.transformer, q) / GB
    val_w = memory.weights_bytes(f.validation, q) / GB if f.validation is not None and items else 0.0
    # a separate validation model stays beside training when both fit twice over (room for the rest of the Mac)
    keep = bool(val_w) and 2 * (step + val_w) <= budget
    phases = list(fixed)
    ckpt = f", checkpointing every {every}{' (segments one at a time)' if synchronous else ''}" if every else ""
    phases.append(Phase("training step", step + (val_w if keep else 0.0),
                        f"{q}{ckpt}: a step {lone:.2f} GB + {job:.2f} GB in the job"
                        + (f" + the validation model {val_w:.2f} GB kept loaded" if keep else "")))
    if items:
        vcfg = f.validation if f.validation is not None else f.transformer
        vfam = f.validation_family or f.family
        fwd = sampling_bytes(vcfg, q, tokens)  # (CFG's second pass runs after the first: no more)
        decode = machine.vae_bytes_per_pixel("decode") * max(it.width * it.height for it in items)
        held = train_w + _lora_state_gb(f, cfg) + f.vae_gb + val_w
        phases.append(Phase("validation images", held + max(fwd, decode) / GB,
                            f"training model {train_w:.2f} GB + LoRA state{f' + validation model {val_w:.2f} GB' if val_w else ''}"
                            f" + VAE + {'sampling under its memory limit' if fwd >= decode else 'the VAE decode'} "
                            f"({max(fwd, decode) / GB:.2f} GB at {max(it.width for it in items)}²)"))
    scoring = f.vlm_gb.get("scoring", "none")
    if scoring != "none":
        resident = train_w + _lora_state_gb(f, cfg) + f.vae_gb + (val_w if keep else 0.0)
        phases.append(Phase("VLM scoring", None if scoring is None else memory.vlm_phase_gb(scoring, resident),
                            "VLM size unknown" if scoring is None else
                            f"training model + VLM {scoring:.2f} GB + {memory.VLM_WORKING_GB} GB working (estimate)"))
    validation = ("none" if not items else "training model" if f.validation is None else
                  f"{f.validation_name}, {'kept loaded beside the training model' if keep else 'loaded for each validation and freed after'}")
    return dict(q=q, every=every, synchronous=synchronous, small=small, keep=keep, phases=phases, validation=validation,
                val_w=val_w, fits=all(p.gb is None or p.gb <= budget for p in phases))


def make_plan(cfg, source, machine: Machine, *, samples=(), val_samples=(), items=None, validation_source=None,
              facts: ModelFacts | None = None, pending_captions: int = 0, suggest: bool = True) -> RunPlan:
    """The plan of the run `cfg` (a loaded TrainConfig, its per-model defaults resolved) on
    `machine`, training `source` (a ModelSource or a Preset) on the scanned `samples`; `items` the
    validation images (`validation.validation_items`), `validation_source` the separate model that
    renders them; `pending_captions` images the VLM will caption first (one prompt each)."""
    from mflux2.training import data as data_mod
    from mflux2.training.validation import validation_items

    items = validation_items(cfg) if items is None else items
    f = facts or weigh_models(cfg, source, validation_source)
    if cfg.validation.vlm_scoring.enabled and "scoring" not in f.vlm_gb:  # as the scorer picks its images
        from mflux2.training.scoring import plan_targets, select_references

        vs = cfg.validation.vlm_scoring
        refs = select_references(vs.reference_images or [], [s.path for s in samples], vs.max_reference_images,
                                 log=lambda *a: None)
        f.vlm_gb["scoring"] = vlm_size(vs.model)[0] if plan_targets(cfg, items, refs)[0] else "none"
    if pending_captions and "captions" not in f.vlm_gb:
        f.vlm_gb["captions"] = vlm_size(cfg.dataset.caption_model)[0]
    budget = machine.usable_gb
    problems: list[str] = []
    choices: list[str] = []

    # phases every choice of the transformer shares
    fixed: list[Phase] = []
    if pending_captions:
        g = f.vlm_gb.get("captions")
        fixed.append(Phase("VLM captions", None if g is None else memory.vlm_phase_gb(g),
                           "VLM size unknown" if g is None else f"VLM {g:.2f} GB + {memory.VLM_WORKING_GB} GB working (estimate)"))
    te_q, te_phase, te_choices, te_problems = _text_encoder(f, cfg, budget)
    choices += te_choices
    problems += te_problems
    if te_phase is not None:
        fixed.append(te_phase)
    all_samples = [*samples, *val_samples]
    max_px = max((s.bucket[0] * s.bucket[1] for s in all_samples), default=max(cfg.resolutions) ** 2)
    fixed.append(Phase("latent cache", f.vae_gb + machine.vae_bytes_per_pixel("encode") * max_px / GB,
                       f"VAE {f.vae_gb:.2f} GB + its encoder at {int(math.sqrt(max_px))}² px"))

    # the transformer: precision × checkpointing × segment mode, the most precise (then fastest) that fits
    asked, every = cfg.model.transformer_quantization, cfg.memory.checkpoint_every
    if f.stored and asked not in ("auto", f.stored):
        problems.append(_stored_precision_problem(f.root, "transformer", "model.transformer_quantization", asked, f.stored, "--quantize"))
    auto = asked == "auto"
    precisions = (f.stored,) if f.stored else (PRECISIONS if auto else (asked,))
    ckpts = [every] if every or not auto else [0, 1]
    options = [(q, n, sync) for q in precisions for n in ckpts for sync in ((False, True) if n else (False,))]
    tokens = _validation_tokens(items) if items else 0  # (reads the references' headers: once)
    cands = [_candidate(f, cfg, machine, q, n, s, items, tokens, fixed) for q, n, s in options]
    chosen = next((c for c in cands if c["fits"]), cands[-1] if auto else cands[0])
    if auto:
        stored = " (as stored in the converted folder: it loads only so)" if f.stored else ""
        tried = ", ".join(f"{c['q']}{f' + checkpointing' if c['every'] and not every else ''}"
                          f"{' (segments one at a time)' if c['synchronous'] else ''} {_peak(c):.1f} GB" for c in cands)
        choices.append(f"transformer auto: {chosen['q']}{stored} — the most precise whose every phase fits (peaks: {tried})")
    elif chosen["synchronous"]:
        choices.append("checkpointed segments run one at a time: only that fits (slower per step)")

    plan = RunPlan(
        machine=machine, model=f.name, transformer_quantization=chosen["q"], text_encoder_quantization=te_q,
        text_encoder_as_stored=bool(f.te_stored), checkpoint_every=chosen["every"],
        checkpointing_turned_on=bool(chosen["every"]) and not every, blockwise_ahead=0 if chosen["synchronous"] else 1,
        small_command_batches=chosen["small"], validation=chosen["validation"], validation_model_gb=chosen["val_w"],
        keep_validation_model=chosen["keep"], buckets=dict(Counter(s.bucket for s in samples)),
        prompt_list=data_mod.prompts_to_embed(cfg, samples, val_samples, [it.prompt for it in items]),
        pending_captions=pending_captions, disk_gb=0.0, checkpoints_kept=0, phases=chosen["phases"], choices=choices,
        problems=problems,
    )
    disk, plan.checkpoints_kept = disk_need(cfg, f.transformer, samples, val_samples, plan.prompts, cfg.training.max_steps or 0)
    plan.disk_gb = disk / GB
    if not plan.fits:
        if suggest:
            plan.suggestions = _suggestions(cfg, source, machine, f, samples, val_samples, items, validation_source,
                                            pending_captions, plan)
    return plan


def _peak(c: dict) -> float:
    return max(p.gb for p in c["phases"] if p.gb is not None)


# ------------------------------------------------------------------------------------------------
# Suggestions: each one re-planned


def _changes(cfg, plan: RunPlan, f: ModelFacts) -> list[tuple[dict, str]]:
    """Config changes that lower a peak, as (--set overrides, what it gives up), most precise first."""
    out = []
    over = {p.name for p in plan.over}
    if "text-encoder cache" in over and not f.te_stored:
        te_now = plan.text_encoder_quantization
        out += [({"model.quantization": q}, "a coarser text encoder") for q in PRECISIONS[PRECISIONS.index(te_now) + 1:]
                if isinstance(f.te.get(q), dict)]
    if not f.stored and cfg.model.transformer_quantization != "auto":
        out += [({"model.transformer_quantization": q}, "a coarser base model")
                for q in PRECISIONS[PRECISIONS.index(plan.transformer_quantization) + 1:]]
    if not plan.checkpoint_every:
        out.append(({"memory.gradient_checkpointing": True}, "slower steps"))
    if max(cfg.resolutions) > 512:
        out.append(({"memory.bucketing.resolutions": [512]} if cfg.memory.bucketing.enabled else {"dataset.image_size": 512},
                    "a lower training resolution"))
    if cfg.training.batch_size > 1:
        out.append(({"training.batch_size": 1}, "a smaller batch"))
    if cfg.loss.diff_output_preservation:  # a DOP step is the largest: DOP every n steps leaves that peak as it is
        out.append(({"loss.diff_output_preservation": False}, "no DOP"))
    if "validation images" in over and f.validation is not None and cfg.model.name in ("klein-4b", "klein-9b") and cfg.model.use_base:
        out.append(({"model.use_base": False}, "trains the distilled weights, which then render the validation images alone"))
    if "validation images" in over or "VLM scoring" in over:
        out.append(({"validation.prompts": []}, "no validation images"))
    return out


def _replan(cfg, source, machine, f, samples, val_samples, items, validation_source, pending, overrides: dict):
    """The plan of `cfg` with `overrides` (None when the config cannot take them)."""
    from mflux2.training.config_loading import apply_overrides

    try:
        with warnings.catch_warnings():  # the config's warnings were given once, for the run as configured
            warnings.simplefilter("ignore")
            new = apply_overrides(cfg, overrides)
    except Exception:  # noqa: BLE001 - a change this config cannot take is no suggestion
        return None
    new.provenance = {**cfg.provenance, **{k: "override" for k in overrides}}
    for k in ("steps", "guidance"):  # the per-model defaults as the run resolved them
        setattr(new.validation, k, getattr(cfg.validation, k))
    facts = copy.copy(f)
    if new.training_variant != cfg.training_variant:  # model.use_base: another transformer trains
        if not isinstance(source, Preset):
            return None
        source, facts = Preset(new.training_variant), None
    if new.validation_repo is None:
        validation_source = None
        if facts is not None:
            facts.validation = facts.validation_name = facts.validation_family = None
    return make_plan(new, source, machine, samples=samples, val_samples=val_samples, items=None,
                     validation_source=validation_source, facts=facts, pending_captions=pending, suggest=False)


def _suggestions(cfg, source, machine, f, samples, val_samples, items, validation_source, pending, plan) -> list[str]:
    """The changes (one, else two together) whose re-planned run fits, each with its new peak."""
    singles = _changes(cfg, plan, f)
    replan = lambda ov: _replan(cfg, source, machine, f, samples, val_samples, items, validation_source, pending, ov)  # noqa: E731
    fitting = []
    for ch, cost in singles:
        p = replan(ch)
        if p is not None and p.fits and not p.problems:
            fitting.append((ch, cost, p))
    for i, (a, ca) in enumerate(singles if not fitting else []):  # none alone: two together
        for b, cb in singles[i + 1:]:
            if set(a) & set(b):
                continue
            p = replan({**a, **b})
            if p is not None and p.fits and not p.problems:
                fitting.append(({**a, **b}, f"{ca}; {cb}", p))
                break
        if fitting:
            break
    return [" ".join(f"--set {k}={_yaml(v)}" for k, v in ch.items())
            + f" — {cost} (re-planned: peak {p.peak_gb:.1f} of {machine.usable_gb:.1f} GB, transformer {p.transformer_quantization}"
            f"{', checkpointing' if p.checkpoint_every else ''})" for ch, cost, p in fitting]


def _yaml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


# ------------------------------------------------------------------------------------------------
# Disk


def disk_need(cfg, t, samples, val_samples, prompts: int, total_steps: int) -> tuple[int, int]:
    """(bytes, checkpoints kept): the disk the latent and text caches and the kept checkpoints need,
    with 20% headroom. `t` a TransformerConfig; latents counted at the training samples' largest
    bucket; `prompts` the distinct prompts embedded."""
    lora_params = memory.lora_parameters(t, cfg.lora.rank, cfg.lora.target_layers, *_adapter(cfg))
    n_tokens = max(((s.bucket[0] // 16) * (s.bucket[1] // 16) for s in samples), default=0)
    images = sum(1 + len(s.controls) for s in list(samples) + list(val_samples))  # controls: the target's grid
    cache = images * n_tokens * 128 * 4 + prompts * 512 * t.joint_attention_dim * 2
    keep = cfg.checkpoints.keep_last or max(1, total_steps // max(cfg.checkpoints.save_every or total_steps, 1)) + 1
    ckpt = lora_params * 4 * 5  # lora file + raw params + two optimiser moments (+ EMA)
    return int(1.2 * (cache + keep * ckpt + 2 * lora_params * 4)), keep


def output_problem(path) -> str | None:
    """Why the run could not write its output folder (checked by the run and the dry run alike), or None."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == p else f"lies under {probe}, which is a file"
        return f"checkpoints.output {p} {where}: set checkpoints.output to a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"checkpoints.output {p} is not writable (no write permission on {probe}): set checkpoints.output"
    return None
