"""A server's place in a cluster: which variables it owns, and the gate that refuses the others.

With --cluster A,B,C and --shard-index I, a variable belongs to this server only if rendezvous hashing of its
name over the cluster's size picks shard I (client/placement.py, the definition every client shares). The
gate is a server interceptor in front of the service, so that every call naming a variable is checked
before the service sees it: the single calls by their request's `name`, a streamed write by its header,
a batch by every operation of its header (a batch with one misrouted operation is refused whole, before
any data is received, and changes nothing). A client of a cluster also names, in the metadata
`tensorps-shard: I/N`, the shard it believes it reaches; a server with another index or cluster size
refuses every such call, so that a client with a stale map fails loudly instead of placing a model anew.

Colocation (an optimizer's slots beside their variable): a name that hashes to another shard is served here
when this store holds its record `.colocated/NAME` (placement.colocation_name); a batch may create such a
name (and its record) when its CREATE operation claims the primary in `slots`, a variable this server
serves and holds. The store is consulted only for names the hash gives to another shard.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from tensorps.client import placement, wire
from tensorps.client.codec import CodecError
from tensorps.server.auth import _abort_handler
from tensorps.server.ops import FailedPrecondition, NotFound, Ops
from tensorps.v1 import tensorps_pb2 as pb

log = logging.getLogger("tensorps.server")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

SHARD_KEY = "tensorps-shard"
_SERVICE = "/tensorps.v1.ParameterServer/"
_HOSTNAME = re.compile(r"^(.+)-(\d+)$")
_OP_NAMES = {kind: pb.BatchOpKind.Name(kind).removeprefix("BATCH_OP_") for kind in pb.BatchOpKind.values()}


class ClusterError(Exception):
    """The cluster flags contradict each other, or the store holds another cluster's variables."""


def parse_members(text: str) -> tuple[str, ...]:
    """--cluster: HOST:PORT members, comma-separated, in shard order."""
    members = tuple(member.strip() for member in text.split(",") if member.strip())
    for member in members:
        host, _, port = member.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"cluster member {member!r} is not HOST:PORT")
    if len(set(members)) != len(members):
        raise ValueError(f"the cluster names a member twice: {text!r}")
    return members


def shard_index_from_hostname(hostname: str) -> int | None:
    """A StatefulSet pod's ordinal: the I of the hostname NAME-I (the first label of a full name)."""
    match = _HOSTNAME.match(hostname.split(".", 1)[0])
    return int(match.group(2)) if match else None


def resolve_shard_index(members: Sequence[str], given: int | None, hostname: str | None = None) -> int:
    """This server's index: --shard-index, else the StatefulSet ordinal of the host's name (a lone server:
    0)."""
    if not members:
        if given not in (None, 0):
            raise ClusterError("--shard-index needs --cluster")
        return 0
    index = given
    if index is None:
        name = hostname if hostname is not None else os.environ.get("HOSTNAME") or socket.gethostname()
        index = shard_index_from_hostname(name)
        if index is None:
            raise ClusterError(
                f"--cluster needs --shard-index: the hostname {name!r} is not NAME-I (a StatefulSet pod)"
            )
    if not 0 <= index < len(members):
        raise ClusterError(f"shard index {index} is outside the cluster's {len(members)} members")
    return index


