#!/usr/bin/env python3
"""Time mflux2's real training step (the `TrainStep` the trainer runs) on random weights.

    python scripts/benchmark.py --model klein-4b --resolution 512 --rank 32 --targets attention
    python scripts/benchmark.py --model dev --base int8 --checkpointing 1 --mode dop-every --dop-every 8
    python scripts/benchmark.py --tiny          # CPU smoke run (CI)
    python scripts/benchmark.py --profile       # also time the forward alone and forward+backward alone
    python scripts/benchmark.py --control 1 --checkpointing 1   # edit training: 512² target + one 512² reference
    python scripts/benchmark.py --mode dop --dop-prompts 4   # DOP with loss.diff_output_preservation_prompts
    python scripts/benchmark.py --shapes 512x512,576x448,512x512   # each new shape's first step
    python scripts/benchmark.py --tiny --masked   # masked loss: a random weight per image token
    python scripts/benchmark.py --adapter lokr --factor 8   # LoKr/LoHa/DoRA (lora.type) instead of LoRA

Adapter types (--adapter lokr|loha|dora, with LoKr's --factor and --decompose-both): the rank is
chosen so that the trainable parameter count comes as close to rank-`--rank` LoRA's as the type
allows (--adapter-rank to set it); both counts are printed (adapter_params, lora_params_at_rank).
The FLOP count then leaves the adapter's own matmuls out (adapter_flops_counted: false).
`--compare lora,lokr:8,loha,dora` (TYPE or lokr:FACTOR) builds one model per entry on the same random
base and runs their plain steps in turn, one step each per round, so all see the same machine load
(for a busy CPU); prints each one's median s/step and its ratio to the first entry's.

Weights are random, initialised and quantised block by block, so dev's 32B never needs its 64 GB of
bf16 at once. Prints one JSON line: median s/step over the timed steps (after warm-up), peak memory
(mx.get_peak_memory), tokens/s, and achieved TFLOP/s from the FLOP count it prints.

FLOP count: a step of a frozen base needs the forward and the input-gradient half of the backward
(no weight gradients for the base): 2 × the forward's linear-layer FLOPs + 3 × its attention FLOPs,
plus the LoRA matmuls (forward, input and weight gradients: 3 × theirs). Each DOP step adds the
prior forward and the second (preservation) pass. Model FLOPs: a checkpointed step's recomputed
forward is not counted (tflops_achieved is then lower than the card's real throughput).

Edit (image-to-image) training (--control n): n reference images at the target's resolution (what
the trainer does with controls cropped like their targets), concatenated after x_t with ids t = 10, 20,
...; the loss on the target tokens. tokens/s and the FLOP count include the reference tokens.

Gradient checkpointing (--checkpointing n) runs TrainStep's block-by-block backward by default
(--no-blockwise: one compiled graph with mlx.nn.utils.checkpoint blocks instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mflux2.lora import apply_lora  # noqa: E402
from mflux2.models.quantization import QUANT_BITS, QUANT_GROUP_SIZE, quantize_outside_blocks, quantize_predicate  # noqa: E402
from mflux2.models.transformer import Flux2Transformer, TransformerConfig, preset  # noqa: E402
from mflux2.models.vae import image_ids  # noqa: E402
from mflux2.ops import SWITCHES, is_fast  # noqa: E402
from mflux2.training.data import preservation_prompts  # noqa: E402
from mflux2.training.memory import limit_command_batches, lora_parameters  # noqa: E402
from mflux2.training.step import Batch, StepConfig, TrainStep  # noqa: E402

# Tiny, but with enough blocks and tokens that activations (not weights) show in peak memory, so the
# CI test can see checkpointing lower it.
TINY = TransformerConfig(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
                         joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8))


def random_transformer(config: TransformerConfig, dtype=mx.bfloat16, base: str = "bf16", group_size: int | None = None) -> Flux2Transformer:
    """Random weights (the lazy default init), materialised and quantised one block at a time (the
    order and group sizes load_transformer uses)."""
    model = Flux2Transformer(config)
    bits = QUANT_BITS.get(base)
    group_size = group_size or QUANT_GROUP_SIZE.get(base)

    def materialise(unit):
        unit.update(tree_map(lambda a: a.astype(dtype), unit.parameters()))
        mx.eval(unit.parameters())

    top = {name: m for name, m in model.children().items() if isinstance(m, nn.Module)}
    for unit in top.values():
        materialise(unit)
    if bits:
        quantize_outside_blocks(model, bits, group_size)
        mx.eval({name: model[name].parameters() for name in top})
    for block in model.double_blocks + model.single_blocks:
        materialise(block)
        if bits:
            nn.quantize(block, class_predicate=quantize_predicate(group_size, bits))
            mx.eval(block.parameters())
    return model


def text_ids(length: int) -> mx.array:
    """The text tokens' position ids (0, 0, 0, i), as the trainer builds them."""
    return mx.concatenate([mx.zeros((length, 3)), mx.arange(length, dtype=mx.float32)[:, None]], axis=1)


