"""The write-ahead log: a server SIGKILLed under load, then restarted on the same data directory."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, TensorPSError

WRITERS = 4


class Load:
    """Writer threads, each assigning 1, 2, 3, ... to a variable of its own (locked writes), plus one
    adding to a shared counter and one running atomic batches; every acknowledged write is noted with
    the time of its acknowledgement."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.acked: dict[str, list[tuple[float, int]]] = {f"w{i}": [] for i in range(WRITERS)}
        self.adds: list[float] = []
        self.stop = threading.Event()
        self.threads = [
            *(threading.Thread(target=self._assigns, args=(f"w{i}",)) for i in range(WRITERS)),
            threading.Thread(target=self._counter),
            threading.Thread(target=self._batches),
        ]

    def setup(self, ps: Client) -> None:
        for name in self.acked:
            ps.create(name, value=np.zeros(256, np.int64))
        ps.create("counter", value=np.zeros(4, np.int64))
        ps.create("a", value=np.zeros(8, np.int64))
        ps.create("b", value=np.zeros(8, np.int64))

    def _loop(self, step: Callable[[Client, int], None]) -> None:
        try:
            with Client(self.address, timeout=5) as ps:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    step(ps, i)
        except TensorPSError:
            pass  # the server was killed

    def _assigns(self, name: str) -> None:
        def step(ps: Client, i: int) -> None:
            ps.assign(name, np.full(256, i, np.int64), read_value=False)
            self.acked[name].append((time.monotonic(), i))

        self._loop(step)

    def _counter(self) -> None:
        def step(ps: Client, i: int) -> None:
            ps.assign_add("counter", np.ones(4, np.int64), use_locking=True, read_value=False)
            self.adds.append(time.monotonic())

        self._loop(step)

    def _batches(self) -> None:
        def step(ps: Client, i: int) -> None:
            with ps.pipeline(atomic=True) as pipe:
                pipe.assign_add("a", np.full(8, i, np.int64), use_locking=True)
                pipe.assign_sub("b", np.full(8, i, np.int64), use_locking=True)

        self._loop(step)

    def run_then_kill(self, server: ServerProcess, seconds: float) -> float:
        """Run the load, SIGKILL the server's whole process group under it; returns the kill's time."""
        for thread in self.threads:
            thread.start()
        time.sleep(seconds)
        killed = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        return killed


@contextlib.contextmanager
def crashing(*flags: str, workers: int = 2, store: str | None = None) -> Iterator[ServerProcess]:
    """A server (2 workers by default) in a process group of its own, SIGKILLed whole when the block ends
    (if the block did not already), its store then removed, as after a reboot."""
    server = ServerProcess(*flags, workers=workers, session=True, store=store)
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        server.kill()


def _crash_and_restart(
    tmp_path: Path, *flags: str, seconds: float = 1.5
) -> tuple[Load, float, Client, ServerProcess]:
    data_dir = str(tmp_path / "data")
    with crashing("--data-dir", data_dir, *flags) as server:
        load = Load(server.address)
        with Client(server.address) as ps:
            load.setup(ps)
        killed = load.run_then_kill(server, seconds)
    assert all(load.acked.values()) and load.adds, "the load acknowledged nothing before the kill"
    again = ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit", *flags)
    return load, killed, Client(again.address), again


def _check_consistent(ps: Client) -> None:
    """What any restored state must be: atomic batches whole, versions matching the values."""
    a, b = ps.read("a"), ps.read("b")
    assert np.array_equal(a + b, np.zeros(8, np.int64))
    counter = ps.read("counter")
    assert ps.info("counter").version == 1 + int(counter[0])


