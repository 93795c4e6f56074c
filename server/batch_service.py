"""The gRPC adapter of Batch: a header, then the values' bytes; every check before the first byte is taken.

The path of a batch's tensor byte: wire.Received (the messages that brought it, received before any lock is
taken) -> codec.array_from_buffer (a typed view per value) -> batch.run_batch -> ops (np.copyto into the
segment). Values coming back are framed by wire.ChunkWriter under the variable's lock (one copy).

Over the bulk channel (execute_bulk, bulk.py): bulk.receive_into (recv_into one pooled staging buffer for the
whole batch) -> the same decode and run; values coming back are copied by wire.Gather under the variable's
lock into a pooled arena (one copy) and sent from there by bulk.Sender.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
import numpy as np

from tensorps.client import codec, tfproto, wire
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
from tensorps.server.bulk import BulkError, BulkListener, Sender, accept, end_of_data, receive_into
from tensorps.server.messages import info_to_proto
from tensorps.server.ops import Info, Ops, PermissionDenied, ResourceExhausted
from tensorps.server.optimizers import Flags
from tensorps.server.row_ops import ROW_KINDS, RowArgs, input_count, slot_count
from tensorps.server.staging import Reservation
from tensorps.v1 import tensorps_pb2 as pb

CHUNK_BYTES = 1 << 20
# The largest data message of a reply stream, and what such a message holds besides its data.
_WHOLE = 1 << 30
_DATA_OVERHEAD = 32
_SMALLEST = 64 << 10
# The bulk reply's values go to the socket in pieces of about this size as they are copied.
_SEND_PIECE = 4 << 20
_UPDATES = (ASSIGN_ADD, ASSIGN_SUB)


class _Layout(NamedTuple):
    """Where an operation's value lies in the batch's data; `refused`: the op's own limit error (a batch in
    order answers it for that operation alone, as its single call would). `inline`: a value the header
    carries itself (tensor_content or TensorFlow's typed values, checked: tfproto.values), which takes no
    bytes of the data (nbytes 0) and is filled to its shape once the batch's staging holds room for it."""

    dtype: DType
    shape: Shape
    offset: int
    nbytes: int
    refused: ResourceExhausted | None = None
    inline: np.ndarray[Any, Any] | None = None
    # A row op's or optimizer's inputs (BatchOp.inputs): dtype, shape, offset, bytes each.
    inputs: tuple[tuple[DType, Shape, int, int], ...] = ()


def _flag(op: pb.BatchOp, field: str, default: bool) -> bool:
    return bool(getattr(op, field)) if op.HasField(field) else default


def _where(index: int, op: pb.BatchOp) -> str:
    return f"operation {index} ({OP_NAMES.get(op.kind, f'kind {op.kind}')} of '{op.name}')"


def plan_header(
    header: pb.BatchHeader, ops: Ops, *, read_only: bool
) -> tuple[list[_Layout | None], int, int]:
    """Every operation's value layout, the bytes of values the data carries and those of the values the
    header carries (inline), refused before any data is received."""
    layouts: list[_Layout | None] = []
    total = inline_total = 0
    for index, op in enumerate(header.ops):
        try:
            if op.kind not in OP_NAMES:
                raise CodecError(f"unknown batch operation kind {op.kind}")
            if read_only and op.kind in WRITES:
                raise PermissionDenied("a read-only token may not write")
            if op.kind in ROW_KINDS:
                layout = _row_layout(op, ops, total, atomic=header.atomic)
                layouts.append(layout)
                total += layout.nbytes
                continue
            # A CREATE's one slot names the primary it is colocated with (read by the cluster gate).
            if op.inputs or (op.slots and not (op.kind == pb.BATCH_OP_CREATE and len(op.slots) == 1)):
                raise CodecError("only row operations and optimizers take inputs or slots")
            if op.kind in (ASSIGN, *_UPDATES) and not op.HasField("value"):
                raise CodecError("the operation has no value")
            if not op.HasField("value"):
                layouts.append(None)
                continue
            if op.kind not in (ASSIGN, *_UPDATES, CREATE):
                raise CodecError("this operation takes no value")
            dtype, shape = codec.tensor_header_from_proto(op.value)
            refused = None
            try:
                nbytes = ops.check_size(op.name, shape, dtype)
            except ResourceExhausted as exc:
                if header.atomic:
                    raise
                refused, nbytes = exc, codec.nbytes_of(shape, dtype)
            if tfproto.has_values(op.value):
                # TensorFlow's own encoding in the header (tf.make_tensor_proto's output as it is).
                content = op.value.tensor_content
                inline = None if refused else tfproto.values(op.value, content, dtype, shape, what="value")
                layouts.append(_Layout(dtype, shape, total, 0, refused, inline))
                inline_total += 0 if refused else nbytes
                continue
            layouts.append(_Layout(dtype, shape, total, nbytes, refused))
            total += nbytes
        except CodecError as exc:
            raise CodecError(f"{_where(index, op)}: {exc}") from None
        except (PermissionDenied, ResourceExhausted) as exc:
            raise type(exc)(f"{_where(index, op)}: {exc}") from None
    budget = ops.store.limits.max_total_bytes
    if total + inline_total > budget:
        raise ResourceExhausted(
            f"the batch holds {total + inline_total} bytes of values, more than the server's budget {budget}"
        )
    return layouts, total, inline_total


def _row_layout(op: pb.BatchOp, ops: Ops, offset: int, *, atomic: bool) -> _Layout:
    """Where a row op's inputs lie in the batch's data; their sizes checked against the server's limits."""
    if op.HasField("value"):
        raise CodecError("a row operation or optimizer takes `inputs`, not `value`")
    if len(op.inputs) != input_count(op.kind):
        raise CodecError(f"the operation takes {input_count(op.kind)} inputs, got {len(op.inputs)}")
    if len(op.slots) != slot_count(op.kind):
        raise CodecError(f"the operation takes {slot_count(op.kind)} slot variables, got {len(op.slots)}")
    placed = []
    start = offset
    refused = None
    for tensor in op.inputs:
        if tensor.tensor_content or tfproto.has_values(tensor):
            raise CodecError(
                "a row operation's or optimizer's inputs carry their bytes in the batch's data, not in "
                "tensor_content or typed values"
            )
        dtype, shape = codec.tensor_header_from_proto(tensor)
        try:
            nbytes = ops.check_size(op.name, shape, dtype)
        except ResourceExhausted as exc:
            if atomic:
                raise
            refused, nbytes = exc, codec.nbytes_of(shape, dtype)
        placed.append((dtype, shape, offset, nbytes))
        offset += nbytes
    first = placed[0]
    return _Layout(first[0], first[1], start, offset - start, refused, inputs=tuple(placed))


def _row_op(op: pb.BatchOp, layout: _Layout, view: Callable[[int, int], Any]) -> BatchOp:
    inputs = tuple(
        codec.array_from_buffer(view(offset, nbytes), dtype, shape)
        for dtype, shape, offset, nbytes in layout.inputs
    )
    flags = Flags(
        use_nesterov=op.use_nesterov,
        update_slots=_flag(op, "update_slots", True),
        multiply_linear_by_lr=op.multiply_linear_by_lr,
    )
    write_locks = op.kind in (pb.BATCH_OP_SCATTER_UPDATE, pb.BATCH_OP_SCATTER_ND_UPDATE)
    return BatchOp(
        kind=op.kind,
        name=op.name,
        use_locking=_flag(op, "use_locking", write_locks),
        read_value=_flag(op, "read_value", False),
        rows=RowArgs(tuple(op.slots), inputs, op.batch_dims, flags),
    )


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
            if op.kind in ROW_KINDS:
                assert layout is not None
                decoded.append(_row_op(op, layout, view))
                continue
            if layout is not None and layout.inline is not None:
                value = tfproto.expand(layout.inline, layout.dtype, layout.shape)
            elif layout is not None:
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


def _header(
    chunk: pb.BatchChunk, ops: Ops, *, read_only: bool
) -> tuple[pb.BatchHeader, list[_Layout | None], int, int]:
    """The first message's header, every operation checked and its value placed (no data taken yet)."""
    if not chunk.HasField("header"):
        raise CodecError("the first message of a batch has no header")
    layouts, total, inline = plan_header(chunk.header, ops, read_only=read_only)
    return chunk.header, layouts, total, inline


class Planned(NamedTuple):
    """A batch's header, checked, with its values' layout: what is known before any data arrives."""

    header: pb.BatchHeader
    layouts: list[_Layout | None]
    total: int  # bytes of values the data carries
    inline: int  # bytes of the values the header carries, once filled to their shapes


def start(messages: Iterator[bytes], ops: Ops, *, read_only: bool) -> tuple[Planned, bytes]:
    """The first message of a batch stream, its header checked (no data taken yet)."""
    first = next(messages, None)
    if first is None:
        raise CodecError("the batch stream is empty: its first message must carry a header")
    chunk, _data = wire.parse(pb.BatchChunk, first, (15,))
    return Planned(*_header(chunk, ops, read_only=read_only)), first


def receive(
    messages: Iterator[bytes], ops: Ops, *, read_only: bool, staging: Reservation
) -> tuple[list[BatchOp], bool]:
    """A batch's operations from its request stream (BatchStream), and whether it is atomic."""
    planned, first = start(messages, ops, read_only=read_only)
    return receive_rest(planned, first, messages, staging), planned.header.atomic


def receive_rest(
    planned: Planned, first: bytes, messages: Iterator[bytes], staging: Reservation
) -> list[BatchOp]:
    """The operations of a started batch stream, their values received from the stream's data (their bytes
    reserved in `staging` before they are taken in)."""
    header, layouts, total, inline = planned
    # The values stay in the messages that brought them (most are viewed in place, ChunkWriter keeps them
    # whole), until ops copy them into the store: memory in transit.
    staging.grow(total + inline)
    received = wire.Received(total, "the batch stream")
    message: bytes | None = first
    while message is not None:
        chunk, data = wire.parse(pb.BatchChunk, message, (15,))
        if message is not first and chunk.HasField("header"):
            raise CodecError("the batch stream has a second header")
        received.add(chunk.offset, data)
        message = next(messages, None)
    received.check_complete()
    return decode_ops(header, layouts, received.view)


def receive_one(raw: bytes, ops: Ops, *, read_only: bool, staging: Reservation) -> tuple[list[BatchOp], bool]:
    """A batch sent as one message (Batch): the header and every value's bytes at once."""
    chunk, data = wire.parse(pb.BatchChunk, raw, (15,))
    header, layouts, total, inline = _header(chunk, ops, read_only=read_only)
    if header.bulk:
        raise CodecError("a Batch call cannot use the bulk channel: send a bulk batch with BatchStream")
    if chunk.offset or data.nbytes != total:
        raise CodecError(
            f"the batch has {data.nbytes} bytes of data at offset {chunk.offset}; "
            f"its header needs {total} at 0"
        )
    staging.grow(inline)
    return decode_ops(header, layouts, lambda offset, nbytes: data[offset : offset + nbytes]), header.atomic


def _run(
    ops: Ops,
    batch: list[BatchOp],
    atomic: bool,
    writer: wire.ChunkWriter | wire.Gather,
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
        # The value's own shape: a gather's rows are not the variable's shape.
        return pb.TensorProto.FromString(codec.tensor_head(info.dtype, view.shape))

    results = run_batch(ops, batch, atomic=atomic, consume=consume, request=request, reserve=reserve)
    reply = pb.BatchReply()
    for result in results:
        _result_to_proto(result, reply.results.add())
    return reply.SerializeToString()


def execute(
    ops: Ops,
    batch: list[BatchOp],
    atomic: bool,
    request: bytes | None,
    staging: Reservation,
    *,
    receive_limit: int | None = None,
) -> Iterator[bytes]:
    """Run the batch; the reply stream: every result, then the values' bytes. Without `receive_limit`
    (the client's declared tensorps-max-receive-bytes) clients accept messages up to 2 GiB: a tensor goes
    whole, and the client uses it in place; with it, no data message exceeds it (nor, whatever a client
    declares, falls below 64 KiB: a message per byte would cost both sides more than the reply is worth)."""
    most = _WHOLE if receive_limit is None else max(_SMALLEST, min(_WHOLE, receive_limit - _DATA_OVERHEAD))
    writer = wire.ChunkWriter(min(CHUNK_BYTES, most), most)
    yield _run(ops, batch, atomic, writer, request, staging=staging)
    yield from writer.finish()


def execute_bulk(
    planned: Planned,
    ops: Ops,
    listener: BulkListener | None,
    context: grpc.ServicerContext,
    *,
    idle: float,
    request: bytes | None,
    staging: Reservation,
) -> Iterator[bytes]:
    """A batch whose bytes travel over the bulk channel (BatchHeader.bulk): the reply stream is the ticket,
    then every result; the values go both ways over the connection that presents the ticket.

    The staging buffer is taken only once that connection is there (a client that never connects holds
    nothing but its ticket), filled by recv_into, and given back to the pool after the run; a transfer
    that fails drops it. Nothing is applied before every byte arrived. The values the batch returns are
    copied under their locks into a pooled arena and sent from there by a thread of their own while the
    run goes on; the end of the connection's data (a half-close) marks the last, then the results follow.
    """
    if listener is None:
        raise BulkError(
            "this server has no bulk channel (--bulk-port off): send the batch's data in the stream",
            "UNIMPLEMENTED",
        )
    ticket = listener.ticket()
    if not context.add_callback(ticket.cancel):
        ticket.cancel()  # the call has ended already
    gather: wire.Gather | None = None
    try:
        yield pb.BatchReply(bulk_port=ticket.port, bulk_ticket=ticket.secret).SerializeToString()
        remaining = context.time_remaining()
        conn = ticket.wait(idle if remaining is None else min(idle, remaining))
        if conn is None:
            raise BulkError(
                f"no bulk connection presented this call's ticket within {idle:.1f} s", "DEADLINE_EXCEEDED"
            )
        accept(conn, idle)
        staging.grow(planned.total + planned.inline)  # the pooled buffer counts in the staging budget
        buffer = listener.pool.take(planned.total)
        receive_into(conn, buffer, idle)
        view = buffer.data
        batch = decode_ops(planned.header, planned.layouts, lambda at, nbytes: view[at : at + nbytes])
        sender = Sender(conn, idle)
        gather = wire.Gather(alloc=listener.pool.take_at_least, emit=sender.send, flush=_SEND_PIECE)
        try:
            results = _run(ops, batch, planned.header.atomic, gather, request, staging=staging)
            gather.finish()
        except BaseException:
            ticket.cancel()  # the client sees the end of the data early, then the call's error
            with contextlib.suppress(BulkError):
                sender.finish()
            raise
        finally:
            del batch
            listener.pool.give(buffer)
        sender.finish()
        listener.pool.reply_bytes = gather.nbytes
        end_of_data(conn)
        if listener.on_transfer is not None:
            listener.on_transfer(planned.total, gather.nbytes)
        yield results
    finally:
        ticket.close()
        for arena in gather.arenas if gather is not None else ():
            listener.pool.give(arena)


def execute_one(
    ops: Ops, batch: list[BatchOp], atomic: bool, request: bytes | None, staging: Reservation
) -> bytes:
    """Run the batch; the reply as one message: every result and the values' bytes."""
    writer = wire.ChunkWriter(1 << 62)  # one data field: the client chose Batch for a small reply
    results = _run(ops, batch, atomic, writer, request, staging=staging)
    return writer.joined(results)


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
