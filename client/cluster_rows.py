"""Rows and optimizers over a cluster: gather, scatter_*, scatter_nd_*, apply_* and sparse_apply_* routed.

Every row method of RowCalls builds one QueuedOp; here it becomes the operations the shards run:

- on a plain variable, the operation itself, sent to the variable's shard, which must hold its slots too
  (create them with colocate_with=VAR: colocation.py); a slot elsewhere is refused before anything is sent;
- on a partitioned variable, one operation per part that holds any of its rows: indices are split with
  PartitionSpec.locate and remapped to part-local rows (scatter_nd by the first coordinate), updates and a
  sparse apply's grad rows follow their indices, a dense apply's grad is split along axis 0 and its scalars
  go to every part; the slots must be partitioned like the variable, part k beside part k. The results are
  joined back: a gather's rows in the caller's order, a write's VariableInfo of the logical variable (the
  parts it did not touch are asked for theirs in the same batches) or, with read_value, its whole value.

The checks a lone server makes of the whole variable (index ranges, shapes, dtypes) run first, here, with
the server's own functions and the logical shape, so that an error is TF's text with the logical index and
nothing is sent; errors the parts report name the logical variable. A write spanning several shards is one
write per shard, as a partitioned assign is: not atomic across them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np

from tensorps.client import arrays, codec
from tensorps.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    from_status,
)
from tensorps.client.layouts import join_values, logical_info
from tensorps.client.placement import PartitionSpec
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import APPLY_KINDS, GATHER, SCATTER_KINDS, SCATTER_ND_KINDS, RowCalls
from tensorps.v1 import tensorps_pb2 as pb

if TYPE_CHECKING:
    from tensorps.client.cluster import ClusterClient

Array = np.ndarray[Any, Any]
_SCATTERS: dict[int, str] = {kind: op for op, kind in SCATTER_KINDS.items()}
_SCATTER_NDS: dict[int, str] = {kind: op for op, kind in SCATTER_ND_KINDS.items()}


class Routed(NamedTuple):
    """A row operation as the shards run it: operations (each sent to the shard of its `name`), the join
    of their results, and the rewording of a part's error for the logical variable."""

    ops: list[QueuedOp]
    join: Callable[[list[Any]], Any]
    errors: Callable[[TensorPSError], TensorPSError] | None = None


def route(cluster: ClusterClient, op: QueuedOp) -> Routed | TensorPSError:
    """How `op` runs on the cluster, or the error a lone server would give it (nothing is sent). Slots
    that seem to be elsewhere make the client read the layouts and colocations again first (another
    client may have created them beside the variable since)."""
    routed = _route(cluster, op)
    if isinstance(routed, _Misplaced):
        cluster.layouts.load()
        routed = _route(cluster, op)
    return routed.error if isinstance(routed, _Misplaced) else routed


class _Misplaced(NamedTuple):
    error: TensorPSError


def _route(cluster: ClusterClient, op: QueuedOp) -> Routed | TensorPSError | _Misplaced:
    spec = cluster.layouts.get(op.name)
    slot_specs = [cluster.layouts.get(slot) for slot in op.slots]
    if spec is None:
        return _plain(cluster, op, slot_specs)
    slots = [s for s in slot_specs if s is not None]
    refused = _slots_refusal(cluster, op, spec, slot_specs)
    if refused is not None and len(slots) != len(slot_specs):
        return refused
    try:
        planned = _partitioned(op, spec, slots)  # the server's checks first, as a lone server's
    except Exception as exc:
        status = _status_of(exc)
        if status is None:
            raise
        return from_status(*status)
    return refused if refused is not None else planned._replace(errors=_renamer(spec, slots))


# ---- plain variables -------------------------------------------------------------------------------


