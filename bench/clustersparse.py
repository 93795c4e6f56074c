"""`python -m bench.clustersparse`: embedding rows on one tensorps server and on a cluster of local shards.

The sparse workload of bench/sparse.py (gather and scatter_add of 1,024 random rows x 64 float32, and
sparse_apply_adagrad of them with its accumulator beside the table) through Client("host:port") on a
plain table and through Client("a,b,c") on the same table partitioned over every shard (its accumulator
colocated), whose calls split the rows by part and send one request per shard at once. Calls/s and rows/s
(median of the rounds), and each server's CPU per call. Prints Markdown on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench import procstat
from bench.clusterstep import Setup, start
from tensorps.client import Client, fixed_size_partitioner, placement
from tensorps.client.cluster import ClusterClient

WIDTH, BATCH = 64, 1024
OPS = ("gather", "scatter_add", "sparse_apply_adagrad")


def _calls(ps: Client, name: str, ids: Sequence[np.ndarray[Any, Any]]) -> dict[str, Callable[[int], Any]]:
    grad = np.full((BATCH, WIDTH), 1e-3, np.float32)
    lr = np.float32(0.01)
    return {
        "gather": lambda i: ps.gather(name, ids[i]),
        "scatter_add": lambda i: ps.scatter_add(name, ids[i], grad),
        "sparse_apply_adagrad": lambda i: ps.sparse_apply_adagrad(name, name + "/Adagrad", lr, grad, ids[i]),
    }


def spread_name(shards: int) -> str:
    """A table name whose parts land on distinct shards (parts are placed by their own names, so three
    parts may share a shard; the benchmark measures the fan-out over all of them)."""
    for index in range(10_000):
        name = f"bench/cluster-sparse-{index}"
        owners = {placement.owner(placement.part_name(name, k), shards) for k in range(shards)}
        if len(owners) == shards:
            return name
    raise AssertionError("no name spreads over the shards")


def measure(setups: Sequence[Setup], rows: int, rounds: int, calls: int) -> dict[str, dict[str, Any]]:
    """Per setup and op: the median calls/s over `rounds` of `calls` calls, and server CPU ms per call."""
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, rows, BATCH, dtype=np.int64) for _ in range(calls)]
    table = (0.01 * rng.standard_normal((rows, WIDTH))).astype(np.float32)
    found: dict[str, dict[str, Any]] = {}
    for setup in setups:
        with Client(setup.target, timeout=300) as ps:
            name = spread_name(len(setup.servers))
            if isinstance(ps, ClusterClient):
                ps.create(name, value=table, partitioner=fixed_size_partitioner(len(ps.shards)))
            else:
                ps.create(name, value=table)
            ps.create(name + "/Adagrad", value=np.full_like(table, 0.1), colocate_with=name)
            work = _calls(ps, name, ids)
            result: dict[str, Any] = {}
            for op in OPS:
                work[op](0)  # warm-up
                rates = []
                before = [procstat.tree_cpu_seconds(s.pid) for s in setup.servers]
                for _ in range(rounds):
                    began = time.perf_counter()
                    for i in range(calls):
                        work[op](i)
                    rates.append(calls / (time.perf_counter() - began))
                cpu = [
                    procstat.tree_cpu_seconds(s.pid) - c for s, c in zip(setup.servers, before, strict=True)
                ]
                result[op] = (statistics.median(rates), [c / (rounds * calls) for c in cpu])
            found[setup.label] = result
            ps.delete(name + "/Adagrad")
            ps.delete(name)
    return found


def table(found: dict[str, dict[str, Any]], rows: int, rounds: int, calls: int) -> str:
    lines = [
        f"### Sparse rows: one server vs a cluster ({BATCH:,} rows x {WIDTH} float32 of {rows:,}; "
        f"median of {rounds} rounds of {calls} calls)",
        "",
        "| setup | op | calls/s | rows/s | server CPU per call (ms), per server |",
        "|---|---|---:|---:|---|",
    ]
    for label, result in found.items():
        for op in OPS:
            rate, cpu = result[op]
            per = ", ".join(f"{c * 1e3:.2f}" for c in cpu)
            lines.append(f"| {label} | {op} | {rate:,.0f} | {rate * BATCH:,.0f} | {per} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clustersparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the table (default 1,000,000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=50, help="calls per round")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="worker processes per server")
    args = p.parse_args(argv)
    if args.rows < BATCH:
        p.error(f"--rows must be at least {BATCH}")
    setups: list[Setup] = []
    try:
        setups = [start(1, args.workers), start(args.shards, args.workers)]
        found = measure(setups, args.rows, args.rounds, args.calls)
        print(table(found, args.rows, args.rounds, args.calls))
    finally:
        for setup in setups:
            for server in setup.servers:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
