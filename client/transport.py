"""The remote client's gRPC transport: channels, the per-call deadline, metadata, unary calls with retries,
and a variable's value streamed in chunks both ways."""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc
import numpy as np

from tensorps.client import codec, progress, wire
from tensorps.client.errors import InvalidArgumentError, UnavailableError, from_rpc_error
from tensorps.client.infos import Array, VariableInfo, info_from_proto
from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "/tensorps.v1.ParameterServer/"
# Above this many bytes a tensor travels as a stream of chunks instead of one message.
STREAM_THRESHOLD = 4 << 20
CHUNK_BYTES = 1 << 20
_MAX_MESSAGE = 2**31 - 1
_RECEIVE_LIMIT = ("tensorps-max-receive-bytes", str(_MAX_MESSAGE))
_RETRIES = 3
_RETRY_BACKOFF = 0.05
# Metadata carrying a write's request id (32 hex digits), repeated by its retries (see the .proto).
REQUEST_ID_KEY = "tensorps-request-id"
# gRPC reconnects to a server that went away after 1 s, then 1.6x longer each time up to 120 s: after a
# 15 s outage a client noticed the server was back 8 s late. Retry connecting within a second instead.
_RECONNECT_BACKOFF_MS = (100, 1000)

Metadata = tuple[tuple[str, str], ...] | None


class CallSettings(Protocol):
    """The client options every call reads when it starts (a Client: its public attributes)."""

    @property
    def timeout(self) -> float | None: ...

    @property
    def wait_for_ready(self) -> bool: ...


class CallDeadline:
    """Per thread, the deadline of the API call in progress: its RPCs, retries and follow-up calls share
    one Client.timeout (each attempt used to get the whole timeout again). Nested scopes join the
    outermost one; a scope is cheap enough for every call (a class, not @contextmanager)."""

    def __init__(self, settings: CallSettings) -> None:
        self._settings = settings
        self._local = threading.local()

    def __enter__(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            timeout = self._settings.timeout
            local.deadline = None if timeout is None else time.monotonic() + timeout
        local.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1

    def left(self) -> float | None:
        """Seconds left for the next RPC of the call in progress (None: no timeout)."""
        if not getattr(self._local, "depth", 0):
            return self._settings.timeout  # outside any call's scope: the RPC is a call of its own
        deadline: float | None = self._local.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())


