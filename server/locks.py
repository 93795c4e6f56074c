"""Striped reader-writer locks that exclude across threads and processes and die with their holder.

Each stripe is one byte of a lock file, locked with Linux open-file-description (OFD) byte-range locks.
OFD locks belong to an open file description, not to a process, so every thread opens the lock file
itself: two threads of one process then exclude each other exactly as two processes do. When a holder
dies, the kernel closes its descriptors and releases its locks, so a crashed worker never leaves a
stripe held (multiprocessing.Lock would stay locked forever). Classic POSIX locks (fcntl.lockf) would
not do: they are per process, so threads would not exclude each other.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# struct flock on Linux x86_64 and aarch64: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes.
FLOCK = struct.Struct("hhxxxxqqixxxx")
_SETLKW = fcntl.F_OFD_SETLKW  # type: ignore[attr-defined,unused-ignore]
OFD_SETLK: int = fcntl.F_OFD_SETLK  # type: ignore[attr-defined,unused-ignore]


@functools.lru_cache(maxsize=1 << 16)
def stripe_of(name: str, stripes: int) -> int:
    """A stable stripe for a name: the same in every process and every run (unlike hash())."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % stripes


_forks = [0]


def _after_fork_in_child() -> None:
    _forks[0] += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Descriptor:
    """A thread's descriptor of the lock file, closed when the thread (and so its thread-local) goes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.forks = _forks[0]
        self._close = weakref.finalize(self, _close_in_this_process, fd, self.forks)

    def close(self) -> None:
        self._close()


def _close_in_this_process(fd: int, forks: int) -> None:
    if forks == _forks[0]:  # after a fork the number may name another file
        os.close(fd)


class StripedLocks:
    """`stripes` reader-writer locks plus one catalog lock, all in one lock file.

    Byte i (i < stripes) is stripe i; byte `stripes` is the catalog lock that guards the variable table
    and the byte budget. Lock order, always: a stripe, then the catalog. Not reentrant: a thread must not
    take a lock it already holds.
    """

    def __init__(self, path: str, stripes: int, opener: Callable[[], int] | None = None) -> None:
        """`opener` opens the lock file for a new thread (default: by `path`); a store passes one that
        opens it in the directory it attached, never in a store recreated at the same path."""
        self.path = path
        self.stripes = stripes
        self._open = opener or (lambda: os.open(path, os.O_RDWR | os.O_CLOEXEC))
        self.catalog = stripes
        self._local = threading.local()
        # Every thread's descriptor, so that close() can close them all.
        self._handles: weakref.WeakSet[_Descriptor] = weakref.WeakSet()

    def _fd(self) -> int:
        # One descriptor per thread, and per process: a forked child must not share its parent's, whose
        # locks it would otherwise hold and release. A fork counter is cheaper than getpid() per call.
        local = self._local
        handle: _Descriptor | None = getattr(local, "handle", None)
        if handle is None or handle.forks != _forks[0]:
            handle = _Descriptor(self._open())
            local.handle = handle
            self._handles.add(handle)
        return handle.fd

    def _fcntl(self, kind: int, index: int) -> None:
        fcntl.fcntl(self._fd(), _SETLKW, FLOCK.pack(kind, os.SEEK_SET, index, 1, 0))

    def acquire(self, index: int, *, exclusive: bool) -> None:
        self._fcntl(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, index)

    def release(self, index: int) -> None:
        self._fcntl(fcntl.F_UNLCK, index)

    @contextmanager
    def hold(self, index: int, *, exclusive: bool = True) -> Iterator[None]:
        self.acquire(index, exclusive=exclusive)
        try:
            yield
        finally:
            self.release(index)

    def stripe(self, name: str) -> int:
        return stripe_of(name, self.stripes)

    def close(self) -> None:
        """Close every thread's descriptor (releasing any lock still held through it)."""
        for handle in list(self._handles):
            handle.close()
        self._local = threading.local()


def create_lock_file(path: str, stripes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, stripes + 1)
    finally:
        os.close(fd)
