"""Point-in-time snapshots: a cut across every variable, then the bytes to disk while writers go on.

The cut holds every lock stripe (shared: readers go on; in stripe order, as atomic batches take theirs,
so a batch is wholly before or after it) for as long as it takes to note each variable's active
descriptor, pin its active segment (store.pin) and keep a mapping of it, and start the next log
generation. That is a few microseconds per variable, never a copy of a byte: the write pause grows with
the number of variables, not their size. Meanwhile writers never change a pinned segment: a locked write
fills the spare buffer as always (a spare that is pinned is replaced, not reused), an unlocked write or
update of a pinned buffer copies first (ops.py); a variable deleted or resized after the cut keeps its
pinned pages alive through the mapping. Each shard's pins are released once its file is written.

An unlocked write (use_locking=False) copies in place outside its stripe, as TensorFlow does, but holds
its stripe's copy lock meanwhile (locks.py): the cut, once it holds every stripe, waits for those copies
(at most one per unlocked write under way, whose record is in the log the cut ends), so that the
snapshot holds their whole values and its checksums match the bytes it writes.

On disk: .partial-snap-<g>-<pid>/ gets the shards (safetensors, at most SHARD_BYTES each but one
variable per shard at least), each fsynced, then manifest.json; the directory is fsynced and renamed
snap-<g>, and the data directory fsynced. A failure (disk full) removes the partial directory and
leaves every earlier snapshot as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, TensorSpec, serialize_file

from tensorps.client.codec import dtype_from_code
from tensorps.server.locks import LockTimeout, StripedLocks
from tensorps.server.persist import layout, tensors
from tensorps.server.persist.state import LastSnapshot, SharedState
from tensorps.server.store import Descriptor

if TYPE_CHECKING:
    from tensorps.server.ops import Ops

log = logging.getLogger("tensorps.server")

FORMAT = "tensorps-snapshot"
FORMAT_VERSION = 1
SHARD_BYTES = 2 << 30
# How long a cut waits for unlocked writes that copy in place (one copy each) before it gives up.
COPY_WAIT = 10.0
_EMPTY = np.empty(0, np.uint8)


class SnapshotError(Exception):
    """A snapshot could not be taken; `full` if the data directory's filesystem has no room, `unset` if
    the server has no data directory."""

    def __init__(self, message: str, *, full: bool = False, unset: bool = False) -> None:
        super().__init__(message)
        self.full = full
        self.unset = unset


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    generation: int
    variables: int
    bytes: int
    seconds: float  # from the cut to the snapshot's rename
    pause_ms: float  # how long writers were held off
    time: float  # unix time of the cut


class _Pinned(NamedTuple):
    name: str
    slot: int
    d: Descriptor
    raw: Any  # the value's bytes (uint8, the pinned segment's mapping); None if it has none


def take(ops: Ops, data_dir: str, state: SharedState, *, keep: int) -> SnapshotInfo:
    """Write a snapshot of `ops`'s store to `data_dir`; raises SnapshotError (nothing else changed)."""
    os.makedirs(data_dir, exist_ok=True)
    with layout.snapshot_lock(data_dir):
        layout.sweep_partial(data_dir)
        started = time.monotonic()
        locks = ops.store.locks
        locks.acquire(locks.pins, exclusive=True)  # while it lasts, this snapshot's pins hold (store.pinned)
        try:
            pinned, generation, cut_time, pause = _cut(ops, state)
            try:
                path, total = _write(ops, pinned, data_dir, generation, cut_time=cut_time, pause=pause)
            finally:
                for p in pinned:
                    ops.store.unpin(p.slot, p.d.segment)
        finally:
            locks.release(locks.pins)
        seconds = time.monotonic() - started
        layout.prune(data_dir, keep)
        info = SnapshotInfo(path, generation, len(pinned), total, seconds, pause * 1000, cut_time)
        state.record(LastSnapshot(generation, cut_time, seconds, pause * 1000, total, len(pinned)))
    log.info(
        "snapshot %s: %d variables, %d bytes in %.3f s (writes paused %.2f ms)",
        path,
        info.variables,
        info.bytes,
        seconds,
        info.pause_ms,
    )
    return info


def _cut(ops: Ops, state: SharedState) -> tuple[list[_Pinned], int, float, float]:
    """Pin every variable's value at one instant and begin the next log generation."""
    store = ops.store
    held: list[int] = []
    pinned: list[_Pinned] = []
    started = time.monotonic()
    try:
        for stripe in range(store.locks.stripes):
            ops.acquire(stripe, exclusive=False)
            held.append(stripe)
        _wait_for_copies(store.locks)
        cut_time = time.time()
        for name, slot in store.slots():
            d = store.active(slot)
            raw = None
            if d.initialized and d.shape is not None:
                store.pin(slot, d.segment)
                raw = store.segment_array(slot, d.segment, d.capacity, d.nbytes)
            pinned.append(_Pinned(name, slot, d, raw))
        generation = state.generation + 1
        state.generation = generation
    except BaseException:
        for p in pinned:
            store.unpin(p.slot, p.d.segment)
        raise
    finally:
        for stripe in reversed(held):
            store.locks.release(stripe)
    return pinned, generation, cut_time, time.monotonic() - started


