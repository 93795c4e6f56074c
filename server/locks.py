"""Striped reader-writer locks that exclude across threads and processes and die with their holder.

Each stripe is one byte of a lock file, locked with Linux open-file-description (OFD) byte-range locks.
OFD locks belong to an open file description, not to a process, so every thread opens the lock file
itself: two threads of one process then exclude each other exactly as two processes do. When a holder
dies, the kernel closes its descriptors and releases its locks, so a crashed worker never leaves a
stripe held (multiprocessing.Lock would stay locked forever). Classic POSIX locks (fcntl.lockf) would
not do: they are per process, so threads would not exclude each other.

Two consequences of "an OFD lock lives as long as its open file description":
- A forked child shares its parent's descriptions, so it would keep the parent's locks alive after the
  parent dies (a same-host trainer that forks data loaders could wedge a stripe for every server thread).
  Every child therefore closes its inherited lock-file descriptors right after the fork.
- A stopped (SIGSTOP) holder keeps its locks. acquire() therefore takes an optional timeout, and the
  server bounds every wait by the call's deadline (LockTimeout -> DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# struct flock on Linux x86_64 and aarch64: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (must be 0 for OFD locks), padded to 32 bytes. That is a claim about this layout only, not
# about aarch64 support: the store's lock-free slot lookup (a per-slot sequence counter read before and
# after a slot's name, with no barrier) assumes that loads are not reordered with loads nor stores with
# stores, as on x86-64 (TSO); a weakly ordered CPU (aarch64) gives no such guarantee. What these locks
# guard is ordered on every CPU: fcntl is a system call, a full barrier. See the README's "Platform".
FLOCK = struct.Struct("hhxxxxqqixxxx")
_SETLKW = fcntl.F_OFD_SETLKW  # type: ignore[attr-defined,unused-ignore]
OFD_SETLK: int = fcntl.F_OFD_SETLK  # type: ignore[attr-defined,unused-ignore]
_GETLK: int = fcntl.F_OFD_GETLK  # type: ignore[attr-defined,unused-ignore]
# A waiter with a deadline polls (the kernel offers no timed F_OFD_SETLKW), sleeping from _FIRST_PAUSE
# doubling up to _LONGEST_PAUSE: a lock freed meanwhile costs a waiter at most that much extra latency.
_FIRST_PAUSE = 50e-6
_LONGEST_PAUSE = 2e-3


class LockTimeout(Exception):
    """A lock was not granted within the caller's timeout (its holder may be stopped or slow)."""