def step_flops(cfg: TransformerConfig, n_img: int, n_txt: int, batch: int, rank: int, n_lora_inputs: int) -> dict:
    d, m, ctx = cfg.hidden_size, cfg.mlp_hidden, cfg.joint_attention_dim
    n = n_img + n_txt
    double_stream = 3 * d * d + d * d + 2 * m * d + m * d  # per token, one stream
    lin = 2 * batch * (
        cfg.num_layers * double_stream * n
        + cfg.num_single_layers * ((3 * d + 2 * m) * d + (d + m) * d) * n
        + n_img * cfg.in_channels * d + n_txt * ctx * d + n_img * d * cfg.in_channels
    )
    attn = 2 * batch * 2 * n * n * d * (cfg.num_layers + cfg.num_single_layers)
    lora = 2 * batch * n * rank * n_lora_inputs  # n_lora_inputs = Σ (in + out) over LoRA layers, per token
    forward = lin + attn + lora
    train = 2 * lin + 3 * attn + 3 * lora
    return {"forward": forward, "train_plain": train, "train_dop": train * 2 + forward}


def time_parts(step: TrainStep, batch: Batch, args) -> dict:
    """Median seconds of the compiled forward alone (no grad) and of forward+backward alone (no
    update), plain loss: where the step's time goes."""
    model = step.model
    fwd = mx.compile(lambda b, k: step.plain_loss(model, Batch(**b), k)[0], inputs=[model.state], outputs=[model.state])
    grad_fn = step._flat_grad_fn(False)

    def forward_backward(b, k):  # the step's own gradient (flat), the model's views put back after
        out = grad_fn(dict(step.flat), Batch(**b), k)
        step._install(step.flat)
        return out

    fb = mx.compile(forward_backward, inputs=[model.state, step.flat], outputs=[model.state])
    grads = {name: mx.random.normal(a.shape) * 1e-3 for name, a in step.flat.items()}
    mx.eval(grads)
    update = lambda _b, _k: step._fn("apply", False)(grads, mx.array(1.0))  # noqa: E731
    out = {}
    for name, fn in (("forward_s", fwd), ("forward_backward_s", fb), ("update_s", update)):
        ts = []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            mx.eval(fn(vars(batch), mx.random.key(i)))
            if i >= args.warmup:
                ts.append(time.perf_counter() - t)
        out[name] = round(statistics.median(ts), 5)
    return out


