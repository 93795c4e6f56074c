"""This process's view of its server's persistence: settings, shared state, its log appender.

Made by Ops for a store whose server has a data directory (state.py), so that workers and same-host
shm:// clients alike log their writes and can take snapshots.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from tensorps.server.persist import snapshot
from tensorps.server.persist.journal import Journal
from tensorps.server.persist.records import Entry
from tensorps.server.persist.snapshot import SnapshotInfo
from tensorps.server.persist.state import LastSnapshot, Settings, SharedState, read_settings

if TYPE_CHECKING:
    from tensorps.server.ops import Ops


class Persistence:
    def __init__(self, store_path: str, settings: Settings) -> None:
        self.settings = settings
        self.state = SharedState(store_path)
        self.journal = Journal(settings.data_dir, settings.wal, self.state) if settings.wal != "off" else None
        self._pending = threading.local()  # .ticket: the last record this thread's call appended

    @classmethod
    def attach(cls, store_path: str) -> Persistence | None:
        """The persistence of the store at `store_path`; None if its server persists nothing."""
        settings = read_settings(store_path)
        return None if settings is None else cls(store_path, settings)

    def log(self, entries: tuple[Entry, ...]) -> None:
        """Append a write's record (the caller holds its variables' stripes; nothing is visible yet)."""
        if self.journal is not None:
            self._pending.ticket = self.journal.append(entries)

    def sync(self) -> None:
        """Once the call has let go of its locks: wait until its records are durable (--wal always)."""
        ticket = getattr(self._pending, "ticket", 0)
        if ticket and self.journal is not None:
            self._pending.ticket = 0
            self.journal.sync(ticket)

    def forget(self) -> None:
        self._pending.ticket = 0

    def snapshot(self, ops: Ops) -> SnapshotInfo:
        return snapshot.take(ops, self.settings.data_dir, self.state, keep=self.settings.snapshot_keep)

    @property
    def last_snapshot(self) -> LastSnapshot:
        return self.state.last

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.state.close()