@functools.lru_cache(maxsize=1 << 16)
def stripe_of(name: str, stripes: int) -> int:
    """A stable stripe for a name: the same in every process and every run (unlike hash())."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % stripes


_forks = [0]
# (device, inode) of every lock file a StripedLocks of this process opened, and the directories (stores)
# that hold them.
_lock_files: set[tuple[int, int]] = set()
_lock_dirs: set[str] = set()


def _after_fork_in_child() -> None:
    _forks[0] += 1
    _close_inherited_lock_descriptors()


def _close_inherited_lock_descriptors() -> None:
    """Close, in a forked child, the inherited descriptors that could keep the parent's locks alive.

    Two kinds: every descriptor of a stripe lock file, holding a lock now or not (the parent may lock
    through it later), found by identity; and every descriptor of another file in a store's directory
    through which an OFD lock is held right now (an atomic batch's commit record), found in
    /proc/self/fdinfo. Scanning /proc/self/fd rather than a list of ours also catches a descriptor that
    another thread had just opened when the fork happened. Closing them here does not release the
    parent's locks (its own descriptors still refer to the same descriptions); it only keeps them from
    outliving the parent. The child opens descriptors of its own. Other files are left alone.
    """
    if not _lock_files:
        return  # this process never opened a store: nothing of ours to close
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in _lock_files or (
                    stat.S_ISREG(st.st_mode) and _in_a_store(fd) and _holds_ofd_lock(fd)
                ):
                    os.close(fd)


def _in_a_store(fd: int) -> bool:
    return os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) in _lock_dirs


def _holds_ofd_lock(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        return b" OFDLCK " in info.read()


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
    and the byte budget; byte `stripes + 1 + i` is stripe i's copy lock (past the file's end, which
    byte-range locks allow): an unlocked write holds it shared while it copies in place after letting go
    of its stripe, and a snapshot's cut takes it exclusive (after every stripe) to wait for such copies;
    byte `2 * stripes + 1` is held by a snapshot while it keeps buffers pinned (`pins`).
    Lock order, always: a stripe, then the catalog; a stripe, then copy locks. Not reentrant: a thread must
    not take a lock it already holds.
    """

    def __init__(self, path: str, stripes: int, opener: Callable[[], int] | None = None) -> None:
        """`opener` opens the lock file for a new thread (default: by `path`); a store passes one that
        opens it in the directory it attached, never in a store recreated at the same path."""
        self.path = path
        self.stripes = stripes
        self._open = opener or (lambda: os.open(path, os.O_RDWR | os.O_CLOEXEC))
        self.catalog = stripes
        st = os.stat(path)
        _lock_files.add((st.st_dev, st.st_ino))
        _lock_dirs.add(os.path.dirname(os.path.realpath(path)))
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

    def acquire(self, index: int, *, exclusive: bool, timeout: float | None = None) -> None:
        """Take lock `index`, waiting as long as it takes, or at most `timeout` seconds (LockTimeout)."""
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        if timeout is None:
            self._fcntl(kind, index)
            return
        fd = self._fd()
        flock = FLOCK.pack(kind, os.SEEK_SET, index, 1, 0)
        deadline = time.monotonic() + timeout
        pause = _FIRST_PAUSE
        while True:
            try:
                fcntl.fcntl(fd, OFD_SETLK, flock)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):  # both mean "held by another"
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"lock {index} was not granted within {timeout:.3g} s")
            time.sleep(min(pause, left))
            pause = min(2 * pause, _LONGEST_PAUSE)

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

    def copy_lock(self, stripe: int) -> int:
        """The index of `stripe`'s copy lock (see the class's docstring)."""
        return self.stripes + 1 + stripe

    @property
    def pins(self) -> int:
        """The index of the lock a snapshot holds (exclusive) while it keeps buffers pinned: a pin that
        outlived its snapshot's process is then known stale (store.pinned)."""
        return 2 * self.stripes + 1

    def held_elsewhere(self, index: int) -> bool:
        """Whether another open file description holds lock `index` exclusive (a probe: takes nothing)."""
        raw = fcntl.fcntl(self._fd(), _GETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, index, 1, 0))
        return bool(FLOCK.unpack(raw)[0] != fcntl.F_UNLCK)

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


def remove_if_unlocked(directory: int, name: str) -> None:
    """Remove the record file `name` unless a live process holds its OFD lock (its writer is alive) or it
    is gone already: a record whose writer died is removed by whoever finds it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return
    try:
        fcntl.fcntl(fd, OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        os.unlink(name, dir_fd=directory)
    except OSError:
        pass  # its writer is alive (or another process removed it)
    finally:
        os.close(fd)


def dead_records(directory: int, prefix: str, staging: str) -> Iterator[tuple[str, bytes]]:
    """(file name, contents) of every record file named `prefix`... in `directory` whose writer is dead,
    each held under its OFD lock until the generator moves on (two recovering processes never take one
    record); half-made `staging`... files of dead writers are removed first."""
    names = os.listdir(directory)
    for name in names:
        if name.startswith(staging):
            remove_if_unlocked(directory, name)
    for name in (n for n in names if n.startswith(prefix)):
        try:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.fcntl(fd, OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            except OSError:
                continue  # its writer is alive
            yield name, os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
