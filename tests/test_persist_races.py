"""Persistence against in-place writes: unlocked updates racing a snapshot's cut, then a crash."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_wal import crashing

from support import ServerProcess, wait_until
from tensorps.client import Client, TensorPSError
from tensorps.server.persist import layout, records, restore
from tensorps.server.persist.journal import Journal
from tensorps.server.persist.records import Entry
from tensorps.server.persist.state import SharedState
from tensorps.server.store import Store

# float16 adds run slowly in numpy: a cut often falls amid an in-place add of this many elements.
ELEMENTS = 4 << 20


@pytest.mark.parametrize("op", ["assign_add", "scatter_add"])
def test_unlocked_adds_across_snapshot_cuts_lose_nothing(tmp_path: Path, op: str) -> None:
    """A same-host client adds ones in place (assign_add's and scatter_add's default, use_locking=False;
    the scatter to every row) while snapshots are taken: every snapshot passes its checksums and holds
    whole adds only (its version counting them), and with --wal always, after a SIGKILL, every
    acknowledged add is there in every element, once."""
    data_dir = tmp_path / "data"
    flags = (
        "--data-dir",
        str(data_dir),
        "--wal",
        "always",
        "--snapshot-every",
        "0",
        "--snapshot-keep",
        "1000",
    )
    adds = 0
    snapshots: list[str] = []
    with crashing(*flags) as server, Client(f"shm://{server.store}") as local:
        local.create("x", value=np.zeros((ELEMENTS // 8, 8), np.float16))
        stop = threading.Event()

        def snapshot_loop() -> None:
            with Client(server.address, timeout=60) as ps:
                while not stop.is_set():
                    snapshots.append(ps.snapshot().path)

        thread = threading.Thread(target=snapshot_loop)
        thread.start()
        try:
            ones = np.ones((ELEMENTS // 8, 8), np.float16)
            every_row = np.arange(ELEMENTS // 8)
            for _ in range(40):
                if op == "assign_add":
                    local.assign_add("x", ones, read_value=False)
                else:
                    local.scatter_add("x", every_row, ones)
                adds += 1
        finally:
            stop.set()
            thread.join(60)
        assert np.all(local.read("x") == adds)
    assert len(snapshots) >= 2, snapshots
    for path in snapshots:
        _generation, (x,) = restore.read_snapshot(path)  # raises CorruptSnapshot on a checksum
        array = x.array()
        assert array is not None
        held = np.unique(array)
        assert len(held) == 1 and x.version == 1 + int(held[0]), (path, held[:4], x.version)
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        value = ps.read("x")
        wrong = np.flatnonzero(value != adds)
        assert wrong.size == 0, (adds, wrong.size, np.unique(value[wrong])[:4])
        assert ps.info("x").version == 1 + adds
    assert not any("refused" in line or "not applied" in line for line in again.log), again.log
    assert layout.snapshots(str(data_dir))


KILLS = 10 if os.environ.get("TENSORPS_SLOW") == "1" else 3
ROWS_CHILD = str(Path(__file__).with_name("rows_child.py"))


@pytest.mark.parametrize("where", ["logged", "batch-commit"], ids=["single-call", "atomic-batch"])
def test_an_update_whose_writer_died_after_logging_it_replays_as_undone(tmp_path: Path, where: str) -> None:
    """A same-host process killed amid a locked scatter_add (a single call, its log record appended and no
    row written; an atomic batch, logged and its rows written, before its commit point): the next writer
    of the table puts the old rows back (undo), and the log says so, so that a crash later restores what
    the server held (not the dead update, and every write after it)."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    with crashing(*flags) as server, Client(server.address) as ps:
        ps.create("t", value=np.ones((4000, 8), np.float32))
        child = subprocess.run(
            [sys.executable, ROWS_CHILD, server.store, where, "t"], check=False, timeout=60
        )
        assert child.returncode == 9, "the child should have died inside the update"
        ps.scatter_add("t", np.array([1]), np.full((1, 8), 5, np.float32), use_locking=True)
        before = (ps.info("t"), ps.read("t"))
    assert before[0].version == 2 and before[1][0, 0] == 1 and before[1][1, 0] == 6
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        assert ps.info("t") == before[0]
        np.testing.assert_array_equal(ps.read("t"), before[1])
    assert not any("not applied" in line for line in again.log), again.log


