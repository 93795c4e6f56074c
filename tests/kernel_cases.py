"""The TensorFlow fixtures of tests/fixtures/kernels.npz run through tensorps' pure kernels (rows.py,
optimizers.py), and a distance in ulps between two arrays."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

from tensorps.client.codec import dtype_of
from tensorps.server import optimizer_checks, optimizers, rows

Array = np.ndarray[Any, Any]
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "kernels.npz")


def load() -> dict[str, dict[str, Array]]:
    """case name -> {"in/x": array, "out/y": array}."""
    raw = np.load(FIXTURES)
    found: dict[str, dict[str, Array]] = {}
    for key in raw.files:
        if key in ("cases", "tensorflow_version") or key.startswith("matrix/"):
            continue
        value = raw[key]
        plain = key
        if key.endswith("#bfloat16"):
            plain, value = key[: -len("#bfloat16")], value.view(ml_dtypes.bfloat16)
        parts = plain.split("/")
        # The case name is everything before "in" or "out".
        at = max(i for i, p in enumerate(parts) if p in ("in", "out"))
        found.setdefault("/".join(parts[:at]), {})["/".join(parts[at:])] = value
    return found


def ulps(a: Array, b: Array) -> int:
    """The largest distance in units in the last place between same-shaped float (or complex) arrays;
    0 for identical bits; NaN matches NaN; integers and bools must be equal (else a huge number)."""
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype.kind == "c":
        return max(ulps(a.real.copy(), b.real.copy()), ulps(a.imag.copy(), b.imag.copy()))
    if a.dtype.kind in "iub":
        return 0 if np.array_equal(a, b) else 1 << 62
    bits = np.dtype(f"i{a.dtype.itemsize}")
    both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))

    def ordered(x: Array) -> Array:
        i = x.view(bits).astype(np.int64)
        return np.where(i < 0, np.int64(np.iinfo(bits).min) - i, i)

    diff = np.where(both_nan, 0, np.abs(ordered(a) - ordered(b)))
    return int(diff.max()) if diff.size else 0


def run_case(name: str, case: dict[str, Array]) -> dict[str, tuple[Array, Array]]:
    """output name -> (tensorps' value, TensorFlow's value)."""
    kind = name.split("/", maxsplit=1)[0]
    if kind == "gather":
        got = rows.gather("t", case["in/table"], case["in/indices"], int(case["in/batch_dims"]))
        return {"rows": (got, case["out/rows"])}
    if kind.startswith("scatter_"):
        table = case["in/table"]
        dtype = dtype_of(table.dtype).name
        nd = kind.startswith("scatter_nd_")
        op = kind.split("_")[-1]
        plan = rows.plan_scatter_nd if nd else rows.plan_scatter
        patch = plan(
            op,
            "t",
            table.shape,
            dtype,
            indices=case["in/indices"],
            updates=case["in/updates"],
            initialized=True,
        )
        flat = table.reshape(patch.outer, patch.inner).copy()
        flat[patch.rows] = rows.apply_scatter(op, patch, flat[patch.rows])
        return {"table": (flat.reshape(table.shape), case["out/table"])}
    spec = optimizers.SPECS[kind]
    var = case["in/var"]
    slots = [case[f"in/slot{i}"] for i in range(len(spec.slots))]
    hyper = {h: case[f"in/hyper/{h}"] for h in spec.hyper}
    flags = optimizers.Flags(
        **{k[len("in/flag/") :]: bool(v) for k, v in case.items() if k.startswith("in/flag/")}
    )
    dtype = dtype_of(var.dtype).name
    operands = [optimizer_checks.Operand(n, dtype, var.shape, True) for n in ("var", *spec.slots)]
    indices = case.get("in/indices")
    optimizer_checks.check(
        kind, operands[0], operands[1:], hyper, grad=case["in/grad"], indices=indices, flags=flags
    )
    scalars = {h: v[()] for h, v in hyper.items()}
    if spec.sparse:
        assert indices is not None
        sparse = optimizers.plan_sparse(indices)
        inner = optimizers.inner_size(var.shape)
        old = [x.reshape(var.shape[0], inner)[sparse.rows] for x in (var, *slots)]
        grad = case["in/grad"].reshape(len(indices), inner)
        new_rows = optimizers.apply_sparse(kind, sparse, old, scalars, grad=grad, flags=flags)
        new = []
        for x, r in zip((var, *slots), new_rows, strict=True):
            full = x.reshape(var.shape[0], inner).copy()
            full[sparse.rows] = r
            new.append(full.reshape(var.shape))
    else:
        new = optimizers.apply_dense(kind, var, slots, scalars, grad=case["in/grad"], flags=flags)
    names = ["var"] + [f"slot{i}" for i in range(len(slots))]
    return {n: (np.asarray(v), case[f"out/{n}"]) for n, v in zip(names, new, strict=True)}


def dtype_matrix() -> dict[str, set[str]]:
    """kernel -> the dtypes TensorFlow's CPU kernel ran for."""
    raw = np.load(FIXTURES)
    return {
        key.removeprefix("matrix/"): set(raw[key].tolist()) for key in raw.files if key.startswith("matrix/")
    }


def all_cases() -> Iterator[tuple[str, dict[str, Array]]]:
    yield from sorted(load().items())
