"""Persistence against in-place writes: unlocked updates racing a snapshot's cut, then a crash."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from test_wal import crashing

from support import ServerProcess
from tensorps.client import Client
from tensorps.server.persist import layout, restore

# float16 adds run slowly in numpy: a cut often falls amid an in-place add of this many elements.
ELEMENTS = 4 << 20


def test_unlocked_adds_across_snapshot_cuts_lose_nothing(tmp_path: Path) -> None:
    """A same-host client adds ones in place (assign_add's default, use_locking=False) while snapshots are
    taken: every snapshot passes its checksums and holds whole adds only (its version counting them),
    and with --wal always, after a SIGKILL, every acknowledged add is there in every element, once."""
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
        local.create("x", value=np.zeros(ELEMENTS, np.float16))
        stop = threading.Event()

        def snapshot_loop() -> None:
            with Client(server.address, timeout=60) as ps:
                while not stop.is_set():
                    snapshots.append(ps.snapshot().path)

        thread = threading.Thread(target=snapshot_loop)
        thread.start()
        try:
            ones = np.ones(ELEMENTS, np.float16)
            for _ in range(40):
                local.assign_add("x", ones, read_value=False)
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
