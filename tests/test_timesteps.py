"""Timestep sampling matches each mode's definition (KS statistic against the exact CDF); loss
weights have the stated values and mean 1 under uniform t; sampling is keyed, reproducible and
traceable by mx.compile."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mflux2.training.timesteps import BELL_Z, SAMPLING_MODES, SNR_Z, T_MAX, T_MIN, loss_weight, sample_timesteps

N = 40_000
KS_CRIT = 1.95 / math.sqrt(N)  # Kolmogorov-Smirnov critical value at alpha = 0.001


def _phi(z):
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def _logit(x):
    return np.log(x / (1 - x))


# The definitions (docs/training.md), as CDFs of the unclamped t. Clamping to [T_MIN, T_MAX] only moves
# mass onto the two end points, so on [T_MIN, T_MAX) the sampled CDF must equal these exactly.
CDFS = {
    "uniform": lambda x: x,
    "content": lambda x: x ** (1 / 3),  # t = u^3
    "style": lambda x: 1 - (1 - x) ** (1 / 3),  # t = 1 - u^3
    "balanced": lambda x: 0.5 * (x ** (1 / 3) + 1 - (1 - x) ** (1 / 3)),
    "logit_normal": lambda x: _phi((_logit(x) - 0.3) / 0.8),  # mean 0.3, std 0.8 below
    "flux_shift": lambda x: x / (3.0 - 2.0 * x),  # s = 3: t = 3u / (1 + 2u)
}


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_empirical_distribution_matches_definition(mode):
    t = np.array(sample_timesteps(mode, mx.random.key(7), N, logit_normal_mean=0.3, logit_normal_std=0.8, flux_shift=3.0))
    assert t.dtype == np.float32 and t.shape == (N,)
    assert t.min() >= np.float32(T_MIN) and t.max() <= np.float32(T_MAX)
    ts = np.sort(t.astype(np.float64))
    # KS statistic on the interior (both sides of each jump of the empirical CDF)
    inside = (ts >= T_MIN + 1e-6) & (ts < T_MAX - 1e-6)
    x = ts[inside]
    idx = np.nonzero(inside)[0]
    f = CDFS[mode](x)
    d = max(np.max(np.abs((idx + 1) / N - f)), np.max(np.abs(idx / N - f)))
    assert d < KS_CRIT, f"{mode}: KS statistic {d:.4f} >= {KS_CRIT:.4f}"


def test_quantiles_and_clamping():
    key = mx.random.key(3)
    content = np.array(sample_timesteps("content", key, N))
    style = np.array(sample_timesteps("style", key, N))
    # content favours LOW noise: median of u^3 = 0.125; style is its mirror image
    assert abs(np.median(content) - 0.125) < 0.01 and abs(np.median(style) - 0.875) < 0.01
    # P(u^3 <= 1e-3) = 0.1: those draws sit exactly at the clamp
    assert abs(np.mean(content == np.float32(T_MIN)) - 0.1) < 0.01
    bal = np.array(sample_timesteps("balanced", key, N))
    assert abs(bal.mean() - 0.5) < 0.01 and abs(np.mean(bal < 0.5) - 0.5) < 0.01
    small = np.array(sample_timesteps("balanced", mx.random.key(11), 64))
    assert (small < 0.5).any() and (small > 0.5).any()  # mixed per sample, not per batch


def test_flux_shift_one_is_uniform_and_bigger_shift_is_noisier():
    u = np.array(sample_timesteps("uniform", mx.random.key(5), 1000))
    s1 = np.array(sample_timesteps("flux_shift", mx.random.key(5), 1000, flux_shift=1.0))
    np.testing.assert_allclose(s1, u, atol=1e-6)
    s3 = np.array(sample_timesteps("flux_shift", mx.random.key(5), 1000, flux_shift=3.0))
    assert np.all(s3 >= u - 1e-6) and s3.mean() > u.mean() + 0.1


def test_keyed_reproducible_and_compilable():
    key = mx.random.key(42)
    a = np.array(sample_timesteps("balanced", key, 16))
    b = np.array(sample_timesteps("balanced", mx.random.key(42), 16))
    c = np.array(sample_timesteps("balanced", mx.random.key(43), 16))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, np.array(sample_timesteps("balanced", 42, 16)))  # int seed = key(seed)
    for mode in SAMPLING_MODES:
        compiled = mx.compile(lambda k, m=mode: sample_timesteps(m, k, 8, 0.1, 1.2, 2.0))
        np.testing.assert_array_equal(np.array(compiled(key)), np.array(sample_timesteps(mode, key, 8, 0.1, 1.2, 2.0)))
    # a new key gives new draws through the same compiled function (the key is an input, not a constant)
    compiled = mx.compile(lambda k: sample_timesteps("uniform", k, 8))
    assert not np.array_equal(np.array(compiled(mx.random.key(1))), np.array(compiled(mx.random.key(2))))


def test_bad_mode_and_key():
    with pytest.raises(ValueError, match="unknown timestep sampling mode"):
        sample_timesteps("sigmoid", mx.random.key(0), 4)
    with pytest.raises(TypeError):
        sample_timesteps("uniform", 1.5, 4)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight("gaussian", mx.array([0.5]))


# ---------------------------------------------------------------------------------------------
# Weighting
# ---------------------------------------------------------------------------------------------


def _mean_on_grid(fn, n=2_000_001):
    # an independent check of the normalisation: trapezoid rule on a dense float64 grid
    t = np.linspace(0.0, 1.0, n)
    y = fn(t)
    return float(np.sum((y[1:] + y[:-1]) * 0.5) / (n - 1))


def test_bell_shaped_values():
    assert BELL_Z == pytest.approx(0.8556, abs=1e-4)
    assert BELL_Z == pytest.approx(_mean_on_grid(lambda t: np.exp(-2 * (t - 0.5) ** 2)), rel=1e-9)
    w = np.array(loss_weight("bell_shaped", mx.array([0.0, 0.5, 1.0, 0.25, 0.75])))
    assert w[1] == pytest.approx(1.1687, abs=1e-3)  # peak
    assert w[0] == pytest.approx(0.7089, abs=1e-3) and w[2] == pytest.approx(w[0], abs=1e-6)  # ends, symmetric
    assert w[3] == pytest.approx(w[4], abs=1e-6)
    grid = mx.array(np.linspace(0, 1, 200_001, dtype=np.float32))
    assert float(mx.mean(loss_weight("bell_shaped", grid))) == pytest.approx(1.0, abs=1e-4)
    # and under sampled uniform t, as the trainer sees it
    t = sample_timesteps("uniform", mx.random.key(9), N)
    assert float(mx.mean(loss_weight("bell_shaped", t))) == pytest.approx(1.0, abs=0.01)


def test_snr_weighted_values():
    gamma = 5.0

    def ref(t):  # min(SNR, gamma) / (SNR + 1), SNR = ((1-t)/t)^2, written in float64 from the definition
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = ((1 - t) / t) ** 2
            w = np.minimum(snr, gamma) / (snr + 1)
        return np.nan_to_num(w, nan=0.0)  # t = 0: SNR = inf, w -> 0

    assert SNR_Z == pytest.approx(_mean_on_grid(ref), rel=1e-7)
    ts = np.random.default_rng(0).uniform(0.001, 0.999, 1000)
    np.testing.assert_allclose(np.array(loss_weight("snr_weighted", mx.array(ts.astype(np.float32)))),
                               ref(ts.astype(np.float32).astype(np.float64)) / SNR_Z, rtol=1e-5, atol=1e-6)
    w = np.array(loss_weight("snr_weighted", mx.array([0.0, 1.0])))
    np.testing.assert_allclose(w, [0.0, 0.0], atol=1e-7)
    t_star = 1 / (1 + math.sqrt(gamma))
    grid = np.linspace(0.001, 0.999, 9999).astype(np.float32)
    wg = np.array(loss_weight("snr_weighted", mx.array(grid)))
    assert abs(grid[np.argmax(wg)] - t_star) < 2e-3
    assert float(np.mean(wg)) == pytest.approx(1.0, abs=2e-3)


def test_uniform_weight_is_one():
    t = mx.array([0.001, 0.3, 0.999])
    np.testing.assert_array_equal(np.array(loss_weight("uniform", t)), np.ones(3, np.float32))
