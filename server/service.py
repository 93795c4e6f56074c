"""The gRPC adapter: raw request bytes -> ops -> raw response bytes, errors -> status codes.

Handlers take the request as bytes (no deserializer) so that a malformed message is an INVALID_ARGUMENT
rather than grpcio's generic INTERNAL, and so that tensor bytes are cut out of the message without a copy
(wire.py). The path of a tensor byte from the socket to shared memory: wire.parse (a view of the request)
-> codec.array_from_buffer (a typed view, via tfproto.decode) -> ops.assign (np.copyto into the segment).
A value in TensorFlow's typed fields (float_val, ...) is built into a new array by tfproto.decode instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from importlib import metadata
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from tensorps.client import codec, tfproto, wire
from tensorps.client.codec import CodecError
from tensorps.server import batch_service, reply_limit
from tensorps.server.bulk import BulkError, BulkListener
from tensorps.server.messages import info_to_proto
from tensorps.server.ops import Info, OpError, Ops, ResourceExhausted
from tensorps.server.staging import Reservation, Staging, default_staging_bytes
from tensorps.server.store import StoreError, StoreGoneError
from tensorps.v1 import tensorps_pb2 as pb

SERVICE_NAME = "tensorps.v1.ParameterServer"
CHUNK_BYTES = 1 << 20

log = logging.getLogger("tensorps.server")
_VERSION = metadata.version("tensorps")
R = TypeVar("R")
Array = np.ndarray[Any, Any]


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG, errno.EMFILE, errno.ENFILE})


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status a failed operation answers with (None: not ours to translate)."""
    if isinstance(exc, OpError | BulkError):
        return getattr(grpc.StatusCode, exc.code), str(exc)
    if isinstance(exc, CodecError | DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc) or "malformed request"
    if isinstance(exc, StoreGoneError):  # the store of a shm:// client (or a server) was removed
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is out of resources: {exc.strerror}"
    if isinstance(exc, StoreError | OSError):
        log.exception("store failure")
        return grpc.StatusCode.INTERNAL, str(exc)
    return None


# grpc reports "no deadline" as a time remaining of about 2**63 nanoseconds.
_NO_DEADLINE = 1e8


def lock_wait(context: grpc.ServicerContext) -> float | None:
    """How long a call may wait for a variable's lock: its deadline, less a margin so that the server's
    DEADLINE_EXCEEDED, which names the variable, reaches the client before the client's own timer fires.
    None: the call has no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE:
        return None
    return max(0.0, remaining - min(0.5, 0.2 * remaining))


def _abort_on_error(handler: Callable[..., R]) -> Callable[..., R]:
    @functools.wraps(handler)
    def wrapper(self: ParameterServer, request: Any, context: grpc.ServicerContext, **options: Any) -> R:
        try:
            with self.ops.deadline(lock_wait(context)):
                return handler(self, request, context, **options)
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                raise
            context.abort(*status)

    return wrapper


def _abort_on_error_stream(handler: Callable[..., Iterator[R]]) -> Callable[..., Iterator[R]]:
    @functools.wraps(handler)
    def wrapper(
        self: ParameterServer, request: Any, context: grpc.ServicerContext, **options: Any
    ) -> Iterator[R]:
        try:
            # grpc runs a streaming handler in one thread from start to end: the thread-local holds.
            with self.ops.deadline(lock_wait(context)):
                yield from handler(self, request, context, **options)
        except Exception as exc:
            status = status_of(exc)
            if status is None:
                raise
            context.abort(*status)

    return wrapper


REQUEST_ID_KEY = "tensorps-request-id"
_REQUEST_ID = re.compile(r"[0-9a-fA-F]{32}")


def request_id(context: grpc.ServicerContext) -> bytes | None:
    """The call's request id (metadata `tensorps-request-id`, 32 hex digits): a retried write answers with
    its first outcome instead of applying twice. Absent or malformed: the write is not deduplicated."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value) or not value.strip("0"):
                raise CodecError(f"{REQUEST_ID_KEY} must be 32 hex digits, not all zero; got {value!r:.80}")
            return bytes.fromhex(value)
    return None


def _flag(message: Any, field: str, default: bool) -> bool:
    return bool(getattr(message, field)) if message.HasField(field) else default


