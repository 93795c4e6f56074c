"""Process model: a supervisor that owns the store and N forked worker processes serving one port.

Python serves gRPC on one core (the GIL), so several processes serve the same port with SO_REUSEPORT
over one shared-memory store. Workers are forked before any gRPC server or channel exists in the process
(gRPC's core is not fork-safe once started). The kernel balances connections, not calls, across them.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import mmap
import os
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tensorps.server import bulk, logs, reflection
from tensorps.server.auth import TokenAuth, TokenFileError, load_tokens
from tensorps.server.calls import CallObserver
from tensorps.server.cluster import ClusterError, ClusterGate, Shard
from tensorps.server.config import ServerConfig
from tensorps.server.mapping import max_map_count
from tensorps.server.metrics import Metrics
from tensorps.server.ops import Ops
from tensorps.server.persist import lifecycle
from tensorps.server.persist_service import PersistenceService
from tensorps.server.service import SERVICE_NAME, ParameterServer
from tensorps.server.signals import SignalPipe, blocked, die_with_parent
from tensorps.server.store import Store, StoreError

log = logging.getLogger("tensorps.server")

# Room for the protobuf framing around a tensor of max_message_bytes.
_FRAMING_SLACK = 64 * 1024
_RESTART_BACKOFF_MAX = 10.0
_MAX_SEND = 2**31 - 1
MIN_MESSAGE_BYTES = 4 << 20


class StartupError(Exception):
    """The server cannot start (port taken, store unusable); the CLI prints it and exits 1."""


def grpc_options(config: ServerConfig, *, reuseport: bool) -> list[tuple[str, int]]:
    limit = config.max_message_bytes + _FRAMING_SLACK
    return [
        ("grpc.max_receive_message_length", limit),
        # Sending is not what the limit protects: a Batch reply larger than its client expected (a
        # variable grew) must still go out in one message, after its writes were applied.
        ("grpc.max_send_message_length", _MAX_SEND),
        ("grpc.so_reuseport", 1 if reuseport else 0),
    ]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config (mutual TLS with tls_client_ca), or None for plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate"))
    client_ca = _read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def bulk_tls(config: ServerConfig) -> ssl.SSLContext | None:
    """The bulk port's TLS context: the gRPC port's certificate and client CA (None: plaintext)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        return bulk.server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the TLS certificate for the bulk port: {exc}") from None


def open_bulk(config: ServerConfig, index: int) -> bulk.BulkListener | None:
    """Worker `index`'s bulk listener on the gRPC host (None with --bulk-port off)."""
    if not config.bulk:
        return None
    port = config.worker_bulk_port(index)
    try:
        return bulk.BulkListener(config.host, port, bulk_tls(config))
    except OSError as exc:
        raise StartupError(f"cannot listen on bulk port {port} of {config.host}: {exc.strerror}") from None


def build_server(
    config: ServerConfig,
    ops: Ops,
    *,
    reuseport: bool,
    auth: TokenAuth | None = None,
    health_servicer: health.HealthServicer | None = None,
    bulk_listener: bulk.BulkListener | None = None,
    metrics: Metrics | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    # The observer first: it sees every call's final status, the token check's refusals included; the
    # cluster gate last, so that a call is authenticated before it is told which shard owns its variable.
    interceptors: list[grpc.ServerInterceptor] = [CallObserver(metrics)]  # type: ignore[type-arg]
    if auth is not None:
        interceptors.append(auth)
    interceptors.append(ClusterGate(Shard(config.cluster, config.shard_index)))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="tensorps"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=grpc_options(config, reuseport=reuseport),
    )
    servicer = ParameterServer(
        ops,
        workers=config.workers,
        stream_idle_timeout=config.stream_idle_timeout,
        max_message_bytes=config.max_message_bytes,
        max_staging_bytes=config.max_staging_bytes,
        bulk=bulk_listener,
        cluster=config.cluster,
        shard_index=config.shard_index,
    )
    server.add_generic_rpc_handlers((servicer.handler(), PersistenceService(ops).handler()))
    if metrics is not None:
        metrics.watch_staging(servicer.staging)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable(server)
    credentials = server_credentials(config)
    if credentials is None:
        server.add_insecure_port(config.address)
    else:
        server.add_secure_port(config.address, credentials)
    return server, health_servicer


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _set_health(servicer: health.HealthServicer, status: int) -> None:
    for service in ("", SERVICE_NAME):
        servicer.set(service, status)


