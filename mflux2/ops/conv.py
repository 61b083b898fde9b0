"""2-D convolutions (NHWC, MLX weight layout [O, kh, kw, I]) as GEMMs, and GroupNorm: the two
operations of the VAE.

conv2d(x, weight, bias, stride, padding):
- fallback (`conv2d_reference`): `mx.conv2d` (+ bias);
- fast path (switch "conv_gemm"): GEMMs through `mx.matmul`. A 1x1 convolution is one GEMM. A k×k
  convolution at stride 1 pads the input once and flattens it to rows of the padded width Wp: then
  the k taps of one kernel row are k neighbouring rows of that flat array and the k kernel rows are
  offsets of Wp rows, so one copy (the k column-shifted views side by side, [B, L, k·C]) feeds k
  GEMMs with K = k·C that accumulate through `mx.addmm`. Each output row carries k−1 junk columns
  (those that wrap across the padded border), dropped at the end — (k−1)/Wp extra work, 0.4% at
  512 px. A strided convolution (the encoder's downsampling) gathers its k² taps by strided slices
  (im2col, k²/stride² times the input) and runs one GEMM. Large inputs go in bands of output rows so
  the copy stays under `BAND_ELEMENTS`.

  Which is faster is a property of each backend, so the switch's default is per backend
  (`switches.BACKEND_DEFAULTS`). Measured (H100, MLX 0.32.4, 2026-12-07): MLX's CUDA convolution
  (cuDNN) is the faster one there, 1.2-4.2x per convolution — the 1.1 s decode was GroupNorm's, below
  — so CUDA keeps `mx.conv2d`; the CPU takes the GEMMs (~1.8x faster in bf16); Metal keeps
  `mx.conv2d` until measured (`scripts/vae_profile.py` prints both).

group_norm(x, weight, bias, groups, eps, silu=False) (torch.nn.GroupNorm on NHWC: groups are
contiguous channel ranges; float32 statistics; `silu` applies SiLU to the result in the same pass):
- fallback (`group_norm_reference`): float32 two-pass statistics summed over row chunks of at most
  `STATS_CHUNK` elements, each chunk evaluated before the next (bounded memory: a whole-tensor
  float32 copy is what made a 1024² decode take 10 GiB, docs/vae.md), then one compiled pass;
- fast path (switch "group_norm"): the groups made contiguous by one bf16 transpose, normalised by
  `mx.fast.layer_norm` (float32 statistics inside the kernel, no float32 copy), the affine + SiLU in
  one compiled pass; nothing is evaluated on the way, so a decode is one graph instead of ~500
  synchronisations. On CUDA it took a 512² decode from 1.09 s to 16 ms (a GroupNorm at full
  resolution: 118 ms -> 0.74 ms), for more memory (the decode's peak 0.81 -> 2.24 GB). Off on the
  CPU, where `mx.fast.layer_norm` is composed of ops that hold float32 copies of the whole tensor,
  and on Metal until its time and memory are measured there.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from mflux2.ops.switches import is_fast

BAND_ELEMENTS = 1 << 28  # the largest tap copy built at once (512 MB in bf16); larger inputs go in bands


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: mx.array, weight: mx.array, bias: mx.array | None = None, stride=1, padding=0,
           fast: bool | None = None) -> mx.array:
    """x [B, H, W, C] convolved with weight [O, kh, kw, C] (cross-correlation, zero padding, as
    `mx.conv2d`), plus bias [O]."""
    if x.ndim != 4 or weight.ndim != 4 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"conv2d: input {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit "
                         "([B, H, W, C] and [O, kh, kw, C])")
    if not is_fast("conv_gemm", fast):
        return conv2d_reference(x, weight, bias, stride, padding)
    stride, padding = _pair(stride), _pair(padding)
    O, kh, kw, C = weight.shape
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        B, H, W, _ = x.shape
        y = x.reshape(B, H * W, C) @ weight.reshape(O, C).T
        y = y.reshape(B, H, W, O)
    elif stride == (1, 1):
        y = _conv_stride1(x, weight, padding)
    else:
        y = _conv_im2col(x, weight, stride, padding)
    return y if bias is None else y + bias


def conv2d_reference(x, weight, bias=None, stride=1, padding=0):
    """The fallback: MLX's own convolution."""
    y = mx.conv2d(x, weight, stride=stride, padding=padding)
    return y if bias is None else y + bias


def _bands(rows: int, row_elements: int) -> list[tuple[int, int]]:
    step = max(1, BAND_ELEMENTS // max(row_elements, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _conv_stride1(x, weight, padding):
    B, H, W, C = x.shape
    O, kh, kw, _ = weight.shape
    ph, pw = padding
    Ho, Wo = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} larger than the padded input {H + 2 * ph}x{W + 2 * pw}")
    Wp = W + 2 * pw
    # one extra zero row at the bottom: the last output row's junk columns read up to kw-1 past the end
    flat = mx.pad(x, [(0, 0), (ph, ph + 1), (pw, pw), (0, 0)]).reshape(B, (H + 2 * ph + 1) * Wp, C)
    wk = weight.reshape(O, kh, kw * C)  # per kernel row: its taps' weights in the copy's channel order
    outs = []
    for r0, r1 in _bands(Ho, Wp * kw * C):
        n = (r1 - r0) * Wp  # output rows of this band, junk columns included
        span = n + (kh - 1) * Wp
        base = r0 * Wp
        taps = flat[:, base : base + span] if kw == 1 else mx.concatenate(
            [flat[:, base + j : base + j + span] for j in range(kw)], axis=-1)  # [B, span, kw*C]
        acc = None
        for i in range(kh):
            a, b = taps[:, i * Wp : i * Wp + n], wk[:, i].T
            acc = a @ b if acc is None else mx.addmm(acc, a, b)
        outs.append(acc.reshape(B, r1 - r0, Wp, O))
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    return y[:, :, :Wo]


