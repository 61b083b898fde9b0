"""Where a FLUX.2 VAE decode and encode spend their time (random weights), path by path: the
convolutions as MLX's `mx.conv2d` or as GEMMs (mflux2/ops/conv.py, switch "conv_gemm"), GroupNorm
as chunked float32 statistics or through `mx.fast.layer_norm` (switch "group_norm"); each 3x3
convolution shape of the decoder alone both ways beside a plain GEMM of the same FLOPs; and the
FLOPs and the fewest bytes of a decode and an encode (for the Mac projection in docs/performance.md).
Prints one JSON line per measurement as it goes (so a cut-off run keeps what it measured).

    python scripts/vae_profile.py                   # 512 and 1024, every path
    python scripts/vae_profile.py --sizes 512 --quick
    python scripts/vae_profile.py --tiny            # the CPU smoke run (small VAE, 64 px)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mflux2.models import vae as vae_mod  # noqa: E402
from mflux2.ops import conv as ops_conv  # noqa: E402
from mflux2.ops.switches import backend, is_fast, using  # noqa: E402


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def timed(fn, reps: int) -> tuple[float, float]:
    """(median s, peak GB) over `reps` calls after one warm-up call (kernels built, plans chosen)."""
    mx.eval(fn())
    mx.reset_peak_memory()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 5), round(mx.get_peak_memory() / 1e9, 3)


def count(vae, size: int, what: str) -> dict:
    """FLOPs of the convolutions, the attention and GroupNorm of one decode/encode at `size`, and
    the fewest bytes they move (each layer's input read once and output written once, weights
    read once), from the shapes alone (nothing is computed)."""
    tally = {"conv_flops": 0, "attn_flops": 0, "bytes": 0}
    item = 2 if vae.dtype == mx.bfloat16 else 4
    real_conv, real_gn, real_sdpa = ops_conv.conv2d, ops_conv.group_norm, mx.fast.scaled_dot_product_attention

    def conv(x, w, b=None, stride=1, padding=0, fast=None):
        y = mx.conv2d(mx.zeros(x.shape, x.dtype), w, stride=stride, padding=padding)  # shape only (never evaluated)
        B, Ho, Wo, O = y.shape
        tally["conv_flops"] += 2 * B * Ho * Wo * O * w.size // O
        tally["bytes"] += (x.size + y.size + w.size) * item
        return mx.zeros(y.shape, x.dtype)

    def gn(x, w, b, groups, eps=1e-6, silu=False, fast=None):
        tally["bytes"] += 2 * x.size * item
        return x

    def sdpa(q, k, v, scale=None, mask=None):
        tally["attn_flops"] += 4 * q.shape[0] * q.shape[2] * k.shape[2] * q.shape[-1]
        return mx.zeros(q.shape, q.dtype)

    ops_conv.conv2d, ops_conv.group_norm, mx.fast.scaled_dot_product_attention = conv, gn, sdpa
    try:
        if what == "decode":
            vae.decoder(mx.zeros((1, size // 8, size // 8, 32), vae.dtype))
        else:
            vae.encoder(mx.zeros((1, size, size, 3), vae.dtype))
    finally:
        ops_conv.conv2d, ops_conv.group_norm, mx.fast.scaled_dot_product_attention = real_conv, real_gn, real_sdpa
    tally["tflop"] = round((tally["conv_flops"] + tally["attn_flops"]) / 1e12, 4)
    tally["gbytes"] = round(tally["bytes"] / 1e9, 3)
    return tally


PATHS = {  # name -> switches
    "gemm_conv+layer_norm_gn": dict(conv_gemm=True, group_norm=True),
    "gemm_conv+chunked_gn": dict(conv_gemm=True, group_norm=False),
    "mlx_conv+chunked_gn (the code before)": dict(conv_gemm=False, group_norm=False),
    "mlx_conv+layer_norm_gn": dict(conv_gemm=False, group_norm=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="MLX's conv only once per size (it is the slow one)")
    ap.add_argument("--tiny", action="store_true", help="a small VAE at 64 px (CPU smoke run)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([64] if args.tiny else [512, 1024])
    cfg = vae_mod.VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8) if args.tiny else vae_mod.VAEConfig()
    vae = vae_mod.Flux2VAE(cfg)
    vae.set_dtype(mx.bfloat16)
    mx.eval(vae.parameters())
    dev = mx.device_info().get("device_name", str(mx.default_device()))
    emit({"what": "setup", "device": dev, "backend": backend(), "mlx": mx.__version__,
          "defaults": {k: is_fast(k) for k in ("conv_gemm", "group_norm")}})
    for s in sizes:
        z = mx.random.normal((1, s // 8, s // 8, cfg.latent_channels)).astype(mx.bfloat16)
        img = mx.random.uniform(-1, 1, (1, s, s, 3)).astype(mx.bfloat16)
        for what in ("decode", "encode"):
            emit({"what": f"{what} size", "size": s, **count(vae, s, what)})
        for name, sw in PATHS.items():
            slow = not sw["conv_gemm"]
            if slow and args.quick and "layer_norm" in name:
                continue
            reps = 1 if slow and args.quick else args.reps
            with using(**sw):
                dec = timed(lambda: vae.decoder(z), reps)
                enc = timed(lambda: vae.encoder(img), reps)
                ref = None
                if name.startswith("gemm_conv+layer"):  # agreement of the default path with MLX's conv, bf16
                    with using(conv_gemm=False, group_norm=False):
                        ref = vae.decoder(z).astype(mx.float32)
                    got = vae.decoder(z).astype(mx.float32)
                    ref = {"bf16_vs_code_before_max_rel": round((mx.abs(got - ref).max() / mx.abs(ref).max()).item(), 5),
                           "bf16_vs_code_before_rel_l2": round((mx.linalg.norm(got - ref) / mx.linalg.norm(ref)).item(), 5)}
            emit({"what": "path", "size": s, "path": name, "decode_s": dec[0], "decode_peak_gb": dec[1],
                  "encode_s": enc[0], "encode_peak_gb": enc[1], **(ref or {})})
        # each decoder 3x3 convolution shape alone: MLX's, ours, a GEMM of the same FLOPs
        shapes = [(512, s // 8), (512, s // 4), (512, s // 2), (256, s), (128, s)] if not args.tiny else [(32, s // 2), (16, s)]
        for c, r in shapes:
            x = mx.random.normal((1, r, r, c)).astype(mx.bfloat16)
            w = (mx.random.normal((c, 3, 3, c)) * 0.02).astype(mx.bfloat16)
            a = mx.random.normal((r * r, 9 * c)).astype(mx.bfloat16)
            b = mx.random.normal((9 * c, c)).astype(mx.bfloat16)
            row = {"what": "conv3x3", "size": s, "channels": c, "res": r, "gflop": round(2 * r * r * 9 * c * c / 1e9, 2)}
            for key, fn in (("mlx_conv_s", lambda: ops_conv.conv2d(x, w, None, 1, 1, fast=False)),
                            ("gemm_conv_s", lambda: ops_conv.conv2d(x, w, None, 1, 1, fast=True)),
                            ("same_flops_gemm_s", lambda: a @ b)):
                row[key] = timed(fn, 1 if (key == "mlx_conv_s" and args.quick) else 5)[0]
            row["gemm_conv_tflops"] = round(row["gflop"] / 1e3 / row["gemm_conv_s"], 1) if row["gemm_conv_s"] else None
            emit(row)
        gn_x = mx.random.normal((1, s, s, 128 if not args.tiny else 16)).astype(mx.bfloat16)
        gw, gb = mx.ones((gn_x.shape[-1],)), mx.zeros((gn_x.shape[-1],))
        groups = cfg.norm_num_groups
        emit({"what": "groupnorm+silu at full resolution", "size": s,
              "layer_norm_s": timed(lambda: ops_conv.group_norm(gn_x, gw, gb, groups, silu=True, fast=True), 5)[0],
              "chunked_s": timed(lambda: ops_conv.group_norm(gn_x, gw, gb, groups, silu=True, fast=False), 5)[0],
              "mlx_nn_groupnorm_s": timed(lambda: nn.silu(nn.GroupNorm(groups, gn_x.shape[-1], pytorch_compatible=True)(gn_x)), 5)[0]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
