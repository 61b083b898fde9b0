"""FLUX.2 VAE: parity with diffusers.AutoencoderKLFlux2 (both weight layouts), the pipeline's
latent patchify + batch-norm math, loader errors, tiling, and the PIL helpers."""

import copy
import re
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

torch.manual_seed(0)
diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402

from mflux2 import ops  # noqa: E402
from mflux2.ops import conv as ops_conv  # noqa: E402
from mflux2.images import array_to_pil, arrays_to_pils, open_rgb, pil_to_array, pils_to_array, to_rgb  # noqa: E402
from mflux2.models.vae import Flux2VAE, VAEConfig, _tiled, image_ids, load_vae  # noqa: E402
from mflux2.weights import WeightsError  # noqa: E402

TOL = 1e-4
H, W = 48, 80  # non-square, 3x5 tokens


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nhwc(t):
    return mx.array(t.permute(0, 2, 3, 1).contiguous().numpy())


def nchw(a):
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


def make_torch_vae(**cfg):
    m = AutoencoderKLFlux2(layers_per_block=1, latent_channels=32, **cfg).eval()
    with torch.no_grad():  # randomise everything the default init leaves at 0/1
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        m.bn.running_mean.copy_(0.5 * torch.randn(128))
        m.bn.running_var.copy_(10 ** (4 * torch.rand(128) - 3.5))  # 3e-4..3: small enough that eps 1e-4 matters
    return m


def to_bfl(sd, n_levels):
    """diffusers state dict -> BFL ae.safetensors keys (the table in docs/vae.md, "Weights"), written
    independently of the loader."""
    out = {}
    for k, v in sd.items():
        if k.startswith("quant_conv."):
            k = "encoder." + k
        if k.startswith("post_quant_conv."):
            k = "decoder." + k
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for d, b in attn.items():
            if f"mid_block.attentions.0.{d}." in k:
                k = k.replace(f"mid_block.attentions.0.{d}.", f"mid.attn_1.{b}.")
                if b != "norm" and k.endswith(".weight"):
                    v = v[:, :, None, None]  # BFL stores them as 1x1 convs
        out[k] = v.contiguous()
    return out


def save_bfl(m, path):
    sd = to_bfl(m.state_dict(), len(m.config.block_out_channels))
    # the BFL direction is pinned: up.0 is the full-resolution level (no upsample), up.3 the lowest
    assert "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert "bn.num_batches_tracked" in sd  # must be ignored by the loader
    save_file(sd, str(path))


CFG_A = dict(block_out_channels=(16, 32, 48, 48), norm_num_groups=8)  # diffusers folder
CFG_B = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=32)  # BFL file (BFL hard-codes 32 groups)
CFG_C = dict(block_out_channels=(32, 64, 64, 64), decoder_block_out_channels=(32, 32, 32, 64), norm_num_groups=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    a, b, c = make_torch_vae(**CFG_A), make_torch_vae(**CFG_B), make_torch_vae(**CFG_C)
    a.save_pretrained(root / "model_a" / "vae")  # model folder holding vae/
    (root / "model_b").mkdir()
    save_bfl(b, root / "model_b" / "ae.safetensors")  # BFL model folder: ae.safetensors at the root ...
    save_file({"img_in.weight": torch.randn(4, 4)}, str(root / "model_b" / "flux-2-tiny.safetensors"))  # ... beside the DiT
    c.save_pretrained(root / "small_diffusers")
    save_bfl(c, root / "small_bfl.safetensors")
    return SimpleNamespace(root=root, a=a, b=b, c=c)


def reference_tokens(tvae, images):
    """The pipeline's own path: encode (argmax) -> _patchify_latents -> BN -> _pack_latents."""
    fake = SimpleNamespace(vae=tvae, _patchify_latents=Flux2Pipeline._patchify_latents)
    with torch.no_grad():
        lat = Flux2Pipeline._encode_vae_image(fake, images, generator=None)
    return Flux2Pipeline._pack_latents(lat), Flux2Pipeline._prepare_latent_ids(lat)


def reference_decode(tvae, tokens, ids):
    """The pipeline's decode path: _unpack_latents_with_ids -> BN inverse -> _unpatchify_latents -> vae.decode."""
    with torch.no_grad():
        lat = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)
        mean = tvae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(tvae.bn.running_var.view(1, -1, 1, 1) + tvae.config.batch_norm_eps)
        lat = Flux2Pipeline._unpatchify_latents(lat * std + mean)
        return tvae.decode(lat, return_dict=False)[0]


