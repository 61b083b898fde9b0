#!/usr/bin/env python3
"""Where a training step's device time goes, measured two ways (issue 33):

    # 1. every kernel of one step, timed by Nsight Compute (the GPU machine has ncu, not nsys):
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum,launch__grid_size \
        --csv --page raw --print-units base --log-file step.csv \
        python3 scripts/benchmark.py --model klein-4b --steps 3 --warmup 3 --cuda-profile-step
    python3 scripts/kernel_profile.py parse step.csv --step-s 0.060   # -> categories (JSON + a markdown table)

    # 2. the step's GEMMs and attention alone, same shapes, same process (splits the GEMM total of 1.
    #    into base and LoRA GEMMs, which kernel names cannot tell apart):
    python3 scripts/kernel_profile.py shapes --model klein-4b

    # 3. the modulation's LayerNorm alone at the step's shapes, each way (MLX's, folded, our CUDA kernel):
    python3 scripts/kernel_profile.py norms --reps 50

    # 4. no device at all: the step's graph, node kinds per block type and every copy (scripts/graph_census.py):
    python3 scripts/kernel_profile.py census --model klein-4b

`parse` sums the kernels' durations by category (from the kernel names: cuBLAS GEMMs, cuDNN attention
forward / backward, the norms, mflux2's RoPE and dequantisation kernels, copies, reductions, MLX's
fused and single elementwise kernels). ncu runs the kernels one at a time, so the sum is the device's
busy time; with `--step-s` (the step's median wall time, measured without ncu) the rest is reported
as the gaps between kernels (host encoding, launch latency, command-buffer boundaries).
`shapes` times, each compiled and alone: the base GEMMs of the blocks (forward + input gradient), the
LoRA GEMMs (down and up projections, their weight and input gradients), SDPA forward and forward +
backward; each line is the median of --reps evaluations.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = [  # (category, regex on the lower-cased kernel name), first match wins
    ("attention backward", r"sdpa.*bprop|fmha.*(bwd|bprop)|flash.*(bwd|bprop)"),
    ("attention forward", r"sdpa.*fprop|fmha.*(fwd|fprop)|flash.*(fwd|fprop)"),
    ("attention other", r"sdpa|fmha|flash"),
    ("GEMMs", r"nvjet|gemm|cutlass|xmma|gemv|cublas|matmul"),
    ("RoPE kernel", r"mflux2_rope"),
    ("dequantisation kernel", r"mflux2_dequant|dequant|affine_qmm|qmv|qmm"),
    ("norms (layer / RMS, forward + VJP)", r"layer_norm|rms_norm|layernorm|rmsnorm"),
    ("copies (concatenations, layouts)", r"copy|concat|slice_update|scatter|gather|pad"),
    ("reductions", r"reduce"),
    ("elementwise (MLX fused and single ops: modulation, gates, SwiGLU, residuals, casts, optimiser)",
     r"mlx::|unary|binary|ternary|compiled|fused"),
]


def _category(name: str) -> str:
    low = name.lower()
    return next((c for c, rx in CATEGORIES if re.search(rx, low)), "other")


def read_ncu_csv(path: str) -> list[dict]:
    """Rows of `ncu --csv --page raw --print-units base`: [{name, us, grid}] in launch order
    (a `.gz` file is read through gzip: the traces kept in docs/bench are compressed)."""
    raw = Path(path).read_bytes()
    lines = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode(errors="replace").splitlines()
    start = next((i for i, l in enumerate(lines) if '"Kernel Name"' in l), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV header (\"Kernel Name\") found; is it ncu --csv --page raw output?")
    rows = list(csv.reader(lines[start:]))
    head = rows[0]
    i_name, i_id = head.index("Kernel Name"), head.index("ID")
    i_t = next(i for i, h in enumerate(head) if h.startswith("gpu__time_duration"))
    i_grid = next((i for i, h in enumerate(head) if h.startswith("launch__grid_size")), None)
    unit = "nsecond"
    out = []
    for r in rows[1:]:
        if len(r) <= max(i_name, i_t):
            continue
        if not r[i_id].strip().isdigit():  # the units row
            unit = r[i_t] or unit
            continue
        t = float(r[i_t].replace(",", ""))
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
        grid = r[i_grid] if i_grid is not None else ""
        out.append({"name": r[i_name], "us": t * scale, "grid": grid})
    return out


def summarize(kernels: list[dict], step_s: float | None = None, small_gemm_us: float = 10.0) -> dict:
    cats: dict[str, list] = {}
    for k in kernels:
        cats.setdefault(_category(k["name"]), []).append(k["us"])
    total = sum(k["us"] for k in kernels)
    gemm = [k["us"] for k in kernels if _category(k["name"]) == "GEMMs"]
    table = {c: {"launches": len(v), "ms": round(sum(v) / 1e3, 3)} for c, v in sorted(cats.items(), key=lambda kv: -sum(kv[1]))}
    by_name: dict[str, list] = {}
    for k in kernels:
        by_name.setdefault(k["name"][:160], []).append(k["us"])
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:20]
    out = {
        "kernels": len(kernels), "kernel_ms": round(total / 1e3, 3), "categories": table,
        f"gemm_launches_under_{small_gemm_us:g}us": [sum(1 for t in gemm if t < small_gemm_us),
                                                      round(sum(t for t in gemm if t < small_gemm_us) / 1e3, 3)],
        "top_kernels": [{"name": n, "launches": len(v), "ms": round(sum(v) / 1e3, 3)} for n, v in top],
    }
    if step_s:
        out["step_ms"] = round(step_s * 1e3, 3)
        out["gaps_ms"] = round(step_s * 1e3 - total / 1e3, 3)
    return out


def markdown(summary: dict) -> str:
    rows = ["| kernels | launches | ms |", "| --- | ---: | ---: |"]
    for c, v in summary["categories"].items():
        rows.append(f"| {c} | {v['launches']} | {v['ms']} |")
    rows.append(f"| all kernels | {summary['kernels']} | {summary['kernel_ms']} |")
    if "gaps_ms" in summary:
        rows.append(f"| gaps between kernels (step {summary['step_ms']} ms − kernels) | | {summary['gaps_ms']} |")
    return "\n".join(rows)


# ---- the step's GEMMs and attention alone ------------------------------------------------------


def _time(fn, args, reps: int, warmup: int = 3) -> float:
    import mlx.core as mx

    ts = []
    for i in range(warmup + reps):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn(*args))
        mx.synchronize()
        if i >= warmup:
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def step_shapes(cfg, n_img: int, n_txt: int, rank: int, qkv_parts: bool) -> dict:
    """(tokens, in, out) of every block GEMM of a step with LoRA on the attention targets, and the
    LoRAs' (tokens, in, out parts)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    n = n_img + n_txt
    base, lora = [], []
    qkv = [d, d, d] if qkv_parts else [3 * d]
    for _ in range(cfg.num_layers):
        for t in (n_img, n_txt):
            base += [(t, d, o) for o in qkv] + [(t, d, d), (t, d, 2 * m), (t, m, d)]
            lora += [(t, d, qkv), (t, d, [d])]
    for _ in range(cfg.num_single_layers):
        base += [(n, d, o) for o in qkv] + [(n, d, 2 * m), (n, d + m, d)]
        lora += [(n, d, qkv), (n, d, [d])]  # linear1's q/k/v rows; linear2's attention columns
    return {"base": base, "lora": lora}


