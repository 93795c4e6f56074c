"""A worker process: one gRPC server (with the bulk side channel, health and reflection) over the shared
store, serving the supervisor's port with SO_REUSEPORT until SIGTERM.

Workers are forked by the supervisor before any gRPC server or channel exists in the process (gRPC's core is
not fork-safe once started); each one maps the store itself.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tensorps.server import bulk, logs, reflection
from tensorps.server.auth import TokenAuth
from tensorps.server.calls import CallObserver
from tensorps.server.cluster import ClusterGate, Shard, store_holds
from tensorps.server.config import ServerConfig
from tensorps.server.metrics import Metrics
from tensorps.server.ops import Ops
from tensorps.server.persist import lifecycle
from tensorps.server.persist_service import PersistenceService
from tensorps.server.service import SERVICE_NAME, ParameterServer
from tensorps.server.signals import SignalPipe
from tensorps.server.store import Store

log = logging.getLogger("tensorps.server")

# Room for the protobuf framing around a tensor of max_message_bytes.
_FRAMING_SLACK = 64 * 1024
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
    worker_index: int = 0,
) -> tuple[grpc.Server, health.HealthServicer]:
    # The observer first: it sees every call's final status, the token check's refusals included; the
    # cluster gate last, so that a call is authenticated before it is told which shard owns its variable.
    interceptors: list[grpc.ServerInterceptor] = [CallObserver(metrics)]  # type: ignore[type-arg]
    if auth is not None:
        interceptors.append(auth)
    interceptors.append(ClusterGate(Shard(config.cluster, config.shard_index), store_holds(ops)))
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
        worker_index=worker_index,
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
        worker_index=index,
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
