"""The same-host client: `Client("shm:///dev/shm/tensorps-50051")` opens a server's store directly.

Same API, same semantics, same locks and errors as over the network — it runs the server's own ops on the
shared memory — without a network hop or a copy through gRPC. The server and local clients see each
other's writes at once. Access is governed by the store directory's permissions (0700: the server's user).

This module is the one place where the client uses the server's store and ops; Client imports it only for
shm:// targets, so that the remote client stays free of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from tensorps.client.batch import Outcome, Outcomes
from tensorps.client.checks import check_options
from tensorps.client.client import Client
from tensorps.client.codec import DType, Shape
from tensorps.client.errors import InternalError, NotFoundError, from_status
from tensorps.client.info_cache import InfoCache
from tensorps.client.infos import Array, ServerInfo, VariableInfo, WriteFlags
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import ROW_KINDS
from tensorps.client.snapshot import SnapshotInfo
from tensorps.client.transport import CallDeadline
from tensorps.server.batch import BatchOp, run_batch
from tensorps.server.ops import Info, Ops
from tensorps.server.optimizers import Flags
from tensorps.server.persist.snapshot import SnapshotError
from tensorps.server.persist_service import status_of_snapshot, take_snapshot
from tensorps.server.row_ops import RowArgs
from tensorps.server.service import status_of
from tensorps.server.store import Store, StoreError
from tensorps.v1 import tensorps_pb2 as pb

SCHEME = "shm://"


def _variable_info(info: Info) -> VariableInfo:
    return VariableInfo(info.name, info.dtype.numpy, info.shape, info.initialized, info.version)


def _read_only(array: Array) -> Array:
    view = array.view()
    view.flags.writeable = False
    return view


def _row_args(op: QueuedOp) -> RowArgs | None:
    if op.kind not in ROW_KINDS:
        return None
    flags = Flags(op.use_nesterov, op.update_slots, op.multiply_linear_by_lr)
    return RowArgs(op.slots, op.inputs, op.batch_dims, flags)


def _copy_out(info: Info, view: Array) -> Array:
    return _read_only(view.copy())


class _ClientErrors:
    """Re-raises the server's exceptions as the client's (a class: cheaper than @contextmanager)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        status = status_of(exc) if isinstance(exc, Exception) else None
        if status is not None:
            raise from_status(*status) from None


_CLIENT_ERRORS = _ClientErrors()


