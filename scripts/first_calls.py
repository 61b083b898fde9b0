#!/usr/bin/env python3
"""What the first call of an operation at a new shape costs in this process, beside its second call:
the GEMMs, the attention (forward and backward) and an elementwise op at the sequence lengths a
bucketed klein-4b run meets (512 text tokens + 1,024 / 1,008 / 960 image tokens), bf16.

    python scripts/first_calls.py              # klein-4b's widths (hidden 3072, 24 heads of 128)
    python scripts/first_calls.py --tiny       # CPU smoke run

A training step meets its shapes all at once; a new bucket's first step costs seconds more than its
second even with every kernel on disk (docs/performance.md, "What a new bucket costs"). Timing each
kind of operation's first call alone says which of them pays per shape. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from datetime import date

import mlx.core as mx


def timed(fn, *args) -> float:
    t = time.perf_counter()
    mx.eval(fn(*args))
    return round(time.perf_counter() - t, 5)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", default="1024,1008,960,1024", help="image token counts, in turn")
    a = ap.parse_args(argv)
    d, heads, text = (64, 2, 16) if a.tiny else (3072, 24, 512)
    dt = mx.bfloat16
    w = mx.random.normal((3 * d, d)).astype(dt) * d ** -0.5
    w2 = mx.random.normal((d, d)).astype(dt) * d ** -0.5
    mx.eval(w, w2)
    sdpa = mx.fast.scaled_dot_product_attention

    def attn_grad(q, k, v):
        return mx.grad(lambda q: sdpa(q, k, v, scale=q.shape[-1] ** -0.5).astype(mx.float32).sum())(q)

    rows = []
    for n in (int(x) for x in a.tokens.split(",")):
        length = text + n
        x = mx.random.normal((1, length, d)).astype(dt)
        q, k, v = (mx.random.normal((1, heads, length, d // heads)).astype(dt) for _ in range(3))
        mx.eval(x, q, k, v)
        row = {"image_tokens": n, "sequence": length}
        for name, fn, args in (("gemm_qkv", lambda x: x @ w.T, (x,)),
                               ("gemm_qkv_weight_grad", lambda x: (x[0] @ w.T).T @ x[0], (x,)),
                               ("gemm_out", lambda x: x @ w2, (x,)),
                               ("elementwise", lambda x: mx.sin(x) * 1.5 + x, (x,)),
                               ("attention", lambda q, k, v: sdpa(q, k, v, scale=q.shape[-1] ** -0.5), (q, k, v)),
                               ("attention_grad", attn_grad, (q, k, v))):
            row[name] = [timed(fn, *args), timed(fn, *args)]  # first, second
        rows.append(row)
    result = {"first_calls": rows, "device": str(mx.default_device()), "mlx": mx.__version__, "date": date.today().isoformat()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
