"""The thin client: numpy arrays in, numpy arrays out, typed exceptions, any tensor size.

The public API of one server; the rest lives beside it: infos.py (what calls return), checks.py (argument
checks), info_cache.py (dtypes and sizes seen), transport.py (gRPC calls, deadlines, retries) and
batch_transport.py (sending batches: unary, streamed, bulk).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from tensorps.client import arrays, bulk, codec, wire
from tensorps.client.batch import BatchCalls, Outcomes
from tensorps.client.batch_transport import BatchTransport
from tensorps.client.checks import check_flag, check_name, check_options
from tensorps.client.codec import CodecError, DType, Shape
from tensorps.client.errors import InvalidArgumentError, ResourceExhaustedError, TensorPSError, UsageError
from tensorps.client.info_cache import InfoCache
from tensorps.client.infos import (
    Array,
    ServerInfo,
    VariableInfo,
    WriteFlags,
    info_from_proto,
    own,
    server_info_from_proto,
)
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import GATHER, RowCalls, returns_value
from tensorps.client.snapshot import SnapshotCalls
from tensorps.client.transport import STREAM_THRESHOLD, CallDeadline, Transport
from tensorps.v1 import tensorps_pb2 as pb

__all__ = ["Array", "Client", "ServerInfo", "VariableInfo", "WriteFlags"]

_WRITE_METHODS: dict[int, str] = {
    pb.WRITE_OP_ASSIGN: "Assign",
    pb.WRITE_OP_ASSIGN_ADD: "AssignAdd",
    pb.WRITE_OP_ASSIGN_SUB: "AssignSub",
}


class Client(BatchCalls, RowCalls, SnapshotCalls):
    """A connection to a tensorps server; use it as a context manager, from any number of threads.

    `target` is "host:port", or "shm://STORE" for the store directory of a server on this host (no network,
    same semantics; the connection options are checked but do not apply), or a cluster of servers:
    "host:port,host:port,...", a list of them, or "cluster://host:port" (one member, which names the
    others): a ClusterClient (cluster.py) with the same API that sends each call to its variable's server.

    `timeout` (seconds) is one deadline per call: retries and follow-up RPCs of one call share it. The
    default, None, waits for ever, also on a server that hangs: give long-running jobs a timeout.
    `wait_for_ready=True` makes a call wait (up to its timeout) for an unreachable server to come up instead
    of failing at once with UnavailableError: with a timeout, a worker can start before its server. gRPC
    reconnects to a lost server within about a second. Calls are spread over `channels` connections,
    because servers with several worker processes balance per connection.

    `token` is sent as a bearer token; `root_certificates` (PEM bytes) turns on TLS; `certificate_chain`
    and `private_key` (PEM bytes, both or neither) present a client certificate for mutual TLS. Options of
    the wrong type, a chain without its key or bytes that are not PEM raise UsageError at once.
    """

    def __new__(cls, target: str | Sequence[str], **options: Any) -> Client:
        # Several servers ("a:1,b:2", a list, or "cluster://a:1"): the router over a cluster (cluster.py).
        clustered = isinstance(target, list | tuple) or (
            isinstance(target, str) and ("," in target or target.startswith("cluster://"))
        )
        if cls is Client and clustered:
            from tensorps.client.cluster import ClusterClient  # noqa: PLC0415 (it imports this module)

            return object.__new__(ClusterClient)
        if not isinstance(target, str):
            raise UsageError(f"target must be a str such as 'localhost:50051', not {target!r:.60}")
        # "shm://PATH" opens a store on this host directly: same API, no network (local.py).
        if cls is Client and target.startswith("shm://"):
            from tensorps.client.local import LocalClient  # noqa: PLC0415 (needs the server's store)

            return object.__new__(LocalClient)
        return object.__new__(cls)

    @classmethod
    def local(cls, store: str) -> Client:
        """A client on the store directory `store` of a server on this host (see Client("shm://...")."""
        if not isinstance(store, str):
            raise UsageError(f"store must be a str path, not {store!r:.60}")
        return cls("shm://" + store)

    def __init__(
        self,
        target: str | Sequence[str],  # a Sequence: a cluster (__new__ makes a ClusterClient)
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float | None = None,
        channels: int = 2,
        wait_for_ready: bool = False,
    ) -> None:
        check_options(
            token=token,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            timeout=timeout,
            channels=channels,
            wait_for_ready=wait_for_ready,
        )
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self.wait_for_ready = bool(wait_for_ready)
        self._closed = False
        self._deadline = CallDeadline(self)
        credentials = None
        if root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        self._transport = Transport(
            self.target,
            self,
            self._deadline,
            credentials=credentials,
            channels=channels,
            metadata=(("authorization", f"Bearer {token}"),) if token else None,
        )
        self._bulk = bulk.BulkChannel(
            self.target,
            tls=credentials is not None,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        self._cache = InfoCache()
        self._batches = BatchTransport(self._transport, self._bulk, self._cache)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        self._close_background()
        self._closed = True
        self._transport.close()

    def _background(self) -> ThreadPoolExecutor:
        """Threads that run submitted batches (futures), made on first use."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tensorps-client")
            return self._executor

    def _close_background(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _checked_flag(value: object, what: str) -> bool:
        """The API boundary of a bool flag (pipelines check theirs here too)."""
        return check_flag(value, what)

    def _checked(self, name: object) -> str:
        """The API boundary of every call that names a variable, for both transports."""
        self._check_open()
        return check_name(name)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"the client of {self.target} is closed")

    # ---- the transport (transport.py) and the info cache (info_cache.py) ----------------------------

    def _unary(self, method: str, request: bytes, *, idempotent: bool = False, write: bool = False) -> bytes:
        return self._transport.unary(method, request, idempotent=idempotent, write=write)

    def _remember(self, info: VariableInfo) -> VariableInfo:
        return self._cache.remember(info)

    def _forget(self, name: str) -> None:
        self._cache.forget(name)

    def _note_rows(self, op: QueuedOp, rows: Array | None) -> None:
        self._cache.note_rows(op, rows)

    # ---- values --------------------------------------------------------------------------------

    def _as_array(self, name: str, value: Any, dtype: DType | None = None) -> Array:
        """Array data (numpy, `__dlpack__`, `__array__`: arrays.py) is sent as it is (never cast); Python
        values take the variable's dtype losslessly (`dtype`, else the cached or fetched one). The name has
        been checked. Every method that takes a value converts it here."""
        try:
            array = arrays.as_array(value)
            if array is not None:
                codec.dtype_of(array.dtype)
                return codec.as_wire_array(array)
            if dtype is None:
                dtype = self._cache.dtypes.get(name) or codec.dtype_of(
                    self._remember(self._get_info(name)).dtype
                )
            return codec.from_python(value, dtype, name=name)
        except CodecError as exc:
            raise InvalidArgumentError(str(exc)) from None

    # ---- catalog -------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        dtype: Any = None,
        shape: Sequence[int] | None = None,
        value: Any = None,
        colocate_with: str | None = None,
    ) -> VariableInfo:
        """Create a variable: declared (dtype, optional shape) and uninitialized, or with an initial value.
        colocate_with names the variable it must live beside on a cluster (an optimizer slot's variable);
        on one server every variable lives together, and only the name is checked."""
        if colocate_with is not None:
            self._checked(colocate_with)
        declared, dims, array = self._create_args(name, dtype, shape, value)
        return self._remember(self._create(name, declared, dims, array))

    def _create_args(
        self, name: str, dtype: Any, shape: Any, value: Any
    ) -> tuple[DType, Shape | None, Array | None]:
        """create()'s arguments checked: the dtype, the declared shape and the initial value as an array."""
        name = self._checked(name)
        try:
            declared = arrays.dtype_of(dtype) if dtype is not None else None
            dims = codec.validate_shape(shape) if shape is not None else None
        except CodecError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if value is None and declared is None:
            raise InvalidArgumentError(f"variable '{name}' needs a dtype or a value")
        array = None
        if value is not None:
            try:
                data = arrays.as_array(value)
            except CodecError as exc:
                raise InvalidArgumentError(str(exc)) from None
            if data is None and declared is None:
                raise InvalidArgumentError(f"variable '{name}': give a dtype for a Python initial value")
            array = self._as_array(name, value if data is None else data, declared)
        dtype = declared if array is None else codec.dtype_of(array.dtype)
        if declared is not None and dtype != declared:
            raise InvalidArgumentError(
                f"variable '{name}' is declared {declared.name} but its initial value is {dtype.name}; "
                "nothing is cast"
            )
        assert dtype is not None
        return dtype, dims, array

    def _create(self, name: str, dtype: DType, shape: Shape | None, array: Array | None) -> VariableInfo:
        request = pb.CreateVariableRequest(name=name, dtype=dtype.code)  # type: ignore[arg-type]
        if shape is not None:
            codec.shape_to_proto(shape, request.shape)
        if array is None:
            response = self._unary("CreateVariable", request.SerializeToString(), write=True)
            return info_from_proto(pb.CreateVariableResponse.FromString(response).info)
        if array.nbytes > STREAM_THRESHOLD:
            # Streamed, and still atomic: the server creates the variable once the whole value is in.
            if shape is not None and shape != array.shape:
                raise InvalidArgumentError(
                    f"variable '{name}' is declared with shape {codec.format_shape(shape)} but its initial "
                    f"value has shape {codec.format_shape(array.shape)}"
                )
            header = pb.WriteHeader(
                op=pb.WRITE_OP_CREATE,
                name=name,
                dtype=dtype.code,  # type: ignore[arg-type]
                read_value=False,
            )
            codec.shape_to_proto(array.shape, header.shape)
            info: VariableInfo = self._write_stream(array, header)
            return info
        payload = wire.frame(request.SerializeToString(), 4, codec.tensor_head(dtype, array.shape), 4, array)
        response = self._unary("CreateVariable", payload, write=True)
        return info_from_proto(pb.CreateVariableResponse.FromString(response).info)

    def delete(self, name: str) -> None:
        name = self._checked(name)
        self._forget(name)
        self._delete(name)

    def _delete(self, name: str) -> None:
        request = pb.DeleteVariableRequest(name=name).SerializeToString()
        self._unary("DeleteVariable", request, write=True)

    def info(self, name: str) -> VariableInfo:
        return self._remember(self._get_info(self._checked(name)))

    def _get_info(self, name: str) -> VariableInfo:
        request = pb.GetVariableRequest(name=name).SerializeToString()
        response = self._unary("GetVariable", request, idempotent=True)
        return info_from_proto(pb.GetVariableResponse.FromString(response).info)

    def is_initialized(self, name: str) -> bool:
        return self.info(name).initialized

    def _list(self, prefix: str) -> list[VariableInfo]:  # before list(), which hides the builtin
        request = pb.ListVariablesRequest(prefix=prefix).SerializeToString()
        response = pb.ListVariablesResponse.FromString(self._unary("ListVariables", request, idempotent=True))
        return [info_from_proto(v) for v in response.variables]

    def list(self, prefix: str = "") -> list[VariableInfo]:
        self._check_open()
        if not isinstance(prefix, str):
            raise UsageError(f"prefix must be a str, not {type(prefix).__name__} ({prefix!r:.60})")
        return self._list(prefix)

    def server_info(self) -> ServerInfo:
        """The answering worker's pid, the worker count and the store's usage (one channel of the pool)."""
        self._check_open()
        return self._server_info()

    def _server_info(self) -> ServerInfo:
        raw = self._unary("GetServerInfo", b"", idempotent=True)
        return server_info_from_proto(pb.ServerInfo.FromString(raw))

    # ---- reads and writes ----------------------------------------------------------------------

    def read(self, name: str) -> Array:
        """The variable's value, as a read-only array (copy it to modify it)."""
        return self._read(self._checked(name))

    def _read(self, name: str) -> Array:
        with self._deadline:  # one deadline for Read and its fallback to ReadStream
            return self._read_unary_or_stream(name)

    def _read_unary_or_stream(self, name: str) -> Array:
        # A variable never seen (or last seen small) is read with one message; the server refuses, before it
        # sends anything, one beyond its message limit, which is then read as a stream.
        size = self._cache.sizes.get(name)
        if size is None or size <= STREAM_THRESHOLD:
            request = pb.ReadRequest(name=name).SerializeToString()
            try:
                raw = self._unary("Read", request, idempotent=True)
            except ResourceExhaustedError:
                return self._read_stream(name)  # it grew beyond one message since we last saw it
            response, content = wire.parse(pb.ReadResponse, raw, (2, 4))
            self._remember(info_from_proto(response.info))
            return codec.tensor_from_parts(response.value, content)
        return self._read_stream(name)

    def _read_stream(self, name: str) -> Array:
        info, value = self._transport.read_stream(pb.ReadRequest(name=name).SerializeToString())
        self._remember(info)
        return value

    def assign(
        self,
        name: str,
        value: Any,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
    ) -> Any:
        """TF's Assign: the variable's value after the write, or its VariableInfo without read_value."""
        flags = WriteFlags(
            check_flag(use_locking, "use_locking"),
            check_flag(read_value, "read_value"),
            check_flag(validate_shape, "validate_shape"),
        )
        return self._write(name, value, pb.WRITE_OP_ASSIGN, flags)

    def assign_add(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignAdd: same shape, no broadcasting; integer overflow wraps."""
        flags = WriteFlags(check_flag(use_locking, "use_locking"), check_flag(read_value, "read_value"))
        return self._write(name, delta, pb.WRITE_OP_ASSIGN_ADD, flags)

    def assign_sub(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignSub: same shape, no broadcasting; integer overflow wraps."""
        flags = WriteFlags(check_flag(use_locking, "use_locking"), check_flag(read_value, "read_value"))
        return self._write(name, delta, pb.WRITE_OP_ASSIGN_SUB, flags)

    def _write(self, name: str, value: Any, op: int, flags: WriteFlags) -> Any:
        """One write op (Assign, AssignAdd or AssignSub) of a value converted for the variable."""
        name = self._checked(name)
        try:
            array = arrays.as_array(value)
        except CodecError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if array is not None:
            return self._send_write(name, self._as_array(name, array), op, flags)
        with self._deadline:  # one deadline, also for a retry with a refreshed dtype
            cached = self._cache.dtypes.get(name)
            try:
                try:
                    array = self._as_array(name, value, cached)
                    return self._send_write(name, array, op, flags)
                except InvalidArgumentError:
                    # The conversion used a cached dtype: another client may have recreated the variable
                    # with another since (it then refuses the dtype, or the value does not convert). A
                    # refused call changed nothing, so convert once more for the current dtype and resend.
                    if cached is None:
                        raise  # the dtype was fetched for this call: the refusal stands
                    self._forget(name)
                    fresh = self._as_array(name, value)
                    if fresh.dtype == cached.numpy:
                        raise
                    return self._send_write(name, fresh, op, flags)
            except TensorPSError:
                self._forget(name)  # the dtype used for the conversion may be stale
                raise

    def _send_write(self, name: str, array: Array, op: int, flags: WriteFlags) -> Any:
        dtype = codec.dtype_of(array.dtype)
        if array.nbytes > STREAM_THRESHOLD:
            header = pb.WriteHeader(
                op=op,  # type: ignore[arg-type]
                name=name,
                dtype=dtype.code,  # type: ignore[arg-type]
                use_locking=flags.use_locking,
                read_value=flags.read_value,
                validate_shape=flags.validate_shape,
            )
            codec.shape_to_proto(array.shape, header.shape)
            return self._write_stream(array, header)
        request = pb.AssignRequest(
            name=name,
            use_locking=flags.use_locking,
            read_value=flags.read_value,
            validate_shape=flags.validate_shape,
        )
        payload = wire.frame(request.SerializeToString(), 8, codec.tensor_head(dtype, array.shape), 4, array)
        raw = self._unary(_WRITE_METHODS[op], payload, write=True)
        response, content = wire.parse(pb.AssignResponse, raw, (2, 4))
        info = self._remember(info_from_proto(response.info))
        if not flags.read_value:
            return info
        if response.value_is_request:
            return own(array)  # the value after the write is the one we sent: not echoed
        return codec.tensor_from_parts(response.value, content)

    def _write_stream(self, array: Array, header: pb.WriteHeader) -> Any:
        info, value = self._transport.write_stream(array, header)
        self._remember(info)
        if not header.read_value:
            return info
        return value if value is not None else own(array)  # the server did not echo our value

    # ---- batches (batch.py) --------------------------------------------------------------------

    def _run_batch(self, ops: Sequence[QueuedOp], *, atomic: bool) -> Outcomes:
        """One Batch call: every operation's outcomes, in order (batch_transport.py)."""
        return self._batches.run(ops, atomic=atomic)

    # ---- rows and optimizers (rows.py): each call is a batch of one operation ---------------------

    def _row_op(self, op: QueuedOp) -> Any:
        (outcome,) = self._run_batch([op], atomic=False)[0]
        if outcome.error is not None:
            raise outcome.error
        if op.kind == GATHER:
            self._note_rows(op, outcome.value)
        return outcome.value if returns_value(op) else outcome.info

    def _row_value(self, name: str, value: Any) -> Array:
        return self._as_array(name, value)

    def _row_name(self, name: Any) -> str:
        return self._checked(name)

    def _row_flag(self, value: Any, what: str) -> bool:
        return self._checked_flag(value, what)