def _name(name: str) -> str:
    codec.validate_name(name)
    return name


def _chunks(info: Info, array: Array) -> Iterator[bytes]:
    """A value as ReadChunk messages: the info first, then the bytes in order."""
    yield pb.ReadChunk(info=info_to_proto(info)).SerializeToString()
    yield from wire.data_chunks(codec.as_wire_array(array), CHUNK_BYTES)


def _drain(reversed_messages: list[bytes]) -> Iterator[bytes]:
    """The messages in their order, each let go of once it is sent."""
    while reversed_messages:
        yield reversed_messages.pop()


def _replies_with_a_copy(op: int, flags: Any) -> bool:
    """Whether a write's reply holds a copy of the variable: all but a locked Assign's, which returns the
    value it received (ops.assign)."""
    if not _flag(flags, "read_value", True):
        return False
    return not (op == pb.WRITE_OP_ASSIGN and _flag(flags, "use_locking", True))


class _Cancelled(Exception):
    """The call was cancelled while its handler waited for the next message."""


class IdleWatch:
    """Cancels streams idle for `timeout` seconds: a write whose client sends nothing, or a reply whose
    client takes nothing (a stalled peer would otherwise hold a thread and a tensor-sized buffer for ever)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._last: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Generator[bytes, None, None]:
        key = id(context)
        self._touch(key, context)
        try:
            while True:
                try:
                    message = next(messages)
                except StopIteration:
                    return
                except grpc.RpcError:
                    raise _Cancelled from None
                self._touch(key, context)
                yield message
        finally:
            with self._lock:
                self._last.pop(key, None)

    def watch_reply(self, replies: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Yields `replies`; the call is cancelled if gRPC takes none of them for `timeout` seconds.

        gRPC asks for the next reply once it has sent the previous one, so the clock runs only while a
        reply waits to go out (a client that stopped reading), never while the next one is computed.
        """
        key = id(context)
        try:
            for reply in replies:
                self._touch(key, context, "a reply stream whose client stopped reading")
                yield reply
                self._forget(key)
        finally:
            self._forget(key)

    def _forget(self, key: int) -> None:
        with self._lock:
            self._last.pop(key, None)

    def _touch(self, key: int, context: grpc.ServicerContext, what: str = "a streamed write") -> None:
        with self._lock:
            self._last[key] = (time.monotonic(), context, what)
            if self._thread is None:
                self._thread = threading.Thread(target=self._reap, name="tensorps-idle", daemon=True)
                self._thread.start()

    def _reap(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            now = time.monotonic()
            with self._lock:
                idle = [(k, c, w) for k, (t, c, w) in self._last.items() if now - t > self.timeout]
                for key, _context, _what in idle:
                    del self._last[key]
            for _key, context, what in idle:
                log.warning("cancelling %s idle for more than %.1f s", what, self.timeout)
                context.cancel()  # type: ignore[no-untyped-call]


class ParameterServer:
    """The servicer of tensorps.v1.ParameterServer over one Ops instance."""

    def __init__(
        self,
        ops: Ops,
        *,
        workers: int = 1,
        stream_idle_timeout: float = 60.0,
        max_message_bytes: int = 64 << 20,
        max_staging_bytes: int | None = None,
        bulk: BulkListener | None = None,
        cluster: Sequence[str] = (),
        shard_index: int = 0,
        worker_index: int = 0,
    ) -> None:
        self.ops = ops
        self.cluster = tuple(cluster)  # the members of this server's cluster (empty: a lone server)
        self.shard_index = shard_index
        self.worker_index = worker_index
        self.started = time.time()
        self.bulk = bulk  # this worker's bulk side channel (None: --bulk-port off)
        self.workers = workers
        self.max_message_bytes = max_message_bytes
        self._idle = IdleWatch(stream_idle_timeout)
        limit = max_staging_bytes or default_staging_bytes(ops.store.limits.max_total_bytes)
        self.staging = Staging(limit)

    # ---- catalog -------------------------------------------------------------------------------

    @_abort_on_error
    def create_variable(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request, content = wire.parse(pb.CreateVariableRequest, raw, (4, 4))
        name = _name(request.name)
        shape = codec.shape_from_proto(request.shape) if request.HasField("shape") else None
        with self.staging.reservation("an initial value") as staging:
            value = None
            if request.HasField("value"):
                value = self._decode(name, request.value, content, staging)
                dtype = codec.dtype_of(value.dtype)
                if request.dtype and request.dtype != dtype.code:
                    raise CodecError(
                        f"variable '{name}' is declared {codec.dtype_from_code(request.dtype).name} but "
                        f"its initial value is {dtype.name}"
                    )
            elif request.dtype == pb.DT_INVALID:
                raise CodecError(f"variable '{name}' needs a dtype or an initial value")
            else:
                dtype = codec.dtype_from_code(request.dtype)
            info = self.ops.create(name, dtype, shape, value, request=request_id(context))
        return pb.CreateVariableResponse(info=info_to_proto(info)).SerializeToString()

    def _decode(self, name: str, proto: pb.TensorProto, content: memoryview, staging: Reservation) -> Array:
        """A request's value (tfproto: tensor_content viewed in place, or TensorFlow's typed values), its
        size checked against the server's limits first. A value built from typed values is a new array
        (a splat of one number may fill a large tensor): reserved in the worker's staging budget."""
        try:
            dtype, shape = header = codec.tensor_header_from_proto(proto)
        except CodecError as exc:
            raise CodecError(f"variable '{name}': value: {exc}") from None
        nbytes = self.ops.check_size(name, shape, dtype)
        if not content.nbytes and nbytes:
            staging.grow(nbytes)
        return tfproto.decode(proto, content, what=f"variable '{name}': value", header=header)

    @_abort_on_error
    def delete_variable(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.DeleteVariableRequest.FromString(raw)
        self.ops.delete(_name(request.name), request=request_id(context))
        return b""

    @_abort_on_error
    def list_variables(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.ListVariablesRequest.FromString(raw)
        response = pb.ListVariablesResponse()
        for info in self.ops.list(request.prefix):
            info_to_proto(info, response.variables.add())
        return response.SerializeToString()

    @_abort_on_error
    def get_variable(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.GetVariableRequest.FromString(raw)
        info = self.ops.info(_name(request.name))
        return pb.GetVariableResponse(info=info_to_proto(info)).SerializeToString()

    # ---- writes --------------------------------------------------------------------------------

    def _write(self, op: int, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request, content = wire.parse(pb.AssignRequest, raw, (8, 4))
        name = _name(request.name)
        if not request.HasField("value"):
            raise CodecError(f"the request for variable '{name}' has no value")
        with self.staging.reservation("a value") as staging:
            value = self._decode(name, request.value, content, staging)
            if _replies_with_a_copy(op, request):
                reply_limit.check_write(name, value.nbytes, context)
            info, result = self._apply(op, name, value, request, request_id(context))
            response = pb.AssignResponse(info=info_to_proto(info), value_is_request=result is value)
            prefix = response.SerializeToString()
            if result is None or result is value:
                return prefix  # no value asked for, or the client holds it: it sent it
            head = codec.tensor_head(codec.dtype_of(value.dtype), value.shape)
            return wire.frame(prefix, 2, head, 4, codec.as_wire_array(result))

    def _apply(
        self, op: int, name: str, value: Array, flags: Any, request: bytes | None
    ) -> tuple[Info, Array | None]:
        read_value = _flag(flags, "read_value", True)
        if op == pb.WRITE_OP_ASSIGN:
            return self.ops.assign(
                name,
                value,
                validate_shape=_flag(flags, "validate_shape", True),
                use_locking=_flag(flags, "use_locking", True),
                read_value=read_value,
                request=request,
            )
        if op in (pb.WRITE_OP_ASSIGN_ADD, pb.WRITE_OP_ASSIGN_SUB):
            return self.ops.assign_add(
                name,
                value,
                use_locking=_flag(flags, "use_locking", False),
                read_value=read_value,
                subtract=op == pb.WRITE_OP_ASSIGN_SUB,
                request=request,
            )
        raise CodecError(f"unknown write op {op}")

    @_abort_on_error
    def assign(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._write(pb.WRITE_OP_ASSIGN, raw, context)

    @_abort_on_error
    def assign_add(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._write(pb.WRITE_OP_ASSIGN_ADD, raw, context)

    @_abort_on_error
    def assign_sub(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._write(pb.WRITE_OP_ASSIGN_SUB, raw, context)

    @_abort_on_error_stream
    def write_stream(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.staging.reservation("a streamed write") as staging:
            watched = self._idle.watch(messages, context)
            try:
                header, name, value = self._receive(watched, staging)
            except _Cancelled:
                return  # the idle watch cancelled the call: no status can be sent any more
            finally:
                watched.close()
            if header.op == pb.WRITE_OP_CREATE:
                dtype = codec.dtype_of(value.dtype)
                info = self.ops.create(name, dtype, value.shape, value, request=request_id(context))
                result = None
            else:
                if _replies_with_a_copy(header.op, header):
                    staging.grow(value.nbytes)  # before the write: a refusal must change nothing
                info, result = self._apply(header.op, name, value, header, request_id(context))
            if result is None or result is value:
                echo = result is not None
                yield pb.ReadChunk(info=info_to_proto(info), value_is_request=echo).SerializeToString()
            else:
                yield from self._idle.watch_reply(_chunks(info, result), context)

    def _receive(self, chunks: Iterator[bytes], staging: Reservation) -> tuple[pb.WriteHeader, str, Array]:
        """A streamed write's header and tensor, checked before anything large is allocated."""
        first = next(chunks, None)
        if first is None:
            raise CodecError("the write stream is empty: its first message must carry a header")
        chunk, data = wire.parse(pb.WriteChunk, first, (15,))
        if not chunk.HasField("header"):
            raise CodecError("the first message of a write stream has no header")
        header = chunk.header
        name = _name(header.name)
        dtype = codec.dtype_from_code(header.dtype)
        if not header.HasField("shape"):
            raise CodecError(f"the write stream for variable '{name}' has no shape")
        shape = codec.shape_from_proto(header.shape)
        if shape is None:
            raise CodecError(f"the write stream for variable '{name}' has an unknown shape")
        if header.op not in pb.WriteOp.values() or header.op == pb.WRITE_OP_UNSPECIFIED:
            raise CodecError(f"unknown write op {header.op} for variable '{name}'")
        nbytes = self.ops.check_size(name, shape, dtype)
        # Checked before this allocation: the size is within the server's limits, and reserved.
        staging.grow(nbytes)
        buffer = np.empty(nbytes, np.uint8)
        filled = 0
        message: bytes | None = first
        while message is not None:
            if message is not first:
                chunk, data = wire.parse(pb.WriteChunk, message, (15,))
                if chunk.HasField("header"):
                    raise CodecError(f"write stream for variable '{name}': a second header")
            if chunk.offset != filled:
                raise CodecError(
                    f"write stream for variable '{name}': chunk at offset {chunk.offset}, expected {filled}"
                )
            if filled + len(data) > nbytes:
                raise CodecError(
                    f"write stream for variable '{name}': more than the {nbytes} bytes of shape "
                    f"{codec.format_shape(shape)} of {dtype.name}"
                )
            buffer[filled : filled + len(data)] = data
            filled += len(data)
            message = next(chunks, None)
        if filled != nbytes:
            raise CodecError(f"write stream for variable '{name}' ended after {filled} of {nbytes} bytes")
        return header, name, codec.array_from_buffer(buffer, dtype, shape)

    @_abort_on_error
    def batch(self, raw: bytes, context: grpc.ServicerContext, *, read_only: bool = False) -> bytes:
        """Batch: `read_only` is set by the token check (auth.py) for tokens that may not write."""
        with self.staging.reservation("a batch") as staging:
            batch, atomic = batch_service.receive_one(raw, self.ops, read_only=read_only, staging=staging)
            return batch_service.execute_one(self.ops, batch, atomic, request_id(context), staging)

    @_abort_on_error_stream
    def batch_stream(
        self, messages: Iterator[bytes], context: grpc.ServicerContext, *, read_only: bool = False
    ) -> Iterator[bytes]:
        """BatchStream: `read_only` as for batch."""
        with self.staging.reservation("a batch") as staging:
            watched = self._idle.watch(messages, context)
            try:
                planned, first = batch_service.start(watched, self.ops, read_only=read_only)
                if planned.header.bulk:
                    # The values come over the bulk channel: the stream holds the header alone.
                    if wire.parse(pb.BatchChunk, first, (15,))[1].nbytes or next(watched, None) is not None:
                        raise CodecError(
                            "a bulk batch stream carries its header alone: its data goes over bulk"
                        )
                else:
                    batch = batch_service.receive_rest(planned, first, watched, staging)
            except _Cancelled:
                return
            finally:
                watched.close()
            request = request_id(context)
            if planned.header.bulk:
                idle = self._idle.timeout
                replies = batch_service.execute_bulk(
                    planned, self.ops, self.bulk, context, idle=idle, request=request, staging=staging
                )
            else:
                limit = reply_limit.declared(context)
                replies = batch_service.execute(
                    self.ops, batch, planned.header.atomic, request, staging, receive_limit=limit
                )
            yield from self._idle.watch_reply(replies, context)

    # ---- reads ---------------------------------------------------------------------------------

    @_abort_on_error
    def read(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        name = _name(pb.ReadRequest.FromString(raw).name)
        declared = reply_limit.declared(context)

        def encode(info: Info, view: Array) -> bytes:
            if view.nbytes > self.max_message_bytes:
                # Refused before a byte is sent: a client that did not know the size reads it as a stream.
                raise ResourceExhausted(
                    f"variable '{name}' has {view.nbytes} bytes, more than one message of the server's "
                    f"--max-message-bytes {self.max_message_bytes}: read it with ReadStream"
                )
            reply_limit.check_read(name, view.nbytes, declared)
            prefix = pb.ReadResponse(info=info_to_proto(info)).SerializeToString()
            assert info.shape is not None
            return wire.frame(prefix, 2, codec.tensor_head(info.dtype, info.shape), 4, view)

        return self.ops.read(name, encode)

    @_abort_on_error_stream
    def read_stream(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        name = _name(pb.ReadRequest.FromString(raw).name)
        with self.staging.reservation("a streamed read") as staging:

            def frame(info: Info, view: Array) -> list[bytes]:
                # The messages are framed straight from shared memory under the lock (one copy, as a
                # snapshot would take), so that the lock is not held while a slow reader drains the stream.
                staging.grow(view.nbytes)
                return list(_chunks(info, view))

            chunks = self.ops.read(name, frame)
            chunks.reverse()
            yield from self._idle.watch_reply(_drain(chunks), context)

    @_abort_on_error
    def get_server_info(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        pb.GetServerInfoRequest.FromString(raw)
        store = self.ops.store
        info = pb.ServerInfo(
            pid=os.getpid(),
            workers=self.workers,
            store=store.path,
            variables=store.variable_count,
            used_bytes=store.used_bytes,
            max_total_bytes=store.limits.max_total_bytes,
            version=_VERSION,
            cluster=self.cluster,
            shard_index=self.shard_index,
            worker_index=self.worker_index,
            worker_started=self.started,
            staging_bytes=self.staging.used,
            staging_limit_bytes=self.staging.limit,
            bulk_port=self.bulk.port if self.bulk is not None else 0,
        )
        persistence = self.ops.persistence
        if persistence is not None:
            last = persistence.last_snapshot
            info.data_dir, info.wal = persistence.settings.data_dir, persistence.settings.wal
            info.last_snapshot_time = last.time
            info.last_snapshot_seconds = last.seconds
            info.last_snapshot_pause_ms = last.pause_ms
        return info.SerializeToString()

    # ---- registration --------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        unary = grpc.unary_unary_rpc_method_handler
        handlers = {
            "CreateVariable": unary(self.create_variable),
            "DeleteVariable": unary(self.delete_variable),
            "ListVariables": unary(self.list_variables),
            "GetVariable": unary(self.get_variable),
            "Assign": unary(self.assign),
            "AssignAdd": unary(self.assign_add),
            "AssignSub": unary(self.assign_sub),
            "Read": unary(self.read),
            "WriteStream": grpc.stream_stream_rpc_method_handler(self.write_stream),
            "ReadStream": grpc.unary_stream_rpc_method_handler(self.read_stream),
            "GetServerInfo": unary(self.get_server_info),
            "Batch": unary(self.batch),
            "BatchStream": grpc.stream_stream_rpc_method_handler(self.batch_stream),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
