"""`mflux2-train`: the training run from a validated config to `lora_final.safetensors`.

Order of work: resolve the model → scan the data → fill the latent and text caches (the VAE and text
encoder are loaded only if something is missing, and the text encoder is released afterwards) → load
the transformer, add LoRA → baseline images → the lazy, compiled loop (one `mx.eval` per step) with
checkpoints, validation images, control files and early stopping → final LoRA.
The decisions that depend on the config, the model and the machine come from one plan
(`plan.make_plan`, which `--dry-run` prints too). What every option means and the output tree:
docs/training.md.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from mflux2 import lora as lora_mod
from mflux2.training import data as data_mod
from mflux2.training.cache import DiskCache, model_identity, weights_identity
from mflux2.training.config import TrainConfig, check_reference_count, config_hash, resume_signature
from mflux2.training import checkpoints
from mflux2.training.outputs import (
    MetricsLog,
    TrainingError,
    atomic_write_text,
    clean_partials,
    latest_checkpoint,
    learning_curve_svg,
)
from mflux2.training.phases import PhaseClock, progress_memory
from mflux2.training.step import Batch, StepConfig, TrainStep
from mflux2.training.validation import Validation

MAX_CONSECUTIVE_NONFINITE = 5




# ------------------------------------------------------------------------------------------------
# Model


def open_model(cfg: TrainConfig, transformer_quantization: str | None = None):
    """A lazily loading Flux2Pipeline for the model that trains (local folder/file, converted folder,
    or hub id), its variant checked against the config's."""
    from mflux2.pipeline import Flux2Pipeline

    te_quant = None if cfg.model.quantization in ("bf16", "auto") else cfg.model.quantization  # auto: Trainer
    variant = cfg.training_variant
    return Flux2Pipeline.from_pretrained(
        cfg.model.path or variant, variant=variant,
        dtype=mx.float32 if cfg.training.dtype == "float32" else mx.bfloat16,
        quantize=transformer_quantization, text_encoder_quantize=te_quant, low_memory=True,
    )


def defaults_variant(pipe) -> str:
    """Whose per-model defaults apply: the preset, or the family's smallest for a custom model."""
    return pipe.variant or {"klein": "klein-4b", "klein-base": "klein-base-4b", "dev": "dev"}[pipe.family]


# ------------------------------------------------------------------------------------------------
# The run


class Conditioning:
    """What the transformer is conditioned on, from the text cache: prompt embeddings, and the
    position ids of the text, of each image bucket and of references on it. The training loop, the
    validation images and the validation loss read them here."""

    def __init__(self, txt_cache: DiskCache):
        self.txt_cache = txt_cache
        self.txt_ids = _text_ids(self.embeds("").shape[0])
        self._ids: dict = {}

    def embeds(self, prompt: str) -> mx.array:
        got = self.txt_cache.get(self.txt_cache.key(prompt))
        if got is None:
            raise TrainingError(f"text cache entry for {prompt!r} vanished from {self.txt_cache.folder}; restart to rebuild it")
        return got["prompt_embeds"]

    def img_ids(self, bucket) -> mx.array:
        from mflux2.models.vae import image_ids

        w, h = bucket
        if (w, h) not in self._ids:
            self._ids[(w, h)] = image_ids(h, w)
        return self._ids[(w, h)]

    def ref_ids(self, bucket, n: int) -> mx.array:
        """Ids of n references on the target's grid (controls are cropped like it): reference j has
        t = 10·(j+1) (`vae.image_ids`)."""
        from mflux2.models.vae import image_ids

        w, h = bucket
        if (w, h, n) not in self._ids:
            self._ids[(w, h, n)] = mx.concatenate([image_ids(h, w, t=10 * (j + 1)) for j in range(n)])
        return self._ids[(w, h, n)]


