"""How much memory a LoRA training step needs, and the transformer precision that fits the machine.

`estimate_peak_gb` is a parametric model fitted to peaks measured on an H100 and an H200 (MLX 0.32.4,
`scripts/benchmark.py`, TrainStep's default `memory_limit="auto"`; the table is in
docs/performance.md and tests/test_memory.py): the weights exactly, plus activations linear in
tokens × hidden size — every block's saved activations without checkpointing, the segment inputs
and one segment's working set with it — plus a fixed part (LoRA state, optimiser transients, MLX's
in-flight buffers). These are the figures; what the run does with them (precisions, checkpointing,
which models stay loaded) is decided once, in `plan.make_plan`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlx.core as mx

from mflux2.models.quantization import QUANT_BITS, QUANT_GROUP_SIZE
from mflux2.models.transformer import PRESETS, TransformerConfig, config_from_weights, preset, sanitize

TEXT_TOKENS = 512  # both text encoders pad prompts to 512 tokens
def bytes_per_weight(bits: int, group_size: int) -> float:
    """A quantized weight: its packed bits + a bf16 scale and bias per group."""
    return bits / 8 + 4 / group_size


BYTES_PER_PARAM = {"bf16": 2.0, **{q: bytes_per_weight(b, QUANT_GROUP_SIZE[q]) for q, b in QUANT_BITS.items()}}
GB = 1e9

# Fitted on the GPU tables (docs/performance.md): extra bytes per unit of activation (tokens ×
# hidden × 2 bytes), per byte of float32 LoRA parameters, per byte of one block's weights in bf16
# (a quantized base is dequantised tile by tile on the fly; it shows in the checkpointed steps),
# and fixed. One graph (H100, 2026-11-25, the step evaluated in pieces): max error 4.6%.
_PLAIN_PER_BLOCK_UNIT = 15.25  # saved activations + transients of one block, in units
_PLAIN_PER_LORA_BYTE = 19.2
_CKPT_PER_UNIT = 1.5  # × (blocks / every: segment inputs + 35 × every: one segment's working set)
_CKPT_SEGMENT_UNITS = 35
# Checkpointed, (fixed bytes, × one block's bf16 weights) by (synchronous segments, small command
# batches). Small batches (`limit_command_batches`, CUDA): H200, 2026-12-02, fitted on klein-4b's
# three checkpointed rows; klein-9b and dev synchronous within 2.2% (peaks measured with the
# calibrated limit 2% + 64 MB above the live set). MLX's default batches hold more released
# buffers: H100, 2026-11-25 (20 operations a batch; also what Metal and the CPU are estimated with, where nothing
# is measured), within 2.5%.
_CKPT = {
    (False, True): (0.09 * GB, 0.57),
    (True, True): (0.05 * GB, 0.15),
    (False, False): (0.75 * GB, 4.75),
    (True, False): (0.05 * GB, 3.0),
}


def _config(variant_or_config) -> TransformerConfig:
    if isinstance(variant_or_config, TransformerConfig):
        return variant_or_config
    return preset(variant_or_config)


def adapter_blocks(cfg: TransformerConfig, targets: str) -> list[tuple[int, int]]:
    """(out, in) of the block each adapter layer of mflux2.lora's target sets covers (single blocks
    restricted to the attention rows/columns unless the MLPs are targets too)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    if targets in ("all", "attention_ffn"):
        stream = [(3 * d, d), (d, d), (2 * m, d), (d, m)]
        single = [(3 * d + 2 * m, d), (d, d + m)]
    else:
        stream = [(3 * d, d), (d, d)]
        single = [(3 * d, d), (d, d)]
    return stream * (2 * cfg.num_layers) + single * cfg.num_single_layers


def lora_parameters(cfg: TransformerConfig, rank: int, targets: str, type: str = "lora", factor: int = -1,
                    decompose_both: bool = False) -> int:
    """Trainable adapter parameters of a `type` adapter (lora, lokr, loha, dora) on the target set."""
    from mflux2.lora import adapter_parameter_count  # (mflux2.lora imports the model)

    return sum(adapter_parameter_count(type, o, i, rank, factor, decompose_both) for o, i in adapter_blocks(cfg, targets))


_WEIGHED: dict = {}