# ---- worker --------------------------------------------------------------------------------------


class SupervisedHealth(health.HealthServicer):
    """grpc.health.v1 whose Check answers from the supervisor's shared verdict at once.

    Watch streams follow the same verdict through _follow_health (HealthServicer.set), a moment later.
    """

    def __init__(self, status: mmap.mmap) -> None:
        super().__init__()
        self._status = status
        self.stopping = False

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if request.service in ("", SERVICE_NAME):
            serving = self._status[0] == 1 and not self.stopping
            return health_pb2.HealthCheckResponse(status=SERVING if serving else NOT_SERVING)
        return super().Check(request, context)


def _follow_health(status: mmap.mmap, servicer: health.HealthServicer, stop: threading.Event) -> None:
    """Mirror the supervisor's verdict (every worker up or not) into this worker's health service."""
    last = -1
    while not stop.wait(0.2):
        current = status[0]
        if current != last:
            _set_health(servicer, SERVING if current else NOT_SERVING)
            last = current


def run_worker(
    config: ServerConfig,
    ready_fd: int,
    status: mmap.mmap,
    auth: TokenAuth | None,
    mask: Sequence[int],
    *,
    index: int = 0,
    metrics: Metrics | None = None,
) -> int:
    """Serve until SIGTERM, then finish in-flight calls within the grace period. Returns 0.

    `index` (0..workers-1, kept by a restarted worker) places the worker's bulk port.

    Runs in a child forked with the handled signals blocked; `mask` is the signal mask to restore once this
    process handles them itself. `auth` holds the supervisor's last good tokens (inherited through the
    fork): a worker that restarts while the token file is missing or broken serves with them rather than
    crash-looping, and agrees with the workers that kept running.
    """
    signals = SignalPipe((signal.SIGTERM, signal.SIGHUP))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; a terminal's ^C reaches all
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    logs.set_worker(index)
    store = Store.attach(config.store_path)  # never a new store: the supervisor made or found it
    ops = Ops(store, max_variable_bytes=config.max_variable_bytes)
    if metrics is not None:
        ops.on_lock_wait = metrics.lock_waited
    periodic = None
    if index == 0 and ops.persistence is not None and config.snapshot_every > 0:
        periodic = lifecycle.Periodic(ops, config.snapshot_every)
    health_servicer = SupervisedHealth(status)
    listener = open_bulk(config, index)
    if listener is not None and metrics is not None:
        listener.on_transfer = metrics.bulk_transferred
    server, _ = build_server(
        config,
        ops,
        reuseport=True,
        auth=auth,
        health_servicer=health_servicer,
        bulk_listener=listener,
        metrics=metrics,
    )
    server.start()
    if listener is not None:
        listener.start()
    _set_health(health_servicer, NOT_SERVING)
    stop = threading.Event()
    follower = threading.Thread(target=_follow_health, args=(status, health_servicer, stop), daemon=True)
    follower.start()
    bulk_note = f", bulk port {listener.port}" if listener is not None else ""
    log.info("worker %d serving on %s%s", os.getpid(), config.address, bulk_note)
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    while True:
        received, _ = signals.wait(0.5)
        if signal.SIGHUP in received and auth is not None:
            auth.reload()  # here, not in a handler: it logs and takes a lock
        if signal.SIGTERM in received:
            break
        # Let go of segments other workers freed, or their tmpfs pages would stay pinned here.
        store.release_unused()
        if listener is not None:
            listener.pool.trim()
    stop.set()
    health_servicer.stopping = True
    follower.join()
    _set_health(health_servicer, NOT_SERVING)
    server.stop(config.grace).wait()
    if listener is not None:
        listener.close()
    if periodic is not None:
        periodic.stop()
    ops.close()  # the log's last records on disk
    store.close()
    log.info("worker %d stopped", os.getpid())
    return 0


# ---- supervisor ----------------------------------------------------------------------------------


