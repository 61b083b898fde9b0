"""LoRA layers, target sets and LoRA files, checked against diffusers/PEFT (and mflux's key mapping)."""

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from mflux2.lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    freeze_for_lora,
    fuse_lora,
    load_lora,
    lora_disabled,
    lora_layers,
    lora_parameters,
    lora_weights,
    remove_lora,
    save_lora,
    set_lora_enabled,
    swapped_parameters,
)
from mflux2.lora_formats import FORMATS, convert_lora, read_lora
from mflux2.models.transformer import load_transformer
from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (test extra)")

ROOT = Path(__file__).resolve().parents[1]
D, M = 32, 96  # tiny model: hidden size, MLP hidden size (tests/test_transformer.py TINY)


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    make_reference(False).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    make_reference(True).save_pretrained(root / "transformer")
    return root


def fresh(root, **kw):
    return load_transformer(root, dtype=mx.float32, **kw)


def randomize(model, seed=0, a_scale=0.3, b_scale=0.2):
    """Non-zero A and B everywhere (B = 0 would hide every mapping bug)."""
    g = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_A = mx.array(g.standard_normal(layer.lora_A.shape).astype(np.float32) * a_scale)
        layer.lora_B = mx.array(g.standard_normal(layer.lora_B.shape).astype(np.float32) * b_scale)


def deltas(model):
    """{BFL module: dense delta} for a model with one LoRA per layer."""
    return {re.sub(r"(\.base)+$", "", p): np.array(m.delta()) for p, m in lora_layers(model)}


def out(model, inputs, guidance=None):
    return mlx_output(model, *inputs, guidance=guidance)


# ---------------------------------------------------------------------------------------------
# Layers and target sets


def test_target_sets(klein):
    expected = {
        "attention": {f"double_blocks.{i}.{s}_attn.{p}" for i in (0, 1) for s in ("img", "txt") for p in ("qkv", "proj")}
        | {f"single_blocks.{i}.linear{j}" for i in (0, 1) for j in (1, 2)},
    }
    expected["all"] = expected["attention"] | {f"double_blocks.{i}.{s}_mlp.{j}" for i in (0, 1) for s in ("img", "txt") for j in (0, 2)}
    expected["attention_output"], expected["attention_ffn"] = expected["attention"], expected["all"]
    for targets, want in expected.items():
        model = fresh(klein)
        assert set(apply_lora(model, rank=4, targets=targets)) == want, targets
        l1, l2 = model.single_blocks[0].linear1, model.single_blocks[0].linear2
        if targets in ("attention", "attention_output"):  # q/k/v rows of [q|k|v|gate|up], attn columns of [attn|mlp]
            assert (l1.out_start, l1.out_stop, l1.in_start, l1.in_stop) == (0, 3 * D, 0, D)
            assert (l2.out_start, l2.out_stop, l2.in_start, l2.in_stop) == (0, D, 0, D)
            assert l1.lora_B.shape == (3 * D, 4) and l2.lora_A.shape == (4, D)
        else:
            assert not l1.restricted and not l2.restricted
            assert l1.lora_B.shape == (3 * D + 2 * M, 4) and l2.lora_A.shape == (4, D + M)
    with pytest.raises(LoRAError, match="unknown LoRA target_layers 'qkv'; choose one of attention"):
        apply_lora(fresh(klein), rank=4, targets="qkv")
    model = fresh(klein)
    apply_lora(model, rank=4)
    with pytest.raises(LoRAError, match="already has a trainable LoRA"):
        apply_lora(model, rank=4)


