"""Every custom operation of mflux2 in one place, each beside its plain-MLX fallback.

| op | module | fast path | fallback |
| --- | --- | --- | --- |
| rope | rope.py | one-pass custom VJP; on CUDA a kernel (rope_cuda) | autodiff of the rotation |
| rms_frozen | norm.py | rms_norm of a frozen scale: a VJP without the scale's gradient (off until measured) | autodiff of mx.fast.rms_norm |
| modulate_ln | norm.py (`modulate`) | the blocks' modulation folded into LayerNorm's weight and bias where shift/scale are one row (B = 1): one kernel, a VJP forming shift's/scale's gradients only if used (off until measured) | layer_norm(x)·(1 + scale) + shift |
| layer_norm_cuda | norm.py (`modulate`) | LayerNorm without affine as a CUDA kernel pair, one block per row, the modulation elementwise (CUDA only, off until measured; wins over modulate_ln) | MLX's layer_norm |
| norm_rope | rope.py | q/k's RMS norm (frozen scale) + RoPE, one CUDA kernel each way, no scale gradient (CUDA only, off by default until measured) | rms_norm, then apply_rope |
| swiglu | glu.py | custom VJP recomputing the sigmoid | autodiff of silu(gate)·up |
| split_views | split.py | views whose VJP concatenates | plain slices |
| flat_views | split.py | views of flat parameters, VJP concatenating per group | plain slices |
| flat_transposed | split.py (`Transposed`), training/step.py | LoRA's factors stored transposed in the flat parameters: their gradients flatten without a layout copy (on everywhere: it only removes copies) | stored as they are |
| qkv_parts | gemm.py | q, k, v (and the single blocks' MLP part) from one GEMM each, contiguous; a LoRA's down-projection shared by the parts | one fused GEMM split into strided views |
| linear | gemm.py | GEMMs per output part, LoRA as accumulator, quantized weights dequantised by tile; on CUDA an int8 dequantisation kernel (dequantize_cuda) | layer(x) |
| conv2d (conv_gemm) | conv.py | convolutions as GEMMs through mx.matmul (default on the CPU only) | mx.conv2d |
| sdpa_pad | attention.py (`attention_tokens`) | attention padded to a multiple of 128 tokens, the padding hidden as keys by a mask: cuDNN's fused backward on CUDA instead of the unfused formula (off until measured) | the sequence as it is |
| group_norm | conv.py | GroupNorm through mx.fast.layer_norm, nothing evaluated, SiLU fused (default on CUDA only) | chunked float32 statistics, each chunk evaluated |

One switch per op (`switches.SWITCHES`: an environment variable each, `using(op=False)` in code,
`fast=` per call; `switches.BACKEND_DEFAULTS` where a fast path is not the default on a backend).
tests/test_ops.py checks that each fast path and its fallback agree on the CPU (values and
gradients), that each check really runs the fast path (a broken one is caught) and that the
fallbacks run none of it; scripts/ops_check.py does the agreement on whatever device runs it, CUDA
kernels included. A new kernel goes into its op's module, behind a switch of its own, and gets a
sabotage entry in tests/test_ops.py.
"""

from mflux2.ops.attention import attention_tokens
from mflux2.ops.conv import conv2d, conv2d_reference, group_norm, group_norm_reference
from mflux2.ops.gemm import linear, linear_concat, linear_reference, linear_split, qkv_split
from mflux2.ops.norm import modulate, rms_norm_frozen
from mflux2.ops.rope import apply_rope, norm_rope, norm_rope_fused, rope_reference, rope_table
from mflux2.ops.split import flat_views, split_views
from mflux2.ops.glu import swiglu, swiglu_reference
from mflux2.ops.switches import SWITCHES, cuda_available, is_fast, using

__all__ = ["SWITCHES", "apply_rope", "attention_tokens", "conv2d", "conv2d_reference", "cuda_available", "group_norm", "group_norm_reference", "flat_views", "is_fast", "linear", "linear_concat",
           "linear_reference", "linear_split", "modulate", "rms_norm_frozen", "rope_reference", "rope_table", "split_views", "swiglu",
           "swiglu_reference", "using"]
