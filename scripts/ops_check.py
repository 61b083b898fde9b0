"""Every fast path of mflux2.ops against its plain-MLX fallback on this machine's default device.

Values and gradients on random float32 inputs (mflux2/ops/agreement.py); the CUDA kernels too where
mx.cuda is available (elsewhere they are reported as skipped). Prints one JSON line
{op: {"max_rel_err": ..., "ok": ...}} and exits 1 if any op disagrees (max_rel_err > 1e-4).

    python scripts/ops_check.py            # the GPU benchmark's run (scripts/gpu_bench.sh)
    python scripts/ops_check.py --cpu      # force the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mflux2.ops.agreement import CHECKS, check  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (the CUDA kernels are skipped)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    results = {}
    for name in CHECKS:
        try:
            results[name] = check(name, args.seed)
        except Exception as e:  # a kernel that fails to build or run is a disagreement too
            results[name] = {"max_rel_err": None, "ok": False, "error": f"{type(e).__name__}: {e}"}
    results["device"] = str(mx.default_device())
    print(json.dumps(results))
    return 0 if all(r["ok"] for k, r in results.items() if k != "device") else 1


if __name__ == "__main__":
    sys.exit(main())
