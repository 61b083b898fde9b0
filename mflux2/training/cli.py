"""`mflux2-train config.yaml [overrides]` — the command-line face of the trainer."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

STARTED = time.perf_counter()  # the run's "start-up" phase counts from here (imports included)

OVERRIDES = {  # CLI flag -> config key path
    "max_steps": "training.max_steps",
    "output": "checkpoints.output",
    "learning_rate": "training.learning_rate",
    "batch_size": "training.batch_size",
    "rank": "lora.rank",
    "save_every": "checkpoints.save_every",
    "seed": "training.seed",
    "model_path": "model.path",
    "dataset": "dataset.path",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mflux2-train", description="Train a FLUX.2 LoRA from a YAML config.")
    ap.add_argument("config", help="the YAML config (see configs/ and docs/training.md)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the fully resolved config, each value marked: from file, Swift default or mflux2 default (why); then exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="in seconds, loading no weights: dataset, model, memory per phase and disk; exit 1 if the run cannot fit")
    ap.add_argument("--memory", type=float, metavar="GB",
                    help="with --dry-run: plan for a Mac with GB of unified memory (macOS's recommended GPU working set "
                         "of it) instead of this machine, before any download")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--output", help="output folder (checkpoints.output)")
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--save-every", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--model-path", help="local FLUX.2 model folder (model.path)")
    ap.add_argument("--dataset", help="dataset folder or HF dataset id (dataset.path)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set loss.weighting=bell_shaped (YAML value syntax)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint folder")
    g.add_argument("--no-resume", action="store_true", help="start fresh even if the output folder has checkpoints")
    ap.add_argument("--max-restarts", type=int, default=3, metavar="N",
                    help="restart the training after a recoverable failure (Metal watchdog / command-buffer error, "
                         "abort, crash, kill by the OS), resuming from the newest complete checkpoint, up to N times "
                         "(default 3; 0 runs the training in this process, unsupervised)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    return ap


def main(argv=None, supervise: bool | None = None) -> int:
    """`mflux2-train`. As the command (`argv` None) the training runs in a supervised child process
    that is restarted after recoverable failures (--max-restarts); called with an argument list from
    Python it trains in this process unless `supervise=True`."""
    import os

    import yaml

    from mflux2.training import supervise as sup
    from mflux2.training.config import ConfigError
    from mflux2.training.config_loading import load_config

    if supervise is None:
        supervise = argv is None
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if args.max_restarts < 0:
        print("mflux2-train: error: --max-restarts must be 0 or more", file=sys.stderr)
        return 2
    child = os.environ.get("MFLUX2_SUPERVISED") == "1"
    if child:
        sup.die_with_supervisor()
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag) is not None}
    for item in args.set:
        if "=" not in item:
            print(f"mflux2-train: error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        cfg = load_config(args.config, overrides)
        if args.memory is not None and (not args.dry_run or args.memory <= 0):
            print("mflux2-train: error: --memory GB goes with --dry-run and must be above 0 (e.g. --dry-run --memory 32)", file=sys.stderr)
            return 2
        if args.print_config:
            print(cfg.dump_yaml(annotate=True), end="")
            return 0
        if args.dry_run:
            from mflux2.training.preflight import preflight

            return preflight(cfg, memory_gb=args.memory, resume=False if args.no_resume else (args.resume or True))
        if supervise and not child and args.max_restarts > 0 and not sup.is_distributed():
            # the config is valid (its errors were one line above, with no child); train in a child
            os.environ["MFLUX2_STARTED_WALL"] = str(time.time() - (time.perf_counter() - STARTED))
            return sup.supervise(raw_argv, Path(cfg.checkpoints.output), args.max_restarts, fresh=args.no_resume)
        from mflux2.training.trainer import Trainer

        resume = False if args.no_resume else (args.resume or True)
        if child and os.environ.get("MFLUX2_RESUME_FROM"):  # a restart: the supervisor picked the checkpoint
            resume = os.environ["MFLUX2_RESUME_FROM"]
        started = STARTED
        if child and os.environ.get("MFLUX2_STARTED_WALL") and not os.environ.get("MFLUX2_RESUME_FROM"):
            # the first child's start-up phase counts from the supervisor's start (its imports, the
            # config check and the child's launch are part of the job's time)
            started = time.perf_counter() - (time.time() - float(os.environ["MFLUX2_STARTED_WALL"]))
        Trainer(cfg, resume=resume, started_at=started,
                on_step=sup.failure_injection(os.environ.get("MFLUX2_FAIL_AT_STEPS", ""))).run()
        return 0
    except KeyboardInterrupt:
        print("\nmflux2-train: aborted (the last complete checkpoint is kept)", file=sys.stderr)
        return 130
    except Exception as e:  # one line for expected problems, a traceback with --debug
        if args.debug:
            traceback.print_exc()
        known = _known_errors()
        if isinstance(e, known):
            print(f"mflux2-train: error: {e}", file=sys.stderr)
            return 1
        if sup.is_metal_error(e):  # the Metal watchdog / a command-buffer failure: recoverable by a restart
            print(f"mflux2-train: GPU error: {e}", file=sys.stderr)
            print(sup.watchdog_explanation(), file=sys.stderr)
            return sup.EXIT_RECOVERABLE
        if not args.debug:
            print(f"mflux2-train: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _known_errors() -> tuple:
    from mflux2.hub import ModelLoadError
    from mflux2.training.config import ConfigError
    from mflux2.training.trainer import TrainingError
    from mflux2.vlm import VLMError
    from mflux2.weights import WeightsError

    errors = [ConfigError, TrainingError, WeightsError, ModelLoadError, VLMError, FileNotFoundError, PermissionError]
    try:
        from mflux2.training.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    try:
        from mflux2.lora import LoRAError

        errors.append(LoRAError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
