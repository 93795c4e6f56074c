"""What every process of one server shares about persistence, kept in the store's directory.

    persist.json   the settings (data directory, log mode), written by the supervisor when it opens the
                   store; workers and same-host shm:// clients read them, so that their writes are logged
                   and their snapshots land in the same place
    persist.state  a page of shared memory: the log's current generation and the last snapshot's figures

A store without persist.json has no persistence (a server started without --data-dir).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import asdict, dataclass
from typing import NamedTuple

SETTINGS_FILE = "persist.json"
STATE_FILE = "persist.state"
WAL_MODES = ("off", "everysec", "always")

# generation, then the last snapshot: its generation, unix time, seconds taken, write pause (ms), bytes,
# variables.
_STATE = struct.Struct("<QQdddQQ")
_STATE_SIZE = 4096


@dataclass(frozen=True)
class Settings:
    data_dir: str
    wal: str = "off"
    snapshot_keep: int = 3


class LastSnapshot(NamedTuple):
    """The newest snapshot this server took (all zero: none yet)."""

    generation: int
    time: float  # unix time of its cut
    seconds: float
    pause_ms: float
    bytes: int
    variables: int


def write_settings(store_path: str, settings: Settings) -> None:
    tmp = os.path.join(store_path, SETTINGS_FILE + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(asdict(settings), handle)
    os.replace(tmp, os.path.join(store_path, SETTINGS_FILE))


def clear_settings(store_path: str) -> None:
    """The store persists nothing (any more): a server started on it without --data-dir."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(store_path, SETTINGS_FILE))


def read_settings(store_path: str) -> Settings | None:
    try:
        with open(os.path.join(store_path, SETTINGS_FILE)) as handle:
            return Settings(**json.load(handle))
    except FileNotFoundError:
        return None


class SharedState:
    """The persist.state page of one store, mapped by this process."""

    def __init__(self, store_path: str) -> None:
        path = os.path.join(store_path, STATE_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _STATE_SIZE:
                os.posix_fallocate(fd, 0, _STATE_SIZE)  # a page of the tmpfs, taken now (no SIGBUS later)
            self._map = mmap.mmap(fd, _STATE_SIZE)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._map.close()

    @property
    def generation(self) -> int:
        """The generation of the log that writes go to now (changed only under every stripe lock)."""
        value: int = struct.unpack_from("<Q", self._map, 0)[0]
        return value

    @generation.setter
    def generation(self, value: int) -> None:
        struct.pack_into("<Q", self._map, 0, value)

    @property
    def last(self) -> LastSnapshot:
        _generation, *fields = _STATE.unpack_from(self._map, 0)
        return LastSnapshot(*fields)

    def record(self, last: LastSnapshot) -> None:
        _STATE.pack_into(self._map, 0, self.generation, *last)
