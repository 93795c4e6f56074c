"""Process model: a supervisor that owns the store and N forked worker processes serving one port.

Python serves gRPC on one core (the GIL), so several processes serve the same port with SO_REUSEPORT
over one shared-memory store (worker.py, supervisor.py). The kernel balances connections, not calls, across
them. This module starts it all: checks the settings, creates or attaches the store, restores it from
--data-dir, then runs the supervisor until it stops.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
from dataclasses import replace

from tensorps.server.auth import TokenAuth, TokenFileError, load_tokens
from tensorps.server.cluster import ClusterError, Shard
from tensorps.server.config import ServerConfig
from tensorps.server.mapping import max_map_count
from tensorps.server.metrics import Metrics
from tensorps.server.ops import Ops
from tensorps.server.persist import lifecycle
from tensorps.server.signals import SignalPipe
from tensorps.server.store import Store, StoreError
from tensorps.server.supervisor import SUPERVISOR_SIGNALS, Supervisor, claim_bulk_ports, claim_port
from tensorps.server.worker import MIN_MESSAGE_BYTES, StartupError, bulk_tls, server_credentials

__all__ = ["StartupError", "serve"]

log = logging.getLogger("tensorps.server")


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
    port, held_port = claim_port(config)
    config = replace(config, port=port)
    # From here on SIGTERM and SIGINT are queued rather than fatal, so that one that comes while the store
    # is being made still stops the server cleanly (and removes the store).
    signals = SignalPipe(SUPERVISOR_SIGNALS)
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
        held_port.close()
        if metrics is not None:
            metrics.close()
        if data_dir_held is not None:
            os.close(data_dir_held)
        if created and not config.keep_store:
            Store.remove_files(config.store_path)
            log.info("removed store %s", config.store_path)
    return code
