"""The trainer's phase clock: nested phases split the wall time between them (they add up), and
each phase keeps its own peak memory."""

import time

import mlx.core as mx

from mflux2.training.phases import PhaseClock


def test_nested_phases_add_up_to_the_wall_time_and_keep_their_own_peak():
    clock = PhaseClock()
    got = []
    clock.attach(got.append)
    t0 = time.perf_counter()
    with clock("outer"):
        time.sleep(0.05)
        with clock("inner", step=3):
            big = mx.zeros((4_000_000,), mx.float32)  # 16 MB, only inside the inner phase
            mx.eval(big)
            del big
            time.sleep(0.1)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    t = {r["phase"]: r for r in clock.table()}
    assert abs(t["outer"]["seconds"] - 0.1) < 0.04 and abs(t["inner"]["seconds"] - 0.1) < 0.04
    assert abs(t["outer"]["seconds"] + t["inner"]["seconds"] - wall) < 0.01
    assert t["inner"]["peak_gb"] >= 0.016 > t["outer"]["peak_gb"]
    assert [r["phase"] for r in got] == ["inner", "outer"] and got[0]["step"] == 3


def test_a_repeated_phase_accumulates():
    clock = PhaseClock()
    for _ in range(3):
        with clock("report"):
            time.sleep(0.02)
    assert len(clock.table()) == 1 and clock.table()[0]["seconds"] >= 0.06
