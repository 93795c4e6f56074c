"""Crash windows of the store (issue 10, defect 11): a process killed inside a delete or a create leaves the
variable whole or gone, never half there, and a sweep reclaims what it leaked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path, remove_store, wait_until
from tensorps.client import Client, NotFoundError
from tensorps.client.codec import dtype_of
from tensorps.server.ops import NotFound, Ops
from tensorps.server.store import Store

CHILD = str(Path(__file__).with_name("store_child.py"))
F32 = dtype_of("float32")
MiB = 1 << 20


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_total_bytes=64 * MiB)
    yield Ops(store)
    store.destroy()


def _die(ops: Ops, mode: str, name: str) -> None:
    child = subprocess.run([sys.executable, CHILD, mode, ops.store.path, name], check=False, timeout=60)
    assert child.returncode == 9, "the child should have died at the chosen step"


def _segment_files(store: Store) -> list[str]:
    return sorted(n for n in os.listdir(store.path) if n.startswith("seg-"))


def test_killed_delete_leaves_the_variable_gone_and_its_segments_to_the_sweep(ops: Ops) -> None:
    """A delete killed at its first segment unlink: the variable is gone (not a slot without bytes)."""
    ops.create("w", F32, None, np.ones(MiB // 4, np.float32))
    ops.assign("w", np.full(MiB // 4, 2.0, np.float32))  # a second buffer: two segments to free
    assert len(_segment_files(ops.store)) == 2
    _die(ops, "delete-dies-at-unlink", "w")
    with pytest.raises(NotFound):
        ops.read("w", lambda _info, view: view.copy())
    assert ops.store.names() == []
    ops.create("w", F32, None, np.zeros(4, np.float32))  # the name is free again
    swept = ops.store.sweep()
    assert (swept.segments, swept.bytes) == (2, 2 * MiB), "the segments the dead delete had not unlinked"
    assert len(_segment_files(ops.store)) == 1
    assert ops.store.used_bytes == 4096


def test_killed_create_with_a_value_leaves_no_variable(ops: Ops) -> None:
    """A create killed while it copies its initial value in: no variable, not an uninitialized one."""
    _die(ops, "create-dies-filling", "c")
    with pytest.raises(NotFound):
        ops.info("c")
    assert ops.store.variable_count == 0
    swept = ops.store.sweep()
    assert (swept.segments, swept.bytes, swept.budget) == (1, MiB, MiB)
    assert _segment_files(ops.store) == []
    assert ops.store.used_bytes == 0
    info = ops.create("c", F32, None, np.full(4, 5.0, np.float32))
    assert info.initialized and info.version == 1


def test_sweep_spares_a_segment_a_live_create_is_filling(ops: Ops) -> None:
    """A sweep while another process fills a new variable's value keeps its segment; once it dies, not."""
    child = subprocess.Popen(
        [sys.executable, CHILD, "create-stalls-filling", ops.store.path, "c"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "filling"
        swept = ops.store.sweep()
        assert swept.segments == 0
        assert len(_segment_files(ops.store)) == 1
        assert ops.store.used_bytes == MiB, "a segment being filled stays in the budget"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert ops.store.sweep().segments == 1
    assert _segment_files(ops.store) == []


def test_server_attaching_to_a_store_sweeps_it_and_logs_what_it_reclaimed() -> None:
    """A server that attaches to a store a crash left orphans in reclaims them, logs it, and counts right."""
    path = fresh_store_path()
    store = Store.open(path, max_total_bytes=64 * MiB)
    try:
        ops = Ops(store)
        ops.create("kept", F32, None, np.ones(1024, np.float32))
        _die(ops, "create-dies-filling", "lost")
    finally:
        store.close()
    try:
        with ServerProcess(store=path) as server, Client(server.address) as ps:
            assert any("1 orphaned segments (1048576 bytes)" in line for line in server.log), "\n".join(
                server.log
            )
            assert ps.server_info().used_bytes == 4096
            np.testing.assert_array_equal(ps.read("kept"), np.ones(1024, np.float32))
            with pytest.raises(NotFoundError):
                ps.info("lost")
    finally:
        remove_store(path)


def test_supervisor_sweeps_when_it_replaces_a_dead_worker() -> None:
    """After a worker dies the supervisor sweeps the store: what a dead create left is reclaimed at once."""
    with ServerProcess() as server:
        store = Store.attach(server.store)
        try:
            _die(Ops(store), "create-dies-filling", "lost")
            assert len(_segment_files(store)) == 1
            os.kill(server.worker_pids()[0], signal.SIGKILL)
            assert wait_until(lambda: any("1 orphaned segments" in line for line in server.log))
            assert _segment_files(store) == []
            assert store.used_bytes == 0
        finally:
            store.close()
