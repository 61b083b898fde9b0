"""Where a run's wall time and memory go, phase by phase (loading, caches, validation, checkpoints,
steps), measured by the trainer itself so users see it in metrics.jsonl and report.html.

Phases nest: while a checkpoint's validation images render, time goes to the validation phase, not
to the checkpoint write around it, so the phases of a run add up to its wall time. Each phase's
peak is MLX's peak memory while that phase (not its children) was running. A phase that runs more
than once (a report per checkpoint) gets one metrics.jsonl record per occurrence, with that
occurrence's time and peak: the records add up to the wall time too; `table()` has the totals.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_gb: float = 0.0
    step: int | None = None  # the training step the phase belongs to (validation 125, checkpoint 250)


@dataclass
class PhaseClock:
    """Time and peak memory per phase; `sink` gets each finished phase as a dict (metrics.jsonl)."""

    phases: dict[str, Phase] = field(default_factory=dict)
    sink: object = None
    _stack: list = field(default_factory=list)  # [Phase, started_at, this occurrence's Phase]

    def _charge(self) -> None:
        """Credit the running phase (its total and this occurrence) with the time and peak since it
        last resumed."""
        if self._stack:
            ph, t0, occ = self._stack[-1]
            now = time.perf_counter()
            peak = mx.get_peak_memory() / 1e9
            for p in (ph, occ):
                p.seconds += now - t0
                p.peak_gb = max(p.peak_gb, peak)
            self._stack[-1][1] = now
        mx.reset_peak_memory()

    def add(self, name: str, seconds: float, step: int | None = None) -> None:
        """A phase measured elsewhere (the process's start-up before the trainer existed)."""
        ph = self.phases.setdefault(name, Phase(name, step=step))
        ph.seconds += seconds
        self._emit(Phase(name, seconds, step=step))

    @contextlib.contextmanager
    def __call__(self, name: str, step: int | None = None):
        self._charge()
        ph = self.phases.setdefault(name, Phase(name, step=step))
        occ = Phase(name, step=step)
        self._stack.append([ph, time.perf_counter(), occ])
        try:
            yield ph
        finally:
            self._charge()
            self._stack.pop()
            if self._stack:
                self._stack[-1][1] = time.perf_counter()  # the parent resumes now, not when the child began
            self._emit(occ)

    def _emit(self, ph: Phase) -> None:
        if self.sink is not None:
            rec = {"phase": ph.name, "seconds": round(ph.seconds, 4), "peak_gb": round(ph.peak_gb, 4)}
            if ph.step is not None:
                rec["step"] = ph.step
            self.sink(rec)

    def attach(self, sink) -> None:
        """Send finished phases to `sink` from now on, and the time each phase has finished so far
        (one record each: what ran before has no records of its own)."""
        self.sink = sink
        running = {id(ph) for ph, _, _ in self._stack}
        for ph in self.phases.values():
            if id(ph) not in running:
                self._emit(ph)

    def table(self) -> list[dict]:
        self._charge()
        return [{"phase": p.name, "seconds": p.seconds, "peak_gb": p.peak_gb} for p in self.phases.values()]

    @property
    def peak_gb(self) -> float:
        self._charge()
        return max((p.peak_gb for p in self.phases.values()), default=0.0)


def resident_gb() -> float | None:
    """The process's resident memory (Linux /proc; None elsewhere). On the CPU MLX's allocator
    counts only its own buffers, so its figure would read 0.0 GB for a process using gigabytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        return None


def progress_memory() -> dict:
    """The progress bar's memory field: MLX's active memory on a GPU, the resident memory (`rss`)
    on the CPU, nothing when neither is known."""
    if mx.default_device() == mx.gpu:
        return {"mem": f"{mx.get_active_memory() / 1e9:.1f}GB"}
    rss = resident_gb()
    return {"rss": f"{rss:.1f}GB"} if rss is not None else {}
