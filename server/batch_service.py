"""The gRPC adapter of Batch: a header, then the values' bytes; every check before the first byte is taken.

The path of a batch's tensor byte: wire.Received (the messages as they came, received before any lock is
taken) -> codec.array_from_buffer (a typed view per value, in place) -> batch.run_batch -> ops (np.copyto
into the segment). Values coming back are framed by wire.ChunkWriter under the variable's lock (one copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc

from tensorps.client import codec, wire
from tensorps.client.codec import CodecError, DType, Shape
from tensorps.server.batch import (
    ASSIGN,
    ASSIGN_ADD,
    ASSIGN_SUB,
    CREATE,
    OP_NAMES,
    WRITES,
    BatchOp,
    Result,
    run_batch,
)
from tensorps.server.messages import info_to_proto
from tensorps.server.ops import Info, Ops, PermissionDenied, ResourceExhausted
from tensorps.server.staging import Reservation
from tensorps.v1 import tensorps_pb2 as pb

CHUNK_BYTES = 1 << 20
_UPDATES = (ASSIGN_ADD, ASSIGN_SUB)


class _Layout(NamedTuple):
    """Where an operation's value lies in the batch's data; `refused`: the op's own limit error (a batch in
    order answers it for that operation alone, as its single call would)."""

    dtype: DType
    shape: Shape
    offset: int
    nbytes: int
    refused: ResourceExhausted | None = None


def _flag(op: pb.BatchOp, field: str, default: bool) -> bool:
    return bool(getattr(op, field)) if op.HasField(field) else default


def _where(index: int, op: pb.BatchOp) -> str:
    return f"operation {index} ({OP_NAMES.get(op.kind, f'kind {op.kind}')} of '{op.name}')"


def plan_header(header: pb.BatchHeader, ops: Ops, *, read_only: bool) -> tuple[list[_Layout | None], int]:
    """Every operation's value layout and the batch's total bytes, refused before any data is received."""
    layouts: list[_Layout | None] = []
    total = 0
    for index, op in enumerate(header.ops):
        try:
            if op.kind not in OP_NAMES:
                raise CodecError(f"unknown batch operation kind {op.kind}")
            if read_only and op.kind in WRITES:
                raise PermissionDenied("a read-only token may not write")
            if op.kind in (ASSIGN, *_UPDATES) and not op.HasField("value"):
                raise CodecError("the operation has no value")
            if not op.HasField("value"):
                layouts.append(None)
                continue
            if op.kind not in (ASSIGN, *_UPDATES, CREATE):
                raise CodecError("this operation takes no value")
            if op.value.tensor_content:
                raise CodecError("a batch value's bytes belong in the stream's data, not in tensor_content")
            dtype, shape = codec.tensor_header_from_proto(op.value)
            refused = None
            try:
                nbytes = ops.check_size(op.name, shape, dtype)
            except ResourceExhausted as exc:
                if header.atomic:
                    raise
                refused, nbytes = exc, codec.nbytes_of(shape, dtype)
            layouts.append(_Layout(dtype, shape, total, nbytes, refused))
            total += nbytes
        except CodecError as exc:
            raise CodecError(f"{_where(index, op)}: {exc}") from None
        except (PermissionDenied, ResourceExhausted) as exc:
            raise type(exc)(f"{_where(index, op)}: {exc}") from None
    budget = ops.store.limits.max_total_bytes
    if total > budget:
        raise ResourceExhausted(
            f"the batch holds {total} bytes of values, more than the server's budget {budget}"
        )
    return layouts, total


def decode_ops(
    header: pb.BatchHeader, layouts: list[_Layout | None], view: Callable[[int, int], Any]
) -> list[BatchOp]:
    """The operations with their values as typed views of the received data, TF's defaults filled in."""
    decoded = []
    for index, (op, layout) in enumerate(zip(header.ops, layouts, strict=True)):
        try:
            value = None
            if layout is not None and layout.refused is not None:
                decoded.append(BatchOp(op.kind, op.name, refused=layout.refused))
                continue
            if layout is not None:
                value = codec.array_from_buffer(
                    view(layout.offset, layout.nbytes), layout.dtype, layout.shape
                )
            dtype = None
            if op.kind == CREATE:
                if layout is not None:
                    if op.dtype and op.dtype != layout.dtype.code:
                        raise CodecError(
                            f"variable '{op.name}' is declared {codec.dtype_from_code(op.dtype).name} but "
                            f"its initial value is {layout.dtype.name}"
                        )
                    dtype = layout.dtype
                elif op.dtype == pb.DT_INVALID:
                    raise CodecError(f"variable '{op.name}' needs a dtype or an initial value")
                else:
                    dtype = codec.dtype_from_code(op.dtype)
            decoded.append(
                BatchOp(
                    kind=op.kind,
                    name=op.name,
                    value=value,
                    dtype=dtype,
                    shape=codec.shape_from_proto(op.shape) if op.HasField("shape") else None,
                    validate_shape=_flag(op, "validate_shape", True),
                    use_locking=_flag(op, "use_locking", op.kind == ASSIGN),
                    read_value=_flag(op, "read_value", True),
                )
            )
        except CodecError as exc:
            raise CodecError(f"{_where(index, op)}: {exc}") from None
    return decoded


