"""A few plain calls against a running server, each printed with its result: the client API in one page.

python -m tensorps.examples.basics --target localhost:50051
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tensorps.client import Client, NotFoundError, TensorPSError, VariableInfo
from tensorps.examples.healthcheck import default_target


def _show(value: Any) -> str:
    if isinstance(value, VariableInfo):
        state = "initialized" if value.initialized else "uninitialized"
        return f"{value.dtype} shape {value.shape}, {state}, version {value.version}"
    if isinstance(value, np.ndarray):
        return np.array2string(value, separator=", ").replace("\n", "")
    return "ok" if value is None else repr(value)


def _do(what: str, call: Callable[[], Any]) -> Any:
    """Run one call and print it with its result, or with the error the server answered."""
    try:
        result = call()
    except TensorPSError as exc:
        print(f"  {what:<52} -> {type(exc).__name__}: {exc.message}", flush=True)
        return None
    print(f"  {what:<52} -> {_show(result)}", flush=True)
    return result


def run(target: str, prefix: str = "demo") -> None:
    w, steps, later = f"{prefix}/w", f"{prefix}/steps", f"{prefix}/later"
    with Client(target, timeout=10) as ps:
        for name in (w, steps, later):
            with contextlib.suppress(NotFoundError):
                ps.delete(name)  # left over from an earlier run against a kept store
        print(f"example worker: plain calls against {target}", flush=True)
        _do(
            f"create('{w}', dtype='float32', shape=(2, 3))",
            lambda: ps.create(w, dtype="float32", shape=(2, 3)),
        )
        _do(f"read('{w}')", lambda: ps.read(w))
        _do(f"assign('{w}', ones((2, 3)))", lambda: ps.assign(w, np.ones((2, 3), np.float32)))
        _do(
            f"assign_add('{w}', full((2, 3), 0.5))",
            lambda: ps.assign_add(w, np.full((2, 3), 0.5, np.float32)),
        )
        _do(f"assign('{w}', zeros(6))", lambda: ps.assign(w, np.zeros(6, np.float32)))
        _do(
            f"assign('{w}', arange(6), validate_shape=False)",
            lambda: ps.assign(w, np.arange(6, dtype=np.float32), validate_shape=False),
        )
        _do(f"assign('{w}', arange(6) as float64)", lambda: ps.assign(w, np.arange(6, dtype=np.float64)))
        _do(f"info('{w}')", lambda: ps.info(w))
        _do(f"create('{steps}', value=int64 0)", lambda: ps.create(steps, value=np.int64(0)))
        for _ in range(3):
            _do(
                f"assign_add('{steps}', 1, use_locking=True)",
                lambda: ps.assign_add(steps, np.int64(1), use_locking=True),
            )
        _do(f"create('{later}', dtype='int32')", lambda: ps.create(later, dtype="int32"))
        _do(f"assign_add('{later}', 1)", lambda: ps.assign_add(later, 1))
        _do(f"assign('{later}', [[1, 2], [3, 4]])", lambda: ps.assign(later, [[1, 2], [3, 4]]))
        _do(f"list('{prefix}/')", lambda: [v.name for v in ps.list(prefix + "/")])
        for name in (w, steps, later):
            _do(f"delete('{name}')", functools.partial(ps.delete, name))
        _do(f"read('{w}')", lambda: ps.read(w))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensorps.examples.basics", description=__doc__)
    parser.add_argument("--target", default=default_target(), help="server host:port (env TENSORPS_TARGET)")
    parser.add_argument("--prefix", default="demo", help="prefix of the variables it creates and deletes")
    args = parser.parse_args(argv)
    try:
        run(args.target, args.prefix)
    except TensorPSError as exc:
        print(f"basics: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
