"""When a server persists: restore at start, periodic snapshots, the snapshot at clean shutdown.

- start (supervisor, before any worker): record the settings in the store; a store it has just created
  is restored (restore.py) unless --no-restore; the log generation starts past every one in the data
  directory. After --restore PATH a snapshot is taken at once, so that the next start finds that state
  rather than a newer snapshot's.
- periodic (worker 0, which a restart replaces): a snapshot when --snapshot-every seconds have passed
  since the newest one (the shared state remembers it across worker restarts).
- exit (supervisor, once the workers have stopped): a last snapshot unless --no-snapshot-on-exit.
- sweep (supervisor, at start once the settings are recorded, and after a worker died): Store.sweep, with
  what it undoes of dead processes' writes logged (Ops._log_undone), since their records may already be
  in the log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from tensorps.server.config import ServerConfig
from tensorps.server.metrics import SnapshotStatus
from tensorps.server.ops import Ops
from tensorps.server.persist import layout
from tensorps.server.persist.restore import CorruptSnapshot, restore
from tensorps.server.persist.snapshot import SnapshotError
from tensorps.server.persist.state import Settings, SharedState, clear_settings, write_settings
from tensorps.server.store import Store, StoreError

log = logging.getLogger("tensorps.server")


class PersistStartupError(Exception):
    """The data directory cannot be used, or the snapshot --restore names is refused."""


def start(store: Store, config: ServerConfig) -> int | None:
    """Prepare the store for persistence and restore it (see the module docstring).

    Returns a descriptor that holds the data directory for this server (an flock, inherited by the
    workers): the caller closes it at exit. None without a data directory.
    """
    if config.data_dir is None:
        clear_settings(store.path)  # a store that an earlier server persisted: its settings are not ours
        return None
    data_dir = os.path.abspath(config.data_dir)
    held = _claim(data_dir)
    try:
        _start(store, config, data_dir)
    except BaseException:
        os.close(held)
        raise
    return held


def _claim(data_dir: str) -> int:
    """Hold `data_dir` for this server: two servers restoring from and logging to one directory would
    corrupt each other's snapshots and logs."""
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(data_dir, ".server.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise PersistStartupError(f"cannot use the data directory {data_dir}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PersistStartupError(
            f"another server uses the data directory {data_dir}: give each server its own --data-dir"
        ) from None
    return fd


def _start(store: Store, config: ServerConfig, data_dir: str) -> None:
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise PersistStartupError(f"cannot use the data directory {data_dir}: it is not writable")
    write_settings(store.path, Settings(data_dir, config.wal, config.snapshot_keep))
    state = SharedState(store.path)
    try:
        if store.created and not config.no_restore:
            _restore(store, config, data_dir)
        if store.created or state.generation == 0:
            state.generation = layout.newest_generation(data_dir) + 1
    finally:
        state.close()
    if store.created and config.restore is not None:
        snapshot_now(store.path, why="of the restored state")


def _restore(store: Store, config: ServerConfig, data_dir: str) -> None:
    try:
        restored = restore(store, data_dir, snapshot=config.restore)
    except CorruptSnapshot as exc:
        source = config.restore if config.restore is not None else f"from {data_dir}"
        raise PersistStartupError(f"cannot restore {source}: {exc}") from None
    except (OSError, ValueError, StoreError) as exc:
        raise PersistStartupError(f"cannot restore from {data_dir}: {exc}") from None
    if restored.snapshot is None and restored.records == 0:
        log.info("nothing to restore in %s: starting empty", data_dir)
        return
    log.info(
        "restored %d variables from %s and %d log records in %.2f s",
        restored.variables,
        restored.snapshot or "no snapshot",
        restored.records,
        restored.seconds,
    )


def snapshot_now(store_path: str, *, why: str) -> None:
    """Take a snapshot from this process (the supervisor: at exit, after a restore); logs failures."""
    try:
        store = Store.attach(store_path, wait=0.0)
    except Exception as exc:
        log.error("no snapshot %s: %s", why, exc)
        return
    ops = Ops(store)
    try:
        if ops.persistence is not None:
            ops.persistence.snapshot(ops)
    except (SnapshotError, OSError) as exc:
        log.error("no snapshot %s: %s", why, exc)
    finally:
        ops.close()
        store.close()


def sweep(store_path: str) -> None:
    """Sweep the store after a worker died (Store.sweep_path), logging what it undoes; logs failures."""
    try:
        store = Store.attach(store_path, wait=0.0)
    except (StoreError, OSError) as exc:
        log.warning("cannot sweep the store %s: %s", store_path, exc)
        return
    try:
        sweep_store(store)
    except (StoreError, OSError) as exc:
        log.warning("cannot sweep the store %s: %s", store_path, exc)
    finally:
        store.close()


def sweep_store(store: Store) -> None:
    """store.sweep(), with what it undoes of dead processes' writes logged if the store persists (its
    settings recorded by start())."""
    ops = Ops(store)
    try:
        store.sweep()
    finally:
        ops.close()


class Periodic:
    """Snapshots every `every` seconds from a thread of this worker, until stop()."""

    def __init__(self, ops: Ops, every: float) -> None:
        assert ops.persistence is not None
        self._ops = ops
        self._persistence = ops.persistence
        self._every = every
        self._stop = threading.Event()
        self._not_before = time.time() + every  # the first: a period after this worker started
        self._thread = threading.Thread(target=self._run, name="tensorps-snapshots", daemon=True)
        self._thread.start()

    def _due(self) -> float:
        """Seconds until the next snapshot: a period after the newest (whoever took it) or this worker's
        start or last failure."""
        last = self._persistence.last_snapshot.time
        return (
            max(last + self._every, self._not_before) - time.time()
            if last
            else self._not_before - time.time()
        )

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, min(self._due(), 1.0))):
            if self._due() > 0:
                continue
            try:
                self._persistence.snapshot(self._ops)
            except (SnapshotError, OSError) as exc:
                log.error("periodic snapshot failed: %s", exc)
                self._not_before = time.time() + self._every  # again in a period, not at once
            except Exception:
                log.exception("periodic snapshot failed")
                self._not_before = time.time() + self._every

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def snapshot_status(store_path: str) -> Callable[[], SnapshotStatus | None]:
    """The metrics' snapshot source (metrics.Metrics.snapshot_source): the newest snapshot any process of
    this server took, from the shared state (None while there is none)."""
    state: list[SharedState] = []

    def status() -> SnapshotStatus | None:
        if not state:
            state.append(SharedState(store_path))
        last = state[0].last
        if not last.time:
            return None
        return SnapshotStatus(finished=last.time + last.seconds, duration=last.seconds)

    return status
