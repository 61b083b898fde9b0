"""scripts/kernel_profile.py: an ncu CSV of a step is summed by category, and the shapes and norms modes run."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import kernel_profile as K  # noqa: E402

HEAD = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","gpu__time_duration.sum","launch__grid_size"'
UNITS = '"","","","","","","","","","","","nsecond",""'


def _row(i, name, ns):
    return f'"{i}","1","python3","h","{name}","1","7","(256, 1, 1)","(132, 1, 1)","0","9.0","{ns}","132"'


def test_parse_sums_kernels_by_category(tmp_path):
    kernels = [("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 50000), ("nvjet_sm90_tst_64x32_TNT", 4000),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 70000),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 180000),
               ("void mlx::layer_norm<__nv_bfloat16, 512, 8>(const T1 *)", 20000),
               ("mflux2_rope", 9000), ("void mlx::copy_gg_nd<__nv_bfloat16>", 11000),
               ("void mlx::col_reduce_looped<float>", 3000), ("void mlx::Ef4IAsTypeAFf4IBroadcast_strided<4>", 7000),
               ("something_else", 1000)]
    text = "==PROF== Connected\n" + "\n".join([HEAD, UNITS] + [_row(i, n, t) for i, (n, t) in enumerate(kernels)])
    path = tmp_path / "step.csv"
    path.write_text(text)
    s = K.summarize(K.read_ncu_csv(str(path)), step_s=0.001)
    c = s["categories"]
    assert c["GEMMs"] == {"launches": 2, "ms": 0.054}
    assert c["attention forward"]["ms"] == 0.07 and c["attention backward"]["ms"] == 0.18
    assert c["norms (layer / RMS, forward + VJP)"]["ms"] == 0.02 and c["RoPE kernel"]["ms"] == 0.009
    assert c["copies (concatenations, layouts)"]["ms"] == 0.011 and c["reductions"]["ms"] == 0.003
    assert c["other"]["ms"] == 0.001 and s["kernels"] == 10 and s["kernel_ms"] == 0.355
    assert s["gaps_ms"] == 0.645 and s["gemm_launches_under_10us"] == [1, 0.004]
    assert "| all kernels | 10 | 0.355 |" in K.markdown(s)
    gz = tmp_path / "step.csv.gz"  # the traces kept in docs/bench are gzipped
    gz.write_bytes(gzip.compress(text.encode()))
    assert K.summarize(K.read_ncu_csv(str(gz)), step_s=0.001) == s


def test_shapes_mode_runs_on_the_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_profile.py"), "shapes", "--tiny", "--reps", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    gemms = [r for r in rows if r["what"] == "gemms alone"]
    assert [r["qkv_parts"] for r in gemms] == [False, True]
    assert gemms[1]["base_gemms"] > gemms[0]["base_gemms"] and all(r["lora_s"] > 0 for r in gemms)
    assert rows[-1]["what"] == "attention alone" and rows[-1]["forward_backward_s"] > 0


def test_norms_mode_runs_on_the_cpu():
    """The modulation's LayerNorm probe: a line per (shape, variant, pass), the CUDA kernel reported
    as skipped off CUDA, and a summary with each variant's speed against today's formula."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_profile.py"), "norms", "--reps", "1", "--inner", "2",
                          "--shapes", "1,8,48;2,4,96"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in out.stdout.splitlines()]
    timed = [r for r in rows if r["what"] == "norms" and "us" in r]
    variants = ["mlx_layer_norm+elementwise", "modulate_ln", "fold_mlx_vjp", "rms_norm"]
    assert [(r["shape"], r["variant"], r["pass"]) for r in timed] == [
        (sh, v, p) for sh in ([1, 8, 48], [2, 4, 96]) for v in variants for p in ("forward", "forward+vjp")]
    assert all(r["us"] > 0 for r in timed)
    assert [r["variant"] for r in rows if "skipped" in r] == ["layer_norm_cuda"] * 2
    summary = rows[-1]
    assert summary["what"] == "norms summary" and not summary["cuda"]
    assert set(summary["us_per_norm"]) == {f"{s} {p}" for s in ("1x8x48", "2x4x96") for p in ("forward", "forward+vjp")}
    assert "modulate_ln speedup" in summary["us_per_norm"]["1x8x48 forward"]


def _flattened_gradient_copies(res: dict, block: str) -> int:
    """Implicit copies made by flattening a 2-D array (a LoRA factor's gradient) for the flat gradient."""
    return sum(r["count"] for r in res["copies"][block]
               if r["what"] == "implicit: reshape" and r["shape"].index("->") == 2 and len(r["shape"]) == 4)


def _merged_heads_copies(res: dict, block: str) -> int:
    """Implicit copies of a [B, N, H, d] array reshaped to [B, N, D] (v's cotangent after the attention's VJP)."""
    return sum(r["count"] for r in res["copies"][block] if r["what"] == "implicit: reshape" and r["shape"].index("->") == 4)


