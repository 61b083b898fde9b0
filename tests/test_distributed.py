"""Data-parallel training with mx.distributed: 2 processes (ring backend, localhost, CPU) with batch 1
each must train the same LoRA as 1 process with batch 2 and the same data order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.test_trainer import metrics, run, tiny, write_config  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on localhost (the ring backend listens on one per rank)."""
    import socket

    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports on localhost")


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch not on PATH")
@pytest.mark.parametrize("adapter", ["lora", "dora", "lokr", "loha"])
def test_two_processes_equal_one_process_with_the_global_batch(tiny, tmp_path, adapter):
    """Every adapter type: its gradients are averaged across ranks like LoRA's (DoRA's magnitude,
    LoKr's and LoHa's factors are trainable parameters of the same tree)."""
    common = dict(validation={"prompts": []}, checkpoints={"save_every": 2},
                  loss={"diff_output_preservation_every_n_steps": 2})
    if adapter != "lora":
        common["lora"] = {"type": adapter, "rank": 4, **({"factor": 2} if adapter == "lokr" else {})}
    single_dir, dist_dir = tmp_path / "single", tmp_path / "dist"
    single_dir.mkdir()
    dist_dir.mkdir()
    single = write_config(single_dir, tiny, training={"batch_size": 2, "max_steps": 4, "dtype": "float32"}, **common)
    dist = write_config(dist_dir, tiny, training={"batch_size": 1, "max_steps": 4, "dtype": "float32"}, **common)
    run(single)

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port = _free_port_pair()  # not a fixed default a lingering socket of an earlier run may hold
    proc = subprocess.run(["mlx.launch", "--backend", "ring", "-n", "2", "--starting-port", str(port),
                           sys.executable, "-m", "mflux2.training.cli", str(dist)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # mlx.launch exits 0 whatever its ranks do: a rank's failure shows only in its output
    output = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0 and "exited with code" not in proc.stderr and "was killed" not in proc.stderr, output
    assert (dist_dir / "out" / "metrics.jsonl").is_file(), output

    a = [m["loss"] for m in metrics(single_dir / "out") if "loss" in m]
    b = [m["loss"] for m in metrics(dist_dir / "out") if "loss" in m]
    assert len(a) == len(b) == 4  # only rank 0 wrote the log
    np.testing.assert_allclose(b, a, rtol=1e-4)
    # the averaged (not summed) gradient: Adam would hide a factor of 2 in the weights, the norm does not
    ga = [m["grad_norm"] for m in metrics(single_dir / "out") if "loss" in m]
    gb = [m["grad_norm"] for m in metrics(dist_dir / "out") if "loss" in m]
    np.testing.assert_allclose(gb, ga, rtol=1e-4)
    wa = mx.load(str(single_dir / "out" / "lora_final.safetensors"))
    wb = mx.load(str(dist_dir / "out" / "lora_final.safetensors"))
    assert wa.keys() == wb.keys()
    marker = {"lora": "lora_A", "dora": "dora_scale", "lokr": "lokr_w", "loha": "hada_w1_a"}[adapter]
    assert any(marker in k for k in wa), sorted(wa)[:4]  # the type asked for was trained
    moved = 0
    for k in wa:
        # float32 run: equal up to summation order (in bf16 a batch of 2 and two of 1 round differently)
        x, y = np.array(wa[k]), np.array(wb[k])
        assert np.abs(x - y).max() <= 1e-4 * max(np.abs(x).max(), 1e-8), k
        moved += float(np.abs(x).max()) > 0
    assert moved > 0
    # one set of checkpoints, written once
    assert sorted(p.name for p in (dist_dir / "out").glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]