def _header(message: bytes, ops: Ops, *, read_only: bool) -> tuple[pb.BatchHeader, list[_Layout | None], int]:
    """The first message's header, every operation checked and its value placed (no data taken yet)."""
    chunk, _data = wire.parse(pb.BatchChunk, message, (15,))
    if not chunk.HasField("header"):
        raise CodecError("the first message of a batch has no header")
    layouts, total = plan_header(chunk.header, ops, read_only=read_only)
    return chunk.header, layouts, total


def receive(
    messages: Iterator[bytes], ops: Ops, *, read_only: bool, staging: Reservation
) -> tuple[list[BatchOp], bool]:
    """A batch's operations from its request stream (BatchStream), and whether it is atomic; its values'
    bytes are reserved in `staging` before they are taken in."""
    first = next(messages, None)
    if first is None:
        raise CodecError("the batch stream is empty: its first message must carry a header")
    header, layouts, total = _header(first, ops, read_only=read_only)
    # The values stay in the messages that brought them (most are viewed in place, ChunkWriter keeps them
    # whole), until ops copy them into the store: memory in transit.
    staging.grow(total)
    received = wire.Received(total, "the batch stream")
    message: bytes | None = first
    while message is not None:
        chunk, data = wire.parse(pb.BatchChunk, message, (15,))
        if message is not first and chunk.HasField("header"):
            raise CodecError("the batch stream has a second header")
        received.add(chunk.offset, data)
        message = next(messages, None)
    received.check_complete()
    return decode_ops(header, layouts, received.view), header.atomic


def receive_one(raw: bytes, ops: Ops, *, read_only: bool) -> tuple[list[BatchOp], bool]:
    """A batch sent as one message (Batch): the header and every value's bytes at once."""
    header, layouts, total = _header(raw, ops, read_only=read_only)
    chunk, data = wire.parse(pb.BatchChunk, raw, (15,))
    if chunk.offset or data.nbytes != total:
        raise CodecError(
            f"the batch has {data.nbytes} bytes of data at offset {chunk.offset}; "
            f"its header needs {total} at 0"
        )
    return decode_ops(header, layouts, lambda offset, nbytes: data[offset : offset + nbytes]), header.atomic


def _run(
    ops: Ops,
    batch: list[BatchOp],
    atomic: bool,
    writer: wire.ChunkWriter,
    request: bytes | None,
    *,
    staging: Reservation,
) -> bytes:
    """Run the batch, the values it returns going to `writer` (reserved in `staging`: an operation whose
    value finds no room fails with RESOURCE_EXHAUSTED, before it is applied); the serialized results."""
    # Bytes reserved before a write (run_batch's reserve) that its consume has not taken yet.
    prepaid = [0]

    def reserve(nbytes: int) -> None:
        staging.grow(nbytes)
        prepaid[0] += nbytes

    def consume(info: Info, view: Any) -> pb.TensorProto:
        if prepaid[0] >= view.nbytes:
            prepaid[0] -= view.nbytes
        else:
            staging.grow(view.nbytes)
        writer.add(view)
        assert info.shape is not None
        return pb.TensorProto.FromString(codec.tensor_head(info.dtype, info.shape))

    results = run_batch(ops, batch, atomic=atomic, consume=consume, request=request, reserve=reserve)
    reply = pb.BatchReply()
    for result in results:
        _result_to_proto(result, reply.results.add())
    return reply.SerializeToString()


def execute(
    ops: Ops, batch: list[BatchOp], atomic: bool, request: bytes | None, staging: Reservation
) -> Iterator[bytes]:
    """Run the batch; the reply stream: every result, then the values' bytes."""
    # Clients accept messages up to 2 GiB: a tensor goes whole, and the client uses it in place.
    writer = wire.ChunkWriter(CHUNK_BYTES, 1 << 30)
    yield _run(ops, batch, atomic, writer, request, staging=staging)
    yield from writer.finish()


def execute_one(
    ops: Ops, batch: list[BatchOp], atomic: bool, request: bytes | None, staging: Reservation
) -> bytes:
    """Run the batch; the reply as one message: every result and the values' bytes."""
    writer = wire.ChunkWriter(1 << 62)  # one data field: the client chose Batch for a small reply
    results = _run(ops, batch, atomic, writer, request, staging=staging)
    data = writer.finish()
    return results + data[0] if data else results


def _result_to_proto(result: Result, out: pb.BatchResult) -> None:
    out.op = result.op
    if result.error is not None:
        out.code = getattr(grpc.StatusCode, result.error.code).value[0]
        out.message = str(result.error)
        return
    if result.info is not None:
        info_to_proto(result.info, out.info)
    out.value_is_request = result.echo
    if result.value is not None:
        out.value.CopyFrom(result.value)