def _wait_for_copies(locks: StripedLocks) -> None:
    """Wait (under every stripe, so no new one starts) for the unlocked writes still copying in place:
    their records are in the log this cut ends, so the snapshot must hold their whole values, and its
    checksums must match the bytes it writes."""
    for stripe in range(locks.stripes):
        index = locks.copy_lock(stripe)
        try:
            locks.acquire(index, exclusive=True, timeout=COPY_WAIT)
        except LockTimeout:
            raise SnapshotError(
                f"an unlocked write is still copying after {COPY_WAIT:g} s (a stopped same-host client?); "
                "no snapshot taken, earlier snapshots are intact"
            ) from None
        locks.release(index)


def _shards(pinned: list[_Pinned]) -> list[list[_Pinned]]:
    shards: list[list[_Pinned]] = []
    size = SHARD_BYTES
    for p in pinned:
        if p.raw is None:
            continue
        if size + p.d.nbytes > SHARD_BYTES and (not shards or shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.d.nbytes
    return shards


def _write(
    ops: Ops, pinned: list[_Pinned], data_dir: str, generation: int, *, cut_time: float, pause: float
) -> tuple[str, int]:
    final = os.path.join(data_dir, layout.snapshot_name(generation))
    partial = os.path.join(data_dir, f"{layout.PARTIAL}{layout.snapshot_name(generation)}-{os.getpid()}")
    try:
        os.mkdir(partial, 0o700)
        variables: list[dict[str, Any]] = []
        files = []
        total = 0
        by_name: dict[str, dict[str, Any]] = {}
        for p in pinned:
            entry: dict[str, Any] = {
                "name": p.name,
                "dtype": dtype_from_code(p.d.dtype).name,
                "shape": None if p.d.shape is None else list(p.d.shape),
                "initialized": p.d.initialized,
                "version": p.d.version,
            }
            variables.append(entry)
            by_name[p.name] = entry
        for index, shard in enumerate(_shards(pinned)):
            file_name = f"shard-{index:05d}.safetensors"
            size, crc = _write_shard(os.path.join(partial, file_name), shard, by_name, file_name)
            files.append({"name": file_name, "bytes": size, "crc32": f"{crc:08x}"})
            total += sum(p.d.nbytes for p in shard)
            for p in shard:  # on disk: writers may change these buffers in place again
                ops.store.unpin(p.slot, p.d.segment)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "time": cut_time,
            "pause_ms": pause * 1000,
            "bytes": total,
            "files": files,
            "variables": variables,
        }
        write_manifest(os.path.join(partial, layout.MANIFEST), manifest)
        layout.fsync_dir(partial)
        os.rename(partial, final)
        layout.fsync_dir(data_dir)
        return final, total
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        full = _is_full(exc)
        what = "no room left on its filesystem" if full else getattr(exc, "strerror", None) or str(exc)
        raise SnapshotError(
            f"cannot write snapshot {generation} to {data_dir}: {what}; earlier snapshots are intact",
            full=full,
        ) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _is_full(exc: BaseException) -> bool:
    """Whether a write failed for want of room (safetensors reports the OS error in its message only)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    return any(f"os error {code})" in str(exc) for code in _FULL)


def _write_shard(
    path: str, shard: list[_Pinned], by_name: dict[str, dict[str, Any]], file_name: str
) -> tuple[int, int]:
    """Write one safetensors file straight from the pinned buffers; returns its size and crc32."""
    specs = {}
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for p in shard:
        dtype = dtype_from_code(p.d.dtype)
        assert p.d.shape is not None
        st_dtype, shape, mark = tensors.stored_as(dtype, p.d.shape)
        raw: np.ndarray[Any, Any] = p.raw if p.d.nbytes else _EMPTY
        arrays[p.name] = raw
        specs[p.name] = TensorSpec(dtype=st_dtype, shape=shape, data_ptr=raw.ctypes.data, data_len=p.d.nbytes)
        entry = by_name[p.name]
        entry.update(file=file_name, crc32=f"{zlib.crc32(raw.data):08x}")
        if mark:
            entry["stored_as"] = mark
    serialize_file(specs, path, metadata={"format": FORMAT})
    del specs
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header_size = int.from_bytes(handle.read(8), "little")
        header = handle.read(header_size)
        os.fsync(handle.fileno())
    # The file's crc32 without reading it back: the header, then the tensors in the order of their offsets.
    crc = zlib.crc32(header, zlib.crc32(header_size.to_bytes(8, "little")))
    layout_of = json.loads(header)
    order = sorted((v["data_offsets"][0], k) for k, v in layout_of.items() if k != "__metadata__")
    for _offset, name in order:
        crc = zlib.crc32(arrays[name].data, crc)
    return size, crc


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    """The manifest as JSON with a crc32 of its own content (`manifest_crc32`), fsynced."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    signed = {**manifest, "manifest_crc32": f"{zlib.crc32(body.encode()):08x}"}
    with open(path, "w") as handle:
        json.dump(signed, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