def _plain(
    cluster: ClusterClient, op: QueuedOp, slot_specs: Sequence[PartitionSpec | None]
) -> Routed | _Misplaced:
    home = cluster.owner(op.name)
    for slot, slot_spec in zip(op.slots, slot_specs, strict=True):
        if slot_spec is not None:
            return _Misplaced(
                InvalidArgumentError(
                    f"{_op_name(op)}: slot '{slot}' is partitioned but variable '{op.name}' is not: "
                    f"create the slot with colocate_with='{op.name}'"
                )
            )
        where = cluster.owner(slot)
        if where != home:
            return _Misplaced(
                FailedPreconditionError(
                    f"{_op_name(op)}: slot '{slot}' is on {cluster.describe(where)}, not beside variable "
                    f"'{op.name}' on {cluster.describe(home)}: create the slot with colocate_with='{op.name}'"
                )
            )
    return Routed([op], lambda results: results[0])


def _slots_refusal(
    cluster: ClusterClient, op: QueuedOp, spec: PartitionSpec, slot_specs: Sequence[PartitionSpec | None]
) -> _Misplaced | None:
    for slot, slot_spec in zip(op.slots, slot_specs, strict=True):
        if slot_spec is None or slot_spec.parts != spec.parts or slot_spec.rows != spec.rows:
            return _Misplaced(
                InvalidArgumentError(
                    f"{_op_name(op)}: slot '{slot}' is not partitioned like variable '{op.name}' "
                    f"({spec.parts} parts of rows {spec.rows}): create the slot with "
                    f"colocate_with='{op.name}'"
                )
            )
        for part, slot_part in zip(spec.part_names, slot_spec.part_names, strict=True):
            home, where = cluster.owner(part), cluster.owner(slot_part)
            if home != where:
                return _Misplaced(
                    FailedPreconditionError(
                        f"{_op_name(op)}: part '{slot_part}' of slot '{slot}' is on "
                        f"{cluster.describe(where)}, not beside '{part}' on {cluster.describe(home)}: "
                        "create the slot with "
                        f"colocate_with='{op.name}'"
                    )
                )
    return None


# ---- partitioned variables -------------------------------------------------------------------------


def _partitioned(op: QueuedOp, spec: PartitionSpec, slots: Sequence[PartitionSpec]) -> Routed:
    if op.kind == GATHER:
        return _gather(op, spec)
    if op.kind in _SCATTERS:
        return _scatter(op, spec)
    if op.kind in _SCATTER_NDS:
        return _scatter_nd(op, spec)
    assert op.kind in APPLY_KINDS
    return _apply(op, spec, slots)


def _gather(op: QueuedOp, spec: PartitionSpec) -> Routed:
    from tensorps.server import rows  # noqa: PLC0415 (the server's checks, on the logical shape)

    (indices,) = op.inputs
    rows.check_indices_dtype(indices)
    if op.batch_dims != 0:
        raise _Refused(
            f"ResourceGather of partitioned variable '{spec.name}': batch_dims must be 0 (it is split "
            "along axis 0)"
        )
    rows.bounds(indices, spec.shape[0])
    if indices.size == 0:
        return Routed([op._replace(name=spec.part_names[0])], lambda results: results[0])
    located = spec.locate(indices)
    ops = [
        op._replace(name=spec.part_names[k], inputs=(local.astype(indices.dtype),)) for k, local, _ in located
    ]

    def join(results: list[Any]) -> Array:
        out = np.empty((indices.size, *spec.shape[1:]), spec.dtype.numpy)
        for (_, _, positions), found in zip(located, results, strict=True):
            out[positions] = found
        rows = out.reshape(indices.shape + spec.shape[1:])
        rows.flags.writeable = False  # as a lone server's gather (the reply's bytes)
        return rows

    return Routed(ops, join)


def _scatter(op: QueuedOp, spec: PartitionSpec) -> Routed:
    from tensorps.server import rows  # noqa: PLC0415

    indices, updates = op.inputs
    rows.plan_scatter(
        _SCATTERS[op.kind],
        spec.name,
        spec.shape,
        spec.dtype.name,
        indices=indices,
        updates=updates,
        initialized=True,
    )
    if indices.size == 0:
        return _writes(op, spec, {0: op.inputs})
    per_row = updates if updates.ndim == 0 else updates.reshape(indices.size, *spec.shape[1:])
    per_part = {}
    for k, local, positions in spec.locate(indices):
        part_updates = per_row if per_row.ndim == 0 else np.ascontiguousarray(per_row[positions])
        per_part[k] = (local.astype(indices.dtype), part_updates)
    return _writes(op, spec, per_part)


