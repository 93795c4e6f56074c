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


def _model_steps(output: str, title: str) -> dict[tuple[str, str], list[str]]:
    """The rows of the model-step table of `title`: (system, push) -> the other cells."""
    lines = output.split(f"Model step, **{title}**", 1)[1].split("\n\n", 2)[1].splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {(row[0], row[1]): row[2:] for row in cells}


@pytest.mark.timeout(280)
def test_quick_profile_prints_the_comparison_table() -> None:
    """`python -m bench --profile quick --workers-scaling` exits 0, prints every row of the single-call and
    model-step tables, leaves no store."""
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
    _assert_model_steps(out)
    assert not set(glob.glob("/dev/shm/tensorps-bench-*")) - before, "the benchmark left a store behind"


def _assert_model_steps(out: str) -> None:
    """A tiny CNN's 40 tensors pulled and pushed by every system; tensorps either batched or per variable."""
    steps = _model_steps(out, "tiny CNN")
    assert ("raw TCP floor", "-") in steps, out
    systems = ["tensorps (1 worker)", "tensorps (2 workers)", "tensorps shm:// (same host)", "naive gRPC"]
    if shutil.which("redis-server") and importlib.util.find_spec("redis"):
        systems.append("Redis")
    for system in systems:
        for push in ("assign", "assign_add"):
            rows = [cells for (name, how), cells in steps.items() if how == push and name.startswith(system)]
            assert rows, f"no {push} model step for {system}:\n{out}"
            calls, step_ms = rows[0][1], rows[0][2]
            if system.startswith("tensorps"):
                assert calls in {"1 + 1", "40 + 40"}, calls
            elif system == "naive gRPC":
                assert calls == "40 + 40", calls
            else:
                assert calls == ("1 + 2" if push == "assign_add" else "1 + 1"), calls
            assert float(step_ms.replace(",", "")) > 0, rows[0]


@pytest.mark.timeout(200)
def test_sparse_workload_prints_its_table() -> None:
    """`python -m bench --profile quick --workloads sparse` (a small table) exits 0 with a row per system,
    the remote target line and the locked scatter_add's memory line, and leaves no store."""
    before = set(glob.glob("/dev/shm/tensorps-bench-*"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--profile",
            "quick",
            "--workloads",
            "sparse",
            "--sparse-rows",
            "20000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=190,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for label in ("tensorps (1 worker)", "tensorps shm:// (same host)", "naive gRPC"):
        cells = _row(out, label).strip("|").split("|")
        assert len(cells) == 9 and float(cells[1].replace(",", "")) > 0, f"no row for {label}:\n{out}"
    if shutil.which("redis-server") and importlib.util.find_spec("redis"):
        assert float(_row(out, "Redis").strip("|").split("|")[1].replace(",", "")) > 0, out
    assert "Target (remote): a gather of 256 KiB took" in out
    assert "grew the store's bytes in use by 0" in out, out
    assert not set(glob.glob("/dev/shm/tensorps-bench-*")) - before, "the benchmark left a store behind"
