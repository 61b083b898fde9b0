"""The peak-memory model against peaks measured on an H100, and the auto quantization choice."""

import json
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


# klein-4b at 768² (estimates: bf16 15.8 GB; with checkpointing bf16 10.1 / synchronous 9.4, int8
# 7.7 / 6.5, int4 5.7 / 4.6): precision first, then checkpointing turned on, then synchronous segments.
@pytest.mark.parametrize("budget,expect,every,preset_every", [
    (80.0, "bf16", 0, False), (12.5, "bf16", 1, False), (10.0, "bf16", 1, False), (7.0, "int8", 1, False),
    (9.0, "int8", 1, True), (5.0, "int4", 1, True),
])
def test_choose_quantization_picks_the_most_precise_that_fits(monkeypatch, budget, expect, every, preset_every):
    monkeypatch.setattr(M, "available_gb", lambda: budget)
    lines = []
    cfg = train_config(checkpointing=preset_every)
    got = M.choose_quantization(cfg, Source("klein-4b"), log=lines.append)
    assert (got, cfg.memory.checkpoint_every) == (expect, every)
    est = M.estimate_peak_gb("klein-4b", got, resolution=768, batch=1, rank=32, checkpointing=every)
    if est > budget:  # fits only with the segments run synchronously, which run_ahead then picks
        est = M.estimate_peak_gb("klein-4b", got, resolution=768, batch=1, rank=32, checkpointing=every, synchronous=True)
        assert M.run_ahead(cfg, Source("klein-4b"), got, log=lambda *a: None) == 0
    assert f"auto: {expect}" in lines[0] and f"{est:.1f} GB of {budget:.1f} GB" in lines[0] and "768²" in lines[0]
    assert ("gradient_checkpointing turned on" in "\n".join(lines)) == (every == 1 and not preset_every)


def test_choose_quantization_turns_checkpointing_on_and_warns_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(M, "available_gb", lambda: 32.0)
    lines = []
    cfg = train_config(dop=True)
    assert M.choose_quantization(cfg, Source("dev"), log=lines.append) == "int4"  # dev + DOP at 768²: 30.9 GB
    assert cfg.memory.checkpoint_every == 1 and "DOP" in lines[0] and "turned on" in lines[1] and len(lines) == 2
    monkeypatch.setattr(M, "available_gb", lambda: 20.0)
    lines.clear()
    assert M.choose_quantization(train_config(dop=True), Source("dev"), log=lines.append) == "int4"
    assert lines[-1].startswith("warning: even int4 with checkpointing may not fit")


def test_choose_quantization_reads_an_unknown_architecture_from_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "available_gb", lambda: 1.0)
    cfg = TransformerConfig(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=64,
                            joint_attention_dim=32, axes_dims_rope=(16,) * 4)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel", **cfg.to_dict()}))
    lines = []
    assert M.choose_quantization(train_config(), Source(None, tmp_path / "transformer"), log=lines.append) == "bf16"
    assert "the transformer" in lines[0]
    with pytest.raises(ValueError, match="no variant and no transformer path"):
        M.choose_quantization(train_config(), Source(None, None), log=lines.append)


def test_available_memory_is_positive():
    assert M.available_gb() > 0.1


def test_check_fit_warns_with_options_when_the_run_does_not_fit(monkeypatch):
    from types import SimpleNamespace

    from mflux2.training import memory
    from mflux2.training.config import config_from_dict

    cfg = config_from_dict({"model": {"name": "klein-9b"}, "dataset": {"path": "x", "trigger_word": "sks"},
                            "loss": {"diff_output_preservation": True, "diff_output_preservation_class": "toy"},
                            "memory": {"bucketing": {"resolutions": [1024]}}})
    source = SimpleNamespace(variant="klein-9b", transformer=None, guidance_embeds=False)
    lines = []
    monkeypatch.setattr(memory, "available_gb", lambda: 12.0)
    est = memory.check_fit(cfg, source, "bf16", log=lines.append)
    assert est > 12.0 and len(lines) == 1
    msg = lines[0]
    for option in ("transformer_quantization: int8", "int4", "gradient_checkpointing", "resolutions: [512]", "DOP every n"):
        assert option in msg, option
    lines.clear()
    monkeypatch.setattr(memory, "available_gb", lambda: 1000.0)
    memory.check_fit(cfg, source, "bf16", log=lines.append)
    assert lines == []


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


