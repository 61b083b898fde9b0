"""`mflux2-train CONFIG --dry-run [--memory GB]`: what the run would need, in seconds, loading no weights.

The report: the config as resolved; the dataset scanned (count, sizes, buckets, captions, every
unreadable file); the model found (a local folder, or the Hugging Face cache only: a model that is not
there is reported with what would be downloaded and its size when the hub can be reached — nothing is
downloaded); the run's plan (`plan.make_plan`: the same function and the same lines the run logs —
precisions, checkpointing, validation rendering, each phase's peak against the usable memory); the
disk against the free space; and a verdict listing every problem on its own line. Exit 0 when the run
can start and fits, 1 (the first problem on stderr) otherwise. `--memory GB` plans for a Mac with that
much unified memory instead of this machine, before any download: the answer is the plan, exit 0.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9


# ------------------------------------------------------------------------------------------------
# Disk


OUTPUT_DISK_FIX = "free space, lower checkpoints.keep_last, or set checkpoints.output"


def disk_problem(folder: Path, need: float, what: str) -> tuple[str | None, int]:
    """(the problem line when `folder`'s disk has less than `need` bytes free, else None; the free bytes).
    The run refuses to start on this line and the dry run lists it: one wording for both."""
    free = _free_bytes(folder)
    if free >= need:
        return None, free
    return f"not enough free disk space in {folder}: about {need / GB:.2f} GB needed {what}, {free / GB:.2f} GB free", free


def _disk_check(rep, folder: Path, need: float, what: str, fix: str) -> None:
    """One disk line: `need` bytes `what` against the free space of `folder`; a problem and its fix if short."""
    problem, free = disk_problem(folder, need, what)
    rep.line(f"{folder}: {need / GB:.2f} GB {what}, {free / GB:.1f} GB free {'ok' if problem is None else 'TOO LITTLE'}")
    if problem:
        rep.problems.append(problem)
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
    from mflux2.training.plan import vlm_size

    gb, here = vlm_size(name)
    if here:
        rep.line(f"{job}: VLM {name}: {'local' if Path(name).expanduser().exists() else 'in the Hugging Face cache'} ({gb:.2f} GB)")
        return gb, 0
    if gb:
        rep.line(f"{job}: VLM {name}: not in the cache — the run would download {gb:.1f} GB")
        return gb, int(gb * GB)
    rep.line(f"{job}: VLM {name}: not here and its size is unknown (offline, or the hub cannot be reached)")
    rep.problems.append(f"the VLM {name} ({job}) is not in the Hugging Face cache and cannot be downloaded now: "
                        "download it once with network access, or name a local folder")
    return None, 0


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
    """scan_dataset of every dataset as the run calls it, finding a hub dataset in the cache only.
    Unreadable images the run would stop at are the section's error, each named; the figures after
    it are then those of the readable images (what the run trains once they are removed or skipped)."""
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
        unreadable, samples = [], []
        for skip in (False, True):
            c = copy.copy(one)
            c.dataset = copy.copy(one.dataset)
            c.dataset.skip_bad_images = one.dataset.skip_bad_images or skip
            with warnings.catch_warnings(record=True) as caught, mock.patch.object(huggingface_hub, "snapshot_download", offline):
                warnings.simplefilter("always")
                try:
                    samples = data_mod.scan_dataset(c, validation=validation, prefix=prefix)
                    break
                except data_mod.DataError as e:
                    unreadable = getattr(e, "unreadable", [])
                    rep.line(f"error: {str(e).split(': ', 1)[0]}: {len(unreadable)} unreadable image(s), the run stops at them — "
                             f"remove them, or set {prefix}.skip_bad_images: true:" if unreadable else f"error: {e}")
                    for bad in unreadable:
                        rep.line(f"  {bad}")
                    rep.problems.append(str(e))
                    if not unreadable:
                        break
        for w in caught:
            if not (unreadable and "unreadable" in str(w.message)):  # (those are the error above)
                rep.line(f"warning: {w.message}")
        if unreadable:
            rep.line(f"the {len(samples)} readable image(s):")
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
    # a regularisation set is not in the epoch: a reg batch is drawn beside every subject batch (data.PairedSampler)
    epoch = sum(s.repeats for s in samples if not s.is_reg)
    rep.line(f"datasets (an epoch = {epoch} samples{'; each step pairs its subject samples with as many regularisation samples' if any(s.is_reg for s in samples) else ''}):")
    for d in cfg.dataset_list:
        mine = [s for s in samples if s.dataset == (d.name or "")]
        if not mine:
            continue
        n, share = len(mine), sum(s.repeats for s in mine) / max(epoch, 1)
        if d.is_regularization:
            bs = cfg.training.batch_size
            parts = [f"{n} image(s) beside the subject: {bs} with every step's {bs} subject sample(s), all of them every "
                     f"{math.ceil(n / bs)} steps (repeats do not apply)"]
        else:
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
            parts.append("regularisation set (own captions, no trigger word; its loss weight is diffusers' prior_loss_weight)")
        rep.line(f"  {d.name}: " + "; ".join(parts))
        if sum(not x.is_regularization for x in cfg.dataset_list) > 1 and share > IMBALANCE and not d.is_regularization:
            rep.line(f"warning: {d.name} is {share:.0%} of every epoch: the other datasets are rarely drawn; "
                     f"raise their repeats (or lower this one's) if that is not intended")


def _init_from_lines(rep, cfg, source, ckpt) -> None:
    """lora.init_from checked as the run checks it (the file from disk or the hub cache; nothing is
    downloaded): type, rank, each parameter's shape and the targets against the lora: section."""
    from huggingface_hub import constants

    from mflux2.hub import ModelLoadError
    from mflux2.lora_formats import LoRAError
    from mflux2.training import init_from
    from mflux2.weights import WeightsError

    spec = cfg.lora.init_from
    if ckpt is not None:
        rep.line(f"lora.init_from {spec}: ignored — the run resumes from {Path(ckpt).name}, which holds the weights trained from it")
        return
    try:
        path = init_from.resolve(spec, local_only=True)
        if path is None:
            if constants.HF_HUB_OFFLINE:
                raise LoRAError(f"lora.init_from {spec} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and offline "
                                "mode is on (HF_HUB_OFFLINE=1): download it once with network access, or point it at a local file")
            rep.line(f"lora.init_from {spec}: not in the Hugging Face cache — the run downloads it and checks it before the caches")
            return
        weights = init_from.read_checked(path, source, cfg.lora, spec)
        rep.line(f"lora.init_from: {path} ({len(weights)} {cfg.lora.type} layers, rank {cfg.lora.rank}) matches the lora: section; "
                 "the run starts from its weights at step 0 with a fresh optimiser")
    except (LoRAError, ModelLoadError, WeightsError, OSError) as e:  # LoRAError is a WeightsError; named for the reader
        rep.line(f"error: {e}")
        rep.problems.append(str(e))


def preflight(cfg, out=print, err=None, memory_gb: float | None = None, resume=True) -> int:
    """Print the dry-run report of `cfg` (a loaded TrainConfig); 0 when the run can start and fits
    (always 0 with `memory_gb`, a what-if for another machine), else 1 with one line on stderr."""
    from mflux2.training import plan as plan_mod
    from mflux2.training.validation import validation_items

    err = err or (lambda s: print(s, file=sys.stderr))
    started = time.perf_counter()
    rep = Report(out)
    machine = plan_mod.mac(memory_gb) if memory_gb else plan_mod.this_machine()
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
    problem = plan_mod.output_problem(cfg.checkpoints.output)
    if problem:
        rep.line(f"error: {problem}")
        rep.problems.append(problem)
    ckpt = None
    if not problem:
        from mflux2.training import checkpoints
        from mflux2.training.outputs import TrainingError

        try:
            ckpt = checkpoints.find_resume(Path(cfg.checkpoints.output), resume, log=rep.line, act=False)
        except TrainingError as e:
            rep.line(f"error: {e}")
            rep.problems.append(str(e))
        if ckpt is not None:
            rep.line(f"resumes from {ckpt}")

    # -- dataset
    rep.section("dataset")
    samples = _scan(cfg, rep, validation=False)
    if samples:
        _dataset_lines(samples, rep, cfg)
        if any(s.is_reg for s in samples):  # the run pairs every subject batch with reg images of its bucket
            from mflux2.training import data as data_mod

            try:
                data_mod.PairedSampler(samples, cfg.training.batch_size, cfg.training.seed)
            except data_mod.DataError as e:
                rep.line(f"error: {e}")
                rep.problems.append(str(e))
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
    vlm_gb: dict[str, float | None] = {}
    pending = 0
    if any(d.auto_caption for d in cfg.dataset_list):
        from mflux2.captions import has_caption

        pending = len([s for s in samples + val_samples if not has_caption(s.path)])
        rep.line(f"captions (dataset.auto_caption): {pending} image(s) without a caption")
        if pending:
            vlm_gb["captions"], more = _vlm(rep, "captions", cfg.dataset.caption_model)
            download += more
    if cfg.validation.vlm_scoring.enabled:
        from mflux2.training.scoring import plan_targets, select_references

        vs = cfg.validation.vlm_scoring
        refs = select_references(vs.reference_images or [], [s.path for s in samples], vs.max_reference_images, log=rep.line)
        targets, how = plan_targets(cfg, items, refs)
        rep.line(f"scoring (validation.vlm_scoring): {how if targets else 'off — ' + how}")
        if targets:
            vlm_gb["scoring"], more = _vlm(rep, "scoring", vs.model)
            download += more if vs.model != cfg.dataset.caption_model or "captions" not in vlm_gb else 0
        else:
            vlm_gb["scoring"] = "none"
    for f in found:
        for text in f.lines:
            rep.line(f"{f.what}: {text}")
        if f.problem:
            if not f.lines:
                rep.line(f"{f.what}: error: {f.problem}")
            rep.problems.append(f.problem)
        download += f.download_bytes or 0

    # -- the plan: the run's own decisions and figures
    rep.section("plan")
    plan = None
    tsrc = train.source if train and train.source else (plan_mod.Preset(train.variant) if train and train.variant else None)
    if tsrc is not None:
        cfg.resolve_model_defaults(tsrc.variant or {"klein": "klein-4b", "klein-base": "klein-base-4b", "dev": "dev"}[tsrc.family])
        if cfg.dataset.control_path:
            from mflux2.training.config import ConfigError, check_reference_count

            try:
                check_reference_count(cfg, tsrc.variant or tsrc.family)
            except ConfigError as e:
                rep.line(f"error: {e}")
                rep.problems.append(str(e))
        if ckpt is not None and train.source is not None:  # the run refuses a checkpoint it cannot continue at setup
            from mflux2.training import checkpoints
            from mflux2.training.cache import model_identity
            from mflux2.training.outputs import TrainingError

            try:
                checkpoints.check_resumable(ckpt, checkpoints.read_state(ckpt), cfg, model_identity(train.source), train.source.root)
            except TrainingError as e:
                rep.line(f"error: {e}")
                rep.problems.append(str(e))
        if cfg.lora.init_from:
            _init_from_lines(rep, cfg, tsrc, ckpt)
        vsrc = None
        if val is not None:
            vsrc = val.source or (plan_mod.Preset(val.variant) if val.variant else None)
        try:
            facts = plan_mod.weigh_models(cfg, tsrc, vsrc)
        except Exception as e:  # noqa: BLE001 - a model the run could not load either: one line
            rep.line(f"error: {e}")
            rep.problems.append(str(e))
        else:
            facts.vlm_gb.update(vlm_gb)
            plan = plan_mod.make_plan(cfg, tsrc, machine, samples=samples, val_samples=val_samples, items=items,
                                      validation_source=vsrc, facts=facts, pending_captions=pending)
            for text in plan.lines():
                rep.line(text)
            rep.problems += plan.problems + ([plan.memory_verdict] if not plan.fits else [])
            rep.fixes += plan.suggestions
    else:
        rep.line("unknown: the model is not here and its variant is not named (model.name)")

    # -- disk
    rep.section("disk")
    if samples and plan is not None:
        _disk_check(rep, Path(cfg.checkpoints.output), plan.disk_gb * GB,
                    f"for the caches and {plan.checkpoints_kept} checkpoint(s)", OUTPUT_DISK_FIX)
    else:
        rep.line("unknown (no dataset or no model)")
    if download:
        from huggingface_hub import constants

        _disk_check(rep, Path(constants.HF_HUB_CACHE), download, "to download into the Hugging Face cache",
                    "point HF_HOME (or HF_HUB_CACHE) to a disk with room")

    # -- verdict
    rep.section("verdict")
    if memory_gb:
        fit = plan is not None and plan.fits
        rep.line(f"on {machine.what} ({machine.usable_gb:.1f} GB usable): "
                 + ("fits" if fit else "does not fit" if plan is not None else "unknown (no model to weigh)"))
        here = [p for p in rep.problems if plan is None or p != plan.memory_verdict]
        for p in here:
            rep.line(f"also, here: {p}")
    elif rep.problems:
        what = "does not fit" if any(p.startswith(("does not fit", "not enough")) for p in rep.problems) else "cannot run"
        rep.line(f"{what}:")
        for p in rep.problems:
            rep.line(f"- {p}")
    else:
        rep.line("fits")
    if rep.fixes and (memory_gb is None or (plan is not None and not plan.fits)):
        rep.line("changes that make it fit:" if plan is not None and not plan.fits else "changes that would help:")
        for fix in rep.fixes:
            rep.line(f"- {fix}")
    elif plan is not None and not plan.fits:
        rep.line("no single change or pair of changes fits: a machine with more memory")
    rep.line(f"(checked in {time.perf_counter() - started:.1f} s)")
    if memory_gb:
        return 0
    if rep.problems:
        err(f"mflux2-train: error: --dry-run: {rep.problems[0]}" + (f" — {rep.fixes[0]}" if rep.fixes else ""))
        return 1
    return 0
