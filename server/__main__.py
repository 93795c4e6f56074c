"""tensorps-server: serve a shared-memory parameter store over gRPC."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from tensorps.server import cluster, logs
from tensorps.server.app import StartupError, serve
from tensorps.server.config import BULK_OFF, ServerConfig
from tensorps.server.logs import FORMATS

_DEFAULTS = ServerConfig()


def size(text: str) -> int:
    """A byte count: 1048576, 64M, 16G, 1.5GiB (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if cleaned and cleaned[-1] in units:
            return int(float(cleaned[:-1]) * units[cleaned[-1]])
        return int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None


def bulk_port(text: str) -> int:
    """--bulk-port: a port number, 0 (ephemeral), or off / -1."""
    cleaned = text.strip().lower()
    if cleaned in ("off", "-1", "no", "none", "false"):
        return BULK_OFF
    try:
        port = int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port, 0 or off: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port, 0 or off: {text!r}")
    return port


def metrics_port(text: str) -> int | None:
    """--metrics-port: a port number, 0 (a free one), or off."""
    cleaned = text.strip().lower()
    if cleaned in ("", "off", "no", "none", "false"):
        return None
    try:
        port = int(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port, 0 or off: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port, 0 or off: {text!r}")
    return port


def cluster_members(text: str) -> tuple[str, ...]:
    """--cluster: HOST:PORT,HOST:PORT,... in shard order."""
    try:
        return cluster.parse_members(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _boolean(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tensorps-server",
        description="Serve named tensors with TensorFlow's Assign semantics over gRPC, kept in shared memory "
        "so that several worker processes serve one port. SIGTERM or SIGINT drains in-flight calls (a "
        "second one stops at once), SIGHUP reloads the token file; workers stop if the supervisor dies. "
        "Every flag can also be set through the environment variable shown in brackets.",
    )

    def flag(name: str, kind: Callable[[str], Any], default: Any, text: str, **extra: Any) -> None:
        env = "TENSORPS_" + name.upper().replace("-", "_")
        shown = "" if default is None else f" (default: {default})"
        if env in os.environ:
            try:
                default = kind(os.environ[env]) if kind is not bool else _boolean(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError):
                p.error(f"{env}={os.environ[env]!r} is not a valid --{name}")
        if kind is bool:
            p.add_argument(f"--{name}", action="store_true", default=default, help=f"{text} [{env}]")
        else:
            p.add_argument(f"--{name}", type=kind, default=default, help=f"{text}{shown} [{env}]", **extra)

    d = _DEFAULTS
    flag("host", str, d.host, "address to listen on; 0.0.0.0 or :: for every interface")
    flag("port", int, d.port, "port; 0 picks a free one (the ready line names it)")
    flag("workers", int, os.cpu_count() or 1, "server processes sharing the port and the store")
    flag(
        "store",
        str,
        None,
        "store directory on a tmpfs, shared by every server naming it (default: /dev/shm/tensorps-PORT)",
    )
    flag(
        "keep-store",
        bool,
        False,
        "leave the store in place at shutdown (by default the server that created it removes it)",
    )
    flag(
        "stripes",
        int,
        d.stripes,
        "lock stripes (a variable's stripe is a stable hash of its name); each reserves 384 KiB of the "
        "request-id table on the tmpfs when the store is created",
    )
    flag(
        "max-variables",
        int,
        d.max_variables,
        "most variables the store holds; their table is reserved on the tmpfs when the store is created "
        "(about 1.75 KiB per variable: 113 MiB for 65536)",
    )
    flag(
        "max-total-bytes",
        size,
        None,
        "byte budget of the variables (default: 90%% of the tmpfs's free space left after the tables)",
    )
    flag("max-variable-bytes", size, None, "largest variable in bytes (default: only the total applies)")
    flag("max-message-bytes", size, d.max_message_bytes, "largest unary message; the client streams larger")
    flag("threads", int, d.threads, "threads per worker")
    flag(
        "max-concurrent-rpcs",
        int,
        d.max_concurrent_rpcs,
        "calls in flight per worker before RESOURCE_EXHAUSTED",
    )
    flag(
        "stream-idle-timeout",
        float,
        d.stream_idle_timeout,
        "seconds a streamed write may stall, or a streamed reply wait for its client to read, before the "
        "call is cancelled",
    )
    flag(
        "max-staging-bytes",
        size,
        None,
        "per worker: bytes of tensors in transit through its memory (streamed writes, batches, streamed "
        "replies); beyond it RESOURCE_EXHAUSTED (default: 25%% of --max-total-bytes, at least 1G or all "
        "of it)",
    )
    flag("grace", float, d.grace, "seconds in-flight calls get to finish at shutdown (a second signal: none)")
    flag("tls-cert", str, None, "TLS certificate chain (PEM); with --tls-key, serve TLS only")
    flag("tls-key", str, None, "TLS private key (PEM)")
    flag(
        "tls-client-ca",
        str,
        None,
        "CA bundle (PEM) for mutual TLS: clients must present a certificate it signed",
    )
    flag(
        "token-file",
        str,
        None,
        "bearer tokens, one per line, 'TOKEN' or 'TOKEN read-only'; reloaded on SIGHUP (a missing or "
        "broken file keeps the previous tokens); every call but health checks and reflection needs one",
    )
    flag(
        "bulk-port",
        bulk_port,
        d.bulk_port,
        "TCP port of the bulk side channel that moves large batches' bytes outside gRPC (same host and "
        "TLS as the gRPC port); 0: an ephemeral port per worker; P: worker i listens on P+i; off: none",
    )
    flag("log-level", str.upper, d.log_level, "DEBUG, INFO, WARNING or ERROR", choices=_LEVELS)
    flag(
        "log-format",
        str.lower,
        d.log_format,
        "text, or json: one JSON object per line (time, level, logger, message, pid, worker, and fields "
        "such as peer, method, code, reason) for log collectors",
        choices=FORMATS,
    )
    flag(
        "metrics-port",
        metrics_port,
        None,
        "serve Prometheus metrics of every worker at http://HOST:PORT/metrics from the supervisor "
        "(0: a free port, logged; off by default)",
    )
    flag(
        "no-reflection",
        bool,
        False,
        "do not serve gRPC server reflection (grpc.reflection.v1alpha and v1; by default on and, like "
        "health, open without a token, so that grpcurl and buf curl work without the .proto)",
    )
    flag(
        "cluster",
        cluster_members,
        None,
        "serve as one shard of a cluster: every member's HOST:PORT, comma-separated, in shard order, the "
        "same on every member; calls on variables another shard owns get FAILED_PRECONDITION naming it",
    )
    flag(
        "shard-index",
        int,
        None,
        "this server's index in --cluster (default: the ordinal I of a StatefulSet hostname NAME-I)",
    )
    flag(
        "data-dir",
        str,
        None,
        "directory for snapshots and the write-ahead log (a volume); a new store restores from it. "
        "Without it nothing is persisted",
    )
    flag(
        "snapshot-every",
        float,
        d.snapshot_every,
        "seconds between point-in-time snapshots to --data-dir; 0: only on demand and at exit",
    )
    flag("snapshot-keep", int, d.snapshot_keep, "newest snapshots kept (with the logs after the oldest)")
    flag("no-snapshot-on-exit", bool, False, "skip the snapshot a clean shutdown (SIGTERM/SIGINT) takes")
    flag("restore", str, None, "start from this snapshot directory (no log replay) instead of the newest")
    flag("no-restore", bool, False, "start empty even if --data-dir holds snapshots")
    flag(
        "wal",
        str.lower,
        d.wal,
        "write-ahead log: off (lose writes since the last snapshot), everysec (lose about the last "
        "second), always (acknowledge a write once it is on disk; concurrent writes share an fsync)",
        choices=("off", "everysec", "always"),
    )
    return p


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Settings that must be at least this (exclusive minimum for the float ones marked so).
_MINIMUM = {"port": 0, "workers": 1, "stripes": 1, "max_variables": 1, "threads": 1, "max_concurrent_rpcs": 1}
_POSITIVE = ("stream_idle_timeout", "max_total_bytes", "max_variable_bytes", "max_staging_bytes")


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    p = parser()
    args = vars(p.parse_args(argv))
    known = {f.name for f in fields(ServerConfig)}
    values = {key: value for key, value in args.items() if key in known}
    values["reflection"] = not args["no_reflection"]
    for key, least in _MINIMUM.items():
        if values[key] < least:
            p.error(f"--{key.replace('_', '-')} must be at least {least}")
    for key in _POSITIVE:
        if values[key] is not None and values[key] <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if values["grace"] < 0:
        p.error("--grace must not be negative")
    if values["port"] > 65535:
        p.error("--port must be at most 65535")
    if values["bulk_port"] > 0 and values["bulk_port"] + values["workers"] - 1 > 65535:
        p.error(f"--bulk-port {values['bulk_port']} with {values['workers']} workers runs past port 65535")
    values["cluster"] = values["cluster"] or ()
    try:
        values["shard_index"] = cluster.resolve_shard_index(values["cluster"], values["shard_index"])
    except cluster.ClusterError as exc:
        p.error(str(exc))
    if values["data_dir"] is None:
        for key in ("restore",):
            if values[key] is not None:
                p.error(f"--{key} needs --data-dir")
        if values["wal"] != "off":
            p.error("--wal needs --data-dir")
    if values["restore"] is not None and values["no_restore"]:
        p.error("--restore and --no-restore exclude each other")
    if values["snapshot_every"] < 0:
        p.error("--snapshot-every must not be negative")
    if values["snapshot_keep"] < 1:
        p.error("--snapshot-keep must be at least 1")
    return ServerConfig(**values)


def main(argv: Sequence[str] | None = None) -> None:
    config = config_from_args(argv)
    logs.configure(config.log_level, config.log_format)
    try:
        code = serve(config)
    except StartupError as exc:
        print(f"tensorps-server: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
