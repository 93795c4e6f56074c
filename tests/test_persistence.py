"""Snapshots and restore end to end: real servers, a real data directory, safetensors files."""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from support import ServerProcess, wait_until
from tensorps.client import (
    Client,
    FailedPreconditionError,
    PermissionDeniedError,
    SnapshotInfo,
)

Array = np.ndarray[Any, Any]

# One variable of every dtype, and the shapes that need care.
VALUES: dict[str, Array] = {
    "f16": np.array([1.5, -2.0], np.float16),
    "bf16": np.array([[1.5, -2.0, 3.25]], ml_dtypes.bfloat16),
    "f32/matrix": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f64:0": np.array(3.5, np.float64),  # a scalar
    "i8": np.array([-128, 127], np.int8),
    "i16": np.array([-3], np.int16),
    "i32": np.arange(5, dtype=np.int32),
    "i64": np.array([2**62], np.int64),
    "u8": np.array([255], np.uint8),
    "u16": np.array([65535], np.uint16),
    "u32": np.array([2**32 - 1], np.uint32),
    "u64": np.array([2**64 - 1], np.uint64),
    "c64": np.array([1 + 2j, -3j], np.complex64),
    "c128": np.array([[1 + 2j], [np.pi - 1e-300j]], np.complex128),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
}


def _fill(ps: Client) -> None:
    for name, value in VALUES.items():
        ps.create(name, value=value)
    ps.assign_add("i32", np.ones(5, np.int32))  # version 2
    ps.create("declared", dtype="float32", shape=(2, 2))  # uninitialized, declared shape
    ps.create("unknown", dtype="int64")  # uninitialized, unknown shape
    ps.create("zero-declared", dtype="int16", shape=(4, 0))  # zero elements: initialized at creation
    ps.create("grown", dtype="float64")  # unknown shape, then set by an assign
    ps.assign("grown", np.ones((2, 5)))


def _state(ps: Client) -> dict[str, tuple[Any, ...]]:
    """Every variable's info, and its bytes when it has a value."""
    state = {}
    for info in ps.list():
        value = ps.read(info.name).tobytes() if info.initialized else None
        state[info.name] = (info.dtype, info.shape, info.initialized, info.version, value)
    return state


def _server(data_dir: str, *flags: str, workers: int = 1) -> ServerProcess:
    """A server on `data_dir` that takes no snapshot at exit (so that a test sees only its own)."""
    return ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit", *flags, workers=workers)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "data"
    yield str(path)


def test_a_restart_restores_every_dtype_shape_and_version(data_dir: str) -> None:
    """Stop, start again with the same data directory: names, dtypes, shapes (unknown too), initialized
    flags, versions and values are all back (compose's down && up, with processes)."""
    with ServerProcess("--data-dir", data_dir, workers=2) as server, Client(server.address) as ps:
        _fill(ps)
        before = _state(ps)
    assert any("snapshot" in line and "snap-" in line for line in server.log), server.log
    with ServerProcess("--data-dir", data_dir) as server, Client(server.address) as ps:
        assert _state(ps) == before
        assert ps.info("unknown").shape is None and not ps.info("unknown").initialized
        assert ps.info("declared").shape == (2, 2) and not ps.info("declared").initialized
        assert ps.info("zero-declared").initialized
        assert ps.info("i32").version == 2
        ps.assign_add("i32", np.ones(5, np.int32))  # the restored variable takes writes as before
        assert ps.info("i32").version == 3
    assert any(f"restored {len(before)} variables" in line for line in server.log), server.log


def test_snapshot_files_load_with_safetensors_and_equal_the_server(data_dir: str) -> None:
    """A snapshot read without tensorps (safetensors.numpy, the manifest) equals what the server held;
    complex128 is stored as float64 pairs, bfloat16 as BF16, uninitialized variables in the manifest."""
    server = ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit")
    with server, Client(server.address) as ps:
        _fill(ps)
        state = _state(ps)
        info = ps.snapshot()
    assert isinstance(info, SnapshotInfo) and info.variables == len(state)
    assert info.path == os.path.join(data_dir, f"snap-{info.generation:010d}")
    manifest = json.loads(Path(info.path, "manifest.json").read_text())
    variables = {v["name"]: v for v in manifest["variables"]}
    assert set(variables) == set(state)
    tensors: dict[str, Array] = {}
    for entry in manifest["files"]:
        raw = Path(info.path, entry["name"]).read_bytes()
        assert f"{zlib.crc32(raw):08x}" == entry["crc32"] and len(raw) == entry["bytes"]
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header["bf16"]["dtype"] == "BF16" and header["c64"]["dtype"] == "C64"
        assert header["c128"]["dtype"] == "F64" and header["c128"]["shape"] == [2, 1, 2]
        # safetensors.numpy has no bfloat16: every other tensor loads with it.
        without_bf16 = _without(raw, "bf16", Path(data_dir).parent / f"{entry['name']}-without-bf16")
        tensors.update(load_file(without_bf16))
        begin, end = header["bf16"]["data_offsets"]
        start = 8 + int.from_bytes(raw[:8], "little")
        tensors["bf16"] = np.frombuffer(raw[start + begin : start + end], ml_dtypes.bfloat16).reshape(1, 3)
    for name, (dtype, shape, initialized, version, value) in state.items():
        entry = variables[name]
        assert entry["dtype"] == np.dtype(dtype).name and entry["initialized"] == initialized
        assert entry["version"] == version
        assert entry["shape"] == (None if shape is None else list(shape))
        if not initialized:
            assert name not in tensors  # in the manifest only
            continue
        tensor = tensors[name]
        if entry.get("stored_as") == "float64_pairs":
            tensor = np.ascontiguousarray(tensor).view(np.complex128)[..., 0]
        assert tensor.shape == shape and tensor.tobytes() == value, name
        assert f"{zlib.crc32(value or b''):08x}" == entry["crc32"]