def test_init_is_identity_and_only_lora_trains(klein):
    model = fresh(klein)
    inputs = make_inputs()
    base = out(model, inputs)
    paths = apply_lora(model, rank=8, alpha=16, targets="all", dropout=0.5)
    assert not any(m.training for _, m in lora_layers(model))  # eval model: no dropout at inference
    assert np.array_equal(out(model, inputs), base)  # B = 0
    layer = model.double_blocks[1].img_mlp[2]  # input width M
    a = np.array(layer.lora_A)
    assert layer.lora_A.dtype == layer.lora_B.dtype == mx.float32 and not np.array(layer.lora_B).any()
    assert np.abs(a).max() <= 1 / np.sqrt(M) and np.abs(a).max() > 0.8 / np.sqrt(M)  # PEFT kaiming bound 1/sqrt(in)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == {f"{p}.{k}" for p in paths for k in ("lora_A", "lora_B")}
    assert set(trainable) == {k for k, _ in tree_flatten(lora_parameters(model))}
    model.unfreeze()
    freeze_for_lora(model)
    assert len(tree_flatten(model.trainable_parameters())) == 2 * len(paths)

    # swapped_parameters (EMA weights for a save): in for the block, restored after
    from mlx.utils import tree_map

    ema = tree_map(lambda p: p + 0.1, model.trainable_parameters())
    with swapped_parameters(model, ema):
        assert rel_err(out(model, inputs), base) > 1e-2
        np.testing.assert_array_equal(np.array(lora_weights(model)["double_blocks.0.img_mlp.0"].B), np.float32(0.1))
    assert np.array_equal(out(model, inputs), base) and not np.array(model.double_blocks[0].img_mlp[0].lora_B).any()


def test_layer_math_ranges_dtype_dropout():
    g = np.random.default_rng(3)
    base = nn.Linear(12, 20, bias=True)
    base.weight = mx.array(g.standard_normal((20, 12)).astype(np.float32))
    lora = LoRALinear(base, rank=3, alpha=6, out_range=(4, 14), in_range=(2, 9), scale=0.5)
    lora.lora_B = mx.array(g.standard_normal((10, 3)).astype(np.float32))
    x = mx.array(g.standard_normal((2, 5, 12)).astype(np.float32))
    delta = np.zeros((20, 12), np.float32)
    delta[4:14, 2:9] = 0.5 * 2 * np.array(lora.lora_B) @ np.array(lora.lora_A)
    np.testing.assert_allclose(np.array(lora.delta()), delta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(lora(x)), np.array(base(x)) + np.array(x) @ delta.T, rtol=1e-5, atol=1e-5)

    # bf16 activations stay bf16; gradients reach the float32 factors
    base16 = nn.Linear(12, 20, bias=False)
    base16.weight = base.weight.astype(mx.bfloat16)
    l16 = LoRALinear(base16, rank=3)
    l16.lora_B = mx.ones((20, 3))
    l16.freeze()
    l16.unfreeze(recurse=False, keys=["lora_A", "lora_B"])
    y = l16(x.astype(mx.bfloat16))
    assert y.dtype == mx.bfloat16
    _, grads = nn.value_and_grad(l16, lambda m, v: (m(v).astype(mx.float32) ** 2).mean())(l16, x.astype(mx.bfloat16))
    assert {k for k, _ in tree_flatten(grads)} == {"lora_A", "lora_B"} and grads["lora_A"].dtype == mx.float32
    assert float(mx.abs(grads["lora_A"]).max()) > 0 and float(mx.abs(grads["lora_B"]).max()) > 0

    # dropout acts only in training mode
    drop = LoRALinear(base, rank=3, dropout=0.5)
    drop.lora_B = mx.ones((20, 3))
    drop.train()
    assert not np.allclose(np.array(drop(x)), np.array(drop(x)))
    drop.eval()
    np.testing.assert_allclose(np.array(drop(x)), np.array(base(x)) + np.array(x) @ np.array(drop.delta()).T, rtol=1e-5, atol=1e-5)


