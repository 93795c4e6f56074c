"""Exactly-once writes: the outcomes of recent writes by request id, shared by every process of a store.

A client gives each write a random 16-byte request id and sends it again when it retries after UNAVAILABLE
(a worker died mid-call: the write may or may not have happened). The server must then answer with the
first outcome instead of applying the write twice. Two places remember ids, both in shared memory:

- a variable's descriptor carries the id of the write that produced it (published by the same byte store
  that publishes the value, so "applied" and "remembered" cannot be torn apart by a crash);
- this table holds the ids of writes whose descriptors were replaced since (and of deletes): whoever
  replaces a descriptor first records its id here, with the version it produced and, for values of at most
  INLINE bytes, the value (a retried assign_add of a counter can return its result).

The table is a file `requests` in the store, one partition per lock stripe; an id lives in the partition of
its variable's stripe, so that the stripe lock (held by every writer of the variable) is the only lock it
needs. A partition is a set-associative cache of SETS x WAYS ids (the oldest of a set is replaced): bounded
memory, and a retry, which comes within seconds, finds its id.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from typing import NamedTuple

FILE = "requests"
WAYS = 4
SETS = 2048  # per stripe: 8192 ids, a retry's id survives ~2000 later writes to its stripe with p > 0.998
INLINE = 8  # a scalar counter of up to 64 bits
# Entry: id, stamp (the partition's counter when written: the oldest of a set is replaced), version,
# value length (NOT_KEPT: not kept), inline value. The partition's counter sits before its sets.
_ENTRY = struct.Struct(f"<16sQQH{INLINE}s")
_ENTRY_SIZE = 48
_COUNTER = struct.Struct("<Q")
_PARTITION = _ENTRY_SIZE * (1 + SETS * WAYS)
NOT_KEPT = 0xFFFF


class Applied(NamedTuple):
    """A write that happened: the version it produced and its value when small enough to keep."""

    version: int
    value: bytes | None


_APPLIED = struct.Struct("<16sQ")


def pack_applied(request: bytes, version: int, value: bytes | None) -> bytes:
    """An applied write for a commit record (recovery records it with record())."""
    return _APPLIED.pack(request, version) + (b"" if value is None else b"\x01" + value)


def unpack_applied(payload: bytes) -> tuple[bytes, int, bytes | None]:
    request, version = _APPLIED.unpack_from(payload)
    rest = payload[_APPLIED.size :]
    return request, version, rest[1:] if rest else None


def file_bytes(stripes: int) -> int:
    return stripes * _PARTITION


def create_file(directory: str, stripes: int) -> None:
    fd = os.open(os.path.join(directory, FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, stripes * _PARTITION)  # Store.open reserves its pages
    finally:
        os.close(fd)


class RequestTable:
    """One process's view of a store's request table. The caller holds the stripe it names."""

    def __init__(self, directory: int, stripes: int) -> None:
        """`directory`: a descriptor of the store's directory (the store a handle attached, see store.py)."""
        fd = os.open(FILE, os.O_RDWR | os.O_CLOEXEC, dir_fd=directory)
        try:
            self._map = mmap.mmap(fd, stripes * _PARTITION)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()

    @staticmethod
    def _set(stripe: int, request: bytes) -> int:
        index = int.from_bytes(request[:4], "little") % SETS
        return stripe * _PARTITION + _ENTRY_SIZE * (1 + index * WAYS)

    def lookup(self, stripe: int, request: bytes) -> Applied | None:
        offset = self._set(stripe, request)
        for way in range(WAYS):
            at = offset + way * _ENTRY_SIZE
            if self._map[at : at + 16] == request:
                _id, _stamp, version, length, inline = _ENTRY.unpack_from(self._map, at)
                return Applied(version, None if length == NOT_KEPT else inline[:length])
        return None

    def record(self, stripe: int, request: bytes, version: int, value: bytes | None) -> None:
        base = stripe * _PARTITION
        (counter,) = _COUNTER.unpack_from(self._map, base)
        offset = self._set(stripe, request)
        oldest = min(
            range(WAYS), key=lambda way: _ENTRY.unpack_from(self._map, offset + way * _ENTRY_SIZE)[1]
        )
        kept = value if value is not None and len(value) <= INLINE else None
        length = NOT_KEPT if kept is None else len(kept)
        _ENTRY.pack_into(
            self._map, offset + oldest * _ENTRY_SIZE, request, counter + 1, version, length, kept or b""
        )
        _COUNTER.pack_into(self._map, base, counter + 1)
