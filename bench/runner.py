"""The run: start every system, measure them round-robin, collect medians and memory."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench import modelstep, procstat, workloads
from bench.backends import Endpoint, Server, Skipped, Target, connect, naive, rediskv, tfps, tps
from bench.backends.process import StartError
from bench.fleet import Concurrent, Fleet
from bench.profiles import Profile

# Keys of --systems, in table order. Optional systems return Skipped when they cannot run here.
STARTERS: dict[str, Callable[[], Server | Skipped]] = {
    "tensorps1": lambda: tps.start(1),
    "tensorps2": lambda: tps.start(2),
    "tensorps1-grpc": lambda: tps.start(1, bulk=False),
    "tensorps2-grpc": lambda: tps.start(2, bulk=False),
    "naive": naive.start,
    "redis": rediskv.start,
    "tf": tfps.start,
}
OPTIONAL = {"redis": rediskv.LABEL, "tf": tfps.LABEL}
# Only when named in --systems: tensorps with --bulk-port off, to compare the data paths in one run.
EXTRA = ("tensorps1-grpc", "tensorps2-grpc")
BASELINES = (naive.LABEL, rediskv.LABEL)

SMALL, LARGE = "bench/small", "bench/large"


_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def client_names(count: int) -> list[str]:
    return [f"bench/client{i}" for i in range(count)]


@dataclass
class Results:
    """One system's measurements: a value per round, medians in the report."""

    server: Server
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    small_rate: list[float] = field(default_factory=list)
    assign_read: list[float] = field(default_factory=list)
    assign_blind: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    concurrent: list[Concurrent] = field(default_factory=list)
    stored: int = 0
    memory: procstat.Memory | None = None
    store_bytes: int | None = None

    @property
    def label(self) -> str:
        return self.server.label


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def start_systems(keys: Sequence[str]) -> list[Server | Skipped]:
    """Start the systems in parallel; if a required one fails, stop the others and raise."""
    with ThreadPoolExecutor(len(keys)) as pool:
        futures = {key: pool.submit(STARTERS[key]) for key in keys}
    started: list[Server | Skipped] = []
    failure: StartError | None = None
    for key, future in futures.items():
        try:
            started.append(future.result())
        except Exception as exc:
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            if key in OPTIONAL:
                started.append(Skipped(OPTIONAL[key], f"skipped: failed to start ({last})"))
            else:
                failure = exc if isinstance(exc, StartError) else StartError(f"{key}: {last}")
    if failure is not None:
        stop_systems(started)
        raise failure
    return started


def stop_systems(systems: Sequence[Server | Skipped]) -> None:
    for system in systems:
        if isinstance(system, Server):
            system.stop()


def _rotated(items: list[Results], round_index: int) -> list[Results]:
    # Each round starts with another system, so that no system always runs right after the same one.
    shift = round_index % len(items)
    return items[shift:] + items[:shift]


def compare(servers: Sequence[Server], profile: Profile, fleet: Fleet) -> list[Results]:
    results = [Results(server) for server in servers]
    endpoints: dict[str, Endpoint] = {s.label: connect(s.target) for s in servers}
    small = workloads.payload(profile.small_bytes, seed=1)
    large = workloads.payload(profile.large_bytes, seed=2)
    try:
        for result in results:
            endpoint = endpoints[result.label]
            endpoint.put(SMALL, small)
            endpoint.put(LARGE, large)
            result.stored = small.nbytes * (1 + profile.clients) + large.nbytes
            # Untimed: first calls open connections and allocate (tensorps's second buffer, say).
            workloads.small_assigns(endpoint, SMALL, small, 20)
            workloads.large_assigns(endpoint, LARGE, large, 2, read_value=True)
            workloads.large_reads(endpoint, LARGE, large, 1)
        for index in range(profile.rounds):
            order = _rotated(results, index)
            progress(f"round {index + 1}/{profile.rounds}: {', '.join(r.label for r in order)}")
            for r in order:
                latency = workloads.small_assigns(endpoints[r.label], SMALL, small, profile.small_calls)
                r.p50.append(latency.p50)
                r.p99.append(latency.p99)
                r.small_rate.append(latency.rate)
            for r in order:
                ep = endpoints[r.label]
                r.assign_read.append(
                    workloads.large_assigns(ep, LARGE, large, profile.large_calls, read_value=True)
                )
            for r in order:
                ep = endpoints[r.label]
                r.assign_blind.append(
                    workloads.large_assigns(ep, LARGE, large, profile.large_calls, read_value=False)
                )
            for r in order:
                r.read.append(workloads.large_reads(endpoints[r.label], LARGE, large, profile.large_calls))
            for r in order:
                names = client_names(profile.clients)
                run = fleet.run(
                    r.server.target, names, profile.small_bytes, profile.window, r.server.cpu_seconds
                )
                r.concurrent.append(run)
    finally:
        for endpoint in endpoints.values():
            endpoint.close()
    for r in results:
        r.memory = r.server.memory()
        if r.server.store is not None:
            r.store_bytes = procstat.directory_bytes(r.server.store)
    return results


def scaling(one: Server, two: Server, profile: Profile, fleet: Fleet) -> list[tuple[Concurrent, Concurrent]]:
    """Concurrent small assigns against 1 and 2 workers, alternating which goes first."""
    rounds: list[tuple[Concurrent, Concurrent]] = []
    names = client_names(profile.clients)
    for index in range(profile.scaling_rounds):
        progress(f"workers scaling: round {index + 1}/{profile.scaling_rounds}")
        measured: dict[str, Concurrent] = {}
        for server in (one, two) if index % 2 == 0 else (two, one):
            measured[server.label] = fleet.run(
                server.target, names, profile.small_bytes, profile.window, server.cpu_seconds
            )
        rounds.append((measured[one.label], measured[two.label]))
    return rounds


def model_systems(servers: Sequence[Server]) -> list[modelstep.System]:
    """The servers, plus a shm:// client on the first tensorps server's store after the last tensorps one."""
    systems = [modelstep.System(s.label, s.target) for s in servers]
    stored = [index for index, s in enumerate(servers) if s.store is not None]
    if stored:
        store = servers[stored[0]].store
        shm = modelstep.System(tps.SHM_LABEL, Target("tensorps", f"shm://{store}"))
        systems.insert(stored[-1] + 1, shm)
    return systems
