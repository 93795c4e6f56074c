"""Restore: a new store from the newest valid snapshot, then every log after it, in order.

Runs in the supervisor before any worker exists, on a store it has just created. A snapshot whose manifest,
file or tensor fails its checksum is refused with one log line naming the file, and the one before it is
used (its logs are kept for that, see layout.prune). Logs are replayed record by record; a torn tail
(a write cut short by a crash) is truncated at the last whole record, a damaged record amid others (a
writer killed mid-append) is skipped, each with a log line. Restored variables keep their names, dtypes,
shapes (unknown ones too), initialized flags and versions.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorps.client.codec import CodecError, DType, Shape, dtype_from_code, dtype_of, nbytes_of
from tensorps.server.persist import layout, records
from tensorps.server.persist.records import Entry
from tensorps.server.store import Descriptor, Store

log = logging.getLogger("tensorps.server")


class CorruptSnapshot(Exception):
    """A snapshot that fails a check; the message names the file."""


@dataclass(frozen=True)
class Restored:
    snapshot: str | None  # the snapshot restored, if any
    generation: int  # its generation (0: none)
    variables: int  # in the store after the logs
    records: int  # log records replayed
    seconds: float


# ---- snapshots -------------------------------------------------------------------------------------


def read_manifest(path: str) -> dict[str, Any]:
    """A snapshot's manifest, its own checksum verified."""
    manifest_path = os.path.join(path, layout.MANIFEST)
    try:
        with open(manifest_path) as handle:
            signed = json.load(handle)
        claimed = signed.pop("manifest_crc32")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise CorruptSnapshot(f"{manifest_path}: unreadable manifest ({exc})") from None
    body = json.dumps(signed, sort_keys=True, separators=(",", ":"))
    if f"{zlib.crc32(body.encode()):08x}" != claimed:
        raise CorruptSnapshot(f"{manifest_path}: the manifest fails its checksum")
    manifest: dict[str, Any] = signed
    return manifest


class _Shard:
    """One safetensors file of a snapshot, mapped and checked against the manifest's crc32."""

    def __init__(self, path: str, expected_bytes: int, expected_crc: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != expected_bytes:
                    raise CorruptSnapshot(f"{path}: {size} bytes, the manifest says {expected_bytes}")
                self.map = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) if size else b""
        except OSError as exc:
            raise CorruptSnapshot(f"{path}: {exc.strerror}") from None
        if f"{zlib.crc32(self.map):08x}" != expected_crc:
            raise CorruptSnapshot(f"{path}: the file fails its checksum")
        header_size = int.from_bytes(self.map[:8], "little")
        try:
            self.header = json.loads(bytes(self.map[8 : 8 + header_size]))
        except ValueError:
            raise CorruptSnapshot(f"{path}: unreadable safetensors header") from None
        self.data_start = 8 + header_size

    def tensor(self, name: str, nbytes: int, crc: str) -> memoryview:
        try:
            begin, end = self.header[name]["data_offsets"]
        except (KeyError, ValueError, TypeError):
            raise CorruptSnapshot(f"{self.path}: no tensor '{name}'") from None
        raw = memoryview(self.map)[self.data_start + begin : self.data_start + end]
        if len(raw) != nbytes:
            raise CorruptSnapshot(f"{self.path}: tensor '{name}' has {len(raw)} bytes, not {nbytes}")
        if f"{zlib.crc32(raw):08x}" != crc:
            raise CorruptSnapshot(f"{self.path}: tensor '{name}' fails its checksum")
        return raw


@dataclass(frozen=True)
class SnapshotVariable:
    """One variable as a snapshot holds it: `data` is its checked bytes (None if uninitialized or of
    unknown shape), little-endian in C order, a view of the mapped file."""

    name: str
    dtype: DType
    shape: Shape | None
    initialized: bool
    version: int
    data: memoryview | None

    def array(self) -> np.ndarray[Any, Any] | None:
        """The value as an array of its dtype (complex128, stored as float64 pairs, viewed back)."""
        if self.data is None or self.shape is None:
            return None
        return np.frombuffer(self.data, self.dtype.numpy).reshape(self.shape)