def test_disable_and_compile(klein):
    model = fresh(klein)
    inputs = [mx.array(a) for a in make_inputs()]
    base = model(*inputs)
    apply_lora(model, rank=4, targets="all")
    randomize(model)
    with_lora = model(*inputs)
    assert rel_err(with_lora, base) > 1e-2
    with lora_disabled(model):
        assert mx.array_equal(model(*inputs), base)
    assert mx.array_equal(model(*inputs), with_lora)
    set_lora_enabled(model, False)
    assert mx.array_equal(model(*inputs), base)
    set_lora_enabled(model, True)

    def prior_fn(*a):
        with lora_disabled(model):
            return model(*a)

    def both_fn(*a):  # the trainer's DOP shape: prior pass and LoRA pass in one compiled function
        with lora_disabled(model):
            p = model(*a)
        return p, model(*a)

    prior, main = mx.compile(prior_fn, inputs=model.state), mx.compile(model, inputs=model.state)
    both = mx.compile(both_fn, inputs=model.state)
    for _ in range(2):  # alternating calls keep their traced meaning
        assert rel_err(prior(*inputs), base) < 1e-6
        assert rel_err(main(*inputs), with_lora) < 1e-6
        p, q = both(*inputs)
        assert rel_err(p, base) < 1e-6 and rel_err(q, with_lora) < 1e-6


def test_fuse_stack_and_remove(klein, tmp_path):
    inputs = make_inputs()
    model = fresh(klein)
    base = out(model, inputs)
    w0 = np.array(model.double_blocks[0].img_attn.qkv.weight)
    apply_lora(model, rank=4, alpha=2, targets="all")
    randomize(model, seed=1)
    save_lora(tmp_path / "one.safetensors", model)
    single = out(model, inputs)
    d1 = np.array(model.double_blocks[0].img_attn.qkv.delta(with_scale=False))
    fuse_lora(model)
    assert not lora_layers(model) and type(model.single_blocks[0].linear1) is nn.Linear
    assert rel_err(out(model, inputs), single) <= 1e-5

    # two LoRAs stacked with their own scales: W + 0.5·Δ1 + 1.5·Δ2
    m2 = fresh(klein)
    apply_lora(m2, rank=3, targets="attention")
    randomize(m2, seed=2)
    save_lora(tmp_path / "two.safetensors", m2)
    d2 = np.array(m2.double_blocks[0].img_attn.qkv.delta(with_scale=False))
    m3 = fresh(klein)
    load_lora(m3, tmp_path / "one.safetensors", scale=0.5)
    load_lora(m3, tmp_path / "two.safetensors", scale=1.5)
    qkv = m3.double_blocks[0].img_attn.qkv
    assert isinstance(qkv.base, LoRALinear) and (qkv.scale, qkv.base.scale) == (1.5, 0.5)
    stacked = out(m3, inputs)
    fuse_lora(m3)
    np.testing.assert_allclose(np.array(m3.double_blocks[0].img_attn.qkv.weight), w0 + 0.5 * d1 + 1.5 * d2, rtol=1e-5, atol=1e-6)
    assert rel_err(out(m3, inputs), stacked) <= 1e-5

    m4 = fresh(klein)
    load_lora(m4, tmp_path / "one.safetensors", scale=0.5)
    load_lora(m4, tmp_path / "two.safetensors", scale=1.5)
    assert len(remove_lora(m4)) == 20
    assert not lora_layers(m4) and np.array_equal(out(m4, inputs), base)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_qlora_gradients_only_reach_lora(tmp_path, bits):
    root = tmp_path / "wide"
    make_reference(False, seed=3, num_attention_heads=4).save_pretrained(root / "transformer")  # widths divisible by 32
    model = fresh(root, quantize=bits, group_size=32)
    assert isinstance(model.single_blocks[0].linear1, nn.QuantizedLinear)
    inputs = [mx.array(a) for a in make_inputs()]
    base = model(*inputs)
    paths = apply_lora(model, rank=4, targets="all")
    randomize(model, seed=4, b_scale=0.05)
    assert isinstance(model.single_blocks[0].linear1.base, nn.QuantizedLinear)
    loss_and_grad = nn.value_and_grad(model, lambda m: (m(*inputs) ** 2).mean())
    loss, grads = loss_and_grad(model)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {f"{p}.{k}" for p in paths for k in ("lora_A", "lora_B")}
    assert all(float(mx.abs(g).max()) > 0 for g in flat.values())
    # fuse dequantises, adds Δ and requantises: the new weight is W + Δ up to one quantisation step
    for _, lyr in lora_layers(model):
        lyr.scale = 20.0  # a delta well above int4's step; the runtime scale is fused too
    layer = model.single_blocks[0].linear1
    q = layer.base
    w_plus_delta = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits) + layer.delta()
    with_lora = model(*inputs)
    fuse_lora(model)
    q = model.single_blocks[0].linear1
    assert isinstance(q, nn.QuantizedLinear) and q.bits == int(bits[3:])
    err = mx.abs(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits) - w_plus_delta)
    step = mx.repeat(mx.abs(q.scales), q.group_size, axis=1)  # MLX scales may be negative
    assert mx.all(err <= step + 1e-6).item()  # mlx's affine rounding error reaches ~1 step
    assert mx.abs(layer.delta()).max().item() > 5 * step.max().item()  # so a missing Δ would fail
    if bits == "int8":  # and the output moves to the LoRA output
        assert rel_err(model(*inputs), with_lora) < 0.25 * rel_err(base, with_lora)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("targets,alpha", [("attention", 8.0), ("all", 3.0)])
