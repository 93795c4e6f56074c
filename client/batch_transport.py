"""Sending a batch (batch.py's Batch call) to one server: as one message each way, as streams, or with its
values over the bulk side channel (bulk.py); retried on UNAVAILABLE; its reply decoded into outcomes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from tensorps.client import bulk, codec, wire
from tensorps.client.batch import Outcome, Outcomes, encode_header
from tensorps.client.codec import CodecError
from tensorps.client.errors import InternalError, UnavailableError, from_rpc_error, from_status
from tensorps.client.info_cache import InfoCache
from tensorps.client.infos import Array, info_from_proto, own
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import GATHER, ROW_KINDS, reply_estimate
from tensorps.client.transport import CHUNK_BYTES, STREAM_THRESHOLD, Metadata, Transport
from tensorps.v1 import tensorps_pb2 as pb

# A batch whose values or expected reply exceed this many bytes moves them over the server's bulk side
# channel (bulk.py) when it has one: a plain TCP connection instead of gRPC's stream. Measured on loopback
# (README, Performance): from 4 MiB on, bulk is as fast as the stream or faster (2-4x from 16 MiB); over
# TLS, Python's ssl moves ~0.8 GB/s, no faster than gRPC's, and each connection costs a handshake, so it
# pays only for larger batches (BULK_TLS_FACTOR times the threshold).
BULK_THRESHOLD = STREAM_THRESHOLD
BULK_TLS_FACTOR = 8
_READ_KINDS = frozenset((pb.BATCH_OP_READ, pb.BATCH_OP_INFO, pb.BATCH_OP_READ_PREFIX, GATHER))
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class BatchTransport:
    """The Batch calls of a remote Client: over its gRPC transport and its server's bulk channel, sized
    by (and updating) its info cache."""

    def __init__(self, transport: Transport, bulk_channel: bulk.BulkChannel, cache: InfoCache) -> None:
        self._transport = transport
        self._bulk = bulk_channel
        self._cache = cache

    def run(self, ops: Sequence[QueuedOp], *, atomic: bool) -> Outcomes:
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
        transport = self._transport
        metadata = transport.call_metadata(write=not all(op.kind in _READ_KINDS for op in ops))
        with transport.deadline:
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
                    if not (isinstance(error, UnavailableError) and transport.may_retry(attempt)):
                        raise error from None
                except UnavailableError:
                    if not transport.may_retry(attempt):
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
        metadata: Metadata,
    ) -> Outcomes:
        """One attempt of a batch: as one message each way, or as streams."""
        options = self._transport.options(metadata)
        if unary:
            payload = wire.join_data(pb.BatchChunk(header=header).SerializeToString(), arrays)
            reply, data = wire.parse(
                pb.BatchReply, self._transport.unary_stub("Batch")(payload, **options), (15,)
            )
            if data.nbytes != _reply_bytes(reply):
                raise CodecError(f"{data.nbytes} bytes of values, its results announce {_reply_bytes(reply)}")
            return self._outcomes(reply, lambda offset, nbytes: data[offset : offset + nbytes], ops)
        stream = self._transport.stream_stream("BatchStream")
        replies = iter(stream(_batch_messages(header, arrays), **options))
        reply = pb.BatchReply.FromString(next(replies))
        received = wire.Received(_reply_bytes(reply), "the server's batch reply")
        for raw in replies:
            chunk, data = wire.parse(pb.BatchReply, raw, (15,))
            received.add(chunk.offset, data)
        received.check_complete()
        return self._outcomes(reply, received.view, ops)

    def _send_bulk(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[Array],
        ops: Sequence[QueuedOp],
        expected: int | None,
        *,
        metadata: Metadata,
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
        stream = self._transport.stream_stream("BatchStream")
        replies: Any = stream(iter((request,)), **self._transport.options(metadata))
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
            sock = self._bulk.connect(offer.bulk_port, offer.bulk_ticket, self._transport.deadline.left())
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
        return self._outcomes(reply, received.view, ops)

    def _reply_estimate(self, ops: Sequence[QueuedOp]) -> int | None:
        """The bytes of values the reply is expected to hold (sizes last seen of reads); None: unknown."""
        cache = self._cache
        total = 0
        for op in ops:
            if op.kind == pb.BATCH_OP_READ:
                size = cache.sizes.get(op.name)
                if size is None:
                    return None
                total += size
            elif op.kind == pb.BATCH_OP_READ_PREFIX:
                size = cache.prefix_sizes.get(op.name)
                if size is None:
                    return None
                total += size
            elif op.kind in ROW_KINDS:
                size = reply_estimate(op, cache.sizes, cache.row_sizes)
                if size is None:
                    return None
                total += size
            elif op.array is not None and op.read_value:
                total += op.array.nbytes
        return total

    def _outcomes(
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
            info = self._cache.remember(info_from_proto(result.info)) if result.HasField("info") else None
            value = None
            if result.value_is_request:
                array = ops[result.op].array
                assert array is not None
                value = own(array)
            elif result.HasField("value"):
                dtype, shape = codec.tensor_header_from_proto(result.value)
                nbytes = codec.nbytes_of(shape, dtype)
                value = codec.array_from_buffer(view(offset, nbytes), dtype, shape)
                offset += nbytes
            outcomes[result.op].append(Outcome(info, value))
        for op, found in zip(ops, outcomes, strict=True):
            if op.kind == pb.BATCH_OP_DELETE:
                self._cache.forget(op.name)
            elif op.kind == pb.BATCH_OP_READ_PREFIX:
                self._cache.note_prefix(op.name, sum(o.value.nbytes for o in found if o.value is not None))
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
    # A tensor goes whole up to STREAM_THRESHOLD (below every server's message limit), so that the server
    # can use it in place.
    writer = wire.ChunkWriter(CHUNK_BYTES, STREAM_THRESHOLD)
    for array in arrays:
        writer.add(array)
        yield from writer.messages
        writer.messages.clear()
    yield from writer.finish()
