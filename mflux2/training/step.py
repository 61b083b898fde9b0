"""The training step: flow-matching loss, DOP, and the compiled update.

One `TrainStep` owns the compiled functions the trainer (and `scripts/benchmark.py`) call. Everything
inside a step stays on the device: timesteps and noise are drawn from an explicit key, a non-finite
loss skips the update with `mx.where` instead of a host check, and the caller evaluates once per step.
Semantics: shared/spec/training.md (flow matching, timestep sampling, weighting, DOP).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mflux2.lora import lora_disabled
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
    # Data parallel (mx.distributed): this process is rank r of n and holds samples [r·B, (r+1)·B) of a
    # global batch of n·B. Timesteps and noise are drawn for the global batch and sliced, so n
    # processes reproduce one process with batch n·B exactly; gradients are averaged with all_sum.
    shard: tuple[int, int] | None = None


@dataclass
class Batch:
    """One step's inputs. latents [B, N, 128] are the packed, BN-normalised VAE latents (x0)."""

    latents: mx.array
    prompt_embeds: mx.array  # [B, L, ctx]
    img_ids: mx.array  # [N, 4]
    txt_ids: mx.array  # [L, 4]
    dop_embeds: mx.array | None = None  # [B, L, ctx] class-word prompts (DOP)


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

    flat = tree_flatten(grads)
    vec = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in flat] + [loss.astype(mx.float32).reshape(1)])
    vec = mx.distributed.all_sum(vec) / n
    out, i = [], 0
    for k, g in flat:
        out.append((k, vec[i : i + g.size].reshape(g.shape).astype(g.dtype)))
        i += g.size
    return tree_unflatten(out), vec[-1]


def _mse_per_sample(pred: mx.array, target: mx.array) -> mx.array:
    return mx.mean(mx.square(pred.astype(mx.float32) - target), axis=(1, 2))


class TrainStep:
    """`step(batch, key, dop=False)` → dict of lazy scalars (loss, main, pres, grad_norm, t_mean, finite)."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, cfg: StepConfig, grad_accumulation: int = 1):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.accum = grad_accumulation
        self.dtype = model.dtype
        optimizer.init(model.trainable_parameters())  # state must exist before it is captured by mx.compile
        self._fns = {}
        self._grad_acc = None
        self._n_acc = 0

    # ---- losses ---------------------------------------------------------------------------
    def _forward(self, model, xt, embeds, t, batch):
        b = xt.shape[0]
        g = mx.full((b,), self.cfg.guidance, dtype=mx.float32) if self.cfg.guidance is not None else None
        return model(xt.astype(self.dtype), embeds.astype(self.dtype), t, batch.img_ids, batch.txt_ids, g)

    def plain_loss(self, model, batch: Batch, key):
        xt, target, t = noisy_inputs(batch.latents, key, self.cfg)
        pred = self._forward(model, xt, batch.prompt_embeds, t, batch)
        main = mx.mean(_mse_per_sample(pred, target) * loss_weight(self.cfg.weighting, t))
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
        main = mx.mean(_mse_per_sample(pred_main, target) * loss_weight(self.cfg.weighting, t))
        pres = mx.mean(_mse_per_sample(pred_pres, prior)) * self.cfg.dop_multiplier
        return main + pres, (main, pres, t.mean())

    # ---- compiled functions ---------------------------------------------------------------
    def _grad_fn(self, dop: bool):
        loss = self.dop_loss if dop else self.plain_loss
        return nn.value_and_grad(self.model, lambda model, batch, key: loss(model, batch, key))

    def _update(self, grads, loss):
        """Clip, then update — or keep the old parameters and optimiser state if the loss is not
        finite (decided on the device, no host sync)."""
        if self.cfg.shard and self.cfg.shard[1] > 1:
            grads, loss = average_across_processes(grads, loss, self.cfg.shard[1])
        finite = mx.isfinite(loss)  # the same decision on every process
        grads = tree_map(lambda g: mx.where(finite, g, mx.zeros_like(g)), grads)
        if self.cfg.max_grad_norm:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        old_params = self.model.trainable_parameters()
        old_state = tree_map(lambda x: x, self.optimizer.state)  # new containers: update() mutates the dict
        self.optimizer.update(self.model, grads)
        keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
        self.model.update(tree_map(keep, self.model.trainable_parameters(), old_params))
        kept = tree_map(keep, self.optimizer.state, old_state)
        for k, v in kept.items():  # in place: mx.compile captured this very dict
            self.optimizer.state[k] = v
        return norm, finite, loss  # loss: averaged over the processes when data parallel

    def _build(self, kind: str, dop: bool):
        state = [self.model.state, self.optimizer.state, mx.random.state]  # random: LoRA dropout
        grad_fn = self._grad_fn(dop)

        # mx.compile takes trees of arrays: the Batch travels as a dict.
        if kind == "step":
            def fn(batch, key):
                (loss, (main, pres, tm)), grads = grad_fn(self.model, Batch(**batch), key)
                norm, finite, loss = self._update(grads, loss)
                return loss, main, pres, tm, norm, finite
        elif kind == "grad":
            def fn(batch, key):
                (loss, (main, pres, tm)), grads = grad_fn(self.model, Batch(**batch), key)
                return (loss, main, pres, tm), grads
        else:  # "apply": accumulated gradients
            def fn(grads, loss):
                return self._update(grads, loss)

        if self.cfg.compile:
            fn = partial(mx.compile, inputs=state, outputs=state)(fn)
        return fn

    def _fn(self, kind, dop):
        if (kind, dop) not in self._fns:
            self._fns[(kind, dop)] = self._build(kind, dop)
        return self._fns[(kind, dop)]

    def __call__(self, batch: Batch, key: mx.array, dop: bool = False) -> dict:
        if dop and batch.dop_embeds is None:
            raise ValueError("DOP step needs batch.dop_embeds")
        if self.accum == 1:
            loss, main, pres, tm, norm, finite = self._fn("step", dop)(vars(batch), key)
            return dict(loss=loss, main=main, pres=pres, t_mean=tm, grad_norm=norm, finite=finite, applied=True)
        (loss, main, pres, tm), grads = self._fn("grad", dop)(vars(batch), key)
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
        """What one `mx.eval` per step must evaluate besides the returned scalars."""
        return [self.model.trainable_parameters(), self.optimizer.state]