def test_a_crash_amid_a_snapshot_leaves_the_previous_one_and_the_log(tmp_path: Path) -> None:
    """The whole server SIGKILLed while it writes a snapshot: its half-written directory is never restored
    from (the previous snapshot and the logs after it are), and the next snapshot sweeps it away."""
    data_dir = tmp_path / "data"
    flags = ("--data-dir", str(data_dir), "--wal", "always", "--snapshot-every", "0")
    rng = np.random.default_rng(11)
    with crashing(*flags) as server, Client(server.address, timeout=60) as ps:
        for i in range(4):
            ps.create(f"big{i}", value=rng.standard_normal(4 << 20))  # 32 MiB each: a slow snapshot
        first = ps.snapshot()
        ps.assign_add("big0", np.ones(4 << 20))
        before = {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()}
        taker = threading.Thread(target=_snapshot_until_killed, args=(server.address,))
        taker.start()
        assert wait_until(lambda: any(p.name.startswith(".partial") for p in data_dir.iterdir()), 30)
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        taker.join(60)
    assert [p.name for p in data_dir.glob("snap-*")] == [Path(first.path).name]
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address, timeout=60) as ps:
        assert {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()} == before
        assert any(first.path in line and "restored" in line for line in again.log), again.log
        ps.snapshot()
        assert not any(p.name.startswith(".partial") for p in data_dir.iterdir())


def _snapshot_until_killed(address: str) -> None:
    with contextlib.suppress(TensorPSError), Client(address, timeout=60) as ps:
        ps.snapshot()


def test_a_worker_killed_amid_locked_scatters_leaves_a_log_that_replays_to_the_server(tmp_path: Path) -> None:
    """A worker SIGKILLed at random moments while it applies large locked scatter_adds (its record maybe
    logged, its rows undone by the supervisor's sweep): after a later write and a crash of the whole
    server, the restore equals what the server held (3 kills; 10 in the slow profile)."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    rows = np.arange(0, 400_000, 2, dtype=np.int64)
    rng = np.random.default_rng(7)
    with crashing(*flags, workers=1) as server, Client(server.address, timeout=60) as ps:
        ps.create("emb", value=np.zeros((400_000, 4), np.float32))
        for _ in range(KILLS):
            pid = ps.server_info().pid
            writer = threading.Thread(target=_scatter_until_killed, args=(server.address, rows))
            writer.start()
            time.sleep(float(rng.uniform(0.05, 0.3)))
            os.kill(pid, signal.SIGKILL)
            writer.join(60)
            assert wait_until(server.healthy, 30)
        ps.scatter_add("emb", np.array([1]), np.float32(7), use_locking=True)
        before = (ps.info("emb"), ps.read("emb"))
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address, timeout=60) as ps:
        assert ps.info("emb") == before[0]
        np.testing.assert_array_equal(ps.read("emb"), before[1])
    assert not any("not applied" in line for line in again.log), again.log


def _scatter_until_killed(address: str, rows: np.ndarray) -> None:
    with contextlib.suppress(TensorPSError), Client(address, timeout=60) as ps:
        for _ in range(50):
            ps.scatter_add("emb", rows, np.float32(1), use_locking=True)


def test_racing_unlocked_adds_replay_as_if_one_after_another(tmp_path: Path) -> None:
    """Threads adding ones to one variable without locks race in memory (an add may be lost, as in TF);
    the log replays them in its order: every acknowledged add counted once, versions as the server's."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    threads, adds = 4, 50
    with crashing(*flags) as server, Client(f"shm://{server.store}") as local:
        local.create("c", value=np.zeros(1 << 16, np.int64))

        def add() -> None:
            ones = np.ones(1 << 16, np.int64)
            for _ in range(adds):
                local.assign_add("c", ones, read_value=False)

        workers = [threading.Thread(target=add) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(60)
        held = local.read("c")
        assert local.info("c").version == 1 + threads * adds
        assert held.max() <= threads * adds
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        assert np.all(ps.read("c") == threads * adds)
        assert ps.info("c").version == 1 + threads * adds


@pytest.mark.parametrize("what", ["atomic-batch", "dense-apply"])
def test_a_write_whose_store_is_full_logs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """An atomic batch whose rows' undo record cannot be made, a locked dense apply whose commit record
    cannot be made (the store's filesystem full): the call fails and changes nothing, in memory and in
    the log, so a later crash restores what the server held."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    with crashing(*flags) as server, Client(f"shm://{server.store}") as local:
        local.create("t", value=np.zeros((1000, 4), np.float32))
        local.create("w", value=np.zeros(4, np.float32))

        def full(self: Store) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        local.create("w/momentum", value=np.zeros(4, np.float32))
        with monkeypatch.context() as patched:
            if what == "atomic-batch":
                patched.setattr(Store, "undo_record", full)
                with pytest.raises(TensorPSError), local.pipeline(atomic=True) as pipe:
                    pipe.scatter_add("t", np.array([1, 2]), np.ones((2, 4), np.float32), use_locking=True)
                    pipe.assign_add("w", np.ones(4, np.float32), use_locking=True)
            else:
                patched.setattr(Store, "commit_record", full)
                with pytest.raises(TensorPSError):
                    local.apply_momentum(
                        "w", "w/momentum", 0.5, np.ones(4, np.float32), 0.75, use_locking=True
                    )
        assert not local.read("t").any() and local.info("t").version == 1
        assert not local.read("w").any() and local.info("w").version == 1
        local.assign_add("w", np.full(4, 2, np.float32), use_locking=True)
        before = {i.name: (i, local.read(i.name).tobytes()) for i in local.list()}
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        assert {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()} == before
    assert not any("not applied" in line for line in again.log), again.log


def test_a_restart_on_the_existing_store_logs_what_its_sweep_undoes(tmp_path: Path) -> None:
    """A same-host process dies amid a locked scatter_add it had logged, then the whole server is
    SIGKILLed and started again on its surviving store: the start's sweep undoes the update and logs it,
    so that a later restore from the data directory equals what the server held."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0")
    with crashing(*flags) as server, Client(server.address) as ps:
        ps.create("t", value=np.ones((4000, 8), np.float32))
        child = subprocess.run(
            [sys.executable, ROWS_CHILD, server.store, "logged", "t"], check=False, timeout=60
        )
        assert child.returncode == 9, "the child should have died inside the update"
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        store = server.store
        with crashing(*flags, workers=1, store=store) as again, Client(again.address) as ps2:
            ps2.scatter_add("t", np.array([1]), np.full((1, 8), 5, np.float32), use_locking=True)
            before = (ps2.info("t"), ps2.read("t"))
    assert before[0].version == 2 and before[1][0, 0] == 1 and before[1][1, 0] == 6
    with ServerProcess(*flags, "--no-snapshot-on-exit") as last, Client(last.address) as ps:
        assert ps.info("t") == before[0]
        np.testing.assert_array_equal(ps.read("t"), before[1])
    assert not any("not applied" in line for line in last.log), last.log


