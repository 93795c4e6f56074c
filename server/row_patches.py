"""Sparse writes inside atomic batches: rows written in place behind an undo record, tied to the batch's
commit record, so that an atomic batch that updates a few rows of a huge table never copies the table.

An atomic batch publishes its dense writes by flipping second buffers after its commit point (batch.py,
commits.py). A variable that the batch changes only by one sparse write (a scatter, a sparse apply) instead
keeps a patch: the rows and their new values. At commit, before the commit point, the old values of those
rows go into an undo record (undo.py, state READY), then the new rows are written in place, and the commit
record names the undo record (entry ROWS). A process killed before the commit point leaves a PREPARING commit
record and a READY undo record: recovery undoes both (the old rows come back). Killed after it, recovery
redoes the commit record, marking the undo record WRITTEN on the way, so that its versions are counted and
its rows stay. The live batch counts the versions after its flips and removes the undo record before the
commit record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from tensorps.server import commits, undo
from tensorps.server.ops import Ops

Array = np.ndarray[Any, Any]


class Patch(NamedTuple):
    """A variable's pending rows in an atomic batch."""

    name: str
    slot: int
    rows: Array  # int64, sorted, unique
    new: Array  # (len(rows), inner)
    request: bytes


class _Written(NamedTuple):
    table: Array | None
    rows: Array
    old: Array


def materialize(view: Array, rows: Array, new: Array) -> Array:
    """The whole value a patch leaves: a copy of `view` with the rows replaced."""
    whole = view.copy()
    if whole.size and len(rows):
        whole.reshape(-1, new.shape[1])[rows] = new
    return whole


class Patches:
    """The patches of one atomic batch's commit (use: apply() before the commit point, count() after the
    flips, finish() at the end whatever happened)."""

    def __init__(self, ops: Ops, patches: Sequence[Patch]) -> None:
        self.ops = ops
        self.patches = patches
        self.record: undo.UndoRecord | None = None
        self.written: list[_Written] = []

    def apply(self, commit: commits.CommitRecord) -> None:
        """Save the old rows, write the new ones in place, and name the undo record in the commit record."""
        store = self.ops.store
        self.record = store.undo_record()
        for patch in self.patches:
            d = store.active(patch.slot)
            view = self.ops._view(patch.slot, d)
            inner = patch.new.shape[1]
            table = view.reshape(-1, inner) if view.size else None
            old = table[patch.rows] if table is not None else np.empty(0, np.uint8)
            self.record.add(
                patch.slot,
                d.version,
                d.segment,
                row_bytes=inner * view.itemsize,
                rows=patch.rows,
                old=old,
                request=patch.request,
            )
            self.written.append(_Written(table, patch.rows, old))
        self.record.state(undo.READY)
        for patch in self.patches:
            self.ops.retire(patch.name, patch.slot)
        for patch, written in zip(self.patches, self.written, strict=True):
            if written.table is not None and len(patch.rows):
                written.table[patch.rows] = patch.new
        commit.add(commits.ROWS, payload=self.record.name.encode())

    def count(self) -> None:
        """After the commit point: each patched variable's version, and the request id of its write."""
        for patch in self.patches:
            self.ops.store.bump_version(patch.slot, patch.request)

    def finish(self, *, committed: bool, published: bool) -> None:
        """Remove the undo record; a batch that failed before its commit point first puts the old rows
        back. One that failed after it leaves the record to the recovery of its commit record."""
        if self.record is None:
            return
        if published:
            self.record.finish()
            return
        if committed:
            self.record.abandon()
            return
        for written in self.written:
            if written.table is not None and len(written.rows):
                written.table[written.rows] = written.old
        self.record.finish()