def read_snapshot(path: str) -> tuple[int, list[SnapshotVariable]]:
    """The generation and variables of the snapshot directory `path`, every file checked first (the
    manifest's own checksum, each file's size and checksum, each tensor's checksum). Readable by any
    process: the server's restore and the admin CLI's `restore` into a running server both use it."""
    manifest = read_manifest(path)
    try:
        shards = {
            f["name"]: _Shard(os.path.join(path, f["name"]), f["bytes"], f["crc32"])
            for f in manifest["files"]
        }
        found = []
        for v in manifest["variables"]:
            dtype = dtype_of(v["dtype"])
            shape: Shape | None = None if v["shape"] is None else tuple(v["shape"])
            initialized = bool(v["initialized"])
            data = None
            if initialized and shape is not None:
                nbytes = nbytes_of(shape, dtype)
                data = shards[v["file"]].tensor(v["name"], nbytes, v["crc32"])
            found.append(SnapshotVariable(v["name"], dtype, shape, initialized, int(v["version"]), data))
        return int(manifest["generation"]), found
    except (KeyError, TypeError, ValueError, CodecError) as exc:
        raise CorruptSnapshot(f"{os.path.join(path, layout.MANIFEST)}: malformed ({exc!r})") from None


def load_snapshot(store: Store, path: str) -> tuple[int, int]:
    """Fill the (empty) store from the snapshot at `path`; returns (generation, variables).

    Every file and tensor is checked before the store is touched.
    """
    generation, variables = read_snapshot(path)
    for v in variables:
        data: Any = b"" if v.data is None else v.data
        put(store, Entry(records.PUT, v.name, v.dtype.code, v.shape, v.initialized, v.version, data))
    return generation, len(variables)


def _empty(store: Store) -> None:
    for _name, slot in store.slots():
        store.delete_slot(slot)


# ---- applying entries (snapshot tensors and log records) ------------------------------------------------


def put(store: Store, e: Entry) -> None:
    """Make variable `e.name` exactly what the entry says, version included."""
    nbytes = len(memoryview(e.data).cast("B")) if not isinstance(e.data, bytes) else len(e.data)
    slot = store.find(e.name)
    if slot is None:
        with store.new_segment(nbytes) as (segment, capacity, raw):
            raw[:] = np.frombuffer(e.data, np.uint8)
            store.insert(
                e.name, Descriptor(e.dtype, e.initialized, e.shape, e.version, nbytes, segment, capacity)
            )
        return
    segment, capacity = store.spare_segment(slot, nbytes)
    if nbytes:
        store.segment_array(slot, segment, capacity, nbytes)[:] = np.frombuffer(e.data, np.uint8)
    store.publish(slot, Descriptor(e.dtype, e.initialized, e.shape, e.version, nbytes, segment, capacity))


def _update(store: Store, e: Entry) -> None:
    slot = store.find(e.name)
    if slot is None:
        raise ValueError(f"{records.KIND_NAMES[e.kind]} of variable '{e.name}', which does not exist")
    d = store.active(slot)
    if d.shape != e.shape or d.dtype != e.dtype or not d.initialized:
        raise ValueError(f"{records.KIND_NAMES[e.kind]} of variable '{e.name}' does not fit its value")
    assert d.shape is not None
    numpy_dtype = dtype_from_code(d.dtype).numpy
    source = store.segment_array(slot, d.segment, d.capacity, d.nbytes).view(numpy_dtype).reshape(d.shape)
    delta = np.frombuffer(e.data, numpy_dtype).reshape(d.shape)
    segment, capacity = store.spare_segment(slot, d.nbytes)
    out = store.segment_array(slot, segment, capacity, d.nbytes).view(numpy_dtype).reshape(d.shape)
    ufunc = np.add if e.kind == records.ADD else np.subtract
    with np.errstate(all="ignore"):  # integers wrap, as they did when the update ran
        ufunc(source, delta, out=out)
    store.publish(slot, d._replace(version=e.version, segment=segment, capacity=capacity, request=bytes(16)))