def time_shapes(model: str, resolution: int, text_len: int, rank: int, reps: int, tiny: bool = False) -> list[dict]:
    import mlx.core as mx

    from mflux2.models.transformer import preset

    cfg = _tiny_cfg() if tiny else preset(model)
    n_img = (resolution // 16) ** 2
    dt = mx.bfloat16
    out = []
    for parts in (False, True):
        sh = step_shapes(cfg, n_img, text_len, rank, parts)
        xs = {}
        def act(t, c):  # noqa: E306
            if (t, c) not in xs:
                xs[(t, c)] = mx.random.normal((t, c)).astype(dt)
            return xs[(t, c)]
        ws = [mx.random.normal((o, i)).astype(dt) * 0.02 for _, i, o in sh["base"]]
        xin = [act(t, i) for t, i, _ in sh["base"]]
        gout = [act(t, o) for t, _, o in sh["base"]]
        mx.eval(ws, list(xs.values()))
        fwd = mx.compile(lambda xin, ws: [x @ w.T for x, w in zip(xin, ws)])
        dgrad = mx.compile(lambda gout, ws: [g @ w for g, w in zip(gout, ws)])
        tf = _time(fwd, (xin, ws), reps)
        tb = _time(dgrad, (gout, ws), reps)
        a = [mx.random.normal((rank, i)).astype(dt) * 0.02 for _, i, _ in sh["lora"]]
        b = [[mx.random.normal((o, rank)).astype(dt) * 0.02 for o in outs] for _, _, outs in sh["lora"]]
        lx = [act(t, i) for t, i, _ in sh["lora"]]
        lg = [[act(t, o) for o in outs] for t, _, outs in sh["lora"]]
        mx.eval(a, b)

        def lora_all(lx, lg, a, b):
            res = []
            for x, gs, ai, bs in zip(lx, lg, a, b):
                h = x @ ai.T  # down
                res += [h @ bj.T for bj in bs]  # up, per part
                dh = None
                for g, bj in zip(gs, bs):
                    res.append(g.T @ h)  # dB per part
                    dh = g @ bj if dh is None else mx.addmm(dh, g, bj)  # dh
                res += [dh.T @ x, dh @ ai]  # dA, dx
            return res

        tl = _time(mx.compile(lora_all), (lx, lg, a, b), reps)
        n_lora_gemms = sum(3 + 2 * len(outs) for _, _, outs in sh["lora"])
        out.append({"what": "gemms alone", "qkv_parts": parts, "base_forward_s": round(tf, 5), "base_input_grad_s": round(tb, 5),
                    "base_gemms": 2 * len(sh["base"]), "lora_s": round(tl, 5), "lora_gemms": n_lora_gemms,
                    "base_tflop": round(2 * 2 * sum(t * i * o for t, i, o in sh["base"]) / 1e12, 3)})
    n, h, hd = n_img + text_len, cfg.num_attention_heads, cfg.attention_head_dim
    nb = cfg.num_layers + cfg.num_single_layers
    q = [mx.random.normal((1, h, n, hd)).astype(dt) for _ in range(nb)]  # one per block (nothing shared)
    k, v, cot = (mx.random.normal((1, h, n, hd)).astype(dt) for _ in range(3))
    mx.eval(q, k, v, cot)
    sdpa = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)  # noqa: E731
    fw = mx.compile(lambda q, k, v: [sdpa(qi, k, v) for qi in q])
    fb = mx.compile(lambda q, k, v, c: [mx.vjp(sdpa, [qi, k, v], [c])[1] for qi in q])
    out.append({"what": "attention alone", "blocks": nb, "forward_s": round(_time(fw, (q, k, v), reps), 5),
                "forward_backward_s": round(_time(fb, (q, k, v, cot), reps), 5)})
    return out


