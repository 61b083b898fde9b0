"""The training step: flow-matching loss, DOP, and the compiled update.

One `TrainStep` owns the compiled functions the trainer (and `scripts/benchmark.py`) call. Everything
inside a step stays on the device: timesteps and noise are drawn from an explicit key, a non-finite
loss skips the update with `mx.where` instead of a host check, and the caller evaluates once per step.
With gradient checkpointing the step runs `BlockwiseBackward` (segments recomputed and differentiated
one evaluation at a time); on a GPU it also bounds MLX's run-ahead with a calibrated memory limit.
Measurements and the reasons: docs/performance.md.
Semantics: docs/training.md ("Flow matching, timesteps, weighting", "DOP — Differential Output
Preservation").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mflux2.lora import ADAPTER_MATRICES, dropout_key, lora_disabled
from mflux2.models import transformer
from mflux2.ops import flat_views, is_fast
from mflux2.ops.split import Transposed, flat_view, flatten_as
from mflux2.training.timesteps import loss_weight, sample_timesteps


@dataclass
class StepConfig:
    timestep_sampling: str = "balanced"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    flux_shift: float = 1.0
    weighting: str = "uniform"
    dop_multiplier: float = 1.0
    dop_batched: bool = True  # main + preservation passes as one 2B forward/backward
    guidance: float | None = None  # dev's embedded guidance during training; None for klein
    max_grad_norm: float | None = None
    compile: bool = True
    # With gradient checkpointing on (model.set_gradient_checkpointing(n)): True (default) runs the
    # block-by-block backward below — segments of n blocks, only their inputs kept, each recomputed
    # and differentiated in its own evaluation; False keeps one compiled graph with
    # mlx.nn.utils.checkpoint blocks (MLX may then schedule the recomputations together).
    blockwise: bool = True
    # ... and how many segments the host may encode ahead of the device: 1 overlaps encoding with
    # running; 0 runs each segment to completion first, so only one segment's temporaries exist at a
    # time (the lowest peak, at the cost of the overlap).
    blockwise_ahead: int = 1
    # MLX's memory limit is also its back-pressure: above it, evaluation waits for the device
    # instead of encoding further ahead. Buffers the host has released but queued device work still
    # uses count as active memory until that work completes, so without a limit the host's
    # run-ahead adds to the peak (on an H100: 12.4 GB live, 20 GB peak for the klein-4b step).
    # "auto" (on a GPU): the second step of each kind (shapes, DOP) runs fully serialised, so its
    # peak is the true live set, and the limit is then kept just above that — for the block-by-block
    # (checkpointed) step and a one-graph step evaluated at once (pipeline_ahead None); a one-graph
    # step evaluated in pieces needs none. A number: that many GB. None: MLX's default.
    memory_limit: str | float | None = "auto"
    # The one-graph step (no checkpointing) is evaluated in pieces — the forward pass, then the
    # backward pass block by block — with the host at most `pipeline_ahead` pieces ahead of the
    # device, so run-ahead cannot pile up released-but-in-flight buffers (same values, same graph).
    # None: one evaluation (the caller's).
    pipeline_ahead: int | None = 2
    # Data parallel (mx.distributed): this process is rank r of n and holds samples [r·B, (r+1)·B) of a
    # global batch of n·B. Timesteps and noise are drawn for the global batch and sliced, so n
    # processes reproduce one process with batch n·B exactly; gradients are averaged with all_sum.
    shard: tuple[int, int] | None = None


@dataclass
class Batch:
    """One step's inputs. latents [B, N, 128] are the packed, BN-normalised VAE latents (x0).

    Edit training: `refs` are the clean latents of the reference (control) images, encoded like x0
    and concatenated after x_t on the token axis with their ids (t = 10, 20, ...); they are never
    noised and their predictions are dropped: the loss is on the N target tokens only."""

    latents: mx.array
    prompt_embeds: mx.array  # [B, L, ctx]
    img_ids: mx.array  # [N, 4]
    txt_ids: mx.array  # [L, 4]
    dop_embeds: mx.array | None = None  # [B, L, ctx] class-word prompts (DOP)
    refs: mx.array | None = None  # [B, M, 128] reference latents (edit training)
    ref_ids: mx.array | None = None  # [M, 4]
    # Masked loss and per-dataset loss weights, for the main pass only: a weight per target
    # token (the mask area-pooled to the token grid, mean 1 per image) and one per sample. None: 1.
    token_weights: mx.array | None = None  # [B, N]
    sample_weights: mx.array | None = None  # [B]


def noisy_inputs(x0: mx.array, key: mx.array, cfg: StepConfig):
    """x_t = (1 - t)·x0 + t·ε, target v = ε - x0, with t and ε drawn from `key`."""
    k_t, k_n = mx.random.split(key)
    b = x0.shape[0]
    rank, n = cfg.shard or (0, 1)
    t = sample_timesteps(cfg.timestep_sampling, k_t, b * n, cfg.logit_normal_mean, cfg.logit_normal_std, cfg.flux_shift)
    noise = mx.random.normal((b * n, *x0.shape[1:]), dtype=mx.float32, key=k_n)
    if n > 1:
        t, noise = t[rank * b : (rank + 1) * b], noise[rank * b : (rank + 1) * b]
    x0 = x0.astype(mx.float32)
    tb = t[:, None, None]
    return ((1 - tb) * x0 + tb * noise), noise - x0, t


def average_across_processes(grads, loss, n: int):
    """Mean of the gradients (and losses) over n processes in ONE all_sum of a flat float32 vector."""
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(grads)[::-1]  # last block first: the backward pass's order (see global_norm)
    vec = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in flat] + [loss.astype(mx.float32).reshape(1)])
    vec = mx.distributed.all_sum(vec) / n
    out, i = [], 0
    for k, g in flat:
        out.append((k, vec[i : i + g.size].reshape(g.shape).astype(g.dtype)))
        i += g.size
    return tree_unflatten(out), vec[-1]


def global_norm(grads) -> mx.array:
    """The global L2 norm, summed from the LAST gradient of the tree to the first.

    The order matters for memory: MLX evaluates a graph depth-first in input order, so the first
    gradient it meets is computed first. LoRA gradients flatten in block order, and block 0's
    needs the whole backward pass: visited first, every block's output cotangents would stay alive
    until the other blocks' weight gradients were computed at the very end. Summing from the last
    block computes each block's weight gradients (and frees its cotangents) as the backward pass
    reaches it."""
    total = None
    for _, g in reversed(tree_flatten(grads)):
        sq = mx.square(g.astype(mx.float32)).sum()
        total = sq if total is None else total + sq
    return mx.sqrt(total) if total is not None else mx.array(0.0)


def _mse_per_sample(pred: mx.array, target: mx.array, token_weights: mx.array | None = None) -> mx.array:
    """Mean over tokens and channels of (pred - target)²; with `token_weights` [B, N] the token mean is
    weighted (the weights have mean 1 per sample: a weighted mean that keeps the loss's scale)."""
    pred = pred[:, : target.shape[1]]  # the target's tokens; references' predictions are dropped
    sq = mx.square(pred.astype(mx.float32) - target)
    if token_weights is None:
        return mx.mean(sq, axis=(1, 2))
    return mx.mean(mx.mean(sq, axis=2) * token_weights.astype(mx.float32), axis=1)


def main_loss(pred, target, t, weighting: str, token_weights=None, sample_weights=None) -> mx.array:
    """The flow-matching loss of the main pass: per sample the (masked) MSE × the timestep weighting ×
    the sample's loss weight, averaged over the batch."""
    per = _mse_per_sample(pred, target, token_weights) * loss_weight(weighting, t)
    if sample_weights is not None:
        per = per * sample_weights.astype(mx.float32)
    return mx.mean(per)


def image_stream(xt: mx.array, batch: Batch, dtype) -> tuple[mx.array, mx.array]:
    """The transformer's image input and ids: x_t, or [x_t ; refs] with [img_ids ; ref_ids] in edit
    training. The references repeat on the batch axis when x_t stacks passes (DOP's main +
    preservation forward)."""
    if batch.refs is None:
        return xt.astype(dtype), batch.img_ids
    refs = batch.refs
    if refs.shape[0] != xt.shape[0]:
        refs = mx.concatenate([refs] * (xt.shape[0] // refs.shape[0]))
    x = mx.concatenate([xt.astype(dtype), refs.astype(dtype)], axis=1)
    return x, mx.concatenate([batch.img_ids, batch.ref_ids], axis=-2)


def _on_gpu() -> bool:
    return mx.default_device().type == mx.gpu


def _key_split(key, n: int) -> list:
    return list(mx.random.split(key, n)) if n > 1 else [key]


class BlockwiseBackward:
    """Gradient checkpointing with the evaluation order under control.

    Forward: the blocks run in segments of `every` blocks, each segment one compiled call, its
    output evaluated before the host gets more than one segment ahead (`_Pipeline`); only the
    segments' inputs are kept. Backward: from the last segment to the first, each segment is
    recomputed and differentiated with `mx.vjp` in one compiled call, evaluated the same way, so
    about one segment's activations exist at a time (plus the segment inputs). Under one compiled
    graph with mlx.nn.utils.checkpoint, MLX's depth-first scheduling is free to run recomputations
    early, and the H100 peak only fell from 21.4 to 17.3 GB. The gradients are the plain
    path's: the same operations on the same values, summed in the same places. Trainable
    parameters outside the blocks (the final layer, the embedders) get theirs through the head's
    VJP and a VJP of `embed` fed with the cotangents of every block's shared inputs.

    LoRA dropout: each segment draws its masks from its own key (`mflux2.lora.dropout_key`), so
    the recomputation draws the same masks as the forward pass."""

    def __init__(self, model, every: int, compile: bool = True, ahead: int = 1):
        self.model, self.ahead = model, ahead
        n = model.num_blocks
        self.blocks = list(model.double_blocks) + list(model.single_blocks)
        self.segments = [list(range(a, min(a + every, n))) for a in range(0, n, every)]
        outer = {k: v for k, v in model.trainable_parameters().items() if k not in ("double_blocks", "single_blocks")}
        self.head_trainable = "final_layer" in outer and bool(tree_flatten(outer["final_layer"]))
        self.prelude_trainable = any(tree_flatten(v) for k, v in outer.items() if k != "final_layer")
        c = mx.compile if compile else (lambda f: f)
        self._fwd = [c(partial(self._segment, k)) for k in range(len(self.segments))]
        self._bwd = [c(partial(self._segment_vjp, k)) for k in range(len(self.segments))]
        self._embed = c(self._embed_fn)
        self._embed_vjp = c(self._embed_vjp_fn)
        self._compile = c
        self._heads = {}

    # ---- pure functions of explicit parameters (what gets compiled) ---------------------------
    def _with_params(self, modules, params, fn):
        saved = [m.trainable_parameters() for m in modules]
        for m, p in zip(modules, params):
            m.update(p)
        try:
            return fn()
        finally:
            for m, p in zip(modules, saved):
                m.update(p)

    def _segment(self, k, params, state, ctx, key):
        idx = self.segments[k]

        def run():
            with dropout_key(key):  # LoRA dropout: the same masks in the forward and the recompute
                st = tuple(state)
                for i in idx:
                    st = self.model.block(i, st, ctx)
                return st

        return self._with_params([self.blocks[i] for i in idx], params, run)

    def _segment_vjp(self, k, params, state, ctx, key, cot):
        flat, ns = tree_flatten(params), len(state)
        np_ = len(flat)

        def f(*args):
            p = tree_unflatten([(path, a) for (path, _), a in zip(flat, args[:np_])])
            c = tuple(args[np_ + ns :]) if self.prelude_trainable else ctx
            return list(self._segment(k, p if flat else params, args[np_ : np_ + ns], c, key))

        primals = [a for _, a in flat] + list(state) + (list(ctx) if self.prelude_trainable else [])
        _, vjps = mx.vjp(f, primals, list(cot))
        grads = tree_unflatten([(path, g) for (path, _), g in zip(flat, vjps[:np_])]) if flat else params
        d_ctx = tuple(vjps[np_ + ns :]) if self.prelude_trainable else ()
        return grads, tuple(vjps[np_ : np_ + ns]), d_ctx

    def _embed_fn(self, params, inputs):
        return self._with_params([self.model], [params], lambda: self.model.embed(*inputs))

    def _embed_vjp_fn(self, params, inputs, cot_state, cot_ctx):
        flat = tree_flatten(params)

        def f(*args):
            p = tree_unflatten([(path, a) for (path, _), a in zip(flat, args)])
            state, ctx = self._with_params([self.model], [p], lambda: self.model.embed(*inputs))
            return list(state) + list(ctx)

        _, vjps = mx.vjp(f, [a for _, a in flat], list(cot_state) + list(cot_ctx))
        return tree_unflatten([(path, g) for (path, _), g in zip(flat, vjps)])

    def _head(self, loss_fn, n_img, n_args: int = 0):
        key = (loss_fn, n_img, n_args)
        if key not in self._heads:
            model = self.model

            def fn(params, state, ctx, args):
                def loss(p, st, c):
                    pred = self._with_params([model.final_layer], [p], lambda: model.head(st, c, n_img))
                    return loss_fn(pred, *args)

                argnums = (0, 1, 2) if self.prelude_trainable else (0, 1)
                (value, aux), grads = mx.value_and_grad(loss, argnums=argnums)(params, state, ctx)
                return value, aux, grads

            self._heads[key] = self._compile(fn)
        return self._heads[key]

    # ---- the pass -------------------------------------------------------------------------
    def __call__(self, inputs: tuple, loss_fn, loss_args: tuple, key) -> tuple:
        """inputs: the model's (hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
        guidance). Returns (loss, aux, grads) with grads shaped like model.trainable_parameters()."""
        model = self.model
        prelude = {k: v for k, v in model.trainable_parameters().items()
                   if k not in ("double_blocks", "single_blocks", "final_layer")}
        state, ctx = self._embed(prelude, inputs)
        keys = _key_split(key, len(self.segments))
        params = [[self.blocks[i].trainable_parameters() for i in seg] for seg in self.segments]
        saved, pending = [], _Pipeline(self.ahead)
        for k in range(len(self.segments)):
            saved.append(state)
            state = self._fwd[k](params[k], state, ctx, keys[k])
            pending.push(state)
        head = model.final_layer.trainable_parameters()
        value, aux, hgrads = self._head(loss_fn, inputs[0].shape[1], len(loss_args))(head, state, ctx, loss_args)
        cot = hgrads[1]
        d_ctx = list(hgrads[2]) if self.prelude_trainable else None
        pending.push(cot)
        block_grads = [None] * len(self.segments)
        for k in reversed(range(len(self.segments))):
            g, cot, dc = self._bwd[k](params[k], saved[k], ctx, keys[k], cot)
            saved[k] = None
            block_grads[k] = g
            if d_ctx is not None:
                d_ctx = [a + b for a, b in zip(d_ctx, dc)]
            pending.push([cot, g] + ([d_ctx] if d_ctx is not None else []))
        pending.flush()

        by_path = {}
        for k, seg in enumerate(self.segments):
            for i, g in zip(seg, block_grads[k]):
                name = f"double_blocks.{i}" if i < len(model.double_blocks) else f"single_blocks.{i - len(model.double_blocks)}"
                by_path.update({f"{name}.{p}": a for p, a in tree_flatten(g)})
        by_path.update({f"final_layer.{p}": a for p, a in tree_flatten(hgrads[0])})
        if self.prelude_trainable:
            pg = self._embed_vjp(prelude, inputs, cot, d_ctx)
            by_path.update(dict(tree_flatten(pg)))
        grads = tree_map_with_path(lambda path, _: by_path[path], model.trainable_parameters())
        return value, aux, grads


def _loss_weights(batch: Batch) -> tuple:
    """The block-by-block heads' extra loss arguments: none, or both weights (a missing one as ones)."""
    tw, sw = batch.token_weights, batch.sample_weights
    if tw is None and sw is None:
        return ()
    b, n = batch.latents.shape[:2]
    return (tw if tw is not None else mx.ones((b, n), mx.float32), sw if sw is not None else mx.ones((b,), mx.float32))


class _Pipeline:
    """async_eval each pushed result, and wait for the results pushed more than `ahead` pushes ago:
    the host stays at most `ahead` segments ahead of the device, so segments' temporaries do not pile
    up in flight (0: every segment is finished before the next is encoded)."""

    def __init__(self, ahead: int = 1):
        self.ahead, self.queue = ahead, deque()

    def push(self, arrays):
        mx.async_eval(arrays)
        self.queue.append(arrays)
        while len(self.queue) > self.ahead:
            mx.eval(self.queue.popleft())

    def flush(self):
        while self.queue:
            mx.eval(self.queue.popleft())


class FlatParameters:
    """The trainable parameters as one flat array per dtype; the model's arrays are views into it.

    The optimiser then updates one array per dtype instead of one per LoRA matrix (klein-4b: 120),
    and gradient clipping and the NaN guard read one: about 840 fewer graph nodes a step, the
    update 4.0 → 0.9 ms on an H100 (docs/performance.md). Elementwise optimisers (AdamW, Lion, SGD)
    give exactly what they give per parameter. The layout runs from the last block to the first —
    the backward pass's order, so concatenating the gradients never waits on block 0's (see
    global_norm). LoRA matrices whose dtype differs from the model's are cast once, as a whole,
    for the forward pass (`split`), instead of one cast per matrix in each LoRA layer (the factors
    of every adapter type, not DoRA's magnitude, which stays float32: see mflux2.lora.ADAPTER_MATRICES)."""

    def __init__(self, model, compute_dtype):
        leaves = tree_flatten(model.trainable_parameters())[::-1]
        self.paths = [p for p, _ in leaves]
        self.owners = [_owner(model, p) for p in self.paths]
        self.groups = {}  # name -> [(index, offset, size, shape)]
        self.casts = {}  # name -> dtype the forward pass reads it in
        self.dtypes = {}  # name -> dtype of the flat array
        # LoRA's factors are stored transposed: their gradients come out of the GEMMs transposed and
        # then flatten without a copy (switch "flat_transposed"; mflux2.ops.split.Transposed). The
        # group's name says so ("_t"): the optimiser state saved for a resume is in this order, and a
        # checkpoint of the other order then fails to resume by name instead of being misread.
        transpose = is_fast("flat_transposed")
        self.model, self.compute_dtype, self.transposed = model, compute_dtype, transpose
        for i, (path, a) in enumerate(leaves):
            leaf = path.rsplit(".", 1)[-1]
            cast = leaf in ADAPTER_MATRICES and a.dtype != compute_dtype  # (not DoRA's magnitude)
            transposed = transpose and leaf in ("lora_A", "lora_B") and a.ndim == 2
            name = str(a.dtype).split(".")[-1] + ("_lora" if cast else "") + ("_t" if transposed else "")
            if cast:
                self.casts[name] = compute_dtype
            self.dtypes[name] = a.dtype
            entries = self.groups.setdefault(name, [])
            offset = entries[-1][1] + entries[-1][2] if entries else 0
            entries.append((i, offset, a.size, Transposed(a.shape) if transposed else a.shape))
        self.installed = None
        # In layout order, the last entry of each block (its gradient is computed last in the
        # block's backward pass): what the one-graph step evaluates piece by piece.
        block = [".".join(p.split(".")[:2]) if p.startswith(("double_blocks.", "single_blocks.")) else "" for p in self.paths]
        self.block_ends = [i for i in range(len(self.paths)) if block[i] and (i + 1 == len(self.paths) or block[i + 1] != block[i])]
        self.collect = None  # a list while a step is traced: the cotangents at block_ends
        self._split = None

    def concat(self, arrays: list) -> dict:
        """Arrays in path order (parameters, gradients, cotangents), as this layout's flat arrays:
        one concatenation per group, then one cast to the group's dtype."""
        return {name: mx.concatenate([flatten_as(arrays[i], shape) for i, _, _, shape in entries]).astype(self.dtypes[name])
                for name, entries in self.groups.items()}

    def gather(self) -> dict:
        """The model's current values, flattened."""
        return self.concat(self.current())

    def current(self) -> list:
        return [owner[key] for owner, key in self.owners]

    def changed(self) -> bool:
        """Whether something replaced the model's arrays since the last `install` (a resume, a test)."""
        return self.installed is None or any(a is not b for a, b in zip(self.current(), self.installed))

    def views(self, flat: dict, cast: bool = False) -> list:
        out = [None] * len(self.paths)
        for name, entries in self.groups.items():
            src = flat[name].astype(self.casts[name]) if cast and name in self.casts else flat[name]
            for i, off, size, shape in entries:
                out[i] = flat_view(src, off, size, shape)
        return out

    def install(self, arrays: list):
        for (owner, key), a in zip(self.owners, arrays):
            owner[key] = a

    def from_other_layout(self, flat_state: dict[str, mx.array]) -> dict[str, mx.array] | None:
        """Flat optimiser state ({"<group>.<key>": array}, e.g. "float32.m") saved under the other
        setting of "flat_transposed" (a checkpoint of an earlier mflux2, or of a run with the switch
        set otherwise), re-laid out for this layout: each parameter's slice of every group is moved to
        its place here, transposed where one layout stores it transposed — exact, since the
        optimisers' state is elementwise per parameter. None when the state fits neither layout."""
        from mflux2.ops.switches import using

        with using(flat_transposed=not self.transposed):
            other = FlatParameters(self.model, self.compute_dtype)
        keys = {k.split(".", 1)[1] for k in flat_state if "." in k and k.split(".", 1)[0] in other.groups}
        if not keys or any(f"{name}.{k}" not in flat_state for name in other.groups for k in keys):
            return None
        out = {}
        for k in sorted(keys):
            old = {name: flat_state[f"{name}.{k}"] for name in other.groups}
            if any(old[name].size != sum(size for _, _, size, _ in entries) for name, entries in other.groups.items()):
                return None
            for name, a in self.concat(other.views(old)).items():
                out[f"{name}.{k}"] = a
        return out

    def remember(self):
        self.installed = self.current()

    def flatten(self, grads) -> dict:
        """A gradient tree shaped like trainable_parameters(), as flat arrays in this layout."""
        by_path = dict(tree_flatten(grads))
        return self.concat([by_path[p] for p in self.paths])

    def split(self, flat: dict) -> list:
        """Differentiable views for the forward pass (LoRA groups cast): the VJP concatenates the
        views' cotangents once per group instead of zero-padding each to the full size
        (mflux2.ops.flat_views), and hands the block ends' cotangents to `collect` on the way."""
        if self._split is None:
            self._split = flat_views(self.groups, self.casts, tap=self._collect)
        return self._split(*[flat[n] for n in self.groups])

    def _collect(self, cotangents: list):
        if self.collect is not None:
            self.collect.extend(cotangents[i] for i in self.block_ends)


def _owner(model, path: str):
    """(container, key) holding the array at `path` of a module tree."""
    obj, parts = model, path.split(".")
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj, parts[-1]


class TrainStep:
    """`step(batch, key, dop=False)` → dict of lazy scalars (loss, main, pres, grad_norm, t_mean, finite)."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, cfg: StepConfig, grad_accumulation: int = 1):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.accum = grad_accumulation
        self.dtype = model.dtype
        # The trainable parameters live in `self.flat` (one array per dtype); the model holds views.
        self.params = FlatParameters(model, self.dtype)
        self.flat = self.params.gather()
        self._install(self.flat)
        optimizer.init(self.flat)  # state must exist before it is captured by mx.compile
        self._fns = {}
        self._grad_acc = None
        self._n_acc = 0
        self._bw, self._bw_every = None, 0
        self._calibrated, self.memory_limit = {}, None
        if isinstance(cfg.memory_limit, (int, float)) and not isinstance(cfg.memory_limit, bool):
            self.memory_limit = int(cfg.memory_limit * 1e9)
            mx.set_memory_limit(self.memory_limit)

    # ---- losses ---------------------------------------------------------------------------
    def _forward(self, model, xt, embeds, t, batch):
        """The velocity prediction for the N target tokens of x_t."""
        b, n = xt.shape[:2]
        g = mx.full((b,), self.cfg.guidance, dtype=mx.float32) if self.cfg.guidance is not None else None
        x, ids = image_stream(xt, batch, self.dtype)
        return model(x, embeds.astype(self.dtype), t, ids, batch.txt_ids, g)[:, :n]

    def plain_loss(self, model, batch: Batch, key):
        xt, target, t = noisy_inputs(batch.latents, key, self.cfg)
        pred = self._forward(model, xt, batch.prompt_embeds, t, batch)
        main = main_loss(pred, target, t, self.cfg.weighting, batch.token_weights, batch.sample_weights)
        return main, (main, mx.array(0.0), t.mean())

    def dop_loss(self, model, batch: Batch, key):
        """DOP on the same x_t, noise and t: prior (LoRA off, no grad, class prompt), main (LoRA on,
        trigger prompt, weighted), preservation (LoRA on, class prompt, unweighted, × multiplier)."""
        xt, target, t = noisy_inputs(batch.latents, key, self.cfg)
        with lora_disabled(model):
            prior = mx.stop_gradient(self._forward(model, xt, batch.dop_embeds, t, batch)).astype(mx.float32)
        if self.cfg.dop_batched:
            b = xt.shape[0]
            pred = self._forward(model, mx.concatenate([xt, xt]), mx.concatenate([batch.prompt_embeds, batch.dop_embeds]),
                                 mx.concatenate([t, t]), batch)
            pred_main, pred_pres = pred[:b], pred[b:]
        else:
            pred_main = self._forward(model, xt, batch.prompt_embeds, t, batch)
            pred_pres = self._forward(model, xt, batch.dop_embeds, t, batch)
        main = main_loss(pred_main, target, t, self.cfg.weighting, batch.token_weights, batch.sample_weights)
        # the preservation pass is neither masked nor weighted: it holds the whole image to the base model
        pres = mx.mean(_mse_per_sample(pred_pres, prior)) * self.cfg.dop_multiplier
        return main + pres, (main, pres, t.mean())

    # ---- compiled functions ---------------------------------------------------------------
    def _grad_fn(self, dop: bool):
        """value_and_grad of the loss over the model's trainable parameters (a tree)."""
        loss = self.dop_loss if dop else self.plain_loss
        return nn.value_and_grad(self.model, lambda model, batch, key: loss(model, batch, key))

    def _flat_grad_fn(self, dop: bool):
        """The same over `self.flat`: the model reads differentiable views of it (FlatParameters.split),
        so the gradient arrives flat. The caller installs plain views again afterwards."""
        loss = self.dop_loss if dop else self.plain_loss

        def fn(flat, batch, key):
            self.params.install(self.params.split(flat))
            return loss(self.model, batch, key)

        return mx.value_and_grad(fn)

    def _install(self, flat: dict):
        self.params.install(self.params.views(flat))

    def _update(self, grads, loss):
        """`_apply` for a gradient tree shaped like model.trainable_parameters()."""
        return self._apply(self.params.flatten(grads), loss)

    def _apply(self, grads: dict, loss):
        """Clip, then update the flat parameters (grads: flat, like `self.flat`) — or keep the old
        parameters and optimiser state if the loss is not finite (decided on the device, no host sync)."""
        if self.cfg.shard and self.cfg.shard[1] > 1:
            grads, loss = average_across_processes(grads, loss, self.cfg.shard[1])
        finite = mx.isfinite(loss)  # the same decision on every process
        raw_norm = global_norm(grads)
        # `coef * g`, norm first: evaluation visits the norm — which reads the gradients from the
        # last block backwards (see global_norm) — before any gradient in block order.
        if self.cfg.max_grad_norm:
            coef = mx.minimum(self.cfg.max_grad_norm / (raw_norm + 1e-6), 1.0)
        else:
            coef = mx.ones_like(raw_norm)
        grads = tree_map(lambda g: mx.where(finite, (coef * g).astype(g.dtype), mx.zeros_like(g)), grads)
        norm = mx.where(finite, raw_norm, mx.zeros_like(raw_norm))
        old_state = tree_map(lambda x: x, self.optimizer.state)  # new containers: update() mutates the dict
        new = self.optimizer.apply_gradients(grads, dict(self.flat))
        keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
        self.flat.update(tree_map(keep, new, dict(self.flat)))  # in place: mx.compile captured these dicts
        kept = tree_map(keep, self.optimizer.state, old_state)
        for k, v in kept.items():
            self.optimizer.state[k] = v
        self._install(self.flat)
        return norm, finite, loss  # loss: averaged over the processes when data parallel

    def _build(self, kind: str, dop: bool):
        state = [self.model.state, self.optimizer.state, self.flat, mx.random.state]  # random: LoRA dropout
        grad_fn = self._flat_grad_fn(dop)

        # mx.compile takes trees of arrays: the Batch travels as a dict. Gradients are flat (FlatParameters).
        # Both also return the backward pass's pieces (`_evaluate_in_pieces`).
        if kind == "step":
            def fn(batch, key):
                (loss, (main, pres, tm)), grads, pieces = self._traced_grads(grad_fn, batch, key)
                norm, finite, loss = self._apply(grads, loss)
                return loss, main, pres, tm, norm, finite, pieces
        elif kind == "grad":
            def fn(batch, key):
                (loss, (main, pres, tm)), grads, pieces = self._traced_grads(grad_fn, batch, key)
                self._install(self.flat)
                return (loss, main, pres, tm), grads, pieces
        elif kind == "flatten":  # the block-by-block backward's gradient tree
            def fn(grads):
                return self.params.flatten(grads)
        else:  # "apply": flat (accumulated) gradients
            def fn(grads, loss):
                return self._apply(grads, loss)

        if self.cfg.compile:
            fn = partial(mx.compile, inputs=state, outputs=state)(fn)
        return fn

    def _traced_grads(self, grad_fn, batch, key):
        """grad_fn's (value, grads), and the pieces to evaluate the step by: every block's output
        (forward) and the block ends' gradients (backward, last block first)."""
        self.params.collect, transformer.BLOCK_OUTPUTS = [], []
        try:
            out, grads = grad_fn(dict(self.flat), Batch(**batch), key)
            return out, grads, (list(transformer.BLOCK_OUTPUTS), list(self.params.collect))
        finally:
            self.params.collect, transformer.BLOCK_OUTPUTS = None, None

    def _evaluate_in_pieces(self, loss, pieces):
        """Start evaluating the step in pieces, in the order the device runs them: the forward pass
        block by block, the loss, then the backward pass from the last block to the first. The host
        waits while it is more than `pipeline_ahead` pieces ahead; the rest is left to the caller."""
        if self.cfg.pipeline_ahead is None:
            return
        forward, backward = pieces
        pending = _Pipeline(self.cfg.pipeline_ahead)
        for x in forward + [loss] + backward:
            pending.push(x)

    def _fn(self, kind, dop):
        if (kind, dop) not in self._fns:
            self._fns[(kind, dop)] = self._build(kind, dop)
        return self._fns[(kind, dop)]

    # ---- block-by-block backward (gradient checkpointing) ------------------------------------
    def _blockwise(self):
        every = getattr(self.model, "checkpoint_every", 0)
        if not (self.cfg.blockwise and every):
            return None
        if self._bw is None or self._bw_every != every:
            self._bw, self._bw_every = BlockwiseBackward(self.model, every, self.cfg.compile, self.cfg.blockwise_ahead), every
        return self._bw

    def _prep_fn(self, dop: bool):
        """Compiled: noise, timesteps and (DOP) the prior prediction, as the plain path draws them."""
        if ("prep", dop) not in self._fns:
            def fn(batch, key):
                batch = Batch(**batch)
                xt, target, t = noisy_inputs(batch.latents, key, self.cfg)
                if not dop:
                    return xt, target, t
                with lora_disabled(self.model):
                    prior = mx.stop_gradient(self._forward(self.model, xt, batch.dop_embeds, t, batch)).astype(mx.float32)
                return xt, target, t, prior

            if self.cfg.compile:
                fn = partial(mx.compile, inputs=[self.model.state], outputs=[])(fn)
            self._fns[("prep", dop)] = fn
        return self._fns[("prep", dop)]

    def _inputs(self, xt, embeds, t, batch):
        b = xt.shape[0]
        g = mx.full((b,), self.cfg.guidance, dtype=mx.float32) if self.cfg.guidance is not None else None
        x, ids = image_stream(xt, batch, self.dtype)  # the heads' losses take the first N tokens
        return (x, embeds.astype(self.dtype), t, ids, batch.txt_ids, g)

    def _head_main(self, pred, target, t, tw=None, sw=None):
        main = main_loss(pred, target, t, self.cfg.weighting, tw, sw)
        return main, (main, mx.zeros_like(main), t.mean())

    def _head_dop(self, pred, target, t, prior, tw=None, sw=None):
        b = target.shape[0]
        main = main_loss(pred[:b], target, t, self.cfg.weighting, tw, sw)
        pres = mx.mean(_mse_per_sample(pred[b:], prior)) * self.cfg.dop_multiplier
        return main + pres, (main, pres, t.mean())

    def _head_pres(self, pred, prior, t):
        pres = mx.mean(_mse_per_sample(pred, prior)) * self.cfg.dop_multiplier
        return pres, (mx.zeros_like(pres), pres, t.mean())

    def _blockwise_grads(self, bw, batch: Batch, key, dop: bool):
        """(loss, main, pres, t_mean), grads — the same values as value_and_grad of plain_loss /
        dop_loss, computed segment by segment."""
        drop_key = mx.random.split(key, 3)[2]  # not the noise's keys (split(key) in noisy_inputs)
        w = _loss_weights(batch)  # () or (token weights, sample weights)
        if not dop:
            xt, target, t = self._prep_fn(False)(vars(batch), key)
            loss, aux, grads = bw(self._inputs(xt, batch.prompt_embeds, t, batch), self._head_main, (target, t, *w), drop_key)
            return (loss, *aux), grads
        xt, target, t, prior = self._prep_fn(True)(vars(batch), key)
        if self.cfg.dop_batched:
            inputs = self._inputs(mx.concatenate([xt, xt]), mx.concatenate([batch.prompt_embeds, batch.dop_embeds]),
                                  mx.concatenate([t, t]), batch)
            loss, aux, grads = bw(inputs, self._head_dop, (target, t, prior, *w), drop_key)
            return (loss, *aux), grads
        k1, k2 = mx.random.split(drop_key)
        l1, (main, _, tm), g1 = bw(self._inputs(xt, batch.prompt_embeds, t, batch), self._head_main, (target, t, *w), k1)
        l2, (_, pres, _), g2 = bw(self._inputs(xt, batch.dop_embeds, t, batch), self._head_pres, (prior, t), k2)
        return (l1 + l2, main, pres, tm), tree_map(mx.add, g1, g2)

    def __call__(self, batch: Batch, key: mx.array, dop: bool = False) -> dict:
        if dop and batch.dop_embeds is None:
            raise ValueError("DOP step needs batch.dop_embeds")
        blockwise = self._blockwise() is not None
        kind = (dop, blockwise, batch.latents.shape, batch.prompt_embeds.shape, None if batch.refs is None else batch.refs.shape)
        seen = self._calibrated.get(kind, 0)
        self._calibrated[kind] = seen + 1
        # A one-graph step evaluated in pieces cannot run ahead far: no limit (it measured the
        # same peak as with one, 6 ms a step faster).
        pieces = not blockwise and self.cfg.pipeline_ahead is not None
        if self.cfg.memory_limit != "auto" or not _on_gpu() or seen > 1 or pieces:
            return self._step(batch, key, dop)
        if seen == 0:  # compiling: serialised too (unless a limit exists), so it cannot run ahead
            if self.memory_limit is None:
                mx.set_memory_limit(1)
            return self._step(batch, key, dop)
        # Calibration on the second step of a kind (the first compiles): fully serialised, its
        # peak is the step's true live set; the limit then goes just above it — 10% above for the
        # one-graph step, where a tight limit stalls the device, 2% + 64 MB for the block-by-block
        # one, and 16 MB with synchronous segments (the memory-first mode: the peak still passes
        # the limit by about one allocation; H200, klein-9b int8: limit 11.01, peak 11.11 GB).
        mx.eval(self.state_arrays())
        mx.set_memory_limit(1)
        mx.reset_peak_memory()
        out = self._step(batch, key, dop)
        mx.eval(out["loss"], out["grad_norm"], self.state_arrays())
        peak = mx.get_peak_memory()
        if not blockwise:
            limit = int(peak * 1.10) + (64 << 20)
        elif self.cfg.blockwise_ahead:
            limit = int(peak * 1.02) + (64 << 20)
        else:
            limit = peak + (16 << 20)
        self.memory_limit = max(self.memory_limit or 0, limit)
        mx.set_memory_limit(self.memory_limit)
        return out

    def _step(self, batch: Batch, key: mx.array, dop: bool) -> dict:
        if self.params.changed():  # the model's arrays were replaced (a resume): they are the truth
            self.flat.update(self.params.gather())
            self._install(self.flat)
            self.params.remember()
        try:
            return self._step_flat(batch, key, dop)
        finally:
            self.params.remember()

    def _step_flat(self, batch: Batch, key: mx.array, dop: bool) -> dict:
        bw = self._blockwise()
        if self.accum == 1 and bw is None:
            loss, main, pres, tm, norm, finite, pieces = self._fn("step", dop)(vars(batch), key)
            self._evaluate_in_pieces(loss, pieces)
            return dict(loss=loss, main=main, pres=pres, t_mean=tm, grad_norm=norm, finite=finite, applied=True)
        if bw is None:
            (loss, main, pres, tm), grads, pieces = self._fn("grad", dop)(vars(batch), key)
            self._evaluate_in_pieces(loss, pieces)
        else:
            (loss, main, pres, tm), grads = self._blockwise_grads(bw, batch, key, dop)
            grads = self._fn("flatten", False)(grads)
        if self.accum == 1:
            norm, finite, loss = self._fn("apply", False)(grads, loss)
            return dict(loss=loss, main=main, pres=pres, t_mean=tm, grad_norm=norm, finite=finite, applied=True)
        grads = tree_map(lambda g: g / self.accum, grads)
        self._grad_acc = grads if self._grad_acc is None else tree_map(mx.add, self._grad_acc, grads)
        self._loss_acc = loss / self.accum + (self._loss_acc if self._n_acc else 0.0)
        self._n_acc += 1
        out = dict(loss=loss, main=main, pres=pres, t_mean=tm, grad_norm=mx.array(0.0), finite=mx.isfinite(loss), applied=False)
        if self._n_acc == self.accum:
            norm, finite, _ = self._fn("apply", False)(self._grad_acc, self._loss_acc)
            out.update(grad_norm=norm, finite=finite, applied=True)
            self._grad_acc, self._n_acc = None, 0
        return out

    def state_arrays(self):
        """What one `mx.eval` per step must evaluate besides the returned scalars: the parameters,
        the optimiser state and, between accumulation steps, the accumulated gradients (else each
        micro-step's backward graph, with its activations, would wait for the applying step)."""
        acc = [] if self._grad_acc is None else [self._grad_acc]
        return acc + [self.flat, self.optimizer.state]
