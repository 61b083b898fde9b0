"""The peak-memory model against peaks measured on an H100, and the auto quantization choice."""

import json
from pathlib import Path
import os

import pytest

import mflux2.models.quantization as Q
import mflux2.training.memory as M
from mflux2.models.transformer import PRESETS, TransformerConfig
from mflux2.training.config import TrainConfig

# scripts/benchmark.py on one H100 (MLX 0.32.4, 2026-11-25, session 3; docs/performance.md), that
# session's defaults (MLX's command batches of 20 operations, int8 in groups of 64): variant, base,
# resolution, DOP, checkpoint every n, measured peak GB.
MEASURED = [
    ("klein-4b", "bf16", 512, False, 0, 12.334),
    ("klein-4b", "bf16", 512, True, 0, 16.942),
    ("klein-4b", "bf16", 1024, False, 0, 20.929),
    ("klein-9b", "bf16", 512, False, 0, 25.703),
    ("klein-4b", "int8", 512, False, 0, 9.521),
    ("klein-4b", "bf16", 512, False, 1, 9.207),
    ("klein-4b", "bf16", 1024, False, 1, 11.377),
    ("klein-4b", "int8", 512, False, 1, 7.072),
    ("klein-4b", "int4", 512, False, 1, 5.144),
    ("dev", "int8", 512, False, 1, 41.564),
]
# ... with synchronous checkpointed segments (--ahead 0)
MEASURED_SYNC = [("klein-4b", "bf16", 8.700), ("klein-4b", "int8", 5.862), ("klein-9b", "int8", 12.346)]
# Checkpointed, MLX's command batches of 4 operations (memory.limit_command_batches), int8 in groups of
# 128: one H200 (MLX 0.32.4, 2026-12-02, session 4): variant, base, synchronous segments, peak GB.
# (klein-9b and dev synchronous were measured with the limit's former 2% + 64 MB of slack.)
MEASURED_SMALL_BATCHES = [
    ("klein-4b", "bf16", False, 8.764),
    ("klein-4b", "int8", False, 5.148),
    ("klein-4b", "int8", True, 5.005),
    ("klein-9b", "int8", True, 11.111),
    ("dev", "int8", True, 37.018),
]


@pytest.mark.parametrize("variant,base,peak", MEASURED_SYNC)
def test_synchronous_estimate_within_15_percent_of_measured_peaks(variant, base, peak):
    est = M.estimate_peak_gb(variant, base, checkpointing=1, synchronous=True, small_batches=False)
    assert abs(est / peak - 1) <= 0.15, (est, peak)


@pytest.mark.parametrize("variant,base,synchronous,peak", MEASURED_SMALL_BATCHES)
def test_small_batch_estimate_within_15_percent_of_measured_peaks(variant, base, synchronous, peak):
    est = M.estimate_peak_gb(variant, base, checkpointing=1, synchronous=synchronous, small_batches=True)
    assert abs(est / peak - 1) <= 0.15, (est, peak)
    # ... and lower than with MLX's default batches
    assert est < M.estimate_peak_gb(variant, base, checkpointing=1, synchronous=synchronous, small_batches=False)


@pytest.mark.parametrize("variant,base,res,dop,every,peak", MEASURED)
def test_estimate_within_15_percent_of_measured_peaks(variant, base, res, dop, every, peak):
    est = M.estimate_peak_gb(variant, base, resolution=res, batch=1, rank=32, targets="attention", dop=dop,
                             checkpointing=every, small_batches=False)
    assert abs(est / peak - 1) <= 0.15, (est, peak)


def test_estimate_is_monotonic_in_what_costs_memory():
    e = M.estimate_peak_gb
    assert e("klein-4b", "int4") < e("klein-4b", "int8") < e("klein-4b", "bf16") < e("klein-9b", "bf16") < e("dev", "bf16")
    assert e("klein-4b", resolution=512) < e("klein-4b", resolution=768) < e("klein-4b", resolution=1024)
    assert e("klein-4b", checkpointing=1) < e("klein-4b") < e("klein-4b", dop=True) < e("klein-4b", batch=2, dop=True)
    assert e("klein-4b", rank=16) < e("klein-4b", rank=64) and e("klein-4b") < e("klein-4b", targets="all")
    # a sequence that is not a multiple of 128 tokens falls back to unfused attention: [B, H, N, N] scores
    assert e("klein-4b", resolution=784) > 1.5 * e("klein-4b", resolution=768)
    assert e(TransformerConfig(**vars(PRESETS["klein-4b"]))) == e("klein-4b")
    with pytest.raises(ValueError, match="nf4"):
        e("klein-4b", "nf4")