@dataclass
class RunState:
    step: int = 0
    elapsed_s: float = 0.0
    skipped_nonfinite: int = 0
    history: list = field(default_factory=list)  # [step, loss, main, pres]
    val_history: list = field(default_factory=list)  # [step, val_loss]
    early_stop: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Schedule:
    """When things happen, by step number (after the step is counted): a pure function of the config,
    so a resumed run does them exactly where an uninterrupted one does."""

    total: int
    save_every: int  # 0: only the final checkpoint
    val_every: int  # validation images with a checkpoint every n steps (0: never)
    log_every: int
    eval_every: int  # validation loss and early-stopping checks
    dop_every: int  # 0: no DOP

    @classmethod
    def of(cls, cfg: TrainConfig) -> "Schedule":
        save = cfg.checkpoints.save_every
        return cls(total=cfg.training.max_steps, save_every=save,
                   val_every=cfg.validation.every_n_steps if cfg.validation.every_n_steps is not None else save,
                   log_every=cfg.training.log_every_n_steps, eval_every=cfg.training.eval_every_n_steps,
                   dop_every=(cfg.loss.diff_output_preservation_every_n_steps or 1) if cfg.loss.diff_output_preservation else 0)

    def is_dop(self, step: int) -> bool:  # `step` before it is taken (0-based)
        return bool(self.dop_every) and step % self.dop_every == 0

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total

    def should_eval(self, step: int) -> bool:
        return step % self.eval_every == 0

    def should_save(self, step: int) -> bool:  # the final checkpoint is written after the loop
        return bool(self.save_every) and step % self.save_every == 0 and step < self.total

    def with_images(self, step: int) -> bool:
        return bool(self.val_every) and step % self.val_every == 0


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | Path | bool | None = True, log=print, on_step=None,
                 started_at: float | None = None):
        self.cfg = cfg
        # Wall time and peak memory per phase (metrics.jsonl, report.html); `started_at` is the
        # process's perf_counter at start-up (the CLI passes it) so imports are counted too.
        self.clock = PhaseClock()
        self.started_at = started_at
        self.log = log
        self.on_step = on_step  # called as on_step(trainer, step) after each completed step (tests, tools)
        self.output = Path(cfg.checkpoints.output)
        self.resume = resume
        # what the run did, for the log and report.html: cache entries made (0 when everything came
        # from the cache) and, in edit training, the micro-batches trained with their references
        self.stats = {"latents encoded": 0, "prompts embedded": 0, "steps with references": 0}
        self._metrics = None
        self.scorer = None  # validation.vlm_scoring's Scorer (set up with the run)
        self._stop_requested = False
        self._sigint_count = 0
        # Data parallel across processes launched by `mlx.launch` (a size-1 group otherwise).
        self.group = mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        if self.rank:
            self.log = lambda *a, **k: None  # rank 0 speaks and writes for the group

    # ---------------- setup ----------------
    def _check_output(self):
        from mflux2.training.plan import output_problem

        problem = output_problem(self.output)
        if problem:
            raise TrainingError(problem)
        try:
            self.output.mkdir(parents=True, exist_ok=True)
            probe = self.output / f".write_probe.{os.getpid()}"  # per process: ranks of one run share the folder
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"output folder {self.output} is not writable ({e.strerror}); set checkpoints.output") from None

    def _check_disk_space(self, need: int, keep: int):
        """Refuse to start when the caches and the checkpoints we will keep cannot fit on the disk."""
        from mflux2.training.preflight import OUTPUT_DISK_FIX, disk_problem

        problem, _ = disk_problem(self.output, need, f"for the caches and {keep} checkpoint(s)")
        if problem:
            raise TrainingError(f"{problem} — {OUTPUT_DISK_FIX}")

    def _open_models(self):
        """The training model's pipeline and, when another model renders the validation images, its
        pipeline: both lazy (nothing is loaded until used), their files resolved (downloaded if needed)."""
        from mflux2.training.validation import validation_items

        cfg = self.cfg
        self.pipe = pipe = open_model(cfg)
        cfg.resolve_model_defaults(defaults_variant(pipe))
        if cfg.dataset.control_path:  # a model.path's family is known only now
            check_reference_count(cfg, pipe.variant or pipe.family)
        self.val_pipe = None
        if validation_items(cfg) and cfg.validation_repo is not None:
            from mflux2.pipeline import Flux2Pipeline

            self.val_pipe = Flux2Pipeline.from_pretrained(cfg.validation_repo, variant=cfg.validation_variant,
                                                          dtype=pipe.dtype, low_memory=True)
        self.model_identity = model_identity(pipe.source)  # resume checks it, not model.path
        self.vae_id = weights_identity(pipe.source.vae)

    def _make_plan(self, pending_captions: int = 0):
        """Every decision that depends on the config, the model and this machine, from the one plan
        the dry run prints; logged, then applied. What the run cannot start with stops it here."""
        from mflux2.training import memory, plan as plan_mod

        cfg, pipe = self.cfg, self.pipe
        self.plan = plan = plan_mod.make_plan(
            cfg, pipe.source, plan_mod.this_machine(), samples=self.samples, val_samples=self.val_samples,
            validation_source=self.val_pipe.source if self.val_pipe is not None else None, pending_captions=pending_captions)
        for line in plan.lines():
            self.log(line)
        if plan.problems:
            raise TrainingError(plan.problems[0])
        if not plan.fits:
            self.log(f"warning: {plan.memory_verdict}; it may swap or fail"
                     + ("; changes that make it fit: " + "; ".join(plan.suggestions) if plan.suggestions else ""))
        # apply it
        pipe.text_encoder_quantize = plan.text_encoder_quantize
        self.te_id = weights_identity(pipe.source.text_encoder, {"quant": pipe.text_encoder_quantize,
                                                                  **{k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in pipe.text_encoder_options.items()}})
        self.transformer_quantization = plan.transformer_quantization
        if plan.checkpointing_turned_on:
            cfg.memory.gradient_checkpointing = plan.checkpoint_every
        self.blockwise_ahead = plan.blockwise_ahead
        if plan.small_command_batches:  # before anything runs on the device: MLX reads it once
            memory.limit_command_batches(plan.checkpoint_every, log=self.log)
        if self.val_pipe is not None:
            q = plan.transformer_quantization
            self.val_pipe.quantize = None if q == "bf16" else q

    # ---------------- caches ----------------
    def _fill_caches(self, samples, val_samples, prompts: list[str]):
        lat_cache = DiskCache(self.output / ".latent_cache", self.vae_id)
        txt_cache = DiskCache(self.output / ".text_cache", self.te_id)
        self.lat_cache, self.txt_cache = lat_cache, txt_cache
        # get() reads each entry: a truncated or corrupt one is deleted and rebuilt here
        with self.clock("latent cache"):
            self._fill_latent_cache(lat_cache, samples + val_samples)
        with self.clock("text encoder: load, embed, free"):
            self._fill_text_cache(txt_cache, prompts)
        st = self.stats
        self.log(f"caches: {st['latents encoded']} latent(s) encoded and {st['prompts embedded']} prompt(s) embedded "
                 f"this run, the rest read from {self.output}")

    def _fill_latent_cache(self, lat_cache, samples):
        # targets and (edit training) their controls, encoded by the same function
        todo = [(self._lat_key(s), lambda s=s: data_mod.load_image_for_bucket(s.path, s.bucket)) for s in samples]
        todo += [(self._control_key(s, c), lambda s=s, c=c: data_mod.load_control_for_bucket(c.path, s.size, s.bucket))
                 for s in samples for c in s.controls]
        todo = [(k, load) for k, load in dict(todo).items() if lat_cache.get(k) is None]
        masks = {self._mask_key(s): s for s in samples if s.mask is not None}  # per-token weights: no VAE
        for key, s in masks.items():
            if lat_cache.get(key) is None:
                grey = data_mod.load_mask_for_bucket(s.mask, s.size, s.bucket)
                lat_cache.put(key, {"weights": mx.array(data_mod.mask_weights(grey, s.mask.minimum, s.mask.path))})
        if todo:
            vae = self.pipe.vae
            for key, load in tqdm(todo, desc="caching latents", unit="img", dynamic_ncols=True):
                tokens = vae.pack(vae.encode(mx.array(load())[None]))[0]
                self.stats["latents encoded"] += 1
                lat_cache.put(key, {"latents": tokens.astype(mx.float32)})

    def _fill_text_cache(self, txt_cache, prompts):
        missing = [p for p in dict.fromkeys(prompts) if txt_cache.get(txt_cache.key(p)) is None]
        if missing:
            te = self.pipe.text_encoder
            for p in tqdm(missing, desc="caching text embeddings", unit="prompt", dynamic_ncols=True):
                embeds, _ = te.encode([p])
                self.stats["prompts embedded"] += 1
                txt_cache.put(txt_cache.key(p), {"prompt_embeds": embeds[0]})
        self.pipe.release("text_encoder")  # training runs from the cache alone

    def _lat_key(self, s):
        return self.lat_cache.key(s.content_hash, list(s.bucket))

    def _control_key(self, s, c):
        """A control's latents depend on its bytes and on its target's size and bucket (it is cropped
        like the target), and on the crop code (CONTROL_GEOMETRY); the cache's identity is the VAE's."""
        return self.lat_cache.key("control", data_mod.CONTROL_GEOMETRY, c.content_hash, list(s.size), list(s.bucket))

    def _mask_key(self, s):
        """A mask's token weights depend on its bytes, its image's size and bucket, mask_min and the
        crop and pooling code (MASK_GEOMETRY)."""
        m = s.mask
        return self.lat_cache.key("mask", data_mod.MASK_GEOMETRY, m.content_hash, m.alpha, m.minimum, list(s.size), list(s.bucket))

    def _loss_weights(self, samples) -> dict:
        """Batch fields for the masked, weighted loss: token weights when the run has masks (ones for an
        unmasked sample), sample weights when a dataset's loss_weight is not 1; none otherwise (the
        step's graph is then the plain one)."""
        out = {}
        if self.has_masks:
            n = self._latents(samples[0]).shape[0]
            out["token_weights"] = mx.stack([self._mask_weights(s) if s.mask is not None else mx.ones((n,), mx.float32)
                                             for s in samples])
        if self.has_loss_weights:
            # Paired with a reg batch the step's mean runs over twice the samples: × 2 makes the loss
            # diffusers' instance + prior_loss_weight × class (each a mean over its half).
            k = 2.0 if self.paired else 1.0
            out["sample_weights"] = mx.array([k * s.loss_weight for s in samples], mx.float32)
        return out

    def _mask_weights(self, s) -> mx.array:
        got = self.lat_cache.get(self._mask_key(s))
        if got is None:
            raise TrainingError(f"mask cache entry for {s.mask.path} vanished from {self.lat_cache.folder}; restart to rebuild it")
        return got["weights"]

    def _latents(self, s) -> mx.array:
        got = self.lat_cache.get(self._lat_key(s))
        if got is None:
            raise TrainingError(f"latent cache entry for {s.path} vanished from {self.lat_cache.folder}; restart to rebuild it")
        return got["latents"]

    def _references(self, s) -> mx.array:
        """A sample's control latents, concatenated on the token axis in reference order: [ΣM, 128]."""
        parts = []
        for c in s.controls:
            got = self.lat_cache.get(self._control_key(s, c))
            if got is None:
                raise TrainingError(f"latent cache entry for the control {c.path} vanished from {self.lat_cache.folder}; "
                                    f"restart to rebuild it")
            parts.append(got["latents"])
        return mx.concatenate(parts, axis=0)

    def _edit_inputs(self, samples, use_refs: bool = True) -> dict:
        """Batch fields for the references of `samples` (one group: same bucket and count); none when
        they have no controls or `use_refs` is false (control dropout: a text-to-image micro-batch)."""
        n = len(samples[0].controls)
        if not n or not use_refs:
            return {}
        return {"refs": mx.stack([self._references(s) for s in samples]), "ref_ids": self.cond.ref_ids(samples[0].bucket, n)}

    # ---------------- model ----------------
    def _load_transformer(self):
        q = self.transformer_quantization
        self.pipe.quantize = None if q == "bf16" else q
        model = self.pipe.transformer
        lcfg = self.cfg.lora
        mx.random.seed(self.cfg.training.seed)  # LoRA A's initialisation
        lora_mod.apply_lora(model, rank=lcfg.rank, alpha=float(lcfg.alpha), targets=lcfg.target_layers, dropout=lcfg.dropout,
                            type=lcfg.type, factor=lcfg.factor, decompose_both=lcfg.decompose_both)
        if getattr(self, "init_weights", None):  # lora.init_from on a fresh run (checked in _setup)
            from mflux2.training import init_from

            init_from.apply(model, init_from.reread(model, self.init_path, self.init_weights))
        lora_mod.freeze_for_lora(model)
        model.set_gradient_checkpointing(self.cfg.memory.checkpoint_every)
        model.train()
        return model

    def _optimizer(self, total_steps: int):
        t = self.cfg.training
        warm = min(t.warmup_steps, max(total_steps - 1, 0))
        lr = t.learning_rate
        rest = max(total_steps - warm, 1)
        main = {
            "constant": lambda: lr,
            "cosine": lambda: optim.cosine_decay(lr, rest, end=lr * 0.0),
            "linear": lambda: optim.linear_schedule(lr, 0.0, rest),
        }[t.lr_scheduler]()
        if warm > 0:
            tail = main if callable(main) else (lambda _s, v=main: mx.array(v, mx.float32))
            schedule = optim.join_schedules([optim.linear_schedule(lr / warm, lr, warm), tail], [warm])
        else:
            schedule = main
        opt_cls = {"adamw": optim.AdamW, "lion": optim.Lion}[t.optimizer]
        return opt_cls(learning_rate=schedule, weight_decay=t.weight_decay)

    # ---------------- checkpoints ----------------
    def _lora_metadata(self, step: int) -> dict:
        return {
            "rank": str(self.cfg.lora.rank), "alpha": str(self.cfg.lora.alpha), "targets": self.cfg.lora.target_layers,
            "base_model": self.pipe.variant or "custom", "trigger_word": self.cfg.dataset.trigger_word or "",
            "training_steps": str(step), "software": "mflux2",
            **({"init_from": self.cfg.lora.init_from} if self.cfg.lora.init_from else {}),
        }

    def _save_lora(self, path: Path, step: int):
        """The LoRA file; with EMA on, the averaged weights are what gets saved."""
        with lora_mod.swapped_parameters(self.model, self.ema) if self.ema is not None else contextlib.nullcontext():
            lora_mod.save_lora(path, self.model, metadata=self._lora_metadata(step))

    def save_checkpoint(self, state: RunState, with_images: bool = True):
        """Write checkpoint_NNNNNN/ atomically. A full disk or an I/O error removes the partial folder and
        stops the run with one line; the previous complete checkpoint stays as it was."""
        if self.rank:
            return self.output / f"checkpoint_{state.step:06d}"
        try:
            with self.clock(f"checkpoint {state.step}", step=state.step):
                return self._write_checkpoint(state, with_images)
        except OSError as e:
            shutil.rmtree(self.output / f"checkpoint_{state.step:06d}.partial", ignore_errors=True)
            last = latest_checkpoint(self.output)
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise TrainingError(
                f"cannot write the checkpoint at step {state.step} in {self.output}: {why}; "
                f"{f'the last complete checkpoint {last.name} is kept' if last else 'no checkpoint was written yet'} "
                f"— free space (or set checkpoints.output elsewhere) and run the same command to resume"
            ) from None

    def _write_checkpoint(self, state: RunState, with_images: bool):
        tstate = {
            "step": state.step, "elapsed_s": state.elapsed_s, "skipped_nonfinite": state.skipped_nonfinite,
            "sampler": self.sampler.state_dict(), "rng": _rng_state(self.rng),
            "history": state.history, "val_history": state.val_history, "early_stop": state.early_stop,
            "config_hash": config_hash(self.cfg, self.model_identity),
            "resume_signature": resume_signature(self.cfg, self.model_identity), "model_path": str(self.pipe.source.root),
            "dataset_fingerprint": self.dataset_fingerprint, "transformer_quantization": self.transformer_quantization,
            "world": self.world,
        }
        final = checkpoints.write(
            self.output, state.step, save_lora=lambda path: self._save_lora(path, state.step),
            arrays=checkpoints.state_arrays(self.model, self.optimizer, self.ema), state=tstate,
            keep_last=self.cfg.checkpoints.keep_last, images=(lambda folder: self._render_validation(folder, state.step))
            if with_images else None)
        if with_images and self.scorer is not None:
            self.scorer.after_checkpoint(final, state.step)
        with self.clock("report + learning curve"):
            self._write_curve(state)
            self._write_report(state)
        self.log(f"saved {final}")
        return final

    def _restore(self, ckpt: Path, state: RunState, layout=None):
        tstate, arrays = checkpoints.read(ckpt)
        self.ema = checkpoints.restore_arrays(ckpt, arrays, self.model, self.optimizer, self.ema, layout=layout)
        sampler = dict(tstate["sampler"])
        bs = self.cfg.training.batch_size
        world = int(tstate.get("world") or max(1, int(sampler.get("batch_size", bs * self.world)) // bs))
        if world != self.world:  # each step draws world × batch_size: continue the epoch at the same share of it
            done = int(sampler.get("position", 0)) * int(sampler.get("batch_size", bs * world))
            sampler.update(batch_size=self.sampler.batch_size,
                           position=min(math.ceil(done / self.sampler.batch_size), self.sampler.batches_per_epoch))
            self.log(f"warning: {ckpt.name} was written by a run on {world} machine(s), this one runs on {self.world}: "
                     f"each step now draws {self.world} × {bs} images instead of {world} × {bs}, so the data order from "
                     f"step {tstate['step']} on differs from an uninterrupted run (the LoRA and optimiser state carry on)")
        try:
            self.sampler.load_state_dict(sampler)
        except data_mod.DataError as e:
            raise TrainingError(f"{ckpt}: {e}; use --no-resume or another checkpoints.output") from None
        _set_rng_state(self.rng, tstate["rng"])
        state.step = tstate["step"]
        state.elapsed_s = tstate.get("elapsed_s", 0.0)
        state.skipped_nonfinite = tstate.get("skipped_nonfinite", 0)
        state.history = tstate.get("history", [])
        state.val_history = tstate.get("val_history", [])
        state.early_stop = tstate.get("early_stop", {})
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.log(f"resumed from {ckpt} at step {state.step}")

    def _render_validation(self, folder: Path, step: int) -> None:
        """The validation images with the LoRA as saved (the EMA average when EMA is on)."""
        lora_state = self.ema if self.ema is not None else self.model.trainable_parameters()
        self.validation.render(folder, step, self.model, lora_state, self.cond)

    def _write_report(self, state: RunState):
        from mflux2.training.report import write_report

        hist = state.history
        records = self._metrics.read() if self._metrics else []
        step_times = [m["step_time_s"] for m in records if "step_time_s" in m][-50:]
        restarts = [m for m in records if "restart" in m]  # written by the supervisor (mflux2-train)
        summary = {
            "model": self.pipe.variant or f"custom ({self.pipe.family})", "step": f"{state.step} / {self.total_steps}",
            "loss (last 20 steps)": f"{np.mean([h[2] for h in hist[-20:]]):.4f}" if hist else "-",
            "training time": f"{state.elapsed_s / 60:.1f} min",
            "median step time": f"{np.median(step_times):.3f} s" if step_times else "-",
            "LoRA": (f"rank {self.cfg.lora.rank}, alpha {self.cfg.lora.alpha}, {self.cfg.lora.target_layers}"
                     + ("" if self.cfg.lora.type == "lora" else f", {self.cfg.lora.type}")
                     + (f", factor {self.cfg.lora.factor}{', decompose_both' if self.cfg.lora.decompose_both else ''}"
                        if self.cfg.lora.type == "lokr" else "")),
            "transformer": self.transformer_quantization, "DOP": "on" if self.cfg.loss.diff_output_preservation else "off",
            "trigger word": self.cfg.dataset.trigger_word or "-", "non-finite steps skipped": state.skipped_nonfinite,
            "caches (this run)": f"{self.stats['latents encoded']} latent(s) encoded, {self.stats['prompts embedded']} prompt(s) embedded",
            **({"steps with references": f"{self.stats['steps with references']} (this run)"}
               if any(d.control_path for d in self.cfg.dataset_list) else {}),
            **({"edit training": f"{sum(bool(s.controls) for s in self.samples)} of {len(self.samples)} images with "
                                 f"references ({len(self.cfg.dataset.control_path)} folder(s)), control dropout "
                                 f"{self.cfg.dataset.control_dropout:g}"} if self.cfg.dataset.control_path else {}),
            "validation images": self.validation.settings(),
            "peak memory": f"{self.clock.peak_gb:.2f} GB",
            "restarts": (f"{len(restarts)}: " + "; ".join(f"after {m.get('cause')}, from step {m.get('step')}" for m in restarts)
                         if restarts else "0"),
            **(self.scorer.summary() if self.scorer is not None else {}),
            **_datasets_drawn(records, self.cfg),
        }
        write_report(self.output, self.cfg.dump_yaml(), summary, timing=self.clock.table())

    def _write_curve(self, state: RunState):
        if not self.cfg.checkpoints.learning_curve or not state.history:
            return
        h = np.array(state.history, dtype=np.float64)
        series = {"loss (main)": (h[:, 0].astype(int).tolist(), h[:, 2].tolist())}
        dop = h[h[:, 3] > 0]
        if len(dop):
            series["DOP preservation"] = (dop[:, 0].astype(int).tolist(), dop[:, 3].tolist())
        if state.val_history:
            v = np.array(state.val_history)
            series["validation"] = (v[:, 0].astype(int).tolist(), v[:, 1].tolist())
        svg = learning_curve_svg(series, self.cfg.checkpoints.learning_curve_smoothing_window, title="training loss")
        atomic_write_text(self.output / "learning_curve.svg", svg)

    def _validation_loss(self, step_fn: TrainStep) -> float:
        """Mean main loss over the validation set at fixed timesteps/noise (same every evaluation)."""
        losses = []
        for i, s in enumerate(self.val_samples):
            batch = Batch(self._latents(s)[None], self.cond.embeds(s.caption)[None], self.cond.img_ids(s.bucket), self.cond.txt_ids,
                          **self._edit_inputs([s]))
            loss, _ = step_fn.plain_loss(self.model, batch, mx.random.key(10_000 + i))
            losses.append(loss)
        mx.eval(losses)
        return float(np.mean([l.item() for l in losses]))

    # ---------------- control ----------------
    def _on_sigint(self, signum, frame):
        self._sigint_count += 1
        if self._sigint_count >= 2:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.log("\nCtrl-C: stopping after this step with a final checkpoint (press again to abort)")

    def _control(self, state: RunState) -> str | None:
        """Look at the control files between steps (rank 0 looks, the group follows). 'stop' or None."""
        decision = self._control_rank0(state) if self.rank == 0 else None
        if self.world > 1:
            stop = mx.distributed.all_sum(mx.array(1.0 if decision == "stop" or self._stop_requested else 0.0))
            decision = "stop" if stop.item() > 0 else None
        return decision

    def _control_rank0(self, state: RunState) -> str | None:
        out = self.output
        if (out / ".stop").exists() or self._stop_requested:
            (out / ".stop").unlink(missing_ok=True)
            return "stop"
        if (out / ".checkpoint").exists():
            self.save_checkpoint(state, with_images=True)
            (out / ".checkpoint").unlink(missing_ok=True)
        if (out / ".pause").exists():
            self.save_checkpoint(state, with_images=False)
            self.log(f"paused: remove {out / '.pause'} to continue")
            t0 = time.time()
            while (out / ".pause").exists() and not self._stop_requested:
                time.sleep(0.5)
                if (out / ".stop").exists():
                    break
            self._pause_s += time.time() - t0
        return None

    # ---------------- the run ----------------
    def run(self) -> Path:
        clock = self.clock
        if self.started_at is not None:
            clock.add("start-up", time.perf_counter() - self.started_at)
        with clock("other (between phases)"):  # what no named phase below covers
            with clock("setup"):
                ckpt = self._setup()
            return self._run(ckpt)

    def _setup(self) -> Path | None:
        """Everything before the caches: output folder, resume point, model files, dataset, the plan."""
        cfg = self.cfg
        self._check_output()
        clean_partials(self.output)
        ckpt = checkpoints.find_resume(self.output, self.resume, self.log, act=self.rank == 0)
        self._open_models()
        pending = 0
        if any(d.auto_caption for d in cfg.dataset_list):
            from mflux2.captions import has_caption

            with warnings.catch_warnings():  # the captions the VLM is about to write are not missing
                warnings.simplefilter("ignore", data_mod.DataWarning)
                self._scan()
            pending = len([s for s in self.samples + self.val_samples if not has_caption(s.path)])
        else:
            self._scan()
        self._make_plan(pending)  # before anything runs on the device
        self._captioned = bool(pending)
        if ckpt is not None:  # a checkpoint this run cannot continue stops it now, not after the caches
            checkpoints.check_resumable(ckpt, checkpoints.read_state(ckpt), cfg, self.model_identity, self.pipe.source.root)
        self.init_weights = self._init_from(ckpt)
        if pending:  # the VLM is freed before anything else loads
            if self.rank == 0:
                from mflux2.captions import auto_caption

                with self.clock("captions (VLM)"):
                    for _, one in data_mod.dataset_configs(cfg):
                        if one.dataset.auto_caption:
                            auto_caption(one, log=self.log)
            if self.world > 1:
                mx.eval(mx.distributed.all_sum(mx.array(0.0)))  # the others read the captions rank 0 wrote
            self._scan()
        self.dataset_fingerprint = hashlib.sha256(json.dumps(sorted(
            (s.content_hash, s.caption, list(s.bucket)) + ((tuple(c.content_hash for c in s.controls),) if s.controls else ())
            + ((s.mask.content_hash, s.mask.alpha, s.mask.minimum) if s.mask else ())
            + ((s.dataset, s.repeats, s.loss_weight, s.is_reg, s.variants) if (s.repeats, s.loss_weight, s.is_reg, s.variants)
               != (1, 1.0, False, ()) else ())
            for s in self.samples)).encode()).hexdigest()[:16]
        if cfg.dataset.control_path and self.val_samples and not cfg.dataset.validation_control_path:
            self.log("warning: dataset.validation_path has no dataset.validation_control_path: the validation loss "
                     "is computed without reference images")
        self.validation = Validation(cfg, self.pipe, self.val_pipe, self.plan.keep_validation_model, self.output,
                                     self.clock, self.log)
        self.scorer = None  # validation.vlm_scoring (rank 0 scores; an early stop is shared by the group)
        if cfg.validation.vlm_scoring.enabled and self.rank == 0:
            from mflux2.training.scoring import Scorer

            self.scorer = Scorer(cfg, self.output, [s.path for s in self.samples], self.validation.items, self.clock, self.log,
                                 record=lambda rec: self._metrics.append(rec) if self._metrics is not None else None)
        return ckpt

    def _init_from(self, ckpt: Path | None) -> dict | None:
        """lora.init_from's weights, checked against the lora: section before anything loads; None
        when unset or when the run resumes (the checkpoint holds the weights trained from it)."""
        spec = self.cfg.lora.init_from
        if not spec:
            return None
        if ckpt is not None:
            self.log(f"lora.init_from {spec} ignored: the run resumes from {ckpt.name}, which holds the weights trained from it")
            return None
        from mflux2.training import init_from

        path = self.init_path = init_from.resolve(spec)
        weights = init_from.read_checked(path, self.pipe.source, self.cfg.lora, spec)
        self.log(f"lora.init_from: starting from {path} ({len(weights)} {self.cfg.lora.type} layers, rank {self.cfg.lora.rank}); "
                 "fresh optimiser state, step 0")
        return weights

    def _scan(self):
        cfg = self.cfg
        self.samples = data_mod.scan_datasets(cfg)
        self.val_samples = data_mod.scan_datasets(cfg, validation=True)
        self.has_masks = any(s.mask is not None for s in self.samples)
        self.has_loss_weights = any(s.loss_weight != 1.0 or s.is_reg for s in self.samples)
        # A regularisation set: a reg batch beside every subject batch (data.PairedSampler), as the peers do.
        self.paired = any(s.is_reg for s in self.samples)

    def _run(self, ckpt: Path | None) -> Path:
        state, step_fn = self._prepare(ckpt)
        reason = self._train(state, step_fn)
        return self._finish(state, reason)

    def _prepare(self, ckpt: Path | None) -> tuple[RunState, TrainStep]:
        """Caches, the transformer with its LoRA, the optimiser, the data order, the resume point and
        the baseline images: everything the loop needs."""
        cfg, clock = self.cfg, self.clock
        prompts = self.plan.prompt_list if not self._captioned else data_mod.prompts_to_embed(  # the VLM's captions too
            cfg, self.samples, self.val_samples, [it.prompt for it in self.validation.items])
        self.total_steps = cfg.training.max_steps  # always set: the config derives it from epochs (x 100, as Swift)
        self._check_disk_space(int(self.plan.disk_gb * 1e9), self.plan.checkpoints_kept)
        for r in range(self.world):  # rank 0 first; on a shared disk the others then find everything cached
            if r == self.rank:
                self._fill_caches(self.samples, self.val_samples, prompts)
            if self.world > 1:
                mx.eval(mx.distributed.all_sum(mx.array(0.0)))  # barrier
        self.cond = Conditioning(self.txt_cache)

        with clock("transformer load"):
            self.model = self._load_transformer()
            self.optimizer = self._optimizer(self.total_steps)
            self.ema = _tree_copy(self.model.trainable_parameters()) if cfg.ema.enabled else None
            mx.eval(self.model.parameters())
        step_fn = TrainStep(self.model, self.optimizer, StepConfig(
            timestep_sampling=cfg.loss.timestep_sampling, logit_normal_mean=cfg.loss.logit_normal_mean,
            logit_normal_std=cfg.loss.logit_normal_std, flux_shift=cfg.loss.flux_shift, weighting=cfg.loss.weighting,
            dop_multiplier=cfg.loss.diff_output_preservation_multiplier,
            guidance=1.0 if self.pipe.guidance_embeds else None,
            max_grad_norm=cfg.training.max_grad_norm or None, compile=cfg.memory.compile_training,
            shard=(self.rank, self.world) if self.world > 1 else None, blockwise_ahead=self.blockwise_ahead,
        ), grad_accumulation=cfg.training.gradient_accumulation)
        # Every process draws the same global batch of world × batch_size and trains on its slice.
        self.sampler = (data_mod.PairedSampler if self.paired else data_mod.BatchSampler)(
            self.samples, cfg.training.batch_size * self.world, cfg.training.seed)
        self.rng = np.random.default_rng(cfg.training.seed)
        state = RunState()
        metrics = self._metrics = MetricsLog(self.output / "metrics.jsonl", enabled=self.rank == 0)
        if ckpt is not None:
            with clock("resume"):
                self._restore(ckpt, state, layout=step_fn.params)
            metrics.truncate_after(state.step)
        else:  # starting over: an earlier run's step records are not this run's
            metrics.truncate_after(0)
        run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
        clock.attach(lambda rec: metrics.append({**rec, "run": run_id}))
        fresh_baseline = ckpt is None and bool(self.validation.items) and self.rank == 0
        if fresh_baseline:  # an earlier run's baseline/ may be of other settings: made anew below (cache or render)
            shutil.rmtree(self.output / "baseline", ignore_errors=True)
        if self.scorer is not None:
            self.scorer.resume(state.step)  # the score history up to here (the baseline is scored with the first checkpoint)
        if fresh_baseline:
            self._baseline()
        return state, step_fn

    def _baseline_parts(self) -> dict:
        """What the baseline images depend on (`baseline.baseline_parts`): the model that renders them
        identified as the caches identify models."""
        from mflux2.training.baseline import baseline_parts

        renderer = self.val_pipe if self.val_pipe is not None else self.pipe
        return baseline_parts(self.cfg, self.validation, renderer_identity=weights_identity(renderer.source.transformer),
                              transformer_quantization=self.transformer_quantization, dtype=str(self.pipe.dtype),
                              vae_id=self.vae_id, te_id=self.te_id)

    def _baseline(self) -> None:
        """`baseline/`: from the baseline cache when an entry of these exact settings is there, else
        rendered (and stored in the cache); then the progression strips."""
        from mflux2.training.baseline import BaselineCache, baseline_key

        parts = self._baseline_parts()
        key, cache = baseline_key(parts), BaselineCache(self.output)
        names = [it.file_name for it in self.validation.items]
        base, partial = self.output / "baseline", self.output / "baseline.partial"
        shutil.rmtree(partial, ignore_errors=True)
        if cache.has(key, names):
            with self.clock("baseline (from the cache)"):
                cache.get(key, names, partial)
            self.log(f"baseline: reused from {cache.entry(key)} (same model, prompts, sizes, seeds and sampler)")
        else:
            partial.mkdir(exist_ok=True)
            self._render_validation(partial, 0)
            cache.put(key, parts, partial, names)
        os.replace(partial, base)
        self.validation.update_progression(base, 0)

    def _train(self, state: RunState, step_fn: TrainStep) -> str:
        """The loop: draw a batch, take a step, record it, then what the schedule asks for.
        Returns why it ended: "finished", "stopped", "early-stopped" or "vlm-stopped"."""
        when = Schedule.of(self.cfg)
        self._pause_s = 0.0
        prev_handler = signal.signal(signal.SIGINT, self._on_sigint)
        # Apple Silicon: wire the recommended working set so the weights stay resident between
        # steps (mlx-lm's context manager; a no-op where there is no Metal device).
        resident = contextlib.ExitStack()
        if mx.device_info().get("max_recommended_working_set_size"):  # Metal (importing mlx-lm costs ~1.5 s)
            from mlx_lm.generate import wired_limit

            resident.enter_context(wired_limit(self.model))
        self._bar = tqdm(total=when.total, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
                         disable=self.rank != 0)
        self._smooth, self._bad = None, 0
        reason = "finished"
        with self.clock("training steps"), resident, contextlib.closing(self._bar):
            first = self.clock("first step (tracing, compiling)")
            first.__enter__()
            try:
                while state.step < when.total:
                    if self._control(state) == "stop":
                        reason = "stopped"
                        break
                    t0 = time.perf_counter()
                    batch, is_dop, drawn = self._draw(state.step, when)
                    out = step_fn(batch, mx.random.key(self.cfg.training.seed * 1_000_003 + state.step), dop=is_dop)
                    if self.ema is not None and out["applied"]:
                        self.ema = _tree_lerp(self.ema, self.model.trainable_parameters(), self.cfg.ema.decay)
                    mx.eval(out["loss"], out["main"], out["pres"], out["finite"], out["grad_norm"], step_fn.state_arrays(),
                            self.ema if self.ema is not None else [])
                    if first is not None:
                        first.__exit__(None, None, None)
                        first = None
                    if not self._record(state, out, time.perf_counter() - t0, batch, is_dop, drawn, when):
                        continue  # a non-finite loss: the update was skipped on the device
                    reason = self._after_step(state, step_fn, when)
                    if reason:
                        break
                else:
                    reason = "finished"
            finally:
                if first is not None:
                    first.__exit__(None, None, None)
                signal.signal(signal.SIGINT, prev_handler)
        return reason or "finished"

    def _draw(self, step: int, when: "Schedule") -> tuple[Batch, bool, list[str]]:
        """This process's share of the step's batch, from the checkpointed sampler and RNG (a resumed
        run draws exactly what an uninterrupted one does): captions (a shuffled variant, caption
        dropout), references (control dropout), loss weights, and on DOP steps the prompts DOP
        preserves; with the labels (dataset/file stem) of the whole step's samples."""
        cfg = self.cfg
        drawn = next(self.sampler)  # the same on every process
        subject, reg = drawn if self.paired else (drawn, [])
        group_batch = [self.samples[i] for i in subject + reg]
        # shuffled captions: one of each sample's variants (no draw for a sample without)
        group_batch = [s.with_variant(int(self.rng.integers(len(s.variants)))) if s.variants else s for s in group_batch]
        dropped = [s.caption if self.rng.random() >= (cfg.training.caption_dropout if s.caption_dropout is None
                                                      else s.caption_dropout) else "" for s in group_batch]
        lo, hi = self.rank * cfg.training.batch_size, (self.rank + 1) * cfg.training.batch_size
        # this process's slice of the subject batch, and of the reg batch after it
        mine = list(range(lo, hi)) + [len(subject) + j for j in range(lo, hi)] if reg else list(range(lo, hi))
        chosen, captions = [group_batch[j] for j in mine], [dropped[j] for j in mine]
        # Control dropout: one draw per (global) micro-batch that has references; dropped = text-to-image.
        use_refs = not (group_batch[0].controls and cfg.dataset.control_dropout
                        and self.rng.random() < cfg.dataset.control_dropout)
        is_dop = when.is_dop(step)
        # the class prompts, or one of loss.diff_output_preservation_prompts (they take turns)
        kept = data_mod.preservation_prompts(chosen, step, when.dop_every, cfg.loss.diff_output_preservation_prompts) if is_dop else []
        mx.random.seed(cfg.training.seed * 1_000_003 + step + 1)  # LoRA dropout
        batch = Batch(
            latents=mx.stack([self._latents(s) for s in chosen]),
            prompt_embeds=mx.stack([self.cond.embeds(c) for c in captions]),
            img_ids=self.cond.img_ids(chosen[0].bucket), txt_ids=self.cond.txt_ids,
            dop_embeds=mx.stack([self.cond.embeds(p) for p in kept]) if is_dop else None,
            **self._edit_inputs(chosen, use_refs), **self._loss_weights(chosen),
        )
        return batch, is_dop, [s.label for s in group_batch]

    def _record(self, state: RunState, out: dict, dt: float, batch: Batch, is_dop: bool, drawn: list[str],
                when: "Schedule") -> bool:
        """Count the step, update the history, the progress bar and metrics.jsonl (every step's
        samples; the losses every log_every steps). False for a non-finite loss (too many in a row
        stop the run with the last good state saved)."""
        cfg = self.cfg
        state.step += 1
        state.elapsed_s += dt
        finite = bool(out["finite"].item())
        self._metrics.append({"step": state.step, "samples": drawn, "main_loss": out["main"].item() if finite else None})
        if not finite:
            state.skipped_nonfinite += 1
            self._bad += 1
            if self._bad >= MAX_CONSECUTIVE_NONFINITE:
                self.save_checkpoint(state, with_images=False)  # parameters are the last good ones
                raise TrainingError(
                    f"loss was not finite for {self._bad} steps in a row (up to step {state.step}); the last good "
                    f"state is saved. Lower training.learning_rate (now {cfg.training.learning_rate}) or check the data")
            return False
        self._bad = 0
        self.stats["steps with references"] += batch.refs is not None
        loss, main, pres = out["loss"].item(), out["main"].item(), out["pres"].item()
        state.history.append([state.step, loss, main, pres if is_dop else 0.0])
        self._smooth = loss if self._smooth is None else 0.9 * self._smooth + 0.1 * loss
        mem = mx.get_active_memory() / 1e9
        self._bar.set_postfix(loss=f"{self._smooth:.4f}", s_it=f"{dt:.2f}", **progress_memory(), refresh=False)
        self._bar.update(1)
        if when.should_log(state.step):
            self._metrics.append({"step": state.step, "loss": loss, "main_loss": main, "dop_loss": pres if is_dop else None,
                                  "t_mean": out["t_mean"].item(), "lr": float(self.optimizer.learning_rate.item()),
                                  "grad_norm": out["grad_norm"].item(), "step_time_s": dt, "memory_gb": round(mem, 3),
                                  "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
                                  "skipped_nonfinite": state.skipped_nonfinite,
                                  **({"references": batch.refs is not None} if any(d.control_path for d in cfg.dataset_list) else {})})
        return True

    def _after_step(self, state: RunState, step_fn: TrainStep, when: "Schedule") -> str | None:
        """What the schedule asks for after a step: the validation loss, the on_step hook, early
        stopping, a checkpoint. Returns why the run stops now, or None."""
        if self.val_samples and when.should_eval(state.step):
            with self.clock("validation loss"):
                vl = self._validation_loss(step_fn)
            state.val_history.append([state.step, vl])
            self._metrics.append({"step": state.step, "val_loss": vl})
        if self.on_step is not None:
            self.on_step(self, state.step)
        if when.should_eval(state.step) and self._early_stop(state):
            return "early-stopped"
        if when.should_save(state.step):
            self.save_checkpoint(state, with_images=when.with_images(state.step))
            if self.cfg.validation.vlm_scoring.enabled and self._vlm_stop():
                return "vlm-stopped"
        return None

    def _finish(self, state: RunState, reason: str) -> Path:
        """The final checkpoint (unless the VLM stopped the run right after one), lora_final and the report."""
        if reason == "vlm-stopped":  # stopped right after this step's checkpoint: it is the final one
            final_ckpt = self.output / f"checkpoint_{state.step:06d}"
            reason = "early-stopped"
        else:
            final_ckpt = self.save_checkpoint(state, with_images=bool(self.validation.items))
        final = self.output / "lora_final.safetensors"
        with self.clock("final LoRA"):
            self._save_lora(final, state.step)
        if self.rank == 0:
            with self.clock("report + learning curve"):
                self._write_report(state)  # with the final timing table
        self.log(f"{reason} at step {state.step}: {final} (checkpoint {final_ckpt.name}); "
                 f"{state.skipped_nonfinite} non-finite steps skipped")
        self.result = {"reason": reason, "step": state.step, "lora": final}
        return final

    # ---------------- early stopping ----------------
    def _vlm_stop(self) -> bool:
        """validation.vlm_scoring's early stop, decided by rank 0 (which scores) for the group."""
        why = self.scorer.stop_reason if self.scorer is not None else None
        stop = why is not None
        if self.world > 1:
            stop = mx.distributed.all_sum(mx.array(1.0 if stop else 0.0)).item() > 0
        if why is not None:
            self.log(f"early stop: {why}")
        return stop

    def _early_stop(self, state: RunState) -> bool:
        es = self.cfg.early_stop
        if not (es.enabled or es.on_overfit or es.on_val_stagnation):
            return False
        st = state.early_stop
        window = self.cfg.checkpoints.learning_curve_smoothing_window
        recent = [h[2] for h in state.history[-window:]]
        if not recent:
            return False
        train = float(np.mean(recent))
        if es.enabled:
            if _stalled(st, "train", train, es.min_delta, es.patience):
                self.log(f"early stop: training loss has not improved by {es.min_delta:.0%} for {es.patience} evaluations")
                return True
        if state.val_history and state.val_history[-1][0] == state.step:
            val = state.val_history[-1][1]
            if es.on_overfit:
                st["gap_count"] = st.get("gap_count", 0) + 1 if val - train > es.max_gap else 0
                if st["gap_count"] >= es.gap_patience:
                    self.log(f"early stop: validation loss exceeds training loss by more than {es.max_gap} (overfitting)")
                    return True
            if es.on_val_stagnation:
                if _stalled(st, "val", val, es.min_val_improvement, es.val_patience):
                    self.log("early stop: validation loss stopped improving")
                    return True
        return False


# ------------------------------------------------------------------------------------------------
# helpers


def _datasets_drawn(records: list[dict], cfg: TrainConfig) -> dict:
    """report.html's line per dataset: the samples drawn so far (metrics.jsonl) and their mean main
    loss (a step's loss counted for each of its samples: exact at batch size 1, the batch's mean else)."""
    counts = {d.name or "": 0 for d in cfg.dataset_list}
    losses: dict[str, list[float]] = {name: [] for name in counts}
    for r in records:
        for label in r.get("samples") or []:
            name = label.rsplit("/", 1)[0] if "/" in label else ""
            counts[name] = counts.get(name, 0) + 1
            if r.get("main_loss") is not None:
                losses.setdefault(name, []).append(r["main_loss"])
    return {f"dataset {name}": f"{n} samples drawn" + (f", mean loss {np.mean(losses[name]):.4f}" if losses.get(name) else "")
            for name, n in counts.items()}


def _stalled(st: dict, name: str, value: float, min_rel_improvement: float, patience: int) -> bool:
    """Track the best `value` in `st`; True once it has not improved by `min_rel_improvement`
    (relative) for `patience` evaluations in a row."""
    if value < st.get(f"best_{name}", math.inf) * (1 - min_rel_improvement):
        st[f"best_{name}"], st[f"stale_{name}"] = value, 0
    else:
        st[f"stale_{name}"] = st.get(f"stale_{name}", 0) + 1
    return st[f"stale_{name}"] >= patience


def _text_ids(length: int) -> mx.array:
    ids = np.zeros((length, 4), np.float32)
    ids[:, 3] = np.arange(length)
    return mx.array(ids)


def _tree_copy(tree):
    from mlx.utils import tree_map

    return tree_map(lambda x: mx.array(x), tree)


def _tree_lerp(ema, params, decay):
    from mlx.utils import tree_map

    return tree_map(lambda e, p: decay * e + (1 - decay) * p.astype(e.dtype), ema, params)


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