class Transport:
    """A pool of gRPC channels to one server, and the calls a Client makes over them."""

    def __init__(
        self,
        target: str,
        settings: CallSettings,
        deadline: CallDeadline,
        *,
        credentials: grpc.ChannelCredentials | None,
        channels: int,
        metadata: Metadata,
    ) -> None:
        self._settings = settings
        self.deadline = deadline
        # Sent with every call (the bearer token; a cluster's shard adds the shard it is meant to be).
        self.metadata = metadata
        self._channels = [_open(target, credentials) for _ in range(channels)]
        self._next = itertools.count()
        self._stubs: dict[tuple[int, str], grpc.UnaryUnaryMultiCallable] = {}  # type: ignore[type-arg]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def channel(self) -> grpc.Channel:
        return self._channels[next(self._next) % len(self._channels)]

    def unary_stub(self, method: str) -> grpc.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
        """The next channel's callable for `method`, made once per channel (making one costs a few µs)."""
        index = next(self._next) % len(self._channels)
        stub = self._stubs.get((index, method))
        if stub is None:
            stub = self._channels[index].unary_unary(
                SERVICE + method, request_serializer=None, response_deserializer=None
            )
            self._stubs[(index, method)] = stub
        return stub

    def stream_stream(self, method: str) -> grpc.StreamStreamMultiCallable:  # type: ignore[type-arg]
        """The next channel's callable for the bidirectional stream `method`."""
        return self.channel().stream_stream(
            SERVICE + method, request_serializer=None, response_deserializer=None
        )

    def options(self, metadata: Metadata) -> dict[str, Any]:
        """The keyword arguments of the next RPC of the call in progress."""
        return {
            "timeout": self.deadline.left(),
            "metadata": metadata,
            "wait_for_ready": self._settings.wait_for_ready,
        }

    def call_metadata(self, write: bool) -> Metadata:
        """The call's metadata; a write carries a fresh request id, which its retries repeat, and the
        largest reply this client accepts (the server refuses, before applying, a write whose reply
        would exceed it)."""
        if not write:
            return self.metadata
        return (*(self.metadata or ()), (REQUEST_ID_KEY, secrets.token_hex(16)), _RECEIVE_LIMIT)

    def unary(self, method: str, request: bytes, *, idempotent: bool = False, write: bool = False) -> bytes:
        """One unary call, retried on UNAVAILABLE if idempotent or a write (made exactly-once by its id)."""
        metadata = self.call_metadata(write)
        with self.deadline:
            for attempt in itertools.count():
                stub = self.unary_stub(method)
                try:
                    response: bytes = stub(
                        request,
                        timeout=self.deadline.left(),
                        metadata=metadata,
                        wait_for_ready=self._settings.wait_for_ready,
                    )
                    return response
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                    retry = (idempotent or write) and isinstance(error, UnavailableError)
                    if not (retry and self.may_retry(attempt)):
                        raise error from None
        raise AssertionError("unreachable")

    def may_retry(self, attempt: int) -> bool:
        """Waits before retrying an UNAVAILABLE call, if retries and the call's deadline leave room."""
        pause = _RETRY_BACKOFF * 4**attempt
        left = self.deadline.left()
        if attempt >= _RETRIES or (left is not None and left <= pause):
            return False
        # A worker that died is replaced within about a second; the next channel may reach another.
        time.sleep(pause)
        return True

    def read_stream(self, request: bytes) -> tuple[VariableInfo, Array]:
        """ReadStream: a variable's info and value in chunks; retried on UNAVAILABLE
        (reads are idempotent)."""
        with self.deadline:
            for attempt in itertools.count():
                stream = self.channel().unary_stream(
                    SERVICE + "ReadStream", request_serializer=None, response_deserializer=None
                )
                try:
                    responses = stream(
                        request,
                        timeout=self.deadline.left(),
                        metadata=self.metadata,
                        wait_for_ready=self._settings.wait_for_ready,
                    )
                    info, value = self._read_chunks(iter(responses))
                except UnavailableError:
                    if not self.may_retry(attempt):
                        raise
                    continue
                assert value is not None
                return info, value
        raise AssertionError("unreachable")

    def write_stream(self, array: Array, header: pb.WriteHeader) -> tuple[VariableInfo, Array | None]:
        """WriteStream: the header, then the value in chunks; the variable's info and, with read_value,
        its value (None: the server did not echo ours). Retried on UNAVAILABLE with the same request id."""
        report = progress.current()  # here: gRPC consumes chunks() in a thread of its own

        def chunks() -> Iterator[bytes]:
            yield pb.WriteChunk(header=header).SerializeToString()
            if report is None:
                yield from wire.data_chunks(array, CHUNK_BYTES)
                return
            left = array.nbytes
            for message in wire.data_chunks(array, CHUNK_BYTES):
                yield message
                report(min(CHUNK_BYTES, left), array.nbytes)
                left -= CHUNK_BYTES

        metadata = self.call_metadata(write=True)
        with self.deadline:
            for attempt in itertools.count():
                stream = self.stream_stream("WriteStream")
                try:
                    responses = stream(
                        chunks(),
                        timeout=self.deadline.left(),
                        metadata=metadata,
                        wait_for_ready=self._settings.wait_for_ready,
                    )
                    return self._read_chunks(iter(responses), expect_value=header.read_value)
                except UnavailableError:
                    if not self.may_retry(attempt):
                        raise
        raise AssertionError("unreachable")

    def _read_chunks(
        self, chunks: Iterator[bytes], *, expect_value: bool = True
    ) -> tuple[VariableInfo, Array | None]:
        report: Callable[[int, int], None] | None = progress.current()
        try:
            first = pb.ReadChunk.FromString(next(chunks))
            info = info_from_proto(first.info)
            if not expect_value or info.shape is None or first.value_is_request:
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
                if report is not None:
                    report(len(data), buffer.nbytes)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        except StopIteration:
            raise InvalidArgumentError("the server's stream ended before the variable's info") from None
        if filled != buffer.nbytes:
            raise InvalidArgumentError(f"the server's stream ended after {filled} of {buffer.nbytes} bytes")
        return info, codec.array_from_buffer(buffer, dtype, info.shape)


def _open(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    # A subchannel pool of its own per channel: grpcio otherwise shares one connection among all
    # channels of a process with equal arguments, and the server's workers balance per connection.
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS[1]),
    ]
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)
