"""Commit records: what makes an atomic batch's publish of many variables crash-atomic.

An atomic batch fills every variable's inactive buffer and descriptor first, then flips the selectors one
by one. A process killed between two flips would leave some variables new and some old, so the batch
writes a record before it changes anything visible:

    commit-<random>   state byte (PREPARING, then COMMITTED), then entries: variables it creates (by name),
                      selectors to flip, variables to delete

The byte store of COMMITTED is the commit point. While the record exists its writer holds an OFD lock on
the whole file, which the kernel drops when the writer dies; so a record that can be locked is an orphan.
The writer also marks each of its stripes "in commit" in the store's header, and removes its record before
it clears the marks: so an orphaned record always belongs to a batch whose stripes are still marked, and
nobody has written its variables since (whoever takes a marked stripe recovers first). Recovery replays
every orphaned record: a committed one is redone (its flips and deletes are then idempotent), a prepared one
is undone (the variables it created are removed; nothing else was visible yet); and the recovering process
clears the mark of the stripe it holds (marks of other stripes are cleared by whoever takes them next).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
from collections.abc import Iterator
from typing import NamedTuple

from tensorps.server.locks import FLOCK, OFD_SETLK, dead_records

PREFIX = "commit-"
STAGING = "new-commit-"
PREPARING, COMMITTED = 1, 2
# REQUEST: a request id the batch makes applied that no descriptor will carry (a delete's, or a write's
# that a later write of the same variable in the batch replaced); payload: id, version, kept value.
# ROWS: the undo record (payload: its file name) of rows the batch wrote in place (row_patches.py).
CREATED, FLIP, DELETE, REQUEST, ROWS = 1, 2, 3, 4, 5
# Entry: kind, slot, selector, name length, payload length; then the name and the payload.
_ENTRY = struct.Struct("<BIBHH")


class Entry(NamedTuple):
    kind: int
    slot: int
    selector: int
    name: str
    payload: bytes = b""


class CommitRecord:
    """The record of one atomic batch, written by the thread that applies it.

    `directory` is a descriptor of the store's directory: the record goes into the store its writer
    attached, never into another one made at the same path since.
    """

    def __init__(self, directory: int) -> None:
        token = secrets.token_hex(8)
        self.name = PREFIX + token
        self._directory = directory
        # Made under a name recovery ignores, and locked, before it becomes a record: a recovering process
        # must never take a live batch's new record for an orphan (the rename keeps the lock).
        staging = STAGING + token
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self._fd = os.open(staging, flags, 0o600, dir_fd=directory)
        try:
            fcntl.fcntl(self._fd, OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            os.pwrite(self._fd, bytes([PREPARING]), 0)  # ENOSPC on a full tmpfs: no record, no batch
            os.rename(staging, self.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging, dir_fd=directory)
            os.close(self._fd)
            raise
        self._end = 1

    def add(self, kind: int, slot: int = 0, selector: int = 0, name: str = "", payload: bytes = b"") -> None:
        """Append an entry; it is in the file (and so survives this process) when this returns."""
        raw = name.encode()
        data = _ENTRY.pack(kind, slot, selector, len(raw), len(payload)) + raw + payload
        os.pwrite(self._fd, data, self._end)
        self._end += len(data)

    def commit(self) -> None:
        """The commit point: from here on a crash means redo, not undo."""
        os.pwrite(self._fd, bytes([COMMITTED]), 0)

    def finish(self) -> None:
        """The batch is complete (or changed nothing): the record goes."""
        try:
            os.unlink(self.name, dir_fd=self._directory)
        finally:
            os.close(self._fd)

    def abandon(self) -> None:
        """The batch failed after its commit point: leave the record to be redone by the next holder of
        one of its stripes (closing the descriptor drops the lock that marked the record live)."""
        os.close(self._fd)


def orphans(directory: int) -> Iterator[tuple[str, int, list[Entry]]]:
    """(file name, state, entries) of every record in the directory (a descriptor) whose writer is dead;
    its file stays locked by the caller until the generator moves on, so that two recovering processes
    never replay one record at once."""
    for name, data in dead_records(directory, PREFIX, STAGING):
        # Empty: created and killed before its first byte; it changed nothing (and is removed).
        yield name, data[0] if data else PREPARING, list(_entries(data))


def _entries(data: bytes) -> Iterator[Entry]:
    pos = 1
    while pos + _ENTRY.size <= len(data):
        kind, slot, selector, length, extra = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        if pos + length + extra > len(data):
            return  # killed while appending this entry: it had not happened yet
        name = data[pos : pos + length].decode()
        yield Entry(kind, slot, selector, name, data[pos + length : pos + length + extra])
        pos += length + extra
