"""scripts/job_benchmark.py --tiny: the whole cat-toy job through the real CLI on the toy model,
twice (cold, then with the caches), timed by the trainer's own phases."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_job_benchmark_phases_add_up_and_the_cached_run_skips_the_encoders(tmp_path):
    t0 = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "job_benchmark.py"), "--tiny", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert time.time() - t0 < 240  # the issue asks < 2 min on 2 idle cores; leave room for a busy CI box
    for run in ("cold", "cached"):
        j = r[run]
        assert j["steps"] == 6 and j["median_step_s"] > 0
        assert abs(j["phases_sum_s"] - j["wall_s"]) <= 0.05 * j["wall_s"], j  # every second is in a phase
        for name in ("start-up", "setup", "latent cache", "text encoder: load, embed, free", "transformer load",
                     "validation 3", "validation 6", "checkpoint 3", "checkpoint 6",
                     "training steps", "report + learning curve"):
            assert name in j["phases"], (run, name)
        assert j["peak_gb"] == max(j["phase_peak_gb"].values()) > 0
    # the dry run's memory prediction for each of its phases sits beside the measured peak (the toy's
    # figures are dominated by the estimate's fixed allowances; the GPU run checks the 10%)
    assert set(r["preflight_vs_measured"]) == {"text-encoder cache", "latent cache", "training step", "validation images"}
    for row in r["preflight_vs_measured"].values():
        assert row["predicted_gb"] > 0 and row["measured_gb"] > 0 and row["ratio"] > 0, row
    cold, cached = r["cold"]["phases"], r["cached"]["phases"]
    # the second run renders no baseline: its images come from the baseline cache copied with the others
    assert "baseline validation" in cold and "baseline (from the cache)" not in cold
    assert "baseline (from the cache)" in cached and "baseline validation" not in cached
    # the second run encodes nothing: neither the text encoder nor the VAE encoder is loaded
    assert cached["text encoder: load, embed, free"] < 0.1 * cold["text encoder: load, embed, free"]
    assert r["cached"]["phase_peak_gb"]["text encoder: load, embed, free"] < 0.5 * r["cold"]["phase_peak_gb"]["text encoder: load, embed, free"]
    report = (tmp_path / "run1" / "report.html").read_text()
    assert 'id="timing"' in report and "baseline validation" in report
    # validation images come from the distilled folder (model.validation_path), said in the report
    assert "toy-distilled (klein), 4 steps, no CFG (step-distilled); LoRA trained on toy-base" in report


def test_the_dev_folder_is_a_converted_folder_the_pipeline_loads_as_stored(tmp_path):
    """The dev job's model (stored int8: its bf16 files do not fit the GPU machine's disk), written by
    the same code on small shapes, loads through the converted-folder path and generates."""
    import importlib.util

    import mlx.core as mx
    import numpy as np

    from mflux2.pipeline import Flux2Pipeline

    spec = importlib.util.spec_from_file_location("job_benchmark", ROOT / "scripts" / "job_benchmark.py")
    jb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jb)
    root = jb.write_dev_folder(tmp_path, "int8", tiny=True)
    pipe = Flux2Pipeline.from_pretrained(root)
    assert pipe.family == "dev" and pipe.guidance_embeds
    assert pipe.transformer.quantization == "int8" and pipe.text_encoder.quantization == "int8"
    assert len(pipe.text_encoder.model.layers) == 30  # the deepest hidden state FLUX.2 takes
    img = pipe.generate("a toy on a beach", width=64, height=64, num_inference_steps=2, output_type="array", progress=False)[0]
    img = np.array(img)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0
    mx.clear_cache()


def test_step_spread_names_the_slow_steps_and_their_samples():
    """A step slower than twice the median (a new bucket's compile) is listed with its samples; the
    others' time above the median is summed apart."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_benchmark", ROOT / "scripts" / "job_benchmark.py")
    jb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jb)
    times = [1.0, 1.0, 1.2, 5.0, 0.9]
    records = [r for i, t in enumerate(times, 1)
               for r in ({"step": i, "samples": [f"set/{i}"]}, {"step": i, "step_time_s": t})]
    got = jb._step_spread(records)
    assert got["slow_steps"] == [{"step": 4, "s": 5.0, "samples": ["set/4"]}]
    assert got["slow_steps_excess_s"] == 4.0 and got["other_steps_excess_s"] == 0.2
    assert jb._step_spread([{"phase": "setup", "seconds": 1.0}]) == {}


def test_a_malformed_cached_env_stops_before_any_run(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "job_benchmark.py"), "--tiny", "--work", str(tmp_path),
                          "--cached-env", "MLX_USE_CUDA_GRAPHS"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "expected VAR=VALUE" in out.stderr
    assert not (tmp_path / "run1").exists()
