"""Prometheus metrics (--metrics-port): every worker counts its calls, the supervisor serves the sum.

The workers are separate processes, so the metrics use prometheus_client's multiprocess mode: each process
writes its counters and histograms to memory-mapped files in a directory that the supervisor creates before
it forks the workers (PROMETHEUS_MULTIPROC_DIR) and removes at shutdown; at each scrape the supervisor's
HTTP endpoint adds up the files of every process, those of dead workers included, so that counters never go
down when a worker is replaced. A dead worker's live gauges are dropped (mark_process_dead).

The store's gauges (bytes and variables stored, the budget) are read from the store at scrape time, so they
are exact whichever worker made the last change. Snapshot gauges come from a function set as the
supervisor's `Metrics.snapshot_source` (app.serve holds the object): called at each scrape in the
supervisor, it returns the last finished snapshot's SnapshotStatus (read from what the snapshot left on disk,
since another process may have taken it), or None while there is none.

Names are listed in the README ("Operating tensorps"); they keep to Prometheus's conventions (base units,
`_total` counters, `_seconds` and `_bytes`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from tensorps.server.staging import Staging
from tensorps.server.store import Store, StoreError

log = logging.getLogger("tensorps.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# tensorps-metrics-<supervisor pid>-<random> in the temporary directory.
DIRECTORY_PREFIX = "tensorps-metrics-"
# From 100 µs (a small call on loopback) to 30 s (a large streamed tensor).
LATENCY_BUCKETS = (
    *(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05),
    *(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
# Lock waits are mostly free (an uncontended fcntl: a few µs); the tail is what matters.
LOCK_BUCKETS = (1e-5, 1e-4, 1e-3, 0.01, 0.1, 1, 10)


@dataclass(frozen=True)
class SnapshotStatus:
    """The last finished snapshot: when it finished (Unix time) and how long it took."""

    finished: float
    duration: float


SnapshotSource = Callable[[], SnapshotStatus | None]


class _StoreCollector(Collector):
    """Gauges read from the store at each scrape (the supervisor holds no handle on it in between)."""

    def __init__(self, store_path: str, snapshots: Callable[[], SnapshotSource | None]) -> None:
        self.store_path = store_path
        self._snapshots = snapshots

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            store = Store.attach(self.store_path, wait=0.0)
        except (StoreError, OSError) as exc:
            log.warning("metrics: cannot read the store %s: %s", self.store_path, exc)
        else:
            try:
                stored, count = store.used_bytes, store.variable_count
                budget, most = store.limits.max_total_bytes, store.limits.max_variables
            finally:
                store.close()
            yield GaugeMetricFamily("tensorps_stored_bytes", "Bytes of variables in the store", stored)
            yield GaugeMetricFamily(
                "tensorps_budget_bytes", "The store's byte budget (--max-total-bytes)", budget
            )
            yield GaugeMetricFamily("tensorps_variables", "Variables in the store", count)
            yield GaugeMetricFamily("tensorps_max_variables", "Most variables the store holds", most)
        source = self._snapshots()
        status = source() if source is not None else None
        if status is not None:
            yield GaugeMetricFamily(
                "tensorps_snapshot_age_seconds",
                "Seconds since the last snapshot finished",
                max(0.0, time.time() - status.finished),
            )
            yield GaugeMetricFamily(
                "tensorps_snapshot_duration_seconds", "How long the last snapshot took", status.duration
            )


def _sweep_stale_directories() -> None:
    """Remove the metrics directories of supervisors that died without removing theirs (SIGKILL)."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid, _, rest = name.removeprefix(DIRECTORY_PREFIX).partition("-")
        if not name.startswith(DIRECTORY_PREFIX) or not pid.isdigit() or not rest:
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its supervisor still runs (or another process has its pid: left alone)
        except ProcessLookupError:
            pass
        except OSError:
            continue  # a process of another user: alive
        path = os.path.join(root, name)
        if os.path.isdir(path) and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed the metrics directory %s of a server that is gone", path)