def test_synchronous_segments_are_chosen_only_when_they_alone_fit(monkeypatch):
    cfg = train_config(checkpointing=True)
    args = dict(resolution=768, batch=1, rank=32, targets="attention", checkpointing=1)
    ahead = M.estimate_peak_gb("klein-4b", "bf16", **args)
    sync = M.estimate_peak_gb("klein-4b", "bf16", synchronous=True, **args)
    assert sync < ahead - 0.5
    for budget, expect in ((ahead + 1, 1), ((ahead + sync) / 2, 0), (sync - 1, 1)):
        monkeypatch.setattr(M, "available_gb", lambda: budget)
        lines = []
        assert M.run_ahead(cfg, Source("klein-4b"), "bf16", log=lines.append) == expect
        assert bool(lines) == (expect == 0) and (not lines or f"{sync:.1f} GB instead of {ahead:.1f} GB" in lines[0])
    # ... and auto quantization counts on it: bf16 stays the choice where only synchronous bf16 fits
    monkeypatch.setattr(M, "available_gb", lambda: (ahead + sync) / 2)
    assert M.choose_quantization(cfg, Source("klein-4b"), log=lambda *a: None) == "bf16"
    assert M.run_ahead(train_config(), Source("klein-4b"), "bf16", log=print) == 1  # no checkpointing: nothing to choose


def test_text_encoder_quantization_auto_picks_the_most_precise_that_fits(tmp_path, monkeypatch):
    import types

    import mlx.core as mx

    te = tmp_path / "text_encoder"
    te.mkdir()
    with open(te / "model.safetensors", "wb") as f:
        f.truncate(8 * 10**9)  # (sparse) 8 GB of bf16 weights: Qwen3-4B, klein-4b's text encoder
    from mflux2.pipeline import Flux2Pipeline

    pipe = types.SimpleNamespace(source=types.SimpleNamespace(text_encoder=te, layout="diffusers"), dtype=mx.bfloat16)
    pipe.loaded_bytes = types.MethodType(Flux2Pipeline.loaded_bytes, pipe)  # the pipeline's own size rule
    for budget, expect in ((16.0, "bf16"), (8.0, "int8"), (4.0, "int4"), (2.0, "int4")):
        monkeypatch.setattr(M, "available_gb", lambda: budget)
        lines = []
        assert M.choose_text_encoder_quantization(pipe, log=lines.append) == expect
        assert lines[0].startswith(f"text encoder quantization auto: {expect} — estimated")
        assert ("warning: even the int4 text encoder" in lines[-1]) == (budget == 2.0)
    pipe.source.layout = "mflux2"  # converted (maybe already quantized): loads as stored
    assert M.choose_text_encoder_quantization(pipe, log=lines.append) == "bf16" and "as stored" in lines[-1]
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
def test_auto_on_a_converted_folder_chooses_only_its_stored_precision(monkeypatch, stored):
    """A folder written by scripts/convert.py loads only as stored: auto keeps that precision (and
    estimates it) even where bf16 would fit, and the out-of-memory advice says to convert again."""
    from types import SimpleNamespace

    quant = {"name": stored, "bits": int(stored[3:])} if stored else None
    source = SimpleNamespace(variant="klein-4b", transformer=None, layout="mflux2", config={"transformer": {"quantization": quant}})
    want = stored or "bf16"
    assert M.stored_quantization(source) == want
    assert M.stored_quantization(Source("klein-4b")) is None  # other layouts load as anything
    monkeypatch.setattr(M, "available_gb", lambda: 80.0)
    lines = []
    cfg = train_config()
    assert M.choose_quantization(cfg, source, log=lines.append) == want
    est = M.estimate_peak_gb("klein-4b", want, resolution=768, batch=1, rank=32)
    assert f"auto: {want} (as stored in the converted folder" in lines[0] and f"{est:.1f} GB of 80.0 GB" in lines[0]
    assert [q for q in ("bf16", "int8", "int4") if f"{q} " in lines[0].split(";", 1)[1]] == [want]  # only it is estimated
    monkeypatch.setattr(M, "available_gb", lambda: 1.0)
    lines.clear()
    M.check_fit(cfg, source, want, log=lines.append)
    assert want == "int4" or "the model converted with --quantize int4" in lines[0]
