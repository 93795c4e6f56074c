"""Client.snapshot(): a point-in-time snapshot of every variable, on the server's disk (a mixin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tensorps.v1 import tensorps_pb2 as pb


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot the server wrote: where, how much, and what it cost."""

    path: str  # its directory on the server: <data-dir>/snap-<generation>
    generation: int
    variables: int
    bytes: int  # bytes of variable values
    seconds: float  # from the cut to the durable rename
    pause_ms: float  # how long writes were held off
    time: float  # unix time of the cut: the instant whose state the snapshot holds


def snapshot_from_proto(p: pb.SnapshotInfo) -> SnapshotInfo:
    return SnapshotInfo(p.path, p.generation, p.variables, p.bytes, p.seconds, p.pause_ms, p.time)


class SnapshotCalls:
    """Client's snapshot call (a mixin: Client provides _check_open and _unary; LocalClient its own
    _snapshot)."""

    def snapshot(self: Any) -> SnapshotInfo:
        """Write a point-in-time snapshot of every variable to the server's --data-dir now.

        FailedPreconditionError if the server has no data directory, ResourceExhaustedError if its disk is
        full (earlier snapshots stay intact), PermissionDeniedError for a read-only token.
        """
        self._check_open()
        info: SnapshotInfo = self._snapshot()
        return info

    def _snapshot(self: Any) -> SnapshotInfo:
        raw = self._unary("Snapshot", b"")  # not retried: a retry would take a second snapshot
        return snapshot_from_proto(pb.SnapshotInfo.FromString(raw))
