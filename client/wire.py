"""Tensor bytes on the wire without protobuf's copies (the idea of TF's grpc_tensor_coding.cc).

The generated classes copy a `bytes` field on every set, serialize, parse and get. Here the small part of
a message goes through protobuf and `tensor_content` is appended as its raw tag + length + bytes, which is
a valid encoding of the same message; on receipt a small field scanner cuts the content out as a
zero-copy memoryview and hands protobuf the rest. Other-language clients still see plain protobuf.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message

from tensorps.client.codec import CodecError

_LEN = 2
_START_GROUP, _END_GROUP = 3, 4
_MAX_GROUP_DEPTH = 32
_MAX_VARINT_BYTES = 10


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            break
        byte = buf[pos + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos + i + 1
        shift += 7
    raise CodecError("malformed protobuf: truncated or overlong varint")


def _skip(buf: memoryview, pos: int, wire_type: int, number: int, depth: int = 0) -> int:
    """Position after the value of field `number` of `wire_type` starting at `pos`."""
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == _LEN:
        length, pos = _read_varint(buf, pos)
        end = pos + length
    elif wire_type == 5:
        end = pos + 4
    elif wire_type == _START_GROUP:
        # A (deprecated) group: fields up to the matching end-group tag. Protobuf skips unknown ones too.
        if depth >= _MAX_GROUP_DEPTH:
            raise CodecError("malformed protobuf: groups nested too deeply")
        while True:
            if pos >= len(buf):
                raise CodecError("malformed protobuf: a group runs past the end of the message")
            key, pos = _read_varint(buf, pos)
            if key & 7 == _END_GROUP:
                if key >> 3 != number:
                    raise CodecError("malformed protobuf: mismatched end of group")
                return pos
            pos = _skip(buf, pos, key & 7, key >> 3, depth + 1)
    else:
        raise CodecError(f"malformed protobuf: unexpected wire type {wire_type}")
    if end > len(buf):
        raise CodecError("malformed protobuf: a field runs past the end of the message")
    return end


def _cut(buf: memoryview, field: int, inner: Sequence[int]) -> tuple[list[Any], memoryview | None]:
    """Split `buf` into the parts without LEN field `field` (recursing through `inner`) and its payload.

    Repeated occurrences are all removed and the last payload wins, as protobuf merges them.
    """
    parts: list[Any] = []
    payload: memoryview | None = None
    pos = start = 0
    while pos < len(buf):
        key, value_pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise CodecError("malformed protobuf: field number 0")
        end = _skip(buf, value_pos, wire_type, number)
        if number == field and wire_type == _LEN:
            parts.append(buf[start:pos])
            _length, body = _read_varint(buf, value_pos)
            if inner:
                sub_parts, sub_payload = _cut(buf[body:end], inner[0], inner[1:])
                if sub_payload is not None:
                    payload = sub_payload
                sub = b"".join(sub_parts)
                parts.append(_tag(field, _LEN) + encode_varint(len(sub)) + sub)
            else:
                payload = buf[body:end]
            start = end
        pos = end
    parts.append(buf[start:])
    return parts, payload


def detach(raw: bytes, path: Sequence[int]) -> tuple[bytes, memoryview]:
    """Cut the bytes field at `path` (field numbers, outermost first) out of a serialized message.

    Returns the message without that field (small: parse it with protobuf) and a zero-copy view of the
    field's bytes (empty if absent).
    """
    parts, payload = _cut(memoryview(raw), path[0], path[1:])
    return b"".join(parts), payload if payload is not None else memoryview(b"")


def frame(prefix: bytes, field: int, tensor_head: bytes, content_field: int, content: Any) -> bytes:
    """`prefix` + a LEN field `field` holding `tensor_head` followed by bytes field `content_field`.

    The content (any buffer) is copied exactly once, into the returned message.
    """
    if isinstance(content, np.ndarray):
        # A byte view: memoryview cannot export every dtype (bfloat16), bytes.join needs no format.
        content = content.reshape(-1).view(np.uint8)
    view = memoryview(content)
    content_key = _tag(content_field, _LEN) + encode_varint(view.nbytes)
    body_length = len(tensor_head) + len(content_key) + view.nbytes
    outer = _tag(field, _LEN) + encode_varint(body_length) if field else b""
    return b"".join((prefix, outer, tensor_head, content_key, view))


# Below this size protobuf's C parser beats the Python field scanner, and copying the content is cheap.
SMALL_MESSAGE = 64 << 10
M = TypeVar("M", bound=Message)


def parse(message_type: type[M], raw: bytes, path: Sequence[int]) -> tuple[M, memoryview]:
    """Parse `raw` as `message_type`, returning the bytes field at `path` separately (zero-copy if large).

    In the returned message that field is empty or absent; use the second element instead.
    """
    if len(raw) <= SMALL_MESSAGE:
        message = message_type.FromString(raw)
        holder: Any = message
        names = _field_names(message_type, tuple(path))
        for name in names[:-1]:
            if not holder.HasField(name):
                return message, memoryview(b"")
            holder = getattr(holder, name)
        return message, memoryview(getattr(holder, names[-1]))
    rest, content = detach(raw, path)
    return message_type.FromString(rest), content


_FIELD_NAMES: dict[tuple[str, tuple[int, ...]], list[str]] = {}


def _field_names(message_type: type[Message], path: tuple[int, ...]) -> list[str]:
    key = (message_type.DESCRIPTOR.full_name, path)
    names = _FIELD_NAMES.get(key)
    if names is None:
        names = []
        descriptor: Any = message_type.DESCRIPTOR
        for number in path:
            field = descriptor.fields_by_number[number]
            names.append(field.name)
            descriptor = field.message_type
        _FIELD_NAMES[key] = names
    return names


def data_chunks(array: Any, chunk_bytes: int) -> Iterator[bytes]:
    """An array's bytes as `offset = 2, data = 15` messages of at most `chunk_bytes` each, in order.

    ReadChunk and WriteChunk share those field numbers, so the same messages serve both streams.
    """
    flat = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    for offset in range(0, flat.nbytes, chunk_bytes):
        head = _tag(2, 0) + encode_varint(offset) if offset else b""
        yield frame(head, 0, b"", 15, flat[offset : offset + chunk_bytes])


def _data_message(offset: int, pieces: Sequence[Any], nbytes: int) -> bytes:
    head = _tag(2, 0) + encode_varint(offset) if offset else b""
    return b"".join((head, _tag(15, _LEN), encode_varint(nbytes), *pieces))


def _flat_bytes(array: Any) -> memoryview:
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return memoryview(array).cast("B")


def join_data(prefix: bytes, arrays: Sequence[Any]) -> bytes:
    """`prefix` followed by one `data = 15` field holding the arrays' bytes concatenated (one copy)."""
    views = [_flat_bytes(array) for array in arrays]
    total = sum(view.nbytes for view in views)
    return b"".join((prefix, _tag(15, _LEN), encode_varint(total), *views))