def test_round_trip(klein, tmp_path, fmt, targets, alpha):
    """save -> load in each format gives the same deltas (fused <-> split q/k/v) and the same output;
    trainable=True restores rank, alpha, targets and the factors themselves."""
    inputs = make_inputs()
    model = fresh(klein)
    apply_lora(model, rank=4, alpha=alpha, targets=targets)
    randomize(model, seed=5)
    want, want_out = deltas(model), out(model, inputs)
    original = {k: (np.array(w.A), np.array(w.B)) for k, w in lora_weights(model).items()}
    path = save_lora(tmp_path / f"lora_{fmt}.safetensors", model, format=fmt, metadata={"trigger_word": "sks"})
    keys = set(mx.load(str(path)))
    if fmt == "diffusers":
        assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in keys and not any(".qkv." in k for k in keys)
    loaded = fresh(klein)
    info = load_lora(loaded, path)
    assert (info.rank, info.alpha, info.targets) == (4, alpha, targets)
    got = deltas(loaded)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert rel_err(out(loaded, inputs), want_out) <= 1e-5  # alpha/rank = 0.75 is folded and unfolded: ~1 ulp

    resumed = fresh(klein)
    info = load_lora(resumed, path, trainable=True)
    assert (info.rank, info.alpha, info.targets) == (4, alpha, targets)
    l1 = resumed.single_blocks[0].linear1
    assert l1.restricted == (targets == "attention") and l1.trainable and l1.alpha == alpha
    resumed_w = lora_weights(resumed)
    for k, (a, b) in original.items():
        np.testing.assert_array_equal(np.array(resumed_w[k].A), a)
        np.testing.assert_allclose(np.array(resumed_w[k].B), b, rtol=1e-6, atol=0)  # B·s·(1/s) is exact to 1 ulp
    assert len(tree_flatten(resumed.trainable_parameters())) == len(tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------------------------------------
# diffusers (and PEFT) compatibility


def _pipeline(guidance: bool):
    transformer = make_reference(guidance)
    cls = diffusers.Flux2Pipeline if guidance else diffusers.Flux2KleinPipeline
    return cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
               transformer=transformer)


@pytest.mark.parametrize("variant,fmt,targets", [("klein", "bfl", "attention"), ("klein", "diffusers", "all"),
                                                 ("klein", "kohya", "all"), ("dev", "bfl", "all")])