class Shard:
    """Shard `index` of a cluster of `members` (one member: a lone server, which owns everything)."""

    def __init__(self, members: Sequence[str], index: int) -> None:
        self.members = tuple(members)
        self.index = index
        self.size = max(1, len(self.members))

    def describe(self, index: int) -> str:
        address = f" ({self.members[index]})" if self.members else ""
        return f"shard {index}{address}"

    def refusal(self, name: str) -> str | None:
        """Why this server may not serve variable `name` (None: it owns it)."""
        owner = placement.owner(name, self.size)
        if owner == self.index:
            return None
        return (
            f"variable '{name}' belongs to {self.describe(owner)} of the cluster, not to this server, "
            f"{self.describe(self.index)}: the client's cluster map differs from the server's"
        )

    def check_client_map(self, value: str) -> str | None:
        """Why a client's `tensorps-shard: I/N` does not fit this server (None: it does)."""
        index, _, size = value.partition("/")
        if index.isdigit() and size.isdigit() and (int(index), int(size)) == (self.index, self.size):
            return None
        return (
            f"the client routes to this server as shard {value!r} (index/size) but it is shard "
            f"{self.index} of a cluster of {self.size}: the cluster map changed; reconnect with the "
            "current map (see README, More than one host)"
        )

    def warn_if_elsewhere(self, port: int) -> None:
        """Say so when this server's own entry in --cluster names another port (a likely mix-up)."""
        if self.members and not self.members[self.index].endswith(f":{port}"):
            log.warning(
                "this server is %s in --cluster but listens on port %d: clients will look for it there",
                self.describe(self.index),
                port,
            )

    def check_store(self, ops: Ops) -> None:
        """Refuse to start on a store holding variables another shard owns (a changed map); a colocated
        variable (its record is in the store) is this shard's."""
        names = {info.name for info in ops.list()}
        foreign = [
            name
            for name in sorted(names)
            if placement.owner(name, self.size) != self.index and placement.colocation_name(name) not in names
        ]
        if foreign:
            example = foreign[0]
            raise ClusterError(
                f"the store holds {len(foreign)} variable(s) that {self.describe(self.index)} of a cluster "
                f"of {self.size} does not own (e.g. '{example}' belongs to shard "
                f"{placement.owner(example, self.size)}): the cluster map changed since they were written; "
                "start with the previous map, or re-shard offline (README, More than one host)"
            )


def store_holds(ops: Ops) -> Callable[[str], bool]:
    """Whether the store holds a variable of that name (declared or initialized)."""

    def holds(name: str) -> bool:
        try:
            ops.info(name)
        except NotFound:
            return False
        return True

    return holds


# ---- the gate --------------------------------------------------------------------------------------


def _names_of_batch(header: pb.BatchHeader) -> Iterator[tuple[str, str, str | None]]:
    """(where, name, primary) of every variable an operation names (a prefix read names none): its `name`
    (with the primary a CREATE colocates it with, if it claims one), and the other variables an operation
    may use (the `slots` of optimizer operations), which must live on the same shard."""
    for index, op in enumerate(header.ops):
        if op.kind == pb.BATCH_OP_READ_PREFIX:
            continue
        where = f"operation {index} ({_OP_NAMES.get(op.kind, op.kind)} of '{op.name}'): "
        if op.kind == pb.BATCH_OP_CREATE and len(op.slots) == 1:
            yield where, op.name, op.slots[0]
            continue
        yield where, op.name, None
        for slot in op.slots:
            yield where, slot, None


def _name_field(method: str) -> int | None:
    """The field number of a unary request's top-level `name` (None: the request names no variable)."""
    descriptor = pb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name.get(method)
    if descriptor is None:
        return None
    field = descriptor.input_type.fields_by_name.get("name")
    return field.number if field is not None and field.type == field.TYPE_STRING else None


