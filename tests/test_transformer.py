"""Parity of mflux2's FLUX.2 transformer with diffusers' Flux2Transformer2DModel, in both weight layouts."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mflux2.models.transformer import (
    PRESETS,
    Flux2Transformer,
    TransformerConfig,
    count_parameters,
    load_transformer,
)
from mflux2.weights import WeightsError

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=24, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
)


def make_reference(guidance_embeds: bool, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    model = diffusers.Flux2Transformer2DModel(out_channels=cfg["in_channels"], guidance_embeds=guidance_embeds,
                                              axes_dims_rope=list(cfg["axes_dims_rope"]), **{k: v for k, v in cfg.items() if k != "axes_dims_rope"})
    with torch.no_grad():  # random everywhere: zero-initialised layers would hide mapping bugs
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval().float()


def to_bfl(sd: dict) -> dict:
    """diffusers -> BFL keys, written independently from the mapping in docs/architecture.md
    ("Weight layouts"), not from mflux2."""
    out = {}
    simple = {
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "proj_out": "final_layer.linear",
    }
    for k, v in sd.items():
        mod, _, leaf = k.rpartition(".")
        if mod in simple:
            out[f"{simple[mod]}.{leaf}"] = v
        elif mod == "norm_out.linear":
            scale, shift = v.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for i in range(n_double):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[q + "img_attn.qkv.weight"] = torch.cat([sd[p + f"attn.to_{x}.weight"] for x in "qkv"])
        out[q + "txt_attn.qkv.weight"] = torch.cat([sd[p + f"attn.add_{x}_proj.weight"] for x in "qkv"])
        out[q + "img_attn.norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "img_attn.norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
        out[q + "txt_attn.norm.query_norm.scale"] = sd[p + "attn.norm_added_q.weight"]
        out[q + "txt_attn.norm.key_norm.scale"] = sd[p + "attn.norm_added_k.weight"]
        out[q + "img_attn.proj.weight"] = sd[p + "attn.to_out.0.weight"]
        out[q + "txt_attn.proj.weight"] = sd[p + "attn.to_add_out.weight"]
        out[q + "img_mlp.0.weight"] = sd[p + "ff.linear_in.weight"]
        out[q + "img_mlp.2.weight"] = sd[p + "ff.linear_out.weight"]
        out[q + "txt_mlp.0.weight"] = sd[p + "ff_context.linear_in.weight"]
        out[q + "txt_mlp.2.weight"] = sd[p + "ff_context.linear_out.weight"]
    for i in range(n_single):
        p, q = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out[q + "linear1.weight"] = sd[p + "to_qkv_mlp_proj.weight"]
        out[q + "linear2.weight"] = sd[p + "to_out.weight"]
        out[q + "norm.query_norm.scale"] = sd[p + "norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "norm_k.weight"]
    assert len(out) == len(sd) - 4 * n_double  # 6 split q/k/v weights became 2 fused ones
    return {k: v.contiguous() for k, v in out.items()}


def make_inputs(batch=2, h=3, w=5, n_txt=7, in_ch=16, ctx=24, seed=1):
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, h * w, in_ch)).astype(np.float32)
    ctx_ = g.standard_normal((batch, n_txt, ctx)).astype(np.float32)
    t = g.uniform(0.05, 0.95, batch).astype(np.float32)
    img_ids = np.array([(0, r, c, 0) for r in range(h) for c in range(w)], np.float32)
    txt_ids = np.array([(0, 0, 0, l) for l in range(n_txt)], np.float32)
    return x, ctx_, t, img_ids, txt_ids


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def reference_output(model, x, ctx, t, img_ids, txt_ids, guidance=None):
    with torch.no_grad():
        kw = dict(guidance=torch.tensor(guidance)) if guidance is not None else {}
        return model(torch.tensor(x), torch.tensor(ctx), torch.tensor(t), torch.tensor(img_ids), torch.tensor(txt_ids),
                     return_dict=False, **kw)[0].numpy()


def mlx_output(model, x, ctx, t, img_ids, txt_ids, guidance=None):
    g = mx.array(guidance) if guidance is not None else None
    out = model(mx.array(x), mx.array(ctx), mx.array(t), mx.array(img_ids), mx.array(txt_ids), g)
    return np.array(out.astype(mx.float32))


@pytest.fixture(scope="module", params=[False, True], ids=["klein", "dev"])
def saved(request, tmp_path_factory):
    guidance = request.param
    ref = make_reference(guidance)
    root = tmp_path_factory.mktemp("dev" if guidance else "klein")
    ref.save_pretrained(root / "model" / "transformer")
    save_file(to_bfl(ref.state_dict()), str(root / "flux-2-tiny.safetensors"))
    return ref, root, guidance


@pytest.mark.parametrize("layout", ["diffusers", "diffusers_model_folder", "bfl", "bfl_prefixed"])
def test_parity_float32(saved, layout, tmp_path):
    ref, root, guidance = saved
    if layout == "diffusers":
        path = root / "model" / "transformer"
    elif layout == "diffusers_model_folder":
        path = root / "model"
    elif layout == "bfl":
        path = root / "flux-2-tiny.safetensors"
    else:
        sd = mx.load(str(root / "flux-2-tiny.safetensors"))
        mx.save_safetensors(str(tmp_path / "prefixed.safetensors"), {f"model.diffusion_model.{k}": v for k, v in sd.items()})
        path = tmp_path / "prefixed.safetensors"
    model = load_transformer(path, dtype=mx.float32)
    assert model.config.guidance_embeds == guidance
    inputs = make_inputs()
    g = np.array([3.5, 1.0], np.float32) if guidance else None
    want = reference_output(ref, *inputs, guidance=g)
    got = mlx_output(model, *inputs, guidance=g)
    assert got.shape == want.shape == (2, 15, 16)
    assert np.abs(want).max() > 1e-2  # a meaningful signal, not zeros
    assert rel_err(got, want) <= 1e-4


def test_parity_batched_ids_and_nonsquare(saved):
    """Ids with a batch dim, a 5x2 grid, non-trivial t-axis ids (reference-image style t=10)."""
    ref, root, guidance = saved
    model = load_transformer(root / "model", dtype=mx.float32)
    x, ctx, t, _, txt_ids = make_inputs(batch=1, h=5, w=2, n_txt=4, seed=5)
    img_ids = np.array([(10, r, c, 0) for r in range(5) for c in range(2)], np.float32)
    g = np.array([2.0], np.float32) if guidance else None
    want = reference_output(ref, x, ctx, t, img_ids, txt_ids, guidance=g)
    got = mlx_output(model, x, ctx, t, img_ids[None], txt_ids[None], guidance=g)
    assert rel_err(got, want) <= 1e-4


def test_bf16_close_to_float32(saved):
    ref, root, guidance = saved
    m32 = load_transformer(root / "model", dtype=mx.float32)
    m16 = load_transformer(root / "model", dtype=mx.bfloat16)
    assert m16.img_in.weight.dtype == mx.bfloat16
    x, ctx, _, img_ids, txt_ids = make_inputs()
    t = np.array([0.5, 0.75], np.float32)  # exact in bf16: the timestep is quantised to the activation dtype
    g = np.array([3.5, 1.0], np.float32) if guidance else None
    a = mlx_output(m32, x, ctx, t, img_ids, txt_ids, g)
    out16 = m16(mx.array(x, mx.bfloat16), mx.array(ctx, mx.bfloat16), mx.array(t), mx.array(img_ids), mx.array(txt_ids),
                mx.array(g) if g is not None else None)
    assert out16.dtype == mx.bfloat16
    # bf16 has an 8-bit mantissa; through 4 blocks the stated bound is 5% of the output range.
    assert rel_err(np.array(out16.astype(mx.float32)), a) <= 5e-2


def test_dev_requires_guidance(saved):
    ref, root, guidance = saved
    if not guidance:
        pytest.skip("klein ignores guidance")
    model = load_transformer(root / "model", dtype=mx.float32)
    with pytest.raises(ValueError, match="guidance"):
        mlx_output(model, *make_inputs())


def test_sharded_diffusers_folder(saved, tmp_path):
    ref, root, guidance = saved
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    model = load_transformer(tmp_path, dtype=mx.float32)
    inputs = make_inputs()
    g = np.array([3.5, 1.0], np.float32) if guidance else None
    assert rel_err(mlx_output(model, *inputs, g), reference_output(ref, *inputs, guidance=g)) <= 1e-4


def test_preset_parameter_counts():
    expected = {"klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248, "dev": 32_223_281_152,
                "klein-base-4b": 3_875_544_576, "klein-base-9b": 9_078_581_248}
    for name, count in expected.items():
        model = Flux2Transformer(PRESETS[name])  # lazy: arrays are never materialised
        assert count_parameters(model) == count, name
    assert mx.get_active_memory() < 1e9


def test_bfl_architecture_inferred_from_shapes(saved):
    ref, root, guidance = saved
    model = load_transformer(root / "flux-2-tiny.safetensors", dtype=mx.float32)
    c = model.config
    assert (c.num_layers, c.num_single_layers, c.num_attention_heads, c.attention_head_dim) == (2, 2, 2, 16)
    assert (c.joint_attention_dim, c.in_channels, c.mlp_ratio, c.axes_dims_rope) == (24, 16, 3.0, (4, 4, 4, 4))


def test_variant_mismatch_is_an_error(saved):
    ref, root, guidance = saved
    with pytest.raises(WeightsError, match="variant 'klein-4b'"):
        load_transformer(root / "flux-2-tiny.safetensors", variant="klein-4b")


def test_missing_unexpected_and_misshaped_keys(saved, tmp_path):
    ref, root, guidance = saved
    sd = dict(mx.load(str(root / "flux-2-tiny.safetensors")))
    broken = dict(sd)
    del broken["single_blocks.1.linear2.weight"]
    mx.save_safetensors(str(tmp_path / "missing.safetensors"), broken)
    with pytest.raises(WeightsError, match=r"missing.safetensors: missing key\(s\) single_blocks.1.linear2.weight"):
        load_transformer(tmp_path / "missing.safetensors")
    extra = dict(sd, **{"double_blocks.0.img_attn.qkv.bias": mx.zeros((96,))})
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra)
    with pytest.raises(WeightsError, match=r"unexpected key\(s\) double_blocks.0.img_attn.qkv.bias"):
        load_transformer(tmp_path / "extra.safetensors")
    bad = dict(sd, **{"single_blocks.0.linear2.weight": mx.zeros((32, 10))})
    mx.save_safetensors(str(tmp_path / "shape.safetensors"), bad)
    with pytest.raises(WeightsError, match="shape mismatch for single_blocks.0.linear2.weight"):
        load_transformer(tmp_path / "shape.safetensors")


def test_corrupt_and_absent_files(tmp_path):
    f = tmp_path / "flux.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="flux.safetensors: cannot read safetensors"):
        load_transformer(f)
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no 'transformer/' folder"):
        load_transformer(tmp_path / "empty")


def test_missing_shard_is_reported(saved, tmp_path):
    ref, root, guidance = saved
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="20KB")
    index = json.loads((tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "transformer" / victim).unlink()
    with pytest.raises(WeightsError, match="shard\\(s\\) missing: " + victim):
        load_transformer(tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_load(saved, bits):
    ref, root, guidance = saved
    cfg = TransformerConfig(**{**TINY, "num_attention_heads": 4, "guidance_embeds": guidance})
    assert cfg.hidden_size == 64
    # quantisation needs widths divisible by the group size: use a wider tiny model
    ref64 = make_reference(guidance, seed=3, num_attention_heads=4)
    path = root / f"wide-{bits}"
    ref64.save_pretrained(path / "transformer")
    model = load_transformer(path, dtype=mx.float32, quantize=bits, group_size=32)
    import mlx.nn as nn

    assert isinstance(model.double_blocks[0].img_attn.qkv, nn.QuantizedLinear)
    assert isinstance(model.single_blocks[1].linear2, nn.QuantizedLinear)
    inputs = make_inputs()
    g = np.array([3.5, 1.0], np.float32) if guidance else None
    err = rel_err(mlx_output(model, *inputs, g), reference_output(ref64, *inputs, guidance=g))
    assert err <= (0.03 if bits == "int8" else 0.3)


def test_quantized_load_also_quantizes_the_large_layers_outside_the_blocks(saved, monkeypatch):
    import mlx.nn as nn

    import mflux2.models.quantization as qmod

    ref, root, guidance = saved
    path = root / "wide-top"
    ref64 = make_reference(guidance, seed=3, num_attention_heads=4, joint_attention_dim=64)
    ref64.save_pretrained(path / "transformer")
    plain = load_transformer(path, dtype=mx.float32, quantize="int8", group_size=32)
    assert isinstance(plain.txt_in, nn.Linear) and not isinstance(plain.txt_in, nn.QuantizedLinear)  # tiny: below the size floor
    monkeypatch.setattr(qmod, "OUTSIDE_BLOCKS_MIN_WEIGHTS", 0)
    model = load_transformer(path, dtype=mx.float32, quantize="int8", group_size=32)
    for layer in (model.txt_in, model.double_stream_modulation_img.lin, model.single_stream_modulation.lin,
                  model.final_layer.adaLN_modulation[1], model.time_in.out_layer):
        assert isinstance(layer, nn.QuantizedLinear)
    assert model.dtype == mx.float32
    inputs = make_inputs(ctx=64)
    g = np.array([3.5, 1.0], np.float32) if guidance else None
    assert rel_err(mlx_output(model, *inputs, g), reference_output(ref64, *inputs, guidance=g)) <= 0.08  # every layer int8 at width 64


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_keeps_exact_gradients(saved, every):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    ref, root, guidance = saved
    model = load_transformer(root / "model", dtype=mx.float32)
    model.freeze()
    for blk in model.double_blocks + model.single_blocks:  # a few trainable params in every block
        (blk.img_attn.proj if hasattr(blk, "img_attn") else blk.linear2).unfreeze()
    x, ctx, t, img_ids, txt_ids = (mx.array(a) for a in make_inputs())
    g = mx.array([3.5, 1.0]) if guidance else None

    def loss(m):
        return (m(x, ctx, t, img_ids, txt_ids, g) ** 2).mean()

    grad_fn = nn.value_and_grad(model, loss)
    l0, g0 = grad_fn(model)
    model.set_gradient_checkpointing(every)
    l1, g1 = grad_fn(model)
    f0, f1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert f0.keys() == f1.keys() and len(f0) == 4
    for k in f0:
        assert float(mx.abs(f0[k]).max()) > 0, k  # mx.checkpoint on a module would drop these
        assert np.allclose(np.array(f0[k]), np.array(f1[k]), rtol=1e-5, atol=1e-7), k
    assert abs(float(l0) - float(l1)) < 1e-6


def test_int8_layers_use_groups_of_128_where_the_width_allows_else_64():
    import mlx.nn as nn

    from mflux2.models.quantization import QUANT_GROUP_SIZE, layer_group_size, quantize_predicate

    assert QUANT_GROUP_SIZE == {"int8": 128, "int4": 64}
    assert [layer_group_size(n, 128) for n in (3072, 9216, 192, 96)] == [128, 128, 64, None]
    pred = quantize_predicate(128, 8)
    assert pred("a", nn.Linear(256, 8)) == {"group_size": 128, "bits": 8, "mode": "affine"}
    assert pred("b", nn.Linear(192, 8))["group_size"] == 64 and pred("c", nn.Linear(96, 8)) is False
    assert pred("d", nn.RMSNorm(256)) is False


def test_rope_per_stream_equals_rope_on_the_joint_tokens(monkeypatch):
    """With ops.norm_rope's CUDA kernels (switch "norm_rope") the double blocks rotate each stream's
    q/k on its part of the tables before joining them; here (no CUDA) norm_rope runs rms_norm + RoPE,
    so the per-stream order itself is checked against the joint one, float32."""
    import mflux2.models.transformer as T
    mx.random.seed(0)
    model = T.Flux2Transformer(T.TransformerConfig(num_layers=2, num_single_layers=2, num_attention_heads=2,
                                                   attention_head_dim=64, joint_attention_dim=24, in_channels=16,
                                                   axes_dims_rope=(16, 16, 16, 16)))
    mx.eval(model.parameters())
    x, ctx = mx.random.normal((2, 12, model.config.in_channels)), mx.random.normal((2, 5, model.config.joint_attention_dim))
    ids = mx.random.randint(0, 6, (12, 4)).astype(mx.float32)
    tids = mx.random.randint(0, 6, (5, 4)).astype(mx.float32)
    joint = model(x, ctx, mx.array([0.3, 0.7]), ids, tids)
    calls = []
    monkeypatch.setattr(T, "norm_rope_fused", lambda *a, **k: calls.append(a) or True)
    split = model(x, ctx, mx.array([0.3, 0.7]), ids, tids)
    assert calls
    np.testing.assert_allclose(np.array(split), np.array(joint), rtol=1e-5, atol=1e-5 * float(mx.abs(joint).max()))
