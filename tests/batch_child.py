"""An atomic batch that dies mid-commit, for tests/test_batch_crash.py: exits at a chosen step."""

from __future__ import annotations

import os
import sys

import numpy as np

from tensorps.client.codec import dtype_of
from tensorps.server import batch, commits
from tensorps.server.batch import BatchOp, run_batch
from tensorps.server.ops import Ops
from tensorps.server.store import Store


def main() -> None:
    """argv: store path, where to die ("flip:K" after K selector flips, "commit" at the commit point, or
    "finish" just before the record is removed),
    the stamp to write, then the names to assign (existing) and to create (prefixed with '+')."""
    path, where, stamp, *names = sys.argv[1:]
    ops = Ops(Store.attach(path))
    if where == "commit":
        commits.CommitRecord.commit = lambda self: os._exit(9)  # type: ignore[method-assign]
    elif where == "finish":  # published, stripes unmarked, record not yet removed
        commits.CommitRecord.finish = lambda self: os._exit(9)  # type: ignore[method-assign]
    else:
        limit = int(where.split(":")[1])
        flips = [0]
        original = Store.flip

        def flip(self: Store, slot: int, selector: int) -> None:
            if flips[0] == limit:
                os._exit(9)
            flips[0] += 1
            original(self, slot, selector)

        Store.flip = flip  # type: ignore[method-assign]
    value = np.full(1 << 16, float(stamp), np.float32)
    planned = [
        BatchOp(batch.CREATE, n[1:], value, dtype_of(value.dtype))
        if n.startswith("+")
        else BatchOp(batch.ASSIGN, n, value)
        for n in names
    ]
    run_batch(ops, planned, atomic=True, consume=lambda info, view: None)
    os._exit(0)


if __name__ == "__main__":
    main()
