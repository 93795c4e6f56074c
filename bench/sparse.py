"""The sparse workload (opt-in, `--workloads sparse`): embedding rows.

gather and scatter_add of 1,024 random rows x 64 float32 (256 KiB) from a 1,000,000-row table (256 MB), one
client, calls back to back: tensorps over gRPC and through shm://, the naive gRPC service (np.take and
np.add.at behind grpcio) and Redis (the table as a hash of row id -> row bytes: HMGET, and HMGET + add in
the client + HSET for scatter_add). Every system is checked once: rows added to read back exactly.

Also, against the issue's targets: tensorps's remote gather next to twice (a 4 KiB assign + the rows' bytes
at the bulk speed of a 16 MiB assign), and what a locked scatter_add costs the server in store bytes and RSS
(an undo record of the touched rows, never a second table).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench import procstat, workloads
from bench.backends import Server, connect, rediskv, tps
from bench.backends.tps import TensorpsEndpoint
from bench.profiles import Profile

ROWS, WIDTH, BATCH = 1_000_000, 64, 1024  # ROWS: the default of --sparse-rows
TABLE = "bench/emb"
Array = np.ndarray[Any, Any]


@dataclass
class SparseResult:
    label: str
    gather: list[float] = field(default_factory=list)  # seconds per call, median of each round
    scatter: list[float] = field(default_factory=list)
    locked: list[float] = field(default_factory=list)  # tensorps only: use_locking=True


@dataclass
class Targets:
    small_p50: float  # seconds, a 4 KiB assign
    bulk_gbps: float  # a 16 MiB assign without read_value
    store_growth: int  # bytes the store's budget grew over locked scatter_adds
    rss_growth: int  # bytes the server's RSS grew over them
    table_bytes: int


def _timed(call: Callable[..., object], batches: Sequence[Array], *args: Any, **kwargs: Any) -> float:
    """The median seconds of call(TABLE, indices, *args, **kwargs) over the batches, back to back."""
    times = []
    for indices in batches:
        start = time.perf_counter()
        call(TABLE, indices, *args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _verify(label: str, endpoint: Any, table_rows: int) -> None:
    rng = np.random.default_rng(7)
    idx = rng.choice(table_rows, BATCH, replace=False).astype(np.int64)
    before = np.array(endpoint.gather(TABLE, idx))
    endpoint.scatter_add(TABLE, idx, np.ones((BATCH, WIDTH), np.float32), use_locking=False)
    after = endpoint.gather(TABLE, idx)
    workloads.check(f"{label}: gather after scatter_add", after, before + 1)


def run(
    servers: Sequence[Server], profile: Profile, progress: Callable[[str], None], *, table_rows: int = ROWS
) -> tuple[list[SparseResult], Targets | None]:
    """Every server (and shm:// on the first tensorps store), round-robin, `profile.rounds` rounds."""
    table = np.random.default_rng(1).standard_normal((table_rows, WIDTH), dtype=np.float32)
    endpoints: list[tuple[str, Any]] = []
    first_tps: Server | None = None
    for server in servers:
        endpoints.append((server.label, connect(server.target)))
        if server.store is not None and first_tps is None:
            first_tps = server
            endpoints.append((tps.SHM_LABEL, TensorpsEndpoint(f"shm://{server.store}")))
    results = [SparseResult(label) for label, _ in endpoints]
    calls = max(10, profile.small_calls // 10)
    rng = np.random.default_rng(2)
    updates = rng.standard_normal((BATCH, WIDTH), dtype=np.float32)
    targets = None
    try:
        for label, endpoint in endpoints:
            if label == tps.SHM_LABEL:
                continue  # the same store as the remote tensorps
            progress(f"sparse: loading the {table_rows:,}-row table into {label}")
            if isinstance(endpoint, rediskv.RedisEndpoint):
                endpoint.put_table(TABLE, table)
            else:
                endpoint.put(TABLE, table)
        for label, endpoint in endpoints:
            _verify(label, endpoint, table_rows)
        for index in range(profile.rounds):
            shift = index % len(endpoints)
            order = list(zip(endpoints, results, strict=True))
            order = order[shift:] + order[:shift]
            progress(f"sparse round {index + 1}/{profile.rounds}")
            for (_label, endpoint), result in order:
                batches = [rng.integers(0, table_rows, BATCH) for _ in range(calls)]
                result.gather.append(_timed(endpoint.gather, batches))
                result.scatter.append(_timed(endpoint.scatter_add, batches, updates, use_locking=False))
                if isinstance(endpoint, TensorpsEndpoint):
                    result.locked.append(_timed(endpoint.scatter_add, batches, updates, use_locking=True))
        if first_tps is not None:
            remote = next(e for label, e in endpoints if label == first_tps.label)
            targets = _targets(first_tps, remote, updates, table_rows)
    finally:
        for _label, endpoint in endpoints:
            endpoint.close()
    return results, targets


def _targets(server: Server, endpoint: TensorpsEndpoint, updates: Array, table_rows: int) -> Targets:
    small = workloads.payload(4 << 10, seed=3)
    large = workloads.payload(16 << 20, seed=4)
    endpoint.put("bench/sparse-small", small)
    endpoint.put("bench/sparse-large", large)
    latency = workloads.small_assigns(endpoint, "bench/sparse-small", small, 200)
    speed = workloads.large_assigns(endpoint, "bench/sparse-large", large, 3, read_value=False)
    client = endpoint.client
    used = client.server_info().used_bytes
    rss = procstat.tree_memory(server.process.pid).rss
    rng = np.random.default_rng(9)
    for _ in range(20):
        client.scatter_add(TABLE, rng.integers(0, table_rows, BATCH), updates, use_locking=True)
    return Targets(
        latency.p50,
        speed,
        client.server_info().used_bytes - used,
        procstat.tree_memory(server.process.pid).rss - rss,
        table_rows * WIDTH * 4,
    )


def table(
    results: Sequence[SparseResult],
    targets: Targets | None,
    skipped: Sequence[str],
    *,
    table_rows: int = ROWS,
) -> str:
    rows_bytes = BATCH * WIDTH * 4
    lines = [
        f"Sparse rows: gather and scatter_add of {BATCH:,} random rows x {WIDTH} float32 "
        f"({rows_bytes >> 10} KiB) from a {table_rows:,}-row table ({table_rows * WIDTH * 4 / 1e6:.0f} MB), "
        "one client, "
        "medians of rounds.",
        "",
        "| system | gather calls/s | gather rows/s | gather ms | scatter_add calls/s | rows/s | ms "
        "| locked scatter_add calls/s | ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        g, s = statistics.median(r.gather), statistics.median(r.scatter)
        locked = statistics.median(r.locked) if r.locked else None
        lines.append(
            f"| {r.label} | {1 / g:,.0f} | {BATCH / g:,.0f} | {g * 1e3:.2f} | {1 / s:,.0f} "
            f"| {BATCH / s:,.0f} | {s * 1e3:.2f} | {'' if locked is None else f'{1 / locked:,.0f}'} "
            f"| {'' if locked is None else f'{locked * 1e3:.2f}'} |"
        )
    for reason in skipped:
        lines.append(f"| {reason} | | | | | | | | |")
    if targets is not None:
        remote = next((r for r in results if r.label.startswith("tensorps (")), None)
        bound = 2 * (targets.small_p50 + rows_bytes / (targets.bulk_gbps * 1e9))
        if remote is not None:
            lines += [
                "",
                f"Target (remote): a gather of {rows_bytes >> 10} KiB took "
                f"{statistics.median(remote.gather) * 1e3:.2f} ms, against 2 x (4 KiB assign "
                f"{targets.small_p50 * 1e3:.2f} ms + {rows_bytes >> 10} KiB at {targets.bulk_gbps:.2f} GB/s)"
                f" = {bound * 1e3:.2f} ms.",
            ]
        lines.append(
            f"20 locked scatter_adds into the {targets.table_bytes / 1e6:.0f} MB table grew the store's "
            f"bytes in use by {targets.store_growth:,} and the server's RSS by "
            f"{targets.rss_growth / 1e6:.1f} MB "
            "(undo records of the touched rows only; no second buffer)."
        )
    return "\n".join(lines)