def test_wal_always_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """--wal always: after a SIGKILL of the whole server under load, every acknowledged write is there
    (and at most the one in flight more), versions included."""
    load, _killed, ps, server = _crash_and_restart(tmp_path, "--wal", "always", "--snapshot-every", "0.5")
    with server, ps:
        for name, acked in load.acked.items():
            value = int(ps.read(name)[0])
            assert value in (acked[-1][1], acked[-1][1] + 1), (name, value, acked[-1])
            assert ps.info(name).version == value + 1
        assert int(ps.read("counter")[0]) in (len(load.adds), len(load.adds) + 1)
        _check_consistent(ps)
    assert any("restored" in line and "log records" in line for line in server.log), server.log


def test_wal_everysec_loses_at_most_about_a_second(tmp_path: Path) -> None:
    """--wal everysec: everything acknowledged more than ~1 s before the kill is there."""
    # The load runs 3 s, so that writes acknowledged more than 1.5 s before the kill exist to be checked.
    load, killed, ps, server = _crash_and_restart(tmp_path, "--wal", "everysec", seconds=3.0)
    with server, ps:
        for name, acked in load.acked.items():
            value = int(ps.read(name)[0])
            older = [i for t, i in acked if t < killed - 1.5]
            assert older, f"{name}: nothing was acknowledged 1.5 s before the kill"
            assert value >= (older[-1] if older else 0), (name, value)
            assert value <= acked[-1][1] + 1
            assert ps.info(name).version == value + 1
        _check_consistent(ps)


def test_without_a_log_a_crash_restores_exactly_the_last_snapshot(tmp_path: Path) -> None:
    """--wal off: the restart holds exactly the state of the last snapshot, nothing after it."""
    data_dir = str(tmp_path / "data")
    with crashing("--data-dir", data_dir) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(16, np.int32))
        ps.assign("v", np.full(16, 1, np.int32))
        info = ps.snapshot()
        ps.assign("v", np.full(16, 2, np.int32))
        ps.create("after", value=np.zeros(1))
    with ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        assert [i.name for i in ps.list()] == ["v"]
        assert ps.read("v").tolist() == [1] * 16 and ps.info("v").version == 2
    assert any(info.path in line for line in again.log)


