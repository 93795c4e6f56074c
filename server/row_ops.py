"""Rows and optimizers over the store: the kernels of rows.py and optimizers.py with TF's locking.

- gather: a read under the variable's shared lock.
- use_locking=True: the stripes of the variable and its slots are taken once each, in sorted order, for
  the whole update. A sparse update writes its rows in place behind an undo record of the old rows
  (undo.py: cost proportional to the rows, crash-atomic); a dense apply fills the second buffers of every
  variable it writes and publishes them together (one flip, or a commit record for several).
- use_locking=False: the lookups, checks and version counts run under the locks; the arithmetic and the
  writes run after them, in place, as TF's unlocked kernels do (concurrent updates may interleave).
- Inside an atomic batch (plan_atomic) an op only computes its new values; the batch publishes them.
Every check runs before anything is written; a failed call changes nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import dtype_from_code, nbytes_of
from tensorps.server import commits, optimizers, row_patches, rows, undo
from tensorps.server.ops import (
    NO_REQUEST,
    Aborted,
    Info,
    InvalidArgument,
    NotFound,
    Ops,
    ResourceExhausted,
    check_readable,
    durable,
)
from tensorps.server.optimizer_checks import Operand, check
from tensorps.server.optimizers import Flags
from tensorps.server.persist import records
from tensorps.server.persist.records import Entry
from tensorps.server.requests import Applied
from tensorps.server.store import Descriptor, StoreFullError
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]

GATHER = pb.BATCH_OP_GATHER
SCATTERS: dict[int, str] = {
    pb.BATCH_OP_SCATTER_UPDATE: "update",
    pb.BATCH_OP_SCATTER_ADD: "add",
    pb.BATCH_OP_SCATTER_SUB: "sub",
    pb.BATCH_OP_SCATTER_MUL: "mul",
    pb.BATCH_OP_SCATTER_DIV: "div",
    pb.BATCH_OP_SCATTER_MIN: "min",
    pb.BATCH_OP_SCATTER_MAX: "max",
}
SCATTER_NDS: dict[int, str] = {
    pb.BATCH_OP_SCATTER_ND_UPDATE: "update",
    pb.BATCH_OP_SCATTER_ND_ADD: "add",
    pb.BATCH_OP_SCATTER_ND_SUB: "sub",
}
APPLIES: dict[int, str] = {
    pb.BATCH_OP_APPLY_GRADIENT_DESCENT: "apply_gradient_descent",
    pb.BATCH_OP_APPLY_MOMENTUM: "apply_momentum",
    pb.BATCH_OP_APPLY_ADAGRAD: "apply_adagrad",
    pb.BATCH_OP_APPLY_ADAM: "apply_adam",
    pb.BATCH_OP_APPLY_RMS_PROP: "apply_rms_prop",
    pb.BATCH_OP_APPLY_FTRL: "apply_ftrl",
    pb.BATCH_OP_SPARSE_APPLY_ADAGRAD: "sparse_apply_adagrad",
    pb.BATCH_OP_SPARSE_APPLY_MOMENTUM: "sparse_apply_momentum",
    pb.BATCH_OP_SPARSE_APPLY_FTRL: "sparse_apply_ftrl",
    pb.BATCH_OP_SPARSE_APPLY_RMS_PROP: "sparse_apply_rms_prop",
}
ROW_WRITES = frozenset((*SCATTERS, *SCATTER_NDS, *APPLIES))
ROW_KINDS = frozenset((GATHER, *ROW_WRITES))
OP_NAMES: dict[int, str] = {
    GATHER: "ResourceGather",
    **{k: rows.OP_NAMES[v] for k, v in SCATTERS.items()},
    **{k: rows.ND_OP_NAMES[v] for k, v in SCATTER_NDS.items()},
    **{k: optimizers.SPECS[v].op for k, v in APPLIES.items()},
}


def input_count(kind: int) -> int:
    """How many tensor inputs an operation of `kind` takes (BatchOp.inputs)."""
    if kind == GATHER:
        return 1
    if kind in SCATTERS or kind in SCATTER_NDS:
        return 2
    spec = optimizers.SPECS[APPLIES[kind]]
    return len(spec.hyper) + 1 + int(spec.sparse)


def slot_count(kind: int) -> int:
    return len(optimizers.SPECS[APPLIES[kind]].slots) if kind in APPLIES else 0


class RowArgs(NamedTuple):
    """What a row op or optimizer takes beyond the variable's name (BatchOp fields of the .proto)."""

    slots: tuple[str, ...] = ()
    inputs: tuple[Array, ...] = ()
    batch_dims: int = 0
    flags: Flags = Flags()


