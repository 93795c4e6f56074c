"""A locked sparse update that dies midway, for tests/test_rows_crash.py: exits at a chosen step.

argv: store path, where to die, variable name, then the slot names (a sparse_apply_adagrad with one slot,
or a scatter_add without). Steps: "ready" (the undo record complete, half the rows written with garbage,
as a kill amid the row writes leaves them), "written" (every row written, no version counted yet),
"prepare" (while the undo record is written, before any row), "logged" (its write-ahead log record
appended, before any row: a store with persistence). The same update in an atomic batch (rows in
place, tied to the batch's commit record): "batch-commit" (rows written, at the commit point),
"batch-count" (after the commit point, before the versions are counted).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from tensorps.server import commits, row_ops, row_patches, undo
from tensorps.server.batch import BatchOp, run_batch
from tensorps.server.ops import Ops
from tensorps.server.optimizers import Flags
from tensorps.server.persist.records import Entry
from tensorps.server.row_ops import RowArgs
from tensorps.server.store import Store
from tensorps.v1 import tensorps_pb2 as pb

ROWS = np.arange(0, 2000, 2, dtype=np.int64)


def main() -> None:
    path, where, name, *slots = sys.argv[1:]
    ops = Ops(Store.attach(path))
    original_state = undo.UndoRecord.state
    original_add = undo.UndoRecord.add

    def state(self: undo.UndoRecord, value: int) -> None:
        if where == "written" and value == undo.WRITTEN:
            original_state(self, value)
            os._exit(9)
        original_state(self, value)
        if where == "ready" and value == undo.READY:
            for n in (name, *slots):
                slot = ops.store.find(n)
                assert slot is not None
                d = ops.store.active(slot)
                view = ops._view(slot, d)
                view[ROWS[: len(ROWS) // 2]] = -12345.0
            os._exit(9)

    def add(self: undo.UndoRecord, *args: object, **kwargs: object) -> None:
        if where == "prepare":
            os._exit(9)
        original_add(self, *args, **kwargs)  # type: ignore[arg-type]

    if where == "logged":
        log_record = ops.log

        def log_then_die(*entries: Entry) -> None:
            log_record(*entries)
            os._exit(9)

        ops.log = log_then_die  # type: ignore[method-assign]
    if where.startswith("batch-"):
        _die_in_batch(ops, where, name, slots)
    undo.UndoRecord.state = state  # type: ignore[method-assign,assignment]
    undo.UndoRecord.add = add  # type: ignore[method-assign]
    width = ops.read(name, lambda info, view: view.shape[1])
    grad = np.ones((len(ROWS), width), np.float32)
    if slots:
        args = RowArgs(tuple(slots), (np.asarray(0.5, np.float32), grad, ROWS), 0, Flags())
        kind = pb.BATCH_OP_SPARSE_APPLY_ADAGRAD
    else:
        args = RowArgs((), (ROWS, grad))
        kind = pb.BATCH_OP_SCATTER_ADD
    row_ops.update(ops, kind, name, args, use_locking=True, read_value=False)
    os._exit(0)


def _die_in_batch(ops: Ops, where: str, name: str, slots: list[str]) -> None:
    if where == "batch-commit":
        commits.CommitRecord.commit = lambda self: os._exit(9)  # type: ignore[method-assign]
    else:
        row_patches.Patches.count = lambda self: os._exit(9)  # type: ignore[method-assign]
    width = ops.read(name, lambda info, view: view.shape[1])
    grad = np.ones((len(ROWS), width), np.float32)
    if slots:
        args = RowArgs(tuple(slots), (np.asarray(0.5, np.float32), grad, ROWS), 0, Flags())
        kind = pb.BATCH_OP_SPARSE_APPLY_ADAGRAD
    else:
        args = RowArgs((), (ROWS, grad))
        kind = pb.BATCH_OP_SCATTER_ADD
    run_batch(ops, [BatchOp(kind, name, rows=args)], atomic=True, consume=lambda info, view: None)
    os._exit(0)


if __name__ == "__main__":
    main()
