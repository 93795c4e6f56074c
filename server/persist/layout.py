"""The data directory: snapshots and logs named by generation, and the lock snapshots take turns with.

snap-<generation>/      a complete snapshot: manifest.json and shard-<n>.safetensors
.partial-snap-<g>-<pid>/ a snapshot being written (removed if it fails; leftovers are swept)
wal-<generation>.log    the write-ahead log of the writes after snapshot <generation>'s cut
.snapshot.lock          held (flock) by whoever writes a snapshot
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator

_SNAPSHOT = re.compile(r"snap-(\d{10})")
_LOG = re.compile(r"wal-(\d{10})\.log")
PARTIAL = ".partial-"
MANIFEST = "manifest.json"


def snapshot_name(generation: int) -> str:
    return f"snap-{generation:010d}"


def log_name(generation: int) -> str:
    return f"wal-{generation:010d}.log"


def snapshots(data_dir: str) -> list[tuple[int, str]]:
    """(generation, path) of every complete snapshot, newest first."""
    found = []
    for name in _listdir(data_dir):
        match = _SNAPSHOT.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(data_dir, name)))
    return sorted(found, reverse=True)


def logs(data_dir: str) -> list[tuple[int, str]]:
    """(generation, path) of every log, oldest first."""
    found = []
    for name in _listdir(data_dir):
        match = _LOG.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(data_dir, name)))
    return sorted(found)


def newest_generation(data_dir: str) -> int:
    """The highest generation any snapshot or log of `data_dir` names (0: none)."""
    return max([g for g, _ in snapshots(data_dir)] + [g for g, _ in logs(data_dir)], default=0)


def _listdir(data_dir: str) -> list[str]:
    try:
        return os.listdir(data_dir)
    except FileNotFoundError:
        return []


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def snapshot_lock(data_dir: str) -> Iterator[None]:
    """One snapshot at a time per data directory, whichever process (worker, client) takes it."""
    fd = os.open(os.path.join(data_dir, ".snapshot.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def sweep_partial(data_dir: str) -> None:
    """Remove snapshots that their writer left half-written (it died); the caller holds the lock."""
    for name in _listdir(data_dir):
        if name.startswith(PARTIAL):
            shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)


def prune(data_dir: str, keep: int) -> list[str]:
    """Keep the newest `keep` snapshots and the logs from the oldest of them on; returns what went.

    Logs are kept back to the oldest kept snapshot so that falling back to it (the newer ones failing
    their checksums) loses nothing: it is restored with every log after it.
    """
    removed: list[str] = []
    kept = snapshots(data_dir)[: max(1, keep)]
    if not kept:
        return removed
    oldest = kept[-1][0]
    for _generation, path in snapshots(data_dir)[len(kept) :]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for generation, path in logs(data_dir):
        if generation < oldest:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(path)
    if removed:
        fsync_dir(data_dir)
    return removed
