"""mflux2-lora (mflux2/lora_tools.py): merge, resize, extract, convert, info on tiny models."""

import json
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import save_file

from mflux2 import lora_tools
from mflux2.lora import apply_lora, load_lora, lora_layers, save_lora
from mflux2.lora_formats import DoRAWeights, LoHaWeights, LoKrWeights, LoRAError, LoRAWeights, read_lora, write_lora
from mflux2.model_files import save_component
from mflux2.models.transformer import Flux2Transformer, TransformerConfig, load_transformer
from mflux2.model_files import load_component
from mflux2.hub import ModelLoadError
from test_transformer import make_inputs, make_reference, mlx_output, reference_output, rel_err, to_bfl

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
EXTRA = ("img_in", "final_layer.adaLN_modulation.1")  # outside the target sets: the adaLN's halves swap in diffusers


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    make_reference(False).save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))  # copied as is
    return root


def fresh(root, **kw):
    return load_transformer(root, dtype=mx.float32, **kw)


def random_lora(root, path, seed, rank=4, alpha=8.0, targets="all", fmt="bfl", extra=EXTRA, metadata=None):
    """A LoRA file with non-zero A and B everywhere (+ the `extra` layers), written in `fmt`."""
    model = fresh(root)
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    g = np.random.default_rng(seed)
    weights = {}
    for p, m in lora_layers(model):
        a, b = m.full_factors()
        weights[p] = LoRAWeights(mx.array(g.standard_normal(a.shape).astype(np.float32) * 0.3),
                                 mx.array(g.standard_normal(b.shape).astype(np.float32) * 0.2), alpha)
    for name in extra:
        w = dict(model.named_modules())[name].weight
        weights[name] = LoRAWeights(mx.array(g.standard_normal((rank, w.shape[1])).astype(np.float32) * 0.3),
                                    mx.array(g.standard_normal((w.shape[0], rank)).astype(np.float32) * 0.2), alpha)
    return write_lora(path, weights, fmt, {"targets": targets, "base_model": "custom", **(metadata or {})})


def out(model, inputs):
    return mlx_output(model, *inputs)


# ---------------------------------------------------------------------------------------------
# merge


