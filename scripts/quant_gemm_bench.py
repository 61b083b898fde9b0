#!/usr/bin/env python3
"""Time a quantized base's GEMMs at training token counts, three ways, on the default device:
bf16 weights (the floor), the weight dequantised (mx.dequantize, and mflux2's dequantize_tile: a CUDA
kernel on the GPU) to bf16 just before a bf16 GEMM (mflux2's
`_dequantized_gemm`, tile by tile), and `mx.quantized_matmul` — for the forward (x @ W^T) and the
backward's input gradient (dy @ W). One JSON line per (layer shape, bits). Evidence for the choice
in mflux2/ops/gemm.py (docs/performance.md).

    python scripts/quant_gemm_bench.py --tokens 1536 --hidden 3072 --mlp 9216
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mflux2.ops.gemm import _dequantize_cuda, dequantize_tile  # noqa: E402
from mflux2.ops.switches import cuda_available  # noqa: E402


def timed(fn, reps: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--mlp", type=int, default=9216)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chain", type=int, default=8, help="GEMMs per evaluation (amortises launch and sync)")
    args = ap.parse_args(argv)
    d, m, n = args.hidden, args.mlp, args.tokens
    shapes = {"linear1": (3 * d + 2 * m, d), "linear2": (d, d + m), "qkv": (3 * d, d), "mlp_out": (d, m)}
    for name, (out_f, in_f) in shapes.items():
        w = (mx.random.normal((out_f, in_f)) * 0.02).astype(mx.bfloat16)
        x = mx.random.normal((n, in_f)).astype(mx.bfloat16)
        dy = mx.random.normal((n, out_f)).astype(mx.bfloat16)
        mx.eval(w, x, dy)
        c = args.chain
        row = {"layer": name, "out": out_f, "in": in_f, "tokens": n}
        row["bf16_fwd_ms"] = timed(lambda: [x @ w.T for _ in range(c)], args.reps) / c * 1e3
        row["bf16_bwd_ms"] = timed(lambda: [dy @ w for _ in range(c)], args.reps) / c * 1e3
        for bits in (8, 4):
            wq, s, b = mx.quantize(w, group_size=64, bits=bits)
            mx.eval(wq, s, b)
            mlx_deq = lambda: mx.dequantize(wq, s, b, group_size=64, bits=bits)  # noqa: E731
            deq = lambda: dequantize_tile(wq, s, b, (0, out_f), (0, in_f), 64, bits)  # noqa: E731 (mflux2's)
            half = lambda: dequantize_tile(wq, s, b, (out_f // 2, out_f), (in_f // 2, in_f), 64, bits)  # noqa: E731
            ref = mlx_deq()
            row[f"int{bits}_max_err"] = max(mx.abs(deq() - ref).max().item(),
                                            mx.abs(half() - ref[out_f // 2 :, in_f // 2 :]).max().item())
            row[f"int{bits}_mlx_dequant_only_ms"] = timed(lambda: [mlx_deq() for _ in range(c)], args.reps) / c * 1e3
            row[f"int{bits}_dequant_only_ms"] = timed(lambda: [deq() for _ in range(c)], args.reps) / c * 1e3
            if cuda_available():  # the CUDA kernel itself (dequantize_tile runs it for int8 only)
                kernel = lambda: _dequantize_cuda(wq, s, b, (0, out_f), (0, in_f), 64, bits)  # noqa: E731
                for vec in ("1", "0"):  # vectorised or scalar stores
                    os.environ["MFLUX2_DEQUANTIZE_VEC"] = vec
                    row[f"int{bits}_kernel_vec{vec}_max_err"] = mx.abs(kernel() - ref).max().item()
                    row[f"int{bits}_kernel_vec{vec}_only_ms"] = timed(lambda: [kernel() for _ in range(c)], args.reps) / c * 1e3
                os.environ.pop("MFLUX2_DEQUANTIZE_VEC")
            row[f"int{bits}_dequant_fwd_ms"] = timed(lambda: [x @ deq().T for _ in range(c)], args.reps) / c * 1e3
            row[f"int{bits}_dequant_bwd_ms"] = timed(lambda: [dy @ deq() for _ in range(c)], args.reps) / c * 1e3
            row[f"int{bits}_qmm_fwd_ms"] = timed(
                lambda: [mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=bits) for _ in range(c)], args.reps) / c * 1e3
            row[f"int{bits}_qmm_bwd_ms"] = timed(
                lambda: [mx.quantized_matmul(dy, wq, s, b, transpose=False, group_size=64, bits=bits) for _ in range(c)], args.reps) / c * 1e3
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