def weights_bytes(cfg: TransformerConfig, base_quant: str) -> float:
    """The transformer as `load_transformer` leaves it: with an int8/int4 base, the blocks' linear
    layers and the large ones outside them (`quantize_outside_blocks`) quantized, the rest bf16.
    Counted on a lazily built model (shapes only, nothing allocated), once per architecture."""
    if base_quant not in BYTES_PER_PARAM:
        raise ValueError(f"base_quant={base_quant!r}: choose bf16, int8 or int4")
    key = (repr(cfg), base_quant)
    if key not in _WEIGHED:
        _WEIGHED[key] = _weigh(cfg, base_quant)
    return _WEIGHED[key]


def _weigh(cfg: TransformerConfig, base_quant: str) -> float:
    from mlx.utils import tree_flatten

    import mflux2.models.quantization as Q
    from mflux2.models.transformer import Flux2Transformer

    model = Flux2Transformer(cfg)
    total = 2.0 * sum(v.size for _, v in tree_flatten(model.parameters()))
    if base_quant == "bf16":
        return total
    bits = Q.QUANT_BITS[base_quant]
    quantized = Q.quantize_predicate(Q.QUANT_GROUP_SIZE[base_quant], bits)  # the loader's rule, layer by layer
    for path, m in model.named_modules():
        spec = quantized(path, m)
        if not spec:
            continue
        in_blocks = path.startswith(("double_blocks", "single_blocks"))
        if in_blocks or m.weight.size >= Q.OUTSIDE_BLOCKS_MIN_WEIGHTS:
            total -= (2.0 - bytes_per_weight(bits, spec["group_size"])) * m.weight.size
    return total