class _Target(NamedTuple):
    """A variable an op writes, as found under its lock."""

    name: str
    slot: int
    d: Descriptor
    view: Array


def _info(name: str, d: Descriptor, version: int | None = None) -> Info:
    version = d.version if version is None else version
    return Info(name, dtype_from_code(d.dtype), d.shape, d.initialized, version)


# ---- the computation, shared by single calls and atomic batches --------------------------------------


class Planned(NamedTuple):
    """An update checked and computed: per written variable, its touched rows (None: all of it, dense) and
    their new values."""

    rows: Array | None
    new: list[Array]  # rows x inner matrices (sparse), or whole arrays (dense); var first


def plan(kind: int, values: Sequence[tuple[str, Descriptor, Array | None]], args: RowArgs) -> Planned:
    """Check the op against the variables (name, descriptor, current value or None when uninitialized)
    and compute its new values from the current ones; changes nothing."""
    name, d, current = values[0]
    dtype = dtype_from_code(d.dtype).name
    if kind in SCATTERS or kind in SCATTER_NDS:
        indices, updates = args.inputs
        op = SCATTERS[kind] if kind in SCATTERS else SCATTER_NDS[kind]
        planner = rows.plan_scatter if kind in SCATTERS else rows.plan_scatter_nd
        patch = planner(
            op, name, d.shape or (), dtype, indices=indices, updates=updates, initialized=d.initialized
        )
        assert current is not None
        old = current.reshape(patch.outer, patch.inner)[patch.rows]
        return Planned(patch.rows, [rows.apply_scatter(op, patch, old)])
    key = APPLIES[kind]
    spec = optimizers.SPECS[key]
    operands = [Operand(n, dtype_from_code(x.dtype).name, x.shape, x.initialized) for n, x, _ in values]
    hyper = dict(zip(spec.hyper, args.inputs[: len(spec.hyper)], strict=True))
    grad = args.inputs[len(spec.hyper)]
    positions = args.inputs[len(spec.hyper) + 1] if spec.sparse else None
    check(key, operands[0], operands[1:], hyper, grad=grad, indices=positions, flags=args.flags)
    scalars = {k: v[()] for k, v in hyper.items()}
    arrays: list[Array] = []
    for _, _, v in values:
        assert v is not None  # checked: initialized
        arrays.append(v)
    assert d.shape is not None
    if not spec.sparse:
        dense = optimizers.apply_dense(key, arrays[0], arrays[1:], scalars, grad=grad, flags=args.flags)
        return Planned(None, dense)
    assert positions is not None
    sparse = optimizers.plan_sparse(positions)
    inner = optimizers.inner_size(d.shape)
    old_rows = [a.reshape(d.shape[0], inner)[sparse.rows] for a in arrays]
    matrix = grad.reshape(len(positions), inner)
    rows_new = optimizers.apply_sparse(key, sparse, old_rows, scalars, grad=matrix, flags=args.flags)
    return Planned(sparse.rows, rows_new)


def names_of(name: str, args: RowArgs) -> list[str]:
    return [name, *args.slots]


# ---- single calls ----------------------------------------------------------------------------------


def gather(ops: Ops, name: str, args: RowArgs) -> tuple[Info, Array]:
    (indices,) = args.inputs
    rows.check_indices_dtype(indices)
    with ops.hold(ops.locks.stripe(name), exclusive=False, name=name):
        slot = ops._slot(name)
        d = ops.store.active(slot)
        check_readable(name, d)
        return _info(name, d), rows.gather(name, ops._view(slot, d), indices, args.batch_dims)