class cuda_profiler_range:
    """cuProfilerStart/Stop around a block (the CUDA driver, through ctypes; the primary context made
    current if this thread has none): what `ncu --profile-from-start off` profiles. A no-op where
    there is no CUDA driver."""

    def __enter__(self):
        import ctypes

        try:
            self.cuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            self.cuda = None
            return self
        ctx = ctypes.c_void_p()
        self.cuda.cuCtxGetCurrent(ctypes.byref(ctx))
        if not ctx.value:
            dev = ctypes.c_int()
            self.cuda.cuInit(0)
            self.cuda.cuDeviceGet(ctypes.byref(dev), 0)
            self.cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
            self.cuda.cuCtxSetCurrent(ctx)
        rc = self.cuda.cuProfilerStart()
        print(f"cuProfilerStart: {rc}", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        if self.cuda is not None:
            self.cuda.cuProfilerStop()
        return False


def trace_memory(step: TrainStep, batch: Batch, args, dop: bool) -> list:
    """One more step with each block-by-block evaluation synchronous: [active, peak] GB after each
    (embed/prep, forward segments, head, backward segments), then the update's peak."""
    import mflux2.training.step as step_mod

    rows = []

    class Trace:
        def __init__(self, ahead=0):
            pass

        def push(self, arrays):
            mx.eval(arrays)
            rows.append([round(mx.get_active_memory() / 1e9, 3), round(mx.get_peak_memory() / 1e9, 3)])
            mx.reset_peak_memory()

        def flush(self):
            pass

    saved, step_mod._Pipeline = step_mod._Pipeline, Trace
    try:
        mx.reset_peak_memory()
        out = step(batch, mx.random.key(12345), dop=dop)
        rows.append(["update"])
        mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
        rows[-1] += [round(mx.get_active_memory() / 1e9, 3), round(mx.get_peak_memory() / 1e9, 3)]
    finally:
        step_mod._Pipeline = saved
    return rows


def matched_rank(cfg, args, adapter, factor=-1, decompose_both=False) -> int:
    """--adapter-rank, or the rank whose parameter count is closest to rank --rank LoRA's."""
    if adapter == "lora":
        return args.rank
    target = lora_parameters(cfg, args.rank, args.targets)
    return args.adapter_rank or min(range(1, 1025), key=lambda r: (
        abs(lora_parameters(cfg, r, args.targets, adapter, factor, decompose_both) - target), r))


def compare(args, cfg, dtype, limit) -> dict:
    """Plain steps of several adapter types on one random base, in turn (one step each per round)."""
    import copy

    side = args.resolution // 16
    n_img = side * side
    base = random_transformer(cfg, dtype, args.base, args.group_size)
    txt_ids = text_ids(args.text_len)
    batch = Batch(latents=mx.random.normal((args.batch, n_img, cfg.in_channels)).astype(dtype),
                  prompt_embeds=mx.random.normal((args.batch, args.text_len, cfg.joint_attention_dim)).astype(dtype),
                  img_ids=image_ids(args.resolution, args.resolution), txt_ids=txt_ids)
    runs = []
    for entry in args.compare.split(","):  # TYPE[:FACTOR][@RANK] (RANK: this rank instead of the matched one)
        spec, _, fixed = entry.partition("@")
        kind, _, factor = spec.partition(":")
        factor = int(factor) if factor else -1
        model = copy.deepcopy(base)
        rank = int(fixed) if fixed else matched_rank(cfg, args, kind, factor, args.decompose_both)
        apply_lora(model, rank=rank, alpha=float(rank), targets=args.targets, type=kind,
                   **({"factor": factor, "decompose_both": args.decompose_both} if kind == "lokr" else {}))
        model.set_gradient_checkpointing(args.checkpointing)
        step = TrainStep(model, optim.AdamW(learning_rate=1e-4), StepConfig(compile=not args.no_compile, memory_limit=limit))
        runs.append({"entry": entry, "rank": rank, "params": sum(p.size for _, p in tree_flatten(model.trainable_parameters())),
                     "step": step, "times": []})
    key = mx.random.key(args.seed)
    for i in range(args.warmup + args.steps):
        for r in runs:
            key, sub = mx.random.split(key)
            t = time.perf_counter()
            out = r["step"](batch, sub)
            mx.eval(out["loss"], out["grad_norm"], r["step"].state_arrays())
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t)
    first = statistics.median(runs[0]["times"])
    result = {"compare": [{"entry": r["entry"], "rank": r["rank"], "params": r["params"],
                           "median_s_per_step": round(statistics.median(r["times"]), 5),
                           "ratio_to_first": round(statistics.median(r["times"]) / first, 3)} for r in runs],
              "lora_params_at_rank": lora_parameters(cfg, args.rank, args.targets), "model": "tiny" if args.tiny else args.model,
              "resolution": args.resolution, "text_len": args.text_len, "targets": args.targets, "dtype": args.dtype,
              "checkpointing": args.checkpointing, "steps": args.steps, "device": str(mx.default_device()),
              "load_average": os.getloadavg(), "date": date.today().isoformat()}
    print(json.dumps(result))
    return result


