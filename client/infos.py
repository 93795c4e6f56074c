"""What the client's calls return: a variable's and a server's info, a write's flags, from their protos."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import Shape
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class VariableInfo:
    """A variable's metadata; `version` grows with every successful write."""

    name: str
    dtype: np.dtype[Any]
    shape: Shape | None
    initialized: bool
    version: int


class WriteFlags(NamedTuple):
    """A write's flags, always sent explicitly; validate_shape is None for AssignAdd/AssignSub."""

    use_locking: bool
    read_value: bool
    validate_shape: bool | None = None


@dataclass(frozen=True)
class ServerInfo:
    """Which worker process answered, and the state of the store it serves."""

    pid: int
    workers: int
    store: str
    variables: int
    used_bytes: int
    max_total_bytes: int
    version: str
    # The cluster the server is a shard of (HOST:PORT in shard order; empty: a lone server), its index.
    cluster: tuple[str, ...] = ()
    shard_index: int = 0
    # Persistence: the data directory ("" without one), the --wal mode, and the newest snapshot this server
    # took (unix time of its cut, 0: none yet; seconds it took; how long writes were paused).
    data_dir: str = ""
    wal: str = ""
    last_snapshot_time: float = 0.0
    last_snapshot_seconds: float = 0.0
    last_snapshot_pause_ms: float = 0.0
    # The answering worker: its index and start time (Unix), the bytes in transit through its memory and
    # their limit, its bulk port (0: none).
    worker_index: int = 0
    worker_started: float = 0.0
    staging_bytes: int = 0
    staging_limit_bytes: int = 0
    bulk_port: int = 0


def info_from_proto(proto: pb.VariableInfo) -> VariableInfo:
    return VariableInfo(
        name=proto.name,
        dtype=codec.dtype_from_code(proto.dtype).numpy,
        shape=codec.shape_from_proto(proto.shape),
        initialized=proto.initialized,
        version=proto.version,
    )


def server_info_from_proto(p: pb.ServerInfo) -> ServerInfo:
    return ServerInfo(
        p.pid,
        p.workers,
        p.store,
        p.variables,
        p.used_bytes,
        p.max_total_bytes,
        p.version,
        tuple(p.cluster),
        p.shard_index,
        p.data_dir,
        p.wal,
        p.last_snapshot_time,
        p.last_snapshot_seconds,
        p.last_snapshot_pause_ms,
        p.worker_index,
        p.worker_started,
        p.staging_bytes,
        p.staging_limit_bytes,
        p.bulk_port,
    )


def own(array: Array) -> Array:
    """A write's result that is the value it sent: a read-only copy, like a received value (one that does
    not change with the caller's array)."""
    copy = array.copy()
    copy.flags.writeable = False
    return copy
