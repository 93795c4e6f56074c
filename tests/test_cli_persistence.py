"""`tensorps snapshot` and `tensorps restore` against real servers and real snapshot files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from cluster_support import free_ports
from test_cli import tensorps

from support import ServerProcess
from tensorps.client import Client
from tensorps.client.cluster import ClusterClient

VALUES: dict[str, np.ndarray[Any, Any]] = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "c": np.array([1 + 2j, -3.5j], np.complex128),
    "h": np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16),
    "empty": np.zeros((0, 3), np.int64),
}


def _fill(ps: Client) -> None:
    for name, value in VALUES.items():
        ps.create(name, value=value)
    ps.create("later", dtype="float32", shape=(2,))  # uninitialized
    ps.create("anyshape", dtype="int32")  # unknown shape, uninitialized


def test_snapshot_then_restore_into_another_server(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as source,
        Client(source.address) as ps,
    ):
        _fill(ps)
        taken = tensorps("--target", source.address, "--json", "snapshot")
        assert taken.code == 0, taken.stderr
        snap = taken.json()
        assert snap["variables"] == 6 and os.path.isdir(snap["path"])
        text = tensorps("--target", source.address, "snapshot")
        assert text.code == 0 and "writes paused" in text.stdout
    with ServerProcess() as target, Client(target.address) as ps:
        ps.create("w", value=np.zeros(2, np.float32))  # exists: assigned, its shape changes
        ps.create("untouched", value=np.ones(1, np.float32))  # not in the snapshot: left alone
        dry = tensorps("--target", target.address, "--json", "restore", "--dry-run", snap["path"])
        assert dry.code == 0, dry.stderr
        assert dry.json()["assigned"] == ["w"] and "later" in dry.json()["created"]
        np.testing.assert_array_equal(ps.read("w"), np.zeros(2, np.float32))  # a dry run writes nothing
        done = tensorps("--target", target.address, "--json", "restore", snap["path"])
        assert done.code == 0, done.stderr
        assert sorted(done.json()["created"]) == ["anyshape", "c", "empty", "h", "later"]
        for name, value in VALUES.items():
            got = np.asarray(ps.read(name))
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
        assert not ps.info("later").initialized and ps.info("later").shape == (2,)
        assert ps.info("anyshape").shape is None
        np.testing.assert_array_equal(ps.read("untouched"), np.ones(1, np.float32))


def test_restore_of_a_damaged_snapshot_writes_nothing(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as source,
        Client(source.address) as ps,
    ):
        _fill(ps)
        path = ps.snapshot().path
    shard = next(p for p in Path(path).iterdir() if p.suffix == ".safetensors")
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with ServerProcess() as target, Client(target.address) as ps:
        result = tensorps("--target", target.address, "restore", path)
        assert result.code == 2 and "checksum" in result.stderr and shard.name in result.stderr
        assert ps.list() == []


def test_snapshot_needs_a_data_dir_and_restore_works_over_shm(tmp_path: Path) -> None:
    with ServerProcess() as plain:
        refused = tensorps("--target", plain.address, "snapshot")
        assert refused.code == 1 and "FAILED_PRECONDITION" in refused.stderr
    data_dir = str(tmp_path / "data")
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as source,
        Client(source.address) as ps,
    ):
        _fill(ps)
        local = tensorps("--target", f"shm://{source.store}", "--json", "snapshot")
        assert local.code == 0, local.stderr
        path = local.json()["path"]
    with ServerProcess() as target:
        done = tensorps("--target", f"shm://{target.store}", "restore", "--prefix", "w", path)
        assert done.code == 0, done.stderr
        with Client(target.address) as ps:
            assert [info.name for info in ps.list()] == ["w"]
            np.testing.assert_array_equal(ps.read("w"), VALUES["w"])


def test_a_cluster_snapshots_every_shard(tmp_path: Path) -> None:
    """ClusterClient.snapshot() and `tensorps snapshot` on a cluster target: one snapshot per shard, each
    on its own data directory, in shard order."""
    ports = free_ports(2)
    members = ",".join(f"127.0.0.1:{port}" for port in ports)
    servers: list[ServerProcess] = []
    try:
        for i, port in enumerate(ports):
            data_dir = str(tmp_path / f"data-{i}")
            flags = ("--cluster", members, "--shard-index", str(i), "--data-dir", data_dir)
            servers.append(ServerProcess(*flags, "--no-snapshot-on-exit", port=port))
        with Client(members) as cc:
            assert isinstance(cc, ClusterClient)
            for k in range(8):
                cc.create(f"v{k}", value=np.full(3, k, np.float32))
            taken = cc.snapshot()
            assert [Path(info.path).parent.name for info in taken] == ["data-0", "data-1"]
            assert sum(info.variables for info in taken) == 8 and all(info.variables for info in taken)
        result = tensorps("--target", members, "--json", "snapshot")
        assert result.code == 0, result.stderr
        shards = result.json()["shards"]
        assert [s["shard"] for s in shards] == [0, 1] and [s["member"] for s in shards] == members.split(",")
        assert all(s["generation"] > t.generation for s, t in zip(shards, taken, strict=True))
    finally:
        for server in servers:
            server.stop()
