"""Locked sparse updates and crashes: a process killed at any instant leaves all or none of its rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, TensorPSError
from tensorps.client.codec import dtype_of
from tensorps.server import row_ops
from tensorps.server.batch import BatchOp, run_batch
from tensorps.server.ops import Ops
from tensorps.server.optimizers import Flags
from tensorps.server.row_ops import RowArgs
from tensorps.server.store import Store
from tensorps.v1 import tensorps_pb2 as pb

CHILD = str(Path(__file__).with_name("rows_child.py"))
KILLS = 12 if os.environ.get("TENSORPS_SLOW") == "1" else 3
SHAPE = (4000, 8)


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_total_bytes=1 << 28)
    ops = Ops(store)
    for name in ("t", "t/accum"):
        ops.create(name, dtype_of("float32"), None, np.full(SHAPE, 1.0, np.float32))
    yield ops
    store.destroy()


def _die(ops: Ops, where: str, *names: str) -> None:
    child = subprocess.run([sys.executable, CHILD, ops.store.path, where, *names], check=False, timeout=60)
    assert child.returncode == 9, "the child should have died inside the update"


def _value(ops: Ops, name: str) -> np.ndarray:
    return ops.read(name, lambda _info, view: view.copy())


def _records(ops: Ops) -> list[str]:
    return [n for n in os.listdir(ops.store.path) if n.startswith(("undo-", "new-undo-"))]


@pytest.mark.parametrize("names", [("t",), ("t", "t/accum")], ids=["scatter_add", "sparse_apply_adagrad"])
def test_death_amid_the_rows_restores_every_old_row(ops: Ops, names: tuple[str, ...]) -> None:
    """Killed with half its rows written: the next holder of the stripe puts back every old row of the
    variable and its slot, and counts no version."""
    _die(ops, "ready", *names)
    for name in names:
        np.testing.assert_array_equal(_value(ops, name), np.ones(SHAPE, np.float32))
        assert ops.info(name).version == 1
    assert not _records(ops)


@pytest.mark.parametrize("names", [("t",), ("t", "t/accum")], ids=["scatter_add", "sparse_apply_adagrad"])
def test_death_after_the_last_row_counts_the_update(ops: Ops, names: tuple[str, ...]) -> None:
    """Killed after its last row, before its versions: the update stands whole and is counted once."""
    _die(ops, "written", *names)
    rows = np.arange(0, 2000, 2)
    value = _value(ops, names[0])
    assert len({float(x) for x in value[rows].ravel()}) == 1 and value[rows[0], 0] != 1.0
    np.testing.assert_array_equal(np.delete(value, rows, axis=0), 1.0)
    for name in names:
        assert ops.info(name).version == 2
    assert not _records(ops)


@pytest.mark.parametrize("names", [("t",), ("t", "t/accum")], ids=["scatter_add", "sparse_apply_adagrad"])
def test_atomic_batch_killed_before_its_commit_point_restores_the_rows(
    ops: Ops, names: tuple[str, ...]
) -> None:
    """An atomic batch writes a sparse update's rows in place before its commit point: killed there, the
    next holder of a stripe undoes the batch and puts every old row back."""
    _die(ops, "batch-commit", *names)
    for name in names:
        np.testing.assert_array_equal(_value(ops, name), np.ones(SHAPE, np.float32))
        assert ops.info(name).version == 1
    assert not _records(ops)
    assert not [n for n in os.listdir(ops.store.path) if n.startswith("commit-")]


@pytest.mark.parametrize("names", [("t",), ("t", "t/accum")], ids=["scatter_add", "sparse_apply_adagrad"])
def test_atomic_batch_killed_after_its_commit_point_keeps_the_rows(ops: Ops, names: tuple[str, ...]) -> None:
    """Killed after the commit point, before it counted the versions: the batch's rows stay, counted once."""
    _die(ops, "batch-count", *names)
    rows = np.arange(0, 2000, 2)
    value = _value(ops, names[0])
    assert len({float(x) for x in value[rows].ravel()}) == 1 and value[rows[0], 0] != 1.0
    np.testing.assert_array_equal(np.delete(value, rows, axis=0), 1.0)
    for name in names:
        assert ops.info(name).version == 2
    assert not _records(ops)