def check_parity(vae, tvae):
    images = torch.rand(2, 3, H, W) * 2 - 1
    with torch.no_grad():
        ref_lat = tvae.encode(images).latent_dist.mode()
        z = torch.randn(2, 32, H // 8, W // 8)
        ref_img = tvae.decode(z).sample
    lat = vae.encode(nhwc(images))
    assert lat.shape == (2, H // 8, W // 8, 32)
    assert rel(nchw(lat), ref_lat) <= TOL
    assert rel(nchw(vae.decode(nhwc(z))), ref_img) <= TOL

    # image -> packed, normalised tokens: against the pipeline's _encode_vae_image + _pack_latents
    ref_tokens, ref_ids = reference_tokens(tvae, images)
    tokens = vae.pack(lat)
    assert tokens.shape == (2, (H // 16) * (W // 16), 128) and tokens.dtype == mx.float32
    assert rel(tokens, ref_tokens) <= TOL
    np.testing.assert_array_equal(np.array(image_ids(H, W, batch=2)), ref_ids.numpy())
    # tokens -> image: against the pipeline's unpack/BN-inverse/unpatchify/decode
    assert rel(nchw(vae.decode(vae.unpack(tokens, H, W))), reference_decode(tvae, ref_tokens, ref_ids)) <= TOL
    rand_tokens = torch.randn(2, 15, 128)
    assert rel(nchw(vae.decode(vae.unpack(mx.array(rand_tokens.numpy()), H, W))), reference_decode(tvae, rand_tokens, ref_ids)) <= TOL
    # unpack is the exact inverse of pack
    np.testing.assert_allclose(np.array(vae.unpack(tokens, H, W)), np.array(lat), rtol=1e-5, atol=1e-5)


# the convolutions and GroupNorm each have a fast path and a fallback (mflux2/ops/conv.py): every
# combination must match diffusers
PATHS = [dict(conv_gemm=c, group_norm=g) for c in (True, False) for g in (True, False)]


@pytest.mark.parametrize("paths", PATHS, ids=lambda p: "-".join(k if v else f"no_{k}" for k, v in p.items()))
def test_parity_on_every_op_path(models, paths):
    vae = load_vae(models.root / "model_a", dtype=mx.float32)
    with ops.using(**paths):
        check_parity(vae, models.a)


def test_diffusers_layout_parity(models):
    vae = load_vae(models.root / "model_a", dtype=mx.float32)
    assert vae.config.norm_num_groups == 8 and vae.config.block_out_channels == (16, 32, 48, 48)
    check_parity(vae, models.a)
    for path in (models.root / "model_a" / "vae", models.root / "model_a" / "vae" / "diffusion_pytorch_model.safetensors"):
        assert load_vae(path, dtype=mx.float32).config == vae.config  # the vae/ folder, the file (config beside it)


def test_bfl_layout_parity(models):
    vae = load_vae(models.root / "model_b", dtype=mx.float32)  # picks ae.safetensors, not the DiT file
    assert vae.config == VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1)
    check_parity(vae, models.b)
    same = load_vae(models.root / "model_b" / "ae.safetensors", dtype=mx.float32)
    assert mx.array_equal(same.decoder.up[0].block[0].conv1.weight, vae.decoder.up[0].block[0].conv1.weight)


@pytest.mark.parametrize("name", ["small_diffusers", "small_bfl.safetensors"])
def test_small_decoder_detected(models, name):
    vae = load_vae(models.root / name, dtype=mx.float32)
    assert vae.config.decoder_block_out_channels == (32, 32, 32, 64)
    assert vae.config.block_out_channels == (32, 64, 64, 64)
    z = torch.randn(1, 32, 4, 6)
    with torch.no_grad():
        ref = models.c.decode(z).sample
    assert rel(nchw(vae.decode(nhwc(z))), ref) <= TOL


def test_bf16_load(models):
    vae = load_vae(models.root / "model_a")  # default bf16
    assert vae.dtype == mx.bfloat16 and vae.decoder.up[0].block[0].conv1.weight.dtype == mx.bfloat16
    assert vae.bn.running_mean.dtype == mx.float32 and vae.bn.running_var.dtype == mx.float32
    vae.set_dtype(mx.bfloat16)  # must not touch the BN statistics either
    assert vae.bn.running_var.dtype == mx.float32
    np.testing.assert_array_equal(np.array(vae.bn.running_var), models.a.bn.running_var.numpy())
    images = torch.rand(1, 3, H, W) * 2 - 1
    ref_tokens, _ = reference_tokens(models.a, images)
    lat = vae.encode(nhwc(images))
    assert lat.dtype == mx.bfloat16
    tokens = vae.pack(lat)
    assert tokens.dtype == mx.float32
    # bf16: loose bounds on the relative L2 error (measured ~0.8% for tokens, ~3% for decode)
    assert rel_l2(tokens, ref_tokens) <= 2e-2
    # decode: compare with diffusers' own bf16 error on the same latents; MLX must not be much worse
    z = torch.randn(1, 32, H // 8, W // 8)
    with torch.no_grad():
        ref = models.a.decode(z).sample
        torch_bf16 = copy.deepcopy(models.a).to(torch.bfloat16).decode(z.bfloat16()).sample.float()
    torch_err = rel_l2(torch_bf16, ref)
    for paths in PATHS:  # every path of the convolutions and GroupNorm, bf16 (the GPU's defaults included)
        with ops.using(**paths):
            err = rel_l2(nchw(vae.decode(nhwc(z))), ref)
            assert err <= max(2 * torch_err, 1e-2), (paths, err, torch_err)
            assert rel_l2(vae.pack(vae.encode(nhwc(images))), ref_tokens) <= 2e-2, paths


def test_image_ids_values():
    ids = image_ids(32, 48)
    assert ids.dtype == mx.float32 and ids.shape == (6, 4)
    expected = [[0, r, c, 0] for r in range(2) for c in range(3)]  # row-major, (t, row, col, l)
    np.testing.assert_array_equal(np.array(ids), expected)
    assert image_ids(32, 48, batch=3).shape == (3, 6, 4)
    big = image_ids(4096, 4096)  # ids up to 255 exactly, and float32 keeps larger grids exact
    assert float(big[-1, 1]) == 255.0 and float(big[-1, 2]) == 255.0


def test_sizes_not_multiple_of_16():
    vae = Flux2VAE(VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4))
    with pytest.raises(ValueError, match="40x48"):
        vae.encode(mx.zeros((1, 40, 48, 3)))
    with pytest.raises(ValueError, match="40x48"):
        image_ids(40, 48)
    with pytest.raises(ValueError, match="40x48"):
        vae.decode(mx.zeros((1, 5, 6, 32)))
    with pytest.raises(ValueError, match="40x48"):
        vae.unpack(mx.zeros((1, 6, 128)), 40, 48)
    with pytest.raises(ValueError, match=r"\[B, 6, 128\]"):
        vae.unpack(mx.zeros((1, 5, 128)), 32, 48)
    with pytest.raises(ValueError, match="NHWC"):
        vae.encode(mx.zeros((1, 3, 32, 32)))


def test_load_errors(models, tmp_path):
    sd = to_bfl(models.b.state_dict(), 4)
    missing = dict(sd)
    del missing["decoder.mid.attn_1.q.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing.safetensors: missing key\(s\) decoder\.mid\.attn_1\.q\.weight"):
        load_vae(tmp_path / "missing.safetensors")

    extra = dict(sd, **{"decoder.extra.weight": torch.zeros(3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected key\(s\) decoder\.extra\.weight"):
        load_vae(tmp_path / "extra.safetensors")

    bad = tmp_path / "bad" / "vae"
    models.a.save_pretrained(bad)
    state = dict(models.a.state_dict())
    state["decoder.conv_out.weight"] = torch.zeros(3, 16, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch for decoder\.conv_out\.weight: checkpoint \(3, 1, 1, 16\), model \(3, 3, 3, 16\)"):
        load_vae(tmp_path / "bad")

    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="corrupt.safetensors: cannot read safetensors"):
        load_vae(tmp_path / "corrupt.safetensors")

    save_file({"img_in.weight": torch.zeros(2, 2)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(WeightsError, match="not a FLUX.2 VAE checkpoint"):
        load_vae(tmp_path / "dit.safetensors")

    with pytest.raises(WeightsError, match="no such file"):
        load_vae(tmp_path / "nowhere")

    flux1 = {k: v for k, v in sd.items() if not k.startswith("bn.")}  # FLUX.1 ae: 16 latent channels, no bn
    flux1["decoder.conv_in.weight"] = torch.zeros(64, 16, 3, 3)
    save_file(flux1, str(tmp_path / "flux1_ae.safetensors"))
    with pytest.raises(WeightsError, match="FLUX.1 VAE"):
        load_vae(tmp_path / "flux1_ae.safetensors")


def test_memory_chunking_is_exact(models, monkeypatch):
    """Chunked GroupNorm statistics and chunked mid attention give the unchunked result."""
    vae = load_vae(models.root / "model_a", dtype=mx.float32)
    z = mx.random.normal((1, 6, 10, 32))  # 60 tokens at the mid block
    whole = vae.decode(z)
    monkeypatch.setattr(ops_conv, "STATS_CHUNK", 100)  # GroupNorm's fallback sums over many row chunks
    monkeypatch.setattr(ops_conv, "BAND_ELEMENTS", 3000)  # the GEMM convolutions go in bands of rows
    vae.decoder.mid.attn_1.max_scores = 7 * 60  # 9 query chunks of 7, the last one short
    with ops.using(group_norm=False, conv_gemm=True):
        np.testing.assert_allclose(np.array(vae.decode(z)), np.array(whole), rtol=1e-5, atol=1e-5)


def test_tiling():
    # a purely local op is reproduced exactly by the tiling + blending, in both directions
    up = lambda z: mx.repeat(mx.repeat(z, 8, axis=1), 8, axis=2) * 2 + 1  # noqa: E731
    z = mx.random.normal((2, 20, 36, 5))
    np.testing.assert_allclose(np.array(_tiled(up, z, 8, up=True)), np.array(up(z)), atol=1e-5)
    down = lambda x: x.reshape(x.shape[0], x.shape[1] // 8, 8, x.shape[2] // 8, 8, x.shape[3]).mean(axis=(2, 4))  # noqa: E731
    x = mx.random.normal((1, 160, 288, 3))
    np.testing.assert_allclose(np.array(_tiled(down, x, 64, up=False)), np.array(down(x)), atol=1e-5)
    # on the model: one tile covering everything is the untiled result; smaller tiles keep the shape
    vae = Flux2VAE(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4))
    lat = mx.random.normal((1, 12, 20, 32))
    full = vae.decode(lat)
    assert mx.array_equal(vae.decode(lat, tile=160), full)
    tiled = vae.decode(lat, tile=64)
    assert tiled.shape == full.shape and bool(mx.all(mx.isfinite(tiled)))
    assert vae.encode(full, tile=64).shape == (1, 12, 20, 32)
    with pytest.raises(ValueError, match="tile 40"):
        vae.decode(lat, tile=40)


# --- images.py ----------------------------------------------------------------------------


def test_rgb_roundtrip_exact():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_array(Image.fromarray(a))
    assert x.shape == (5, 7, 3) and x.dtype == mx.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(np.asarray(array_to_pil(x)), a)
    from_bf16 = np.asarray(array_to_pil(x.astype(mx.bfloat16))).astype(int)  # bf16 accepted, ~1 byte off at most
    assert np.abs(from_bf16 - a).max() <= 1
    clamped = np.asarray(array_to_pil(mx.array([[[-3.0, 0.0, 7.0]]])))
    assert clamped.tolist() == [[[0, 128, 255]]]  # clamp, then round(127.5) = 128


def test_odd_modes():
    g = Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8))  # L
    assert np.array(pil_to_array(g))[1, 0].tolist() == pytest.approx([128 / 127.5 - 1] * 3, abs=1e-6)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [0, 0, 0]]]  # transparent -> white
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [255, 0, 0], [127, 127, 255]]]
    p = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert np.asarray(to_rgb(p)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]
    i16 = Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [0, 255, 128]  # rescaled, not clipped at 255
    with pytest.raises(ValueError, match="mode 'F'"):
        to_rgb(Image.new("F", (2, 2)))


def test_batches_and_files(tmp_path):
    ims = [Image.new("RGB", (4, 2), (i * 50, 0, 0)) for i in range(3)]
    batch = pils_to_array(ims)
    assert batch.shape == (3, 2, 4, 3)
    assert [im.getpixel((0, 0)) for im in arrays_to_pils(batch)] == [(0, 0, 0), (50, 0, 0), (100, 0, 0)]
    with pytest.raises(ValueError, match="one size"):
        pils_to_array([Image.new("RGB", (4, 2)), Image.new("RGB", (2, 4))])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        array_to_pil(batch)
    # EXIF orientation is applied when opening a file
    img = Image.new("RGB", (4, 2), (1, 2, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (2, 4)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png: cannot read image"):
        open_rgb(tmp_path / "junk.png")


def test_reference_image_ids_match_diffusers():
    import torch
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    # two references of different grids (latent 1x? = pixels/16): t = 10, 20 on their own grids
    refs = [torch.zeros(1, 128, 2, 3), torch.zeros(1, 128, 4, 1)]
    ref_ids = Flux2KleinPipeline._prepare_image_ids(refs)[0].numpy()
    ours = np.concatenate([np.array(image_ids(32, 48, t=10)), np.array(image_ids(64, 16, t=20))])
    np.testing.assert_array_equal(ours, ref_ids)
