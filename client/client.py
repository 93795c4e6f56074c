"""The thin client: numpy arrays in, numpy arrays out, typed exceptions, any tensor size."""

from __future__ import annotations

import itertools
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import numpy as np

from tensorps.client import arrays, bulk, codec, progress, wire
from tensorps.client.batch import BatchCalls, Outcome, Outcomes, encode_header
from tensorps.client.codec import CodecError, DType, Shape
from tensorps.client.errors import (
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    TensorPSError,
    UnavailableError,
    UsageError,
    from_rpc_error,
    from_status,
)
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import GATHER, ROW_KINDS, RowCalls, reply_estimate, returns_value
from tensorps.client.snapshot import SnapshotCalls
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]
_SERVICE = "/tensorps.v1.ParameterServer/"
# Above this many bytes a tensor travels as a stream of chunks instead of one message.
STREAM_THRESHOLD = 4 << 20
# A batch whose values or expected reply exceed this many bytes moves them over the server's bulk side
# channel (bulk.py) when it has one: a plain TCP connection instead of gRPC's stream. Measured on loopback
# (README, Performance): from 4 MiB on, bulk is as fast as the stream or faster (2-4x from 16 MiB); over
# TLS, Python's ssl moves ~0.8 GB/s, no faster than gRPC's, and each connection costs a handshake, so it
# pays only for larger batches (BULK_TLS_FACTOR times the threshold).
BULK_THRESHOLD = STREAM_THRESHOLD
BULK_TLS_FACTOR = 8
# How many prefixes' last reply sizes a client keeps (read_prefix batches: bulk or not).
_PREFIXES_KEPT = 1024
CHUNK_BYTES = 1 << 20
_MAX_MESSAGE = 2**31 - 1
_RECEIVE_LIMIT = ("tensorps-max-receive-bytes", str(_MAX_MESSAGE))
_RETRIES = 3
_RETRY_BACKOFF = 0.05
# Metadata carrying a write's request id (32 hex digits), repeated by its retries (see the .proto).
REQUEST_ID_KEY = "tensorps-request-id"
_READ_KINDS = frozenset((pb.BATCH_OP_READ, pb.BATCH_OP_INFO, pb.BATCH_OP_READ_PREFIX, GATHER))
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# gRPC reconnects to a server that went away after 1 s, then 1.6x longer each time up to 120 s: after a
# 15 s outage a client noticed the server was back 8 s late. Retry connecting within a second instead.
_RECONNECT_BACKOFF_MS = (100, 1000)
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


def _info(proto: pb.VariableInfo) -> VariableInfo:
    return VariableInfo(
        name=proto.name,
        dtype=codec.dtype_from_code(proto.dtype).numpy,
        shape=codec.shape_from_proto(proto.shape),
        initialized=proto.initialized,
        version=proto.version,
    )


# ---- the API boundary: arguments and options are checked here, once, for both transports -------------

_TOKEN = re.compile(r"[\x20-\x7e]*")  # what gRPC accepts in a header value (else INTERNAL at every call)
_PEM = {
    "root_certificates": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*CERTIFICATE-----"),
    "certificate_chain": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*CERTIFICATE-----"),
    "private_key": re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
}


def _check_name(name: object) -> str:
    """A variable name: a str (else UsageError: nothing is sent), valid as the server checks names."""
    if not isinstance(name, str):
        raise UsageError(f"a variable name must be a str, not {type(name).__name__} ({name!r:.60})")
    try:
        codec.validate_name(name)
    except CodecError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return name


def _check_flag(value: object, what: str) -> bool:
    # A str such as "no" would otherwise be truthy on one transport and a protobuf TypeError on the other.
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise UsageError(f"{what} must be a bool, not {type(value).__name__} ({value!r:.60})")