def _rows(store: Store, e: Entry) -> None:
    """New values of some rows, written in place (restore runs alone: no reader to shield)."""
    slot = store.find(e.name)
    if slot is None:
        raise ValueError(f"rows of variable '{e.name}', which does not exist")
    d = store.active(slot)
    if d.shape != e.shape or d.dtype != e.dtype or not d.initialized or d.version + 1 != e.version:
        raise ValueError(f"rows of variable '{e.name}' do not fit its value (version {d.version})")
    assert d.shape is not None
    rows = np.frombuffer(e.extra, np.int64)
    numpy_dtype = dtype_from_code(d.dtype).numpy
    view = store.segment_array(slot, d.segment, d.capacity, d.nbytes).view(numpy_dtype)
    if view.size and len(rows):
        new = np.frombuffer(e.data, numpy_dtype).reshape(len(rows), -1)
        view.reshape(-1, new.shape[1])[rows] = new
    store.bump_version(slot, bytes(16))


def apply(store: Store, e: Entry) -> None:
    """One log entry (raises ValueError if it does not fit the store: a log that lost a record)."""
    if e.kind == records.PUT:
        put(store, e)
    elif e.kind == records.DELETE:
        slot = store.find(e.name)
        if slot is None:
            raise ValueError(f"delete of variable '{e.name}', which does not exist")
        store.delete_slot(slot)
    elif e.kind in (records.ADD, records.SUB):
        _update(store, e)
    elif e.kind == records.ROWS:
        _rows(store, e)
    else:
        raise ValueError(f"unknown log entry kind {e.kind} (a log written by a newer tensorps?)")


# ---- logs ------------------------------------------------------------------------------------------------


def replay_log(store: Store, path: str) -> int:
    """Apply every whole record of the log at `path`; truncates a torn tail. Returns records applied."""
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return 0
        # Not closed explicitly: the entries' data are views of it; it goes with the last of them.
        buffer = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
        found, damaged, end = records.scan(buffer)
        for gap in damaged:
            log.warning(
                "log %s: skipped %d bytes of a damaged record at offset %d (a writer killed amid its write)",
                path,
                gap.length,
                gap.offset,
            )
        applied = 0
        for record in found:
            for entry in record:
                try:
                    apply(store, entry)
                except ValueError as exc:
                    log.warning("log %s: record %d not applied: %s", path, applied, exc)
            applied += 1
        if end < size:
            log.warning(
                "log %s: truncated a torn tail of %d bytes at offset %d (the last whole record)",
                path,
                size - end,
                end,
            )
            handle.truncate(end)
            os.fsync(handle.fileno())
    return applied


def restore(store: Store, data_dir: str, *, snapshot: str | None = None) -> Restored:
    """Restore the newest valid snapshot of `data_dir` and the logs after it (or exactly `snapshot`,
    without logs; CorruptSnapshot if it fails a check)."""
    started = time.monotonic()
    if snapshot is not None:
        generation, _count = load_snapshot(store, snapshot)
        return Restored(snapshot, generation, store.variable_count, 0, time.monotonic() - started)
    chosen: str | None = None
    generation = 0
    for _generation, path in layout.snapshots(data_dir):
        try:
            generation, _count = load_snapshot(store, path)
            chosen = path
            break
        except CorruptSnapshot as exc:
            log.error("snapshot refused, trying the one before: %s", exc)
            _empty(store)
    if chosen is None and layout.snapshots(data_dir):
        # The logs alone hold only the writes since the oldest kept snapshot: a partial model, served as if
        # whole. Refuse loudly instead; the files stay as they are for whoever decides.
        raise CorruptSnapshot(
            f"no snapshot in {data_dir} passes its checks (each is named above): refusing to start from its "
            "logs alone, which would serve a partial model; start with --restore PATH (a good copy), or "
            "--no-restore to start empty"
        )
    replayed = 0
    for log_generation, path in layout.logs(data_dir):
        if log_generation >= generation:
            replayed += replay_log(store, path)
    return Restored(chosen, generation, store.variable_count, replayed, time.monotonic() - started)
