"""Atomic batches and crashes: a process killed at any instant of a publish leaves none or all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, TensorPSError
from tensorps.client.codec import dtype_of
from tensorps.server.ops import NotFound, OpError, Ops
from tensorps.server.store import Store

CHILD = str(Path(__file__).with_name("batch_child.py"))
NAMES = [f"w{i}" for i in range(6)]


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_total_bytes=1 << 30)
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


def _stamps(ops: Ops, names: list[str]) -> set[float]:
    found = set()
    for name in names:
        value = ops.read(name, lambda _info, view: view.copy())
        found |= {float(value[0]), float(value[-1])}
    return found


@pytest.mark.parametrize("flips", [1, 3, 5])
def test_death_after_the_commit_point_is_redone(ops: Ops, flips: int) -> None:
    """Killed after `flips` of six selector flips: the next process to take a stripe finishes the batch."""
    _die_in_batch(ops, f"flip:{flips}", 7, NAMES)
    assert _stamps(ops, NAMES) == {7.0}
    assert all(ops.info(name).version == 2 for name in NAMES)
    assert not [n for n in os.listdir(ops.store.path) if n.startswith("commit-")], "the record stays behind"


def test_death_before_the_commit_point_is_undone(ops: Ops) -> None:
    """Killed at the commit point with creations done and buffers filled: nothing of the batch remains."""
    _die_in_batch(ops, "commit", 5, [*NAMES, "+fresh", "+other"])
    assert _stamps(ops, NAMES) == {0.0}
    assert all(ops.info(name).version == 1 for name in NAMES)
    for name in ("fresh", "other"):
        with pytest.raises(OpError) as caught:
            ops.info(name)
        assert isinstance(caught.value, NotFound)
    assert ops.store.variable_count == len(NAMES)


def test_reader_of_one_variable_recovers_the_whole_batch(ops: Ops) -> None:
    """Reading just one variable of a half-published batch replays the batch for all of them first."""
    _die_in_batch(ops, "flip:2", 3, NAMES)
    assert _stamps(ops, [NAMES[-1]]) == {3.0}
    raw = {float(ops.read(n, lambda _i, v: v.copy())[0]) for n in NAMES}
    assert raw == {3.0}


@pytest.mark.slow
def test_sigkilled_worker_during_large_atomic_batches_leaves_all_or_none() -> None:
    """A worker SIGKILLed at random moments while it receives and publishes 48 MiB atomic batches."""
    names = [f"big{i}" for i in range(6)]
    with ServerProcess(workers=1) as server, Client(server.address, timeout=60) as ps:
        ps.create_many({n: {"value": np.zeros(2 << 20, np.float32)} for n in names})
        rng = np.random.default_rng(3)
        for round_ in range(12):
            stamp = float(round_ + 1)
            values = {n: np.full(2 << 20, stamp, np.float32) for n in names}
            pid = ps.server_info().pid
            writer = threading.Thread(target=_try_assign, args=(server.address, values))
            writer.start()
            time.sleep(float(rng.uniform(0.0, 0.25)))
            os.kill(pid, signal.SIGKILL)
            writer.join(60)
            seen = _wait_for_stamps(server.address, names)
            assert len(seen) == 1, f"round {round_}: a partial batch {seen}"


def _try_assign(address: str, values: dict[str, Any]) -> None:
    try:
        with Client(address, timeout=60) as ps:
            ps.assign_many(values, atomic=True)
    except TensorPSError:
        pass


def _wait_for_stamps(address: str, names: list[str]) -> set[float]:
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(address, timeout=30) as ps:
                pulled = ps.read_many(names)
            return {float(v[0]) for v in pulled.values()} | {float(v[-1]) for v in pulled.values()}
        except TensorPSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
