"""Shared mappings of segment files that keep no file descriptor open.

CPython's mmap.mmap duplicates the file descriptor it maps and holds it for the mapping's life, so a store
of N variables (two buffers each) would need 2N descriptors: under the common `ulimit -n 1024` the ~500th
variable failed with "Too many open files". A mapping needs no descriptor once it exists, so this maps with
libc's mmap through ctypes, closes the descriptor at once, and unmaps when the last array viewing the
mapping is gone (a finalizer on the ctypes buffer that every view keeps alive).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_file(path: str, length: int, *, dir_fd: int | None = None) -> Any:
    """The first `length` bytes of the file at `path` (relative to `dir_fd` if given), shared and writable,
    as a ctypes byte array."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return map_fd(fd, length, path)
    finally:
        os.close(fd)


def map_fd(fd: int, length: int, path: str = "") -> Any:
    """Like map_file, of an open descriptor (which the caller keeps and may close at once)."""
    address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, _MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, f"cannot map {path}: {os.strerror(code)}")
    buffer = (ctypes.c_ubyte * length).from_address(address)
    # Not at exit: gRPC's daemon threads may still view the mapping then; the kernel unmaps it anyway.
    weakref.finalize(buffer, _libc.munmap, address, length).atexit = False
    return buffer


def max_map_count() -> int | None:
    """The kernel's limit of mappings per process (vm.max_map_count), if readable."""
    try:
        with open("/proc/sys/vm/max_map_count") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None
