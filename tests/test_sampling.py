"""The FLUX.2 schedule (the reference numbers of docs/architecture.md, "Sampling", and diffusers'
scheduler), Euler/CFG, noise, packing."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mflux2.sampling import (
    cfg_combine,
    check_size,
    compute_empirical_mu,
    euler_step,
    get_sigmas,
    image_seq_len,
    initial_noise,
    pack_grid,
    unpack_grid,
)

# docs/architecture.md, "Sampling": (image_seq_len, steps) -> (mu, sigmas or (first three, last two))
REFERENCE = [
    (4096, 50, 2.023351, [1.0, 0.997309, 0.994521], [0.133719, 0.0]),
    (4096, 4, 2.291180, [1.0, 0.967384, 0.908144, 0.767200, 0.0], None),
    (1024, 4, 2.030690, [1.0, 0.958085, 0.883982, 0.717497, 0.0], None),
    (16, 2, 1.960378, [1.0, 0.876574, 0.0], None),
]


@pytest.mark.parametrize("n, steps, mu, head, tail", REFERENCE)
def test_schedule_matches_spec_reference_numbers(n, steps, mu, head, tail):
    assert compute_empirical_mu(n, steps) == pytest.approx(mu, abs=1e-6)
    sigmas = get_sigmas(steps, n)
    assert len(sigmas) == steps + 1
    np.testing.assert_allclose(sigmas[: len(head)], head, atol=1e-6)
    if tail:
        np.testing.assert_allclose(sigmas[-2:], tail, atol=1e-6)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])), "sigmas must decrease strictly"


def test_mu_above_4300_tokens_ignores_steps():
    # 1360x768 is 85x48 = 4080 tokens (interpolated); 1536x1536 is 9216 tokens (200-step fit only)
    assert compute_empirical_mu(9216, 4) == compute_empirical_mu(9216, 50) == pytest.approx(0.00016927 * 9216 + 0.45666666)
    assert compute_empirical_mu(4080, 4) != compute_empirical_mu(4080, 50)


@pytest.mark.parametrize("n, steps", [(16, 2), (1024, 4), (4096, 28), (9216, 50), (5, 1)])
def test_schedule_matches_diffusers_scheduler(n, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as df_mu

    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        time_shift_type="exponential",
    )
    mu = df_mu(n, steps)
    assert compute_empirical_mu(n, steps) == pytest.approx(mu, rel=1e-12)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_allclose(get_sigmas(steps, n), sched.sigmas.numpy(), atol=2e-7)


def test_euler_step_and_cfg_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 6, 128)).astype(np.float32), rng.standard_normal((2, 6, 128)).astype(np.float32)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigmas = get_sigmas(3, 6)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=compute_empirical_mu(6, 3))
    sched.set_begin_index(0)
    ours, ref = mx.array(x), torch.from_numpy(x)
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(torch.from_numpy(v), t, ref, return_dict=False)[0]
        ours = euler_step(ours, mx.array(v), sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(np.array(ours), ref.numpy(), rtol=1e-5, atol=1e-5)
    # after the last step sigma = 0: x0 = x_T - v (the whole path integrates dt = -1)
    np.testing.assert_allclose(np.array(ours), x - v, atol=1e-5)

    c, u = mx.array(v[0]), mx.array(x[0])
    np.testing.assert_allclose(np.array(cfg_combine(c, u, 4.0)), x[0] + 4.0 * (v[0] - x[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(cfg_combine(c, u, 1.0)), v[0], atol=1e-6)


def test_initial_noise_is_seeded_per_image():
    a = initial_noise(7, 2, 32, 48)
    assert a.shape == (2, 6, 128) and a.dtype == mx.float32
    np.testing.assert_array_equal(np.array(a), np.array(initial_noise(7, 2, 32, 48)))
    # image 1 of seed 7 is image 0 of seed 8: independent of the batch it is generated in
    np.testing.assert_array_equal(np.array(a[1]), np.array(initial_noise(8, 1, 32, 48)[0]))
    assert not np.allclose(np.array(a[0]), np.array(a[1]))
    big = np.array(initial_noise(0, 1, 256, 256))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def test_pack_grid_matches_diffusers_pack_and_is_row_major():
    from diffusers import Flux2KleinPipeline

    grid = np.random.default_rng(1).standard_normal((2, 128, 3, 5)).astype(np.float32)  # non-square: catches h/w swaps
    packed = pack_grid(mx.array(grid))
    np.testing.assert_array_equal(np.array(packed), Flux2KleinPipeline._pack_latents(torch.from_numpy(grid)).numpy())
    np.testing.assert_array_equal(np.array(packed[:, 1 * 5 + 3]), grid[:, :, 1, 3])  # token (row 1, col 3)
    np.testing.assert_array_equal(np.array(unpack_grid(packed, 48, 80)), grid)


def test_bad_sizes_and_steps_are_one_line_errors():
    with pytest.raises(ValueError, match=r"1000x520 .*multiple of 16.*e.g. 992x512"):
        check_size(520, 1000)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        get_sigmas(0, 16)
    assert image_seq_len(1024, 768) == 64 * 48
    with pytest.raises(ValueError, match="do not fit"):
        unpack_grid(mx.zeros((1, 5, 128)), 32, 32)


def test_denoise_with_refs_feeds_them_to_every_pass_and_updates_only_the_target():
    from mflux2.sampling import denoise

    seen = []

    class Recorder:  # a stand-in transformer: v = 0.5·x + the mean of the ref tokens, per token
        dtype = mx.float32

        def __call__(self, x, emb, t, img_ids, txt_ids, g):
            seen.append((x.shape, tuple(mx.array(img_ids).shape), float(emb[0, 0, 0])))
            return 0.5 * x + x[:, 3:].mean(axis=1, keepdims=True)

    x = mx.random.normal((1, 3, 128), key=mx.random.key(0))
    refs = mx.random.normal((1, 2, 128), key=mx.random.key(1))
    ids, ref_ids = mx.zeros((3, 4)), mx.ones((2, 4))
    pos, neg = mx.ones((1, 4, 8)), -mx.ones((1, 4, 8))
    out = denoise(Recorder(), x, pos, mx.zeros((1, 4, 4)), ids, [1.0, 0.5, 0.0], neg_embeds=neg,
                  neg_txt_ids=mx.zeros((1, 4, 4)), cfg_scale=3.0, refs=refs, ref_ids=ref_ids)
    # 2 steps x (prompt, negative) passes, each over [x ; refs] with [ids ; ref_ids]
    assert seen == [((1, 5, 128), (5, 4), 1.0), ((1, 5, 128), (5, 4), -1.0)] * 2
    want = x
    for s0, s1 in ((1.0, 0.5), (0.5, 0.0)):  # both passes agree here, so CFG gives the same v
        want = want + (s1 - s0) * (0.5 * want + refs.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(np.array(out), np.array(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="refs and ref_ids together"):
        denoise(Recorder(), x, pos, mx.zeros((1, 4, 4)), ids, [1.0, 0.0], refs=refs)
    with pytest.raises(ValueError, match=r"ref_ids of shape \(3, 4\) do not fit 2 reference tokens"):
        denoise(Recorder(), x, pos, mx.zeros((1, 4, 4)), ids, [1.0, 0.0], refs=refs, ref_ids=mx.zeros((3, 4)))


# ---- Memory while sampling (issue 34): a reduced dev on the CPU


def _probe():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sampling_memory", Path(__file__).resolve().parents[1] / "scripts" / "sampling_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiled(monkeypatch):
    """The 512² path at a few tokens: quantized layers dequantised by tiles, several a layer (dev's
    single-block linear1 is 6 tiles of 64M weights; here 1M weights a tile)."""
    from mflux2.ops import gemm

    monkeypatch.setattr(gemm, "DEQUANTIZE_MIN_ROWS", 1)
    monkeypatch.setattr(gemm, "DEQUANTIZE_TILE", 1 << 20)


def _before_fix(monkeypatch, tiles: bool = True, limit: bool = True):
    """The code before issue 34's fix (or without one half of it): `tiles`, dequantised as the
    graph allows; `limit`, no memory limit while sampling."""
    from mflux2 import sampling
    from mflux2.ops import gemm

    if tiles:
        monkeypatch.setattr(gemm, "ORDERED_TILES", False)
    if limit:
        monkeypatch.setattr(sampling, "RUN_AHEAD", None)


def test_bounded_sampling_gives_the_same_latents(tiled, monkeypatch):
    """Ordered tiles and the memory limit change only when operations run: the sampled latents of
    an int8 dev-shaped model (float32, fixed seed, guidance, LoRA) are bit-identical to before."""
    from mflux2 import sampling
    from mflux2.ops import gemm

    monkeypatch.setattr(gemm, "DEQUANTIZE_TILE", 1 << 16)  # 9 tiles for the single block's linear1
    S = _probe()
    model = S.reduced_model("dev", 1, 1, "int8", 4, "attention", dtype=mx.float32, num_attention_heads=2,
                            joint_attention_dim=256)
    x, emb, tids, iids = S.inputs(model.config, 64, 8, dtype=mx.float32)
    sig = get_sigmas(3, x.shape[1])
    after = sampling.denoise(model, x, emb, tids, iids, sig, guidance=4.0)
    with monkeypatch.context() as m:
        _before_fix(m)
        before = sampling.denoise(model, x, emb, tids, iids, sig, guidance=4.0)
    assert float(mx.abs(after).max()) > 0
    np.testing.assert_array_equal(np.array(after), np.array(before))


# Sampling's peak above the weights, × sampling.model_live_bytes (1 double + 2 single blocks,
# hidden 1024, int8, 64 + 16 tokens, 2 steps, CPU): 2.48 with the fix; 14.8 before it, 10.6 with
# the memory limit alone, 4.13 with the ordered tiles alone.
LIVE_SET_FACTOR = 3.3


@pytest.fixture(scope="module")
def reduced_dev():
    S = _probe()
    model = S.reduced_model("dev", 1, 2, "int8", 8, "attention", num_attention_heads=8, joint_attention_dim=1024)
    return S, model, S.inputs(model.config, 128, 16)


def _sampling_excess(S, model, inputs) -> tuple[float, float, float]:
    """(peak − what was allocated when it began, the analytical live set, the model's and the inputs'
    bytes), bytes, of `sampling.denoise`."""
    from mflux2 import sampling

    x, emb, tids, iids = inputs
    got = S.measure("denoise", model, x, emb, tids, iids, 2, 4.0)
    return got["excess_gb"] * 1e9, sampling.model_live_bytes(model, x.shape[1] + emb.shape[1]), got["held_gb"] * 1e9


@pytest.mark.parametrize("broken", [None, "both", "tiles", "limit"])
def test_sampling_holds_no_more_than_a_few_live_sets(reduced_dev, tiled, monkeypatch, broken):
    """What sampling holds above the weights stays within LIVE_SET_FACTOR × one forward's live set;
    the code before the fix (tiles dequantised early, MLX running ahead), or without either half
    of it, breaks the bound: the test sees the excess come back."""
    if broken:
        _before_fix(monkeypatch, tiles=broken != "limit", limit=broken != "tiles")
    # What earlier tests in this worker left alive (here 16 MiB, 2 live sets) is not sampling's.
    others = mx.zeros((8 << 20,), dtype=mx.bfloat16)
    mx.eval(others)
    excess, live, _ = _sampling_excess(*reduced_dev)
    assert (excess <= LIVE_SET_FACTOR * live) == (broken is None), (excess / live, broken)


def test_the_plans_sampling_term_bounds_the_measured_peak(reduced_dev, tiled):
    """plan.sampling_bytes (the validation phase's sampling term; the dry run and the run read it)
    + what is held predicts sampling's measured peak within [1.0, 1.15] of it (CPU; the term's
    bound is backend-neutral: MLX's memory limit)."""
    from mflux2.training import plan as P

    S, model, inputs = reduced_dev
    excess, _, held = _sampling_excess(S, model, inputs)
    tokens = inputs[0].shape[1] + inputs[1].shape[1]
    ratio = (held + P.sampling_bytes(model.config, "int8", tokens)) / (held + excess)
    assert 1.0 <= ratio <= 1.15, ratio
