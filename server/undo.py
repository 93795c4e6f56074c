"""Undo records: what makes a locked sparse update (scatter, sparse apply) crash-atomic in place.

A locked sparse update writes its rows straight into the variables' active buffers (double-buffering a
4 GiB table for a 100-row update is out of the question). Before the first row is written, it saves the
old values of the rows it touches in a record in the store:

    undo-<random>   state byte, then per variable: slot, version before, segment, bytes per row, row
                    count, the request id its new version carries, the rows (int64), their old bytes

States: PREPARING (being written; nothing touched yet), READY (complete: rows are being written), WRITTEN
(every row is written; the versions are being counted). As with commit records (commits.py), the writer
holds an OFD lock on the file while it lives, marks its stripes "in commit" in the store's header, and
removes the record before it clears the marks; whoever takes a marked stripe recovers first (Store.recover):
a READY record's old rows are written back (none of the update is left), a WRITTEN one's versions are
counted (all of it is), a PREPARING one is dropped. The cost is the touched rows, twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from tensorps.server.locks import FLOCK, OFD_SETLK, dead_records

PREFIX = "undo-"
STAGING = "new-undo-"
PREPARING, READY, WRITTEN = 1, 2, 3
_HEAD = struct.Struct("<B")
_SECTION = struct.Struct("<IQQQQ16s")

Array = np.ndarray[Any, Any]


class Section(NamedTuple):
    """One variable's part of a record: where its rows live and their old bytes."""

    slot: int
    version: int  # the active descriptor's version before the update
    segment: int  # the active descriptor's segment (rows are restored only into it)
    row_bytes: int
    rows: Array  # int64
    old: bytes
    request: bytes  # the id of the write, carried by the new version's descriptor (zeros: none)


class UndoRecord:
    """The record of one locked sparse update, written by the thread that applies it."""

    def __init__(self, directory: int) -> None:
        token = secrets.token_hex(8)
        self.name = PREFIX + token
        self._directory = directory
        staging = STAGING + token
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(staging, flags, 0o600, dir_fd=directory)
        try:
            fcntl.fcntl(self._fd, OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            os.pwrite(self._fd, _HEAD.pack(PREPARING), 0)
            os.rename(staging, self.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging, dir_fd=directory)
            os.close(self._fd)
            raise
        self._end = _HEAD.size

    def add(
        self,
        slot: int,
        version: int,
        segment: int,
        *,
        row_bytes: int,
        rows: Array,
        old: Array,
        request: bytes,
    ) -> None:
        """Save the old values of `rows` (old: their bytes, row after row) of one variable."""
        rows = np.ascontiguousarray(rows, np.int64)
        head = _SECTION.pack(slot, version, segment, row_bytes, rows.size, request)
        for piece in (head, rows.tobytes(), np.ascontiguousarray(old).tobytes()):
            if piece:
                os.pwrite(self._fd, piece, self._end)  # ENOSPC on a full tmpfs: refused before any row
                self._end += len(piece)

    def state(self, state: int) -> None:
        os.pwrite(self._fd, bytes([state]), 0)

    def finish(self) -> None:
        try:
            os.unlink(self.name, dir_fd=self._directory)
        finally:
            os.close(self._fd)

    def abandon(self) -> None:
        """Leave the record to the next holder of one of its stripes (the update failed midway)."""
        os.close(self._fd)


def _sections(data: bytes) -> Iterator[Section]:
    pos = _HEAD.size
    while pos + _SECTION.size <= len(data):
        slot, version, segment, row_bytes, count, request = _SECTION.unpack_from(data, pos)
        pos += _SECTION.size
        end = pos + count * 8 + count * row_bytes
        if end > len(data):
            return  # cut short: such a record never got READY
        rows = np.frombuffer(data, np.int64, count, pos)
        pos += count * 8
        yield Section(slot, version, segment, row_bytes, rows, data[pos:end], request)
        pos = end


def recover(
    directory: int,
    restore: Callable[[Section], None],
    count: Callable[[Section], None],
) -> int:
    """Replay every record whose writer is dead: restore(section) the old rows of a READY one,
    count(section) the versions of a WRITTEN one; returns how many records there were.
    The caller holds the store's catalog lock (so that two processes never replay one record)."""
    done = 0
    for name, data in dead_records(directory, PREFIX, STAGING):
        if len(data) >= _HEAD.size:
            (state,) = _HEAD.unpack_from(data, 0)
            for section in _sections(data):
                if state == READY:
                    restore(section)
                elif state == WRITTEN:
                    count(section)
        os.unlink(name, dir_fd=directory)  # still locked by dead_records until the loop moves on
        done += 1
    return done


def mark_written(directory: int, name: str) -> None:
    """An atomic batch that wrote rows in place reached its commit point: its undo record's rows stay (the
    record's versions are counted when it is replayed). Called by the recovery of the commit record."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return  # the batch removed it already: its versions were counted
    try:
        os.pwrite(fd, bytes([WRITTEN]), 0)
    finally:
        os.close(fd)
