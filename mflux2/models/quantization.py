"""Quantized transformers: which layers are quantized with which group size, and the load that
quantizes each module as soon as its weights are in (so peak memory stays near the final model's
size). The model itself (mflux2.models.transformer) knows nothing of quantization; its linear
layers run through mflux2.ops.linear, which handles quantized bases."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

QUANT_BITS = {"int8": 8, "int4": 4}
# Weights per scale/bias pair. int8 in groups of 128: 1.03 instead of 1.06 bytes a weight (0.28 GB
# less for klein-9b, 1.0 GB for dev) for a relative RMS error of 0.59% instead of 0.54% (random
# normal weights; int4's is 9.1% at 64); int4 keeps MLX's default of 64.
QUANT_GROUP_SIZE = {"int8": 128, "int4": 64}


def layer_group_size(in_dims: int, group_size: int) -> int | None:
    """The group size a Linear of `in_dims` inputs is quantized with: `group_size`, else MLX's
    default 64 where only that divides the width (small test models), else None (not quantized).
    Every FLUX.2 projection's width is a multiple of 128."""
    return next((g for g in (group_size, 64) if in_dims % g == 0), None)


def quantize_predicate(group_size: int, bits: int, mode: str = "affine"):
    """nn.quantize's class_predicate: Linear layers, each with its `layer_group_size`."""

    def predicate(path, m):
        g = isinstance(m, nn.Linear) and layer_group_size(m.weight.shape[1], group_size)
        return {"group_size": g, "bits": bits, "mode": mode} if g else False

    return predicate


# Outside the blocks, only the large layers are quantized: txt_in, the three shared modulations and
# the final layer's adaLN (0.37 GB of klein-4b's bf16 weights, 1.5 GB of dev's). img_in, the
# timestep embedder's first layer and the final projection stay in the activation dtype (tiny, and
# they are ~0.1% of the weights).
OUTSIDE_BLOCKS_MIN_WEIGHTS = 1 << 22


def quantize_outside_blocks(model, bits: int, group_size: int, min_weights: int | None = None) -> None:
    inner = quantize_predicate(group_size, bits)
    least = OUTSIDE_BLOCKS_MIN_WEIGHTS if min_weights is None else min_weights

    def predicate(path, m):
        big = not path.startswith(("double_blocks", "single_blocks")) and isinstance(m, nn.Linear) and m.weight.size >= least
        return big and inner(path, m)

    nn.quantize(model, class_predicate=predicate)


def quant_settings(quantize: str | None, group_size: int | None, dtype: mx.Dtype) -> tuple[int | None, int | None]:
    """(bits, group size) for `quantize` ('int8'/'int4', or None: not quantized); `group_size`:
    QUANT_GROUP_SIZE's unless given."""
    if not quantize:
        return None, group_size
    if quantize not in QUANT_BITS:
        raise ValueError(f"quantize={quantize!r}: choose int8 or int4 (or None for {dtype})")
    return QUANT_BITS[quantize], group_size or QUANT_GROUP_SIZE[quantize]


def load_weights(model, weights: dict, dtype: mx.Dtype, bits: int | None, group_size: int | None) -> None:
    """Fill a lazily built transformer with `weights` (our names) in `dtype`, module by module: the
    top-level layers (their large ones then quantized), then each block (quantized as soon as it is
    loaded). Empties `weights`: each tensor is dropped as its module takes it, so only one module's
    full-precision tensors are ever held beside the model (the caller must keep no other reference)."""

    def load(prefix: str, module: nn.Module) -> None:
        p = prefix + "."
        # pop: a tensor left in `weights` would keep the file's copy alive once evaluated (all of them
        # until the load ends, beside the quantised or cast ones the model keeps)
        mine = [k for k in weights if k.startswith(p)]
        module.update(tree_unflatten([(k[len(p) :], weights.pop(k).astype(dtype)) for k in mine]))
        mx.eval(module.parameters())

    top = {name: m for name, m in model.children().items() if isinstance(m, nn.Module)}
    for name, module in top.items():
        load(name, module)
    if bits:
        quantize_outside_blocks(model, bits, group_size)
        mx.eval({name: model[name].parameters() for name in top})
    for kind in ("double_blocks", "single_blocks"):
        for i, block in enumerate(model[kind]):
            load(f"{kind}.{i}", block)
            if bits:
                nn.quantize(block, class_predicate=quantize_predicate(group_size, bits))
                mx.eval(block.parameters())
