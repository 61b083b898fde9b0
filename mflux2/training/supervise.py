"""Keep a run alive: `mflux2-train` runs the training in a child process and, when the child dies
from a recoverable failure (the Metal watchdog / a command-buffer error, an abort, a crash, a kill by
the OS), starts it again; the trainer resumes from the newest complete checkpoint, deterministically,
so the final LoRA is the one an uninterrupted run makes. `.stop`, Ctrl-C, config/data/model errors
(exit 1) are never restarted.

The child knows it is supervised by MFLUX2_SUPERVISED=1 (it then trains in-process) and dies with
its supervisor (MFLUX2_SUPERVISOR_PID). MFLUX2_RESUME_FROM tells a restarted child which checkpoint
to resume from (the newest complete one this run can use), overriding --resume/--no-resume.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# A child exit code meaning "an MLX/Metal runtime failure: worth a restart" (EX_TEMPFAIL).
EXIT_RECOVERABLE = 75
# Deaths by these signals are crashes or kills by the OS (jetsam sends SIGKILL): restarted.
# SIGTERM, SIGHUP, SIGINT and SIGPIPE are someone asking the run to end: not restarted.
RECOVERABLE_SIGNALS = {signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL,
                       signal.SIGFPE, signal.SIGTRAP}
METAL_PATTERNS = re.compile(
    r"kIOGPUCommandBufferCallbackError|Command buffer|command buffer|GPU Timeout|\[METAL\]|Impacting Interactivity")
WATCHDOG_ENV = "AGX_RELAX_CDM_CTXSTORE_TIMEOUT"


def failure_injection(spec: str):
    """For the supervisor's own tests: MFLUX2_FAIL_AT_STEPS="3:kill,7:abort,9:metal" makes the training
    process die after those steps, each once per output folder (a marker file remembers it), the way
    a crash, an abort or a Metal command-buffer failure would. Returns the trainer's on_step hook, or
    None for an empty spec."""
    plan = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        step, _, kind = item.partition(":")
        plan[int(step)] = kind or "kill"
    if not plan:
        return None

    def on_step(trainer, step: int) -> None:
        marker = trainer.output / f".injected_failure_{step:06d}"
        if step not in plan or trainer.rank or marker.exists():
            return
        marker.write_text(plan[step])
        trainer.log(f"injecting a failure at step {step}: {plan[step]}")
        if plan[step] == "abort":
            os.abort()
        if plan[step] == "metal":
            raise RuntimeError("[METAL] Command buffer execution failed: Impacting Interactivity "
                               "(0000000e:kIOGPUCommandBufferCallbackErrorImpactingInteractivity)")
        os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def is_metal_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and bool(METAL_PATTERNS.search(str(e)))


def watchdog_explanation() -> str:
    env = (f"{WATCHDOG_ENV}=1 is set" if os.environ.get(WATCHDOG_ENV) == "1"
           else f"set {WATCHDOG_ENV}=1 before starting")
    return ("mflux2-train: this is the macOS GPU watchdog killing long Metal work while the display is in use "
            f"(ml-explore/mlx#3267) — {env}, let the display sleep or lock the screen while training; "
            "mflux2-train resumes from the last checkpoint (--max-restarts)")


def is_distributed() -> bool:
    """Launched as one process of a group (mlx.launch / MPI): a restart of one process would leave the
    others waiting, so such runs are not supervised."""
    return any(os.environ.get(k) for k in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR",
                                             "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


def child_env(parent_pid: int, resume_from: Path | None = None, platform: str | None = None) -> dict:
    env = dict(os.environ, MFLUX2_SUPERVISED="1", MFLUX2_SUPERVISOR_PID=str(parent_pid))
    env.pop("MFLUX2_RESUME_FROM", None)
    if resume_from is not None:
        env["MFLUX2_RESUME_FROM"] = str(resume_from)
    if (platform or sys.platform) == "darwin":
        env.setdefault(WATCHDOG_ENV, "1")  # before MLX starts; the user's own value wins
    return env


def caffeinate_cmd(pid: int, platform: str | None = None) -> list[str] | None:
    """macOS: hold off idle system sleep while process `pid` lives (the display may still sleep)."""
    if (platform or sys.platform) != "darwin":
        return None
    exe = shutil.which("caffeinate")
    return [exe, "-i", "-w", str(pid)] if exe else None


def die_with_supervisor() -> None:
    """In the child: end when the supervisor ends (e.g. it was SIGKILLed), never train on unattended."""
    try:
        parent = int(os.environ.get("MFLUX2_SUPERVISOR_PID", "0"))
    except ValueError:
        return
    if not parent:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except Exception:
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mflux2-supervisor-watch", daemon=True).start()


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    if returncode == EXIT_RECOVERABLE:
        return "a Metal/MLX runtime error"
    return f"exit code {returncode}"


def recoverable(returncode: int) -> bool:
    if returncode < 0:
        return -returncode in {int(s) for s in RECOVERABLE_SIGNALS}
    return returncode == EXIT_RECOVERABLE


def resume_point(output: Path, since: float | None) -> Path | None:
    """The newest complete checkpoint a restart resumes from; with `since` (a --no-resume run) only one
    this run wrote, so an older run's checkpoints are never picked up."""
    from mflux2.training.outputs import checkpoint_dirs

    for _step, path in reversed(checkpoint_dirs(output)):
        if since is None or path.stat().st_mtime >= since:
            return path
    return None


