"""The write-ahead log's records: one per logged write (an atomic batch is one record of many entries).

    record  magic "TPWL" | body length u64 | crc32 u32 (of the entry count and the body) | entry count u32
            | body
    entry   kind u8 | name length u16 | dtype code u8 | initialized u8 | rank i8 (-1: unknown shape)
            | version u64 | extra length u32 | data length u64 | name | dims (i64 each) | extra | data

An entry says what a write left, not how it was asked: PUT (a variable with this descriptor and these
bytes: a create, an assign, a dense optimizer apply, each variable an atomic batch wrote), DELETE, ADD/SUB
(a delta, with the version it made: replaying the same numpy ufunc on the same bytes gives the same bits),
and ROWS (the new values of some rows of a variable, `extra` holding their int64 indices: every scatter and
sparse optimizer apply, which may touch a few rows of a huge table). A new kind is a new number here and a
case in restore.py; readers refuse kinds they do not know.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import Shape

MAGIC = b"TPWL"
PUT, DELETE, ADD, SUB, ROWS = 1, 2, 3, 4, 5
KIND_NAMES = {PUT: "put", DELETE: "delete", ADD: "add", SUB: "sub", ROWS: "rows"}

_RECORD = struct.Struct("<4sQII")
_ENTRY = struct.Struct("<BHBBbQIQ")
_COUNT = struct.Struct("<I")
# writev takes at most IOV_MAX (1024) buffers; records with more parts are joined first.
_MAX_PARTS = 512


class Entry(NamedTuple):
    kind: int
    name: str
    dtype: int = 0
    shape: Shape | None = None
    initialized: bool = False
    version: int = 0
    data: Any = b""  # any buffer: bytes, a numpy array (C-contiguous), a memoryview
    extra: bytes = b""


class DamagedRecord(NamedTuple):
    offset: int
    length: int  # bytes skipped up to the next good record (or the end)


def encode(entries: Sequence[Entry]) -> list[Any]:
    """A record as buffers to write in order (the data is not copied)."""
    body: list[Any] = []
    size = 0
    for e in entries:
        raw_name = e.name.encode()
        rank = -1 if e.shape is None else len(e.shape)
        data = _raw(e.data)
        head = _ENTRY.pack(
            e.kind, len(raw_name), e.dtype, e.initialized, rank, e.version, len(e.extra), len(data)
        )
        dims = struct.pack(f"<{max(rank, 0)}q", *(e.shape or ()))
        body.append(head + raw_name + dims + e.extra)
        body.append(data)
        size += len(body[-2]) + len(data)
    count = _COUNT.pack(len(entries))
    crc = zlib.crc32(count)
    for part in body:
        crc = zlib.crc32(part, crc)
    parts = [_RECORD.pack(MAGIC, size, crc, len(entries)), *body]
    if len(parts) > _MAX_PARTS:
        parts = [b"".join(parts)]
    return parts


def _raw(data: Any) -> Any:
    """A buffer's bytes as a flat byte buffer, without a copy where it is contiguous already."""
    if isinstance(data, bytes | bytearray):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


def _decode_body(body: memoryview, count: int) -> list[Entry]:
    entries = []
    pos = 0
    for _ in range(count):
        kind, name_len, dtype, initialized, rank, version, extra_len, data_len = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        name = bytes(body[pos : pos + name_len]).decode()
        pos += name_len
        shape: Shape | None = None
        if rank >= 0:
            shape = struct.unpack_from(f"<{rank}q", body, pos)
            pos += 8 * rank
        extra = bytes(body[pos : pos + extra_len])
        pos += extra_len
        data = body[pos : pos + data_len]
        pos += data_len
        if pos > len(body):
            raise ValueError("entry runs past its record")
        entries.append(Entry(kind, name, dtype, shape, bool(initialized), version, data, extra))
    if pos != len(body):
        raise ValueError("record holds bytes after its entries")
    return entries


def _record_at(buffer: memoryview, offset: int) -> tuple[list[Entry], int] | None:
    """The entries of the record at `offset` and where the next one starts; None if it is not whole."""
    if offset + _RECORD.size > len(buffer):
        return None
    magic, size, crc, count = _RECORD.unpack_from(buffer, offset)
    start = offset + _RECORD.size
    if magic != MAGIC or start + size > len(buffer):
        return None
    body = buffer[start : start + size]
    if zlib.crc32(body, zlib.crc32(_COUNT.pack(count))) != crc:
        return None
    try:
        return _decode_body(body, count), start + size
    except (ValueError, struct.error, UnicodeDecodeError):
        return None


def scan(buffer: Any) -> tuple[list[list[Entry]], list[DamagedRecord], int]:
    """Every whole record of a log, in order; the damaged stretches skipped; the end of the last whole
    record (what follows it is a torn tail).

    A damaged record (a writer killed amid its write while others appended after it) is skipped up to the
    next record that passes its checksum.
    """
    view = memoryview(buffer)
    records: list[list[Entry]] = []
    damaged: list[DamagedRecord] = []
    offset = end = 0
    while offset < len(view):
        found = _record_at(view, offset)
        if found is not None:
            records.append(found[0])
            offset = end = found[1]
            continue
        resync = _next_good(buffer, offset + 1)
        if resync is None:
            break
        damaged.append(DamagedRecord(offset, resync - offset))
        offset = resync
    return records, damaged, end


def _next_good(buffer: Any, start: int) -> int | None:
    view = memoryview(buffer)
    while (found := buffer.find(MAGIC, start)) >= 0:
        if _record_at(view, found) is not None:
            return int(found)
        start = found + 1
    return None


def iter_entries(records: Sequence[Sequence[Entry]]) -> Iterator[Entry]:
    for record in records:
        yield from record
