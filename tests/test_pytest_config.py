"""The project's pytest settings keep a result line: `pytest -q` (quiet on top of addopts) still ends
with "N passed", so a run's outcome is readable without scrolling through dots."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pytest_q_prints_the_summary_line():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                          "tests/test_phases.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.match(r"\d+ passed in ", out.stdout.strip().splitlines()[-1]), out.stdout[-500:]
