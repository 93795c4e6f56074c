"""The shared-memory store: a variable table and the variables' bytes, in files on a tmpfs.

A store is a directory (default /dev/shm/tensorps-<port>) that any number of processes map at once:

    meta        header, a dense index of the used slots, and an open-addressing hash table of variable
                slots (mmap, shared; listing reads the index, so the sparse table's untouched pages
                are never allocated)
    locks       one byte per lock stripe plus the catalog lock (see locks.py)
    seg-<id>    one file per data segment; ids come from a counter, never from a variable's name
    commit-<r>  the record of an atomic batch while it publishes (commits.py)
    undo-<r>    the old rows of a locked sparse update while it writes them in place (undo.py)

A store has an identity: a random incarnation in the header, and the directory itself. A handle opens
every file relative to a descriptor of the directory it attached, so a process that outlives its store
(a shm:// client whose server stopped) never reads, creates or removes a file of a new store made at the
same path; it checks that its store still stands there (StoreGoneError otherwise) on every lookup through
a byte that whoever removes a store sets first, fully (directory, path and incarnation) on lookups that
miss, before it names a new file, and at least every CHECK_INTERVAL seconds.

Every slot holds two descriptors (dtype, shape, initialized, version, segment) and a one-byte selector
naming the active one. A crash-atomic write fills the inactive descriptor and its segment, then flips
the selector with a single byte store: a process killed at any instant leaves the old descriptor (and
the old bytes) complete. The store knows nothing of TensorFlow's semantics (ops.py does); it provides
the table, the segments, the byte budget and the locks. Callers hold a name's stripe lock while they
touch its slot; slot insertion and removal, the segment counter and the budget also take the catalog lock.

Slots are read without the catalog lock through a per-slot sequence counter (odd while a slot changes),
so that lookups on the hot path cost no extra system call.

A slot can pin one segment for a snapshot (persist/snapshot.py): a pinned segment is never written in
place nor reused as a spare buffer, so its bytes stay those of the snapshot's instant while writers go on
(ops.py copies first, spare_segment allocates afresh). Freeing it is fine: the snapshot keeps a mapping,
which keeps the pages. A pin left by a dead snapshot costs at most one copy per variable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import MAX_NAME_LENGTH, MAX_RANK, Shape
from tensorps.server import commits, requests, undo
from tensorps.server.locks import StripedLocks, create_lock_file
from tensorps.server.mapping import map_fd, map_file
from tensorps.server.requests import RequestTable, unpack_applied

log = logging.getLogger("tensorps.server")

MAGIC = b"TPSSTOR3"
PAGE = mmap.PAGESIZE

# Header: magic, stripes, capacity, slot size, next segment id, used bytes, variable count,
# byte budget, variable limit; then the fields at the offsets below.
_HEADER = struct.Struct("<8sIIIxxxxQQQQQ")
_HEADER_SIZE = 4096
_OFF_NEXT_SEG = 24
_OFF_USED = 32
_OFF_COUNT = 40
_OFF_FREED = 64  # how many segments were ever freed: a cheap "mappings may be stale" signal
_OFF_INCARNATION = 72  # random, set at creation: which store a handle attached, whatever its path names now
_OFF_REMOVED = 80  # one byte, set by whoever removes the store before its files go
# Seconds between full checks that a handle's store still stands at its path (a removal by hand sets no
# byte); removals through Store are seen at once.
CHECK_INTERVAL = 1.0
# One byte per stripe: set while an atomic batch holding the stripe publishes (commits.py).
_OFF_IN_COMMIT = 1024
MAX_STRIPES = _HEADER_SIZE - _OFF_IN_COMMIT

EMPTY, USED, TOMBSTONE = 0, 1, 2
# Slot: sequence counter, state, active descriptor index, name length, name.
_SLOT_HEAD = struct.Struct(f"<IBBH{MAX_NAME_LENGTH + 1}s")
# Descriptor: dtype code, initialized, rank (-1: unknown shape), version, nbytes, segment id, capacity,
# the request id of the write that produced it (requests.py).
_DESC_HEAD = struct.Struct("<BBbxxxxxQQQQ16s")
_DIMS = struct.Struct(f"<{MAX_RANK}q")
_DIMS_OF_RANK = [struct.Struct(f"<{rank}q") for rank in range(MAX_RANK + 1)]
_DESC_SIZE = _DESC_HEAD.size + _DIMS.size
SLOT_SIZE = -(-(_SLOT_HEAD.size + 2 * _DESC_SIZE) // 64) * 64
_OFF_STATE = 4
_OFF_SELECTOR = 5
_OFF_VERSION = 8
_OFF_REQUEST = 40
# The slot's last 8 bytes: the segment a snapshot pinned (0: none), see pin().
_OFF_PIN = SLOT_SIZE - 8
assert _SLOT_HEAD.size + 2 * _DESC_SIZE <= _OFF_PIN


class StoreError(Exception):
    """A store-level failure that callers report to the user."""


class StoreFullError(StoreError):
    """The byte budget, the variable limit or the tmpfs itself has no room."""


class StoreGoneError(StoreError):
    """The store this handle attached was removed (another may stand at its path now)."""


class Descriptor(NamedTuple):
    """One of a slot's two descriptors (a NamedTuple: built on every write, so cheap to build)."""

    dtype: int
    initialized: bool
    shape: Shape | None
    version: int
    nbytes: int
    segment: int = 0
    capacity: int = 0
    request: bytes = bytes(16)  # the id of the write that made this descriptor (all zero: none)