@durable
def update(
    ops: Ops,
    kind: int,
    name: str,
    args: RowArgs,
    *,
    use_locking: bool,
    read_value: bool,
    request: bytes | None = None,
) -> tuple[Info, Array | None]:
    """A scatter or an apply as its single call: the variable's info after it (and value, read_value)."""
    names = names_of(name, args)
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{OP_NAMES[kind]}: a variable is named twice among {names}")
    stripes = sorted({ops.locks.stripe(n) for n in names})
    taken: list[int] = []
    try:
        for stripe in stripes:
            ops.acquire(stripe, exclusive=True, name=name)
            taken.append(stripe)
        slot = ops._lookup(name, request)
        done = ops.applied(name, slot, request)
        if done is not None:
            return _replayed(ops, kind, name, slot, done, read_value=read_value)
        targets = [_Target(name, slot, ops.store.active(slot), np.empty(0))]
        for slot_name in args.slots:
            s = ops._slot(slot_name)
            targets.append(_Target(slot_name, s, ops.store.active(s), np.empty(0)))
        targets = [t._replace(view=ops._view(t.slot, t.d)) if t.d.initialized else t for t in targets]
        planned = plan(kind, [(t.name, t.d, t.view if t.d.initialized else None) for t in targets], args)
        # A buffer a snapshot pinned is not written in place: the whole value goes to a fresh buffer.
        pinned = any(ops.store.pinned(t.slot, t.d.segment) for t in targets)
        entries = log_entries(targets, planned)
        if use_locking or pinned:
            if planned.rows is None:
                info = _publish_dense(ops, targets, planned.new, stripes, request, entries=entries)
            elif pinned:
                wholes = [
                    row_patches.materialize(t.view, planned.rows, new)
                    for t, new in zip(targets, planned.new, strict=True)
                ]
                info = _publish_dense(ops, targets, wholes, stripes, request, entries=entries)
            else:
                info = _write_rows(ops, targets, planned, stripes, request, entries=entries)
            return info, (ops._view(slot, ops.store.active(slot)).copy() if read_value else None)
        ops.log(*entries)
        versions = []
        for t in targets:
            ops.retire(t.name, t.slot)
            versions.append(ops.store.bump_version(t.slot, NO_REQUEST))
        ops.begin_copy(stripes)
    finally:
        for stripe in reversed(taken):
            ops.locks.release(stripe)
    # Unlocked, as TF's kernels without use_locking: in place, after the locks.
    try:
        _write_in_place(targets, planned)
    finally:
        ops.end_copy(stripes)
    ops._applied_unlocked(name, slot, versions[0], request)
    info = _info(name, targets[0].d, versions[0])
    return info, (targets[0].view.copy() if read_value else None)


def log_entries(targets: Sequence[_Target], planned: Planned) -> list[Entry]:
    """The write-ahead log's record of an update: each variable's new value (dense), or its new rows."""
    entries = []
    for t, new in zip(targets, planned.new, strict=True):
        version = t.d.version + 1
        if planned.rows is None:
            entries.append(Entry(records.PUT, t.name, t.d.dtype, new.shape, True, version, new))
        else:
            rows_bytes = np.ascontiguousarray(planned.rows, np.int64).tobytes()
            entries.append(Entry(records.ROWS, t.name, t.d.dtype, t.d.shape, True, version, new, rows_bytes))
    return entries


def _replayed(
    ops: Ops, kind: int, name: str, slot: int, done: tuple[Applied, bool], *, read_value: bool
) -> tuple[Info, Array | None]:
    (version, _kept), current = done
    if slot < 0:
        raise Aborted(
            f"{OP_NAMES[kind]} of variable '{name}' was applied already (version {version}); "
            "the variable was deleted since"
        )
    d = ops.store.active(slot)
    info = _info(name, d, version)
    if not read_value:
        return info, None
    if current:
        return info, ops._view(slot, d).copy()
    raise Aborted(
        f"{OP_NAMES[kind]} of variable '{name}' was applied already (version {version}); the value it "
        "produced is no longer known: read the variable"
    )


def _write_in_place(targets: Sequence[_Target], planned: Planned) -> None:
    for t, new in zip(targets, planned.new, strict=True):
        if planned.rows is None:
            np.copyto(t.view, new)
        elif t.view.size and len(planned.rows):
            t.view.reshape(-1, new.shape[1])[planned.rows] = new


def _write_rows(
    ops: Ops,
    targets: Sequence[_Target],
    planned: Planned,
    stripes: list[int],
    request: bytes | None,
    *,
    entries: Sequence[Entry],
) -> Info:
    """The touched rows in place, crash-atomically behind an undo record of their old values; `entries`
    go to the write-ahead log once the record is ready, before the first row changes."""
    store = ops.store
    assert planned.rows is not None
    count = len(planned.rows)
    try:
        record = store.undo_record()
    except OSError as exc:
        raise _no_room(targets[0].name, exc) from None
    store.mark_in_commit(stripes, True)
    written = False
    try:
        tables: list[Array | None] = []
        for t, new in zip(targets, planned.new, strict=True):
            inner = new.shape[1]
            table = t.view.reshape(-1, inner) if t.view.size else None
            tables.append(table)
            old = table[planned.rows] if table is not None else np.empty(0, np.uint8)
            try:
                record.add(
                    t.slot,
                    t.d.version,
                    t.d.segment,
                    row_bytes=inner * t.view.itemsize,
                    rows=planned.rows,
                    old=old,
                    request=(request or NO_REQUEST) if t is targets[0] else NO_REQUEST,
                )
            except OSError as exc:
                raise _no_room(t.name, exc) from None
        record.state(undo.READY)
        ops.log(*entries)
        written = True
        for t in targets:
            ops.retire(t.name, t.slot)
        for table, new in zip(tables, planned.new, strict=True):
            if table is not None and count:
                table[planned.rows] = new
        record.state(undo.WRITTEN)
        versions = [
            store.bump_version(t.slot, (request or NO_REQUEST) if i == 0 else NO_REQUEST)
            for i, t in enumerate(targets)
        ]
        written = False
    finally:
        if written:
            record.abandon()  # failed amid the rows: the next holder of a stripe puts the old ones back
        else:
            record.finish()
            store.mark_in_commit(stripes, False)
    return _info(targets[0].name, targets[0].d, versions[0])


