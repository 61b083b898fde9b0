"""mflux2.ops: every fast path agrees with its plain-MLX fallback (values and gradients), the switches
pick between them, and the GPU check (scripts/ops_check.py) runs here. The CUDA kernels' own tests
run only where mx.cuda is available (the GPU machine)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux2 import ops
from mflux2.lora import LoRALinear
from mflux2.ops import conv, gemm, rope, switches
from mflux2.ops.agreement import CHECKS, TOLERANCE, _lora_stack, check

ROOT = Path(__file__).resolve().parents[1]


def on_cuda_device() -> bool:
    return ops.cuda_available() and mx.default_device() == mx.gpu


# ---- each fast path against its fallback ----------------------------------------------------------


@pytest.mark.parametrize("op", list(CHECKS))
def test_fast_path_agrees_with_its_fallback(op):
    """Values and input gradients, float32, random non-zero inputs (mflux2/ops/agreement.py)."""
    result = check(op)
    if "skipped" in result:
        assert CHECKS[op][1] and not on_cuda_device()  # only the CUDA kernels, only off CUDA
        pytest.skip(result["skipped"])
    assert result["ok"], result
    assert result["max_rel_err"] <= TOLERANCE


def test_the_check_catches_a_wrong_fast_path(monkeypatch):
    """A fast path whose gradient is off is reported, not passed."""
    wrong = mx.custom_function(rope.rope_reference)
    wrong.vjp(lambda primals, cot, out: (2 * cot, mx.zeros_like(primals[1]), mx.zeros_like(primals[2])))
    monkeypatch.setattr(rope, "_rope", wrong)
    result = check("rope")
    assert not result["ok"] and result["max_rel_err"] > 0.5


def test_the_check_catches_a_wrong_conv_or_group_norm(monkeypatch):
    """A GEMM convolution whose kernel rows are read in the wrong order, and a GroupNorm whose groups
    are strided instead of contiguous, are reported."""
    real = conv._conv_stride1
    monkeypatch.setattr(conv, "_conv_stride1", lambda x, w, p: real(x, w[:, ::-1], p))
    assert not check("conv_gemm")["ok"]
    monkeypatch.setattr(conv, "_conv_stride1", real)
    real_ln = mx.fast.layer_norm
    monkeypatch.setattr(conv.mx.fast, "layer_norm", lambda g, w, b, eps: real_ln(g, w, b, eps * 1e6))
    assert not check("group_norm")["ok"]


def test_backend_defaults():
    """The per-backend defaults name real switches and backends; the VAE's ops follow them."""
    for name, per in switches.BACKEND_DEFAULTS.items():
        assert name in ops.SWITCHES and set(per) <= {"cuda", "metal", "cpu"}
    assert switches.backend() in ("cuda", "metal", "cpu")
    if switches.backend() == "cpu":
        assert ops.is_fast("conv_gemm") and not ops.is_fast("group_norm")


class _CustomFunction:
    """Stands in for mx.custom_function inside mflux2.ops.split: the views it makes come out doubled
    (or the call raises), so whether the fast path ran shows in the result."""

    def __init__(self, fn, how):
        self.fn, self.how = fn, how

    def vjp(self, f):
        return f

    def __call__(self, *args):
        return _sabotaged(self.how, self.fn(*args))


def _sabotaged(how: str, outs):
    if how == "raise":
        raise AssertionError("the fast path ran")
    return type(outs)(2 * o for o in outs) if isinstance(outs, (list, tuple)) else 2 * outs