# ---- the modulation's LayerNorm alone (mflux2.ops.modulate) -------------------------------------

NORM_SHAPES = ((1, 512, 3072), (1, 1024, 3072), (1, 1536, 3072), (1, 1536, 6144))  # text, image, both (klein-4b, dev)


def time_norms(reps: int, shapes=NORM_SHAPES, inner: int = 8, eps: float = 1e-6) -> list[dict]:
    """Each way of computing layer_norm(x)·(1 + scale) + shift, bf16, shift/scale [1, 1, D], compiled:
    forward alone, and forward + VJP w.r.t. x alone (as under LoRA training, where the modulation
    needs no gradient). One evaluation runs `inner` copies on distinct inputs (the step runs ~40), so
    launch and synchronisation costs spread over them; the figure is per copy, the median of `reps`.
    Variants: today's formula (MLX's LayerNorm, then an elementwise kernel), modulate_ln (the fold, our
    VJP), the fold with MLX's own VJP (which forms the weight/bias gradients), layer_norm_cuda (CUDA
    only) and, for scale, mx.fast.rms_norm of the same x."""
    import mlx.core as mx

    from mflux2.ops import modulate, using
    from mflux2.ops.switches import cuda_available

    cuda = cuda_available() and mx.default_device() == mx.gpu
    dt = mx.bfloat16

    def with_switches(**sw):
        def run(x, sh, sc):
            with using(**sw):  # (read while tracing: mx.compile keeps the path it took)
                return modulate(x, sh, sc, eps)
        return run

    def fold_mlx_vjp(x, sh, sc):
        d = x.shape[-1]
        return mx.fast.layer_norm(x, (1 + sc).reshape(d), sh.reshape(d), eps)

    variants = {
        "mlx_layer_norm+elementwise": with_switches(modulate_ln=False, layer_norm_cuda=False),
        "modulate_ln": with_switches(modulate_ln=True, layer_norm_cuda=False),
        "fold_mlx_vjp": fold_mlx_vjp,
        "layer_norm_cuda": with_switches(layer_norm_cuda=True) if cuda else None,
        "rms_norm": lambda x, sh, sc: mx.fast.rms_norm(x, None, eps),
    }
    out, us = [], {}
    for shape in shapes:
        xs = [mx.random.normal(shape).astype(dt) for _ in range(inner)]
        gs = [mx.random.normal(shape).astype(dt) for _ in range(inner)]
        sh, sc = (mx.random.normal((1, 1, shape[-1])).astype(dt) * 0.5 for _ in range(2))
        mx.eval(xs, gs, sh, sc)
        for name, f in variants.items():
            if f is None:
                out.append({"what": "norms", "shape": list(shape), "variant": name, "skipped": "a CUDA kernel: no CUDA device here"})
                continue
            fwd = mx.compile(lambda xs, sh, sc, f=f: [f(x, sh, sc) for x in xs])
            vjp = mx.compile(lambda xs, gs, sh, sc, f=f: [mx.vjp(lambda x: f(x, sh, sc), [x], [g]) for x, g in zip(xs, gs)])
            for pass_, fn, args in (("forward", fwd, (xs, sh, sc)), ("forward+vjp", vjp, (xs, gs, sh, sc))):
                t = _time(fn, args, reps) / inner * 1e6
                us[(shape, name, pass_)] = t
                out.append({"what": "norms", "shape": list(shape), "variant": name, "pass": pass_, "us": round(t, 2)})
        del xs, gs
    base = "mlx_layer_norm+elementwise"
    summary = {f"{'x'.join(map(str, shape))} {pass_}": {name: round(t, 2) for (s_, name, p_), t in us.items() if s_ == shape and p_ == pass_}
               for shape in shapes for pass_ in ("forward", "forward+vjp")}
    for row in summary.values():
        for name in list(row):
            if name != base and row.get(base):
                row[f"{name} speedup"] = round(row[base] / row[name], 2)
    out.append({"what": "norms summary", "device": str(mx.default_device()), "cuda": cuda, "inner": inner, "reps": reps,
                "us_per_norm": summary})
    return out


