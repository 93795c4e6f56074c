"""The pieces of persistence on a real store: pinned buffers, the log's records, a snapshot on a full disk."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, ResourceExhaustedError
from tensorps.client.codec import dtype_of
from tensorps.server.ops import Ops
from tensorps.server.persist import records
from tensorps.server.persist.records import Entry
from tensorps.server.store import Store
from tensorps.v1 import tensorps_pb2 as pb


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_variables=64, max_total_bytes=1 << 24)
    yield Ops(store)
    store.destroy()


@contextlib.contextmanager
def snapshot_running(path: str) -> Iterator[None]:
    """Hold the lock a snapshot holds while its pins last (locks.pins), through a store handle of its own
    (another process's snapshot, as the writers see it)."""
    other = Store.attach(path)
    try:
        other.locks.acquire(other.locks.pins, exclusive=True)
        yield
    finally:
        other.close()


def test_writers_never_change_a_pinned_buffer(ops: Ops) -> None:
    """While a snapshot pins a variable's buffer, unlocked assigns and updates copy first and locked
    writes never reuse it as their spare: the pinned bytes stay those of the cut."""
    ops.create("v", dtype_of("float32"), None, np.arange(1024, dtype=np.float32))
    store = ops.store
    slot = store.find("v")
    assert slot is not None
    cut = store.active(slot)
    with snapshot_running(store.path):
        store.pin(slot, cut.segment)
        pinned = store.segment_array(slot, cut.segment, cut.capacity, cut.nbytes)
        before = pinned.copy()
        ops.assign("v", np.full(1024, 5, np.float32), use_locking=False)
        ops.assign_add("v", np.ones(1024, np.float32), use_locking=False)
        for value in (7, 8, 9):  # each locked write's spare is the other buffer, pinned every other time
            ops.assign("v", np.full(1024, value, np.float32))
        ops.assign_add("v", np.ones(1024, np.float32))
        assert np.array_equal(pinned, before)
        assert ops.read("v", lambda info, view: view.copy()).tolist() == [10.0] * 1024
        store.unpin(slot, cut.segment)
        assert not store.pinned(slot, cut.segment)


def _record(i: int) -> bytes:
    parts = records.encode([Entry(records.PUT, f"v{i}", 1, (2,), True, i, np.full(2, i, np.float32))])
    return b"".join(bytes(p) for p in parts)


def test_log_scan_skips_a_damaged_record_and_stops_at_a_torn_tail() -> None:
    """Whole records are read in order; a damaged one amid others is skipped; a torn tail ends the scan."""
    good = [_record(i) for i in range(4)]
    damaged = bytearray(good[1])
    damaged[-3] ^= 0xFF
    log = good[0] + bytes(damaged) + good[2] + good[3] + good[3][:10]
    found, gaps, end = records.scan(log)
    assert [r[0].name for r in found] == ["v0", "v2", "v3"]
    assert [(g.offset, g.length) for g in gaps] == [(len(good[0]), len(good[1]))]
    assert end == len(log) - 10
    assert found[1][0].version == 2 and np.frombuffer(found[1][0].data, np.float32).tolist() == [2.0, 2.0]


def test_an_atomic_batch_is_one_record_of_every_variable_it_changed(tmp_path: Path) -> None:
    """An atomic batch appends one record holding the final state of each variable it wrote or deleted."""
    data_dir = tmp_path / "data"
    flags = ("--data-dir", str(data_dir), "--wal", "always", "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        ps.create("gone", value=np.zeros(2))
        with ps.pipeline(atomic=True) as pipe:
            pipe.create("new", value=np.ones(3, np.int8))
            pipe.assign_add("new", np.ones(3, np.int8), use_locking=True)
            pipe.delete("gone")
    (log,) = data_dir.glob("wal-*.log")
    found, gaps, _end = records.scan(log.read_bytes())
    assert not gaps and len(found) == 2
    batch = {e.name: e for e in found[1]}
    assert batch["gone"].kind == records.DELETE
    assert batch["new"].kind == records.PUT and bytes(batch["new"].data) == bytes([2, 2, 2])


def _can_mount_tmpfs(directory: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=1m", "tensorps-probe", str(directory)]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


_VERIFY = """
import sys
from tensorps.server.persist import layout
from tensorps.server.persist.restore import load_snapshot
from tensorps.server.store import Store
snaps = layout.snapshots(sys.argv[1])
store = Store.open(sys.argv[2], max_variables=64, max_total_bytes=1 << 26)
try:
    generation, count = load_snapshot(store, snaps[0][1])
    print(f"VERIFIED {len(snaps)} snapshots, newest {generation} holds {count} variables", file=sys.stderr)
finally:
    store.destroy()
"""


def _small_disk(tmp_path: Path, after: str = "true") -> tuple[list[str], Path]:
    """A wrapper running a command with an 8 MiB tmpfs at tmp_path/disk, seen by that command only (it
    goes with the namespace); `after` runs in the namespace once the command stopped."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if not _can_mount_tmpfs(mountpoint):
        pytest.skip("needs unshare and the right to mount a tmpfs in a mount namespace")
    script = (
        'mount -t tmpfs -o size=8m tensorps-data "$0" || exit 1; '
        'trap \'kill -TERM "$child"\' TERM; "$@" & child=$!; wait "$child"; wait "$child"; code=$?; '
        f"{after}; exit $code"
    )
    return ["unshare", "--mount", "sh", "-c", script, str(mountpoint)], mountpoint / "data"


def test_a_write_the_full_log_cannot_take_fails_and_changes_nothing(tmp_path: Path) -> None:
    """--wal always on a full disk: creates, assigns and atomic batches fail with RESOURCE_EXHAUSTED
    naming the log, change nothing (values, versions, the byte budget), and reads go on."""
    wrapper, data_dir = _small_disk(tmp_path)
    flags = ("--data-dir", str(data_dir), "--wal", "always", "--no-snapshot-on-exit", "--snapshot-every", "0")
    server = ServerProcess(*flags, wrapper=wrapper)
    with server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(1 << 18, np.float32))  # 1 MiB
        with pytest.raises(ResourceExhaustedError, match="cannot be logged"):
            for i in range(1, 16):  # 15 MiB of records: more than the disk
                ps.assign("v", np.full(1 << 18, i, np.float32), read_value=False)
        version = ps.info("v").version
        value = ps.read("v").copy()
        used = ps.server_info().used_bytes
        with pytest.raises(ResourceExhaustedError, match="cannot be logged"):
            ps.create("w", value=np.ones(1 << 18, np.float32))
        with pytest.raises(ResourceExhaustedError, match="cannot be logged"):
            ps.assign_add("v", np.ones(1 << 18, np.float32))
        with (
            pytest.raises(ResourceExhaustedError, match="cannot be logged"),
            ps.pipeline(atomic=True) as pipe,
        ):
            pipe.assign("v", np.full(1 << 18, -1, np.float32))
            pipe.create("x", value=np.ones(1 << 18, np.float32))
        assert [i.name for i in ps.list()] == ["v"] and ps.info("v").version == version
        assert np.array_equal(ps.read("v"), value) and ps.server_info().used_bytes == used


def test_a_full_disk_fails_the_snapshot_cleanly(tmp_path: Path) -> None:
    """A data directory on a 8 MiB tmpfs: a snapshot that does not fit is RESOURCE_EXHAUSTED, leaves no
    partial files, the earlier snapshot intact, and the server serving (and snapshotting once there is
    room again)."""
    check_store = fresh_store_path()
    # The tmpfs lives as long as its namespace: the check runs in it once the server has stopped.
    after = f'ls -a "$0/data" >&2; {sys.executable} -c "$TENSORPS_VERIFY" "$0/data" {check_store}'
    wrapper, data_dir = _small_disk(tmp_path, after)
    server = ServerProcess(
        "--data-dir",
        str(data_dir),
        "--no-snapshot-on-exit",
        wrapper=wrapper,
        env={"TENSORPS_VERIFY": _VERIFY},
    )
    with server, Client(server.address) as ps:
        ps.create("small", value=np.arange(1000, dtype=np.float32))
        first = ps.snapshot()
        ps.create("big", value=np.ones(3 << 20, np.float32))  # 12 MiB: more than the disk
        with pytest.raises(ResourceExhaustedError, match="no room"):
            ps.snapshot()
        assert ps.read("small").tolist() == list(range(1000))  # still serving
        ps.delete("big")
        assert ps.snapshot().generation > first.generation
    log = "\n".join(server.log)
    assert "VERIFIED 2 snapshots" in log and "holds 1 variables" in log, log
    assert ".partial" not in log, log


def test_row_updates_never_change_a_pinned_buffer(ops: Ops) -> None:
    """While a snapshot pins a table, locked and unlocked scatters write a fresh buffer instead of rows in
    place; the pinned bytes stay those of the cut."""
    from tensorps.server import row_ops
    from tensorps.server.row_ops import RowArgs

    ops.create("t", dtype_of("float32"), None, np.zeros((16, 4), np.float32))
    store = ops.store
    slot = store.find("t")
    assert slot is not None
    cut = store.active(slot)
    with snapshot_running(store.path):
        store.pin(slot, cut.segment)
        pinned = store.segment_array(slot, cut.segment, cut.capacity, cut.nbytes)
        args = RowArgs(inputs=(np.array([1, 2]), np.ones((2, 4), np.float32)))
        for use_locking in (False, True, True):
            row_ops.update(ops, pb.BATCH_OP_SCATTER_ADD, "t", args, use_locking=use_locking, read_value=False)
        assert not pinned.any()
    value = ops.read("t", lambda info, view: view.copy())
    assert value[1:3].tolist() == [[3.0] * 4] * 2 and not value[3:].any()


def test_an_atomic_batch_never_patches_a_pinned_table_in_place() -> None:
    """An atomic batch's sparse write of a table a snapshot pins goes to a fresh buffer (the whole value),
    not rows in place; the pinned bytes stay those of the cut."""
    with ServerProcess() as server, Client(f"shm://{server.store}") as local:
        local.create("t", value=np.zeros((16, 4), np.float32))
        store = Store.attach(server.store)
        try:
            slot = store.find("t")
            assert slot is not None
            cut = store.active(slot)
            with snapshot_running(server.store):
                store.pin(slot, cut.segment)
                pinned = store.segment_array(slot, cut.segment, cut.capacity, cut.nbytes)
                with local.pipeline(atomic=True) as pipe:
                    pipe.scatter_add("t", np.array([0, 5]), np.ones((2, 4), np.float32), use_locking=True)
                assert not pinned.any()
                assert store.active(slot).segment != cut.segment
                store.unpin(slot, cut.segment)
        finally:
            store.close()
        value = local.read("t")
        assert value[[0, 5]].tolist() == [[1.0] * 4] * 2 and value.sum() == 8