def test_a_restart_on_the_existing_store_without_a_data_dir_persists_nothing(tmp_path: Path) -> None:
    """The store outlives a server that persisted; started again on it without --data-dir, the server
    (and a same-host client) logs nothing to the old directory, which it does not hold."""
    data_dir = tmp_path / "data"
    with crashing("--data-dir", str(data_dir), "--wal", "always", "--snapshot-every", "0") as server:
        with Client(server.address) as ps:
            ps.create("v", value=np.zeros(4))
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        logs = {p.name: p.stat().st_size for p in data_dir.glob("wal-*.log")}
        with (
            crashing(workers=1, store=server.store) as again,
            Client(again.address) as ps,
            Client(f"shm://{again.store}") as local,
        ):
            ps.assign("v", np.ones(4))
            local.assign("v", np.full(4, 2.0))
            assert not ps.server_info().data_dir
    assert {p.name: p.stat().st_size for p in data_dir.glob("wal-*.log")} == logs


SNAPSHOT_DIES = """
import os, sys
from tensorps.server.ops import Ops
from tensorps.server.persist import snapshot
from tensorps.server.store import Store

def die(*args, **kwargs):
    os._exit(9)

snapshot._write = die  # after the cut: every buffer pinned
ops = Ops(Store.attach(sys.argv[1]))
assert ops.persistence is not None
ops.persistence.snapshot(ops)
"""