def supervise(child_argv: list[str], output: Path, max_restarts: int, fresh: bool, log=None) -> int:
    """Run `python -m mflux2.training.cli child_argv` until it finishes, restarting it on recoverable
    failures up to `max_restarts` times. Returns the exit code for `mflux2-train`."""
    from mflux2.training.outputs import MetricsLog

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time() - 1.0  # (file-system timestamps may be coarse)
    cmd = [sys.executable, "-m", "mflux2.training.cli", *child_argv]
    state = {"proc": None, "ended_by_user": False}

    def forward(signum, frame):
        state["ended_by_user"] = True
        proc = state["proc"]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    handled = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, forward) for s in handled}
    restarts, resume_from = 0, None
    try:
        while True:
            if state["ended_by_user"]:  # Ctrl-C / SIGTERM between two children
                return 130
            # Its own process group: the terminal's Ctrl-C reaches the supervisor only, which passes
            # it on once (one Ctrl-C = stop after this step with a checkpoint; a second one aborts).
            proc = subprocess.Popen(cmd, env=child_env(os.getpid(), resume_from), start_new_session=True)
            os.environ.pop("MFLUX2_STARTED_WALL", None)  # only the first child's start-up counts from ours
            state["proc"] = proc
            caf = caffeinate_cmd(proc.pid)
            caffeinate = subprocess.Popen(caf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if caf else None
            code = proc.wait()
            if caffeinate is not None:
                caffeinate.wait()
            if code == 0 or state["ended_by_user"] or not recoverable(code):
                return code if code >= 0 else 128 - code
            cause = describe(code)
            if sys.platform == "darwin" and code == -int(signal.SIGABRT):  # (exit 75: the child explained it)
                log("mflux2-train: if the error above mentions a command buffer or kIOGPUCommandBufferCallbackError, "
                    + watchdog_explanation().removeprefix("mflux2-train: "))
            if restarts >= max_restarts:
                log(f"mflux2-train: the training process died ({cause}); {max_restarts} restart(s) used up — "
                    f"run the same command to resume from the last checkpoint")
                return 128 - code if code < 0 else code
            restarts += 1
            resume_from = resume_point(output, started if fresh else None)
            step = int(resume_from.name.split("_")[-1]) if resume_from is not None else 0
            where = f"resuming from {resume_from.name}" if resume_from is not None else "starting again from step 0"
            # (a killed child leaves its progress bar's line open: start on a new one)
            log(("\n" if code < 0 else "") + f"mflux2-train: restart {restarts}/{max_restarts} after {cause}: {where}")
            if output.is_dir():
                metrics = MetricsLog(output / "metrics.jsonl")
                if resume_from is None:  # the trainer truncates the log only when it resumes
                    metrics.truncate_after(0)
                metrics.append(
                    {"restart": restarts, "max_restarts": max_restarts, "cause": cause, "step": step,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