def test_merge_equals_loaded_loras_and_loads_in_diffusers(klein, tmp_path):
    inputs = make_inputs()
    a = random_lora(klein, tmp_path / "a.safetensors", seed=1, fmt="diffusers")
    b = random_lora(klein, tmp_path / "b.safetensors", seed=2, rank=3, alpha=1.5, targets="attention", fmt="kohya", extra=())
    ref = fresh(klein)
    base = out(ref, inputs)
    load_lora(ref, a, scale=0.7)
    load_lora(ref, b, scale=1.3)
    want = out(ref, inputs)
    assert rel_err(want, base) > 1e-2

    merged = lora_tools.merge(klein, tmp_path / "merged", [(str(a), 0.7), (str(b), 1.3)], quiet=True, log=lambda *_: None)
    assert (merged / "model_index.json").is_file() and (merged / "mflux2_merge.json").is_file()
    assert not list(tmp_path.glob(".merged.merging-*"))  # the temp folder was renamed
    ours = out(fresh(merged), inputs)
    assert rel_err(ours, want) <= 1e-4
    theirs = reference_output(diffusers.Flux2Transformer2DModel.from_pretrained(merged / "transformer").eval().float(), *inputs)
    assert rel_err(theirs, want) <= 1e-4
    # tensors no LoRA touches are copied bit for bit; the touched ones change
    src, dst = mx.load(str(klein / "transformer" / "diffusion_pytorch_model.safetensors")), \
        mx.load(str(merged / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert src.keys() == dst.keys()
    assert mx.array_equal(src["single_transformer_blocks.0.attn.norm_q.weight"], dst["single_transformer_blocks.0.attn.norm_q.weight"])
    assert not mx.array_equal(src["norm_out.linear.weight"], dst["norm_out.linear.weight"])

    # an existing output is never replaced without --force
    with pytest.raises(LoRAError, match="already exists"):
        lora_tools.merge(klein, merged, [(str(a), 1.0)], quiet=True, log=lambda *_: None)
    lora_tools.merge(klein, merged, [(str(a), 0.7), (str(b), 1.3)], force=True, quiet=True, log=lambda *_: None)
    assert rel_err(out(fresh(merged), inputs), want) <= 1e-4  # --force replaces an earlier merge
    with pytest.raises(LoRAError, match="not an earlier merge"):
        lora_tools.merge(klein, tmp_path, [(str(a), 1.0)], force=True, quiet=True, log=lambda *_: None)
    assert (tmp_path / "a.safetensors").is_file()  # left alone


def test_merge_dora_at_a_scale_equals_the_file_loaded_at_it(klein, tmp_path):
    """`merge --lora dora.safetensors:0.5` gives the model that load_lora(scale=0.5) runs at generation:
    the scale on B A inside DoRA's norm (PEFT's adapter scale), not 0.5 · ΔW_DoRA; scale 0 changes nothing."""
    inputs = make_inputs()
    model = fresh(klein)
    apply_lora(model, rank=4, alpha=8.0, targets="attention", type="dora")  # the single blocks' ranges too
    g = np.random.default_rng(5)
    for _, m in lora_layers(model):
        for k in m.param_names():
            noise = mx.array(g.standard_normal(m[k].shape).astype(np.float32))
            m[k] = m[k] * (1 + 0.2 * noise) if k == "magnitude" else noise * 0.3
    dora = save_lora(tmp_path / "dora.safetensors", model)  # bfl: ComfyUI's dora_scale, read against the base
    ref = fresh(klein)
    base = out(ref, inputs)
    load_lora(ref, dora, scale=0.5)
    want = out(ref, inputs)
    assert rel_err(want, base) > 1e-2

    merged = lora_tools.merge(klein, tmp_path / "m", [(str(dora), 0.5)], quiet=True, log=lambda *_: None)
    assert rel_err(out(fresh(merged), inputs), want) <= 1e-4
    zero = lora_tools.merge(klein, tmp_path / "z", [(str(dora), 0.0)], quiet=True, log=lambda *_: None)
    assert rel_err(out(fresh(zero), inputs), base) <= 1e-6


def test_merge_bfl_file_and_cli(klein, tmp_path):
    inputs = make_inputs()
    sd = diffusers.Flux2Transformer2DModel.from_pretrained(klein / "transformer").state_dict()
    bfl = tmp_path / "bfl"
    bfl.mkdir()
    save_file({f"model.diffusion_model.{k}": v for k, v in to_bfl(sd).items()}, str(bfl / "flux-2-tiny.safetensors"))
    (bfl / "ae.safetensors").write_bytes(b"not read")  # the other components are copied as they are
    a = random_lora(klein, tmp_path / "a.safetensors", seed=3)
    ref = fresh(klein)
    load_lora(ref, a, scale=0.5)
    done = subprocess.run([sys.executable, "-m", "mflux2.lora_tools", "merge", str(bfl), str(tmp_path / "m"), "--lora",
                           f"{a}:0.5", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m" / "ae.safetensors").read_bytes() == b"not read"
    assert "model.diffusion_model.img_in.weight" in mx.load(str(tmp_path / "m" / "flux-2-tiny.safetensors"))
    assert rel_err(out(fresh(tmp_path / "m" / "flux-2-tiny.safetensors"), inputs), out(ref, inputs)) <= 1e-4

    # a LoRA for another model: one line naming the layer, exit 1
    other = tmp_path / "other.safetensors"
    write_lora(other, {"double_blocks.0.img_attn.qkv": LoRAWeights(mx.ones((2, 64)), mx.ones((192, 2)), 2.0)})
    bad = subprocess.run([sys.executable, "-m", "mflux2.lora_tools", "merge", str(bfl), str(tmp_path / "n"), "--lora", str(other)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "shape mismatch for double_blocks.0.img_attn.qkv" in bad.stderr and not (tmp_path / "n").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Hidden size 128: wide enough for int8's groups (the 32-wide model is never quantised)."""
    root = tmp_path_factory.mktemp("wide")
    make_reference(False, attention_head_dim=64, axes_dims_rope=(16, 16, 16, 16)).save_pretrained(root / "transformer")
    return root


def _mflux2_folder(klein, folder: Path, quantize: str | None) -> Path:
    """An mflux2-layout transformer folder (scripts/convert.py's transformer part), optionally pre-quantised."""
    model = fresh(klein, quantize=quantize)
    save_component(model, folder / "transformer", model.config.to_dict())
    q = {"name": quantize, "bits": int(quantize[3:]), "group_size": 64} if quantize else None
    (folder / "mflux2.json").write_text(json.dumps({"format": "mflux2", "version": 1, "transformer": {"quantization": q}}))
    return folder


def _load_mflux2(folder: Path):
    cfg = json.loads((folder / "mflux2.json").read_text())
    config = TransformerConfig.from_dict(json.loads((folder / "transformer" / "config.json").read_text()))
    return load_component(Flux2Transformer(config), folder / "transformer", mx.float32, cfg["transformer"]["quantization"])


def test_merge_quantized_requantises_or_writes_dtype(wide, tmp_path):
    from mflux2.lora import fuse_lora

    inputs = make_inputs()
    src = _mflux2_folder(wide, tmp_path / "q", "int8")
    a = random_lora(wide, tmp_path / "a.safetensors", seed=4)
    # what mflux2 does in memory: the quantised model with the LoRA loaded, then fused (requantised)
    ref = _load_mflux2(src)
    load_lora(ref, a, scale=2.0)
    with_lora = out(ref, inputs)
    fuse_lora(ref)
    merged = lora_tools.merge(src, tmp_path / "m", [(str(a), 2.0)], quiet=True, log=lambda *_: None)
    got = _load_mflux2(merged)
    assert got.double_blocks[0].img_attn.qkv.bits == 8
    for (k, v), (k2, w) in zip(tree_flatten(got.parameters()), tree_flatten(ref.parameters())):
        assert k == k2 and mx.allclose(v, w, atol=1e-6).item(), k  # the same requantisation as fuse_lora
    assert rel_err(out(got, inputs), with_lora) < 0.05  # int8 rounding on top of the LoRA's output
    assert json.loads((merged / "mflux2.json").read_text())["transformer"]["merged_loras"][0]["scale"] == 2.0

    # --dtype float32: dequantised, W + Δ exactly, recorded as unquantised
    full = lora_tools.merge(src, tmp_path / "f", [(str(a), 2.0)], dtype="float32", quiet=True, log=lambda *_: None)
    assert json.loads((full / "mflux2.json").read_text())["transformer"]["quantization"] is None
    plain = _load_mflux2(full)
    assert rel_err(out(plain, inputs), with_lora) <= 1e-4


# ---------------------------------------------------------------------------------------------
# resize, convert --type lora, low_rank


def best_rank(d, r):
    u, s, vt = np.linalg.svd(np.asarray(d, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], float((s[:r] ** 2).sum() / (s ** 2).sum())


def test_resize_full_and_lower_rank(klein, tmp_path, capsys):
    src = random_lora(klein, tmp_path / "a.safetensors", seed=5, rank=6, alpha=3.0, metadata={"trigger_word": "sks"})
    weights, _ = read_lora(src)
    full = lora_tools.resize(src, tmp_path / "full.safetensors", rank=6, quiet=True)
    low = lora_tools.resize(src, tmp_path / "low.safetensors", rank=2, quiet=True)
    printed = capsys.readouterr().out
    got_full, meta = read_lora(full)
    got_low, _ = read_lora(low)
    assert meta["trigger_word"] == "sks" and meta["rank"] == "6" and meta["resized_from"] == "lora rank 6"
    for name, w in weights.items():
        d = np.array(w.delta())
        np.testing.assert_allclose(np.array(got_full[name].delta()), d, rtol=1e-4, atol=1e-5 * np.abs(d).max(), err_msg=name)
        want, energy = best_rank(d, 2)
        assert got_low[name].rank == 2
        assert rel_err(np.array(got_low[name].delta()), want) <= 1e-4, name
        assert f"{name}: rank 2, energy {energy:.6f}" in printed
    assert "retained energy mean" in printed

    # --energy: per-layer ranks, each the smallest keeping the share
    e = lora_tools.resize(src, tmp_path / "e.safetensors", energy=0.9, quiet=True)
    for name, w in read_lora(e)[0].items():
        s = np.linalg.svd(np.array(weights[name].delta()), compute_uv=False) ** 2
        c = np.cumsum(s) / s.sum()
        assert c[w.rank - 1] >= 0.9 - 1e-9 and (w.rank == 1 or c[w.rank - 2] < 0.9), name


def test_low_rank_of_every_adapter_type():
    g = np.random.default_rng(0)
    r = lambda *s: mx.array(g.standard_normal(s).astype(np.float32))  # noqa: E731
    base = r(12, 10)
    adapters = {
        "lora": LoRAWeights(r(3, 10), r(12, 3), 6.0),
        "dora": DoRAWeights(r(3, 10), r(12, 3), 3.0, magnitude=mx.abs(r(12)) + 0.5),
        "lokr": LoKrWeights(w1=r(3, 2), w2_a=r(4, 2), w2_b=r(2, 5), alpha=1.0),
        "loha": LoHaWeights(r(12, 2), r(2, 10), r(12, 2), r(2, 10), 4.0),
    }
    for kind, w in adapters.items():
        d = np.array(w.delta(base))
        for rank in (2, 5, 10):
            approx, energy, got = lora_tools.low_rank(d, rank)
            want, want_energy = best_rank(d, rank)
            assert got == rank and approx.rank == rank
            assert rel_err(np.array(approx.delta()), want) <= 1e-4, (kind, rank)
            assert abs(energy - want_energy) < 1e-6
        assert lora_tools.low_rank(d, 10)[1] == pytest.approx(1.0)
    # a rank above min(out, in) is padded with zeros: the asked rank, the exact delta
    approx, energy, got = lora_tools.low_rank(np.array(adapters["lokr"].delta()), 16)
    assert approx.A.shape == (16, 10) and energy == pytest.approx(1.0)


def test_convert_other_types_to_lora(klein, tmp_path, monkeypatch):
    """A LoKr (+ a LoRA layer) read from a file becomes LoRA by SVD; the LoRA layer is kept exact."""
    g = np.random.default_rng(1)
    r = lambda *s: mx.array(g.standard_normal(s).astype(np.float32))  # noqa: E731
    lokr = LoKrWeights(w1=r(4, 2), w2_a=r(24, 3), w2_b=r(3, 16), alpha=1.5)  # [96, 32]: img_attn.qkv of the tiny model
    plain = LoRAWeights(r(2, 32), r(32, 2), 2.0)
    fake = {"double_blocks.0.img_attn.qkv": lokr, "double_blocks.0.img_attn.proj": plain}
    src = write_lora(tmp_path / "in.safetensors", fake, "kohya", {"trigger_word": "x"})
    with pytest.raises(LoRAError, match="give --rank R or --energy E"):
        lora_tools.convert(src, tmp_path / "o.safetensors", type="lora", quiet=True)
    out_path = lora_tools.convert(src, tmp_path / "o.safetensors", format="kohya", type="lora", rank=4,
                                  dtype="float32", quiet=True, log=lambda *_: None)
    got, meta = read_lora(out_path)
    assert meta["converted_from"] == "lokr+lora" and meta["trigger_word"] == "x"
    want, _ = best_rank(np.array(lokr.delta()), 4)
    assert rel_err(np.array(got["double_blocks.0.img_attn.qkv"].delta()), want) <= 1e-4
    np.testing.assert_allclose(np.array(got["double_blocks.0.img_attn.proj"].delta()), np.array(plain.delta()), rtol=1e-5, atol=1e-6)


def test_convert_cli_and_script(klein, tmp_path):
    src = random_lora(klein, tmp_path / "a.safetensors", seed=6, fmt="kohya")
    want = {k: np.array(w.delta()) for k, w in read_lora(src)[0].items()}
    for args in (["-m", "mflux2.lora_tools", "convert", str(src), str(tmp_path / "b.safetensors"), "--format", "diffusers",
                  "--type", "lora"],
                 [str(ROOT / "scripts" / "convert_lora.py"), str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors")]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
    for name in ("b", "c"):
        got = read_lora(tmp_path / f"{name}.safetensors")[0]
        for k, d in want.items():
            np.testing.assert_allclose(np.array(got[k].delta()), d, rtol=1e-5, atol=1e-7, err_msg=f"{name}:{k}")


# ---------------------------------------------------------------------------------------------
# extract


def test_extract_recovers_a_planted_low_rank_difference(klein, tmp_path, capsys):
    ref = diffusers.Flux2Transformer2DModel.from_pretrained(klein / "transformer")
    g = torch.Generator().manual_seed(0)
    planted = {}  # BFL module -> ΔW in BFL orientation
    with torch.no_grad():
        for dname, bfl in (("transformer_blocks.0.ff.linear_in", "double_blocks.0.img_mlp.0"),
                           ("single_transformer_blocks.1.attn.to_out", "single_blocks.1.linear2")):
            w = ref.get_submodule(dname).weight
            d = torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.05
            w += d
            planted[bfl] = d.numpy()
        # a change of the q rows only: the extracted layer is the fused qkv
        q = ref.get_submodule("transformer_blocks.1.attn.to_q").weight
        dq = torch.randn(q.shape[0], 2, generator=g) @ torch.randn(2, q.shape[1], generator=g) * 0.05
        q += dq
        planted["double_blocks.1.img_attn.qkv"] = np.concatenate([dq.numpy(), np.zeros((2 * q.shape[0], q.shape[1]), np.float32)])
    ref.save_pretrained(tmp_path / "tuned" / "transformer")
    path = lora_tools.extract(klein, tmp_path / "tuned", tmp_path / "x.safetensors", rank=3, quiet=True)
    printed = capsys.readouterr().out
    got, meta = read_lora(path)
    assert set(got) == set(planted)  # unchanged layers are left out
    for name, d in planted.items():
        assert got[name].rank == 3
        assert rel_err(np.array(got[name].delta()), d) <= 1e-4, name
        assert f"{name}: rank 3, energy 1.000000" in printed
    assert meta["base_model"] == str(klein) and meta["extracted_rank"] == "3" and meta["rank"] == "3"
    assert "3 changed layer(s)" in printed
    # and the extracted LoRA on the base model gives the tuned model's output
    inputs = make_inputs()
    model = fresh(klein)
    load_lora(model, path)
    assert rel_err(out(model, inputs), out(fresh(tmp_path / "tuned"), inputs)) <= 1e-4
    with pytest.raises(LoRAError, match="nothing to extract"):
        lora_tools.extract(klein, klein, tmp_path / "y.safetensors", rank=2, quiet=True)
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        lora_tools.extract(klein, tmp_path / "nope" / "x", tmp_path / "y.safetensors", rank=2, quiet=True)


# ---------------------------------------------------------------------------------------------
# info


def test_info(klein, tmp_path):
    model = fresh(klein)
    apply_lora(model, rank=4, alpha=2.0, targets="attention")
    path = save_lora(tmp_path / "a.safetensors", model, metadata={"trigger_word": "sks", "training_steps": "250"})
    lines = []
    facts = lora_tools.info(path, log=lines.append)
    assert facts["type"] == "lora" and facts["rank"] == "4" and facts["alpha"].startswith("2.0")
    assert facts["layout"] == "bfl" and facts["layers"] == 12 and facts["file_dtype"] == "F32"
    assert facts["targets"]["double_blocks.img_attn.qkv"] == "2 (blocks 0-1)"
    assert facts["targets"]["single_blocks.linear2"] == "2 (blocks 0-1)"
    assert facts["training"] == {"base_model": "custom", "trigger_word": "sks", "training_steps": "250", "targets": "attention"}
    assert facts["parameters"] == sum(v.size for v in mx.load(str(path)).values())
    assert any(line.startswith("training") and "trigger_word=sks" in line for line in lines)
    for fmt in ("diffusers", "kohya"):
        p = save_lora(tmp_path / f"{fmt}.safetensors", model, format=fmt)
        assert lora_tools.info(p, log=lambda *_: None)["layout"] == fmt
    # a full-matrix LoKr file: its type, scale 1 (both halves whole: no alpha counts)
    lokr = tmp_path / "lokr.safetensors"
    mx.save_safetensors(str(lokr), {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": mx.ones((4, 2)),
                                    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": mx.ones((24, 16))})
    facts = lora_tools.info(lokr, log=lambda *_: None)
    assert facts["type"] == "lokr" and facts["layout"] == "kohya" and "note" not in facts
    assert facts["alpha"] == "none (scale 1)"
    # a file mflux2 cannot read (a LoKr half missing): the type from its keys, with the reason
    mx.save_safetensors(str(lokr), {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": mx.ones((4, 2))})
    facts = lora_tools.info(lokr, log=lambda *_: None)
    assert facts["type"] == "lokr" and "note" in facts
    done = subprocess.run([sys.executable, "-m", "mflux2.lora_tools", "info", str(tmp_path / "missing.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and "no such LoRA file" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_merged_model_folder_loads_in_the_pipeline(tmp_path):
    """A whole model folder (tests/tiny_flux2.py, diffusers layout): the merged copy is what
    Flux2Pipeline.from_pretrained (mflux2-generate, the trainer) opens, with the LoRA baked in."""
    from mflux2.pipeline import Flux2Pipeline
    from tests.tiny_flux2 import build_tiny_klein

    model = build_tiny_klein(tmp_path / "model")
    a = random_lora(model, tmp_path / "a.safetensors", seed=8, targets="attention", extra=())
    merged = lora_tools.merge(model, tmp_path / "merged", [(str(a), 1.0)], quiet=True, log=lambda *_: None)
    src, dst = Flux2Pipeline.from_pretrained(model, dtype=mx.float32), Flux2Pipeline.from_pretrained(merged, dtype=mx.float32)
    assert (dst.source.layout, dst.family) == (src.source.layout, src.family) == ("diffusers", "klein-base")
    for sub in ("vae", "text_encoder", "tokenizer"):  # the other components are the same files
        for f in (model / sub).iterdir():
            assert (merged / sub / f.name).read_bytes() == f.read_bytes(), f
    inputs = make_inputs(in_ch=128, ctx=24)
    base, ours = out(src.transformer, inputs), out(dst.transformer, inputs)
    src.load_lora(a)
    assert rel_err(ours, base) > 1e-2 and rel_err(ours, out(src.transformer, inputs)) <= 1e-4


def test_merge_and_resize_other_types_in_memory(klein, tmp_path, monkeypatch):
    """DoRA (its delta reads the base: fused q/k/v from diffusers' split ones), LoKr and LoHa, as
    lora_formats will return them from files: merge writes W + ΔW(W), resize needs --base for DoRA."""
    g = np.random.default_rng(2)
    r = lambda *s: mx.array(g.standard_normal(s).astype(np.float32) * 0.3)  # noqa: E731
    base = fresh(klein)
    w_qkv = base.double_blocks[0].img_attn.qkv.weight  # [96, 32]
    fake = {
        "double_blocks.0.img_attn.qkv": DoRAWeights(r(3, 32), r(96, 3), 3.0, magnitude=mx.linalg.norm(w_qkv, axis=1) * 1.1),
        "single_blocks.1.linear1": LoKrWeights(w1=r(4, 2), w2_a=r(72, 2), w2_b=r(2, 16), alpha=2.0),  # [288, 32]
        "final_layer.adaLN_modulation.1": LoHaWeights(r(64, 2), r(2, 32), r(64, 2), r(2, 32), 4.0),  # swapped halves in diffusers
    }
    dense = dict(base.named_modules())
    # DoRA at scale 0.5: the scale on B A inside the norm (as load_lora(scale=0.5) computes it), the others 0.5 · ΔW
    at_half = {n: replace(w, B=w.B * 0.5) if isinstance(w, DoRAWeights) else w for n, w in fake.items()}
    want = {n: np.array(dense[n].weight) + (1.0 if isinstance(w, DoRAWeights) else 0.5) * np.array(w.delta(dense[n].weight))
            for n, w in at_half.items()}
    # the bfl layout holds DoRA in ComfyUI's form, relative to the base weights: written and read with them
    src = write_lora(tmp_path / "fake.safetensors", fake, "bfl", base={n: dense[n].weight for n in fake})
    merged = lora_tools.merge(klein, tmp_path / "m", [(src, 0.5)], quiet=True, log=lambda *_: None)
    got = dict(fresh(merged).named_modules())
    for n, w in want.items():
        np.testing.assert_allclose(np.array(got[n].weight), w, rtol=1e-5, atol=1e-5, err_msg=n)
    np.testing.assert_array_equal(np.array(got["double_blocks.1.img_attn.qkv"].weight), np.array(dense["double_blocks.1.img_attn.qkv"].weight))

    with pytest.raises(LoRAError, match="base"):
        lora_tools.resize(src, tmp_path / "r.safetensors", rank=2, quiet=True)
    lora_tools.resize(src, tmp_path / "r.safetensors", rank=2, base=str(klein), quiet=True, log=lambda *_: None)
    resized, _ = read_lora(tmp_path / "r.safetensors")
    for n, w in fake.items():
        best, _ = best_rank(np.array(w.delta(dense[n].weight)), 2)
        assert rel_err(np.array(resized[n].delta()), best) <= 1e-4, n