def test_sparse_writes_in_atomic_batches_copy_no_table(ops: Ops) -> None:
    """A sparse write in an atomic batch allocates no second buffer (the store's bytes in use stay put),
    and the batch's results are the single calls'."""
    rows = np.array([3, 3, 7], np.int64)
    ones = np.ones((3, SHAPE[1]), np.float32)
    batch = [
        BatchOp(pb.BATCH_OP_SCATTER_ADD, "t", read_value=False, rows=RowArgs((), (rows, ones))),
        BatchOp(
            pb.BATCH_OP_SPARSE_APPLY_ADAGRAD,
            "t/accum",
            read_value=False,
            rows=RowArgs(("t/accum2",), (np.asarray(0.5, np.float32), ones, rows), 0, Flags()),
        ),
    ]
    ops.create("t/accum2", dtype_of("float32"), None, np.full(SHAPE, 1.0, np.float32))
    used = ops.store.used_bytes
    results = run_batch(ops, batch, atomic=True, consume=lambda info, view: view.copy())
    assert [r.info.version for r in results if r.info is not None] == [2, 2]
    assert ops.store.used_bytes == used
    value = _value(ops, "t")
    np.testing.assert_array_equal(value[3], np.full(SHAPE[1], 3.0, np.float32))
    np.testing.assert_array_equal(value[7], np.full(SHAPE[1], 2.0, np.float32))
    assert ops.info("t/accum2").version == 2
    assert not _records(ops)


def test_death_while_saving_the_old_rows_changes_nothing(ops: Ops) -> None:
    """Killed while writing its undo record: no row was touched; the half record is dropped."""
    _die(ops, "prepare", "t")
    np.testing.assert_array_equal(_value(ops, "t"), np.ones(SHAPE, np.float32))
    assert ops.info("t").version == 1
    ops.store.sweep()
    assert not _records(ops)


def test_sigkilled_worker_during_large_locked_scatters_leaves_all_or_none() -> None:
    """A worker SIGKILLed at random moments while it applies locked scatter_adds of 200,000 rows: every
    touched row holds the same count (all or none of each update), untouched rows none (3 kills; 12 in the
    slow profile)."""
    rows = np.arange(0, 400_000, 2, dtype=np.int64)
    with ServerProcess(workers=1) as server, Client(server.address, timeout=60) as ps:
        ps.create("emb", value=np.zeros((400_000, 4), np.float32))
        rng = np.random.default_rng(5)
        for round_ in range(KILLS):
            pid = ps.server_info().pid
            writer = threading.Thread(target=_scatter, args=(server.address, rows))
            writer.start()
            time.sleep(float(rng.uniform(0.0, 0.3)))
            os.kill(pid, signal.SIGKILL)
            writer.join(60)
            value = _wait_for_table(server.address)
            touched = {float(x) for x in value[rows].ravel()}
            assert len(touched) == 1, f"round {round_}: a partial update {sorted(touched)[:5]}"
            assert not value[1::2].any()


def _scatter(address: str, rows: np.ndarray) -> None:
    try:
        with Client(address, timeout=60) as ps:
            for _ in range(50):
                ps.scatter_add("emb", rows, np.float32(1), use_locking=True)
    except TensorPSError:
        pass


def _wait_for_table(address: str) -> np.ndarray:
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(address, timeout=30) as ps:
                return ps.read("emb")
        except TensorPSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("locked", [False, True], ids=["unlocked", "locked"])
def test_a_retried_update_applies_once(ops: Ops, locked: bool) -> None:
    """The same request id twice (a client retrying after UNAVAILABLE): the second answers with the first's
    version and applies nothing, for a scatter and for a sparse apply with its slot."""
    rows = np.array([1, 5, 5], np.int64)
    ones = np.ones((3, SHAPE[1]), np.float32)
    scatter = RowArgs((), (rows, ones))
    first = row_ops.update(
        ops, pb.BATCH_OP_SCATTER_ADD, "t", scatter, use_locking=locked, read_value=False, request=b"a" * 16
    )
    again = row_ops.update(
        ops, pb.BATCH_OP_SCATTER_ADD, "t", scatter, use_locking=locked, read_value=False, request=b"a" * 16
    )
    assert first[0].version == again[0].version == 2
    np.testing.assert_array_equal(_value(ops, "t")[[1, 5]], [[2] * SHAPE[1], [3] * SHAPE[1]])
    adagrad = RowArgs(("t/accum",), (np.asarray(0.5, np.float32), ones, rows), 0, Flags())
    for _ in range(2):
        row_ops.update(
            ops,
            pb.BATCH_OP_SPARSE_APPLY_ADAGRAD,
            "t",
            adagrad,
            use_locking=locked,
            read_value=False,
            request=b"b" * 16,
        )
    assert ops.info("t").version == 3 and ops.info("t/accum").version == 2
    np.testing.assert_array_equal(_value(ops, "t/accum")[5], np.full(SHAPE[1], 3, np.float32))