def _check_options(
    *,
    token: object,
    root_certificates: object,
    certificate_chain: object,
    private_key: object,
    timeout: object,
    channels: object,
    wait_for_ready: object,
) -> None:
    """Client options, checked before any reaches gRPC: grpcio aborts the whole Python process on a
    certificate chain without its private key (and the other way round), and fails late on the rest."""
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise UsageError("token must be a str of printable ASCII characters")
    pems = {"root_certificates": root_certificates, "certificate_chain": certificate_chain}
    pems["private_key"] = private_key
    for what, pem in pems.items():
        if pem is None:
            continue
        if not isinstance(pem, bytes):
            raise UsageError(f"{what} must be PEM bytes (open(path, 'rb').read()), not {type(pem).__name__}")
        if not _PEM[what].search(pem):
            kind = "PRIVATE KEY" if what == "private_key" else "CERTIFICATE"
            raise UsageError(f"{what} is not PEM: it has no '-----BEGIN ...{kind}-----' line")
        if b"ENCRYPTED PRIVATE KEY" in pem or b"Proc-Type: 4,ENCRYPTED" in pem:
            raise UsageError(f"{what} is encrypted; gRPC needs an unencrypted private key")
    if (certificate_chain is None) != (private_key is None):
        given, missing = ("private_key", "certificate_chain")
        if private_key is None:
            given, missing = missing, given
        raise UsageError(f"{given} was given without {missing}: mutual TLS needs both")
    if timeout is not None and not (
        isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < math.inf
    ):
        raise UsageError(f"timeout must be a positive number of seconds or None, not {timeout!r:.60}")
    if not (isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1):
        raise UsageError(f"channels must be an int of at least 1, not {channels!r:.60}")
    _check_flag(wait_for_ready, "wait_for_ready")