def test_weights_and_lora_counts_match_the_model():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mflux2.lora import apply_lora
    from mflux2.models.transformer import Flux2Transformer

    cfg = TransformerConfig(num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=64,
                            joint_attention_dim=40, in_channels=16, axes_dims_rope=(16,) * 4, guidance_embeds=True)
    model = Flux2Transformer(cfg)  # lazily initialised: shapes only
    assert M.weights_bytes(cfg, "bf16") == 2 * sum(v.size for _, v in tree_flatten(model.parameters()))
    for targets in ("attention", "all"):
        m = Flux2Transformer(cfg)
        apply_lora(m, rank=4, targets=targets)
        n = sum(v.size for _, v in tree_flatten(m.trainable_parameters()))
        assert M.lora_parameters(cfg, 4, targets) == n
    blk = model.single_blocks[0]
    blk.update(tree_map(lambda a: a.astype(mx.bfloat16), blk.parameters()))
    linears = sum(v.size for k, v in tree_flatten(blk.parameters()) if k.startswith("linear"))
    nn.quantize(blk, group_size=Q.QUANT_GROUP_SIZE["int8"], bits=8)
    q = sum(v.nbytes for k, v in tree_flatten(blk.parameters()) if k.startswith("linear"))
    assert q == linears * M.BYTES_PER_PARAM["int8"]


class Source:
    def __init__(self, variant=None, transformer=None):
        self.variant, self.transformer = variant, transformer


def train_config(**memory):
    cfg = TrainConfig()
    cfg.lora.target_layers = "attention"  # the figures below (the default is now Swift's "all")
    cfg.memory.bucketing.resolutions = [512, 768]
    cfg.memory.gradient_checkpointing = memory.get("checkpointing", False)
    cfg.loss.diff_output_preservation = memory.get("dop", False)
    return cfg


def plan(cfg, gb: float, facts=None):
    from mflux2.training import plan as P

    return P.make_plan(cfg, P.Preset("klein-4b"), P.Machine(gb, f"{gb} GB"), facts=facts, suggest=False)


def explicit(q: str, every: int, **memory):
    cfg = train_config(checkpointing=every, **memory)
    cfg.model.transformer_quantization = q
    return cfg


@pytest.mark.parametrize("dop", [False, True])
def test_auto_picks_the_most_precise_then_fastest_choice_whose_every_phase_fits(dop):
    """transformer_quantization auto = the first of bf16, bf16 + checkpointing, int8, ... (each with
    its segment mode) whose plan, made with that choice asked for explicitly, fits; checkpointing is
    turned on only when that choice needs it."""
    order = [(q, n) for q in ("bf16", "int8", "int4") for n in (0, 1)]
    seen = set()
    for gb in [x / 2 for x in range(12, 80)]:
        auto = plan(train_config(dop=dop), gb)
        fitting = [(q, n) for q, n in order if plan(explicit(q, n, dop=dop), gb).fits]
        if not fitting:
            assert not auto.fits and (auto.transformer_quantization, auto.checkpoint_every) == ("int4", 1)
            continue
        q, n = fitting[0]
        assert (auto.transformer_quantization, auto.checkpoint_every) == (q, n), gb
        assert auto.blockwise_ahead == plan(explicit(q, n, dop=dop), gb).blockwise_ahead
        assert auto.checkpointing_turned_on == bool(n) and auto.fits
        seen.add((q, n, auto.blockwise_ahead))
    assert len(seen) >= 5, seen  # the sweep crossed bf16, checkpointing, synchronous segments, int8 and int4


def test_a_plan_reads_an_unknown_architecture_from_the_folder():
    from mflux2.model_files import resolve_source
    from mflux2.training import plan as P

    cfg = train_config()
    cfg.resolve_model_defaults("klein-base-4b")
    p = P.make_plan(cfg, resolve_source(Path(__file__).resolve().parents[1] / "models" / "toy"), P.Machine(5.0, "5 GB"))
    assert p.model == "custom (klein-base)" and p.transformer_quantization == "bf16" and p.fits
    assert p.phase("text-encoder cache").gb < 1.0


def test_available_memory_is_positive():
    assert M.available_gb() > 0.1