def estimate_peak_gb(variant_or_config, base_quant: str = "bf16", resolution: int = 512, batch: int = 1,
                     rank: int = 32, targets: str = "attention", dop: bool = False, checkpointing: int = 0,
                     text_tokens: int = TEXT_TOKENS, synchronous: bool = False, small_batches: bool | None = None,
                     references: int = 0, adapter: tuple = ("lora", -1, False)) -> float:
    """Estimated peak memory (GB) of a training step: `variant_or_config` a preset name or a
    TransformerConfig; `resolution` the (largest) square training size; `dop` a DOP step (main and
    preservation passes batched: twice the tokens); `checkpointing` every n blocks (0 = off);
    `synchronous` the checkpointed segments run one at a time (blockwise_ahead=0); `small_batches`
    MLX's command batches limited (`limit_command_batches`; default: where it applies, CUDA);
    `references` edit training's reference images per sample, each cropped like its target (so as
    many tokens again: the sequence is [text ; x_t ; refs])."""
    cfg = _config(variant_or_config)
    d, nb = cfg.hidden_size, cfg.num_layers + cfg.num_single_layers
    tokens = (resolution // 16) ** 2 * (1 + references) + text_tokens
    samples = batch * (2 if dop else 1)
    unit = samples * tokens * d * 2
    lora = lora_parameters(cfg, rank, targets, *adapter) * 4
    tile = 0 if base_quant == "bf16" else (3 * d + 2 * cfg.mlp_hidden + d + cfg.mlp_hidden) * d * 2
    total = weights_bytes(cfg, base_quant) + lora
    # Attention falls back to the unfused kernels when the sequence is not a multiple of 128: the
    # [B, H, N, N] scores then exist (saved per layer without checkpointing).
    scores = 0 if tokens % 128 == 0 else samples * cfg.num_attention_heads * tokens**2 * 6
    if checkpointing:
        n = int(checkpointing)
        small = small_command_batches() if small_batches is None else small_batches
        fixed, per_tile = _CKPT[bool(synchronous), bool(small)]
        total += (_CKPT_PER_UNIT * unit * (math.ceil(nb / n) + _CKPT_SEGMENT_UNITS * n) + fixed + per_tile * tile
                  + n * scores)
    else:
        total += _PLAIN_PER_BLOCK_UNIT * nb * unit + _PLAIN_PER_LORA_BYTE * lora + nb * scores
    return total / GB


def available_gb() -> float:
    """Memory a training run may use: Metal's recommended working set where MLX reports it, else
    90% of the device's (or, on the CPU, the machine's) memory."""
    info = mx.device_info()
    if info.get("max_recommended_working_set_size"):
        return info["max_recommended_working_set_size"] / GB
    size = info.get("memory_size") or info.get("total_memory")
    if not size:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 0.9 * size / GB


def _source_config(source) -> TransformerConfig:
    variant = getattr(source, "variant", None)
    if variant in PRESETS:
        return preset(variant)
    path = getattr(source, "transformer", None) or getattr(source, "folder", None)
    if path is None:
        raise ValueError(f"cannot tell the transformer's size from {source!r}: it has no variant and no transformer path")
    from mflux2.weights import read_config, resolve_component, safetensors_files, tensor_shapes

    src = resolve_component(Path(path), "transformer")
    if src.is_dir() and (src / "config.json").exists():
        return TransformerConfig.from_dict(read_config(src))
    shapes = {k: shape for k, (shape, _) in tensor_shapes(safetensors_files(src)).items()}
    return config_from_weights({k: tuple(v.shape) for k, v in sanitize({k: _Shape(s) for k, s in shapes.items()}).items()})


class _Shape:
    """A stand-in tensor for `sanitize` (only shapes are needed; qkv parts concatenate by rows)."""

    def __init__(self, shape):
        self.shape = shape


def stored_quantization(source, component: str = "transformer") -> str | None:
    """The precision of a component ("transformer", "text_encoder") of a folder written by
    scripts/convert.py ("int8", "int4", or "bf16" for an unquantised one; mflux2.json): such a
    folder loads only as stored. None for the other layouts, which load as bf16, int8 or int4."""
    if getattr(source, "layout", None) != "mflux2":
        return None
    return (((getattr(source, "config", None) or {}).get(component) or {}).get("quantization") or {}).get("name") or "bf16"


# While a VLM captions or scores (mflux2/vlm.py): its activations and cache for two images shrunk
# to 768 px (~1,200 vision tokens each for the Qwen3.5/Qwen3-VL ViTs) and a 300-token reply — an
# estimate, not fitted on measured peaks (scripts/vlm_benchmark.py measures it).
VLM_WORKING_GB = 1.0


def vlm_phase_gb(vlm_weights_gb: float, resident_gb: float = 0.0) -> float:
    """Peak of a VLM phase: the VLM's weights (mlx-community folders are stored as they load) and
    working set on top of what stays resident — nothing while captioning (it runs before the text
    encoder and the transformer load), the training model while scoring (the validation model is
    freed first unless it is kept loaded)."""
    return resident_gb + vlm_weights_gb + VLM_WORKING_GB


CHECKPOINTED_OPS_PER_BUFFER = 4


def small_command_batches(cuda: bool | None = None) -> bool:
    """Whether a checkpointed run gets small command batches: the user's MLX_MAX_OPS_PER_BUFFER if
    set, else what `limit_command_batches` does (on CUDA: `cuda`, default this machine)."""
    from mflux2.ops.switches import cuda_available

    v = os.environ.get("MLX_MAX_OPS_PER_BUFFER")
    if v is None:
        return cuda_available() if cuda is None else cuda
    return v.isdigit() and int(v) <= CHECKPOINTED_OPS_PER_BUFFER


def limit_command_batches(checkpointing: int, log=print) -> bool:
    """With gradient checkpointing on CUDA: MLX's command batches of at most 4 operations instead of
    its default (MLX_MAX_OPS_PER_BUFFER; 100 on an H100 or B200, 20 on most other cards). MLX frees
    the buffers a batch's operations released only once the whole batch has run, so smaller batches
    free them sooner: on an H200, klein-4b's checkpointed step peaked at 8.76 instead of 9.22 GB
    (bf16) at the same speed, 5.28 instead of 5.88 GB (int8, synchronous segments);
    docs/performance.md. MLX reads the variable once, at its first command, so this runs before
    anything does; a value already in the environment is kept. Not on Metal
    (not measured there) nor the CPU. Returns whether it set the variable."""
    from mflux2.ops.switches import cuda_available

    if not checkpointing or not cuda_available() or "MLX_MAX_OPS_PER_BUFFER" in os.environ:
        return False
    os.environ["MLX_MAX_OPS_PER_BUFFER"] = str(CHECKPOINTED_OPS_PER_BUFFER)
    log(f"memory: MLX command batches of {CHECKPOINTED_OPS_PER_BUFFER} operations (checkpointed blocks free their buffers sooner)")
    return True