def shapes(args, cfg, dtype, limit) -> dict:
    """The first steps of each image shape in turn, in one process: a bucketed run meets a new token
    count whenever a bucket first comes up, and each new shape costs what the first step of a run
    costs less the tracing (kernels built or read from the disk cache; on CUDA cuDNN's attention
    plans and cuBLASLt's heuristics per shape). Per shape: the first step, the second, the median of
    the second and `--shape-steps` more, and the peak of them all."""
    if args.mode == "dop-every":
        raise SystemExit("--shapes takes --mode plain or dop")
    sizes = []
    for spec in args.shapes.split(","):
        w, _, h = spec.partition("x")
        w, h = int(w), int(h or w)
        if w % 16 or h % 16:
            raise SystemExit(f"--shapes {spec}: width and height must be multiples of 16")
        sizes.append((w, h))
    model = random_transformer(cfg, dtype, args.base, args.group_size)
    apply_lora(model, rank=args.rank, alpha=float(args.rank), targets=args.targets)
    model.set_gradient_checkpointing(args.checkpointing)
    step = TrainStep(model, optim.AdamW(learning_rate=1e-4),
                     StepConfig(guidance=1.0 if cfg.guidance_embeds else None, compile=not args.no_compile, memory_limit=limit))
    txt_ids = text_ids(args.text_len)
    prompt = mx.random.normal((args.batch, args.text_len, cfg.joint_attention_dim)).astype(dtype)
    dop_prompt = mx.random.normal(prompt.shape).astype(dtype) if args.mode == "dop" else None
    key, rows = mx.random.key(args.seed), []
    for w, h in sizes:
        batch = Batch(latents=mx.random.normal((args.batch, (w // 16) * (h // 16), cfg.in_channels)).astype(dtype),
                      prompt_embeds=prompt, img_ids=image_ids(h, w), txt_ids=txt_ids, dop_embeds=dop_prompt)
        mx.eval(batch.latents)
        mx.reset_peak_memory()
        times = []
        for _ in range(2 + args.shape_steps):
            key, sub = mx.random.split(key)
            t = time.perf_counter()
            out = step(batch, sub, dop=args.mode == "dop")
            mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
            times.append(round(time.perf_counter() - t, 4))
        rows.append({"shape": f"{w}x{h}", "tokens": (w // 16) * (h // 16), "first_s": times[0], "second_s": times[1],
                     "median_s": round(statistics.median(times[1:]), 5), "peak_gb": round(mx.get_peak_memory() / 1e9, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # as it comes, if the run is cut
    result = {"shapes": rows, "model": "tiny" if args.tiny else args.model, "mode": args.mode, "base": args.base, "text_len": args.text_len, "rank": args.rank,
              "checkpointing": args.checkpointing, "device": str(mx.default_device()),
              "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "MFLUX2_"))},
              "date": date.today().isoformat()}
    print(json.dumps(result))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="klein-4b", help="klein-4b | klein-9b | dev (and klein-base-*)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, for CPU smoke runs")
    ap.add_argument("--blocks", default=None,
                    help="DOUBLE,SINGLE: the preset's width with only this many blocks (per-block memory probes on a CPU)")
    ap.add_argument("--heads", type=int, default=None,
                    help="the preset with this many attention heads (its head size and MLP ratio kept: a narrower "
                         "model of the same structure, for quicker memory probes on a CPU)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--adapter", default="lora", choices=["lora", "lokr", "loha", "dora"], help="lora.type")
    ap.add_argument("--factor", type=int, default=-1, help="LoKr: LyCORIS's factor (-1 = automatic)")
    ap.add_argument("--decompose-both", action="store_true", help="LoKr: factor W1 too")
    ap.add_argument("--compare", default=None, help="TYPE[,TYPE|lokr:FACTOR|TYPE@RANK...]: interleaved plain steps of each "
                    "(at the rank matching --rank LoRA's parameter count, or @RANK)")
    ap.add_argument("--shapes", default=None, help="WxH[,WxH...]: the first two steps of each shape in turn, in one "
                    "process (what a new bucket's first step costs)")
    ap.add_argument("--shape-steps", type=int, default=0, help="--shapes: this many more steps per shape (their median)")
    ap.add_argument("--adapter-rank", type=int, default=None,
                    help="the adapter's rank (default: the one whose parameter count is closest to rank --rank LoRA's)")
    ap.add_argument("--control", type=int, default=0,
                    help="edit training: this many reference images at the target's resolution (0 = text-to-image)")
    ap.add_argument("--mode", default="plain", choices=["plain", "dop", "dop-every"])
    ap.add_argument("--dop-every", type=int, default=4)
    ap.add_argument("--dop-unbatched", action="store_true", help="DOP as three passes instead of main+pres batched")
    ap.add_argument("--dop-prompts", type=int, default=0,
                    help="DOP steps rotate this many more preservation prompts with the class prompt, as the trainer "
                         "does with loss.diff_output_preservation_prompts (0: the class prompt only)")
    ap.add_argument("--masked", action="store_true",
                    help="masked loss: random per-token weights (mean 1 per image, as a mask gives) on every step")
    ap.add_argument("--masked-interleaved", action="store_true",
                    help="masked and unmasked steps taking turns in one process: masked_ratio is the median of "
                         "each masked step's time over the unmasked step after it (less noise on a busy machine)")
    ap.add_argument("--checkpointing", type=int, default=0, help="checkpoint every n-th block (0 = off)")
    ap.add_argument("--no-blockwise", action="store_true",
                    help="checkpointing inside the one compiled graph (mlx.nn.utils.checkpoint) instead of the block-by-block backward")
    ap.add_argument("--ahead", type=int, default=1, help="block-by-block backward: segments the host may run ahead (0 = synchronous)")
    ap.add_argument("--pipeline-ahead", default="2",
                    help="StepConfig.pipeline_ahead: the one-graph step evaluated in pieces, the host this many ahead (none = one evaluation)")
    ap.add_argument("--memory-limit", default="auto",
                    help="StepConfig.memory_limit: auto (calibrated on the first step, GPU), a number of GB, or none")
    ap.add_argument("--profile", action="store_true", help="also time the compiled forward alone and forward+backward alone")
    ap.add_argument("--cuda-profile-step", action="store_true",
                    help="after the timed steps, one more step between cuProfilerStart/Stop (for `ncu --profile-from-start off`: "
                         "scripts/kernel_profile.py)")
    ap.add_argument("--trace-memory", action="store_true",
                    help="block-by-block path: evaluate each segment synchronously and record active/peak memory per phase")
    ap.add_argument("--base", default="bf16", choices=["bf16", "int8", "int4"])
    ap.add_argument("--group-size", type=int, default=None, help="quantization group size (default: load_transformer's for --base)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the model's compute dtype (float32: fast BLAS GEMMs for CPU probes)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    limit_command_batches(args.checkpointing, log=lambda *a: None)  # as the trainer does (before anything runs)
    mx.random.seed(args.seed)
    limit = {"auto": "auto", "none": None}.get(args.memory_limit.lower())
    limit = float(args.memory_limit) if limit is None and args.memory_limit.lower() != "none" else limit
    if args.tiny:
        cfg, args.resolution, args.text_len = TINY, min(args.resolution, 256), min(args.text_len, 32)
    else:
        cfg = preset(args.model)
    if args.blocks:
        n_double, n_single = (int(n) for n in args.blocks.split(","))
        cfg = TransformerConfig(**{**cfg.to_dict(), "num_layers": n_double, "num_single_layers": n_single})
    if args.heads:
        cfg = TransformerConfig(**{**cfg.to_dict(), "num_attention_heads": args.heads})
    if args.resolution % 16:
        ap.error("--resolution must be a multiple of 16")
    dtype = getattr(mx, args.dtype)
    if args.compare:
        return compare(args, cfg, dtype, limit)
    if args.shapes:
        return shapes(args, cfg, dtype, limit)
    t0 = time.perf_counter()
    model = random_transformer(cfg, dtype, args.base, args.group_size)
    lora_count = lora_parameters(cfg, args.rank, args.targets)
    rank = matched_rank(cfg, args, args.adapter, args.factor, args.decompose_both)
    wrapped = apply_lora(model, rank=rank, alpha=float(rank), targets=args.targets, type=args.adapter,
                         **({"factor": args.factor, "decompose_both": args.decompose_both} if args.adapter == "lokr" else {}))
    model.set_gradient_checkpointing(args.checkpointing)
    adapter_count = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
    lora_io = sum(sum(p.shape) for k, p in tree_flatten(model.trainable_parameters()) if k.endswith("lora_A") or k.endswith("lora_A.weight"))
    lora_io = lora_io if args.adapter == "lora" else 0  # (other types: their matmuls are not in the FLOP count)
    load_s = time.perf_counter() - t0
    weights = mx.get_active_memory()

    side = args.resolution // 16
    n_img, b = side * side, args.batch
    g = (1.0 if cfg.guidance_embeds else None)
    step = TrainStep(model, optim.AdamW(learning_rate=1e-4, weight_decay=1e-4),
                     StepConfig(guidance=g, dop_batched=not args.dop_unbatched, compile=not args.no_compile,
                                blockwise=not args.no_blockwise, blockwise_ahead=args.ahead, memory_limit=limit,
                                pipeline_ahead=None if args.pipeline_ahead.lower() == "none" else int(args.pipeline_ahead)))
    img_ids = image_ids(args.resolution, args.resolution)
    txt_ids = text_ids(args.text_len)
    n_ref = n_img * args.control
    batch = Batch(
        latents=mx.random.normal((b, n_img, cfg.in_channels)).astype(dtype),
        prompt_embeds=mx.random.normal((b, args.text_len, cfg.joint_attention_dim)).astype(dtype),
        img_ids=img_ids, txt_ids=txt_ids,
        dop_embeds=mx.random.normal((b, args.text_len, cfg.joint_attention_dim)).astype(dtype),
        refs=mx.random.normal((b, n_ref, cfg.in_channels)).astype(dtype) if args.control else None,
        ref_ids=mx.concatenate([image_ids(args.resolution, args.resolution, t=10 * (j + 1)) for j in range(args.control)])
        if args.control else None,
        # what data.token_weights makes of a grey-level mask: area means normalised to mean 1 per image
        token_weights=(lambda w: w / w.mean(axis=1, keepdims=True))(mx.random.uniform(0.05, 1.0, (b, n_img)))
        if args.masked or args.masked_interleaved else None,
    )
    mx.eval(batch.latents, batch.prompt_embeds, batch.dop_embeds, batch.refs if args.control else [],
            batch.token_weights if batch.token_weights is not None else [])
    unmasked = dataclasses.replace(batch, token_weights=None)
    # loss.diff_output_preservation_prompts: more preservation embeddings, chosen per DOP step by the
    # trainer's own rotation (data.preservation_prompts); "class" stands for the class prompts
    kept = {"class": batch.dop_embeds} | {f"p{j}": mx.random.normal(batch.dop_embeds.shape).astype(dtype)
                                          for j in range(args.dop_prompts)}
    mx.eval(kept)

    def is_dop(i):
        return args.mode == "dop" or (args.mode == "dop-every" and i % args.dop_every == 0)

    def is_masked(i):
        return args.masked or (args.masked_interleaved and i % 2 == 0)

    def batch_at(i):
        this = batch if is_masked(i) else unmasked
        if not args.dop_prompts or not is_dop(i):
            return this
        every = args.dop_every if args.mode == "dop-every" else 1
        name = preservation_prompts([SimpleNamespace(dop_caption="class")] * b, i, every, list(kept)[1:])[0]
        return dataclasses.replace(this, dop_embeds=kept[name])

    if args.masked_interleaved:
        args.warmup += args.warmup % 2  # the timed steps start with a masked one
    times, dispatch, losses, warm = [], [], [], []
    mx.reset_peak_memory()
    key = mx.random.key(args.seed)
    for i in range(args.warmup + args.steps):
        key, sub = mx.random.split(key)
        t = time.perf_counter()
        out = step(batch_at(i), sub, dop=is_dop(i))
        mx.async_eval(out["loss"], out["grad_norm"], step.state_arrays())
        host = time.perf_counter() - t  # graph built and handed to the device
        mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
        dt = time.perf_counter() - t
        if i < args.warmup:
            warm.append(round(dt, 3))  # the first: tracing, compiling, kernel builds (cuDNN plans on CUDA)
        else:
            times.append(dt)
            dispatch.append(host)
            losses.append(out["loss"].item())

    peak = mx.get_peak_memory()
    if args.cuda_profile_step:  # one more step, alone in the profiler's range (nothing queued before it)
        mx.synchronize()
        with cuda_profiler_range():
            out = step(batch_at(0), mx.random.key(99), dop=is_dop(0))
            mx.eval(out["loss"], out["grad_norm"], step.state_arrays())
            mx.synchronize()
    profile = time_parts(step, batch, args) if args.profile else {}
    if args.trace_memory:
        profile["memory_trace_gb"] = trace_memory(step, batch, args, is_dop(0))
    fl = step_flops(cfg, n_img + n_ref, args.text_len, b, args.rank, lora_io)
    n_dop = sum(is_dop(i) for i in range(args.warmup, args.warmup + args.steps))
    flops = (fl["train_plain"] * (args.steps - n_dop) + fl["train_dop"] * n_dop) / args.steps
    med = statistics.median(times)
    if args.masked_interleaved:  # timed steps alternate masked, unmasked, masked, ...
        pairs = [(times[j], times[j + 1]) for j in range(0, len(times) - 1, 2)]
        profile["masked_median_s"] = round(statistics.median(m for m, _ in pairs), 5)
        profile["unmasked_median_s"] = round(statistics.median(u for _, u in pairs), 5)
        profile["masked_ratio"] = round(statistics.median(m / u for m, u in pairs), 4)
        ratios = sorted(m / u for m, u in pairs)
        profile["masked_ratio_iqr"] = [round(ratios[len(ratios) // 4], 4), round(ratios[(3 * len(ratios)) // 4], 4)]
    result = {
        "model": "tiny" if args.tiny else args.model, "blocks": args.blocks, "heads": args.heads, "resolution": args.resolution, "batch": b, "rank": args.rank,
        "control": args.control, "image_tokens": n_img, "reference_tokens": n_ref,
        "targets": args.targets, "mode": args.mode, "dop_every": args.dop_every if args.mode == "dop-every" else None,
        "dop_batched": not args.dop_unbatched, "dop_prompts": args.dop_prompts, "masked": "interleaved" if args.masked_interleaved else args.masked, "checkpointing": args.checkpointing,
        "blockwise": bool(args.checkpointing) and not args.no_blockwise, "ahead": args.ahead, "base": args.base, "group_size": args.group_size or QUANT_GROUP_SIZE.get(args.base), "dtype": args.dtype,
        "pipeline_ahead": args.pipeline_ahead,
        "compiled": not args.no_compile, "lora_layers": len(wrapped),
        "adapter": args.adapter, "adapter_rank": rank, "factor": args.factor if args.adapter == "lokr" else None,
        "decompose_both": args.decompose_both if args.adapter == "lokr" else None,
        "adapter_params": adapter_count, "lora_params_at_rank": lora_count, "adapter_flops_counted": args.adapter == "lora",
        "median_s_per_step": round(med, 5), "mean_s_per_step": round(statistics.mean(times), 5),
        "peak_memory_gb": round(peak / 1e9, 3), "weights_gb": round(weights / 1e9, 3), "peak_memory_bytes": peak,
        "tokens_per_s": round(b * (n_img + n_ref + args.text_len) / med, 1),
        "tflop_per_step": round(flops / 1e12, 4), "tflops_achieved": round(flops / med / 1e12, 2),
        "loss_finite": all(l == l for l in losses), "setup_s": round(load_s, 1), **profile,
        "host_s": round(statistics.median(dispatch), 5),
        "warmup_step_s": warm,
        "memory_limit_gb": round(step.memory_limit / 1e9, 3) if step.memory_limit else None,
        "mlx_max_ops_per_buffer": os.environ.get("MLX_MAX_OPS_PER_BUFFER"),
        "fast_ops": sorted(name for name in SWITCHES if is_fast(name)),  # the switches in force (mflux2.ops)
        "device": str(mx.default_device()), "mlx": mx.__version__, "machine": platform.machine(),
        "date": date.today().isoformat(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