def test_weights_bytes_counts_what_load_time_quantization_keeps(monkeypatch):
    """An int8 base quantizes the blocks and the large layers outside them, exactly as
    quantize_outside_blocks does (its size floor lowered so this tiny model has such layers)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from mflux2.models.transformer import Flux2Transformer

    monkeypatch.setattr(Q, "OUTSIDE_BLOCKS_MIN_WEIGHTS", 128 * 128)
    cfg = TransformerConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=64,
                            joint_attention_dim=128, in_channels=16, axes_dims_rope=(16,) * 4)
    model = Flux2Transformer(cfg)
    model.update(tree_map(lambda a: a.astype(mx.bfloat16), model.parameters()))
    for blk in model.double_blocks + model.single_blocks:
        g = Q.QUANT_GROUP_SIZE["int8"]
        nn.quantize(blk, class_predicate=Q.quantize_predicate(g, 8))
    Q.quantize_outside_blocks(model, 8, Q.QUANT_GROUP_SIZE["int8"])
    assert isinstance(model.txt_in, nn.QuantizedLinear) and not isinstance(model.img_in, nn.QuantizedLinear)
    actual = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert M.weights_bytes(cfg, "int8") == actual
    assert M.weights_bytes(cfg, "int8") < M.weights_bytes(cfg, "bf16")


def test_synchronous_segments_are_chosen_only_when_they_alone_fit():
    ahead = plan(explicit("bf16", 1), 1000).phase("training step").gb
    args = dict(resolution=768, batch=1, rank=32, targets="attention", checkpointing=1, small_batches=False)
    sync = ahead - M.estimate_peak_gb("klein-4b", **args) + M.estimate_peak_gb("klein-4b", synchronous=True, **args)
    assert sync < ahead - 0.5
    for gb, expect in ((ahead + 1, 1), ((ahead + sync) / 2, 0), (sync - 1, 1)):
        p = plan(explicit("bf16", 1), gb)
        assert p.blockwise_ahead == expect, gb
        assert ("one at a time" in "\n".join(p.lines())) == (expect == 0)
    assert plan(train_config(), 1000).blockwise_ahead == 1  # no checkpointing: nothing to choose


def test_text_encoder_auto_picks_the_most_precise_that_fits():
    """klein-4b's Qwen3-4B: bf16 6.2 GB, int8 3.3 GB + the bf16 embedding while it is quantized."""
    from mflux2.training import plan as P

    cfg = train_config()
    cfg.model.quantization = "auto"
    cfg.memory.gradient_checkpointing = 1
    cfg.model.transformer_quantization = "int4"
    f = P.weigh_models(cfg, P.Preset("klein-4b"))
    gb = {q: P._te_gb(f, q) for q in ("bf16", "int8", "int4")}
    assert gb["bf16"] > gb["int8"] > gb["int4"]
    for budget, expect in ((gb["bf16"] + 0.1, "bf16"), (gb["bf16"] - 0.1, "int8"), (gb["int8"] - 0.1, "int4"), (1.0, "int4")):
        p = plan(cfg, budget)
        assert p.text_encoder_quantization == expect, budget
        assert any(c.startswith(f"text encoder auto: {expect}") for c in p.choices)
        assert ("text-encoder cache" in {x.name for x in p.over}) == (budget == 1.0)
    assert TrainConfig().model.quantization == "int8"  # the default is the Swift trainer's; auto is asked for


def test_checkpointed_cuda_runs_use_small_command_batches(monkeypatch):
    """MLX_MAX_OPS_PER_BUFFER=4 for checkpointed runs on CUDA only, and never over the user's value."""
    import mflux2.ops.switches as switches

    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "")  # recorded, so the value the code sets is undone after
    monkeypatch.delenv("MLX_MAX_OPS_PER_BUFFER")
    lines = []
    monkeypatch.setattr(switches, "cuda_available", lambda: False)
    assert not M.limit_command_batches(1, log=lines.append) and "MLX_MAX_OPS_PER_BUFFER" not in os.environ
    monkeypatch.setattr(switches, "cuda_available", lambda: True)
    assert not M.limit_command_batches(0, log=lines.append) and "MLX_MAX_OPS_PER_BUFFER" not in os.environ
    assert M.limit_command_batches(1, log=lines.append)
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "4" and len(lines) == 1 and "4 operations" in lines[0]
    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "20")
    assert not M.limit_command_batches(1, log=lines.append) and os.environ["MLX_MAX_OPS_PER_BUFFER"] == "20"


@pytest.mark.parametrize("stored", ["int8", "int4", None])
def test_auto_on_a_converted_folder_chooses_only_its_stored_precision(stored):
    """A folder written by scripts/convert.py loads only as stored: auto keeps that precision even
    where bf16 would fit, and no suggestion asks for another precision of it."""
    from types import SimpleNamespace

    from mflux2.training import plan as P

    quant = {"name": stored, "bits": int(stored[3:])} if stored else None
    source = SimpleNamespace(variant="klein-4b", transformer=None, layout="mflux2", config={"transformer": {"quantization": quant}})
    want = stored or "bf16"
    assert M.stored_quantization(source) == want
    assert M.stored_quantization(Source("klein-4b")) is None  # other layouts load as anything
    cfg = train_config()
    f = P.weigh_models(cfg, P.Preset("klein-4b"))
    f.stored = want
    p = plan(cfg, 80.0, facts=f)
    assert p.transformer_quantization == want
    assert any(f"auto: {want} (as stored in the converted folder" in c for c in p.choices)
    small = P.make_plan(cfg, P.Preset("klein-4b"), P.Machine(1.0, "1 GB"), facts=f)
    assert not small.fits and not any("transformer_quantization" in s for s in small.suggestions)
