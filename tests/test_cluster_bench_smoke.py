"""bench/clusterstep.py runs end to end on a tiny model (its numbers are for `make bench-cluster`)."""

from __future__ import annotations

import re
import sys

from support import run


def test_cluster_step_benchmark_runs() -> None:
    result = run(
        [sys.executable, "-m", "bench.clusterstep", "--model", "tiny_cnn", "--rounds", "1"], timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^\| (1 server|3 shards) .*\| ([\d, ]+) \(total \d+\) \|$", result.stdout, re.M)
    assert [label for label, _ in rows] == ["1 server", "3 shards"], result.stdout
    assert len(rows[1][1].split(",")) == 3  # a CPU figure per shard


def test_cluster_sparse_benchmark_runs() -> None:
    """bench/clustersparse.py on a small table: a row per op and setup."""
    command = [sys.executable, "-m", "bench.clustersparse", "--rows", "4096", "--rounds", "1", "--calls", "2"]
    result = run(command, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = re.findall(r"^\| (1 server|3 shards) [^|]*\| (\w+) \|", result.stdout, re.M)
    assert len(rows) == 6 and {op for _, op in rows} == {"gather", "scatter_add", "sparse_apply_adagrad"}