def _tiny_cfg():
    from mflux2.models.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
                             joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parse", help="an ncu CSV of one step -> time per category")
    p.add_argument("csv")
    p.add_argument("--step-s", type=float, default=None, help="the step's median wall time (s), measured without ncu")
    p.add_argument("--markdown", action="store_true")
    s = sub.add_parser("shapes", help="the step's GEMMs and attention, each set alone")
    n = sub.add_parser("norms", help="the modulation's LayerNorm alone: MLX's, folded, our CUDA kernel, RMS norm for scale")
    n.add_argument("--reps", type=int, default=20)
    n.add_argument("--inner", type=int, default=8, help="norms per evaluation, each on its own input (default 8)")
    n.add_argument("--shapes", default=None, help="B,N,D;B,N,D;... (default: the klein-4b step's, and one at dev's width)")
    c = sub.add_parser("census", help="the step's graph, unevaluated: node kinds per block type and the copies")
    for q in (s, c):  # the step both build
        q.add_argument("--model", default="klein-4b")
        q.add_argument("--tiny", action="store_true")
        q.add_argument("--resolution", type=int, default=512)
        q.add_argument("--text-len", type=int, default=512)
        q.add_argument("--rank", type=int, default=32)
    s.add_argument("--reps", type=int, default=10)
    c.add_argument("--targets", default="attention")
    c.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "census":
        import graph_census

        res = graph_census.census(args.model, 64 if args.tiny else args.resolution, 8 if args.tiny else args.text_len,
                                  args.rank, args.targets, cfg=_tiny_cfg() if args.tiny else None)
        res["model"] = "tiny" if args.tiny else args.model
        print(json.dumps(res))
        if args.markdown:
            print(graph_census.markdown(res))
        return res
    if args.cmd == "norms":
        shapes = tuple(tuple(int(v) for v in sh.split(",")) for sh in args.shapes.split(";")) if args.shapes else NORM_SHAPES
        res = time_norms(args.reps, shapes, args.inner)
        for r in res:
            print(json.dumps(r))
        return res
    if args.cmd == "parse":
        summary = summarize(read_ncu_csv(args.csv), args.step_s)
        print(json.dumps(summary))
        if args.markdown:
            print(markdown(summary))
        return summary
    res = time_shapes(args.model, 256 if args.tiny else args.resolution, 32 if args.tiny else args.text_len, args.rank,
                      args.reps, args.tiny)
    for r in res:
        print(json.dumps({"model": "tiny" if args.tiny else args.model, **r}))
    return res


if __name__ == "__main__":
    main()
