"""A store user that dies (or stalls) at a chosen step, for tests/test_store_crash.py.

argv: mode, store path, variable name. Modes:
    delete-dies-at-unlink  deletes the variable and exits (code 9) at its first segment unlink
    create-dies-filling    creates the variable with a 1 MiB value and exits (code 9) while copying it in
    create-stalls-filling  the same, but prints "filling" and sleeps inside the copy until killed
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from tensorps.client.codec import dtype_of
from tensorps.server.ops import Ops
from tensorps.server.store import Store

VALUE = np.full(1 << 18, 3.0, np.float32)


def main() -> None:
    mode, path, name = sys.argv[1:4]
    ops = Ops(Store.attach(path))
    if mode == "delete-dies-at-unlink":
        unlink = os.unlink

        def dying_unlink(target: Any, *args: Any, **kwargs: Any) -> None:
            if str(target).rsplit("/", 1)[-1].startswith("seg-"):
                os._exit(9)
            unlink(target, *args, **kwargs)

        os.unlink = dying_unlink  # type: ignore[assignment]
        ops.delete(name)
    else:
        copyto = np.copyto

        def dying_copy(target: Any, source: Any, *args: Any, **kwargs: Any) -> None:
            if getattr(source, "nbytes", 0) == VALUE.nbytes:
                copyto(target[: target.size // 2], source[: source.size // 2])  # half the value is in
                if mode == "create-stalls-filling":
                    print("filling", flush=True)
                    time.sleep(3600)
                os._exit(9)
            copyto(target, source, *args, **kwargs)

        np.copyto = dying_copy  # type: ignore[assignment]
        ops.create(name, dtype_of("float32"), None, VALUE)
    os._exit(0)


if __name__ == "__main__":
    main()