class _CallDeadline:
    """Per thread, the deadline of the API call in progress: its RPCs, retries and follow-up calls share
    one Client.timeout (each attempt used to get the whole timeout again). Nested scopes join the
    outermost one; a scope is cheap enough for every call (a class, not @contextmanager)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._local = threading.local()

    def __enter__(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            timeout = self._client.timeout
            local.deadline = None if timeout is None else time.monotonic() + timeout
        local.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        self._local.depth -= 1

    def left(self) -> float | None:
        """Seconds left for the next RPC of the call in progress (None: no timeout)."""
        if not getattr(self._local, "depth", 0):
            return self._client.timeout  # outside any call's scope: the RPC is a call of its own
        deadline: float | None = self._local.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())


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
        _check_options(
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
        self._deadline = _CallDeadline(self)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        credentials = None
        if root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        self._channels = [self._open(credentials) for _ in range(channels)]
        self._bulk = bulk.BulkChannel(
            self.target,
            tls=credentials is not None,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        self._next = itertools.count()
        self._stubs: dict[tuple[int, str], grpc.UnaryUnaryMultiCallable] = {}  # type: ignore[type-arg]
        self._dtypes: dict[str, DType] = {}
        self._sizes: dict[str, int] = {}
        self._prefix_sizes: dict[str, int] = {}  # bytes a read_prefix batch's prefix read last time
        self._row_sizes: dict[str, int] = {}  # bytes per index of a variable's last gather
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _open(self, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
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
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    def close(self) -> None:
        self._close_background()
        self._closed = True
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

    @staticmethod
    def _checked_flag(value: object, what: str) -> bool:
        """The API boundary of a bool flag (pipelines check theirs here too)."""
        return _check_flag(value, what)

    def _checked(self, name: object) -> str:
        """The API boundary of every call that names a variable, for both transports."""
        self._check_open()
        return _check_name(name)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"the client of {self.target} is closed")

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
        """The call's metadata; a write carries a fresh request id, which its retries repeat, and the
        largest reply this client accepts (the server refuses, before applying, a write whose reply
        would exceed it)."""
        if not write:
            return self._metadata
        return (*(self._metadata or ()), (REQUEST_ID_KEY, secrets.token_hex(16)), _RECEIVE_LIMIT)

    def _unary(self, method: str, request: bytes, *, idempotent: bool = False, write: bool = False) -> bytes:
        """One unary call, retried on UNAVAILABLE if idempotent or a write (made exactly-once by its id)."""
        metadata = self._call_metadata(write)
        with self._deadline:
            for attempt in itertools.count():
                stub = self._unary_stub(method)
                try:
                    response: bytes = stub(
                        request,
                        timeout=self._deadline.left(),
                        metadata=metadata,
                        wait_for_ready=self.wait_for_ready,
                    )
                    return response
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                    retry = (idempotent or write) and isinstance(error, UnavailableError)
                    if not (retry and self._may_retry(attempt)):
                        raise error from None
        raise AssertionError("unreachable")

    def _may_retry(self, attempt: int) -> bool:
        """Waits before retrying an UNAVAILABLE call, if retries and the call's deadline leave room."""
        pause = _RETRY_BACKOFF * 4**attempt
        left = self._deadline.left()
        if attempt >= _RETRIES or (left is not None and left <= pause):
            return False
        # A worker that died is replaced within about a second; the next channel may reach another.
        time.sleep(pause)
        return True

    def _read_chunks(
        self, chunks: Iterator[bytes], *, expect_value: bool = True
    ) -> tuple[VariableInfo, Array | None]:
        report = progress.current()
        try:
            first = pb.ReadChunk.FromString(next(chunks))
            info = _info(first.info)
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
        """Array data (numpy, `__dlpack__`, `__array__`: arrays.py) is sent as it is (never cast); Python
        values take the variable's dtype losslessly (`dtype`, else the cached or fetched one). The name has
        been checked. Every method that takes a value converts it here."""
        try:
            array = arrays.as_array(value)
            if array is not None:
                codec.dtype_of(array.dtype)
                return codec.as_wire_array(array)
            if dtype is None:
                dtype = self._dtypes.get(name) or codec.dtype_of(self._remember(self._get_info(name)).dtype)
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
        return _info(pb.GetVariableResponse.FromString(response).info)

    def is_initialized(self, name: str) -> bool:
        return self.info(name).initialized

    def _list(self, prefix: str) -> list[VariableInfo]:  # before list(), which hides the builtin
        request = pb.ListVariablesRequest(prefix=prefix).SerializeToString()
        response = pb.ListVariablesResponse.FromString(self._unary("ListVariables", request, idempotent=True))
        return [_info(v) for v in response.variables]

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
        p = pb.ServerInfo.FromString(raw)
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
        )

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
        size = self._sizes.get(name)
        if size is None or size <= STREAM_THRESHOLD:
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
        with self._deadline:
            for attempt in itertools.count():
                stream = self._channel().unary_stream(
                    _SERVICE + "ReadStream", request_serializer=None, response_deserializer=None
                )
                try:
                    responses = stream(
                        request,
                        timeout=self._deadline.left(),
                        metadata=self._metadata,
                        wait_for_ready=self.wait_for_ready,
                    )
                    info, value = self._read_chunks(iter(responses))
                except UnavailableError:
                    if not self._may_retry(attempt):
                        raise
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
        flags = WriteFlags(
            _check_flag(use_locking, "use_locking"),
            _check_flag(read_value, "read_value"),
            _check_flag(validate_shape, "validate_shape"),
        )
        return self._write(name, value, pb.WRITE_OP_ASSIGN, flags)

    def assign_add(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignAdd: same shape, no broadcasting; integer overflow wraps."""
        flags = WriteFlags(_check_flag(use_locking, "use_locking"), _check_flag(read_value, "read_value"))
        return self._write(name, delta, pb.WRITE_OP_ASSIGN_ADD, flags)

    def assign_sub(self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True) -> Any:
        """TF's AssignSub: same shape, no broadcasting; integer overflow wraps."""
        flags = WriteFlags(_check_flag(use_locking, "use_locking"), _check_flag(read_value, "read_value"))
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
            cached = self._dtypes.get(name)
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
        info = self._remember(_info(response.info))
        if not flags.read_value:
            return info
        if response.value_is_request:
            return _own(array)  # the value after the write is the one we sent: not echoed
        return codec.tensor_from_parts(response.value, content)

    def _write_stream(self, array: Array, header: pb.WriteHeader) -> Any:
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

        metadata = self._call_metadata(write=True)
        with self._deadline:
            for attempt in itertools.count():
                stream = self._channel().stream_stream(
                    _SERVICE + "WriteStream", request_serializer=None, response_deserializer=None
                )
                try:
                    responses = stream(
                        chunks(),
                        timeout=self._deadline.left(),
                        metadata=metadata,
                        wait_for_ready=self.wait_for_ready,
                    )
                    info, value = self._read_chunks(iter(responses), expect_value=header.read_value)
                except UnavailableError:
                    if not self._may_retry(attempt):
                        raise
                    continue
                self._remember(info)
                if not header.read_value:
                    return info
                return value if value is not None else _own(array)  # the server did not echo our value
        raise AssertionError("unreachable")

    # ---- batches (batch.py) --------------------------------------------------------------------

    def _run_batch(self, ops: Sequence[QueuedOp], *, atomic: bool) -> Outcomes:
        """One Batch call: every operation's outcomes, in order; retried on UNAVAILABLE (writes by id).

        A batch whose values and expected reply fit STREAM_THRESHOLD goes as one message each way (Batch:
        a third of BatchStream's fixed cost); anything larger, or a reply of unknown size, streams.
        """
        header, arrays = encode_header(ops, atomic)
        sent = sum(a.nbytes for a in arrays)
        reply = self._reply_estimate(ops)
        unary = sent <= STREAM_THRESHOLD and reply is not None and reply <= STREAM_THRESHOLD
        # A reply of unknown size (a first read, a new prefix) may be a model: bulk, if the server offers it.
        threshold = BULK_THRESHOLD * (BULK_TLS_FACTOR if self._bulk.tls else 1)
        large = sent > threshold or reply is None or reply > threshold
        # Reads are idempotent; writes carry a request id (the server applies none of them twice).
        metadata = self._call_metadata(write=not all(op.kind in _READ_KINDS for op in ops))
        with self._deadline:
            for attempt in itertools.count():
                try:
                    if large and not unary and self._bulk.usable:
                        try:
                            return self._send_bulk(header, arrays, ops, reply, metadata=metadata)
                        except bulk.BulkUnusable:
                            pass  # nothing was applied; the channel is off from now on: resend over gRPC
                    return self._send_batch(header, arrays, ops, unary=unary, metadata=metadata)
                except grpc.RpcError as exc:
                    error = from_rpc_error(exc)
                    if not (isinstance(error, UnavailableError) and self._may_retry(attempt)):
                        raise error from None
                except UnavailableError:
                    if not self._may_retry(attempt):
                        raise
                except StopIteration:
                    raise InternalError("the server's batch reply ended before its results") from None
                except CodecError as exc:
                    raise InternalError(f"the server's batch reply is malformed: {exc}") from None
        raise AssertionError("unreachable")

    def _send_batch(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[Array],
        ops: Sequence[QueuedOp],
        *,
        unary: bool,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> Outcomes:
        """One attempt of a batch: as one message each way, or as streams."""
        options: dict[str, Any] = {
            "timeout": self._deadline.left(),
            "metadata": metadata,
            "wait_for_ready": self.wait_for_ready,
        }
        if unary:
            payload = wire.join_data(pb.BatchChunk(header=header).SerializeToString(), arrays)
            reply, data = wire.parse(pb.BatchReply, self._unary_stub("Batch")(payload, **options), (15,))
            if data.nbytes != _reply_bytes(reply):
                raise CodecError(f"{data.nbytes} bytes of values, its results announce {_reply_bytes(reply)}")
            return self._batch_outcomes(reply, lambda offset, nbytes: data[offset : offset + nbytes], ops)
        stream = self._channel().stream_stream(
            _SERVICE + "BatchStream", request_serializer=None, response_deserializer=None
        )
        replies = iter(stream(_batch_messages(header, arrays), **options))
        reply = pb.BatchReply.FromString(next(replies))
        received = wire.Received(_reply_bytes(reply), "the server's batch reply")
        for raw in replies:
            chunk, data = wire.parse(pb.BatchReply, raw, (15,))
            received.add(chunk.offset, data)
        received.check_complete()
        return self._batch_outcomes(reply, received.view, ops)

    def _send_bulk(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[Array],
        ops: Sequence[QueuedOp],
        expected: int | None,
        *,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> Outcomes:
        """One attempt of a batch over the bulk channel (BatchHeader.bulk in the .proto): the header over
        gRPC, the values both ways over a TCP connection that presents the call's ticket.

        BulkUnusable: the server has no bulk channel or its port cannot be used; the call was cancelled
        before any data moved (the channel is off for this client from now on). UnavailableError: the
        connection failed during the transfer; the call was cancelled (a retry repeats its request id).
        """
        header.bulk = True
        request = pb.BatchChunk(header=header).SerializeToString()
        header.bulk = False  # a resend without bulk uses the same header
        stream = self._channel().stream_stream(
            _SERVICE + "BatchStream", request_serializer=None, response_deserializer=None
        )
        replies: Any = stream(
            iter((request,)),
            timeout=self._deadline.left(),
            metadata=metadata,
            wait_for_ready=self.wait_for_ready,
        )
        try:
            try:
                offer = pb.BatchReply.FromString(next(replies))
            except grpc.RpcError:
                if replies.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._bulk.disable(str(replies.details()))
                    raise bulk.BulkUnusable(self._bulk.reason) from None
                raise
            if not offer.bulk_ticket:
                raise CodecError("the server's first bulk reply carries no ticket")
            sock = self._bulk.connect(offer.bulk_port, offer.bulk_ticket, self._deadline.left())
            with sock:
                # A call that fails (the server's error, the deadline) stops the transfer at once.
                replies.add_done_callback(lambda call: bulk.shut_unless_ok(call, sock))
                try:
                    bulk.send_values(sock, arrays)
                except OSError as exc:
                    # The server closed the connection while taking the values: it refused the batch (a
                    # limit, bad input), and its status is the answer, not the broken connection.
                    try:
                        next(replies)
                    except grpc.RpcError:
                        if replies.code() not in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                            raise
                    except StopIteration:
                        pass
                    raise UnavailableError(f"the bulk transfer failed: {exc}") from None
                try:
                    chunks = bulk.receive_values(sock, expected)
                except OSError as exc:
                    raise UnavailableError(f"the bulk transfer failed: {exc}") from None
            # The results come after the values (the call's error, if the run failed).
            reply = pb.BatchReply.FromString(next(replies))
            for _extra in replies:
                raise CodecError("the server's bulk reply has more than its results")
        except BaseException:
            replies.cancel()
            raise
        received = wire.Received(_reply_bytes(reply), "the server's bulk reply")
        offset = 0
        for chunk in chunks:
            received.add(offset, chunk)
            offset += chunk.nbytes
        received.check_complete()
        return self._batch_outcomes(reply, received.view, ops)

    def _reply_estimate(self, ops: Sequence[QueuedOp]) -> int | None:
        """The bytes of values the reply is expected to hold (sizes last seen of reads); None: unknown."""
        total = 0
        for op in ops:
            if op.kind == pb.BATCH_OP_READ:
                size = self._sizes.get(op.name)
                if size is None:
                    return None
                total += size
            elif op.kind == pb.BATCH_OP_READ_PREFIX:
                size = self._prefix_sizes.get(op.name)
                if size is None:
                    return None
                total += size
            elif op.kind in ROW_KINDS:
                size = reply_estimate(op, self._sizes, self._row_sizes)
                if size is None:
                    return None
                total += size
            elif op.array is not None and op.read_value:
                total += op.array.nbytes
        return total

    # ---- rows and optimizers (rows.py): each call is a batch of one operation ---------------------

    def _row_op(self, op: QueuedOp) -> Any:
        (outcome,) = self._run_batch([op], atomic=False)[0]
        if outcome.error is not None:
            raise outcome.error
        if op.kind == GATHER:
            self._note_rows(op, outcome.value)
        return outcome.value if returns_value(op) else outcome.info

    def _note_rows(self, op: QueuedOp, rows: Array | None) -> None:
        """Remember a gather's bytes per index: the next gather's reply size is then known (a small one
        goes as one message, not over the bulk channel)."""
        if rows is not None and op.inputs[0].size:
            with self._lock:
                self._row_sizes[op.name] = rows.nbytes // op.inputs[0].size

    def _row_value(self, name: str, value: Any) -> Array:
        return self._as_array(name, value)

    def _row_name(self, name: Any) -> str:
        return self._checked(name)

    def _row_flag(self, value: Any, what: str) -> bool:
        return self._checked_flag(value, what)

    def _batch_outcomes(
        self, reply: pb.BatchReply, view: Callable[[int, int], Any], ops: Sequence[QueuedOp]
    ) -> Outcomes:
        """Every operation's outcomes from the reply's results and its values' bytes (`view`)."""
        outcomes: Outcomes = [[] for _ in ops]
        offset = 0
        if any(result.op >= len(ops) for result in reply.results):
            raise CodecError("a result names an operation the batch does not have")
        for result in reply.results:
            if result.code:
                code = _STATUS_BY_NUMBER.get(result.code, grpc.StatusCode.UNKNOWN)
                outcomes[result.op].append(Outcome(error=from_status(code, result.message)))
                continue
            info = self._remember(_info(result.info)) if result.HasField("info") else None
            value = None
            if result.value_is_request:
                array = ops[result.op].array
                assert array is not None
                value = _own(array)
            elif result.HasField("value"):
                dtype, shape = codec.tensor_header_from_proto(result.value)
                nbytes = codec.nbytes_of(shape, dtype)
                value = codec.array_from_buffer(view(offset, nbytes), dtype, shape)
                offset += nbytes
            outcomes[result.op].append(Outcome(info, value))
        for op, found in zip(ops, outcomes, strict=True):
            if op.kind == pb.BATCH_OP_DELETE:
                self._forget(op.name)
            elif op.kind == pb.BATCH_OP_READ_PREFIX:
                size = sum(o.value.nbytes for o in found if o.value is not None)
                with self._lock:
                    if len(self._prefix_sizes) >= _PREFIXES_KEPT:
                        self._prefix_sizes.clear()
                    self._prefix_sizes[op.name] = size
        return outcomes


def _own(array: Array) -> Array:
    """A write's result that is the value it sent: a read-only copy, like a received value (one that does
    not change with the caller's array)."""
    copy = array.copy()
    copy.flags.writeable = False
    return copy


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
    # A tensor goes whole up to STREAM_THRESHOLD (below every server's message limit), so that the server
    # can use it in place.
    writer = wire.ChunkWriter(CHUNK_BYTES, STREAM_THRESHOLD)
    for array in arrays:
        writer.add(array)
        yield from writer.messages
        writer.messages.clear()
    yield from writer.finish()