def test_diffusers_loads_mflux2_lora(request, tmp_path, variant, fmt, targets):
    root = request.getfixturevalue(variant)
    guidance = np.array([3.5, 1.0], np.float32) if variant == "dev" else None
    inputs = make_inputs()
    model = fresh(root)
    base = out(model, inputs, guidance)
    apply_lora(model, rank=4, alpha=8, targets=targets)  # alpha != rank: the scale must survive the file
    randomize(model, seed=6)
    ours = out(model, inputs, guidance)
    assert rel_err(ours, base) > 1e-2
    path = save_lora(tmp_path / "lora.safetensors", model, format=fmt)
    pipe = _pipeline(variant == "dev")
    pipe.load_lora_weights(str(path))
    theirs = reference_output(pipe.transformer, *inputs, guidance=guidance)
    assert rel_err(ours, theirs) <= 1e-4


def _peft_lora(tmp_path):
    """A LoRA trained the diffusers way: PEFT on the split q/k/v (independent A's), alpha 6 != r 4,
    saved by Flux2KleinPipeline.save_lora_weights with its adapter metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = make_reference(False)
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=(
        r".*(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_out\.0|to_qkv_mlp_proj)"
        r"|single_transformer_blocks\.\d+\.attn\.to_out|ff\.linear_in|ff_context\.linear_out"
        r"|x_embedder|context_embedder|proj_out|norm_out\.linear|timestep_embedder\.linear_1|double_stream_modulation_img\.linear)$"))
    ref.add_adapter(config)
    diffusers.Flux2KleinPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                                   transformer_lora_adapter_metadata=config.to_dict())
    return ref, tmp_path / "pytorch_lora_weights.safetensors"


def test_peft_lora_loads_in_mflux2(klein, tmp_path):
    ref, path = _peft_lora(tmp_path)
    inputs = make_inputs()
    theirs = reference_output(ref, *inputs)
    assert rel_err(theirs, reference_output(make_reference(False), *inputs)) > 1e-2
    model = fresh(klein)
    info = load_lora(model, path)
    # per double block: qkv, proj ×2 streams, img mlp.0, txt mlp.2; per single: linear1/2; 6 global layers
    assert len(info.paths) == 2 * 6 + 2 * 2 + 6 and "final_layer.adaLN_modulation.1" in info.paths
    assert model.double_blocks[0].img_attn.qkv.rank == 12  # independent q/k/v A's -> stacked A, block-diagonal B
    assert rel_err(out(model, inputs), theirs) <= 1e-4  # also checks the [scale; shift] swap of norm_out

    # the same adapter under PEFT's own names (adapter name in the key, no prefix), alpha from metadata
    tensors, meta = mx.load(str(path), return_metadata=True)
    renamed = {re.sub(r"^transformer\.(.*)\.(lora_[AB])\.weight$", r"\1.\2.default.weight", k): v for k, v in tensors.items()}
    mx.save_safetensors(str(tmp_path / "peft_names.safetensors"), renamed, metadata=meta)
    other = fresh(klein)
    load_lora(other, tmp_path / "peft_names.safetensors")
    assert rel_err(out(other, inputs), theirs) <= 1e-4

    # and converted to each of our layouts (globals, block-diagonal qkv, PEFT alpha all carried over)
    for fmt in FORMATS:
        converted = convert_lora(path, tmp_path / f"to_{fmt}.safetensors", format=fmt)
        m = fresh(klein)
        load_lora(m, converted)
        assert rel_err(out(m, inputs), theirs) <= 1e-4, fmt


def test_kohya_sparse_qkv_matches_diffusers(klein, tmp_path):
    """musubi/kohya split-qkv LoRA: one fused module, down [3r, in], block-diagonal up [3D, 3r], alpha."""
    g = torch.Generator().manual_seed(7)
    r, alpha = 2, 3.0
    sd = {}
    for i in (0, 1):
        for s in ("img", "txt"):
            up = torch.zeros(3 * D, 3 * r)
            for j in range(3):
                up[j * D : (j + 1) * D, j * r : (j + 1) * r] = torch.randn(D, r, generator=g) * 0.3
            k = f"lora_unet_double_blocks_{i}_{s}_attn_qkv"
            sd.update({f"{k}.lora_down.weight": torch.randn(3 * r, D, generator=g) * 0.3, f"{k}.lora_up.weight": up,
                       f"{k}.alpha": torch.tensor(alpha)})
        k = f"lora_unet_single_blocks_{i}_linear2"
        sd.update({f"{k}.lora_down.weight": torch.randn(r, D + M, generator=g) * 0.3,
                   f"{k}.lora_up.weight": torch.randn(D, r, generator=g) * 0.3, f"{k}.alpha": torch.tensor(alpha)})
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    model = fresh(klein)
    load_lora(model, tmp_path / "kohya.safetensors")
    qkv = model.double_blocks[0].img_attn.qkv
    want = alpha / (3 * r) * sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].numpy() @ sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].numpy()
    np.testing.assert_allclose(np.array(qkv.delta()), want, rtol=1e-5, atol=1e-6)  # scale = alpha / rows of down
    pipe = _pipeline(False)
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    inputs = make_inputs()
    assert rel_err(out(model, inputs), reference_output(pipe.transformer, *inputs)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_lora_files(klein, tmp_path, dev):
    model = fresh(klein)
    apply_lora(model, rank=4)
    randomize(model)
    good = save_lora(tmp_path / "good.safetensors", model)
    tensors = dict(mx.load(str(good)))

    extra = dict(tensors, **{"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.bias": mx.zeros((4,)),
                             "text_encoder.layers.0.q_proj.lora_A.weight": mx.zeros((4, 8))})
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra)
    with pytest.raises(LoRAError, match=r"extra.safetensors: 2 key\(s\) not understood: diffusion_model.double_blocks.0.img_attn.qkv.lora_A.bias"):
        load_lora(fresh(klein), tmp_path / "extra.safetensors")
    lenient = fresh(klein)
    with pytest.warns(UserWarning, match="skipping 2 key.*text_encoder.layers.0.q_proj.lora_A.weight"):
        info = load_lora(lenient, tmp_path / "extra.safetensors", strict=False)
    assert len(info.paths) == 12

    # a LoRA made for a wider model: one line naming the layer and both shapes
    wide = dict(tensors)
    wide["diffusion_model.double_blocks.1.img_attn.proj.lora_A.weight"] = mx.zeros((4, 64))
    mx.save_safetensors(str(tmp_path / "wide.safetensors"), wide)
    with pytest.raises(LoRAError, match=r"shape mismatch for double_blocks.1.img_attn.proj: LoRA delta \(32, 64\), model layer \(32, 32\)"):
        load_lora(fresh(klein), tmp_path / "wide.safetensors")

    # dev's guidance embedder does not exist in klein
    dev_lora = {"diffusion_model.guidance_in.in_layer.lora_A.weight": mx.ones((2, 256)),
                "diffusion_model.guidance_in.in_layer.lora_B.weight": mx.ones((D, 2))}
    mx.save_safetensors(str(tmp_path / "dev.safetensors"), dict(tensors, **dev_lora))
    with pytest.raises(LoRAError, match=r"1 LoRA layer\(s\) absent from this model: guidance_in.in_layer"):
        load_lora(fresh(klein), tmp_path / "dev.safetensors")
    assert "guidance_in.in_layer" in load_lora(fresh(dev), tmp_path / "dev.safetensors").paths

    both = dict(tensors, **{"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": mx.ones((4, D)),
                            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": mx.ones((D, 4))})
    mx.save_safetensors(str(tmp_path / "both.safetensors"), both)
    with pytest.raises(LoRAError, match="double_blocks.0.img_attn.qkv has both a fused qkv LoRA and split q/k/v LoRAs"):
        load_lora(fresh(klein), tmp_path / "both.safetensors")

    lokr = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": mx.ones((2, 2))}
    mx.save_safetensors(str(tmp_path / "lokr.safetensors"), lokr)
    with pytest.raises(LoRAError, match="lokr.safetensors: module diffusion_model.double_blocks.0.img_attn.qkv: a LoKr layer needs lokr_w2"):
        load_lora(fresh(klein), tmp_path / "lokr.safetensors")

    half = {k: v for k, v in tensors.items() if not k.endswith("single_blocks.0.linear1.lora_B.weight")}
    mx.save_safetensors(str(tmp_path / "half.safetensors"), half)
    with pytest.raises(LoRAError, match="module diffusion_model.single_blocks.0.linear1 has no lora_B/lora_up tensor"):
        load_lora(fresh(klein), tmp_path / "half.safetensors")

    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoRAError, match="corrupt.safetensors: cannot read safetensors"):
        load_lora(fresh(klein), tmp_path / "corrupt.safetensors")
    with pytest.raises(LoRAError, match="no such LoRA file"):
        load_lora(fresh(klein), tmp_path / "nope.safetensors")
    with pytest.raises(LoRAError, match="no trainable LoRA layers"):
        save_lora(tmp_path / "x.safetensors", fresh(klein))


# ---------------------------------------------------------------------------------------------
# mflux compatibility

# mflux's FLUX.2 LoRA mapping (filipstrand/mflux src/mflux/models/flux2/weights/flux2_lora_mapping.py): the
# BFL-name patterns it lists for the transformer blocks, and its diffusers-name patterns ({block} = index).
MFLUX_PATTERNS = [
    "diffusion_model.double_blocks.{block}.img_attn.qkv.lora_[AB].weight",
    "diffusion_model.double_blocks.{block}.txt_attn.qkv.lora_[AB].weight",
    "diffusion_model.double_blocks.{block}.(img|txt)_attn.proj.lora_[AB].weight",
    "diffusion_model.double_blocks.{block}.(img|txt)_mlp.(0|2).lora_[AB].weight",
    "diffusion_model.single_blocks.{block}.linear(1|2).lora_[AB].weight",
    "transformer.transformer_blocks.{block}.attn.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out.0|to_add_out).lora_[AB].weight",
    "transformer.transformer_blocks.{block}.(ff|ff_context).(linear_in|linear_out).lora_[AB].weight",
    "transformer.single_transformer_blocks.{block}.attn.(to_qkv_mlp_proj|to_out).lora_[AB].weight",
    "lora_unet_double_blocks_{block}_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2).(lora_down.weight|lora_up.weight|alpha)",
    "lora_unet_single_blocks_{block}_linear(1|2).(lora_down.weight|lora_up.weight|alpha)",
]


def _mflux_apply(path):
    """Run mflux's own LoRA loader on a stand-in module tree with its FLUX.2 (diffusers) paths."""
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.flux2.weights.flux2_lora_mapping import Flux2LoRAMapping

    def attn(names):
        m = nn.Module()
        for n, (i, o) in names.items():
            setattr(m, n, nn.Linear(i, o, bias=False))
        return m

    tree = nn.Module()
    tree.transformer_blocks = []
    for _ in range(2):
        blk = nn.Module()
        blk.attn = attn({n: (D, D) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out")})
        blk.ff, blk.ff_context = attn({"linear_in": (D, 2 * M), "linear_out": (M, D)}), attn({"linear_in": (D, 2 * M), "linear_out": (M, D)})
        tree.transformer_blocks.append(blk)
    tree.single_transformer_blocks = []
    for _ in range(2):
        blk = nn.Module()
        blk.attn = attn({"to_qkv_mlp_proj": (D, 3 * D + 2 * M), "to_out": (D + M, D)})
        tree.single_transformer_blocks.append(blk)
    weights = dict(mx.load(str(path)))
    result = LoRALoader._apply_lora_with_mapping(tree, weights, 1.0, LoRALoader._build_pattern_mappings(Flux2LoRAMapping.get_mapping()), role=None)
    return tree, set(weights) - result[1]  # (applied, matched keys[, failed targets]) across mflux versions


@pytest.mark.parametrize("fmt", FORMATS)
def test_mflux_reads_our_files(klein, tmp_path, fmt):
    model = fresh(klein)
    apply_lora(model, rank=6, alpha=12, targets="all")  # rank % 3 == 0: older mflux split a fused qkv's A by rank
    randomize(model, seed=8)
    path = save_lora(tmp_path / "lora.safetensors", model, format=fmt)
    patterns = [re.compile("^" + p.replace(".", r"\.").replace("{block}", r"\d+") + "$") for p in MFLUX_PATTERNS]
    for key in mx.load(str(path)):
        assert any(p.match(key) for p in patterns), key
    pytest.importorskip("mflux.models.common.lora.mapping.lora_loader", reason="mflux not installed: key patterns checked only")
    tree, unmatched = _mflux_apply(path)
    assert not unmatched
    want = deltas(model)
    d_qkv = want["double_blocks.1.txt_attn.qkv"]
    for name, expected in [("transformer_blocks.1.attn.add_k_proj", d_qkv[D : 2 * D]), ("transformer_blocks.0.attn.to_out", want["double_blocks.0.img_attn.proj"]),
                           ("transformer_blocks.0.ff_context.linear_out", want["double_blocks.0.txt_mlp.2"]),
                           ("single_transformer_blocks.1.attn.to_qkv_mlp_proj", want["single_blocks.1.linear1"])]:
        layer = tree
        for part in name.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        got = layer.scale * np.array(layer.lora_A @ layer.lora_B).T  # mflux keeps A [in, r], B [r, out]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Files: metadata, atomic write, converter


def test_metadata_and_atomic_write(klein, tmp_path):
    model = fresh(klein)
    apply_lora(model, rank=4, alpha=2, targets="attention")
    randomize(model)
    path = save_lora(tmp_path / "sub" / "lora.safetensors", model, format="kohya", dtype=mx.bfloat16,
                     metadata={"base_model": "klein-4b", "trigger_word": "sks", "training_steps": 250})
    tensors, meta = mx.load(str(path), return_metadata=True)
    assert {k: meta[k] for k in ("rank", "alpha", "targets", "base_model", "trigger_word", "training_steps", "lora_format")} == {
        "rank": "4", "alpha": "2.0", "targets": "attention", "base_model": "klein-4b", "trigger_word": "sks",
        "training_steps": "250", "lora_format": "kohya"}
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype == mx.bfloat16
    assert float(tensors["lora_unet_single_blocks_1_linear2.alpha"].item()) == 2.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]  # no temp file left
    default = save_lora(tmp_path / "default.safetensors", model)
    assert mx.load(str(default), return_metadata=True)[1]["base_model"] == "custom"  # tiny model: no preset matches


def test_convert_script(klein, tmp_path):
    model = fresh(klein)
    apply_lora(model, rank=4, alpha=6, targets="all")
    randomize(model, seed=9)
    want = deltas(model)
    src = save_lora(tmp_path / "a.safetensors", model, format="kohya")
    chain = [("diffusers", "b"), ("bfl", "c"), ("kohya", "d")]
    prev = src
    for fmt, name in chain[:2]:
        prev = convert_lora(prev, tmp_path / f"{name}.safetensors", format=fmt)
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_lora.py"), str(prev), str(tmp_path / "d.safetensors"), "--format", "kohya"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "d.safetensors" in done.stdout
    for name in ("b", "c", "d"):
        weights, meta = read_lora(tmp_path / f"{name}.safetensors")
        assert set(weights) == set(want), name
        for k, w in weights.items():
            np.testing.assert_allclose(np.array(w.delta()), want[k], rtol=1e-5, atol=1e-7, err_msg=f"{name}:{k}")
    assert meta["alpha"] == "6.0" and "lora_unet_double_blocks_0_img_attn_qkv.alpha" in mx.load(str(tmp_path / "d.safetensors"))
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_lora.py"), str(tmp_path / "missing.safetensors"),
                          str(tmp_path / "e.safetensors")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no such LoRA file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