class Swept(NamedTuple):
    """What a sweep reclaimed (all zero: nothing was left behind)."""

    records: int  # commit records of dead atomic batches, finished or undone
    entries: int  # index entries of slots not in use
    segments: int  # segment files no descriptor names
    bytes: int  # their size
    budget: int  # how much the count of bytes in use went down (negative: up)


@dataclass(frozen=True)
class StoreLimits:
    max_variables: int
    max_total_bytes: int


def default_total_bytes(path: str) -> int:
    """90 % of the free space of the filesystem that will hold the store (a full tmpfs means SIGBUS)."""
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    st = os.statvfs(parent)
    return int(st.f_bavail * st.f_frsize * 0.9)


_U32 = struct.Struct("<I")


def _slots_offset(capacity: int) -> int:
    """Where the slot table starts: after the header and the index and position arrays (u32 each)."""
    return _HEADER_SIZE + -(-(8 * capacity) // PAGE) * PAGE


def _capacity_for(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def _table_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8, person=b"tpsslot").digest(), "little")


class Store:
    """One process's handle on a store directory. Thread-safe; fork a process before opening one."""

    def __init__(self, path: str, *, created: bool) -> None:
        self.path = path
        self.created = created
        # Every file of the store is opened relative to the directory this handle attached (see the module
        # docstring): once that directory is removed, creating a file in it fails instead of landing in a
        # new store at the same path.
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._meta_fd = os.open("meta", os.O_RDWR | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except BaseException:
            os.close(self._dir_fd)
            raise
        header = os.pread(self._meta_fd, _HEADER.size, 0)
        magic, stripes, capacity, slot_size, *_rest, budget, max_vars = _HEADER.unpack(header)
        if magic != MAGIC or slot_size != SLOT_SIZE:
            os.close(self._meta_fd)
            os.close(self._dir_fd)
            raise StoreError(f"{path} is not a tensorps store of this version")
        self.capacity: int = capacity
        self.limits = StoreLimits(max_variables=max_vars, max_total_bytes=budget)
        self._slots_offset = _slots_offset(capacity)
        self._meta = mmap.mmap(self._meta_fd, self._slots_offset + capacity * SLOT_SIZE)
        self.incarnation = self._header_u64(_OFF_INCARNATION)
        self._next_check = time.monotonic() + CHECK_INTERVAL
        self.locks = StripedLocks(os.path.join(path, "locks"), stripes, opener=self._open_locks)
        self.requests = RequestTable(self._dir_fd, stripes)
        self._slot_cache: dict[str, int] = {}
        # segment id -> (mapping, slot that used it when mapped)
        self._segments: dict[int, tuple[Any, int]] = {}
        self._segments_lock = threading.Lock()
        self._seen_freed = 0
        # Told, under the catalog lock, what recover() just undid of a dead process's change: (name, its
        # active descriptor now or None if it does not exist, its bytes) for each variable (Ops logs it).
        self.on_undone: Callable[[list[tuple[str, Descriptor | None, Any]]], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, *, stripes: int = 64, max_variables: int = 65536, max_total_bytes: int | None = None
    ) -> Store:
        """Create the store at `path`, or attach to the one there (whose own settings then apply)."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return cls.attach(path)
        try:
            if not 1 <= stripes <= MAX_STRIPES:
                raise StoreError(f"a store has 1 to {MAX_STRIPES} lock stripes, not {stripes}")

            def reserve(fd: int, size: int, what: str, knob: str) -> None:
                # Reserve a shared file's pages now, as segments are: a tmpfs allocates a page when it is
                # first touched, and a full one answers with SIGBUS, which would kill whichever process
                # touched it (inserting a variable, recording a write's request id).
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                        raise StoreFullError(
                            f"the store's filesystem has no room for its {what} of {size} bytes: "
                            f"give it more room or lower {knob}"
                        ) from None
                    raise

            capacity = 1 << max(4, (2 * max_variables - 1).bit_length())
            create_lock_file(os.path.join(path, "locks"), stripes)
            requests.create_file(path, stripes)
            fd = os.open(os.path.join(path, requests.FILE), os.O_RDWR | os.O_CLOEXEC)
            try:
                reserve(fd, os.fstat(fd).st_size, f"request table ({stripes} stripes)", "the stripes")
            finally:
                os.close(fd)
            tmp = os.path.join(path, "meta.init")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                size = _slots_offset(capacity) + capacity * SLOT_SIZE
                reserve(fd, size, f"variable table ({max_variables} variables)", "max_variables")
                # Both tables are outside the byte budget; the default is taken from the space left after
                # them.
                budget = max_total_bytes if max_total_bytes is not None else default_total_bytes(path)
                header = _HEADER.pack(MAGIC, stripes, capacity, SLOT_SIZE, 1, 0, 0, budget, max_variables)
                os.pwrite(fd, header, 0)
                os.pwrite(fd, struct.pack("<Q", secrets.randbits(64) | 1), _OFF_INCARNATION)
            finally:
                os.close(fd)
            # Attachers wait for "meta"; renaming makes it appear complete or not at all.
            os.rename(tmp, os.path.join(path, "meta"))
            return cls(path, created=True)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    @classmethod
    def attach(cls, path: str, wait: float = 5.0) -> Store:
        """Open the existing store at `path` (waiting briefly for one being created); never create one."""
        deadline = time.monotonic() + wait
        while not os.path.exists(os.path.join(path, "meta")):
            if time.monotonic() > deadline:
                raise StoreError(f"{path} exists but holds no tensorps store")
            time.sleep(0.01)
        return cls(path, created=False)

    def close(self) -> None:
        with self._segments_lock:
            self._segments.clear()  # mappings unmap once no array views them any more
        self.locks.close()
        self.requests.close()
        with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with it
            self._meta.close()
        os.close(self._meta_fd)
        os.close(self._dir_fd)
        self._dir_fd = -1  # EBADF for a late user, never a number reused by another file

    def destroy(self) -> None:
        """Close this handle and remove the store's files (unless another store stands at its path now)."""
        try:
            self.check_present()
        except StoreGoneError:
            self.close()
            return
        self.close()
        Store.remove_files(self.path)

    @staticmethod
    def remove_files(path: str) -> None:
        """Remove a store's files. Every process still attached sees StoreGoneError at its next lookup;
        its mappings stay valid until it unmaps them."""
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(path, "meta"), os.O_RDWR | os.O_CLOEXEC)
            try:
                if os.pread(fd, len(MAGIC), 0) == MAGIC:
                    os.pwrite(fd, b"\x01", _OFF_REMOVED)
            finally:
                os.close(fd)
        shutil.rmtree(path, ignore_errors=True)

    # ---- identity ------------------------------------------------------------------------------

    def _gone(self) -> StoreGoneError:
        return StoreGoneError(
            f"the store was removed: {self.path} no longer holds the store this process attached "
            "(its server stopped?); open it again"
        )

    def check_present(self) -> None:
        """Raise StoreGoneError unless this handle's store still stands at its path (a few system calls)."""
        if self._meta[_OFF_REMOVED] or os.fstat(self._dir_fd).st_nlink == 0:
            raise self._gone()
        try:
            fd = os.open(os.path.join(self.path, "meta"), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise self._gone() from None
        try:
            incarnation = os.pread(fd, 8, _OFF_INCARNATION)
        finally:
            os.close(fd)
        if incarnation != struct.pack("<Q", self.incarnation):
            raise self._gone()

    def _check_soon(self) -> None:
        """The hot path's check: a byte of shared memory, and a full check now and then."""
        if self._meta[_OFF_REMOVED]:
            raise self._gone()
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            self.check_present()

    def _open_locks(self) -> int:
        try:
            return os.open("locks", os.O_RDWR | os.O_CLOEXEC, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise self._gone() from None

    # ---- header --------------------------------------------------------------------------------

    def _header_u64(self, offset: int) -> int:
        value: int = struct.unpack_from("<Q", self._meta, offset)[0]
        return value

    def _set_header_u64(self, offset: int, value: int) -> None:
        struct.pack_into("<Q", self._meta, offset, value)

    @property
    def used_bytes(self) -> int:
        return self._header_u64(_OFF_USED)

    @property
    def variable_count(self) -> int:
        return self._header_u64(_OFF_COUNT)

    # ---- slots ---------------------------------------------------------------------------------

    def _slot_offset(self, slot: int) -> int:
        return self._slots_offset + slot * SLOT_SIZE

    def _read_slot_head(self, slot: int) -> tuple[int, int, str]:
        seq, state, _sel, length, raw = _SLOT_HEAD.unpack_from(self._meta, self._slot_offset(slot))
        return seq, state, raw[:length].decode(errors="replace")

    def _slot_holds(self, slot: int, name: str) -> bool | None:
        """True/False if the slot stably holds/does not hold `name`; None if it is changing."""
        seq, state, slot_name = self._read_slot_head(slot)
        if seq & 1:
            return None
        if state != USED or slot_name != name:
            return False
        again: int = struct.unpack_from("<I", self._meta, self._slot_offset(slot))[0]
        return True if again == seq else None

    def find(self, name: str) -> int | None:
        """The slot of `name`, or None. The caller holds the name's stripe lock."""
        self._check_soon()
        slot = self._slot_cache.get(name)
        if slot is not None and self._slot_holds(slot, name):
            return slot
        found = self._probe(name, locked=False)
        if found is _CHANGING:
            with self.locks.hold(self.locks.catalog, exclusive=False):
                found = self._probe(name, locked=True)
        assert not isinstance(found, _Changing)
        if found is None:
            self._slot_cache.pop(name, None)
            self.check_present()  # a removed store is UNAVAILABLE, not an empty one
        else:
            self._slot_cache[name] = found
        return found

    def _probe(self, name: str, *, locked: bool) -> int | _Changing | None:
        mask = self.capacity - 1
        index = _table_hash(name) & mask
        for _ in range(self.capacity):
            seq, state, slot_name = self._read_slot_head(index)
            if seq & 1 and not locked:
                return _CHANGING
            if state == EMPTY:
                return None
            if state == USED and slot_name == name:
                if locked or self._slot_holds(index, name):
                    return index
                return _CHANGING
            index = (index + 1) & mask
        return None

    def _begin_change(self, slot: int) -> None:
        off = self._slot_offset(slot)
        seq: int = struct.unpack_from("<I", self._meta, off)[0]
        struct.pack_into("<I", self._meta, off, (seq | 1) if not seq & 1 else seq)

    def _end_change(self, slot: int) -> None:
        off = self._slot_offset(slot)
        seq: int = struct.unpack_from("<I", self._meta, off)[0]
        struct.pack_into("<I", self._meta, off, (seq + 1) & 0xFFFFFFFF & ~1)

    def insert(self, name: str, descriptor: Descriptor) -> int:
        """Add `name` (which must be absent) with `descriptor` as its active descriptor."""
        with self.locks.hold(self.locks.catalog):
            self.check_present()
            count = self.variable_count
            if count >= self.limits.max_variables:
                raise StoreFullError(f"the store holds {count} variables, its limit")
            mask = self.capacity - 1
            index = _table_hash(name) & mask
            for _ in range(self.capacity):
                state = self._meta[self._slot_offset(index) + _OFF_STATE]
                if state != USED:
                    break
                index = (index + 1) & mask
            else:
                raise StoreFullError("the variable table is full")
            off = self._slot_offset(index)
            self._begin_change(index)
            raw = name.encode()
            struct.pack_into(f"<BBH{MAX_NAME_LENGTH + 1}s", self._meta, off + 4, state, 0, len(raw), raw)
            self._write_descriptor(index, 0, descriptor)
            self._write_descriptor(index, 1, descriptor._replace(segment=0, capacity=0))
            # Indexed before it is marked used: a crash in between leaves an index entry that names()
            # skips, never a used slot missing from the index (which a later delete would corrupt).
            self._set_index(count, index)
            self._set_header_u64(_OFF_COUNT, count + 1)
            self._meta[off + _OFF_STATE] = USED
            self._end_change(index)
        self._slot_cache[name] = index
        return index

    def delete_slot(self, slot: int) -> None:
        """Delete the variable in `slot` and free its segments. The caller holds its stripe lock."""
        with self.locks.hold(self.locks.catalog):
            self._delete_slot(slot)

    def _delete_slot(self, slot: int) -> None:
        """delete_slot for a caller that holds the catalog lock.

        The slot is tombstoned before its segments go: a crash in between leaves the variable deleted and
        its files leaked (until a sweep), never a used slot whose descriptor names a removed segment.
        """
        _seq, _state, name = self._read_slot_head(slot)
        descriptors = [self.descriptor(slot, which) for which in (0, 1)]
        self._begin_change(slot)
        self._meta[self._slot_offset(slot) + _OFF_STATE] = TOMBSTONE
        self._end_change(slot)
        # The last index entry takes the deleted one's place, keeping the index dense. (Tombstoned first:
        # a crash before this leaves an entry that names() and a sweep skip, never a used slot unindexed.)
        last = self.variable_count - 1
        self._set_index(self._position(slot), self._indexed(last))
        self._set_header_u64(_OFF_COUNT, last)
        for which, d in enumerate(descriptors):
            # Forgotten before unlinked; a tombstone keeping no segment id also tells other processes their
            # mappings are stale.
            self._write_descriptor(slot, which, d._replace(segment=0, capacity=0))
            self._free_segment(d)
        self._reclaim_tombstones(slot)
        self._slot_cache.pop(name, None)

    def _reclaim_tombstones(self, slot: int) -> None:
        """Turn tombstones back into empty slots where no probe chain can pass them.

        A tombstone followed by an empty slot ends every chain through it, so it and the tombstones just
        before it can become empty. Without this, create/delete churn fills the table with tombstones and
        every lookup of a missing name scans all of it.
        """
        mask = self.capacity - 1
        if self._meta[self._slot_offset((slot + 1) & mask) + _OFF_STATE] != EMPTY:
            return
        while self._meta[self._slot_offset(slot) + _OFF_STATE] == TOMBSTONE:
            self._begin_change(slot)
            self._meta[self._slot_offset(slot) + _OFF_STATE] = EMPTY
            self._end_change(slot)
            slot = (slot - 1) & mask

    def names(self, prefix: str = "") -> list[str]:
        """Every variable's name (a snapshot: variables may come and go meanwhile)."""
        self._check_soon()
        with self.locks.hold(self.locks.catalog, exclusive=False):
            found = []
            for position in range(self.variable_count):
                slot = self._indexed(position)
                _seq, state, name = self._read_slot_head(slot)
                # A crash may leave a stale entry (see sweep); the slot's own position names the live one.
                if state == USED and self._position(slot) == position and name.startswith(prefix):
                    found.append(name)
        return sorted(found)

    # The dense index: entry i (i < variable count) is a used slot; position[slot] is its entry.

    def _indexed(self, position: int) -> int:
        slot: int = _U32.unpack_from(self._meta, _HEADER_SIZE + 4 * position)[0]
        return slot

    def _position(self, slot: int) -> int:
        position: int = _U32.unpack_from(self._meta, _HEADER_SIZE + 4 * (self.capacity + slot))[0]
        return position

    def _set_index(self, position: int, slot: int) -> None:
        _U32.pack_into(self._meta, _HEADER_SIZE + 4 * position, slot)
        _U32.pack_into(self._meta, _HEADER_SIZE + 4 * (self.capacity + slot), position)

    # ---- descriptors ---------------------------------------------------------------------------

    def _descriptor_offset(self, slot: int, which: int) -> int:
        return self._slot_offset(slot) + _SLOT_HEAD.size + which * _DESC_SIZE

    def selector(self, slot: int) -> int:
        return self._meta[self._slot_offset(slot) + _OFF_SELECTOR]

    def descriptor(self, slot: int, which: int) -> Descriptor:
        off = self._descriptor_offset(slot, which)
        dtype, initialized, rank, version, nbytes, segment, capacity, request = _DESC_HEAD.unpack_from(
            self._meta, off
        )
        shape = None if rank < 0 else _DIMS_OF_RANK[rank].unpack_from(self._meta, off + _DESC_HEAD.size)
        return Descriptor(dtype, bool(initialized), shape, version, nbytes, segment, capacity, request)

    def active(self, slot: int) -> Descriptor:
        return self.descriptor(slot, self.selector(slot))

    def _write_descriptor(self, slot: int, which: int, d: Descriptor) -> None:
        off = self._descriptor_offset(slot, which)
        rank = -1 if d.shape is None else len(d.shape)
        _DESC_HEAD.pack_into(
            self._meta,
            off,
            d.dtype,
            d.initialized,
            rank,
            d.version,
            d.nbytes,
            d.segment,
            d.capacity,
            d.request,
        )
        if d.shape:  # dims past the rank are never read
            _DIMS_OF_RANK[rank].pack_into(self._meta, off + _DESC_HEAD.size, *d.shape)

    def publish(self, slot: int, descriptor: Descriptor) -> None:
        """Make `descriptor` (whose segment must be the inactive one's) active, crash-atomically."""
        self.flip(slot, self.prepare(slot, descriptor))

    def prepare(self, slot: int, descriptor: Descriptor) -> int:
        """Write `descriptor` as the slot's inactive one; returns the selector that will publish it."""
        inactive = 1 - self.selector(slot)
        self._write_descriptor(slot, inactive, descriptor)
        return inactive

    def flip(self, slot: int, selector: int) -> None:
        # The single byte store that commits a write: before it, readers and a crash see the old value.
        self._meta[self._slot_offset(slot) + _OFF_SELECTOR] = selector

    # ---- atomic batches (commits.py) -----------------------------------------------------------

    def in_commit(self, stripe: int) -> bool:
        """Whether an atomic batch that held `stripe` died while publishing (the caller now holds it)."""
        return self._meta[_OFF_IN_COMMIT + stripe] != 0

    def mark_in_commit(self, stripes: list[int], marked: bool) -> None:
        for stripe in stripes:
            self._meta[_OFF_IN_COMMIT + stripe] = 1 if marked else 0

    def recover(self, stripe: int | None = None) -> int:
        """Finish or undo every atomic batch whose process died while publishing, and clear the mark of
        `stripe` (which the caller holds: its marker is dead; a sweep names none); returns how many."""
        done = 0
        undone: set[str] = set()
        with self.locks.hold(self.locks.catalog):
            for record, state, entries in commits.orphans(self._dir_fd):
                for entry in entries:
                    slot = self._probe(entry.name, locked=True) if entry.name else None
                    if state != commits.COMMITTED:
                        if entry.name:
                            undone.add(entry.name)
                        elif entry.kind == commits.FLIP:
                            _seq, slot_state, slot_name = self._read_slot_head(entry.slot)
                            if slot_state == USED:
                                undone.add(slot_name)
                    if state == commits.COMMITTED and entry.kind == commits.FLIP:
                        self.flip(entry.slot, entry.selector)
                    elif state == commits.COMMITTED and entry.kind == commits.DELETE:
                        if slot == entry.slot:
                            self._delete_slot(entry.slot)
                    elif state == commits.COMMITTED and entry.kind == commits.ROWS:
                        undo.mark_written(self._dir_fd, entry.payload.decode())
                    elif state == commits.COMMITTED and entry.kind == commits.REQUEST:
                        self.requests.record(self.locks.stripe(entry.name), *unpack_applied(entry.payload))
                    elif (
                        state != commits.COMMITTED and entry.kind == commits.CREATED and isinstance(slot, int)
                    ):
                        self._delete_slot(slot)
                os.unlink(record, dir_fd=self._dir_fd)
                done += 1
            done += undo.recover(
                self._dir_fd, lambda section: self._restore_rows(section, undone), self._count_rows
            )
            if undone and self.on_undone is not None:
                self.on_undone([self._current(name) for name in sorted(undone)])
            if stripe is not None:
                self.mark_in_commit([stripe], False)
        return done

    def _current(self, name: str) -> tuple[str, Descriptor | None, Any]:
        """A variable as it is now, for on_undone; the caller holds the catalog lock."""
        slot = self._probe(name, locked=True)
        if not isinstance(slot, int):
            return name, None, b""
        d = self.active(slot)
        raw: Any = b""
        if d.initialized and d.shape is not None and d.nbytes:
            raw = self.segment_array(slot, d.segment, d.capacity, d.nbytes)
        return name, d, raw

    def _restore_rows(self, section: undo.Section, undone: set[str]) -> None:
        """Write back the old rows of a locked sparse update that died before its last row."""
        undone.add(self._read_slot_head(section.slot)[2])
        d = self.active(section.slot)
        if d.segment != section.segment or section.row_bytes == 0 or not section.rows.size:
            return
        raw = self.segment_array(section.slot, d.segment, d.capacity, d.nbytes)
        table = raw.reshape(-1, section.row_bytes)
        table[section.rows] = np.frombuffer(section.old, np.uint8).reshape(-1, section.row_bytes)

    def _count_rows(self, section: undo.Section) -> None:
        """Count the version of a locked sparse update that died after its last row."""
        if self.active(section.slot).version == section.version:
            self.bump_version(section.slot, section.request)

    def set_request(self, slot: int, request: bytes) -> None:
        """Name the write that made the active descriptor (an unlocked write, once its copy is done)."""
        off = self._descriptor_offset(slot, self.selector(slot))
        struct.pack_into("16s", self._meta, off + _OFF_REQUEST, request)

    def sweep(self) -> Swept:
        """Reclaim what processes that died amid a change left behind; returns what it reclaimed.

        Finishes or undoes their atomic batches (recover), drops index entries of slots that are not in
        use (a crash between indexing a slot and marking it used, or between tombstoning and unindexing
        it), unlinks segment files that neither descriptor of any used slot names, and recounts the bytes
        in use. Safe while other processes use the store: it holds the catalog lock, under which every
        segment is created and named, and it spares an unnamed segment whose file a live process holds
        locked (a create filling its value before it inserts the variable, see new_segment).
        """
        records = self.recover()
        with self.locks.hold(self.locks.catalog):
            self.check_present()
            count = self.variable_count
            live = [
                slot
                for position in range(count)
                if self._meta[self._slot_offset(slot := self._indexed(position)) + _OFF_STATE] == USED
                and self._position(slot) == position
            ]
            if len(live) != count:
                for position, slot in enumerate(live):
                    self._set_index(position, slot)
                self._set_header_u64(_OFF_COUNT, len(live))
            named: dict[int, int] = {}
            for slot in live:
                for which in (0, 1):
                    d = self.descriptor(slot, which)
                    if d.segment:
                        named[d.segment] = d.capacity
            segments = reclaimed = in_flight = 0
            for name in os.listdir(self._dir_fd):
                segment = _segment_id(name)
                if segment is None or segment in named:
                    continue
                try:
                    fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    continue
                try:
                    size = os.fstat(fd).st_size
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        in_flight += size  # being filled by a live process, already in the budget
                        continue
                    os.unlink(name, dir_fd=self._dir_fd)
                finally:
                    os.close(fd)
                segments += 1
                reclaimed += size
            used = self.used_bytes
            self._set_header_u64(_OFF_USED, sum(named.values()) + in_flight)
            if segments:
                self._set_header_u64(_OFF_FREED, self._header_u64(_OFF_FREED) + segments)
        swept = Swept(records, count - len(live), segments, reclaimed, used - self.used_bytes)
        if any(swept):
            log.warning(
                "store %s: reclaimed what dead processes left: %d commit records, %d index entries, "
                "%d orphaned segments (%d bytes); the budget's count of bytes in use went down by %d",
                self.path,
                *swept,
            )
        return swept

    @staticmethod
    def sweep_path(path: str) -> None:
        """Sweep the store at `path` (a supervisor after a worker died); logs rather than raises."""
        try:
            store = Store.attach(path, wait=0.0)
        except (StoreError, OSError) as exc:
            log.warning("cannot sweep the store %s: %s", path, exc)
            return
        try:
            store.sweep()
        except (StoreError, OSError) as exc:
            log.warning("cannot sweep the store %s: %s", path, exc)
        finally:
            store.close()

    def commit_record(self) -> commits.CommitRecord:
        """A new commit record in this handle's store."""
        try:
            return commits.CommitRecord(self._dir_fd)
        except FileNotFoundError:
            raise self._gone() from None

    # ---- snapshot pins (persist/snapshot.py) ---------------------------------------------------

    def pin(self, slot: int, segment: int) -> None:
        """Keep `segment` (the slot's active one) unchanged until unpin; the caller holds its stripe."""
        struct.pack_into("<Q", self._meta, self._slot_offset(slot) + _OFF_PIN, segment)

    def unpin(self, slot: int, segment: int) -> None:
        if segment and self._pin(slot) == segment:
            struct.pack_into("<Q", self._meta, self._slot_offset(slot) + _OFF_PIN, 0)

    def _pin(self, slot: int) -> int:
        pinned: int = struct.unpack_from("<Q", self._meta, self._slot_offset(slot) + _OFF_PIN)[0]
        return pinned

    def pinned(self, slot: int, segment: int) -> bool:
        """Whether a snapshot still reads `segment` (which must then be neither written nor reused); the
        caller holds the slot's stripe. A pin whose snapshot is no longer running (its process died amid
        it: nobody holds locks.pins) is dropped, so that writes go back to writing in place."""
        if segment == 0 or self._pin(slot) != segment:
            return False
        if self.locks.held_elsewhere(self.locks.pins):
            return True
        struct.pack_into("<Q", self._meta, self._slot_offset(slot) + _OFF_PIN, 0)
        return False

    def forget_segments(self, slot: int) -> None:
        """Make the slot name no segment (before deleting a slot whose segment someone else frees)."""
        with self.locks.hold(self.locks.catalog):
            for which in (0, 1):
                d = self.descriptor(slot, which)
                self._write_descriptor(slot, which, d._replace(segment=0, capacity=0))

    def slots(self) -> list[tuple[str, int]]:
        """(name, slot) of every variable; the caller holds every stripe (a snapshot's cut)."""
        with self.locks.hold(self.locks.catalog, exclusive=False):
            self.check_present()
            found = []
            for position in range(self.variable_count):
                slot = self._indexed(position)
                _seq, state, name = self._read_slot_head(slot)
                if state == USED and self._position(slot) == position:
                    found.append((name, slot))
        return found

    def undo_record(self) -> undo.UndoRecord:
        """A new undo record (a locked sparse update) in this handle's store."""
        try:
            return undo.UndoRecord(self._dir_fd)
        except FileNotFoundError:
            raise self._gone() from None

    def bump_version(self, slot: int, request: bytes) -> int:
        """Count an in-place (unlocked) write by `request` in the active descriptor; the new version."""
        off = self._descriptor_offset(slot, self.selector(slot))
        version: int = struct.unpack_from("<Q", self._meta, off + _OFF_VERSION)[0] + 1
        # The id first: a crash in between leaves the write remembered but not counted, never counted twice.
        struct.pack_into("16s", self._meta, off + _OFF_REQUEST, request)
        struct.pack_into("<Q", self._meta, off + _OFF_VERSION, version)
        return version

    # ---- segments ------------------------------------------------------------------------------

    def spare_segment(self, slot: int, nbytes: int) -> tuple[int, int]:
        """A segment of the slot's inactive descriptor that fits `nbytes`, (re)allocated if needed.

        Returns (segment id, capacity); (0, 0) for zero bytes. Raises StoreFullError, changing no value.
        """
        inactive = 1 - self.selector(slot)
        current = self.descriptor(slot, inactive)
        want = _capacity_for(nbytes)
        if current.capacity == want and not self.pinned(slot, current.segment):
            return current.segment, current.capacity
        with self.locks.hold(self.locks.catalog):
            # Forget the segment before unlinking it: a crash in between leaks a file, never a dangling id.
            self._write_descriptor(slot, inactive, current._replace(segment=0, capacity=0, nbytes=0))
            self._free_segment(current)
            if want == 0:
                return 0, 0
            segment, _fd = self._allocate_segment(want)
            self._write_descriptor(slot, inactive, current._replace(segment=segment, capacity=want, nbytes=0))
        return segment, want

    def _allocate_segment(self, capacity: int, *, hold: bool = False) -> tuple[int, int | None]:
        """A new zero-filled segment, (id, None); the caller holds the catalog lock.

        With `hold`, (id, descriptor of the file, locked): for a segment that no descriptor names yet, the
        lock tells a sweep that a live process is about to name it (the kernel drops it if that process
        dies first). The caller closes the descriptor once the segment is named, or freed.
        """
        used = self.used_bytes
        if used + capacity > self.limits.max_total_bytes:
            raise StoreFullError(
                f"storing {capacity} more bytes would exceed the store's budget of "
                f"{self.limits.max_total_bytes} bytes ({used} in use)"
            )
        self.check_present()
        segment = self._header_u64(_OFF_NEXT_SEG)
        self._set_header_u64(_OFF_NEXT_SEG, segment + 1)
        name = _segment_name(segment)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise self._gone() from None  # the directory was removed since the check
        try:
            if hold:
                fcntl.flock(fd, fcntl.LOCK_EX)
            # Reserve the pages now: a tmpfs that fills up later would SIGBUS on first touch instead.
            os.posix_fallocate(fd, 0, capacity)
        except OSError as exc:
            os.close(fd)
            os.unlink(name, dir_fd=self._dir_fd)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise StoreFullError(f"the store's filesystem has no room for {capacity} bytes") from None
            raise
        if not hold:
            os.close(fd)
        self._set_header_u64(_OFF_USED, used + capacity)
        return segment, fd if hold else None

    @contextlib.contextmanager
    def new_segment(self, nbytes: int) -> Iterator[tuple[int, int, np.ndarray[Any, Any]]]:
        """(id, capacity, writable bytes) of a new segment that the caller names in a descriptor it
        writes inside the `with` (a create fills its value, then inserts the variable).

        Until the block ends, the segment's file is locked (see _allocate_segment); if the block raises,
        the segment is freed. Zero bytes need no segment: (0, 0, empty).
        """
        capacity = _capacity_for(nbytes)
        if capacity == 0:
            yield 0, 0, np.empty(0, np.uint8)
            return
        with self.locks.hold(self.locks.catalog):
            segment, fd = self._allocate_segment(capacity, hold=True)
        assert fd is not None
        try:
            mapping = map_fd(fd, capacity, _segment_name(segment))
            yield segment, capacity, np.frombuffer(mapping, np.uint8, nbytes)
        except BaseException:
            with self.locks.hold(self.locks.catalog):
                self._free_segment(Descriptor(0, False, None, 0, 0, segment, capacity))
            raise
        finally:
            os.close(fd)

    def _free_segment(self, d: Descriptor) -> None:
        """Unlink a descriptor's segment; the caller holds the catalog lock."""
        if d.segment == 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_segment_name(d.segment), dir_fd=self._dir_fd)
        self._set_header_u64(_OFF_USED, max(0, self.used_bytes - d.capacity))
        self._set_header_u64(_OFF_FREED, self._header_u64(_OFF_FREED) + 1)
        with self._segments_lock:
            self._segments.pop(d.segment, None)

    def segment_array(self, slot: int, segment: int, capacity: int, nbytes: int) -> np.ndarray[Any, Any]:
        """The first `nbytes` of a slot's segment as a writable uint8 array (empty for segment 0)."""
        if segment == 0:
            return np.empty(0, np.uint8)
        with self._segments_lock:
            entry = self._segments.get(segment)
            if entry is None:
                # Mappings of segments freed elsewhere are dropped only when something was freed since the
                # last look: scanning them all on every new mapping made creating N variables O(N²).
                freed = self._header_u64(_OFF_FREED)
                if freed != self._seen_freed:
                    self._seen_freed = freed
                    self._evict_stale()
                try:
                    mapping = map_file(_segment_name(segment), capacity, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    self.check_present()  # a removed store says so; a missing file of a live one is a bug
                    raise
                entry = (mapping, slot)
                self._segments[segment] = entry
        return np.frombuffer(entry[0], np.uint8, nbytes)

    def release_unused(self) -> None:
        """Unmap segments that other processes freed since the last look (call it now and then)."""
        freed = self._header_u64(_OFF_FREED)
        if freed != self._seen_freed:
            self._seen_freed = freed
            with self._segments_lock:
                self._evict_stale()

    def _evict_stale(self) -> None:
        """Drop mappings of segments that their slot no longer uses (another process freed them).

        Keeping them would pin freed tmpfs pages; a mapping still viewed by an array lives on until then.
        """
        stale = [
            segment
            for segment, (_mapping, slot) in self._segments.items()
            if segment not in (self.descriptor(slot, 0).segment, self.descriptor(slot, 1).segment)
        ]
        for segment in stale:
            del self._segments[segment]


def _segment_name(segment: int) -> str:
    return f"seg-{segment:016x}"


def _segment_id(name: str) -> int | None:
    """The id of a segment file's name; None for any other file."""
    if not name.startswith("seg-") or len(name) != 20:
        return None
    try:
        return int(name[4:], 16)
    except ValueError:
        return None


class _Changing:
    """Marker: a slot on the probe path was changing; probe again under the catalog lock."""


_CHANGING = _Changing()
