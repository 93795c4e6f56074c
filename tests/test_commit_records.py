"""Commit records of atomic batches that outlive their batch: two defects the chaos suite found.

Each test is a deterministic reproduction, expected to fail until the store is fixed (strict xfail: when it
passes, remove the mark).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from support import fresh_store_path
from tensorps.client.codec import dtype_of
from tensorps.server import commits
from tensorps.server.batch import ASSIGN, BatchOp, run_batch
from tensorps.server.ops import Ops
from tensorps.server.store import Store

CHILD = str(Path(__file__).with_name("batch_child.py"))
NAMES = ["a", "b", "x", "y"]


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_total_bytes=1 << 26)
    ops = Ops(store)
    for name in NAMES:
        ops.create(name, dtype_of("float32"), None, np.zeros(1 << 16, np.float32))
    yield ops
    store.destroy()


def _die_in_batch(ops: Ops, where: str, stamp: int, names: list[str]) -> None:
    child = subprocess.run(
        [sys.executable, CHILD, ops.store.path, where, str(stamp), *names], check=False, timeout=60
    )
    assert child.returncode == 9, "the child should have died inside the batch"


def _value(ops: Ops, name: str) -> set[float]:
    return {float(v) for v in ops.read(name, lambda _info, view: np.unique(view))}


def _records(ops: Ops) -> list[str]:
    return [n for n in os.listdir(ops.store.path) if n.startswith(commits.PREFIX)]


@pytest.mark.xfail(
    strict=True,
    reason="a batch killed after it unmarks its stripes and before it unlinks its record leaves a COMMITTED "
    "record that the next recovery (any stripe) replays, rolling variables back (chaos finding)",
)
def test_a_finished_batch_is_never_replayed(ops: Ops) -> None:
    """Killed between unmarking its stripes and removing its record: the batch is complete, yet its record
    stays; a later recovery for an unrelated batch must not flip its selectors again."""
    _die_in_batch(ops, "finish", 1, ["a", "b"])
    assert _value(ops, "a") == {1.0}
    ops.assign("a", np.full(1 << 16, 2.0, np.float32))  # acknowledged: version 3
    _die_in_batch(ops, "flip:1", 5, ["x", "y"])  # dies mid-publish: the next holder of its stripes recovers
    assert _value(ops, "x") == {5.0}
    assert _value(ops, "a") == {2.0}, "an acknowledged write was rolled back by a stale commit record"
    assert ops.info("a").version == 3
    assert not _records(ops)


@pytest.mark.xfail(
    strict=True,
    reason="CommitRecord() that cannot write its first byte (ENOSPC on a full tmpfs) leaves its file and an "
    "open, locked descriptor; empty orphan records are never removed (chaos finding)",
)
def test_a_record_that_cannot_be_written_is_removed(ops: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    """An atomic batch refused because the tmpfs is full leaves no record file and no open descriptor."""
    ops.assign("a", np.ones(1 << 16, np.float32))
    ops.assign("b", np.ones(1 << 16, np.float32))  # both have their second buffer: no allocation needed
    before = set(os.listdir("/proc/self/fd"))

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "pwrite", full)  # commits.py writes its records with os.pwrite
        with pytest.raises(OSError, match="No space left"):
            batch = [BatchOp(ASSIGN, n, np.full(1 << 16, 7.0, np.float32)) for n in ("a", "b")]
            run_batch(ops, batch, atomic=True, consume=lambda info, view: None)
    assert _value(ops, "a") == _value(ops, "b") == {1.0}
    leaked = sorted(set(os.listdir("/proc/self/fd")) - before)
    assert not _records(ops) and not leaked, f"records {_records(ops)}, descriptors {leaked}"