class ChunkWriter:
    """Many tensors' bytes, concatenated, as `offset = 2, data = 15` messages.

    Small tensors share messages of up to `chunk_bytes`, and none is split: one that does not fit the
    message being filled starts the next. A tensor of `chunk_bytes` or more gets messages of its own, each
    at most `max_bytes` (one, when the peer's message limit allows). So a receiver can view nearly every
    tensor in place in the message that brought it (Received).

    `add` copies what it is given before it returns (a large tensor straight into its messages, a small
    one into the parts of the next), so that a caller may add a view of shared memory under a lock and
    release the lock afterwards.
    """

    def __init__(self, chunk_bytes: int, max_bytes: int | None = None) -> None:
        self.chunk_bytes = chunk_bytes
        self.max_bytes = max(chunk_bytes, max_bytes or 0)
        self.messages: list[bytes] = []
        self.nbytes = 0  # bytes added so far
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def add(self, array: Any) -> None:
        flat = _flat_bytes(array)
        size = flat.nbytes
        if size >= self.chunk_bytes:
            self.flush()
            for pos in range(0, size, self.max_bytes):
                piece = flat[pos : pos + self.max_bytes]
                self.messages.append(_data_message(self.nbytes, (piece,), piece.nbytes))
                self.nbytes += piece.nbytes
            return
        if self._pending_bytes + size > self.chunk_bytes:
            self.flush()
        if size:
            self._pending.append(bytes(flat))
            self._pending_bytes += size

    def flush(self) -> None:
        if self._pending:
            self.messages.append(_data_message(self.nbytes, self._pending, self._pending_bytes))
            self.nbytes += self._pending_bytes
            self._pending, self._pending_bytes = [], 0

    def finish(self) -> list[bytes]:
        self.flush()
        return self.messages

    def joined(self, prefix: bytes) -> bytes:
        """`prefix` and everything added as one data field, in one message (the tensors copied once more,
        by this join; for a writer that never had to start a second message)."""
        assert not self.messages, "joined() is for a writer whose data fits one message"
        return join_data(prefix, self._pending) if self._pending else prefix


