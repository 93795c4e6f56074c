"""Signal handling that cannot block, and workers that die with their supervisor.

A Python signal handler runs in the main thread between two bytecodes: in the middle of
threading.Event.set(), of a logging call, of a loop over a dict. A handler that takes a lock the interrupted
code holds deadlocks (a second SIGTERM arriving inside Event.set() hung workers), one that logs can interrupt
a write to the same stream, and one that walks a dict can see it change size. So the handlers here do
nothing at all: signal.set_wakeup_fd makes the interpreter's C-level handler write each signal's number to a
non-blocking pipe, and the main loop reads the numbers and acts on them outside any handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
from collections.abc import Iterable, Iterator, Sequence
from types import FrameType

# Loaded once in the supervisor: loading a library in a freshly forked child is best avoided.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _nothing(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: it must exist for the C-level handler to write the wakeup byte."""


class SignalPipe:
    """Receives `signums` as bytes on a pipe; the main thread waits on it together with other descriptors.

    Create it in the main thread (set_wakeup_fd's rule). Each delivered signal is one byte, so none is lost
    while the main loop is busy (a 64 KiB pipe holds far more signals than anyone sends).
    """

    def __init__(self, signums: Iterable[int]) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in signums:
            signal.signal(signum, _nothing)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def wait(self, timeout: float | None, fds: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """Wait up to `timeout` seconds for a signal or for one of `fds` to be readable.

        Returns (the signals received, in order; the readable descriptors among `fds`).
        """
        readable, _, _ = select.select([self._read, *fds], [], [], timeout)
        signums: list[int] = []
        if self._read in readable:
            with contextlib.suppress(BlockingIOError):
                while data := os.read(self._read, 256):
                    signums.extend(data)
        return signums, [fd for fd in readable if fd != self._read]

    def close(self) -> None:
        """Stop writing signals to the pipe and close it (a forked child calls this for its parent's)."""
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)


@contextlib.contextmanager
def blocked(signums: Iterable[int]) -> Iterator[Sequence[int]]:
    """Block `signums` in this thread for the block; yields the previous mask.

    Around a fork: the child starts with them blocked (the mask is inherited) and unblocks them once it
    has handlers of its own, so that a signal that arrives at once is neither lost nor handled by the
    parent's handlers, which would write it to the parent's pipe.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield tuple(previous)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send `signum` to this process when `parent` (the forking thread) exits.

    Returns False if the parent is already gone: it may have died before the request was made, and the
    kernel would then never send the signal.
    """
    # prctl's arguments are unsigned longs: pass them as such, not as C ints with undefined upper halves.
    args = (ctypes.c_ulong(int(signum)), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if _LIBC.prctl(_PR_SET_PDEATHSIG, *args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return os.getppid() == parent
