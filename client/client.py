"""The thin client: numpy arrays in, numpy arrays out, typed exceptions, any tensor size."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import numpy as np

from tensorps.client import codec, wire
from tensorps.client.batch import BatchCalls, Outcome, Outcomes, QueuedOp, encode_header
from tensorps.client.codec import CodecError, DType, Shape
from tensorps.client.errors import (
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TensorPSError,
    UnavailableError,
    from_rpc_error,
    from_status,
)
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]
_SERVICE = "/tensorps.v1.ParameterServer/"
# Above this many bytes a tensor travels as a stream of chunks instead of one message.
STREAM_THRESHOLD = 4 << 20
CHUNK_BYTES = 1 << 20
_MAX_MESSAGE = 2**31 - 1
_RETRIES = 3
_RETRY_BACKOFF = 0.05
# Metadata carrying a write's request id (32 hex digits), repeated by its retries (see the .proto).
REQUEST_ID_KEY = "tensorps-request-id"
_READ_KINDS = frozenset((pb.BATCH_OP_READ, pb.BATCH_OP_INFO, pb.BATCH_OP_READ_PREFIX))
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_WRITE_METHODS: dict[int, str] = {
    pb.WRITE_OP_ASSIGN: "Assign",
    pb.WRITE_OP_ASSIGN_ADD: "AssignAdd",
    pb.WRITE_OP_ASSIGN_SUB: "AssignSub",
}


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


def _info(proto: pb.VariableInfo) -> VariableInfo:
    return VariableInfo(
        name=proto.name,
        dtype=codec.dtype_from_code(proto.dtype).numpy,
        shape=codec.shape_from_proto(proto.shape),
        initialized=proto.initialized,
        version=proto.version,
    )


class Client(BatchCalls):
    """A connection to a tensorps server; use it as a context manager, from any number of threads.

    `target` is "host:port", or "shm://STORE" for the store directory of a server on this host (no network,
    same semantics; the connection options do not apply). `timeout` (seconds) bounds every call. Calls are
    spread over `channels` connections, because servers with several worker processes balance per
    connection.
    """

    def __new__(cls, target: str, **options: Any) -> Client:
        # "shm://PATH" opens a store on this host directly: same API, no network (local.py).
        if cls is Client and target.startswith("shm://"):
            from tensorps.client.local import LocalClient  # noqa: PLC0415 (needs the server's store)

            return object.__new__(LocalClient)
        return object.__new__(cls)

    @classmethod
    def local(cls, store: str) -> Client:
        """A client on the store directory `store` of a server on this host (see Client("shm://...")."""
        return cls("shm://" + store)

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
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        credentials = None
        if root_certificates or certificate_chain or private_key:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        self._channels = [self._open(credentials) for _ in range(max(1, channels))]
        self._next = itertools.count()
        self._stubs: dict[tuple[int, str], grpc.UnaryUnaryMultiCallable] = {}  # type: ignore[type-arg]
        self._dtypes: dict[str, DType] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _open(self, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
        # A subchannel pool of its own per channel: grpcio otherwise shares one connection among all
        # channels of a process with equal arguments, and the server's workers balance per connection.
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if credentials is not None:
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def close(self) -> None:
        self._close_background()
        for channel in self._channels:
            channel.close()

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

    # ---- transport -----------------------------------------------------------------------------

    def _channel(self) -> grpc.Channel:
        return self._channels[next(self._next) % len(self._channels)]

    def _unary_stub(self, method: str) -> grpc.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
        """The next channel's callable for `method`, made once per channel (making one costs a few µs)."""
        index = next(self._next) % len(self._channels)
        stub = self._stubs.get((index, method))
        if stub is None:
            stub = self._channels[index].unary_unary(
                _SERVICE + method, request_serializer=None, response_deserializer=None
            )
            self._stubs[(index, method)] = stub
        return stub

    def _call_metadata(self, write: bool) -> tuple[tuple[str, str], ...] | None:
        """The call's metadata; a write carries a fresh request id, which its retries repeat."""
        if not write:
            return self._metadata
        return (*(self._metadata or ()), (REQUEST_ID_KEY, secrets.token_hex(16)))

    def _unary(self, method: str, request: bytes, *, idempotent: bool = False, write: bool = False) -> bytes:
        """One unary call, retried on UNAVAILABLE if idempotent or a write (made exactly-once by its id)."""
        metadata = self._call_metadata(write)
        for attempt in itertools.count():
            stub = self._unary_stub(method)
            try:
                response: bytes = stub(request, timeout=self.timeout, metadata=metadata)
                return response
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                retry = (idempotent or write) and attempt < _RETRIES
                if not (retry and isinstance(error, UnavailableError)):
                    raise error from None
                # A worker that died is replaced within about a second; the next channel may reach another.
                time.sleep(_RETRY_BACKOFF * 4**attempt)
        raise AssertionError("unreachable")

    def _read_chunks(
        self, chunks: Iterator[bytes], *, expect_value: bool = True
    ) -> tuple[VariableInfo, Array | None]:
        try:
            first = pb.ReadChunk.FromString(next(chunks))
            info = _info(first.info)
            if not expect_value or info.shape is None:
                for _ in chunks:
                    pass  # the end of the stream carries the call's status
                return info, None
            dtype = codec.dtype_of(info.dtype)
            buffer = np.empty(codec.nbytes_of(info.shape, dtype), np.uint8)
            filled = 0
            for raw in chunks:
                chunk, data = wire.parse(pb.ReadChunk, raw, (15,))
                if chunk.offset != filled or filled + len(data) > buffer.nbytes:
                    raise InvalidArgumentError("the server sent chunks out of order")
                buffer[filled : filled + len(data)] = data
                filled += len(data)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        except StopIteration:
            raise InvalidArgumentError("the server's stream ended before the variable's info") from None
        if filled != buffer.nbytes:
            raise InvalidArgumentError(f"the server's stream ended after {filled} of {buffer.nbytes} bytes")
        return info, codec.array_from_buffer(buffer, dtype, info.shape)

    def _remember(self, info: VariableInfo) -> VariableInfo:
        dtype = codec.dtype_of(info.dtype)
        with self._lock:
            self._dtypes[info.name] = dtype
            if info.shape is not None:
                self._sizes[info.name] = codec.nbytes_of(info.shape, dtype)
        return info

    def _forget(self, name: str) -> None:
        with self._lock:
            self._dtypes.pop(name, None)
            self._sizes.pop(name, None)

    # ---- values --------------------------------------------------------------------------------

    def _as_array(self, name: str, value: Any, dtype: DType | None = None) -> Array:
        """numpy input is sent as it is (never cast); Python values take the variable's dtype losslessly."""
        try:
            codec.validate_name(name)
            if isinstance(value, np.ndarray | np.generic):
                array = np.asarray(value)
                codec.dtype_of(array.dtype)
                return codec.as_wire_array(array)
            if dtype is None:
                dtype = self._dtypes.get(name) or codec.dtype_of(self.info(name).dtype)
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
    ) -> VariableInfo:
        """Create a variable: declared (dtype, optional shape) and uninitialized, or with an initial value."""
        declared, dims, array = self._create_args(name, dtype, shape, value)
        return self._remember(self._create(name, declared, dims, array))

    def _create_args(
        self, name: str, dtype: Any, shape: Any, value: Any
    ) -> tuple[DType, Shape | None, Array | None]:
        """create()'s arguments checked: the dtype, the declared shape and the initial value as an array."""
        try:
            codec.validate_name(name)
            declared = codec.dtype_of(dtype) if dtype is not None else None
            dims = codec.validate_shape(shape) if shape is not None else None
        except CodecError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if value is None and declared is None:
            raise InvalidArgumentError(f"variable '{name}' needs a dtype or a value")
        if value is not None and declared is None and not isinstance(value, np.ndarray | np.generic):
            raise InvalidArgumentError(f"variable '{name}': give a dtype for a Python initial value")
        array = None if value is None else self._as_array(name, value, declared)
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
            return _info(pb.CreateVariableResponse.FromString(response).info)
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
        return _info(pb.CreateVariableResponse.FromString(response).info)

    def delete(self, name: str) -> None:
        self._forget(name)
        request = pb.DeleteVariableRequest(name=name).SerializeToString()
        self._unary("DeleteVariable", request, write=True)

    def info(self, name: str) -> VariableInfo:
        request = pb.GetVariableRequest(name=name).SerializeToString()
        response = self._unary("GetVariable", request, idempotent=True)
        return self._remember(_info(pb.GetVariableResponse.FromString(response).info))

    def is_initialized(self, name: str) -> bool:
        return self.info(name).initialized

    def list(self, prefix: str = "") -> list[VariableInfo]:
        request = pb.ListVariablesRequest(prefix=prefix).SerializeToString()
        response = pb.ListVariablesResponse.FromString(self._unary("ListVariables", request, idempotent=True))
        return [_info(v) for v in response.variables]

    def server_info(self) -> ServerInfo:
        """The answering worker's pid, the worker count and the store's usage (one channel of the pool)."""
        raw = self._unary("GetServerInfo", b"", idempotent=True)
        p = pb.ServerInfo.FromString(raw)
        return ServerInfo(p.pid, p.workers, p.store, p.variables, p.used_bytes, p.max_total_bytes, p.version)

    # ---- reads and writes ----------------------------------------------------------------------

    def read(self, name: str) -> Array:
        """The variable's value, as a read-only array (copy it to modify it)."""
        size = self._sizes.get(name)
        if size is not None and size <= STREAM_THRESHOLD:
            request = pb.ReadRequest(name=name).SerializeToString()
            try:
                raw = self._unary("Read", request, idempotent=True)
            except ResourceExhaustedError:
                return self._read_stream(name)  # it grew beyond one message since we last saw it
            response, content = wire.parse(pb.ReadResponse, raw, (2, 4))
            self._remember(_info(response.info))
            return codec.tensor_from_parts(response.value, content)
        return self._read_stream(name)

    def _read_stream(self, name: str) -> Array:
        request = pb.ReadRequest(name=name).SerializeToString()
        for attempt in itertools.count():
            stream = self._channel().unary_stream(
                _SERVICE + "ReadStream", request_serializer=None, response_deserializer=None
            )
            try:
                responses = stream(request, timeout=self.timeout, metadata=self._metadata)
                info, value = self._read_chunks(iter(responses))
            except UnavailableError:
                if attempt >= _RETRIES:
                    raise
                time.sleep(_RETRY_BACKOFF * 4**attempt)
                continue
            self._remember(info)
            assert value is not None
            return value
        raise AssertionError("unreachable")

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
        flags = WriteFlags(use_locking, read_value, validate_shape)
        return self._write(name, value, pb.WRITE_OP_ASSIGN, flags)

    def assign_add(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignAdd: same shape, no broadcasting; integer overflow wraps."""
        return self._write(name, delta, pb.WRITE_OP_ASSIGN_ADD, WriteFlags(use_locking, read_value))

    def assign_sub(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignSub: same shape, no broadcasting; integer overflow wraps."""
        return self._write(name, delta, pb.WRITE_OP_ASSIGN_SUB, WriteFlags(use_locking, read_value))

    def _write(self, name: str, value: Any, op: int, flags: WriteFlags) -> Any:
        """One write op (Assign, AssignAdd or AssignSub) of a value converted for the variable."""
        array = self._as_array(name, value)
        try:
            return self._send_write(name, array, op, flags)
        except TensorPSError:
            if not isinstance(value, np.ndarray | np.generic):
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
        info = self._remember(_info(response.info))
        if not flags.read_value:
            return info
        return codec.tensor_from_parts(response.value, content)

    def _write_stream(self, array: Array, header: pb.WriteHeader) -> Any:
        def chunks() -> Iterator[bytes]:
            yield pb.WriteChunk(header=header).SerializeToString()
            yield from wire.data_chunks(array, CHUNK_BYTES)

        metadata = self._call_metadata(write=True)
        for attempt in itertools.count():
            stream = self._channel().stream_stream(
                _SERVICE + "WriteStream", request_serializer=None, response_deserializer=None
            )
            try:
                responses = stream(chunks(), timeout=self.timeout, metadata=metadata)
                info, value = self._read_chunks(iter(responses), expect_value=header.read_value)
            except UnavailableError:
                if attempt >= _RETRIES:
                    raise
                time.sleep(_RETRY_BACKOFF * 4**attempt)
                continue
            self._remember(info)
            return value if header.read_value else info
        raise AssertionError("unreachable")

    # ---- batches (batch.py) --------------------------------------------------------------------

    def _run_batch(self, ops: Sequence[QueuedOp], *, atomic: bool) -> Outcomes:
        """One Batch call: every operation's outcomes, in order. Batches of reads only are retried.

        A batch whose values and expected reply fit STREAM_THRESHOLD goes as one message each way (Batch:
        a third of BatchStream's fixed cost); anything larger, or a reply of unknown size, streams.
        """
        header, arrays = encode_header(ops, atomic)
        unary = sum(a.nbytes for a in arrays) <= STREAM_THRESHOLD and self._small_reply(ops)
        # Reads are idempotent; writes carry a request id (the server applies none of them twice).
        metadata = self._call_metadata(write=not all(op.kind in _READ_KINDS for op in ops))
        for attempt in itertools.count():
            try:
                if unary:
                    payload = wire.join_data(pb.BatchChunk(header=header).SerializeToString(), arrays)
                    stub = self._unary_stub("Batch")
                    reply, data = wire.parse(
                        pb.BatchReply, stub(payload, timeout=self.timeout, metadata=metadata), (15,)
                    )
                    return self._batch_outcomes(reply, data, ops)
                stream = self._channel().stream_stream(
                    _SERVICE + "BatchStream", request_serializer=None, response_deserializer=None
                )
                replies = iter(
                    stream(_batch_messages(header, arrays), timeout=self.timeout, metadata=metadata)
                )
                reply = pb.BatchReply.FromString(next(replies))
                received = wire.Assembler(_reply_bytes(reply), "the server's batch reply")
                for raw in replies:
                    chunk, data = wire.parse(pb.BatchReply, raw, (15,))
                    received.add(chunk.offset, data)
                received.check_complete()
                return self._batch_outcomes(reply, received.buffer, ops)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if not (isinstance(error, UnavailableError) and attempt < _RETRIES):
                    raise error from None
                time.sleep(_RETRY_BACKOFF * 4**attempt)
            except StopIteration:
                raise InternalError("the server's batch reply ended before its results") from None
            except CodecError as exc:
                raise InternalError(f"the server's batch reply is malformed: {exc}") from None
        raise AssertionError("unreachable")

    def _small_reply(self, ops: Sequence[QueuedOp]) -> bool:
        """Whether the reply's values are known to fit STREAM_THRESHOLD (sizes last seen of reads)."""
        total = 0
        for op in ops:
            if op.kind == pb.BATCH_OP_READ:
                size = self._sizes.get(op.name)
                if size is None:
                    return False
                total += size
            elif op.kind == pb.BATCH_OP_READ_PREFIX:
                return False
            elif op.array is not None and op.read_value:
                total += op.array.nbytes
        return total <= STREAM_THRESHOLD

    def _batch_outcomes(self, reply: pb.BatchReply, data: Any, ops: Sequence[QueuedOp]) -> Outcomes:
        """Every operation's outcomes from the reply's results and its values' bytes."""
        values = np.frombuffer(data, np.uint8)
        values.flags.writeable = False
        if values.nbytes != _reply_bytes(reply):
            raise InternalError("the server's batch reply has the wrong number of bytes")
        outcomes: Outcomes = [[] for _ in ops]
        offset = 0
        for result in reply.results:
            if result.code:
                code = _STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
                outcomes[result.op].append(Outcome(error=from_status(code, result.message)))
                continue
            info = self._remember(_info(result.info)) if result.HasField("info") else None
            value = None
            if result.HasField("value"):
                dtype, shape = codec.tensor_header_from_proto(result.value)
                nbytes = codec.nbytes_of(shape, dtype)
                value = codec.array_from_buffer(values[offset : offset + nbytes], dtype, shape)
                offset += nbytes
            outcomes[result.op].append(Outcome(info, value))
        for op in ops:
            if op.kind == pb.BATCH_OP_DELETE:
                self._forget(op.name)
        return outcomes


def _reply_bytes(reply: pb.BatchReply) -> int:
    """The bytes of the values a batch reply announces."""
    total = 0
    for result in reply.results:
        if result.HasField("value"):
            dtype, shape = codec.tensor_header_from_proto(result.value)
            total += codec.nbytes_of(shape, dtype)
    return total


def _batch_messages(header: pb.BatchHeader, arrays: Sequence[Array]) -> Iterator[bytes]:
    """BatchStream's requests: the header, then the values' bytes in chunks, framed as they are sent."""
    yield pb.BatchChunk(header=header).SerializeToString()
    writer = wire.ChunkWriter(CHUNK_BYTES)
    for array in arrays:
        writer.add(array)
        yield from writer.messages
        writer.messages.clear()
    yield from writer.finish()