def _scatter_nd(op: QueuedOp, spec: PartitionSpec) -> Routed:
    from tensorps.server import rows  # noqa: PLC0415

    indices, updates = op.inputs
    rows.plan_scatter_nd(
        _SCATTER_NDS[op.kind],
        spec.name,
        spec.shape,
        spec.dtype.name,
        indices=indices,
        updates=updates,
        initialized=True,
    )
    depth = indices.shape[-1]
    batch = indices.ndim - 1
    count = int(np.prod(indices.shape[:batch], dtype=np.int64))
    if depth == 0:  # every update covers the whole variable: its rows go to their parts
        bounds = spec.offsets()
        cut = (slice(None),) * batch
        return _writes(
            op,
            spec,
            {
                k: (indices, np.ascontiguousarray(updates[(*cut, slice(bounds[k], bounds[k + 1]))]))
                for k in range(spec.parts)
            },
        )
    if count == 0:
        return _writes(op, spec, {0: op.inputs})
    coords = indices.reshape(count, depth)
    per_update = updates.reshape(count, *spec.shape[depth:])
    per_part = {}
    for k, local, positions in spec.locate(coords[:, 0]):
        part_coords = coords[positions].copy()
        part_coords[:, 0] = local
        per_part[k] = (part_coords, np.ascontiguousarray(per_update[positions]))
    return _writes(op, spec, per_part)


def _apply(op: QueuedOp, spec: PartitionSpec, slots: Sequence[PartitionSpec]) -> Routed:
    from tensorps.server import optimizer_checks, optimizers, row_ops  # noqa: PLC0415

    key = row_ops.APPLIES[op.kind]
    kernel = optimizers.SPECS[key]
    hyper = op.inputs[: len(kernel.hyper)]
    grad = op.inputs[len(kernel.hyper)]
    indices = op.inputs[len(kernel.hyper) + 1] if kernel.sparse else None
    operands = [optimizer_checks.Operand(s.name, s.dtype.name, s.shape, True) for s in (spec, *slots)]
    flags = optimizers.Flags(op.use_nesterov, op.update_slots, op.multiply_linear_by_lr)
    optimizer_checks.check(
        key,
        operands[0],
        operands[1:],
        dict(zip(kernel.hyper, hyper, strict=True)),
        grad=grad,
        indices=indices,
        flags=flags,
    )
    if indices is None:
        parts = spec.split(grad)
        return _writes(
            op, spec, {k: (*hyper, np.ascontiguousarray(parts[k])) for k in range(spec.parts)}, slots
        )
    if indices.size == 0:
        return _writes(op, spec, {0: op.inputs}, slots)
    per_part = {
        k: (*hyper, np.ascontiguousarray(grad[positions]), local.astype(indices.dtype))
        for k, local, positions in spec.locate(indices)
    }
    return _writes(op, spec, per_part, slots)


def _writes(
    op: QueuedOp,
    spec: PartitionSpec,
    inputs: Mapping[int, tuple[Any, ...]],
    slots: Sequence[PartitionSpec] = (),
) -> Routed:
    """One operation per touched part (k -> its inputs), and for every other part the read or info that
    the logical result needs; the join in part order."""
    ops = []
    for k, part in enumerate(spec.part_names):
        if k in inputs:
            part_slots = tuple(slot.part_names[k] for slot in slots)
            ops.append(op._replace(name=part, slots=part_slots, inputs=inputs[k]))
        else:
            ops.append(QueuedOp(pb.BATCH_OP_READ if op.read_value else pb.BATCH_OP_INFO, part))
    if op.read_value:
        return Routed(ops, join_values)
    return Routed(ops, lambda results: logical_info(spec, results))