class ClusterGate(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses, with FAILED_PRECONDITION naming the owner, every call on a variable of another shard."""

    def __init__(self, shard: Shard, holds: Callable[[str], bool] | None = None) -> None:
        self.shard = shard
        # Whether this server's store holds a variable (colocation records); None: nothing is colocated.
        self._holds = holds
        self._fields: dict[str, int | None] = {}

    def _served(self, name: str) -> str | None:
        """Why this server may not serve `name` (None: its hash, or its colocation record, says it may)."""
        reason = self.shard.refusal(name)
        if reason is not None and self._holds is not None and self._holds(placement.colocation_name(name)):
            return None
        return reason

    def _colocation_refusal(self, name: str, primary: str) -> str | None:
        """Why `name` may not be created here beside `primary` (None: this server serves and holds it)."""
        reason = self._served(primary)
        if reason is not None:
            return f"variable '{name}' cannot be colocated with '{primary}' here: {reason}"
        if self._holds is not None and not self._holds(primary):
            return (
                f"variable '{name}' cannot be colocated with '{primary}': '{primary}' does not exist on "
                f"{self.shard.describe(self.shard.index)}"
            )
        return None

    def _refusal(self, names: Iterator[tuple[str, str, str | None]]) -> str | None:
        for where, name, primary in names:
            reason = self._served(name) if primary is None else self._colocation_refusal(name, primary)
            if reason is not None:
                return where + reason
        return None

    def _check_first(self, method: str, raw: bytes) -> str | None:
        """Why the call's first message may not be served here (None: it may)."""
        if method in ("Batch", "BatchStream"):
            chunk, _ = wire.parse(pb.BatchChunk, raw, (15,))
            return self._refusal(_names_of_batch(chunk.header))
        if method == "WriteStream":
            write, _ = wire.parse(pb.WriteChunk, raw, (15,))
            return self._refusal(iter((("", write.header.name, None),)))
        if method not in self._fields:
            self._fields[method] = _name_field(method)
        number = self._fields[method]
        if number is None:
            return None
        name = _string_field(raw, number)
        return self._refusal(iter((("", name, None),))) if name else None

    def _checked_first(self, method: str, raw: bytes) -> str | None:
        try:
            return self._check_first(method, raw)
        except (CodecError, DecodeError, UnicodeDecodeError):
            return None  # malformed: the service answers INVALID_ARGUMENT as it always does

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        full: str = details.method
        if handler is None or not full.startswith(_SERVICE):
            return handler
        method = full.removeprefix(_SERVICE)
        for key, value in details.invocation_metadata or ():
            if key == SHARD_KEY:
                mismatch = self.shard.check_client_map(str(value))
                if mismatch is not None:
                    return _abort_handler(handler, grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        if self.shard.size == 1:
            return handler
        return self._gated(handler, method)

    def _gated(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        gate = self

        if not handler.request_streaming:
            kind = "unary_unary" if handler.unary_unary is not None else "unary_stream"
            behaviour: Any = getattr(handler, kind)

            def unary(raw: bytes, context: grpc.ServicerContext, **options: Any) -> Any:
                refusal = gate._checked_first(method, raw)
                if refusal is not None:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
                return behaviour(raw, context, **options)

            return handler._replace(**{kind: unary})  # type: ignore[attr-defined,no-any-return]

        kind = "stream_stream" if handler.stream_stream is not None else "stream_unary"
        streaming: Any = getattr(handler, kind)

        def stream(messages: Iterator[bytes], context: grpc.ServicerContext, **options: Any) -> Any:
            # The first message is checked as the service takes it (inside the service's idle watch); a
            # refusal is an error of the service's own kind, answered before any data is received.
            def checked() -> Iterator[bytes]:
                first = next(messages, None)
                if first is None:
                    return
                refusal = gate._checked_first(method, first)
                if refusal is not None:
                    raise FailedPrecondition(refusal)
                yield from itertools.chain((first,), messages)

            return streaming(checked(), context, **options)

        return handler._replace(**{kind: stream})  # type: ignore[attr-defined,no-any-return]


def _string_field(raw: bytes, number: int) -> str:
    """The top-level string field `number` of a serialized message, found without parsing the rest (a
    tensor's bytes are skipped, not copied); the last occurrence wins, as protobuf merges them."""
    buf = memoryview(raw)
    found = b""
    pos = 0
    while pos < len(buf):
        key, value_pos = wire._read_varint(buf, pos)
        end = wire._skip(buf, value_pos, key & 7, key >> 3)
        if key >> 3 == number and key & 7 == 2:
            _length, body = wire._read_varint(buf, value_pos)
            found = bytes(buf[body:end])
        pos = end
    return found.decode()