@pytest.mark.parametrize("damage", ["torn tail", "flipped byte in the last record"])
def test_a_damaged_log_tail_is_truncated_at_the_last_whole_record(tmp_path: Path, damage: str) -> None:
    """A log whose last record is torn or fails its checksum: replayed up to the record before, the tail
    cut off, one log line naming the file."""
    data_dir = tmp_path / "data"
    flags = ("--data-dir", str(data_dir), "--wal", "always", "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(100, np.float64))
        for i in range(1, 6):
            ps.assign("v", np.full(100, i, np.float64))
    (log_path,) = data_dir.glob("wal-*.log")
    data = log_path.read_bytes()
    if damage == "torn tail":
        log_path.write_bytes(data[:-100])
    else:
        log_path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        assert ps.read("v").tolist() == [4.0] * 100 and ps.info("v").version == 5
        ps.assign("v", np.full(100, 9, np.float64))  # appended after the cut: replayed next time
    truncated = [line for line in server.log if "truncated a torn tail" in line]
    assert len(truncated) == 1 and str(log_path) in truncated[0], server.log
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        assert ps.read("v").tolist() == [9.0] * 100 and ps.info("v").version == 6


def test_every_kind_of_write_replays_to_the_same_state(tmp_path: Path) -> None:
    """Creates (with and without values), deletes, locked and unlocked assigns (one that reshapes),
    assign_add/sub locked and unlocked, in-order and atomic batches: after a SIGKILL, the log replays to
    exactly the state the server held, versions included."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    with crashing(*flags) as server, Client(server.address) as ps:
        ps.create("declared", dtype="float32", shape=(3,))
        ps.create("unknown", dtype="int16")
        ps.create("v", value=np.arange(6, dtype=np.float64))
        ps.create("gone", value=np.ones(2))
        ps.assign("declared", np.ones(3, np.float32), use_locking=False)
        ps.assign("v", np.full(6, 2.5), use_locking=False)
        ps.assign("v", np.full((2, 4), 1.5), validate_shape=False)
        ps.assign_add("v", np.ones((2, 4)))  # unlocked, in place
        ps.assign_sub("v", np.full((2, 4), 0.25), use_locking=True)
        ps.assign("unknown", np.array([[1, 2]], np.int16))
        ps.delete("gone")
        with ps.pipeline() as pipe:
            pipe.assign_add("unknown", np.array([[10, 20]], np.int16))
            pipe.create("piped", value=np.zeros(1, np.uint8))
        with ps.pipeline(atomic=True) as pipe:
            pipe.create("atomic", dtype="complex64")
            pipe.assign("atomic", np.array([1j], np.complex64))
            pipe.assign_add("piped", np.ones(1, np.uint8), use_locking=True)
        before = {i.name: (i, ps.read(i.name).tobytes() if i.initialized else None) for i in ps.list()}
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        after = {i.name: (i, ps.read(i.name).tobytes() if i.initialized else None) for i in ps.list()}
    assert after == before
    assert not any("not applied" in line for line in again.log), again.log


def test_a_snapshot_starts_a_new_log_and_pruning_removes_old_ones(tmp_path: Path) -> None:
    """Each snapshot begins the next log generation; logs older than the oldest kept snapshot go."""
    data_dir = tmp_path / "data"
    flags = (
        "--data-dir",
        str(data_dir),
        "--wal",
        "everysec",
        "--snapshot-keep",
        "2",
        "--no-snapshot-on-exit",
    )
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(4))
        generations = []
        for i in range(4):
            ps.assign("v", np.full(4, float(i)))
            generations.append(ps.snapshot().generation)
        ps.assign("v", np.full(4, 9.0))
    snapshots = sorted(p.name for p in data_dir.glob("snap-*"))
    logs = sorted(p.name for p in data_dir.glob("wal-*.log"))
    assert snapshots == [f"snap-{g:010d}" for g in generations[-2:]]
    assert logs == [f"wal-{g:010d}.log" for g in (generations[-2], generations[-1])]
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        assert ps.read("v").tolist() == [9.0] * 4 and ps.info("v").version == 6


def test_row_updates_and_optimizers_replay_to_the_same_state(tmp_path: Path) -> None:
    """Scatters and sparse applies (logged as their new rows), dense optimizer applies (their new values),
    locked and unlocked, single and in an atomic batch: after a SIGKILL the log replays to exactly the
    state the server held."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    rng = np.random.default_rng(3)
    with crashing(*flags) as server, Client(server.address) as ps:
        ps.create("table", value=rng.standard_normal((50, 4)).astype(np.float32))
        ps.create("accum", value=np.full((50, 4), 0.1, np.float32))
        ps.create("w", value=rng.standard_normal(8))
        ps.scatter_add("table", np.array([1, 7, 7]), np.ones((3, 4), np.float32))  # unlocked
        ps.scatter_update("table", np.array([3]), np.full((1, 4), 5, np.float32), use_locking=True)
        ps.sparse_apply_adagrad(
            "table", "accum", np.float32(0.1), np.ones((2, 4), np.float32), np.array([0, 9])
        )
        ps.apply_gradient_descent("w", np.float64(0.5), np.ones(8), use_locking=True)
        ps.scatter_sub("table", np.array([2]), np.ones((1, 4), np.float32), use_locking=True)
        ps.info("table")
        with ps.pipeline(atomic=True) as pipe:
            pipe.scatter_add("table", np.array([4, 5]), np.ones((2, 4), np.float32), use_locking=True)
            pipe.assign_add("w", np.ones(8), use_locking=True)
        snapshot = ps.snapshot()  # the rows after it go to the next log
        ps.scatter_max("table", np.array([6]), np.full((1, 4), 9, np.float32), use_locking=True)
        before = {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()}
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        after = {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()}
    assert after == before
    assert any(snapshot.path in line and "restored" in line for line in again.log), again.log
    assert not any("not applied" in line for line in again.log), again.log