# ---- errors ------------------------------------------------------------------------------------------


class _Refused(Exception):
    code = "INVALID_ARGUMENT"


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in grpc.StatusCode.__members__:
        return grpc.StatusCode[code], str(exc)
    return None


def _renamer(spec: PartitionSpec, slots: Sequence[PartitionSpec]) -> Callable[[TensorPSError], TensorPSError]:
    """A part's error as the logical variable's: every part name replaced by its variable's name."""
    names = {part: s.name for s in (spec, *slots) for part in s.part_names}
    pattern = re.compile(
        "|".join(re.escape(part) for part in sorted(names, key=len, reverse=True)) + r"(?![0-9])"
    )

    def rename(error: TensorPSError) -> TensorPSError:
        message = pattern.sub(lambda match: names[match.group(0)], error.message)
        return type(error)(message, error.code) if message != error.message else error

    return rename


def _op_name(op: QueuedOp) -> str:
    from tensorps.server.row_ops import OP_NAMES  # noqa: PLC0415

    return OP_NAMES.get(op.kind, "operation")


# ---- the mixins ------------------------------------------------------------------------------------


class ClusterRowCalls(RowCalls):
    """The row methods of ClusterClient: each one a ClusterPipeline of one operation, run now (a variable
    not found makes the client read the layouts and colocations again, and retry once if they changed)."""

    def _row_op(self: Any, op: QueuedOp) -> Any:
        for attempt in range(2):
            seen = _placement_of(self, op)
            pipe = self.pipeline(raise_on_error=False)
            pipe._row_op(op)
            (result,) = pipe.execute()
            if not isinstance(result, TensorPSError):
                return result
            if attempt == 0 and isinstance(result, NotFoundError):
                self.layouts.load()
                if _placement_of(self, op) != seen:
                    continue
            raise result
        raise AssertionError("unreachable")

    def _row_value(self: Any, name: str, value: Any, created: Any = None) -> Array:
        dtype = None
        if arrays.as_array(value) is None:  # a Python value takes the variable's dtype
            spec = self.layouts.get(name)
            dtype = created or (spec.dtype if spec is not None else self._row_dtypes.get(name))
            if dtype is None:
                dtype = self._row_dtypes[name] = codec.dtype_of(self.info(name).dtype)
        array: Array = self.shards[0]._as_array(name, value, dtype)
        return array

    def _row_name(self: Any, name: Any) -> str:
        checked: str = self._checked(name)
        return checked

    def _row_flag(self: Any, value: Any, what: str) -> bool:
        checked: bool = self._checked_flag(value, what)
        return checked


def _placement_of(cluster: ClusterClient, op: QueuedOp) -> list[Any]:
    return [(cluster.layouts.get(name), cluster.owner(name)) for name in (op.name, *op.slots)]


class ClusterPipelineRows(RowCalls):
    """The row methods of ClusterPipeline: each queues its routed operations on their shards' pipelines."""

    def _row_op(self: Any, op: QueuedOp) -> Any:
        routed = route(self._cluster, op)
        if isinstance(routed, TensorPSError):
            return self._add(op.name, [], lambda results: routed)
        pieces = [self._queue_op(part_op) for part_op in routed.ops]
        return self._add(op.name, pieces, routed.join, routed.errors)

    def _row_value(self: Any, name: str, value: Any) -> Array:
        # A variable this pipeline creates has the dtype it declares (it cannot be asked for yet).
        queued = self._shards.get(self._cluster.owner(name))
        created = queued._created.get(name) if queued is not None else None
        return ClusterRowCalls._row_value(self._cluster, name, value, created)

    def _row_name(self: Any, name: Any) -> str:
        checked: str = self._cluster._checked(name)
        return checked

    def _row_flag(self: Any, value: Any, what: str) -> bool:
        checked: bool = self._cluster._checked_flag(value, what)
        return checked