def sabotage(monkeypatch, op: str, how: str) -> None:
    """Make op's fast path (the code only it runs) double its outputs ("wrong") or raise ("raise")."""
    from mflux2.ops import glu, split

    def wrap(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: _sabotaged(how, real(*a, **k)))

    if op == "rope":
        wrap(rope, "_rope")
    elif op == "swiglu":
        wrap(glu, "_swiglu")
    elif op in ("split_views", "flat_views"):
        proxy = type("mx", (), {"__getattr__": lambda self, name: getattr(mx, name)})()
        proxy.custom_function = lambda fn: _CustomFunction(fn, how)
        monkeypatch.setattr(split, "mx", proxy)
        monkeypatch.setattr(split, "_SPLITS", {})  # (made before the sabotage)
    elif op == "rms_frozen":
        from mflux2.ops import norm

        real_make = norm._make  # the fast path's custom function, its outputs sabotaged
        monkeypatch.setattr(norm, "_make", lambda eps: (lambda fn: lambda *a: _sabotaged(how, fn(*a)))(real_make(eps)))
    elif op == "modulate_ln":
        from mflux2.ops import norm

        real_fold = norm._make_fold  # the modulation as LayerNorm's weight and bias, with its VJP
        monkeypatch.setattr(norm, "_make_fold", lambda eps: (lambda fn: lambda *a: _sabotaged(how, fn(*a)))(real_fold(eps)))
    elif op == "qkv_parts":
        wrap(gemm, "_qkv_parts")  # the parts' GEMMs (the fallback splits one GEMM into views)
    elif op == "linear":
        wrap(gemm, "_project")  # every fast GEMM (Linear, LoRA) starts there
    elif op == "linear_quantized":
        wrap(gemm, "_dequantized_gemm")
    elif op == "conv_gemm":  # the GEMM convolutions (stride 1 and strided)
        wrap(conv, "_conv_stride1")
        wrap(conv, "_conv_im2col")
    elif op == "sdpa_pad":
        from mflux2.ops import attention

        wrap(attention, "_padded")
    elif op == "group_norm":  # the affine step after layer_norm (the fallback has its own)
        wrap(conv, "_affine")
        wrap(conv, "_affine_silu")
    else:
        raise AssertionError(f"no sabotage for {op}: add one so its fast path is checked too")


CPU_CHECKS = [op for op, (_, needs_cuda) in CHECKS.items() if not needs_cuda]


@pytest.mark.parametrize("op", CPU_CHECKS)
def test_each_check_runs_its_fast_path(op, monkeypatch):
    """A fast path that silently fell back to the plain formula would agree with it: each check must
    notice when the fast path's own code is broken (so it ran)."""
    sabotage(monkeypatch, op, "wrong")
    result = check(op)
    assert not result["ok"] and result["max_rel_err"] > 0.5, result


def test_each_switch_picks_the_fallback(monkeypatch):
    """The environment variable, `using` and the per-call argument all pick the path; `using` wins
    over the environment and the argument over both."""
    assert set(ops.SWITCHES) >= {"rope", "rope_cuda", "rms_frozen", "norm_rope", "modulate_ln", "layer_norm_cuda", "swiglu", "split_views", "flat_views",
                                 "qkv_parts", "linear", "dequantize_cuda", "conv_gemm", "group_norm", "sdpa_pad"}
    for name, var in ops.SWITCHES.items():
        monkeypatch.delenv(var, raising=False)
        assert ops.is_fast(name) == switches.BACKEND_DEFAULTS.get(name, {}).get(switches.backend(), True)
        monkeypatch.setenv(var, "1")
        assert ops.is_fast(name)
        monkeypatch.setenv(var, "0")
        assert not ops.is_fast(name)
        with ops.using(**{name: True}):
            assert ops.is_fast(name) and not ops.is_fast(name, False)
        assert not ops.is_fast(name) and ops.is_fast(name, True)
    with pytest.raises(ValueError, match="unknown ops"):
        with ops.using(nope=False):
            pass


@pytest.mark.parametrize("op", CPU_CHECKS)
def test_fallbacks_are_plain_mlx(op, monkeypatch):
    """With every switch off, none of the fast paths' code runs (it would raise) for the values and
    the input gradients of each check: the fallbacks are plain MLX, differentiated by autodiff."""
    from mflux2.ops import agreement

    sabotage(monkeypatch, op, "raise")
    off = {name: False for name in ops.SWITCHES}
    monkeypatch.setattr(agreement, "using", lambda **_: ops.using(**off))  # both sides of the check: fallbacks
    with ops.using(**off):
        result = check(op)
    assert result["ok"] and result["max_rel_err"] == 0.0, result