def test_the_pins_of_a_snapshot_whose_process_died_are_dropped(tmp_path: Path) -> None:
    """A same-host process dies amid its snapshot, its buffers pinned: writes do not go on copying whole
    values for a snapshot that will never finish (an unlocked add writes in place again, a locked
    scatter writes its rows in place), and the next snapshot is taken as usual."""
    flags = ("--data-dir", str(tmp_path / "data"), "--snapshot-every", "0", "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server, Client(f"shm://{server.store}") as local:
        local.create("t", value=np.zeros((1000, 4), np.float32))
        child = subprocess.run([sys.executable, "-c", SNAPSHOT_DIES, server.store], check=False, timeout=60)
        assert child.returncode == 9, "the child should have died amid its snapshot"
        store = Store.attach(server.store)
        try:
            slot = store.find("t")
            assert slot is not None
            segment = store.active(slot).segment
            local.assign_add("t", np.ones((1000, 4), np.float32))  # unlocked: in place unless pinned
            local.scatter_add("t", np.array([3]), np.ones((1, 4), np.float32), use_locking=True)
            assert store.active(slot).segment == segment
        finally:
            store.close()
        assert local.snapshot().variables == 1
        assert local.read("t").sum() == 4004


def test_two_workers_and_a_shm_client_writing_the_same_variables_replay_exactly(tmp_path: Path) -> None:
    """Remote clients (two workers) and a same-host client interleave locked writes of every kind on the
    same variables, snapshots in between: after a SIGKILL the restore equals, bytes and versions, what
    the server held once they stopped."""
    data_dir = str(tmp_path / "data")
    flags = ("--data-dir", data_dir, "--wal", "always", "--snapshot-every", "0.3")
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(target: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(target, timeout=30) as ps:
                while not stop.is_set():
                    rows = rng.integers(0, 64, 8)
                    step = int(rng.integers(0, 6))
                    if step == 0:
                        ps.assign_add("shared", np.ones(16), use_locking=True, read_value=False)
                    elif step == 1:
                        ps.scatter_add("table", rows, np.ones((8, 4), np.float32), use_locking=True)
                    elif step == 2:
                        grad = rng.standard_normal((8, 4)).astype(np.float32)
                        ps.sparse_apply_adagrad("table", "table/accum", 0.125, grad, rows, use_locking=True)
                    elif step == 3:
                        ps.apply_gradient_descent("dense", 0.5, rng.standard_normal(16), use_locking=True)
                    elif step == 4:
                        with ps.pipeline(atomic=True) as pipe:
                            pipe.assign_sub("shared", np.ones(16), use_locking=True)
                            pipe.scatter_update(
                                "table", rows[:1], np.full((1, 4), 2, np.float32), use_locking=True
                            )
                            pipe.assign("dense", np.full(16, float(seed)))
                    else:
                        ps.assign("shared", np.full(16, float(seed)), read_value=False)
        except BaseException as exc:
            errors.append(exc)

    with crashing(*flags) as server:
        with Client(server.address) as ps:
            ps.create("shared", value=np.zeros(16))
            ps.create("dense", value=np.zeros(16))
            ps.create("table", value=np.zeros((64, 4), np.float32))
            ps.create("table/accum", value=np.full((64, 4), 0.1, np.float32))
        targets = [server.address, server.address, f"shm://{server.store}"]
        threads = [threading.Thread(target=writer, args=(t, i)) for i, t in enumerate(targets)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        with Client(server.address) as ps:
            before = {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()}
            assert all(i.version > 20 for i, _ in before.values()), before
    with ServerProcess(*flags, "--no-snapshot-on-exit") as again, Client(again.address) as ps:
        assert {i.name: (i, ps.read(i.name).tobytes()) for i in ps.list()} == before
    assert not any("not applied" in line for line in again.log), again.log


def test_group_commit_survives_a_generation_change_amid_its_fsync(tmp_path: Path) -> None:
    """Threads of one process append and wait for durability (--wal always) while snapshots keep starting
    new log generations: the appender that moves to the new file and a thread waiting for its fsync never
    wait for each other (a deadlock held the appender's stripes for ever)."""
    data_dir, store_dir = tmp_path / "data", tmp_path / "store"
    data_dir.mkdir()
    store_dir.mkdir()
    state = SharedState(str(store_dir))
    state.generation = 1
    journal = Journal(str(data_dir), "always", state)
    stop = threading.Event()
    counts = [0] * 6

    def append(index: int) -> None:
        value = np.zeros(1024, np.float32)
        while not stop.is_set():
            ticket = journal.append([Entry(records.PUT, f"v{index}", 1, (1024,), True, 1, value)])
            journal.sync(ticket)
            counts[index] += 1

    threads = [threading.Thread(target=append, args=(i,), daemon=True) for i in range(len(counts))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(200):
            state.generation += 1  # a snapshot's cut
            time.sleep(0.002)
    finally:
        stop.set()
        deadline = time.monotonic() + 20
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [i for i, thread in enumerate(threads) if thread.is_alive()]
    assert not stuck, f"appenders {stuck} deadlocked (appended {counts})"
    journal.close()
    state.close()
