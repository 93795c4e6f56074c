"""Appending to the write-ahead log, and the fsync policy (--wal everysec|always).

Every process of a server (its workers, same-host shm:// clients) appends to the one log of the current
generation, wal-<g>.log, opened O_APPEND. A write appends its record while it holds its variables' stripe
locks and before it changes anything visible, so that:
- the file's order is an order the writes really happened in (two writes of one variable are appended in
  the order of their locks; an atomic batch, holding all its stripes, is one record): replaying the file
  in order gives the same state, versions included;
- a record the log cannot take (disk full) fails the write, which then changes nothing;
- a record on disk vouches for every earlier record of the same variable, whichever process wrote it, as
  they share the file (one fsync makes everything written before it durable).
Appends from different processes stay whole: a record up to ONE_WRITE bytes goes in one writev, which
Linux appends to a regular file without interleaving; a larger one under an flock on the file, and is cut
off again if it fails. Only a process killed amid a write (or a full disk) leaves a damaged record, which
replay skips (records.scan).

Durability: `always` acknowledges a write only after an fsync that followed its append; concurrent writers
share one (the first to wait runs it for everyone appended so far: group commit). `everysec` fsyncs from a
background thread once a second. The generation changes under every stripe lock (a snapshot's cut); the
first append after it moves this process to the new file, after an fsync of the older ones (whoever
appended to them: a record in the new file may depend on another process's record in an old one).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from tensorps.server.persist import layout, records
from tensorps.server.persist.records import Entry
from tensorps.server.persist.state import SharedState

log = logging.getLogger("tensorps.server")
EVERYSEC_INTERVAL = 1.0
# Records up to this size are appended with one writev and no lock; larger ones under the file's flock.
ONE_WRITE = 1 << 20


class Journal:
    """This process's appender to a data directory's log (thread-safe)."""

    def __init__(self, data_dir: str, mode: str, state: SharedState) -> None:
        assert mode in ("everysec", "always")
        self.data_dir = data_dir
        self.mode = mode
        self._state = state
        self._lock = threading.Lock()  # this process's appends; the flock orders processes
        self._synced_cond = threading.Condition(threading.Lock())
        self._fd = -1
        self._generation = 0
        self._appended = 0  # records this process appended
        self._synced = 0  # of which this many are known durable
        self._syncing = False
        self._closed = False
        self._flusher: threading.Thread | None = None

    # ---- appending -----------------------------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> int:
        """Append one record; the caller holds the stripes of every variable it names. Returns a ticket
        for sync(). Raises OSError (the log is unchanged) if the record cannot be written."""
        parts = records.encode(entries)
        size = sum(memoryview(p).nbytes for p in parts)
        generation = self._state.generation
        with self._lock:
            fd, synced = self._file(generation)
            if size <= ONE_WRITE:
                # One writev of an O_APPEND regular file: Linux appends it whole, never interleaved with
                # another process's append; a failure (disk full) writes nothing or leaves a short record,
                # which replay skips.
                _write_all(fd, parts, size)
            else:
                self._append_locked(fd, parts, size)
            self._appended += 1
            ticket = self._appended
        if synced:
            # After self._lock: sync() takes the condition's lock, then self._lock (never the reverse).
            with self._synced_cond:
                self._synced = max(self._synced, synced)
                self._synced_cond.notify_all()
        if self.mode == "everysec" and self._flusher is None:
            self._start_flusher()
        return ticket

    def _append_locked(self, fd: int, parts: list[Any], size: int) -> None:
        """A record that may take several writes: under an flock that other appenders respect, and cut
        off again if it fails, so that no torn record sits amid others."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                _write_all(fd, parts, size)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _file(self, generation: int) -> tuple[int, int]:
        """The descriptor of generation `generation`'s log, and how many records are durable if moving to
        it fsynced the old one (0: none); the caller holds self._lock."""
        if generation == self._generation and self._fd >= 0:
            return self._fd, 0
        synced = 0
        if self._fd >= 0:
            os.fsync(self._fd)  # the old generation's tail, before its snapshot may be pruned away
            os.close(self._fd)
            self._fd = -1
            synced = self._appended
        _sync_older_logs(self.data_dir, generation)
        path = os.path.join(self.data_dir, layout.log_name(generation))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            layout.fsync_dir(self.data_dir)  # the new file's name is durable before any record in it
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._generation = fd, generation
        return fd, synced

    # ---- durability ----------------------------------------------------------------------------

    def sync(self, ticket: int) -> None:
        """With --wal always, return once the record of `ticket` is on disk (group commit)."""
        if self.mode != "always":
            return
        cond = self._synced_cond
        with cond:
            while self._synced < ticket:
                if self._syncing:
                    cond.wait()
                    continue
                self._syncing = True
                try:
                    with self._lock:
                        target = self._appended
                        fd = os.dup(self._fd)
                    cond.release()
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                        cond.acquire()
                    self._synced = max(self._synced, target)
                finally:
                    self._syncing = False
                    cond.notify_all()

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(target=self._flush_every_second, daemon=True)
                self._flusher.start()

    def _flush_every_second(self) -> None:
        while True:
            with self._synced_cond:
                self._synced_cond.wait(EVERYSEC_INTERVAL)
            if self._closed:
                return
            try:
                self.flush()
            except OSError as exc:
                log.error("cannot fsync the write-ahead log in %s: %s", self.data_dir, exc)

    def flush(self) -> None:
        """fsync what this process appended so far."""
        with self._lock:
            if self._fd < 0 or self._synced >= self._appended:
                return
            target = self._appended
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._synced_cond:
            self._synced = max(self._synced, target)

    def close(self) -> None:
        """fsync and close (a worker that stops, a shm:// client that closes)."""
        self._closed = True
        with self._synced_cond:
            self._synced_cond.notify_all()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


def _sync_older_logs(data_dir: str, generation: int) -> None:
    """fsync every earlier generation's log, whoever wrote it, before this process's first record in
    generation `generation`: a record here may depend on a write another process appended there (before
    the cut) and has not made durable yet; if the snapshot of the cut never completes, replay needs both."""
    for older, path in layout.logs(data_dir):
        if older >= generation:
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # pruned meanwhile: its snapshot is complete
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, parts: list[Any], size: int) -> None:
    """writev all of `parts` (`size` bytes), going on after short writes (a record larger than one write
    takes)."""
    written = os.writev(fd, parts)
    if written == size:
        return
    views = [memoryview(p).cast("B") for p in parts]
    while True:
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if not views:
            return
        views[0] = views[0][written:]
        written = os.writev(fd, views)
