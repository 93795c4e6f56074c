"""TensorFlow's row ops as pure functions: ResourceGather, ResourceScatter*, ResourceScatterNd*.

No store, no locks: every check of TF's kernels (resource_variable_ops.cc, scatter_op.cc, scatter_nd_op.cc)
with their texts, then the arithmetic on rows. A table of shape S is seen as a matrix of `outer` rows:
for Scatter* and the sparse optimizers a row is `table[i]`; for ScatterNd* with index depth k it is the
slice `table[i0, ..., ik-1]` (rows of the matrix reshape(prod(S[:k]), prod(S[k:]))). An update is planned
as the unique rows it touches (`Patch.rows`) and computed from their old values alone, so the caller pays
for the rows it touches, never for the table, and can keep the old rows as an undo record.

Every check runs before any row is computed: unlike TF's CPU functors (which write the rows before a bad
index and then fail), a refused call changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import Shape, dtype_of, format_shape
from tensorps.server.ops import FailedPrecondition, InvalidArgument

Array = np.ndarray[Any, Any]

INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_REAL: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64")
_REAL += ("uint8", "uint16", "uint32", "uint64")
_NUMBER = (*_REAL, "complex64", "complex128")
# The dtypes TF registers each CPU kernel for (TF_CALL_ALL_TYPES, TF_CALL_NUMBER_TYPES, ...).
SCATTER_DTYPES: dict[str, tuple[str, ...]] = {
    "update": (*_NUMBER, "bool"),
    "add": _NUMBER,
    "sub": _NUMBER,
    "mul": _NUMBER,
    "div": _NUMBER,
    "min": _REAL,
    "max": _REAL,
}
# ScatterNdAdd/Sub run for bool too: Eigen's bool sum is a logical or, a bool difference a logical xor.
SCATTER_ND_DTYPES: dict[str, tuple[str, ...]] = {
    "update": (*_NUMBER, "bool"),
    "add": (*_NUMBER, "bool"),
    "sub": (*_NUMBER, "bool"),
}
OP_NAMES = {kind: "ResourceScatter" + kind.capitalize() for kind in SCATTER_DTYPES}
ND_OP_NAMES = {kind: "ResourceScatterNd" + kind.capitalize() for kind in SCATTER_ND_DTYPES}


class Patch(NamedTuple):
    """A planned row update: the table as (outer, inner), the sorted unique rows touched, and per update
    (in order) the position of its row among `rows` and its values (inner elements each)."""

    outer: int
    inner: int
    rows: Array  # int64, sorted, unique
    where: Array  # int64, per update: index into rows
    updates: Array  # (len(where), inner), or (1, inner) broadcast to every update


def _index_text(shape: Shape, flat: int) -> str:
    position = np.unravel_index(flat, shape) if shape else ()
    return "[" + ",".join(str(int(i)) for i in position) + "]"


def check_indices_dtype(indices: Array) -> None:
    if indices.dtype not in INDEX_DTYPES:
        raise InvalidArgument(
            f"Value for attr 'Tindices' of {dtype_of(indices.dtype).name} is not in the list of allowed "
            "values: int32, int64"
        )


def check_initialized(name: str, initialized: bool) -> None:
    if not initialized:
        raise FailedPrecondition(f"Attempting to use uninitialized value {name}")


def check_kernel_dtype(op: str, name: str, dtype: str, allowed: tuple[str, ...]) -> None:
    if dtype not in allowed:
        raise InvalidArgument(
            f"{op} of variable '{name}': no kernel for dtype {dtype} (TensorFlow registers it for "
            f"{', '.join(allowed)})"
        )


def bounds(indices: Array, limit: int) -> Array:
    """The indices as int64, flat; refused (TF's text, the first bad one in order) if one is out of
    [0, limit)."""
    flat = indices.reshape(-1).astype(np.int64, copy=False)
    bad = np.flatnonzero((flat < 0) | (flat >= limit))
    if bad.size:
        first = int(bad[0])
        raise InvalidArgument(
            f"indices{_index_text(indices.shape, first)} = {int(flat[first])} is not in [0, {limit})"
        )
    return flat


def _unique(flat: Array) -> tuple[Array, Array]:
    rows, where = np.unique(flat, return_inverse=True)
    return rows.astype(np.int64, copy=False), where.reshape(-1).astype(np.int64, copy=False)


# ---- gather ---------------------------------------------------------------------------------------


def gather(name: str, table: Array, indices: Array, batch_dims: int = 0) -> Array:
    """ResourceGather: `indices.shape + table.shape[1:]` (batch_dims=0), or with leading batch dimensions
    shared by the table and the indices, `table.shape[:b] + indices.shape[b:] + table.shape[b+1:]`."""
    check_indices_dtype(indices)
    if table.ndim < 1:
        raise InvalidArgument(f"params must be at least 1 dimensional (variable '{name}')")
    if batch_dims < 0:
        raise InvalidArgument(f"batch_dims is negative ({batch_dims})")
    if batch_dims >= table.ndim:
        raise InvalidArgument(
            f"batch_dims ({batch_dims}) must be less than rank(params) ({table.ndim}) (variable '{name}')"
        )
    if batch_dims > indices.ndim:
        raise InvalidArgument(f"batch_dims ({batch_dims}) must be at most rank(indices) ({indices.ndim})")
    for axis in range(batch_dims):
        if indices.shape[axis] != table.shape[axis]:
            raise InvalidArgument(
                f"indices.shape[{axis}] = {indices.shape[axis]} does not match params.shape[{axis}] = "
                f"{table.shape[axis]} (batch_dims {batch_dims}, variable '{name}')"
            )
    limit = table.shape[batch_dims]
    flat = bounds(indices, limit)
    if batch_dims == 0:
        return np.take(table, flat, axis=0).reshape(indices.shape + table.shape[1:])
    batch = math.prod(table.shape[:batch_dims])
    per = flat.reshape(batch, -1)
    rows = table.reshape(batch, limit, -1)
    taken = rows[np.arange(batch)[:, None], per]
    shape = table.shape[:batch_dims] + indices.shape[batch_dims:] + table.shape[batch_dims + 1 :]
    return taken.reshape(shape)


# ---- scatter --------------------------------------------------------------------------------------


def _check_scatter(
    op: str,
    allowed: tuple[str, ...],
    name: str,
    dtype: str,
    indices: Array,
    *,
    updates: Array,
    initialized: bool,
) -> None:
    """The checks every Scatter and ScatterNd kernel runs first, in TF's order."""
    check_indices_dtype(indices)
    check_kernel_dtype(op, name, dtype, allowed)
    if updates.dtype != dtype_of(dtype).numpy:
        raise InvalidArgument(
            f"DType of scatter resource and updates does not match. (variable '{name}' is {dtype}, "
            f"updates are {dtype_of(updates.dtype).name})"
        )
    check_initialized(name, initialized)


def plan_scatter(
    kind: str, name: str, shape: Shape, dtype: str, *, indices: Array, updates: Array, initialized: bool
) -> Patch:
    """Every check of ResourceScatter<kind> for a table of `shape`/`dtype`; the rows it touches."""
    op = OP_NAMES[kind]
    _check_scatter(op, SCATTER_DTYPES[kind], name, dtype, indices, updates=updates, initialized=initialized)
    if len(shape) < 1:
        raise InvalidArgument(
            f"params must be at least 1-D, got shape {format_shape(shape)} (variable '{name}')"
        )
    if updates.ndim != 0 and updates.shape != indices.shape + shape[1:]:
        raise InvalidArgument(
            "Must have updates.shape = indices.shape + params.shape[1:] or updates.shape = [], got "
            f"updates.shape {format_shape(updates.shape)}, indices.shape {format_shape(indices.shape)}, "
            f"params.shape {format_shape(shape)} (variable '{name}')"
        )
    inner = math.prod(shape[1:])
    flat = bounds(indices, shape[0])
    rows, where = _unique(flat)
    if updates.ndim == 0:
        values = np.broadcast_to(updates.reshape(1, 1), (1, inner))
    else:
        values = updates.reshape(flat.size, inner)
    if kind == "div" and values.dtype.kind in "iu" and values.size and not np.all(values):
        raise InvalidArgument(f"{op} of variable '{name}': Integer division by zero")
    return Patch(shape[0], inner, rows, where, values)


def plan_scatter_nd(
    kind: str, name: str, shape: Shape, dtype: str, *, indices: Array, updates: Array, initialized: bool
) -> Patch:
    """Every check of ResourceScatterNd<kind>: indices[..., :k] address slices table[i0..ik-1]."""
    op = ND_OP_NAMES[kind]
    _check_scatter(
        op, SCATTER_ND_DTYPES[kind], name, dtype, indices, updates=updates, initialized=initialized
    )
    if len(shape) < 1:
        raise InvalidArgument(
            f"Output must be at least 1-D, got shape: {format_shape(shape)} (variable '{name}')"
        )
    if indices.ndim < 1:
        raise InvalidArgument(
            f"indices must be at least 1-D for ScatterNd, got shape {format_shape(indices.shape)}"
        )
    depth = indices.shape[-1]
    batch = indices.ndim - 1
    if depth > len(shape):
        raise InvalidArgument(
            f"Dimensions [{depth},{len(shape)}) of input[shape={format_shape(shape)}] must match "
            f"dimensions [{batch + depth},{updates.ndim}) of updates[shape={format_shape(updates.shape)}]"
        )
    if updates.shape[:batch] != indices.shape[:batch]:
        raise InvalidArgument(
            f"Dimensions [0,{batch}) of indices[shape={format_shape(indices.shape)}] = "
            f"{format_shape(indices.shape[:batch])} must match dimensions [0,{batch}) of "
            f"updates[shape={format_shape(updates.shape)}] = {format_shape(updates.shape[:batch])}"
        )
    if updates.shape[batch:] != shape[depth:]:
        raise InvalidArgument(
            f"Dimensions [{depth},{len(shape)}) of input[shape={format_shape(shape)}] must match "
            f"dimensions [{batch},{updates.ndim}) of updates[shape={format_shape(updates.shape)}]"
        )
    count = math.prod(indices.shape[:batch])
    inner = math.prod(shape[depth:])
    outer = math.prod(shape[:depth])
    coords = indices.reshape(count, depth).astype(np.int64, copy=False)
    bad = np.flatnonzero(np.any((coords < 0) | (coords >= np.asarray(shape[:depth], np.int64)), axis=1))
    if bad.size:
        first = int(bad[0])
        where_text = _index_text(indices.shape[:batch], first)
        values = ", ".join(str(int(c)) for c in coords[first])
        raise InvalidArgument(
            f"indices{where_text} = [{values}] does not index into shape {format_shape(shape)}"
        )
    if count:
        flat = np.ravel_multi_index(tuple(coords.T), shape[:depth]) if depth else np.zeros(count, np.int64)
    else:
        flat = np.zeros(0, np.int64)
    rows, where = _unique(np.asarray(flat, np.int64))
    return Patch(outer, inner, rows, where, updates.reshape(count, inner))


def _trunc_div(a: Array, b: Array) -> Array:
    """C++ integer division (towards zero), which TF's kernels use, not numpy's floor division."""
    q = np.floor_divide(a, b)
    fix = (np.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return np.where(fix, q + 1, q).astype(a.dtype)


_COMBINE: dict[str, Callable[[Array, Array], Array]] = {
    "update": lambda old, new: new,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "min": np.minimum,
    "max": np.maximum,
}


def rounds(where: Array) -> list[Array]:
    """Positions of the updates grouped so that none in a group repeats a row, in order: group r holds
    the r-th update of each row. Applying the groups one after another applies every update in index
    order, as TF's sequential CPU loop does (duplicates accumulate; for update, the last one wins)."""
    if where.size == 0:
        return []
    order = np.argsort(where, kind="stable")
    sorted_rows = where[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    counts = np.diff(np.r_[starts, sorted_rows.size])
    rank = np.arange(sorted_rows.size) - np.repeat(starts, counts)
    groups = []
    for r in range(int(counts.max())):
        groups.append(order[rank == r])
    return groups


def apply_scatter(kind: str, patch: Patch, old: Array) -> Array:
    """The new values of `patch.rows` (old: their current values, (len(rows), inner)), a fresh array."""
    new = old.copy()
    if patch.where.size == 0:
        return new
    with np.errstate(all="ignore"):
        if patch.updates.shape[0] == 1 and patch.where.size != 1:
            value = patch.updates[0]
            for group in rounds(patch.where):
                at = patch.where[group]
                new[at] = _combine(kind, new[at], value)
        else:
            for group in rounds(patch.where):
                at = patch.where[group]
                new[at] = _combine(kind, new[at], patch.updates[group])
    return new


def _combine(kind: str, old: Array, value: Array) -> Array:
    if old.dtype == np.bool_ and kind in ("add", "sub"):
        return np.asarray((np.logical_or if kind == "add" else np.logical_xor)(old, value))
    if kind == "div":
        if old.dtype.kind in "iu":
            return _trunc_div(old, np.broadcast_to(value, old.shape))
        return np.divide(old, value).astype(old.dtype)
    return np.asarray(_COMBINE[kind](old, value)).astype(old.dtype, copy=False)