def _no_room(name: str, exc: OSError) -> ResourceExhausted | OSError:
    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
        return ResourceExhausted(f"variable '{name}': the store's filesystem has no room for the undo record")
    return exc


def _publish_dense(
    ops: Ops,
    targets: Sequence[_Target],
    new: Sequence[Array],
    stripes: list[int],
    request: bytes | None,
    *,
    entries: Sequence[Entry],
) -> Info:
    """Fill the second buffers of every target and publish them together: a crash leaves all or none.
    `entries` go to the write-ahead log once the buffers (and the commit record) are ready, before
    anything is published."""
    store = ops.store
    prepared: list[tuple[int, Descriptor]] = []
    for i, (t, value) in enumerate(zip(targets, new, strict=True)):
        nbytes = nbytes_of(value.shape, dtype_from_code(t.d.dtype))
        try:
            segment, capacity = store.spare_segment(t.slot, nbytes)
        except StoreFullError as exc:
            raise ResourceExhausted(f"variable '{t.name}': {exc}") from None
        rid = (request or NO_REQUEST) if i == 0 else NO_REQUEST
        d = Descriptor(t.d.dtype, True, value.shape, t.d.version + 1, nbytes, segment, capacity, rid)
        np.copyto(ops._view(t.slot, d), value)
        prepared.append((t.slot, d))
    if len(prepared) == 1:
        ops.log(*entries)
        ops.retire(targets[0].name, targets[0].slot)
        store.publish(*prepared[0])
        return _info(targets[0].name, prepared[0][1])
    record = store.commit_record()
    store.mark_in_commit(stripes, True)
    committed = published = False
    try:
        flips = [(slot, store.prepare(slot, d)) for slot, d in prepared]
        for slot, selector in flips:
            record.add(commits.FLIP, slot, selector)
        # Logged once the commit record (which may fail: the store's filesystem full) is ready.
        ops.log(*entries)
        for t in targets:
            ops.retire(t.name, t.slot)
        record.commit()
        committed = True
        for slot, selector in flips:
            store.flip(slot, selector)
        published = True
    finally:
        if committed and not published:
            record.abandon()
        else:
            record.finish()
            store.mark_in_commit(stripes, False)
    return _info(targets[0].name, prepared[0][1])


# ---- atomic batches (batch.py) ---------------------------------------------------------------------


def plan_atomic(
    kind: int,
    name: str,
    args: RowArgs,
    existing: Callable[[str], tuple[Any, Descriptor]],
    value_of: Callable[[Any, Descriptor], Array],
) -> tuple[list[tuple[str, Any, Descriptor, Array]], Planned | None, Array | None]:
    """An op of an atomic batch against the state the batch's earlier ops leave: the variables it writes
    (name, the batch's record of it, its descriptor now, its value now) and what it computed; or, for a
    gather, the rows."""
    if kind == GATHER:
        _var, d = existing(name)
        check_readable(name, d)
        (indices,) = args.inputs
        rows.check_indices_dtype(indices)
        return [], None, rows.gather(name, value_of(_var, d), indices, args.batch_dims)
    names = names_of(name, args)
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{OP_NAMES[kind]}: a variable is named twice among {names}")
    found = [(n, *existing(n)) for n in names]
    values = [(n, d, value_of(var, d) if d.initialized else None) for n, var, d in found]
    planned = plan(kind, values, args)
    written = []
    for (n, var, d), (_n, _d, current) in zip(found, values, strict=True):
        assert current is not None
        written.append((n, var, d, current))
    return written, planned, None


def check_names(kind: int, name: str, args: RowArgs) -> None:
    if kind in APPLIES and len(args.slots) != slot_count(kind):
        spec = optimizers.SPECS[APPLIES[kind]]
        raise InvalidArgument(f"{spec.op} of variable '{name}' takes slot variables {', '.join(spec.slots)}")
    if len(args.inputs) != input_count(kind):
        raise InvalidArgument(f"{OP_NAMES[kind]} takes {input_count(kind)} inputs, got {len(args.inputs)}")
    for slot_name in args.slots:
        if not slot_name:
            raise NotFound("a slot variable's name is empty")
