"""scripts/benchmark.py --tiny on the CPU: it runs the real TrainStep, prints its JSON line, and
gradient checkpointing lowers the peak memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--steps", "3", "--warmup", "1", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def plain():
    return bench()


def test_tiny_benchmark_prints_its_figures(plain):
    r = plain
    assert r["model"] == "tiny" and r["mode"] == "plain" and r["checkpointing"] == 0 and r["blockwise"] is False
    assert r["loss_finite"] is True and r["lora_layers"] == 16
    assert 0 < r["median_s_per_step"] < 60 and r["host_s"] <= r["mean_s_per_step"] * 3
    assert r["peak_memory_bytes"] > r["weights_gb"] * 1e9 > 0
    assert r["tflop_per_step"] > 0 and r["tokens_per_s"] > 0
    assert len(r["warmup_step_s"]) == 1 and r["warmup_step_s"][0] > 0  # the first step: trace, compile, builds
    assert r["device"].startswith("Device(cpu") and r["mlx"]


def test_checkpointing_lowers_peak_memory(plain):
    ckpt = bench("--checkpointing", "1")
    assert ckpt["blockwise"] is True and ckpt["loss_finite"] is True
    # same weights, less for the activations: the block-by-block backward keeps only segment inputs
    assert ckpt["weights_gb"] == plain["weights_gb"]
    assert ckpt["peak_memory_bytes"] < 0.85 * plain["peak_memory_bytes"], (ckpt["peak_memory_bytes"], plain["peak_memory_bytes"])


def test_quantized_dop_checkpointed_step_runs():
    # with more preservation prompts rotating through the DOP steps (loss.diff_output_preservation_prompts)
    r = bench("--base", "int8", "--mode", "dop-every", "--dop-every", "2", "--checkpointing", "2", "--profile", "--dop-prompts", "2")
    assert r["base"] == "int8" and r["mode"] == "dop-every" and r["dop_prompts"] == 2 and r["loss_finite"] is True
    assert r["forward_s"] > 0 and r["forward_backward_s"] > 0 and r["update_s"] > 0


def test_quant_gemm_bench_runs_and_its_dequantisation_is_exact():
    """scripts/quant_gemm_bench.py on small shapes: one JSON line per layer, every way timed, and
    mflux2's dequantize_tile (whole and a quarter tile) equal to mx.dequantize."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "quant_gemm_bench.py"), "--tokens", "32", "--hidden", "128",
                          "--mlp", "256", "--reps", "1", "--chain", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["layer"] for r in rows] == ["linear1", "linear2", "qkv", "mlp_out"]
    for r in rows:
        assert r["int8_max_err"] == 0 and r["int4_max_err"] == 0
        assert all(r[f"{k}_ms"] > 0 for k in ("bf16_fwd", "bf16_bwd", "int8_dequant_fwd", "int8_qmm_bwd", "int4_dequant_only"))


def test_validation_benchmark_times_each_piece_of_a_validation_image():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "validation_benchmark.py"), "--tiny", "--repeat", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    row = r["sizes"]["64"]
    for piece in ("forward", "vae_decode", "vae_encode", "png"):
        assert row[f"{piece}_s"] > 0 and row[f"{piece}_peak_gb"] >= 0, piece
    assert r["four_images_4_steps_s"] == round(4 * (4 * row["forward_s"] + row["vae_decode_s"] + row["png_s"]), 3)


def test_masked_interleaved_times_masked_and_unmasked_steps_in_turn():
    # --steps 4: two (masked, unmasked) pairs; the masked step runs the weighted loss (docs/performance.md)
    r = bench("--masked-interleaved", "--steps", "4")
    assert r["masked"] == "interleaved" and r["loss_finite"] is True
    assert r["masked_median_s"] > 0 and r["unmasked_median_s"] > 0 and r["masked_ratio"] > 0
    assert r["masked_ratio_iqr"][0] <= r["masked_ratio_iqr"][1]


def test_compare_runs_each_type_at_its_matched_rank_or_the_one_given():
    r = bench("--compare", "lora,loha,lora@4")
    rows = {row["entry"]: row for row in r["compare"]}
    assert list(rows) == ["lora", "loha", "lora@4"]
    assert rows["lora"]["rank"] == 32 and rows["lora@4"]["rank"] == 4
    assert rows["lora@4"]["params"] * 8 == rows["lora"]["params"]  # LoRA's count is linear in its rank
    assert abs(rows["loha"]["params"] - rows["lora"]["params"]) <= 0.05 * rows["lora"]["params"]
    assert all(row["median_s_per_step"] > 0 for row in rows.values())


def test_shapes_times_the_first_two_steps_of_each_shape_in_turn():
    r = bench("--shapes", "64x64,80x48,64x64")
    assert [row["shape"] for row in r["shapes"]] == ["64x64", "80x48", "64x64"]
    assert [row["tokens"] for row in r["shapes"]] == [16, 15, 16]
    assert all(row["first_s"] > 0 and row["second_s"] > 0 for row in r["shapes"])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--shapes", "64x60"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0 and "--shapes 64x60" in out.stderr


def test_first_calls_times_each_operation_twice_per_sequence_length():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "first_calls.py"), "--tiny", "--tokens", "16,15"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["first_calls"]
    assert [r["sequence"] for r in rows] == [32, 31]
    assert all(len(r[k]) == 2 and min(r[k]) > 0 for r in rows for k in ("gemm_qkv", "attention", "attention_grad"))
