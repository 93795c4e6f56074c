"""Every server setting in one frozen dataclass; the CLI fills it from flags and TENSORPS_* variables."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
BULK_OFF = -1


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 1
    # Directory of the shared-memory store; None means /dev/shm/tensorps-<port>.
    store: str | None = None
    keep_store: bool = False
    stripes: int = 64
    max_variables: int = 65536
    # None: 90 % of the store filesystem's free space when the store is created.
    max_total_bytes: int | None = None
    # None: only the total applies.
    max_variable_bytes: int | None = None
    # Unary messages up to this size; the client streams anything larger in chunks.
    max_message_bytes: int = 64 * MiB
    threads: int = 16
    max_concurrent_rpcs: int = 256
    grace: float = 10.0
    # A streamed write that sends nothing, or a streamed reply that its client stops reading, for this
    # many seconds is cancelled (and its staging bytes freed).
    stream_idle_timeout: float = 60.0
    # Per worker: bytes of tensors in transit through its heap (streamed writes, batches, streamed
    # replies); None: a quarter of max_total_bytes, at least 1 GiB or all of it (staging.py).
    max_staging_bytes: int | None = None
    log_level: str = "INFO"
    # TLS: certificate chain and key (PEM); with tls_client_ca, clients must present a certificate it signed.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Bearer tokens, one per line ("TOKEN" or "TOKEN read-only"); reloaded on SIGHUP.
    token_file: str | None = None
    # The bulk side channel's TCP port (bulk.py): 0 = an ephemeral port per worker, P > 0 = P + the
    # worker's index (workers 0..N-1 take P..P+N-1), BULK_OFF = none.
    bulk_port: int = 0
    # Log lines as text or as one JSON object per line (logs.py).
    log_format: str = "text"
    # The supervisor's Prometheus endpoint (metrics.py): None = off, 0 = a free port (logged).
    metrics_port: int | None = None
    # gRPC server reflection (grpcurl, buf curl), open without a token like health; off: --no-reflection.
    reflection: bool = True
    # The cluster this server is a shard of: every member's HOST:PORT in shard order (empty: a lone
    # server), and this server's index in it (cluster.py).
    cluster: tuple[str, ...] = ()
    shard_index: int = 0
    # Persistence (persist/): snapshots and the write-ahead log go to data_dir; None persists nothing.
    data_dir: str | None = None
    snapshot_every: float = 300.0  # seconds between periodic snapshots; 0: never
    snapshot_keep: int = 3
    no_snapshot_on_exit: bool = False
    restore: str | None = None  # a snapshot directory to start from instead of the newest
    no_restore: bool = False
    wal: str = "off"  # off, everysec or always

    @property
    def bulk(self) -> bool:
        return self.bulk_port != BULK_OFF

    def worker_bulk_port(self, index: int) -> int:
        """The bulk port worker `index` listens on (0: an ephemeral one)."""
        return self.bulk_port + index if self.bulk_port > 0 else 0

    @property
    def store_path(self) -> str:
        return self.store or f"/dev/shm/tensorps-{self.port}"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