def test_ops_check_script_runs_on_the_cpu():
    """scripts/ops_check.py (the GPU benchmark's check) on the CPU: one JSON line, the CUDA kernels
    reported as skipped, exit status 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFLUX2_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ops_check.py"), "--cpu"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    results = json.loads(lines[0])
    assert set(results) == set(CHECKS) | {"device"} and "cpu" in results["device"]
    for name, (_, needs_cuda) in CHECKS.items():
        assert results[name]["ok"], (name, results[name])
        assert ("skipped" in results[name]) == needs_cuda


# ---- the GEMM helpers (mflux2/ops/gemm.py) --------------------------------------------------------


def test_linear_helpers_equal_the_layer_with_restricted_and_stacked_loras():
    mx.random.seed(0)
    base = nn.Linear(48, 40, bias=False)
    outer, inner = _lora_stack(base)
    x = mx.random.normal((2, 5, 48))
    ref = outer(x)
    got = mx.concatenate(ops.linear_split(outer, x, [5, 20, 15]), axis=-1)
    assert np.allclose(np.array(got), np.array(ref), atol=1e-5)
    got = ops.linear_concat(outer, [x[..., :16], x[..., 16:]])
    assert np.allclose(np.array(got), np.array(ref), atol=1e-5)
    # reference without the helpers: base output plus each delta on its ranges
    y = x @ base.weight.T
    d = np.zeros(y.shape, np.float32)
    for m in (inner, outer):
        z = np.array((x[..., m.in_start : m.in_stop] @ m.lora_A.T) @ (m.lora_B * m.alpha / m.rank).T)
        d[..., m.out_start : m.out_stop] += z
    assert np.allclose(np.array(ref), np.array(y) + d, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 128])  # 128: the input parts do not fall on groups (one column range)
def test_dequantized_gemm_equals_quantized_matmul(monkeypatch, bits, group):
    """Tiles (row chunks x input parts) dequantised just before their GEMMs give quantized_matmul's
    values and the same input/LoRA gradients."""
    mx.random.seed(1)
    q = nn.QuantizedLinear(128, 96, bias=False, group_size=group, bits=bits)
    lora = LoRALinear(q, 4, out_range=(0, 64), in_range=(0, 64))
    lora.lora_B = mx.random.normal(lora.lora_B.shape)
    xa, xb = mx.random.normal((1, 300, 64)), mx.random.normal((1, 300, 64))

    def run(dequant_rows, tile):
        monkeypatch.setattr(gemm, "DEQUANTIZE_MIN_ROWS", dequant_rows)
        monkeypatch.setattr(gemm, "DEQUANTIZE_TILE", tile)

        def loss(params, xa, xb):
            lora.update(params)
            parts = ops.linear_split(lora, mx.concatenate([xa, xb], -1), [64, 32])
            return sum((p * p).sum() for p in parts) + (ops.linear_concat(lora, [xa, xb]) ** 3).mean()

        return mx.value_and_grad(loss, argnums=(0, 1, 2))(lora.trainable_parameters(), xa, xb)

    (l0, g0), (l1, g1) = run(10**9, 1 << 26), run(1, 128 * 20)  # quantized_matmul | 20-row tiles
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    for a, b in zip(tree_flatten(g0), tree_flatten(g1)):
        np.testing.assert_allclose(np.array(b[1]), np.array(a[1]), rtol=1e-4, atol=1e-4 * float(mx.abs(a[1]).max()))


def test_custom_vjps_match_autodiff():
    g, u = mx.random.normal((3, 8)) * 3, mx.random.normal((3, 8))
    c = mx.random.normal((3, 8))
    h = mx.concatenate([g, u], axis=-1)
    _, (d0,) = mx.vjp(lambda h: nn.silu(h[..., :8]) * h[..., 8:], [h], [c])
    _, (d1,) = mx.vjp(ops.swiglu, [h], [c])
    assert np.allclose(np.array(ops.swiglu(h)), np.array(nn.silu(g) * u), atol=1e-6)
    assert np.abs(np.array(d0)).max() > 0.5 and np.allclose(np.array(d1), np.array(d0), atol=1e-5)
    y = mx.random.normal((2, 3, 9))
    cs = [mx.random.normal((2, 3, n)) for n in (2, 3, 4)]
    _, (d0,) = mx.vjp(lambda y: [y[..., :2], y[..., 2:5], y[..., 5:]], [y], cs)
    _, (d1,) = mx.vjp(lambda y: ops.split_views(y, (2, 3, 4)), [y], cs)
    assert np.array_equal(np.array(d1), np.array(d0))
    # along another axis (the double blocks' text | image split of the attention output)
    cs = [mx.random.normal((2, n, 9)) for n in (1, 2)]
    _, (d0,) = mx.vjp(lambda y: [y[:, :1], y[:, 1:]], [y], cs)
    _, (d1,) = mx.vjp(lambda y: ops.split_views(y, (1, 2), axis=1), [y], cs)
    assert np.array_equal(np.array(d1), np.array(d0))
    # RoPE: the one-kernel VJP equals autodiff of the rotation
    rope = ops.rope_table(mx.random.randint(0, 50, (2, 10, 4)).astype(mx.float32), (8, 8, 8, 8), 2000.0)
    x, cot = mx.random.normal((2, 10, 3, 32)), mx.random.normal((2, 10, 3, 32))

    def rotate(x):
        xp = x.reshape(2, 10, 3, 16, 2)
        return (xp * rope[0] + xp[..., ::-1] * rope[1]).reshape(x.shape)

    _, (r0,) = mx.vjp(rotate, [x], [cot])
    _, (r1,) = mx.vjp(lambda x: ops.apply_rope(x, rope), [x], [cot])
    assert np.abs(np.array(r0)).max() > 1 and np.allclose(np.array(r1), np.array(r0), atol=1e-6)


# ---- the CUDA kernels (the GPU machine only) ------------------------------------------------------


@pytest.mark.skipif(not on_cuda_device(), reason="the RoPE kernel is CUDA's (run on the GPU machine)")
@pytest.mark.parametrize("dtype,batch_tables", [(mx.float32, 2), (mx.bfloat16, 1)])
def test_cuda_rope_kernel_equals_the_elementwise_formula(dtype, batch_tables):
    rope = ops.rope_table(mx.random.randint(0, 50, (batch_tables, 40, 4)).astype(mx.float32), (8, 8, 8, 8), 2000.0)
    x, cot = mx.random.normal((2, 40, 3, 32)).astype(dtype), mx.random.normal((2, 40, 3, 32)).astype(dtype)

    def rotate(x):
        xp = x.astype(mx.float32).reshape(2, 40, 3, 16, 2)
        return (xp * rope[0] + xp[..., ::-1] * rope[1]).reshape(x.shape)

    assert rope._rope_on_cuda(x)
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    y0, (d0,) = rotate(x), mx.vjp(rotate, [x.astype(mx.float32)], [cot.astype(mx.float32)])[1]
    y1, (d1,) = ops.apply_rope(x, rope), mx.vjp(lambda x: ops.apply_rope(x, rope), [x], [cot])[1]
    assert np.allclose(np.array(y1.astype(mx.float32)), np.array(y0), atol=tol, rtol=tol)
    assert np.allclose(np.array(d1.astype(mx.float32)), np.array(d0), atol=tol, rtol=tol)


@pytest.mark.skipif(not on_cuda_device(), reason="the LayerNorm kernels are CUDA's (run on the GPU machine)")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("shape", [(1, 512, 3072), (2, 7, 6144), (3, 5, 48), (1, 4, 100)])
def test_cuda_layer_norm_kernels_equal_mx_fast_layer_norm(dtype, shape):
    """Our weightless LayerNorm, forward and VJP, against MLX's on float32 copies of the same inputs
    (rows whose width is not a multiple of the block's threads included)."""
    from mflux2.ops import norm

    x = (mx.random.normal(shape) * 2 + 3).astype(dtype)
    cot = mx.random.normal(shape).astype(dtype)
    with ops.using(layer_norm_cuda=True):
        assert norm._layer_norm_on_cuda(x)
    ref = lambda x: mx.fast.layer_norm(x, None, None, 1e-6)  # noqa: E731
    y0, (d0,) = ref(x.astype(mx.float32)), mx.vjp(ref, [x.astype(mx.float32)], [cot.astype(mx.float32)])[1]
    y1, (d1,) = mx.vjp(lambda x: norm.layer_norm_cuda(x, 1e-6), [x], [cot])
    assert y1.dtype == d1.dtype == dtype and y1.shape == d1.shape == x.shape
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    for got, want in ((y1, y0), (d1, d0)):
        assert np.allclose(np.array(got.astype(mx.float32)), np.array(want), atol=tol * np.abs(np.array(want)).max(), rtol=tol)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler here")
def test_cuda_layer_norm_source_compiles(tmp_path):
    """Where nvcc exists but no GPU does (the CPU machine), the LayerNorm kernels' sources compile as
    mx.fast.cuda_kernel assembles them: the header, then a __global__ function whose parameters are
    the inputs (const pointers) and outputs, the template values as `constexpr int` / `using` lines
    at the top of its body, then the source (MLX's own device header replaced by the CUDA headers
    the sources use). Catches a typo before a GPU session does; says nothing of the values (the
    agreement check and the test above do that on CUDA)."""
    from mflux2.ops import norm

    def kernel(name, source, inputs, t, d, tpb):
        params = [f"const {ty}* {n}" for n, ty in inputs] + [f"{t}* out"]
        return (f"__global__ void {name}({', '.join(params)}) {{\n  constexpr int D = {d};\n  constexpr int TPB = {tpb};\n"
                f"  using T = {t};\n{source}\n}}\n")
    src = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n" + norm._LN_HEADER
    for t in ("__nv_bfloat16", "float"):
        for d, tpb in ((3072, 256), (100, 128)):
            src += kernel(f"fwd_{t[-4:]}_{d}", norm._LN_FORWARD, [("x", t), ("eps", "float")], t, d, tpb)
            src += kernel(f"bwd_{t[-4:]}_{d}", norm._LN_BACKWARD, [("x", t), ("eps", "float"), ("g", t)], t, d, tpb)
    (tmp_path / "ln.cu").write_text(src)
    out = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-c", "ln.cu", "-o", "ln.o"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not on_cuda_device(), reason="the dequantisation kernel is CUDA's (run on the GPU machine)")
@pytest.mark.parametrize("bits,group", [(8, 128), (8, 64), (4, 64)])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_cuda_dequantize_kernel_equals_mx_dequantize(bits, group, dtype):
    w = mx.random.normal((384, 512)).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    assert gemm._dequantize_on_cuda(wq, scales, biases, bits, "affine") == (bits == 8)  # what dequantize_tile runs
    ref = mx.dequantize(wq, scales, biases, group_size=group, bits=bits)
    for rows, cols in [((0, 384), (0, 512)), ((128, 320), (128, 384)), ((5, 6), (384, 512))]:
        tile = gemm._dequantize_cuda(wq, scales, biases, rows, cols, group, bits)
        assert tile.dtype == dtype and tile.shape == (rows[1] - rows[0], cols[1] - cols[0])
        assert mx.array_equal(tile, ref[rows[0] : rows[1], cols[0] : cols[1]]).item(), (rows, cols)


def test_qkv_parts_lora_b_gradient_is_one_concatenation(monkeypatch):
    """With q/k/v as separate GEMMs (switch "qkv_parts"), a LoRA's B is read as split views of Bᵀ
    (`LoRALinear.lora_up_parts`): its gradient equals the one-GEMM path's exactly, and the
    parts' B rows are no longer zero-padded slices (no SliceUpdate in the gradient's graph)."""
    import re
    import tempfile

    mx.random.seed(0)
    layer = LoRALinear(nn.Linear(12, 3 * 8 + 6, bias=False), rank=4, alpha=2.0, out_range=(0, 24))
    layer.lora_B = mx.random.normal(layer.lora_B.shape)
    x = mx.random.normal((2, 5, 12))
    calls = []
    real = LoRALinear.lora_up_parts
    monkeypatch.setattr(LoRALinear, "lora_up_parts", lambda self, h, spans: calls.append(spans) or real(self, h, spans))

    def loss(b):
        layer.lora_B = b
        outs = gemm.qkv_split(layer, x, 8, (6,))
        return sum((o * mx.arange(o.size).reshape(o.shape) / o.size).sum() for o in outs)

    grads = {}
    for on in (True, False):
        with ops.using(qkv_parts=on):
            grads[on] = mx.grad(loss)(layer.lora_B)
    assert calls == [[(0, 8), (8, 16), (16, 24)]]
    np.testing.assert_array_equal(np.array(grads[True]), np.array(grads[False]))
    with ops.using(qkv_parts=True), tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, mx.grad(loss)(layer.lora_B))
        assert "SliceUpdate" not in re.findall(r'label ="([^"]*)"', open(f.name).read())


def test_importing_mflux2_turns_cuda_graphs_off_unless_the_user_chose():
    """MLX reads MLX_USE_CUDA_GRAPHS once, at its first kernel: `import mflux2` sets it beforehand
    (the step is faster without graphs on CUDA: docs/performance.md, "CUDA graphs off"), and a value
    the user exported wins."""
    code = "import os, mflux2; print(os.environ.get('MLX_USE_CUDA_GRAPHS'))"
    env = {k: v for k, v in os.environ.items() if k != "MLX_USE_CUDA_GRAPHS"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "0"
    env["MLX_USE_CUDA_GRAPHS"] = "1"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