def _without(raw: bytes, name: str, path: Path) -> str:
    """The safetensors file `raw` without tensor `name`, written to `path` (returned as a str)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    header.pop(name)
    kept = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    out = b""
    for _offset, key in kept:
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [len(out), len(out) + end - begin]
        out += data[begin:end]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + out)
    return str(path)


def test_snapshots_under_concurrent_atomic_batches_keep_the_invariant(data_dir: str) -> None:
    """Atomic batches move amounts between a and b (a + b == 0) from several clients and workers while
    snapshots are taken: every snapshot holds a + b == 0, whole batches or none."""
    server = ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit", workers=2)
    with server, Client(server.address) as ps:
        ps.create("a", value=np.zeros(1000, np.int64))
        ps.create("b", value=np.zeros(1000, np.int64))
        stop = threading.Event()
        errors: list[BaseException] = []

        def mover(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                with Client(server.address) as own:
                    while not stop.is_set():
                        amount = rng.integers(-5, 5, 1000, dtype=np.int64)
                        with own.pipeline(atomic=True) as pipe:
                            pipe.assign_add("a", amount, use_locking=True)
                            pipe.assign_sub("b", amount, use_locking=True)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=mover, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        try:
            infos = [ps.snapshot() for _ in range(8)]
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert not errors, errors
    versions = set()
    for info in infos:
        files = sorted(Path(info.path).glob("*.safetensors")) if os.path.exists(info.path) else []
        if not files:
            continue  # pruned (--snapshot-keep 3)
        tensors = load_file(str(files[0]))
        assert np.array_equal(tensors["a"] + tensors["b"], np.zeros(1000, np.int64))
        manifest = json.loads(Path(info.path, "manifest.json").read_text())
        versions.add(tuple(v["version"] for v in manifest["variables"]))
    assert len(versions) >= 2, "the batches did not run while the snapshots were taken"


def test_a_snapshot_needs_a_data_dir_and_a_writing_token(tmp_path: Path, data_dir: str) -> None:
    """Without --data-dir: FAILED_PRECONDITION; a read-only token: PERMISSION_DENIED."""
    with ServerProcess() as server, Client(server.address) as ps:
        with pytest.raises(FailedPreconditionError, match="data-dir"):
            ps.snapshot()
        with Client(f"shm://{server.store}") as local, pytest.raises(FailedPreconditionError):
            local.snapshot()
    tokens = tmp_path / "tokens"
    tokens.write_text("writer-token-0123456789\nreader-token-0123456789 read-only\n")
    flags = ("--data-dir", data_dir, "--token-file", str(tokens), "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server:
        reader = Client(server.address, token="reader-token-0123456789")
        with reader, pytest.raises(PermissionDeniedError):
            reader.snapshot()
        with Client(server.address, token="writer-token-0123456789") as writer:
            assert writer.snapshot().variables == 0
            assert writer.server_info().last_snapshot_time > 0


def test_a_shm_client_snapshots_and_its_writes_are_logged(data_dir: str) -> None:
    """Same host: a shm:// client takes the same snapshots, and its writes go to the same log."""
    flags = ("--data-dir", data_dir, "--wal", "always", "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server, Client(f"shm://{server.store}") as local:
        local.create("x", value=np.arange(3.0))
        info = local.snapshot()
        assert info.variables == 1
        local.assign("x", np.full(3, 7.0))
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as server,
        Client(server.address) as ps,
    ):
        assert ps.read("x").tolist() == [7.0, 7.0, 7.0] and ps.info("x").version == 2


