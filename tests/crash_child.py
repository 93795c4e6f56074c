"""A store user to be SIGKILLed by tests/test_crash.py: holds a stripe, or writes a large value."""

from __future__ import annotations

import sys
import time

import numpy as np

from tensorps.server.ops import Ops
from tensorps.server.store import Store


def main() -> None:
    mode, path, name = sys.argv[1:4]
    ops = Ops(Store.open(path))
    if mode == "hold":
        ops.locks.acquire(ops.locks.stripe(name), exclusive=True)
        print("held", flush=True)
    elif mode == "write":
        count = int(sys.argv[4])
        value = np.full(count, 2.0, np.float32)
        print("writing", flush=True)
        ops.assign(name, value, read_value=False)
        print("done", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
