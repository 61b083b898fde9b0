"""The trainer's phase clock: nested phases split the wall time between them (they add up), each
phase keeps its own peak memory, and metrics.jsonl gets one record per occurrence (the records add
up to the wall time too). Time is a fake clock advanced by the test: exact, whatever the load."""

from types import SimpleNamespace

import mlx.core as mx
import pytest

from mflux2.training import phases
from mflux2.training.phases import PhaseClock


@pytest.fixture
def clock_time(monkeypatch):
    """The phase clock's perf_counter reads `now[0]`; the test moves it."""
    now = [1000.0]
    monkeypatch.setattr(phases, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_nested_phases_add_up_to_the_wall_time_and_keep_their_own_peak(clock_time):
    clock = PhaseClock()
    got = []
    clock.attach(got.append)
    t0 = clock_time[0]
    with clock("outer"):
        clock_time[0] += 0.05
        with clock("inner", step=3):
            big = mx.zeros((4_000_000,), mx.float32)  # 16 MB, only inside the inner phase
            mx.eval(big)
            del big
            clock_time[0] += 0.1
        clock_time[0] += 0.05
    wall = clock_time[0] - t0
    t = {r["phase"]: r for r in clock.table()}
    assert t["outer"]["seconds"] == pytest.approx(0.1, abs=1e-9) and t["inner"]["seconds"] == pytest.approx(0.1, abs=1e-9)
    assert t["outer"]["seconds"] + t["inner"]["seconds"] == pytest.approx(wall, abs=1e-9)
    assert t["inner"]["peak_gb"] >= 0.016 > t["outer"]["peak_gb"]
    assert [r["phase"] for r in got] == ["inner", "outer"] and got[0]["step"] == 3


def test_a_repeated_phase_has_one_record_per_occurrence_and_its_total_in_the_table(clock_time):
    clock = PhaseClock()
    got = []
    clock.add("start-up", 0.5)  # before the sink: replayed once at attach
    with clock("report"):
        clock_time[0] += 0.25
    clock.attach(got.append)
    t0 = clock_time[0]
    with clock("run"):
        for seconds in (0.5, 1.0):
            with clock("report"):
                clock_time[0] += seconds
        clock_time[0] += 2.0
    assert [(r["phase"], r["seconds"]) for r in got] == [
        ("start-up", 0.5), ("report", 0.25), ("report", 0.5), ("report", 1.0), ("run", 2.0)]
    assert sum(r["seconds"] for r in got) == pytest.approx(0.5 + 0.25 + clock_time[0] - t0)
    table = {r["phase"]: r["seconds"] for r in clock.table()}
    assert table == {"start-up": 0.5, "report": 1.75, "run": 2.0}


def test_the_progress_bar_never_shows_a_false_zero(monkeypatch):
    """On the CPU MLX's active memory misses what the process holds: the bar shows the resident
    memory (rss) there, MLX's figure on a GPU, and nothing when neither is known."""
    monkeypatch.setattr(phases.mx, "default_device", lambda: phases.mx.cpu)
    rss = phases.resident_gb()
    assert rss is not None and rss > 0.05  # this Python process with MLX and numpy loaded
    shown = phases.progress_memory()
    assert list(shown) == ["rss"] and float(shown["rss"].removesuffix("GB")) >= 0.1
    monkeypatch.setattr(phases, "resident_gb", lambda: None)
    assert phases.progress_memory() == {}
    monkeypatch.setattr(phases.mx, "default_device", lambda: phases.mx.gpu)
    monkeypatch.setattr(phases.mx, "get_active_memory", lambda: 3_210_000_000)
    assert phases.progress_memory() == {"mem": "3.2GB"}
