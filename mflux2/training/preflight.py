"""`mflux2-train CONFIG --dry-run`: what the run would need, in seconds, loading no weights.

The report: the config as resolved; the dataset scanned (count, sizes, buckets, captions, unreadable
files); the model found (a local folder, or the Hugging Face cache only: a model that is not there is
reported with what would be downloaded and its size when the hub can be reached — nothing is
downloaded); the peak memory of each phase against the usable memory; the disk the caches and
checkpoints need against the free space; and a verdict. Exit 0 when the run fits, 1 (one line on
stderr) when it cannot fit or something is missing.

The figures are the run's own: the transformer precision and checkpointing from
`memory.choose_quantization` / `memory.check_fit`, the step peak from `memory.planned_peak_gb`, the
text encoder's precision from `memory.choose_text_encoder_quantization`, the validation model's
keep-or-reload rule `memory.keeps_validation_model`, and the disk from `disk_need` (which the trainer's
disk check calls too). The latent-cache and validation-generation activations are estimates (not
fitted on measured peaks): see VAE_ENCODE_BYTES_PER_PIXEL and FORWARD_BLOCK_UNITS.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9

# Estimates, not fitted on measured peaks. The VAE encoder's largest activations are its full-
# resolution 128-channel stages: a few such tensors live at once (~2 KB per pixel of the bucket).
VAE_ENCODE_BYTES_PER_PIXEL = 2048
# One inference forward keeps no activations for a backward pass: its working set is about one
# block's, which memory.py's checkpointing fit puts at 1.5 × 35 units (tokens × hidden × 2 bytes).
FORWARD_BLOCK_UNITS = 1.5 * 35


# ------------------------------------------------------------------------------------------------
# Disk: shared with Trainer._check_disk_space_for


def disk_transformer_config(source):
    """The transformer config the disk estimate uses (the folder's config.json, else the defaults)."""
    from mflux2.models.transformer import TransformerConfig
    from mflux2.weights import read_config

    tc = read_config(source.transformer) if source.transformer.is_dir() else None
    return TransformerConfig.from_dict(tc) if tc else TransformerConfig()


def disk_need(cfg, t, samples, val_samples, prompts, total_steps: int) -> tuple[int, int]:
    """(bytes, checkpoints kept): the disk the latent and text caches and the kept checkpoints need,
    with 20% headroom. `t` a TransformerConfig; latents counted at the training samples' largest bucket."""
    r, d = cfg.lora.rank, t.hidden_size
    per = 12 * t.num_layers + 6 * t.num_single_layers  # attention targets: ~r·D·(12 per double, 6 per single)
    lora_params = int(r * d * per * (2.5 if cfg.lora.target_layers in ("all", "attention_ffn") else 1.0))
    n_tokens = max(((s.bucket[0] // 16) * (s.bucket[1] // 16) for s in samples), default=0)
    images = sum(1 + len(s.controls) for s in list(samples) + list(val_samples))  # controls: the target's grid
    cache = images * n_tokens * 128 * 4 + len(set(prompts)) * 512 * t.joint_attention_dim * 2
    keep = cfg.checkpoints.keep_last or max(1, total_steps // max(cfg.checkpoints.save_every or total_steps, 1)) + 1
    ckpt = lora_params * 4 * 5  # lora file + raw params + two optimiser moments (+ EMA)
    return int(1.2 * (cache + keep * ckpt + 2 * lora_params * 4)), keep


def _disk_check(rep, folder: Path, need: float, what: str, fix: str) -> None:
    """One disk line: `need` bytes `what` against the free space of `folder`; a problem and its fix if short."""
    free = _free_bytes(folder)
    ok = free >= need
    rep.line(f"{folder}: {need / GB:.2f} GB {what}, {free / GB:.1f} GB free {'ok' if ok else 'TOO LITTLE'}")
    if not ok:
        rep.problems.append(f"not enough free disk space in {folder}: about {need / GB:.2f} GB needed, {free / GB:.2f} GB free")
        rep.fixes.append(fix)


def _free_bytes(path: Path) -> int:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# ------------------------------------------------------------------------------------------------
# Model: local files or the hub cache, never a download


@dataclass
class ModelFound:
    what: str  # "training" | "validation"
    name: str  # as configured
    variant: str | None
    source: object | None = None  # a ModelSource when the files are here
    repo: str | None = None  # the hub repo, for a hub id
    download_bytes: int | None = None  # what a run would download (None: nothing, or unknown)
    problem: str | None = None  # why the run could not get it
    lines: list = field(default_factory=list)


def find_model(name: str, variant: str | None, what: str) -> ModelFound:
    """Resolve a local folder/file as the run does, or a hub id from the cache only."""
    from huggingface_hub import constants

    from mflux2 import hub
    from mflux2.hub import ModelLoadError
    from mflux2.model_files import resolve_source

    found = ModelFound(what, name, variant)
    p = Path(name).expanduser()
    if p.exists():
        try:
            found.source = resolve_source(p, variant)
            found.lines.append(f"local: {p} ({found.source.layout} layout, {found.source.name})")
        except ModelLoadError as e:
            found.problem = str(e)
        return found
    repo = hub.repo_id_for(name)
    if repo == name and not hub.looks_like_repo_id(name):
        found.problem = f"{name}: no such file or folder, and not a model name ({', '.join(hub.REPOS)}) or a Hugging Face repo id"
        return found
    if variant is None and name.strip().lower() in hub.REPOS:
        found.variant = variant = name.strip().lower()
    found.repo = repo
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = huggingface_hub.snapshot_download(repo, allow_patterns=hub.ALLOW_PATTERNS, ignore_patterns=hub.IGNORE_PATTERNS,
                                                   cache_dir=constants.HF_HUB_CACHE, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        folder = None
    if folder is not None:
        try:
            found.source = resolve_source(folder, variant)
            found.lines.append(f"{repo}: in the Hugging Face cache ({folder})")
            return found
        except ModelLoadError as e:
            found.lines.append(f"{repo}: in the cache but incomplete ({e})")
    size = None if constants.HF_HUB_OFFLINE else _hub_download_size(repo)
    if size is not None:
        found.download_bytes = size
        found.lines.append(f"{repo}: not in the cache {constants.HF_HUB_CACHE} — the run would download {size / GB:.1f} GB "
                           f"({', '.join(hub.COMPONENTS)})")
    else:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        found.lines.append(f"{repo}: not in the cache {constants.HF_HUB_CACHE}; its download size is unknown: {why}")
        found.problem = (f"the {what} model {repo} is not in the cache {constants.HF_HUB_CACHE} and {why}: "
                         f"download it once with network access, or set {'model.path' if what == 'training' else 'model.validation_path'} "
                         "to a local folder")
    return found


def _hub_download_size(repo: str) -> int | None:
    """Bytes of the files `hub.download` would fetch, from the hub's metadata; None if unreachable."""
    from fnmatch import fnmatch

    from mflux2 import hub

    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, files_metadata=True, timeout=5)
    except Exception:  # noqa: BLE001 - no network, gated, unknown repo: the size is unknown
        return None
    total = 0
    for s in info.siblings or []:
        f = s.rfilename
        if any(fnmatch(f, pat) for pat in hub.ALLOW_PATTERNS) and not any(fnmatch(f, pat) for pat in hub.IGNORE_PATTERNS):
            total += s.size or 0
    return total


def _vlm(rep, job: str, name: str) -> tuple[float | None, int]:
    """The VLM of a job (captions, scoring): (its weights in GB or None if unknown, bytes a run would
    download), from a local folder or the Hugging Face cache; the lines and problems go to `rep`."""
    from mflux2 import vlm

    try:
        vlm.require_mlx_vlm()
    except vlm.VLMError as e:
        rep.line(f"{job}: error: {e}")
        rep.problems.append(str(e))
    folder = vlm.cached_folder(name)
    if folder is not None:
        gb = vlm.weights_bytes(folder) / GB
        rep.line(f"{job}: VLM {name}: {'local' if Path(name).expanduser().exists() else 'in the Hugging Face cache'} ({gb:.2f} GB)")
        return gb, 0
    size = vlm.hub_weights_bytes(name)
    if size:
        rep.line(f"{job}: VLM {name}: not in the cache — the run would download {size / GB:.1f} GB")
        return size / GB, size
    rep.line(f"{job}: VLM {name}: not here and its size is unknown (offline, or the hub cannot be reached)")
    rep.problems.append(f"the VLM {name} ({job}) is not in the Hugging Face cache and cannot be downloaded now: "
                        "download it once with network access, or name a local folder")
    return None, 0


class _Preset:
    """A stand-in source for memory.py when only the variant is known (a hub model not in the cache)."""

    layout = "diffusers"

    def __init__(self, variant):
        self.variant = variant


# ------------------------------------------------------------------------------------------------
# The report


class Report:
    def __init__(self, out):
        self.out = out
        self.problems: list[str] = []  # the run cannot start or would stop
        self.fixes: list[str] = []  # changes that would make it fit

    def section(self, title: str):
        self.out(f"\n== {title}")

    def line(self, text: str):
        self.out(f"  {text}")


def _scan(cfg, rep: Report, validation: bool):
    """scan_dataset of every dataset as the run calls it, but listing unreadable files instead of
    stopping at the first, and finding a hub dataset in the cache only."""
    import copy
    import functools
    from unittest import mock

    import huggingface_hub

    from mflux2.training import data as data_mod

    out = []
    offline = functools.partial(huggingface_hub.snapshot_download, local_files_only=True)
    for prefix, one in data_mod.dataset_configs(cfg):
        if validation and not one.dataset.validation_path:
            continue
        c = copy.copy(one)
        c.dataset = copy.copy(one.dataset)
        c.dataset.skip_bad_images = True
        with warnings.catch_warnings(record=True) as caught, mock.patch.object(huggingface_hub, "snapshot_download", offline):
            warnings.simplefilter("always")
            try:
                samples = data_mod.scan_dataset(c, validation=validation, prefix=prefix)
            except data_mod.DataError as e:
                rep.line(f"error: {e}")
                rep.problems.append(str(e))
                continue
        for w in caught:
            msg = str(w.message)
            rep.line(f"warning: {msg}")
            if "unreadable" in msg and not one.dataset.skip_bad_images:
                key = f"{prefix}.validation_path" if validation else f"{prefix}.path"
                rep.problems.append(f"{key}: unreadable image(s) — the run would stop at the first; remove them or set "
                                    f"{prefix}.skip_bad_images: true ({msg.split(': ', 2)[-1]})")
        out += samples
    return out


IMBALANCE = 0.9  # a dataset above this share of an epoch is warned about (with several datasets)


def _dataset_lines(samples, rep: Report, cfg):
    sizes = [s.size for s in samples]
    rep.line(f"{len(samples)} image(s), sizes {min(w for w, _ in sizes)}–{max(w for w, _ in sizes)} × "
             f"{min(h for _, h in sizes)}–{max(h for _, h in sizes)} px")
    buckets = Counter(s.bucket for s in samples)
    rep.line("buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(buckets.items())))
    if any(d.control_path for d in cfg.dataset_list):
        paired = Counter(len(s.controls) for s in samples)
        rep.line("edit pairs: " + ", ".join(f"{n} image(s) with {k} reference(s)" for k, n in sorted(paired.items(), reverse=True))
                 + "; control dropout " + ", ".join(sorted({f"{d.control_dropout:g}" for d in cfg.dataset_list if d.control_path})))
    captions = Counter(s.caption for s in samples)
    rep.line(f"captions: {len(captions)} distinct; e.g. {samples[0].caption!r}")
    if cfg.loss.diff_output_preservation:
        rep.line(f"DOP captions: e.g. {samples[0].dop_caption!r}")
        if cfg.loss.diff_output_preservation_prompts:
            rep.line(f"DOP also preserves, taking turns with them: {cfg.loss.diff_output_preservation_prompts!r}")
    # each dataset: images, repeats and share of an epoch, captions and masks found, reg or not
    from mflux2.training.config import DatasetConfig

    plain = DatasetConfig()
    keys = ("repeats", "loss_weight", "is_regularization", "mask_path", "alpha_mask", "shuffle_tokens", "caption_dropout")
    if not cfg.datasets and all(getattr(cfg.dataset, k) == getattr(plain, k) for k in keys):
        return
    epoch = sum(s.repeats for s in samples)
    rep.line(f"datasets (an epoch = {epoch} samples):")
    for d in cfg.dataset_list:
        mine = [s for s in samples if s.dataset == (d.name or "")]
        if not mine:
            continue
        n, share = len(mine), sum(s.repeats for s in mine) / epoch
        parts = [f"{n} image(s) × repeats {d.repeats} = {n * d.repeats} ({share:.0%} of an epoch)"]
        if d.loss_weight != 1.0:
            parts.append(f"loss weight {d.loss_weight:g}")
        if d.caption_format == "txt":
            parts.append(f"captions {sum(s.path.with_suffix('.' + d.caption_ext).is_file() for s in mine)}/{n} (.{d.caption_ext})")
        if d.mask_path or d.alpha_mask:
            found = sum(s.mask is not None for s in mine)
            parts.append(f"masks {found} found, {n - found} missing ({'alpha channel' if d.alpha_mask else d.mask_path}"
                         f"{', missing ones train unmasked' if n - found else ''}; black weighs {d.mask_min:g})")
        if d.shuffle_tokens:
            parts.append(f"shuffled captions: {sum(len(s.variants) for s in mine)} variants of {n} captions cached "
                         f"(up to {d.shuffle_variants} each, keep_tokens {d.keep_tokens})")
        if d.caption_dropout is not None:
            parts.append(f"caption dropout {d.caption_dropout:g}")
        if d.is_regularization:
            parts.append("regularisation set (own captions, no trigger word)")
        rep.line(f"  {d.name}: " + "; ".join(parts))
        if len(cfg.dataset_list) > 1 and share > IMBALANCE:
            rep.line(f"warning: {d.name} is {share:.0%} of every epoch: the other datasets are rarely drawn; "
                     f"raise their repeats (or lower this one's) if that is not intended")


def _reference_tokens(paths) -> int:
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


def preflight(cfg, out=print, err=None) -> int:
    """Print the dry-run report of `cfg` (a loaded TrainConfig); 0 when the run fits, else 1 with one
    line on stderr."""
    from mflux2.training import data as data_mod, memory
    from mflux2.training.validation import validation_items

    err = err or (lambda s: print(s, file=sys.stderr))
    started = time.perf_counter()
    rep = Report(out)
    out(f"mflux2-train --dry-run {cfg.source} (no weights are loaded, nothing is downloaded)")

    # -- config
    rep.section("config")
    model_name = cfg.model.path or cfg.training_variant
    rep.line(f"model: {model_name} (trains {cfg.training_variant or 'the folder’s architecture'}; "
             f"validation images from {cfg.validation_repo or 'the training model'})")
    if cfg.dataset.control_path:
        rep.line(f"edit training: {len(cfg.dataset.control_path)} reference image(s) per sample from {', '.join(cfg.dataset.control_path)} "
                 f"(each as many tokens as its target: the step's sequence grows accordingly)")
    rep.line(f"resolutions {cfg.resolutions}, batch {cfg.training.batch_size}, LoRA rank {cfg.lora.rank} "
             f"({cfg.lora.target_layers}), DOP {'on' if cfg.loss.diff_output_preservation else 'off'}, "
             f"checkpointing {cfg.memory.checkpoint_every or 'off'}")
    rep.line(f"precision: transformer {cfg.model.transformer_quantization}, text encoder {cfg.model.quantization}; "
             f"dtype {cfg.training.dtype}")
    rep.line(f"output: {cfg.checkpoints.output}; save every {cfg.checkpoints.save_every}, keep last {cfg.checkpoints.keep_last or 'all'}")
    rep.line("(`--print-config` shows every value and where it comes from)")

    # -- dataset
    rep.section("dataset")
    samples = _scan(cfg, rep, validation=False)
    if samples:
        _dataset_lines(samples, rep, cfg)
    val_samples = []
    if any(d.validation_path for d in cfg.dataset_list):
        rep.line(f"validation set {', '.join(d.validation_path for d in cfg.dataset_list if d.validation_path)}:")
        val_samples = _scan(cfg, rep, validation=True)
        if val_samples:
            rep.line(f"{len(val_samples)} validation image(s)")

    # -- model
    rep.section("model")
    train = find_model(model_name, cfg.training_variant, "training") if model_name else None
    if train is None:
        rep.problems.append("model: neither model.name nor model.path is set")
        rep.line("error: neither model.name nor model.path is set")
    found = [train] if train else []
    items = validation_items(cfg)
    val = None
    if items and cfg.validation_repo is not None:
        val = find_model(cfg.validation_repo, cfg.validation_variant, "validation")
        found.append(val)
    download = 0
    vlm_gb: dict[str, float | None] = {}  # "VLM captions" / "VLM scoring" -> the VLM's weights (GB)
    if cfg.dataset.auto_caption:
        from mflux2.captions import has_caption

        todo = [s for s in samples + val_samples if not has_caption(s.path)]
        rep.line(f"captions (dataset.auto_caption): {len(todo)} image(s) without a caption")
        if todo:
            vlm_gb["VLM captions"], more = _vlm(rep, "captions", cfg.dataset.caption_model)
            download += more
    if cfg.validation.vlm_scoring.enabled:
        from mflux2.training.scoring import plan_targets, select_references

        vs = cfg.validation.vlm_scoring
        refs = select_references(vs.reference_images or [], [s.path for s in samples], vs.max_reference_images, log=rep.line)
        targets, how = plan_targets(cfg, items, refs)
        rep.line(f"scoring (validation.vlm_scoring): {how if targets else 'off — ' + how}")
        if targets:
            vlm_gb["VLM scoring"], more = _vlm(rep, "scoring", vs.model)
            download += more if vs.model != cfg.dataset.caption_model or "VLM captions" not in vlm_gb else 0
    for f in found:
        for text in f.lines:
            rep.line(f"{f.what}: {text}")
        if f.problem:
            if not f.lines:
                rep.line(f"{f.what}: error: {f.problem}")
            rep.problems.append(f.problem)
        download += f.download_bytes or 0

    # -- memory
    budget = memory.available_gb()
    rep.section(f"memory (peak per phase; {budget:.1f} GB usable)")
    phases: list[tuple[str, float | None, str]] = []  # (phase, GB, how)
    step_peak = None
    logged: list[str] = []
    tsrc = train.source if train and train.source else (_Preset(train.variant) if train and train.variant else None)
    if tsrc is not None:
        from mflux2.components import PipelineComponents

        import mlx.core as mx

        dtype = mx.float32 if cfg.training.dtype == "float32" else mx.bfloat16
        if train.source is not None:
            fam = train.source.family
            cfg.resolve_model_defaults(train.source.variant or {"klein": "klein-4b", "klein-base": "klein-base-4b", "dev": "dev"}[fam])
        elif cfg.validation_variant or train.variant:
            cfg.resolve_model_defaults(cfg.validation_variant or train.variant)
        # the transformer: the run's precision choice and step estimate
        q = cfg.model.transformer_quantization
        stored = memory.stored_quantization(tsrc)
        if q == "auto":
            q = memory.choose_quantization(cfg, tsrc, log=logged.append)
        elif stored and q != stored:
            rep.problems.append(f"model.transformer_quantization: {q}, but the converted folder stores {stored} (it loads only so)")
        step_peak = memory.planned_peak_gb(cfg, tsrc, q)
        fit_log: list[str] = []
        memory.check_fit(cfg, tsrc, q, log=fit_log.append)
        for text in logged + fit_log:
            rep.line(text)
        model_cfg = memory._source_config(tsrc)
        lora_gb = memory.lora_parameters(model_cfg, cfg.lora.rank, cfg.lora.target_layers) * 4 / GB
        train_weights = memory.weights_bytes(model_cfg, q) / GB

        # text encoder and VAE: their files' loaded sizes (unknown without the files)
        te_gb = vae_gb = None
        if train.source is not None:
            pipe = PipelineComponents(train.source, dtype=dtype)
            if train.source.layout == "mflux2":
                te_q = "as stored"
            elif cfg.model.quantization == "auto":
                te_q = memory.choose_text_encoder_quantization(pipe, log=lambda s: None)
            else:
                te_q = cfg.model.quantization
            te_gb = pipe.loaded_bytes(train.source.text_encoder, None if te_q in ("bf16", "as stored") else te_q) / GB
            vae_gb = pipe.loaded_bytes(train.source.vae, None) / GB
            phases.append(("text-encoder cache", te_gb + memory.TEXT_ENCODER_WORKING_GB,
                           f"text encoder {te_q} {te_gb:.2f} GB + {memory.TEXT_ENCODER_WORKING_GB} GB working"))
            px = max(r * r for r in cfg.resolutions)
            if samples:
                px = max(s.bucket[0] * s.bucket[1] for s in samples + val_samples)
            phases.append(("latent cache", vae_gb + VAE_ENCODE_BYTES_PER_PIXEL * px / GB,
                           f"VAE {vae_gb:.2f} GB + encoder activations (estimate)"))
            if te_gb + memory.TEXT_ENCODER_WORKING_GB > budget and te_q not in ("int4", "as stored"):
                rep.fixes.append("model.quantization: int4 (or int8) for the text encoder")
        else:
            phases.append(("text-encoder cache", None, "unknown: the model's files are not here"))
            phases.append(("latent cache", None, "unknown: the model's files are not here"))

        # the validation model: kept beside training or loaded per validation (the run's rule)
        extra, keep = 0.0, False
        if val is not None:
            if val.source is not None:
                vpipe = PipelineComponents(val.source, dtype=dtype, quantize=None if q == "bf16" else q)
                extra = vpipe.loaded_bytes(val.source.transformer, vpipe.quantize) / GB
            elif val.variant:
                extra = memory.weights_bytes(memory._config(val.variant), q) / GB
            keep = memory.keeps_validation_model(step_peak, extra, budget)
            rep.line(f"validation model {val.variant or val.name}: {extra:.2f} GB, "
                     f"{'kept loaded beside the training model' if keep else 'loaded for each validation and freed after'}")
        phases.append(("training step", step_peak + (extra if keep else 0.0),
                       f"{q}{f', checkpointing every {cfg.memory.checkpoint_every}' if cfg.memory.checkpoint_every else ''}"
                       f"{f' + resident validation model {extra:.2f} GB' if keep else ''}"))
        if items:
            vfam = (val.source.family if val and val.source else None) or (train.source.family if train.source else None)
            vcfg = memory._config(val.variant) if val is not None and val.source is None and val.variant else (
                memory._source_config(val.source) if val is not None and val.source is not None else model_cfg)
            n = 2 if vfam == "klein-base" and (cfg.validation.guidance or 0) > 1.0 else 1
            # an editing prompt's references join its image tokens (prepared as the pipeline prepares them)
            tokens = max((it.width // 16) * (it.height // 16) + _reference_tokens(it.references) for it in items) + memory.TEXT_TOKENS
            fwd = n * tokens * vcfg.hidden_size * 2 * FORWARD_BLOCK_UNITS
            if tokens % 128:
                fwd += n * vcfg.num_attention_heads * tokens**2 * 6
            # the training model, its LoRA with the optimiser's two moments (and EMA), the VAE, the validation model
            held = train_weights + lora_gb * (4 if cfg.ema.enabled else 3) + (vae_gb or 0.0) + extra
            phases.append(("validation images", held + fwd / GB,
                           f"training model + {'validation model + ' if val is not None else ''}one forward at "
                           f"{max(it.width for it in items)}² (activations: an estimate)"))
        for name, gb in vlm_gb.items():  # the VLM alone before anything loads; beside the training model while scoring
            resident = 0.0 if name == "VLM captions" else (
                train_weights + lora_gb * (4 if cfg.ema.enabled else 3) + (vae_gb or 0.0) + (extra if keep else 0.0))
            phases.append((name, None if gb is None else memory.vlm_phase_gb(gb, resident),
                           "VLM size unknown" if gb is None else
                           f"{'training model + ' if resident else ''}VLM {gb:.2f} GB + {memory.VLM_WORKING_GB} GB working (estimate)"))
        for name, gb, how in phases:
            if gb is None:
                rep.line(f"{name:<20} ?        ({how})")
            else:
                rep.line(f"{name:<20} {gb:6.2f} GB {'ok ' if gb <= budget else 'TOO MUCH'} ({how})")
        too_much = [name for name, gb, _ in phases if gb is not None and gb > budget]
        if too_much:
            rep.problems.append(f"does not fit: {', '.join(too_much)} need(s) more than the {budget:.1f} GB usable")
            if fit_log:  # check_fit's options
                rep.fixes.append(fit_log[-1].split("options that fit better: ", 1)[-1])
            elif logged and "may not fit" in logged[-1]:
                rep.fixes.append(logged[-1].split("; ", 1)[-1])
            if "validation images" in too_much:
                rep.fixes.append("smaller validation sizes (validation.prompts[].sizes)")
    else:
        rep.line("unknown: the model is not here and its variant is not named (model.name)")

    # -- disk
    rep.section("disk")
    if samples and tsrc is not None:
        t = disk_transformer_config(train.source) if train.source is not None else memory._config(train.variant)
        prompts = data_mod.prompts_to_embed(cfg, samples, val_samples, [it.prompt for it in items])
        total = cfg.training.max_steps  # always set: the config derives it from epochs (x 100, as Swift)
        need, keep_n = disk_need(cfg, t, samples, val_samples, prompts, total)
        _disk_check(rep, Path(cfg.checkpoints.output), need, f"for the caches and {keep_n} checkpoint(s)",
                    "free space, lower checkpoints.keep_last, or set checkpoints.output")
    else:
        rep.line("unknown (no dataset or no model)")
    if download:
        from huggingface_hub import constants

        _disk_check(rep, Path(constants.HF_HUB_CACHE), download, "to download into the Hugging Face cache",
                    "point HF_HOME (or HF_HUB_CACHE) to a disk with room")

    # -- verdict
    rep.section("verdict")
    if rep.problems:
        what = "does not fit" if any(p.startswith(("does not fit", "not enough")) for p in rep.problems) else "cannot run"
        rep.line(f"{what}: " + "; ".join(rep.problems))
        if rep.fixes:
            rep.line("changes that would make it fit: " + "; ".join(rep.fixes))
    else:
        rep.line("fits")
    rep.line(f"(checked in {time.perf_counter() - started:.1f} s)")
    if rep.problems:
        err(f"mflux2-train: error: --dry-run: {rep.problems[0]}" + (f" — {rep.fixes[0]}" if rep.fixes else ""))
        return 1
    return 0
