"""A run's checkpoint folder, `checkpoint_NNNNNN/`: written atomically, read back for an exact resume.

It holds `lora.safetensors` (the LoRA as saved, the EMA average when EMA is on), the raw trainable
parameters with the optimiser's state (and the EMA) in `optimizer_state.safetensors`,
`training_state.json` (step, data order, RNG, history, and the signature a resume must match), and,
at validation steps, the validation images. The folder is written as `.partial` and renamed when
complete, so a crash never leaves a half checkpoint that looks whole (`outputs.commit_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from mflux2.training.config import config_hash, resume_signature
from mflux2.training.outputs import TrainingError, checkpoint_dirs, checkpoint_problem, commit_checkpoint, latest_checkpoint


def find_resume(output: Path, resume, log=print, act: bool = True) -> Path | None:
    """The checkpoint a run resumes from: `resume` a path → that folder (it must be complete); True
    → the newest complete one in `output`, damaged ones (a file missing or cut short, e.g. by an
    interrupted copy) skipped with one warning naming them; False (--no-resume) → none, and an
    earlier run's checkpoints are moved into `previous_run_<time>/` (with `act`; the dry run only
    says so): left in place they would outrank this run's own (keep_last would prune this run's,
    a restart would continue the earlier run), and deleted they would be lost."""
    output = Path(output)
    if resume is False:
        earlier = checkpoint_dirs(output) if output.is_dir() else []
        if earlier:
            aside = output / time.strftime("previous_run_%Y%m%d-%H%M%S")
            if act:
                aside.mkdir()
                for _, p in earlier:
                    os.replace(p, aside / p.name)
            log(f"--no-resume: {'moved' if act else 'would move'} the earlier run's {', '.join(p.name for _, p in earlier)} "
                f"into {aside}")
        return None
    if isinstance(resume, (str, Path)):
        p = Path(resume)
        problem = checkpoint_problem(p)
        if problem:
            raise TrainingError(f"--resume {p}: not a complete checkpoint folder ({problem}); "
                                f"pass another checkpoint_NNNNNN folder, or use --no-resume")
        return p
    damaged: list = []
    ckpt = latest_checkpoint(output, damaged) if output.is_dir() else None
    if damaged:
        log(f"warning: skipping damaged checkpoint(s) in {output}: "
            + "; ".join(f"{d.name} ({why})" for d, why in damaged)
            + (f" — resuming from {ckpt.name}, the newest complete one" if ckpt else " — no complete checkpoint: starting from step 0"))
    return ckpt


def state_arrays(model, optimizer, ema) -> dict:
    """What a resume needs besides the JSON state: the trainable parameters, the optimiser's state
    and the EMA, flat."""
    arrays = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    arrays.update({f"params.{k}": v for k, v in tree_flatten(model.trainable_parameters())})
    if ema is not None:
        arrays.update({f"ema.{k}": v for k, v in tree_flatten(ema)})
    return arrays


def write(output: Path, step: int, *, save_lora, arrays: dict, state: dict, keep_last: int | None, images=None) -> Path:
    """checkpoint_NNNNNN/ of `step`: `save_lora(path)` writes the LoRA file, `images(folder)` the
    validation images (None: none this time); the folder appears complete or not at all."""
    name = f"checkpoint_{step:06d}"
    final, partial = output / name, output / (name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_lora(partial / "lora.safetensors")
    mx.save_safetensors(str(partial / "optimizer_state.safetensors"), arrays)
    if images is not None:
        images(partial)
    (partial / "training_state.json").write_text(json.dumps(state))
    commit_checkpoint(partial, final, keep_last=keep_last or None)
    return final


def read_state(ckpt: Path) -> dict:
    """training_state.json of a checkpoint; one line when it cannot be read."""
    try:
        return json.loads((ckpt / "training_state.json").read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(ckpt, e) from None


def read(ckpt: Path) -> tuple[dict, dict]:
    """(training_state.json, the arrays) of a checkpoint; one line when it cannot be read."""
    state = read_state(ckpt)
    try:
        return state, mx.load(str(ckpt / "optimizer_state.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise _unreadable(ckpt, e) from None


def _unreadable(ckpt: Path, e: Exception) -> TrainingError:
    return TrainingError(f"{ckpt}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"resume from another checkpoint with --resume, or use --no-resume")


def check_resumable(ckpt: Path, tstate: dict, cfg, identity: dict, model_root) -> None:
    """The checkpoint was trained on this model with a LoRA of this shape (`config.resume_signature`),
    else one line saying what differs."""
    old = tstate.get("resume_signature") or {}
    # the model by its identity (a moved folder resumes); checkpoints that hold no identity: by model.path
    ident = identity if "model.weights" in old else None
    if tstate.get("config_hash") == config_hash(cfg, ident):
        return
    new = resume_signature(cfg, ident)
    diff = [k for k in new if old.get(k) != new.get(k)]
    if any(k in ("model.config", "model.weights") for k in diff):
        raise TrainingError(
            f"{ckpt}: trained on another model than {model_root} (its transformer's "
            f"{' and '.join(k.split('.')[1] for k in diff if k.startswith('model.'))} differ: "
            f"{', '.join(f'{k} {old.get(k)!r} → {new.get(k)!r}' for k in diff)}; it was {tstate.get('model_path', '?')}) "
            f"— set model.path to that model, or use --no-resume or another checkpoints.output")
    raise TrainingError(
        f"{ckpt}: the config changed in a way that breaks resuming ({', '.join(diff) or 'model/LoRA'}: "
        f"{', '.join(f'{old.get(k)!r} → {new.get(k)!r}' for k in diff)}); use --no-resume or another checkpoints.output")


def restore_arrays(ckpt: Path, arrays: dict, model, optimizer, ema, layout=None):
    """Put the checkpoint's parameters into `model` and its optimiser state into `optimizer`, in
    place (mx.compile captures these very dicts); returns the restored EMA (None without EMA).
    `layout` (the step's FlatParameters) converts an optimiser state of the other flat layout (the
    LoRA factors stored as they are, or transposed: switch "flat_transposed")."""
    pick = lambda prefix: [(k[len(prefix):], v) for k, v in arrays.items() if k.startswith(prefix)]  # noqa: E731
    model.update(tree_unflatten(pick("params.")))
    # Fill the already-initialised trees path by path (empty sub-trees, e.g. a LoRA layer's frozen
    # `base`, do not survive a flat file).
    opt_flat = dict(pick("optimizer."))
    missing = [path for path, _ in tree_flatten(optimizer.state) if path not in opt_flat]
    if missing and layout is not None:
        converted = layout.from_other_layout(opt_flat)
        if converted is not None:
            opt_flat = {**{k: v for k, v in opt_flat.items() if "." not in k}, **converted}
            missing = [path for path, _ in tree_flatten(optimizer.state) if path not in opt_flat]
    if missing:
        raise TrainingError(
            f"{ckpt / 'optimizer_state.safetensors'}: no optimizer.{missing[0]} (the optimiser state of another "
            f"mflux2 version or optimiser); use --no-resume or another checkpoints.output, and to carry its "
            f"LoRA on with a fresh optimiser set lora.init_from: {ckpt / 'lora.safetensors'}")
    for k, v in tree_map_with_path(lambda path, old: opt_flat[path], optimizer.state).items():
        optimizer.state[k] = v
    if ema is None:
        return None
    ema_flat = dict(pick("ema."))
    return tree_map_with_path(lambda path, old: ema_flat[path], ema)
