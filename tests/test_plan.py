"""The run's plan (mflux2/training/plan.py): one set of decisions for the run and its dry run, and
memory predictions a Mac user can trust."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mflux2.training import data as D, plan as P
from mflux2.training.config_loading import load_config
from mflux2.training.config_loading import apply_overrides
from mflux2.training.data import Sample

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
# diffusers/cat_toy_example's photos (W x H), as job_benchmark.py writes them
CAT_TOY = [(1121, 1022), (902, 846), (1147, 1231), (905, 1097), (1103, 1141), (1167, 1010)]
# predicted phase -> the job's measured phases it covers (the largest of them)
MEASURED = {
    "text-encoder cache": ("text encoder: load, embed, free",),
    "latent cache": ("latent cache",),
    "training step": ("training steps", "first step (tracing, compiling)"),
    "validation images": ("baseline validation", "validation ", "validation: model load", "validation: VAE decode + PNG"),
}
# The jobs below ran before sampling was bounded (issue 34: `sampling.bounded_run_ahead`, ordered
# dequantisation tiles): their validations' forwards held what the fix removes (dev: 46.89 GB, the
# plan now 36.97), so there the validation phase is checked on what the fix leaves as it was (the
# validation model's load, the VAE decode + PNG); the sampling term is checked on the CPU
# (tests/test_sampling.py) until a GPU job measures it.
BEFORE_BOUNDED_SAMPLING = ("baseline validation", "validation 1", "validation 2")
H100 = P.Machine(0.9 * 85.0, "an H100", backend="cuda")  # what memory.available_gb read on the measured machine


def cat_toy_plan(config: str, machine: P.Machine = H100, overrides: dict | None = None) -> P.RunPlan:
    """The plan of a shipped config on the cat-toy photos, its models known by their variants (the
    jobs ran random weights in the real layouts and shapes)."""
    cfg = load_config(ROOT / config, overrides or {})
    cfg.resolve_model_defaults(cfg.validation_variant)
    samples = [Sample(Path(f"{i}.jpeg"), "sks", "toy", D.choose_bucket(w, h, cfg.resolutions), "0", (w, h))
               for i, (w, h) in enumerate(CAT_TOY)]
    val = P.Preset(cfg.validation_variant) if cfg.validation_repo else None
    return P.make_plan(cfg, P.Preset(cfg.training_variant), machine, samples=samples, validation_source=val)


def dev_int8_plan(machine: P.Machine = H100) -> P.RunPlan:
    """configs/dev-subject.yaml on a folder converted with --quantize int8 (transformer and text
    encoder stored int8), as scripts/job_benchmark.py writes it."""
    from mflux2.models import text_encoder as T

    cfg = load_config(ROOT / "configs/dev-subject.yaml", {})
    cfg.resolve_model_defaults("dev")
    samples = [Sample(Path(f"{i}.jpeg"), "sks", "toy", D.choose_bucket(w, h, cfg.resolutions), "0", (w, h))
               for i, (w, h) in enumerate(CAT_TOY)]
    f = P.weigh_models(cfg, P.Preset("dev"))
    f.stored = f.te_stored = "int8"
    f.te = {"int8": T.loaded_bytes("dev", "int8")}
    return P.make_plan(cfg, P.Preset("dev"), machine, samples=samples, facts=f)


# (raw JSON in docs/bench, the plan, the VAE's GroupNorm path that job ran: the fast one from 2026-12-07)
JOBS = [("h100-2026-12-05-s6-1-job-klein-4b", "klein-4b", False), ("h100-2026-12-05-s8-job-klein-4b", "klein-4b", False),
        ("h100-2026-12-05-s8-job-klein-9b", "klein-9b", False), ("h100-2026-12-07-s9-3-job-klein-4b", "klein-4b", True),
        ("h100-2026-12-07-s9-4-job-dev", "dev", True)]


@pytest.mark.parametrize("job,model,fast_group_norm", JOBS)
def test_every_phase_prediction_bounds_the_measured_job_within_10_percent(job, model, fast_group_norm):
    """Each phase's prediction is never below the measured peak and at most 10% above it, on every
    full-size job measured. Fitted terms: the text encoder's on klein-4b and dev (klein-9b out of
    sample), the rest on klein-4b (klein-9b and dev out of sample). (The first klein-4b job, run
    before the edit-training changes to the latent cache, measured that phase at 0.49 GB, 12% below
    the 0.56 GB both later jobs on that GroupNorm path measure: there it is only an upper bound.)"""
    from mflux2.ops.switches import using

    measured_job = json.loads((BENCH / f"{job}.json").read_text())
    with using(group_norm=fast_group_norm):
        plan = {"klein-4b": lambda: cat_toy_plan("configs/cat-toy.yaml"), "klein-9b": lambda: cat_toy_plan("configs/klein-9b-subject.yaml"),
                "dev": dev_int8_plan}[model]()
    assert plan.fits and not plan.problems
    for run in ("cold", "cached"):
        if run not in measured_job:
            continue
        peaks = measured_job[run]["phase_peak_gb"]
        for phase, names in MEASURED.items():
            measured = max((v for k, v in peaks.items() if (k in names or (k.startswith(names) and phase == "validation images"))
                            and not k.startswith(BEFORE_BOUNDED_SAMPLING)), default=0.0)
            if measured < 0.1:  # the cached run skips the encoders (s6: no validation phase but sampling): nothing to compare
                continue
            ratio = plan.phase(phase).gb / measured
            upper = 1.25 if (job, phase) == ("h100-2026-12-05-s6-1-job-klein-4b", "latent cache") else 1.10
            assert 1.0 <= ratio <= upper, (job, run, phase, plan.phase(phase).gb, measured)


def test_the_measured_jobs_decisions_are_the_plans():
    """klein-4b kept the distilled validation model beside training, klein-9b reloaded it each time."""
    k4, k9 = cat_toy_plan("configs/cat-toy.yaml"), cat_toy_plan("configs/klein-9b-subject.yaml")
    assert k4.keep_validation_model and not k9.keep_validation_model
    assert k4.transformer_quantization == k9.transformer_quantization == "bf16"
    assert k4.text_encoder_quantization == "bf16" and k9.text_encoder_quantization == "int8"


def _overrides(suggestion: str) -> dict:
    import yaml

    return {k: yaml.safe_load(v) for k, v in re.findall(r"--set (\S+?)=(\S+)", suggestion)}


@pytest.mark.parametrize("config,gb", [("configs/klein-9b-subject.yaml", 16), ("configs/klein-9b-subject.yaml", 24),
                                       ("configs/klein-9b-subject.yaml", 32), ("configs/dev-subject.yaml", 32),
                                       ("configs/dev-subject.yaml", 48), ("configs/cat-toy.yaml", 16)])
def test_every_suggestion_fits_when_replanned(config, gb):
    machine = P.mac(gb)
    plan = cat_toy_plan(config, machine)
    if plan.fits:
        assert not plan.suggestions
        return
    if (config, gb) == ("configs/klein-9b-subject.yaml", 24):
        assert plan.suggestions, plan.lines()
    for s in plan.suggestions:
        again = cat_toy_plan(config, machine, _overrides(s))
        assert again.fits, (s, again.lines())
        assert f"peak {again.peak_gb:.1f} " in s  # the figure printed is the re-planned one


def test_dop_every_n_steps_is_no_suggestion():
    """The peak is a DOP step's: running DOP less often does not lower it (dev-subject.yaml runs DOP
    every 8 steps)."""
    plan = cat_toy_plan("configs/dev-subject.yaml", P.mac(32))
    assert not plan.fits
    assert not any("every_n_steps" in s for s in plan.suggestions)
    assert len({p.name for p in plan.phases}) == len(plan.phases)  # one peak per phase, one plan


def test_auto_weighs_the_validation_phase_too():
    """klein-9b at 22.7 GB usable: the step alone fits in bf16, the validation phase (training plus
    distilled model) does not, so auto goes to a precision where every phase fits."""
    plan = cat_toy_plan("configs/klein-9b-subject.yaml", P.Machine(22.7, "22.7 GB"))
    assert plan.fits and plan.transformer_quantization != "bf16"
    assert all(p.gb <= 22.7 for p in plan.phases)


def test_mac_working_set():
    assert P.mac_working_set_gb(32) == pytest.approx(21.33, abs=0.01)
    assert P.mac_working_set_gb(64) == 48 and P.mac_working_set_gb(128) == 96


@pytest.mark.parametrize("gb", [32, 24])
def test_dry_run_memory_answers_for_a_mac_offline_in_seconds(gb, tmp_path):
    """`--dry-run --memory GB` on klein-9b with DOP, nothing downloaded: a plan whose every phase
    fits, or "does not fit" with suggestions; exit 0 either way."""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mflux2.training.cli", "configs/klein-9b-subject.yaml", "--dry-run",
                        "--memory", str(gb), "--output", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    verdict = r.stdout.split("== verdict", 1)[1]
    assert f"a Mac with {gb} GB of unified memory" in verdict
    if "does not fit" in verdict:
        fixes = [line.strip()[2:] for line in verdict.splitlines() if line.strip().startswith("- --set")]
        assert fixes, r.stdout
        for s in fixes:
            assert cat_toy_plan("configs/klein-9b-subject.yaml", P.mac(gb), _overrides(s)).fits, s
    else:
        assert ": fits" in verdict
    assert took <= 10, took


def test_dry_run_and_run_print_the_same_plan(tmp_path, capsys):
    from mflux2.training.cli import main
    from mflux2.training.trainer import Trainer

    data = tmp_path / "data"  # two of the quickstart's images: a short text cache
    data.mkdir()
    for f in sorted((ROOT / "data/toy/star").iterdir())[:4]:
        shutil.copy(f, data)
    args = ["configs/quickstart.yaml", "--output", str(tmp_path / "out"), "--max-steps", "1", "--dataset", str(data),
            "--set", "validation.prompts=[]", "--set", "checkpoints.save_every=0"]
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main([*args, "--dry-run"]) == 0
        printed = capsys.readouterr().out
        dry = printed.split("== plan\n", 1)[1].split("\n\n== disk", 1)[0].splitlines()
        from mflux2.training.cli import OVERRIDES  # noqa: F401 - the same overrides as the command line

        cfg = load_config(ROOT / "configs/quickstart.yaml", {"checkpoints.output": str(tmp_path / "out"), "training.max_steps": 1,
                                                            "dataset.path": str(data), "validation.prompts": [],
                                                            "checkpoints.save_every": 0})
        lines: list[str] = []
        Trainer(cfg, log=lines.append).run()
    finally:
        os.chdir(cwd)
    logged = [f"  {line}" for line in lines]
    start = next(i for i, line in enumerate(logged) if line.startswith("  plan for "))
    assert logged[start:start + len(dry)] == dry

    # a checkpoint the run could not continue (another LoRA rank): the dry run refuses it too
    os.chdir(ROOT)
    try:
        assert main([*args, "--rank", "8", "--dry-run"]) == 1
        assert "lora.rank" in capsys.readouterr().err
        assert main([*args, "--rank", "8", "--dry-run", "--no-resume"]) == 0
        capsys.readouterr()
    finally:
        os.chdir(cwd)


def _toy_with_text_width(tmp_path: Path, width: int) -> Path:
    model = tmp_path / "toy"
    shutil.copytree(ROOT / "models" / "toy", model)
    te = model / "text_encoder" / "config.json"
    c = json.loads(te.read_text())
    c["hidden_size"] = width
    te.write_text(json.dumps(c))
    return model


def test_a_text_encoder_that_cannot_take_the_precision_is_one_line_or_left_out(tmp_path, capsys):
    """Width 40: no group size divides it. Asked for int8, the dry run and the run refuse in one line
    naming the layer; auto leaves int8/int4 out with one warning."""
    from mflux2.training.trainer import Trainer, TrainingError

    model = _toy_with_text_width(tmp_path, 40)
    over = {"model.path": str(model), "model.quantization": "int8", "dataset.path": str(ROOT / "data/toy/star"),
            "checkpoints.output": str(tmp_path / "out")}
    cfg = load_config(ROOT / "configs/quickstart.yaml", over)
    from mflux2.training.preflight import preflight

    out: list[str] = []
    errs: list[str] = []
    assert preflight(cfg, out=out.append, err=errs.append) == 1
    assert len(errs) == 1 and "embed_tokens has width 40" in errs[0] and "model.quantization: bf16" in errs[0]
    with pytest.raises(TrainingError, match="embed_tokens has width 40"):
        Trainer(load_config(ROOT / "configs/quickstart.yaml", over), log=lambda *a: None).run()
    auto = apply_overrides(cfg, {"model.quantization": "auto"})
    auto.resolve_model_defaults("klein-base-4b")
    from mflux2.model_files import resolve_source

    plan = P.make_plan(auto, resolve_source(model), P.Machine(1.0, "1 GB"))
    assert plan.text_encoder_quantization == "bf16"
    assert sum("cannot be quantized" in c for c in plan.choices) == 2  # int8 and int4, one line each


def test_an_output_path_that_is_a_file_is_refused_by_the_dry_run_and_the_run(tmp_path, capsys):
    from mflux2.training.cli import main

    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["configs/quickstart.yaml", "--output", str(blocker), "--dry-run"]) == 1
        dry = capsys.readouterr()
        assert "is a file" in dry.err and "\n  - checkpoints.output" in dry.out
        assert main(["configs/quickstart.yaml", "--output", str(blocker / "sub")]) == 1
        assert "which is a file" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
    assert blocker.read_text() == "not a folder"


def test_each_problem_is_its_own_line(tmp_path, capsys):
    """A dataset error and a memory verdict are separate lines, never glued together."""
    from mflux2.training.preflight import preflight

    cfg = load_config(ROOT / "configs/quickstart.yaml", {"dataset.path": str(tmp_path / "missing"),
                                                         "checkpoints.output": str(tmp_path / "out")})
    out: list[str] = []
    rc = preflight(cfg, out=out.append, err=lambda s: None, memory_gb=None)
    text = "\n".join(out).split("== verdict", 1)[1]
    assert rc == 1
    problems = [line for line in text.splitlines() if line.startswith("  - ")]
    assert problems and all(";" not in p.split(":", 1)[0] for p in problems)


def test_the_plan_says_whether_mlx_runs_cuda_graphs(monkeypatch):
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "0")  # mflux2's default (set on import)
    assert "MLX on CUDA: graphs off (MLX_USE_CUDA_GRAPHS)" in cat_toy_plan("configs/cat-toy.yaml").lines()
    monkeypatch.setenv("MLX_USE_CUDA_GRAPHS", "1")
    assert "MLX on CUDA: graphs on (MLX_USE_CUDA_GRAPHS)" in cat_toy_plan("configs/cat-toy.yaml").lines()
    mac = P.mac(64)
    assert not any(line.startswith("MLX on CUDA") for line in cat_toy_plan("configs/cat-toy.yaml", mac).lines())
