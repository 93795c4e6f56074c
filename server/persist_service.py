"""The gRPC adapter of persistence: the Snapshot RPC (a handler of its own beside service.py's)."""

from __future__ import annotations

import logging

import grpc

from tensorps.server.ops import OpError, Ops
from tensorps.server.persist.snapshot import SnapshotError, SnapshotInfo
from tensorps.server.service import SERVICE_NAME, lock_wait
from tensorps.v1 import tensorps_pb2 as pb

log = logging.getLogger("tensorps.server")


def snapshot_to_proto(info: SnapshotInfo) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(
        path=info.path,
        generation=info.generation,
        variables=info.variables,
        bytes=info.bytes,
        seconds=info.seconds,
        pause_ms=info.pause_ms,
        time=info.time,
    )


def take_snapshot(ops: Ops) -> SnapshotInfo:
    """A snapshot now, as the RPC and the shm:// client take it; raises SnapshotError, whose `code` names
    the status (FAILED_PRECONDITION without a data directory, RESOURCE_EXHAUSTED on a full disk)."""
    if ops.persistence is None:
        raise SnapshotError("the server has no --data-dir: it keeps no snapshots", unset=True)
    return ops.persistence.snapshot(ops)


def status_of_snapshot(exc: SnapshotError) -> grpc.StatusCode:
    if exc.full:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if exc.unset:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class PersistenceService:
    def __init__(self, ops: Ops) -> None:
        self.ops = ops

    def snapshot(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        pb.SnapshotRequest.FromString(raw)
        try:
            with self.ops.deadline(lock_wait(context)):  # the cut waits for every stripe
                info = take_snapshot(self.ops)
        except SnapshotError as exc:
            log.error("%s", exc)
            context.abort(status_of_snapshot(exc), str(exc))
        except OpError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return snapshot_to_proto(info).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        handlers = {"Snapshot": grpc.unary_unary_rpc_method_handler(self.snapshot)}
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
