"""Timestep sampling and loss weighting for flow-matching training (docs/training.md).

t is the noise level: x_t = (1 - t)·x0 + t·ε, t = 1 is pure noise. Sampling draws from MLX random with
an explicit key, so a step function that takes the key as input can be `mx.compile`d and a resumed run
that restores its key draws the same timesteps. With u ~ U(0, 1):

    uniform       t = u
    content       t = u³                        low noise favoured: P(t <= x) = x^(1/3)
    style         t = 1 - u³                    high noise favoured: P(t <= x) = 1 - (1 - x)^(1/3)
    balanced      per sample, content or style with probability 1/2 each (the default)
    logit_normal  t = sigmoid(mean + std·n), n ~ N(0, 1)   (ai-toolkit's default)
    flux_shift    t = s·u / (1 + (s - 1)·u), s = loss.flux_shift   (the SD3/FLUX time shift applied
                  to a uniform draw; s > 1 favours high noise, s = 1 is uniform)

Every mode is clamped to [1e-3, 1 - 1e-3]. Note for ai-toolkit users: its `content_or_style: content`
favours HIGH noise, the reverse of these names (which follow the seed guide, flux-2-swift-mlx and mflux).

Loss weights w(t) multiply the per-sample loss and have mean 1 under uniform t, so switching weighting
does not change the effective learning rate; they are normalised by a constant, never by the batch:

    uniform       w = 1
    bell_shaped   w = exp(-2·(t - 0.5)²) / Z_bell,  Z_bell = ∫₀¹ exp(-2(t-½)²) dt = √(π/2)·erf(1/√2) ≈ 0.8556
                  (peak ≈ 1.169 at t = 0.5, ≈ 0.709 at the ends)
    snr_weighted  min-SNR-γ weighting (Hang et al. 2023) for a velocity target, γ = 5:
                  SNR(t) = ((1 - t)/t)², w = min(SNR, γ) / (SNR + 1) / Z_snr, with Z_snr its mean over
                  t ~ U(0,1) (Z_snr ≈ 0.2826). It is 0 at both ends and peaks (≈ 2.95) where SNR = γ,
                  t = 1/(1 + √γ) ≈ 0.31. (The Swift trainer lists the name but trains it as uniform;
                  this definition is mflux2's.)
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

SAMPLING_MODES = ("uniform", "content", "style", "balanced", "logit_normal", "flux_shift")
WEIGHTING_MODES = ("uniform", "bell_shaped", "snr_weighted")
T_MIN, T_MAX = 1e-3, 1.0 - 1e-3

BELL_Z = math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2))
SNR_GAMMA = 5.0


def _snr_unnormalised(t: np.ndarray | mx.array, gamma: float = SNR_GAMMA):
    # min(SNR, γ)/(SNR + 1) with SNR = a/b, a = (1-t)², b = t²  ==  min(a, γ·b) / (a + b): no division by t.
    a, b = (1 - t) ** 2, t**2
    lib = mx if isinstance(t, mx.array) else np
    return lib.minimum(a, gamma * b) / (a + b)


def _snr_z(gamma: float = SNR_GAMMA) -> float:
    # The integrand is smooth on each side of the kink at SNR = γ, t* = 1/(1 + √γ): Gauss-Legendre per piece.
    x, wts = np.polynomial.legendre.leggauss(64)
    t_star = 1.0 / (1.0 + math.sqrt(gamma))
    total = 0.0
    for lo, hi in ((0.0, t_star), (t_star, 1.0)):
        t = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
        total += 0.5 * (hi - lo) * float(np.sum(wts * _snr_unnormalised(t, gamma)))
    return total


SNR_Z = _snr_z()


def _as_key(key_or_seed: mx.array | int) -> mx.array:
    if isinstance(key_or_seed, mx.array):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return mx.random.key(int(key_or_seed))
    raise TypeError(f"expected an mx.random.key(...) array or an int seed, got {type(key_or_seed).__name__}")


def sample_timesteps(
    mode: str,
    key_or_rng: mx.array | int,
    batch: int,
    logit_normal_mean: float = 0.0,
    logit_normal_std: float = 1.0,
    flux_shift: float = 1.0,
) -> mx.array:
    """`batch` timesteps in [1e-3, 1 - 1e-3], float32, drawn from `mode` with the MLX key
    `key_or_rng` (an `mx.random.key(...)` array, or an int seed for convenience)."""
    key = _as_key(key_or_rng)
    shape = (batch,)
    if mode == "logit_normal":
        t = mx.sigmoid(logit_normal_mean + logit_normal_std * mx.random.normal(shape, key=key))
    elif mode == "balanced":
        k_u, k_coin = mx.random.split(key)
        u3 = mx.random.uniform(shape=shape, key=k_u) ** 3
        t = mx.where(mx.random.bernoulli(0.5, shape, key=k_coin), u3, 1.0 - u3)
    else:
        u = mx.random.uniform(shape=shape, key=key)
        if mode == "uniform":
            t = u
        elif mode == "content":
            t = u**3
        elif mode == "style":
            t = 1.0 - u**3
        elif mode == "flux_shift":
            t = flux_shift * u / (1.0 + (flux_shift - 1.0) * u)
        else:
            raise ValueError(f"unknown timestep sampling mode {mode!r} (one of {', '.join(SAMPLING_MODES)})")
    return mx.clip(t, T_MIN, T_MAX).astype(mx.float32)


def loss_weight(mode: str, t: mx.array) -> mx.array:
    """Per-sample loss weight w(t) for `mode`, same shape and dtype as t; E[w] = 1 for t ~ U(0, 1)."""
    if mode == "uniform":
        return mx.ones_like(t)
    if mode == "bell_shaped":
        return mx.exp(-2.0 * (t - 0.5) ** 2) / BELL_Z
    if mode == "snr_weighted":
        return _snr_unnormalised(t) / SNR_Z
    raise ValueError(f"unknown loss weighting {mode!r} (one of {', '.join(WEIGHTING_MODES)})")