class LocalClient(Client):
    """A Client on a store on this host (see the module docstring). Made by Client("shm://PATH")."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float | None = None,
        channels: int = 2,
        wait_for_ready: bool = False,
    ) -> None:
        # The options do not apply on the same host, but a wrong one is the same UsageError as over gRPC.
        check_options(
            token=token,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            timeout=timeout,
            channels=channels,
            wait_for_ready=wait_for_ready,
        )
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = bool(wait_for_ready)
        self._closed = False
        self._deadline = CallDeadline(self)
        path = target.removeprefix(SCHEME)
        if not os.path.isfile(os.path.join(path, "meta")):
            raise NotFoundError(f"no tensorps store at {path}")
        try:
            store = Store.attach(path, wait=0.0)
        except (StoreError, OSError) as exc:
            raise InternalError(f"cannot open the store {path}: {exc}") from None
        self._ops = Ops(store)
        self._cache = InfoCache()
        self._lock = threading.Lock()
        self._executor = None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_background()
            self._ops.close()  # this process's logged writes on disk
            self._ops.store.close()

    def _snapshot(self) -> SnapshotInfo:
        try:
            with _CLIENT_ERRORS:
                info = take_snapshot(self._ops)
        except SnapshotError as exc:
            raise from_status(status_of_snapshot(exc), str(exc)) from None
        return SnapshotInfo(**vars(info))

    def _errors(self) -> _ClientErrors:
        """The server's errors as the remote client raises them (names were checked at the API boundary)."""
        return _CLIENT_ERRORS

    # ---- the primitives the remote client sends over gRPC ----------------------------------------

    def _create(self, name: str, dtype: DType, shape: Shape | None, array: Array | None) -> VariableInfo:
        with self._errors():
            return _variable_info(self._ops.create(name, dtype, shape, array))

    def _delete(self, name: str) -> None:
        with self._errors():
            self._ops.delete(name)

    def _get_info(self, name: str) -> VariableInfo:
        with self._errors():
            return _variable_info(self._ops.info(name))

    def _list(self, prefix: str) -> list[VariableInfo]:
        with self._errors():
            return [_variable_info(info) for info in self._ops.list(prefix)]

    def _server_info(self) -> ServerInfo:
        store = self._ops.store
        return ServerInfo(
            pid=os.getpid(),
            workers=0,
            store=store.path,
            variables=store.variable_count,
            used_bytes=store.used_bytes,
            max_total_bytes=store.limits.max_total_bytes,
            version=metadata.version("tensorps"),
            **self._persistence_info(),
        )

    def _persistence_info(self) -> dict[str, Any]:
        persistence = self._ops.persistence
        if persistence is None:
            return {}
        last = persistence.last_snapshot
        return {
            "data_dir": persistence.settings.data_dir,
            "wal": persistence.settings.wal,
            "last_snapshot_time": last.time,
            "last_snapshot_seconds": last.seconds,
            "last_snapshot_pause_ms": last.pause_ms,
        }

    def _read(self, name: str) -> Array:
        self._ops.store.release_unused()

        def copy(info: Info, view: Array) -> Array:
            self._remember(_variable_info(info))
            return _read_only(view.copy())

        with self._errors():
            return self._ops.read(name, copy)

    def _send_write(self, name: str, array: Array, op: int, flags: WriteFlags) -> Any:
        read_value = flags.read_value
        self._ops.store.release_unused()
        with self._errors():
            if op == pb.WRITE_OP_ASSIGN:
                info, value = self._ops.assign(
                    name,
                    array,
                    validate_shape=flags.validate_shape is not False,
                    use_locking=flags.use_locking,
                    read_value=read_value,
                )
            else:
                info, value = self._ops.assign_add(
                    name,
                    array,
                    use_locking=flags.use_locking,
                    read_value=read_value,
                    subtract=op == pb.WRITE_OP_ASSIGN_SUB,
                )
        result = self._remember(_variable_info(info))
        if not read_value:
            return result
        assert value is not None
        # A locked assign hands back the value it wrote, which here is the caller's own array: copy it so
        # that the result, like the remote client's, does not change when the caller's array does.
        return _read_only(value.copy() if value is array else value)

    def _run_batch(self, ops: Sequence[QueuedOp], *, atomic: bool) -> Outcomes:
        self._ops.store.release_unused()
        batch = [
            BatchOp(
                op.kind,
                op.name,
                op.array,
                op.dtype,
                op.shape,
                validate_shape=op.validate_shape is not False,
                use_locking=op.use_locking if op.use_locking is not None else op.kind == pb.BATCH_OP_ASSIGN,
                read_value=op.read_value,
                rows=_row_args(op),
            )
            for op in ops
        ]
        with self._errors():
            results = run_batch(self._ops, batch, atomic=atomic, consume=_copy_out)
        outcomes: Outcomes = [[] for _ in ops]
        for result in results:
            if result.error is not None:
                status = status_of(result.error)
                assert status is not None
                outcomes[result.op].append(Outcome(error=from_status(*status)))
            else:
                info = None if result.info is None else self._remember(_variable_info(result.info))
                sent = ops[result.op].array
                value = _read_only(sent.copy()) if result.echo and sent is not None else result.value
                outcomes[result.op].append(Outcome(info, value))
        for op in ops:
            if op.kind == pb.BATCH_OP_DELETE:
                self._forget(op.name)
        return outcomes