def claim_bulk_ports(config: ServerConfig) -> None:
    """With a fixed --bulk-port P, fail unless P..P+workers-1 are free on the host."""
    if config.bulk_port <= 0:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    for index in range(config.workers):
        port = config.worker_bulk_port(index)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host.strip("[]"), port))
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                what = "is already in use" if in_use else f"cannot be bound: {exc.strerror}"
                raise StartupError(f"bulk port {port} (worker {index}) on {config.host} {what}") from None


def claim_port(config: ServerConfig) -> int:
    """Fail if any socket holds the port; resolve port 0 to a free port.

    gRPC sets SO_REUSEPORT, which would let a second server silently share a busy port, so the check binds a
    plain socket first.
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host.strip("[]"), config.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {config.port} on {config.host} is already in use") from None
            raise StartupError(f"cannot bind {config.address}: {exc.strerror}") from None
        port: int = probe.getsockname()[1]
        return port


@dataclass
class _Worker:
    pid: int
    started: float
    failures: int = 0


# The supervisor's signals: SIGTERM/SIGINT stop (a second one forces), SIGHUP reloads the tokens.
_SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Supervisor:
    config: ServerConfig
    auth: TokenAuth | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False
    force: bool = False
    # One byte shared with the workers (inherited through fork): 1 while every worker is up.
    status: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 1))
    metrics: Metrics | None = None

    def _spawn(self, slot: int, failures: int = 0) -> None:
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        with blocked(_SUPERVISOR_SIGNALS) as mask:
            pid = os.fork()
            if pid == 0:
                self._become_worker(parent, ready_r, ready_w, mask, slot)
        os.close(ready_w)
        self.workers[slot] = _Worker(pid, time.monotonic(), failures)
        self._ready_fds.append(ready_r)
        self._count_workers()

    def _count_workers(self) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self.workers))

    def _worker_died(self, slot: int, *, replaced: bool) -> None:
        pid = self.workers.pop(slot).pid
        if self.metrics is not None:
            self.metrics.worker_died(pid, replaced=replaced)
        self._count_workers()

    def _become_worker(
        self, parent: int, ready_r: int, ready_w: int, mask: Sequence[int], slot: int
    ) -> NoReturn:
        """The child's side of _spawn: serve as a worker, then exit without returning into the supervisor."""
        code = 1
        try:
            os.close(ready_r)
            self._signals.close()  # the supervisor's pipe: this process handles its own signals
            # A worker must not outlive its supervisor (SIGKILLed, say): it would keep the port and the
            # store, and a new server would refuse to start. The kernel sends SIGTERM when it dies.
            if die_with_parent(parent):
                code = run_worker(
                    self.config, ready_w, self.status, self.auth, mask, index=slot, metrics=self.metrics
                )
            else:
                log.warning("worker %d: the supervisor died before it started; exiting", os.getpid())
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def _pause(self, timeout: float, fds: Sequence[int] = ()) -> list[int]:
        """Wait up to `timeout` seconds, acting on any signal received; returns the readable `fds`."""
        received, readable = self._signals.wait(max(0.0, timeout), fds)
        for signum in received:
            self._on_signal(signum)
        return readable

    def _sleep(self, seconds: float) -> None:
        """Sleep, acting on signals, until `seconds` pass or the server is stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._pause(left)

    def _on_signal(self, signum: int) -> None:
        """Act on a signal (from the main loop, never from a handler: this logs and signals workers)."""
        if signum == signal.SIGHUP:
            # Workers reload only if the file reads well; otherwise every process keeps the same tokens.
            if self.auth is not None and self.auth.reload(announce=False):
                self._signal_workers(signal.SIGHUP)
            return
        if self.stopping:
            if not self.force:
                self.force = True
                log.warning("second signal: stopping workers at once")
                self._signal_workers(signal.SIGKILL)
            return
        self.stopping = True
        self.status[0] = 0
        log.info(
            "received %s: finishing in-flight calls (grace %.1f s)",
            signal.Signals(signum).name,
            self.config.grace,
        )
        self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _wait_ready(self, timeout: float) -> bool:
        """Whether every newly spawned worker reported ready in time; their pipes are closed either way."""
        deadline = time.monotonic() + timeout
        pending = list(self._ready_fds)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for fd in self._pause(left, pending):
                    if not os.read(fd, 1):
                        return False  # the worker died before it was ready
                    pending.remove(fd)
            return True
        finally:
            for fd in self._ready_fds:
                os.close(fd)
            self._ready_fds.clear()

    def run(self, signals: SignalPipe | None = None) -> int:
        """Supervise the workers until told to stop; `signals` may hold signals that came before."""
        self._ready_fds: list[int] = []
        self._signals = signals or SignalPipe(_SUPERVISOR_SIGNALS)
        try:
            return self._serve()
        finally:
            self._signals.close()
            # Stopped: later signals (a second SIGTERM sent a moment too late) change nothing now. Ignored
            # rather than left to Python, which restores the default handlers at exit and would turn
            # exit code 0 into death by SIGTERM.
            for signum in _SUPERVISOR_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def _serve(self) -> int:
        self._pause(0.0)  # a signal that came while the store was being made
        if self.stopping:
            return 0
        for slot in range(self.config.workers):
            self._spawn(slot)
        ready = self._wait_ready(30.0)
        if self.stopping:  # told to stop while the workers started
            self._reap_all(self.config.grace + 5.0)
            return 0
        if not ready:
            log.error("workers failed to start")
            self._signal_workers(signal.SIGKILL)
            self._reap_all(5.0)
            return 1
        self.status[0] = 1  # before the ready line: health answers SERVING once it is printed
        log.info(
            "tensorps ready: serving on %s with %d worker%s, store %s",
            self.config.address,
            self.config.workers,
            "" if self.config.workers == 1 else "s",
            self.config.store_path,
        )
        while not self.stopping:
            self._reap_and_restart()
            self._pause(0.05)
        self._reap_all(self.config.grace + 5.0)
        return 0

    def _reap_and_restart(self) -> None:
        for slot, worker in list(self.workers.items()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0 or self.stopping:
                continue
            cause = _describe_exit(status)
            lived = time.monotonic() - worker.started
            failures = worker.failures + 1 if lived < 5.0 else 0
            delay = min(_RESTART_BACKOFF_MAX, 0.1 * 2**failures) if failures else 0.0
            log.warning("worker %d %s; restarting it in %.1f s", worker.pid, cause, delay)
            lifecycle.sweep(self.config.store_path)  # it may have died amid a create or a delete
            self.status[0] = 0
            self._worker_died(slot, replaced=True)
            self._sleep(delay)
            if not self.stopping:
                self._spawn(slot, failures)
                if self._wait_ready(30.0) and not self.stopping:
                    log.info("worker %d replaced worker %d", self.workers[slot].pid, worker.pid)
                    self.status[0] = 1

    def _reap_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.workers:
            for slot, worker in list(self.workers.items()):
                try:
                    pid, status = os.waitpid(worker.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = worker.pid, 0
                if pid:
                    log.info("worker %d %s", worker.pid, _describe_exit(status))
                    self._worker_died(slot, replaced=False)
            if time.monotonic() > deadline and not self.force:
                log.warning("workers still running after the grace period: killing them")
                self.force = True
                self._signal_workers(signal.SIGKILL)
            self._pause(0.02)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_security(config: ServerConfig) -> None:
    """Fail on unusable TLS, token or limit settings; warn loudly about an open port beyond loopback."""
    if config.max_message_bytes < MIN_MESSAGE_BYTES:
        # The client sends tensors up to 4 MiB as one message before it switches to streaming.
        raise StartupError(f"--max-message-bytes must be at least {MIN_MESSAGE_BYTES} (4 MiB)")
    server_credentials(config)
    bulk_tls(config)
    if config.token_file:
        try:
            load_tokens(config.token_file)
        except TokenFileError as exc:
            raise StartupError(str(exc)) from None
    if _is_loopback(config.host):
        return
    missing = [what for what, present in (("TLS", config.tls), ("tokens", config.token_file)) if not present]
    if missing:
        log.warning(
            "SECURITY: listening on %s without %s: anyone who can reach this port can %s every variable",
            config.address,
            " or ".join(missing),
            "read and overwrite" if not config.token_file else "read the traffic to",
        )


def check_process_limits(config: ServerConfig) -> None:
    """Raise the open-file limit to its hard limit, and say when mappings could run out before variables.

    Segments are mapped without descriptors (mapping.py), but gRPC connections and the store still take
    some. Each variable takes up to two mappings (a second buffer for locked writes).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = max_map_count()
    if limit is not None and 2 * config.max_variables + 1000 > limit:
        log.info(
            "up to %d variables may need %d memory mappings per worker, more than vm.max_map_count (%d): "
            "raise it (sysctl vm.max_map_count=%d) to fill the store",
            config.max_variables,
            2 * config.max_variables,
            limit,
            2 * config.max_variables + 1000,
        )