class Metrics:
    """The metrics of one server. Made by the supervisor before it forks; workers inherit and update it.

    Updating is cheap (well under 2 µs a value); label children are cached so that a call does not pay for
    labels() lookups.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.snapshot_source: SnapshotSource | None = None
        self._http: Any = None
        kind = ("service", "method")
        self.calls = Counter(
            "tensorps_calls", "Calls handled, by method and status code", (*kind, "code"), registry=None
        )
        self.latency = Histogram(
            "tensorps_call_duration_seconds",
            "Time to handle a call",
            kind,
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.received = Counter(
            "tensorps_received_bytes", "Request message bytes received (gRPC)", kind, registry=None
        )
        self.sent = Counter("tensorps_sent_bytes", "Response message bytes sent (gRPC)", kind, registry=None)
        self.bulk_received = Counter(
            "tensorps_bulk_received_bytes", "Batch values received over bulk", registry=None
        )
        self.bulk_sent = Counter(
            "tensorps_bulk_sent_bytes", "Batch values sent over the bulk channel", registry=None
        )
        self.lock_waits = Histogram(
            "tensorps_lock_wait_seconds",
            "Waits for a variable's lock stripe",
            buckets=LOCK_BUCKETS,
            registry=None,
        )
        self.restarts = Counter(
            "tensorps_worker_restarts", "Worker processes that died and were replaced", registry=None
        )
        self.workers = Gauge(
            "tensorps_workers", "Worker processes running", multiprocess_mode="livemax", registry=None
        )
        self._per_call: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}
        self._per_call_lock = threading.Lock()
        self._lock_wait = self.lock_waits.observe

    @classmethod
    def enable(cls) -> Metrics:
        """Create the metrics directory and the metrics; call in the supervisor before any fork."""
        _sweep_stale_directories()
        directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-")
        os.environ[MULTIPROC_ENV] = directory
        # prometheus_client picks its value class when it is imported: once the directory is known, pick
        # again, so that every metric made from here on is backed by the directory's files.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        return cls(directory)

    # ---- updates (workers) ---------------------------------------------------------------------

    def call(self, service: str, method: str, code: str, seconds: float, *, received: int, sent: int) -> None:
        """Count one finished call."""
        key = (service, method, code)
        children = self._per_call.get(key)
        if children is None:
            with self._per_call_lock:
                children = (
                    self.calls.labels(service, method, code),
                    self.latency.labels(service, method),
                    self.received.labels(service, method),
                    self.sent.labels(service, method),
                )
                self._per_call[key] = children
        calls, latency, received_bytes, sent_bytes = children
        calls.inc()
        latency.observe(seconds)
        if received:
            received_bytes.inc(received)
        if sent:
            sent_bytes.inc(sent)

    def lock_waited(self, seconds: float) -> None:
        self._lock_wait(seconds)

    def watch_staging(self, staging: Staging) -> None:
        """Follow a worker's staging budget (--max-staging-bytes) and its use (called in the worker: gauges
        made in the supervisor would show it as one more process with nothing in transit)."""
        limit = Gauge(
            "tensorps_staging_limit_bytes",
            "Each worker's staging budget",
            multiprocess_mode="livemax",
            registry=None,
        )
        used = Gauge(
            "tensorps_staging_bytes",
            "Tensor bytes in transit through a worker",
            multiprocess_mode="liveall",
            registry=None,
        )
        limit.set(staging.limit)
        used.set(staging.used)
        staging.on_change = used.set

    def bulk_transferred(self, received: int, sent: int) -> None:
        """Count one bulk batch's bytes (they travel beside gRPC, outside its message counts)."""
        if received:
            self.bulk_received.inc(received)
        if sent:
            self.bulk_sent.inc(sent)

    # ---- supervisor ----------------------------------------------------------------------------

    def serve(self, host: str, port: int, store_path: str) -> int:
        """Serve /metrics on host:port from a thread (port 0: a free one); returns the port."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        registry.register(_StoreCollector(store_path, lambda: self.snapshot_source))
        server, _thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
        self._http = server
        # A forked worker must not keep the listening socket (it would hold the port after a restart of
        # the supervisor's endpoint, and it never accepts on it).
        os.register_at_fork(after_in_child=self._close_in_child)
        bound: int = server.server_port
        return bound

    def _close_in_child(self) -> None:
        if self._http is not None:
            self._http.socket.close()
            self._http = None

    def worker_died(self, pid: int, *, replaced: bool) -> None:
        """Drop a dead worker's live gauges; count it if it is to be replaced."""
        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        if replaced:
            self.restarts.inc()

    def close(self) -> None:
        """Stop serving and remove the directory (the supervisor, at shutdown)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        shutil.rmtree(self.directory, ignore_errors=True)
