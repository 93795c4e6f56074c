"""The durability workload (`python -m bench --workloads durability`, opt-in): what persistence costs.

- the disk's sequential write speed, by `dd ... conv=fdatasync` into the same directory, as the yardstick;
- a snapshot of 1,000 variables holding 1 GiB (filled through shm://): seconds, write pause, MB/s, and
  the same while clients keep writing; then the restore time of a server started on that data directory;
- small (4 KiB) and large (1 MiB) assigns from concurrent client processes with --wal off, everysec and
  always, beside Redis with appendonly yes and appendfsync everysec and always (the same client fleet).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.backends import Server, Skipped, Target, rediskv
from bench.backends.process import ServerProcess, free_port
from bench.fleet import Concurrent, Fleet
from tensorps.client import Client

MiB = 1 << 20
_READY = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")
_RESTORED = re.compile(r"restored (\d+) variables .* in ([\d.]+) s")
WAL_MODES = ("off", "everysec", "always")


@dataclass(frozen=True)
class SnapshotRun:
    variables: int
    nbytes: int
    dd_mb_s: float
    idle: list[tuple[float, float]]  # (seconds, pause ms) of snapshots with no writer
    loaded: list[tuple[float, float]]  # the same with clients writing meanwhile
    restore_seconds: float  # from the server's start to its ready line
    restore_logged: float  # what the server logs for the restore itself


def _tensorps(data_dir: str, *flags: str, workers: int = 2) -> Server:
    store = f"/dev/shm/tensorps-bench-{uuid.uuid4().hex[:12]}"
    command = [
        sys.executable,
        "-m",
        "tensorps.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--store",
        store,
    ]
    command += ["--workers", str(workers), "--data-dir", data_dir, "--snapshot-every", "0", *flags]
    process = ServerProcess(command, _READY, cleanup=[store], timeout=600)
    assert process.match is not None
    address = f"{process.match.group(1)}:{process.match.group(2)}"
    mode = flags[flags.index("--wal") + 1] if "--wal" in flags else "off"
    return Server(f"tensorps --wal {mode}", Target("tensorps", address), process, store=store)


def _redis(fsync: str | None) -> Server | Skipped:
    label = "Redis appendonly no" if fsync is None else f"Redis appendonly yes, appendfsync {fsync}"
    binary = shutil.which("redis-server")
    if binary is None or importlib.util.find_spec("redis") is None:
        return Skipped(label, f"skipped: {rediskv.INSTALL}")
    workdir = tempfile.mkdtemp(prefix="tensorps-bench-redis-aof-", dir=".")
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", workdir]
    command += ["--logfile", "", "--daemonize", "no"]
    command += ["--appendonly", "no"] if fsync is None else ["--appendonly", "yes", "--appendfsync", fsync]
    process = ServerProcess(command, re.compile(r"Ready to accept connections"), cleanup=[workdir])
    return Server(label, Target("redis", f"127.0.0.1:{port}"), process)


def dd_speed(directory: str, nbytes: int) -> float:
    """MB/s of a sequential write of `nbytes` to `directory`, flushed to disk (dd conv=fdatasync)."""
    path = f"{directory}/dd-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={nbytes // (16 * MiB)}", "conv=fdatasync"],
        check=True,
        capture_output=True,
    )
    seconds = time.monotonic() - started
    subprocess.run(["rm", "-f", path], check=True)
    return nbytes / seconds / 1e6


def snapshots(
    progress: Callable[[str], None], *, variables: int = 1000, nbytes: int = 1 << 30, rounds: int = 2
) -> SnapshotRun:
    data_dir = tempfile.mkdtemp(prefix="tensorps-bench-data-", dir=".")
    try:
        progress(f"durability: dd of {nbytes // MiB} MiB into {data_dir}")
        dd = dd_speed(data_dir, nbytes)
        server = _tensorps(data_dir, "--no-snapshot-on-exit")
        try:
            progress(f"durability: filling {variables} variables of {nbytes // variables} bytes (shm://)")
            assert server.store is not None
            each = nbytes // variables // 4
            with Client(f"shm://{server.store}") as local:
                for i in range(variables):
                    local.create(f"layer{i:04d}/kernel", value=np.full(each, i, np.float32))
            with Client(server.target.address, timeout=600) as ps:
                idle = []
                for _ in range(rounds):
                    info = ps.snapshot()
                    idle.append((info.seconds, info.pause_ms))
                progress("durability: snapshots while a client writes")
                loaded = _while_writing(ps, server.target.address, rounds, each, variables)
        finally:
            server.process.stop()
        progress("durability: restore")
        started = time.monotonic()
        again = _tensorps(data_dir, "--no-snapshot-on-exit")
        restore_seconds = time.monotonic() - started
        logged = next((float(m.group(2)) for line in again.process.log if (m := _RESTORED.search(line))), 0.0)
        again.process.stop()
        return SnapshotRun(variables, nbytes, dd, idle, loaded, restore_seconds, logged)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _while_writing(
    ps: Client, address: str, rounds: int, each: int, variables: int
) -> list[tuple[float, float]]:
    """Snapshots taken while another process assigns to the variables (locked and unlocked writes)."""
    script = (
        "import sys, numpy as np\n"
        "from tensorps.client import Client\n"
        "c = Client(sys.argv[1])\n"
        "v = np.ones(int(sys.argv[2]), np.float32)\n"
        "n = int(sys.argv[3])\n"
        "i = 0\n"
        "while True:\n"
        "    c.assign(f'layer{i % n:04d}/kernel', v, read_value=False, use_locking=i % 2 == 0)\n"
        "    i += 1\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, address, str(each), str(variables)])
    try:
        time.sleep(1.0)
        results = []
        for _ in range(rounds):
            info = ps.snapshot()
            results.append((info.seconds, info.pause_ms))
        return results
    finally:
        writer.kill()
        writer.wait()


def wal_throughput(
    fleet: Fleet, progress: Callable[[str], None], *, window: float, sizes: tuple[int, ...] = (4096, MiB)
) -> tuple[list[tuple[str, dict[int, Concurrent | str]]], int]:
    """Concurrent assigns/s per system and value size (a string: why the system was skipped)."""
    rows: list[tuple[str, dict[int, Concurrent | str]]] = []
    clients = len(fleet.conns)
    data_dir = tempfile.mkdtemp(prefix="tensorps-bench-wal-", dir=".")
    try:
        starters: list[Callable[[], Server | Skipped]] = [
            *(_tensorps_starter(data_dir, mode) for mode in WAL_MODES),
            *(_redis_starter(fsync) for fsync in (None, "everysec", "always")),
        ]
        for start in starters:
            system = start()
            if isinstance(system, Skipped):
                rows.append((system.label, {size: system.reason for size in sizes}))
                continue
            try:
                progress(f"durability: {system.label}")
                cells: dict[int, Concurrent | str] = {}
                for size in sizes:
                    names = [f"client{i}-{size}" for i in range(clients)]  # a shape per size
                    cells[size] = fleet.run(system.target, names, size, window, system.cpu_seconds)
                rows.append((system.label, cells))
            finally:
                system.process.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows, clients


def _tensorps_starter(data_dir: str, mode: str) -> Callable[[], Server | Skipped]:
    return lambda: _tensorps(data_dir, "--wal", mode, "--no-snapshot-on-exit")


def _redis_starter(fsync: str | None) -> Callable[[], Server | Skipped]:
    return lambda: _redis(fsync)


def report(run: SnapshotRun, wal: list[tuple[str, dict[int, Concurrent | str]]], clients: int) -> str:
    mb = run.nbytes / 1e6
    lines = [
        f"### Durability: snapshot of {run.variables:,} variables ({run.nbytes // MiB} MiB), write-ahead log",
        "",
        f"Disk sequential write (`dd bs=16M conv=fdatasync`, same directory): **{run.dd_mb_s:,.0f} MB/s**.",
        "",
        "| snapshot | seconds | MB/s | % of dd | write pause (ms) |",
        "|---|---|---|---|---|",
    ]
    for label, runs in (("idle", run.idle), ("1 client writing", run.loaded)):
        for seconds, pause in runs:
            speed = mb / seconds
            lines.append(
                f"| {label} | {seconds:.2f} | {speed:,.0f} | {speed / run.dd_mb_s:.0%} | {pause:.1f} |"
            )
    lines += [
        "",
        f"Restore of that snapshot: the server was ready {run.restore_seconds:.2f} s after it started "
        f"(the restore itself: {run.restore_logged:.2f} s).",
        "",
        f"| {clients} concurrent client processes | 4 KiB assigns/s | 1 MiB assigns/s |",
        "|---|---|---|",
    ]
    base: dict[int, float] = {}
    for label, cells in wal:
        shown = []
        for size in (4096, MiB):
            cell = cells.get(size)
            if isinstance(cell, Concurrent):
                key = size if label.startswith("tensorps") else -size
                base.setdefault(key, cell.rate)
                ratio = cell.rate / base[key]
                shown.append(f"{cell.rate:,.0f} ({ratio:.0%})")
            else:
                shown.append(str(cell))
        lines.append(f"| {label} | {' | '.join(shown)} |")
    lines.append("")
    lines.append("Percentages: of the same system without its log (tensorps --wal off, Redis appendonly no).")
    return "\n".join(lines)


def run(fleet: Fleet, progress: Callable[[str], None], *, window: float, quick: bool = False) -> str:
    """The whole workload; `quick` (the CI profile) snapshots 64 MiB in 100 variables instead."""
    snapshot_run = snapshots(progress, variables=100, nbytes=64 * MiB) if quick else snapshots(progress)
    wal, clients = wal_throughput(fleet, progress, window=window)
    return report(snapshot_run, wal, clients)
