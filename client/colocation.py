"""Colocation on a cluster: `create(NAME, ..., colocate_with=PRIMARY)` stores NAME beside PRIMARY.

An optimizer operation names its variable and its slots (`apply_adam(var, m, v, ...)`), and the server runs
it on one store: the slots must live on the variable's shard. Creating a slot with colocate_with=PRIMARY
puts it on the shard that holds PRIMARY, with a colocation record `.colocated/NAME` (uint8: PRIMARY's
name) beside it, both in one atomic batch whose CREATE operations claim PRIMARY (BatchOp.slots): the
server's gate accepts them only if it serves and holds PRIMARY, and from then on serves NAME because its
store holds the record. Clients find the records with the partition layouts (layouts.py).

A slot of a partitioned PRIMARY is partitioned like it: part k of NAME is colocated with part k of PRIMARY
(a record per part), and NAME's layout is an ordinary layout variable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tensorps.client import codec, placement
from tensorps.client.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    UsageError,
)
from tensorps.client.layouts import logical_info
from tensorps.client.placement import PartitionSpec
from tensorps.client.queued import QueuedOp
from tensorps.v1 import tensorps_pb2 as pb

if TYPE_CHECKING:
    from tensorps.client.cluster import ClusterClient
    from tensorps.client.cluster_batch import ClusterPipeline
    from tensorps.client.infos import VariableInfo

Array = np.ndarray[Any, Any]
_UINT8 = codec.dtype_of("uint8")


def queue(
    pipe: ClusterPipeline, name: str, primary: str, *, dtype: Any, shape: Any, value: Any
) -> tuple[list[Any], list[str], Any]:
    """Queue the creation of `name` beside `primary` on `pipe`: (its pieces, the names each piece creates,
    the join of their results into the VariableInfo)."""
    cluster = pipe._cluster
    name, primary = cluster._checked(name), cluster._checked(primary)
    if name == primary:
        raise InvalidArgumentError(f"variable '{name}' cannot be colocated with itself")
    declared, dims, array = cluster._create_args(name, dtype, shape, value)
    spec = cluster.layouts.get(primary)
    if spec is None:
        pieces = _beside(pipe, name, primary, declared=declared, dims=dims, array=array)
        return pieces, [placement.colocation_name(name), name], lambda results: results[1]
    full = array.shape if array is not None else dims
    if full is not None and tuple(full) != spec.shape:
        raise InvalidArgumentError(
            f"variable '{name}' is colocated with the partitioned variable '{primary}' of shape "
            f"{codec.format_shape(spec.shape)}, so it is partitioned like it and needs that shape, not "
            f"{codec.format_shape(tuple(full))}"
        )
    mine = PartitionSpec(name, declared, spec.shape, spec.parts)
    layout = placement.layout_name(name)
    pieces = [pipe._on(layout, "create", layout, value=mine.encode())]
    made = [layout]
    values: list[Array | None] = [None] * mine.parts if array is None else list(mine.split(array))
    for part, shape_k, part_value, beside in zip(
        mine.part_names, mine.part_shapes(), values, spec.part_names, strict=True
    ):
        pieces += _beside(pipe, part, beside, declared=declared, dims=shape_k, array=part_value)
        made += [placement.colocation_name(part), part]
    cluster.layouts.remember(mine)
    return pieces, made, lambda results: logical_info(mine, results[2::2])


def _beside(
    pipe: ClusterPipeline, name: str, primary: str, *, declared: Any, dims: Any, array: Array | None
) -> list[Any]:
    """The record and the variable, queued on the primary's shard (their CREATEs claim the primary)."""
    cluster = pipe._cluster
    cluster.layouts.note_colocated(name, cluster.owner(primary), primary)
    record = np.frombuffer(primary.encode(), np.uint8).copy()
    claim = (primary,)
    record_op = QueuedOp(
        pb.BATCH_OP_CREATE, placement.colocation_name(name), record, _UINT8, record.shape, slots=claim
    )
    return [
        pipe._queue_op(record_op),
        pipe._queue_op(QueuedOp(pb.BATCH_OP_CREATE, name, array, declared, dims, slots=claim)),
    ]


def create(
    cluster: ClusterClient, name: str, primary: str, *, dtype: Any, shape: Any, value: Any, partitioner: Any
) -> VariableInfo:
    """ClusterClient.create(..., colocate_with=primary): all or nothing."""
    name = cluster._checked(name)
    if partitioner is not None:
        raise UsageError(
            f"variable '{name}': a colocated variable takes its primary's partitioning; give no partitioner"
        )
    if cluster.layouts.get(name) is not None:
        raise AlreadyExistsError(f"variable '{name}' already exists")
    if cluster.layouts.colocated(name) is not None:
        _drop_stale_record(cluster, name)
    try:
        placement_owner = placement.owner(name, len(cluster.shards))
        cluster._on(placement_owner, lambda: cluster.shards[placement_owner].info(name))
    except NotFoundError:
        pass
    else:
        raise AlreadyExistsError(f"variable '{name}' already exists (not colocated)")
    # Beside a plain primary, the record and the variable are one atomic batch (all or nothing, even if
    # the server is killed amid it); a partitioned one's parts span shards: what was made is undone.
    plain = cluster.layouts.get(cluster._checked(primary)) is None
    pipe = cluster.pipeline(atomic=plain, raise_on_error=False)
    pieces, made, join = queue(pipe, name, primary, dtype=dtype, shape=shape, value=value)
    for created, piece in zip(made, pieces, strict=True):
        pipe._add(created, [piece], lambda results: results[0])
    try:
        results = pipe.execute()
    except TensorPSError:
        cluster.layouts.stale()
        raise
    failed = [r for r in results if isinstance(r, TensorPSError)]
    if failed:
        # Undo what was made: variables before their records, so that the gate still serves them.
        undo = cluster.pipeline(raise_on_error=False)
        for created, result in reversed(list(zip(made, results, strict=True))):
            if not isinstance(result, TensorPSError):
                undo._add(created, [undo._on(created, "delete", created)], lambda r: r[0])
        undo.execute()
        cluster.layouts.stale()
        raise failed[0]
    return join(results)  # type: ignore[no-any-return]


def _drop_stale_record(cluster: ClusterClient, name: str) -> None:
    """AlreadyExists if `name` exists beside its primary; a record without its variable (left by a
    client that deleted the variable without knowing it was colocated) is removed."""
    shard = cluster.owner(name)
    try:
        cluster._on(shard, lambda: cluster.shards[shard].info(name))
    except NotFoundError:
        record = placement.colocation_name(name)
        cluster._on(shard, lambda: cluster.shards[shard].delete(record))
        cluster.layouts.forget(name)
        return
    raise AlreadyExistsError(f"variable '{name}' already exists")