def _token_auth(config: ServerConfig) -> TokenAuth | None:
    """The token interceptor, loaded once here: workers inherit it and its last good tokens."""
    if not config.token_file:
        return None
    try:
        return TokenAuth(config.token_file)
    except TokenFileError as exc:
        raise StartupError(str(exc)) from None


def _serve_metrics(config: ServerConfig) -> Metrics | None:
    """The metrics of every process, served by this one (None with --metrics-port off)."""
    if config.metrics_port is None:
        return None
    metrics = Metrics.enable()
    try:
        port = metrics.serve(config.host, config.metrics_port, config.store_path)
    except OSError as exc:
        metrics.close()
        raise StartupError(f"cannot serve metrics on port {config.metrics_port}: {exc.strerror}") from None
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    log.info("metrics on http://%s:%d/metrics (worker files in %s)", host, port, metrics.directory)
    return metrics


def serve(config: ServerConfig) -> int:
    """Run a server until it is told to stop; returns the process exit code."""
    check_security(config)
    check_process_limits(config)
    port = claim_port(config)
    config = replace(config, port=port)
    # From here on SIGTERM and SIGINT are queued rather than fatal, so that one that comes while the store
    # is being made still stops the server cleanly (and removes the store).
    signals = SignalPipe(_SUPERVISOR_SIGNALS)
    claim_bulk_ports(config)
    try:
        store = Store.open(
            config.store_path,
            stripes=config.stripes,
            max_variables=config.max_variables,
            max_total_bytes=config.max_total_bytes,
        )
    except (StoreError, OSError) as exc:
        raise StartupError(f"cannot open the store {config.store_path}: {exc}") from None
    created = store.created
    log.info("%s store %s", "created" if created else "attached to", config.store_path)
    if not created:
        # An existing store keeps the settings it was made with; say so when the flags ask for others.
        wanted = {
            "stripes": config.stripes,
            "max-variables": config.max_variables,
            "max-total-bytes": config.max_total_bytes or store.limits.max_total_bytes,
        }
        actual = {
            "stripes": store.locks.stripes,
            "max-variables": store.limits.max_variables,
            "max-total-bytes": store.limits.max_total_bytes,
        }
        for key, value in wanted.items():
            if value != actual[key]:
                log.warning("the existing store keeps --%s %s (not %s)", key, actual[key], value)
    try:
        data_dir_held = lifecycle.start(store, config)  # restore a new store from --data-dir
    except lifecycle.PersistStartupError as exc:
        store.close()
        if created:
            Store.remove_files(config.store_path)
        raise StartupError(str(exc)) from None
    # What processes that died amid a change left behind (logged), once the write-ahead log is set up:
    # undoing a write they had logged is logged too.
    lifecycle.sweep_store(store)
    try:
        shard = Shard(config.cluster, config.shard_index)
        shard.warn_if_elsewhere(config.port)
        shard.check_store(Ops(store))
    except ClusterError as exc:
        store.close()
        if data_dir_held is not None:
            os.close(data_dir_held)
        if created:
            Store.remove_files(config.store_path)
        raise StartupError(str(exc)) from None
    store.close()  # the workers map it themselves, after the fork
    metrics = None
    try:
        metrics = _serve_metrics(config)
        if metrics is not None and config.data_dir is not None:
            metrics.snapshot_source = lifecycle.snapshot_status(config.store_path)
        code = Supervisor(config, auth=_token_auth(config), metrics=metrics).run(signals)
        if config.data_dir is not None and not config.no_snapshot_on_exit:
            lifecycle.snapshot_now(config.store_path, why="at exit")
    finally:
        if metrics is not None:
            metrics.close()
        if data_dir_held is not None:
            os.close(data_dir_held)
        if created and not config.keep_store:
            Store.remove_files(config.store_path)
            log.info("removed store %s", config.store_path)
    return code
