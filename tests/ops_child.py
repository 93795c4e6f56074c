"""A write with a request id that dies at a chosen point, for tests/test_exactly_once.py."""

from __future__ import annotations

import os
import sys

import numpy as np

from tensorps.client.codec import dtype_of
from tensorps.server import batch
from tensorps.server.ops import Ops
from tensorps.server.store import Store


def _die(*_args: object, **_kwargs: object) -> None:
    os._exit(9)


def main() -> None:
    """argv: store path, what ("add-during-copy", "create-before-insert", "atomic-delete-after-commit"),
    the variable's name, the request id (hex)."""
    path, what, name, request = sys.argv[1:5]
    ops = Ops(Store.attach(path))
    rid = bytes.fromhex(request)
    if what == "add-during-copy":
        np.add = _die  # type: ignore[assignment]  # the unlocked update's copy, after the lock is released
        ops.assign_add(name, np.ones(4, np.float32), use_locking=False, request=rid)
    elif what == "create-before-insert":
        Store.insert = _die  # type: ignore[method-assign,assignment]  # the value is filled, not named
        ops.create(name, dtype_of("float32"), None, np.full(4, 3.0, np.float32), request=rid)
    elif what == "atomic-delete-after-commit":
        Store.delete_slot = _die  # type: ignore[method-assign]
        deleting = [batch.BatchOp(batch.DELETE, name)]
        batch.run_batch(ops, deleting, atomic=True, consume=lambda info, view: None, request=rid)
    os._exit(0)


if __name__ == "__main__":
    main()