def _corrupt(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated shard", "bad manifest"])
def test_a_damaged_snapshot_is_refused_and_the_one_before_used(data_dir: str, damage: str) -> None:
    """A snapshot failing its checksum: one log line naming the file, and the previous snapshot plus
    the logs after it restore the newest state."""
    flags = ("--data-dir", data_dir, "--wal", "always", "--no-snapshot-on-exit")
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(100, np.float32))
        first = ps.snapshot()
        ps.assign("v", np.ones(100, np.float32))
        second = ps.snapshot()
        ps.assign("v", np.full(100, 2, np.float32))
    assert first.generation < second.generation
    shard = Path(second.path, "shard-00000.safetensors")
    if damage == "flipped byte":
        _corrupt(shard)
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        _corrupt(Path(second.path, "manifest.json"), 40)
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as server,
        Client(server.address) as ps,
    ):
        assert ps.read("v").tolist() == [2.0] * 100
        assert ps.info("v").version == 3
    refused = [line for line in server.log if "snapshot refused" in line]
    assert len(refused) == 1 and second.path in refused[0], server.log
    assert any(first.path in line and "restored" in line for line in server.log), server.log


def test_no_valid_snapshot_refuses_to_start_rather_than_serve_a_partial_model(data_dir: str) -> None:
    """Every snapshot damaged: the logs alone would be a partial model, so the server refuses to start
    with a clear error naming the way out; --no-restore starts empty; the files are left as they were."""
    flags = ("--data-dir", data_dir, "--wal", "always", "--no-snapshot-on-exit", "--snapshot-keep", "1")
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(4, np.float32))
        ps.snapshot()
        ps.assign("v", np.ones(4, np.float32))
        only = ps.snapshot()  # the first log is pruned with the first snapshot: history starts here
        ps.assign_add("v", np.ones(4, np.float32))
    _corrupt(Path(only.path, "shard-00000.safetensors"))
    refused = ServerProcess("--data-dir", data_dir, wait=False)
    code = refused.proc.wait(30)
    refused.stop()
    log = "\n".join(refused.log)
    assert code == 1 and "refusing to start from its logs alone" in log and "--no-restore" in log, log
    assert "Traceback" not in log and not os.path.exists(refused.store)
    assert os.path.exists(only.path)
    with _server(data_dir, "--no-restore") as server, Client(server.address) as ps:
        assert ps.list() == []


def test_restore_picks_a_snapshot_or_none(data_dir: str) -> None:
    """--restore PATH starts from that snapshot (and later starts from that state); --no-restore starts
    empty."""
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as server,
        Client(server.address) as ps,
    ):
        ps.create("v", value=np.array([1]))
        old = ps.snapshot()
        ps.assign("v", np.array([2]))
        ps.snapshot()
    with _server(data_dir, "--no-restore") as server, Client(server.address) as ps:
        assert ps.list() == []
    with _server(data_dir, "--restore", old.path) as server, Client(server.address) as ps:
        assert ps.read("v").tolist() == [1]
    with (
        ServerProcess("--data-dir", data_dir, "--no-snapshot-on-exit") as server,
        Client(server.address) as ps,
    ):
        assert ps.read("v").tolist() == [1]


def test_periodic_snapshots_and_keep(data_dir: str) -> None:
    """--snapshot-every takes snapshots on its own; --snapshot-keep bounds how many stay; the server info
    reports the newest."""
    flags = (
        "--data-dir",
        data_dir,
        "--snapshot-every",
        "0.2",
        "--snapshot-keep",
        "2",
        "--no-snapshot-on-exit",
    )
    with ServerProcess(*flags, workers=2) as server, Client(server.address) as ps:
        ps.create("v", value=np.zeros(10))

        assert wait_until(lambda: len(list(Path(data_dir).glob("snap-*"))) >= 2, timeout=10)
        assert wait_until(lambda: ps.server_info().last_snapshot_time > 0, timeout=10)
        snaps = sorted(Path(data_dir).glob("snap-*"))
    assert 1 <= len(list(Path(data_dir).glob("snap-*"))) <= 2, snaps


def test_two_servers_cannot_share_a_data_dir(data_dir: str) -> None:
    """A second server naming a data directory in use refuses to start with a clear error."""
    with _server(data_dir):
        second = ServerProcess("--data-dir", data_dir, wait=False)
        code = second.proc.wait(30)
        second.stop()
    log = "\n".join(second.log)
    assert code == 1 and "another server uses the data directory" in log and "Traceback" not in log, log
    assert not os.path.exists(second.store)


def test_the_metrics_follow_the_newest_snapshot(data_dir: str) -> None:
    """With --metrics-port, the snapshot gauges appear once a worker took a snapshot (the supervisor reads
    the shared state at each scrape)."""

    def gauges(port: int) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^(tensorps_snapshot_\w+) (\S+)$", text, re.M)}

    with _server(data_dir, "--metrics-port", "0", workers=2) as server, Client(server.address) as ps:
        match = next(
            m for line in server.log if (m := re.search(r"metrics on http://\S+:(\d+)/metrics", line))
        )
        port = int(match.group(1))
        assert gauges(port) == {}
        ps.create("v", value=np.zeros(10))
        info = ps.snapshot()
        found = gauges(port)
        assert 0 <= found["tensorps_snapshot_age_seconds"] < 60
        assert abs(found["tensorps_snapshot_duration_seconds"] - info.seconds) < 1e-6
