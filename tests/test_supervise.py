"""`mflux2-train` keeps a run alive: recoverable failures are restarted from the newest complete
checkpoint and the final LoRA equals an uninterrupted run's; user stops and config errors are not."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mflux2.training import supervise as sup
from mflux2.training.cli import main as train_cli
from mflux2.training.outputs import latest_checkpoint
from tests.test_trainer import metrics, tiny, write_config  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 10


def _config(tmp_path, tiny):
    return write_config(tmp_path, tiny, training={"max_steps": MAX_STEPS},
                        checkpoints={"save_every": 2, "keep_last": 2}, validation={"prompts": []})


def _cli(*argv, fail_at: str = "", timeout=120):
    """`mflux2-train` as the command (python -m: supervised, like the console script)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MFLUX2_FAIL_AT_STEPS=fail_at)
    return subprocess.run([sys.executable, "-m", "mflux2.training.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _lora(path: Path) -> dict:
    return load_file(str(path))


def test_failures_at_random_steps_are_restarted_and_the_lora_equals_an_uninterrupted_run(tiny, tmp_path, capsys):
    cfg = _config(tmp_path, tiny)
    assert train_cli([str(cfg), "--output", str(tmp_path / "ref")]) == 0  # uninterrupted, in this process
    capsys.readouterr()

    # a new draw each run (MFLUX2_TEST_SEED repeats one); the plan is printed and in every assertion message
    seed = int(os.environ.get("MFLUX2_TEST_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, MAX_STEPS), 3))
    kinds = rng.sample(["kill", "abort", "metal"], 3)
    plan = ",".join(f"{s}:{k}" for s, k in zip(steps, kinds)) + f" (MFLUX2_TEST_SEED={seed})"
    print(f"failure plan: {plan}")
    out = tmp_path / "out"
    done = _cli(cfg, "--output", out, fail_at=plan.split(" ")[0])
    assert done.returncode == 0, (plan, done.stderr[-3000:])
    restart_lines = [l for l in done.stderr.splitlines() if l.startswith("mflux2-train: restart ")]
    assert len(restart_lines) == 3, (plan, done.stderr[-3000:])
    assert "restart 1/3 after" in restart_lines[0] and "restart 3/3 after" in restart_lines[2]
    causes = {"kill": "SIGKILL", "abort": "SIGABRT", "metal": "a Metal/MLX runtime error"}
    for line, kind in zip(restart_lines, kinds):
        assert causes[kind] in line, (plan, line)
    if "metal" in kinds:
        assert "ml-explore/mlx#3267" in done.stderr

    records = metrics(out)
    restarts = [m for m in records if "restart" in m]
    assert [m["restart"] for m in restarts] == [1, 2, 3], plan
    for m, s in zip(restarts, steps):
        assert m["step"] == (s - 1) - (s - 1) % 2  # the newest checkpoint before the failure (saved after the step)
    logged = [m["step"] for m in records if "loss" in m]
    assert logged == list(range(1, MAX_STEPS + 1))  # the log reads as one run: redone steps are not doubled
    report = (out / "report.html").read_text()
    assert "restarts" in report and "3: after" in report and "SIGKILL" in report, report[:3000]

    ref, got = _lora(tmp_path / "ref" / "lora_final.safetensors"), _lora(out / "lora_final.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_allclose(got[k].astype(np.float32), ref[k].astype(np.float32), rtol=0, atol=1e-6, err_msg=k)
    ref_loss = [m["loss"] for m in metrics(tmp_path / "ref") if "loss" in m]
    assert [m["loss"] for m in records if "loss" in m] == pytest.approx(ref_loss, abs=1e-6)


def test_restarts_are_limited_and_zero_disables_supervision(tiny, tmp_path):
    cfg = _config(tmp_path, tiny)
    once = _cli(cfg, "--output", tmp_path / "a", "--max-restarts", "0", fail_at="3:kill")
    assert once.returncode == -signal.SIGKILL  # trained in that very process: nobody restarts it
    assert "restart" not in once.stderr
    assert latest_checkpoint(tmp_path / "a").name == "checkpoint_000002"

    used_up = _cli(cfg, "--output", tmp_path / "b", "--max-restarts", "1", fail_at="3:kill,5:abort")
    assert used_up.returncode == 128 + signal.SIGABRT, used_up.stderr[-2000:]
    assert "restart 1/1 after SIGKILL: resuming from checkpoint_000002" in used_up.stderr
    assert "1 restart(s) used up" in used_up.stderr
    assert [m["restart"] for m in metrics(tmp_path / "b") if "restart" in m] == [1]
    # the same command again resumes (the failures fired once each) and finishes
    again = _cli(cfg, "--output", tmp_path / "b", "--max-restarts", "1", fail_at="3:kill,5:abort")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "b" / "lora_final.safetensors").exists()


def test_a_no_resume_run_restarts_from_its_own_checkpoint(tiny, tmp_path):
    """--no-resume into a folder holding an older run's newer checkpoints: the restarted child
    resumes from the checkpoint this run wrote (the supervisor passes it in MFLUX2_RESUME_FROM),
    neither from the older run's nor from step 0, and the LoRA equals an uninterrupted run's."""
    cfg = _config(tmp_path, tiny)
    out = tmp_path / "out"
    assert train_cli([str(cfg), "--output", str(out)]) == 0  # the older run: checkpoints 8 and 10
    ref = _lora(out / "lora_final.safetensors")
    done = _cli(cfg, "--output", out, "--no-resume", fail_at="5:kill")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "restart 1/3 after SIGKILL: resuming from checkpoint_000004" in done.stderr, done.stderr[-3000:]
    assert len(list(out.glob("previous_run_*/checkpoint_000010"))) == 1  # the older run's, set aside, not lost
    assert f"resumed from {out / 'checkpoint_000004'} at step 4" in done.stdout, done.stdout[-3000:]
    logged = [m["step"] for m in metrics(out) if "loss" in m]
    assert logged == list(range(1, MAX_STEPS + 1))
    got = _lora(out / "lora_final.safetensors")
    for k in ref:
        np.testing.assert_allclose(got[k].astype(np.float32), ref[k].astype(np.float32), rtol=0, atol=1e-6, err_msg=k)


def test_ctrl_c_and_stop_are_not_restarted(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny, training={"max_steps": 400},
                       checkpoints={"save_every": 1, "keep_last": 2}, validation={"prompts": []})
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mflux2.training.cli", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while proc.poll() is None and latest_checkpoint(out) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the supervisor passes it on once: stop with a checkpoint
    stdout, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    assert "Ctrl-C" in stdout and "restart" not in err + stdout and "stopped at step" in stdout
    assert not [m for m in metrics(out) if "restart" in m]

    (out / ".stop").touch()  # .stop: the run ends at once, with exit 0, and stays ended
    done = _cli(cfg)
    assert done.returncode == 0 and "restart" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert "stopped at step" in done.stdout


def test_a_config_error_is_one_line_and_starts_no_child(tmp_path, capsys, monkeypatch):
    def no_child(*a, **k):
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    (tmp_path / "typo.yaml").write_text("model: {name: klein-4b}\ntraining: {learnin_rate: 0.1}\n")
    assert train_cli([str(tmp_path / "typo.yaml")], supervise=True) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mflux2-train: error:") and "learnin_rate" in err


def test_a_metal_error_exits_recoverable_with_the_explanation(tiny, tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path, tiny)
    monkeypatch.setenv("MFLUX2_FAIL_AT_STEPS", "1:metal")
    assert train_cli([str(cfg)]) == sup.EXIT_RECOVERABLE
    err = capsys.readouterr().err
    assert "kIOGPUCommandBufferCallbackErrorImpactingInteractivity" in err and "ml-explore/mlx#3267" in err
    assert "Traceback" not in err


def test_which_exits_are_restarted():
    for code in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS, sup.EXIT_RECOVERABLE):
        assert sup.recoverable(code), code
    for code in (0, 1, 2, 130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP):
        assert not sup.recoverable(code), code
    assert sup.is_metal_error(RuntimeError("[METAL] Command buffer execution failed: GPU Timeout Error"))
    assert not sup.is_metal_error(RuntimeError("shapes do not match"))
    assert not sup.is_metal_error(ValueError("[METAL] Command buffer"))


def test_macos_measures(monkeypatch):
    monkeypatch.setattr(sup.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert sup.caffeinate_cmd(4321, platform="darwin") == ["/usr/bin/caffeinate", "-i", "-w", "4321"]
    assert sup.caffeinate_cmd(4321, platform="linux") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert sup.caffeinate_cmd(7) == ["/usr/bin/caffeinate", "-i", "-w", "7"]
    monkeypatch.setattr(sup.shutil, "which", lambda name: None)
    assert sup.caffeinate_cmd(7) is None  # no caffeinate: train anyway

    monkeypatch.delenv(sup.WATCHDOG_ENV, raising=False)
    env = sup.child_env(99, Path("/x/checkpoint_000004"))
    assert env[sup.WATCHDOG_ENV] == "1" and env["MFLUX2_SUPERVISED"] == "1"
    assert env["MFLUX2_SUPERVISOR_PID"] == "99" and env["MFLUX2_RESUME_FROM"] == "/x/checkpoint_000004"
    monkeypatch.setenv(sup.WATCHDOG_ENV, "0")  # the user's own value wins
    assert sup.child_env(99)[sup.WATCHDOG_ENV] == "0"
    assert "MFLUX2_RESUME_FROM" not in sup.child_env(99)
    monkeypatch.delenv(sup.WATCHDOG_ENV)
    assert sup.WATCHDOG_ENV not in sup.child_env(99, platform="linux")  # macOS only