# Tensors smaller than this are packed together before they are sent over a socket (one send each would
# cost a system call and a TCP segment per tensor).
SMALL_PIECE = 256 << 10
MIN_ARENA = 1 << 20


class Gather:
    """Many tensors' bytes, concatenated, as a few buffers to send over a socket in order (the bulk channel).

    Without `alloc`, a tensor of `small` bytes or more is kept as it is (a view, not copied) and smaller ones
    are packed together (copied). With `alloc(nbytes)` (a uint8 array of at least `nbytes`), every tensor is
    copied into such arenas as it is added (numpy's copy, which lets other threads run), so that a caller may
    add a view of shared memory under a lock and release the lock afterwards; arenas grow geometrically and
    `arenas` lists them for reuse once sent.

    Buffers go to `emit` (default: the list finish() returns); with an arena, as soon as `flush` bytes are
    ready, so that a sender thread can send them while the caller copies the next tensors.
    """

    def __init__(
        self,
        small: int = SMALL_PIECE,
        alloc: Callable[[int], Any] | None = None,
        emit: Callable[[Any], None] | None = None,
        flush: int = MIN_ARENA,
    ) -> None:
        self.small = small
        self.flush = flush
        self.nbytes = 0
        self.arenas: list[Any] = []
        self._alloc = alloc
        self._pieces: list[Any] = []
        self._emit = emit if emit is not None else self._pieces.append
        self._packed = bytearray()
        self._arena: Any = None
        self._start = self._used = 0

    def add(self, array: Any) -> None:
        flat = _flat_bytes(array)
        size = flat.nbytes
        if not size:
            return
        self.nbytes += size
        if self._alloc is not None:
            if self._arena is None or self._used + size > self._arena.nbytes:
                self._close_arena()
                self._arena = self._alloc(max(size, MIN_ARENA, 2 * self.nbytes))
                self.arenas.append(self._arena)
            np.copyto(self._arena[self._used : self._used + size], np.frombuffer(flat, np.uint8))
            self._used += size
            if self._used - self._start >= self.flush:
                self._emit(self._arena[self._start : self._used].data)
                self._start = self._used
        elif size >= self.small:
            self._flush_packed()
            self._emit(flat)
        else:
            self._packed += flat
            if len(self._packed) >= self.small:
                self._flush_packed()

    def _flush_packed(self) -> None:
        if self._packed:
            self._emit(self._packed)
            self._packed = bytearray()

    def _close_arena(self) -> None:
        if self._arena is not None and self._used > self._start:
            self._emit(self._arena[self._start : self._used].data)
        self._arena, self._start, self._used = None, 0, 0

    def finish(self) -> list[Any]:
        """Emit what is left; the buffers to send, in order, when no `emit` was given."""
        self._flush_packed()
        self._close_arena()
        return self._pieces


class Received:
    """`offset`/`data` chunks of a known number of bytes, in order and without gaps, kept as they came.

    A tensor that lies within one chunk is viewed in place (no copy: ChunkWriter sends nearly every tensor
    so); one that spans chunks is joined, copied once.
    """

    def __init__(self, nbytes: int, what: str) -> None:
        self.nbytes = nbytes
        self.filled = 0
        self.what = what
        self._starts: list[int] = []
        self._chunks: list[memoryview] = []

    def add(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        if offset != self.filled:
            raise CodecError(f"{self.what}: chunk at offset {offset}, expected {self.filled}")
        if self.filled + view.nbytes > self.nbytes:
            raise CodecError(f"{self.what}: more than the {self.nbytes} bytes its header announced")
        if view.nbytes:
            self._starts.append(offset)
            self._chunks.append(view)
            self.filled += view.nbytes

    def check_complete(self) -> None:
        if self.filled != self.nbytes:
            raise CodecError(f"{self.what} ended after {self.filled} of {self.nbytes} bytes")

    def view(self, offset: int, nbytes: int) -> Any:
        """The bytes [offset, offset + nbytes) of the received data (read-only)."""
        if not nbytes:
            return memoryview(b"")
        index = bisect.bisect_right(self._starts, offset) - 1
        within = offset - self._starts[index]
        chunk = self._chunks[index]
        if within + nbytes <= chunk.nbytes:
            return chunk[within : within + nbytes]
        parts = []
        while nbytes:
            piece = self._chunks[index][within : within + nbytes]
            parts.append(piece)
            nbytes -= piece.nbytes
            index, within = index + 1, 0
        return b"".join(parts)