def _conv_im2col(x, weight, stride, padding):
    B, H, W, C = x.shape
    O, kh, kw, _ = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
        H, W = H + 2 * ph, W + 2 * pw
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"conv2d: kernel {kh}x{kw} larger than the padded input {H}x{W}")
    w2 = weight.reshape(O, kh * kw * C).T
    outs = []
    for r0, r1 in _bands(Ho, Wo * kh * kw * C):
        cols = [x[:, r0 * sh + i : (r1 - 1) * sh + i + 1 : sh, j : (Wo - 1) * sw + j + 1 : sw]
                for i in range(kh) for j in range(kw)]  # tap order (i, j, c) = the weight's
        a = mx.concatenate(cols, axis=-1).reshape(B, (r1 - r0) * Wo, kh * kw * C)
        outs.append((a @ w2).reshape(B, r1 - r0, Wo, O))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


# ---------------------------------------------------------------------------------------------
# GroupNorm

STATS_CHUNK = 1 << 22  # the fallback's statistics: at most this many elements per evaluated chunk


@partial(mx.compile, shapeless=True)
def _sum_f32(g):
    return mx.sum(g.astype(mx.float32), axis=(1, 3), keepdims=True)


@partial(mx.compile, shapeless=True)
def _sum_sq_dev_f32(g, mean):
    return mx.sum(mx.square(g.astype(mx.float32) - mean), axis=(1, 3), keepdims=True)


def _group_stats(g):
    """Two-pass float32 mean and variance of g [B, N, G, gs] over (N, gs), evaluated now."""
    B, N, G, gs = g.shape
    rows = max(1, STATS_CHUNK // (G * gs))
    total = None
    for i in range(0, N, rows):
        part = _sum_f32(g[:, i : i + rows])
        total = part if total is None else total + part
        mx.eval(total)
    mean = total / (N * gs)
    total = None
    for i in range(0, N, rows):
        part = _sum_sq_dev_f32(g[:, i : i + rows], mean)
        total = part if total is None else total + part
        mx.eval(total)
    return mean, total / (N * gs)


@partial(mx.compile, shapeless=True)
def _apply(g, mean, rstd, weight, bias):
    return ((g.astype(mx.float32) - mean) * rstd * weight + bias).astype(g.dtype)


@partial(mx.compile, shapeless=True)
def _apply_silu(g, mean, rstd, weight, bias):
    y = (g.astype(mx.float32) - mean) * rstd * weight + bias
    return (y * mx.sigmoid(y)).astype(g.dtype)


@partial(mx.compile, shapeless=True)
def _affine(y, weight, bias):
    return (y.astype(mx.float32) * weight + bias).astype(y.dtype)


@partial(mx.compile, shapeless=True)
def _affine_silu(y, weight, bias):
    z = y.astype(mx.float32) * weight + bias
    return (z * mx.sigmoid(z)).astype(y.dtype)


def group_norm(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = False, fast: bool | None = None):
    """torch.nn.GroupNorm over x [B, H, W, C] (NHWC), then SiLU if `silu`; x's dtype out."""
    B, H, W, C = x.shape
    if C % groups:
        raise ValueError(f"group_norm: {C} channels are not divisible into {groups} groups")
    if not is_fast("group_norm", fast):
        return group_norm_reference(x, weight, bias, groups, eps, silu)
    gs = C // groups
    g = x.reshape(B, H * W, groups, gs).transpose(0, 2, 1, 3).reshape(B, groups, H * W * gs)
    y = mx.fast.layer_norm(g, None, None, eps)  # float32 statistics inside the kernel
    y = y.reshape(B, groups, H * W, gs).transpose(0, 2, 1, 3).reshape(B, H, W, C)
    w, b = weight.astype(mx.float32), bias.astype(mx.float32)
    return (_affine_silu if silu else _affine)(y, w, b)


def group_norm_reference(x, weight, bias, groups: int, eps: float = 1e-6, silu: bool = False):
    """The fallback: float32 statistics over evaluated chunks (bounded memory), one compiled pass."""
    B, H, W, C = x.shape
    gs = C // groups
    g = x.reshape(B, H * W, groups, gs)
    mean, var = _group_stats(g)
    rstd = mx.rsqrt(var + eps)
    shape = (1, 1, groups, gs)
    out = (_apply_silu if silu else _apply)(g, mean, rstd, weight.reshape(shape), bias.reshape(shape))
    return out.reshape(B, H, W, C)
