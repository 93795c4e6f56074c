"""`tensorps bench`: a short self-check of a server's latency and throughput, from where the command runs.

Half the time goes to small writes (a 4 KiB Assign without reading back: the latency of one call), the
other half to a large tensor (--large-bytes, default 16 MiB) written and read in turns (throughput).
It works on two variables of its own, `tensorps-bench/<random>/...`, deleted at the end. The figures
include the client's own work; `make bench` (bench/) is the project's measurement.
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

import numpy as np

from tensorps.cli.commands import Session, command
from tensorps.cli.exits import CommandError

SMALL_BYTES = 4096
MiB = 1 << 20


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0, help="seconds in all (default: 10)")
    parser.add_argument(
        "--large-bytes", type=int, default=16 * MiB, help="size of the large tensor (default: 16 MiB)"
    )


def _percentile(sorted_seconds: list[float], fraction: float) -> float:
    index = min(len(sorted_seconds) - 1, int(fraction * len(sorted_seconds)))
    return sorted_seconds[index] * 1e3


@command("bench", "a short self-check: small-write latency and large-tensor throughput", _arguments)
def bench(session: Session) -> int | None:
    args = session.args
    if not 0 < args.duration <= 3600:
        raise CommandError("--duration must be between 0 and 3600 seconds")
    if not 4 <= args.large_bytes <= 1 << 34:
        raise CommandError("--large-bytes must be between 4 bytes and 16 GiB")
    ps = session.client
    prefix = f"tensorps-bench/{secrets.token_hex(4)}"
    small_name, large_name = f"{prefix}/small", f"{prefix}/large"
    small = np.arange(SMALL_BYTES // 4, dtype=np.float32)
    large = np.ones(args.large_bytes // 4, dtype=np.float32)
    ps.create(small_name, value=small)
    try:
        ps.create(large_name, value=large)
        try:
            latencies = _small_writes(ps, small_name, small, args.duration / 2)
            writes, reads = _large_transfers(ps, large_name, large, args.duration / 2)
        finally:
            ps.delete(large_name)
    finally:
        ps.delete(small_name)
    latencies.sort()
    spent = sum(latencies)
    result: dict[str, Any] = {
        "target": session.connection.target,
        "small": {
            "bytes": SMALL_BYTES,
            "calls": len(latencies),
            "calls_per_second": len(latencies) / spent,
            "p50_ms": _percentile(latencies, 0.50),
            "p90_ms": _percentile(latencies, 0.90),
            "p99_ms": _percentile(latencies, 0.99),
        },
        "large": {
            "bytes": large.nbytes,
            "writes": len(writes),
            "reads": len(reads),
            "write_mb_per_second": large.nbytes * len(writes) / sum(writes) / 1e6,
            "read_mb_per_second": large.nbytes * len(reads) / sum(reads) / 1e6,
        },
    }
    s, big = result["small"], result["large"]
    text = "\n".join(
        (
            f"target: {result['target']}",
            f"small assign ({SMALL_BYTES} B, one client): {s['calls']} calls, {s['calls_per_second']:.0f}/s, "
            f"p50 {s['p50_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms",
            f"large tensor ({big['bytes'] / MiB:.1f} MiB): write {big['write_mb_per_second']:.0f} MB/s "
            f"({big['writes']}x), read {big['read_mb_per_second']:.0f} MB/s ({big['reads']}x)",
        )
    )
    session.out.result(result, text)
    return None


def _small_writes(ps: Any, name: str, value: np.ndarray[Any, Any], seconds: float) -> list[float]:
    latencies = []
    end = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        ps.assign(name, value, read_value=False)
        finished = time.perf_counter()
        latencies.append(finished - started)
        if finished >= end:
            return latencies


def _large_transfers(
    ps: Any, name: str, value: np.ndarray[Any, Any], seconds: float
) -> tuple[list[float], list[float]]:
    writes: list[float] = []
    reads: list[float] = []
    end = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        ps.assign(name, value, read_value=False)
        middle = time.perf_counter()
        ps.read(name)
        finished = time.perf_counter()
        writes.append(middle - started)
        reads.append(finished - middle)
        if finished >= end:
            return writes, reads
