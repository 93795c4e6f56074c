"""The benchmark's quick profile runs end to end, so that `python -m bench` cannot rot unnoticed."""

from __future__ import annotations

import glob
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _row(output: str, label: str) -> str:
    return next((line for line in output.splitlines() if line.startswith(f"| {label} |")), "")


@pytest.mark.timeout(280)
def test_quick_profile_prints_the_comparison_table() -> None:
    """`python -m bench --profile quick --workers-scaling` exits 0, prints every row, leaves no store."""
    before = set(glob.glob("/dev/shm/tensorps-bench-*"))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--profile", "quick", "--workers-scaling"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=270,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| system |" in out
    for label in ("tensorps (1 worker)", "tensorps (2 workers)", "naive gRPC"):
        assert _row(out, label), f"no row for {label}:\n{out}"
    assert _row(out, "*tensorps (2 workers) vs naive gRPC*")
    if shutil.which("redis-server") and importlib.util.find_spec("redis"):
        assert "skipped" not in _row(out, "Redis"), out
        assert _row(out, "*tensorps (2 workers) vs Redis*")
    else:
        assert _row(out, "Redis").startswith("| Redis | skipped: "), out
    assert "| **median** |" in out, "the workers-scaling table is missing"
    assert not set(glob.glob("/dev/shm/tensorps-bench-*")) - before, "the benchmark left a store behind"