def test_census_counts_the_step_graph_and_the_removed_copies_stay_removed():
    """The census of a tiny model's real step (nothing evaluated): node kinds per block type, and the
    layout copies of the LoRA factors' gradients (switch "flat_transposed") gone — with the switch
    off the census finds them, one per factor (a double block's 4 LoRA layers, a single block's 2)."""
    import shutil

    import pytest

    if shutil.which("c++") is None:
        pytest.skip("the census builds its graph walker with a C++ compiler")
    import graph_census as G

    from mflux2.ops import using

    with using(flat_transposed=False):
        before = G.census(cfg=K._tiny_cfg(), resolution=64, text_len=8)
    after = G.census(cfg=K._tiny_cfg(), resolution=64, text_len=8)
    assert _flattened_gradient_copies(before, "double") == 8 and _flattened_gradient_copies(before, "single") == 4
    assert _flattened_gradient_copies(after, "double") == 0 and _flattened_gradient_copies(after, "single") == 0
    # q/k/v split in their [.., 3·H, d] form (ops.qkv_split(heads=...)): v's cotangent goes into the
    # split's concatenation as it comes out of the attention's VJP, without a reshape copy first
    assert _merged_heads_copies(before, "double") == _merged_heads_copies(after, "double") == 0
    assert _merged_heads_copies(before, "single") == _merged_heads_copies(after, "single") == 0
    assert after["per_block"]["double"]["copies: Concatenate"] == 6 and after["per_block"]["single"]["copies: Concatenate"] == 2
    for block, removed in (("double", 8), ("single", 4)):
        b, a = before["per_block"][block], after["per_block"][block]
        assert a.get("copies: implicit (reshape)", 0) == b.get("copies: implicit (reshape)", 0) - removed
        assert G.kernel_total(a) == G.kernel_total(b) - removed  # nothing added in their place
        # what a block is made of, as the GPU runs it (the fast kernels kept whole)
        assert a["fast kernels: SDPA"] == a["fast kernels: SDPA VJP"] == 1 and a["GEMMs"] > 10
    assert after["per_block"]["double"]["fast kernels: RMSNorm"] == 4  # q and k of both streams
    assert after["per_block"]["single"]["fast kernels: RMSNorm"] == 2
    # the modulations' weightless LayerNorms, forward and VJP (the gradient reaches the blocks before
    # through them: a stand-in of one input once lost it, and with it those blocks' input-gradient GEMMs)
    for block, norms in (("double", 4), ("single", 1)):
        assert after["per_block"][block]["fast kernels: LayerNorm"] == after["per_block"][block]["fast kernels: LayerNorm VJP"] == norms
    with using(modulate_ln=True):  # the modulation folded into LayerNorm: one elementwise kernel fewer per norm
        folded = G.census(cfg=K._tiny_cfg(), resolution=64, text_len=8)
    for block, norms in (("double", 4), ("single", 1)):
        f, a = folded["per_block"][block], after["per_block"][block]
        assert f["fast kernels: LayerNorm VJP"] == a["fast kernels: LayerNorm VJP"] and f["GEMMs"] == a["GEMMs"]
        assert G.kernel_total(f) == G.kernel_total(a) - norms
    assert "| kernels (all but views) |" in G.markdown(after)
    # alpha = rank (the default): no multiplication of B by one, forward or backward
    scaled = G.census(cfg=K._tiny_cfg(), resolution=64, text_len=8, alpha=2 * 32)
    for block, layers in (("double", 4), ("single", 2)):
        assert scaled["per_block"][block]["elementwise (fused)"] == after["per_block"][block]["elementwise (fused)"] + 2 * layers
    with using(qkv_parts=True):  # q/k/v from one GEMM each: B's rows as split views, no zero-padded slices
        parts = G.census(cfg=K._tiny_cfg(), resolution=64, text_len=8)
    for block in ("double", "single"):
        assert "copies: SliceUpdate" not in parts["per_block"][block]
        assert "copies: implicit (norm input)" not in parts["per_block"][block]  # q/k contiguous for the norms
        assert _flattened_gradient_copies(parts, block) == 0


def test_census_layout_rules():
    """The strides the census follows: a transposed array's reshape copies, a split one's does not."""
    import graph_census as G

    assert G._reshape_strides((2, 8, 48), (384, 48, 1), (2, 8, 3, 16)) == (384, 48, 16, 1)
    assert G._reshape_strides((1, 8, 4, 4), (128, 4, 32, 1), (1, 8, 16)) is None  # heads merged after a transpose
    assert G._reshape_strides((32, 96), (1, 32), (3072,)) is None  # a column-major gradient flattened
    assert G._reshape_strides((96, 32), (32, 1), (3072,)) == (1,)
    assert G._gemm_ok((64, 32), (1, 64)) and G._gemm_ok((64, 32), (96, 1)) and not G._gemm_ok((8, 16), (32, 2))
    assert G._norm_ok((2, 8, 4, 16), (512, 64, 16, 1)) and not G._norm_ok((2, 8, 4, 16), (1536, 192, 16, 1))
