"""Batched calls over a cluster: one Batch call per server, all in parallel, results in the caller's order.

A ClusterPipeline queues each operation into the pipeline of the shard that owns its variable (so that it is
checked exactly as on one server, when it is queued); an operation on a partitioned variable becomes one
operation per part, on the parts' shards, and its results are joined back (values concatenated along axis
0, infos folded into the logical variable's). `execute()` runs every shard's pipeline at once and puts the
results back in queueing order. An atomic pipeline is atomic per shard: one whose operations span shards is
refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tensorps.client import colocation, placement
from tensorps.client.batch import BatchError, Pipeline
from tensorps.client.cluster_rows import ClusterPipelineRows
from tensorps.client.errors import InvalidArgumentError, NotFoundError, TensorPSError, UsageError
from tensorps.client.layouts import join_values, logical_info, refusal
from tensorps.client.placement import PartitionSpec
from tensorps.client.queued import QueuedOp

if TYPE_CHECKING:
    from tensorps.client.cluster import ClusterClient

Array = np.ndarray[Any, Any]


class _Piece(NamedTuple):
    shard: int
    position: int  # in that shard's pipeline


class _Queued(NamedTuple):
    name: str
    pieces: list[_Piece]
    # Joins the pieces' results (exceptions already ruled out) into the operation's result.
    join: Callable[[list[Any]], Any]
    # Rewords a piece's error for the operation (a part's error names the logical variable).
    errors: Callable[[TensorPSError], TensorPSError] | None = None


def first_result(results: list[Any]) -> Any:
    return results[0]


class ClusterPipeline(ClusterPipelineRows):
    """Operations queued for one Batch call per server (the interface of Pipeline; see the module); the
    row methods (gather, scatter_*, apply_*, ...) come from cluster_rows.py."""

    def __init__(self, cluster: ClusterClient, *, atomic: bool = False, raise_on_error: bool = True) -> None:
        self._cluster = cluster
        self.atomic = atomic
        self.raise_on_error = raise_on_error
        self._shards: dict[int, Pipeline] = {}
        self._ops: list[_Queued] = []
        self.results: list[Any] | None = None

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> ClusterPipeline:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None and self.results is None and self._ops:
            self.execute()

    # ---- queueing ------------------------------------------------------------------------------

    def _pipe(self, shard: int) -> Pipeline:
        pipe = self._shards.get(shard)
        if pipe is None:
            client = self._cluster.shards[shard]
            pipe = self._shards[shard] = Pipeline(client, atomic=self.atomic, raise_on_error=False)
        return pipe

    def _on(self, name: str, method: str, *args: Any, **kwargs: Any) -> _Piece:
        """Queue `method` of Pipeline on the pipeline of the shard that owns `name`."""
        shard = self._cluster.owner(name)
        pipe = self._pipe(shard)
        getattr(pipe, method)(*args, **kwargs)
        return _Piece(shard, len(pipe) - 1)

    def _queue_op(self, op: QueuedOp) -> _Piece:
        """Queue an operation already checked on the pipeline of the shard that holds its variable."""
        shard = self._cluster.owner(op.name)
        pipe = self._pipe(shard)
        pipe._queue(op)
        return _Piece(shard, len(pipe) - 1)

    def _add(
        self,
        name: str,
        pieces: list[_Piece],
        join: Callable[[list[Any]], Any],
        errors: Callable[[TensorPSError], TensorPSError] | None = None,
    ) -> ClusterPipeline:
        if self.results is not None:
            raise InvalidArgumentError("this pipeline was executed already; start a new one")
        self._ops.append(_Queued(name, pieces, join, errors))
        return self

    def _single(self, name: str, method: str, *args: Any, **kwargs: Any) -> ClusterPipeline:
        """One operation on the variable `name` (not partitioned): its result is the shard's."""
        return self._add(name, [self._on(name, method, name, *args, **kwargs)], first_result)

    def _logical_array(self, spec: PartitionSpec, value: Any) -> Array:
        """A value for a whole partitioned variable, converted as the client converts any value (array
        data as it is, Python values to the variable's dtype)."""
        return self._cluster.shards[0]._as_array(spec.name, value, spec.dtype)

    def _spec(self, name: object) -> PartitionSpec | None:
        return self._cluster.layouts.get(self._cluster._checked(name))

    def create(
        self,
        name: str,
        *,
        dtype: Any = None,
        shape: Any = None,
        value: Any = None,
        partitioner: Any = None,
        colocate_with: str | None = None,
    ) -> ClusterPipeline:
        if colocate_with is not None:
            if partitioner is not None:
                raise UsageError(f"variable '{name}': a colocated variable is partitioned like its primary")
            pieces, _, join = colocation.queue(
                self, name, colocate_with, dtype=dtype, shape=shape, value=value
            )
            return self._add(name, pieces, join)
        spec = self._cluster.partition_spec(name, dtype, shape, value, partitioner)
        if spec is None:
            return self._single(name, "create", dtype=dtype, shape=shape, value=value)
        pieces = self.create_pieces(spec, value)
        self._cluster.layouts.remember(spec)
        return self._add(name, pieces, lambda results: logical_info(spec, results[1:]))

    def create_pieces(self, spec: PartitionSpec, value: Any) -> list[_Piece]:
        """A partitioned variable's layout and parts queued for creation (each an operation of its own)."""
        layout = placement.layout_name(spec.name)
        pieces = [self._on(layout, "create", layout, value=spec.encode())]
        array = None
        if value is not None:
            array = self._logical_array(spec, value)
            refused = refusal(spec, array, "Assign")
            if refused is not None:
                raise refused
        values: list[Array | None] = [None] * spec.parts if array is None else list(spec.split(array))
        for part, shape, part_value in zip(spec.part_names, spec.part_shapes(), values, strict=True):
            pieces.append(
                self._on(part, "create", part, dtype=spec.dtype.numpy, shape=shape, value=part_value)
            )
        return pieces

    def assign(
        self,
        name: str,
        value: Any,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
    ) -> ClusterPipeline:
        flags = {"validate_shape": validate_shape, "use_locking": use_locking, "read_value": read_value}
        return self._write("assign", "Assign", name, value, flags)

    def assign_add(
        self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True
    ) -> ClusterPipeline:
        flags = {"use_locking": use_locking, "read_value": read_value}
        return self._write("assign_add", "AssignAdd", name, delta, flags)

    def assign_sub(
        self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True
    ) -> ClusterPipeline:
        flags = {"use_locking": use_locking, "read_value": read_value}
        return self._write("assign_sub", "AssignSub", name, delta, flags)

    def _write(self, method: str, op: str, name: str, value: Any, flags: dict[str, Any]) -> ClusterPipeline:
        spec = self._spec(name)
        if spec is None:
            return self._single(name, method, value, **flags)
        read_value = self._cluster._checked_flag(flags["read_value"], "read_value")
        array = self._logical_array(spec, value)
        refused = refusal(spec, array, op)
        if refused is not None:
            # As on one server: a value that converts but does not fit fails when the batch runs.
            return self._add(name, [], lambda results: refused)
        parts = spec.split(array)
        pieces = [
            self._on(part, method, part, part_value, **flags)
            for part, part_value in zip(spec.part_names, parts, strict=True)
        ]
        join: Callable[[list[Any]], Any] = join_values if read_value else lambda r: logical_info(spec, r)
        return self._add(name, pieces, join)

    def read(self, name: str) -> ClusterPipeline:
        return self._parts(name, "read", join_values)

    def info(self, name: str) -> ClusterPipeline:
        spec = self._spec(name)
        return self._parts(name, "info", lambda results: logical_info(spec, results) if spec else results[0])

    def delete(self, name: str) -> ClusterPipeline:
        spec = self._spec(name)
        if spec is not None:
            self._cluster.layouts.forget(name)
            layout = placement.layout_name(name)
            pieces = [self._on(layout, "delete", layout)]
            for part in spec.part_names:
                pieces += self._deletes(part)
            return self._add(name, pieces, lambda results: None)
        return self._add(name, self._deletes(name), first_result)

    def _deletes(self, name: str) -> list[_Piece]:
        """A plain variable's delete; a colocated one's with its record after it."""
        pieces = [self._on(name, "delete", name)]
        if self._cluster.layouts.colocated(name) is not None:
            record = placement.colocation_name(name)
            pieces.append(self._on(record, "delete", record))
            self._cluster.layouts.forget(name)
        return pieces

    def _parts(self, name: str, method: str, join: Callable[[list[Any]], Any]) -> ClusterPipeline:
        """An operation without a value: on the variable, or on every part of a partitioned one."""
        spec = self._spec(name)
        if spec is None:
            return self._single(name, method)
        pieces = [self._on(part, method, part) for part in spec.part_names]
        return self._add(name, pieces, join)

    def read_prefix(self, prefix: str = "") -> ClusterPipeline:
        """Every initialized variable whose name starts with `prefix`, from every shard: a dict name -> array
        (a partitioned variable once, whole)."""
        if not isinstance(prefix, str):
            raise UsageError(f"a prefix is a str, not {type(prefix).__name__}")
        pieces = []
        for shard in range(len(self._cluster.shards)):
            pipe = self._pipe(shard)
            pipe.read_prefix(prefix)
            pieces.append(_Piece(shard, len(pipe) - 1))
        return self._add(prefix, pieces, lambda results: self._cluster.layouts.fold_values(prefix, results))

    # ---- running -------------------------------------------------------------------------------

    def execute(self) -> list[Any]:
        """One Batch call per server, in parallel; the results in order (as Pipeline.execute)."""
        if self.results is not None:
            return self.results
        if self.atomic and len(self._shards) > 1:
            raise UsageError(self._spanning())
        per_shard = self._cluster.fan_out({shard: pipe.execute for shard, pipe in self._shards.items()})
        failed_whole = [outcome for outcome in per_shard.values() if isinstance(outcome, BaseException)]
        if failed_whole and len(failed_whole) == len(per_shard):
            # No shard took the batch: the call failed whole, as one server's would (nothing applied).
            raise failed_whole[0]
        results: list[Any] = []
        errors: dict[int, TensorPSError] = {}
        for index, queued in enumerate(self._ops):
            found = []
            for piece in queued.pieces:
                outcome = per_shard[piece.shard]
                found.append(outcome if isinstance(outcome, BaseException) else outcome[piece.position])
            failed = next((r for r in found if isinstance(r, BaseException)), None)
            if failed is not None and not isinstance(failed, TensorPSError):
                raise failed
            if failed is not None and queued.errors is not None:
                failed = queued.errors(failed)
            result = failed if failed is not None else queued.join(found)
            if isinstance(result, TensorPSError):
                errors[index] = result
                if isinstance(result, NotFoundError):
                    self._cluster.layouts.stale()  # another client may have (un)partitioned it
            results.append(result)
        self.results = results
        if errors and self.raise_on_error:
            raise BatchError(results, errors)
        return results

    def _spanning(self) -> str:
        where: dict[int, str] = {}
        for queued in self._ops:
            for piece in queued.pieces:
                where.setdefault(piece.shard, queued.name)
        shown = ", ".join(f"'{name}' on shard {shard}" for shard, name in sorted(where.items()))
        return (
            f"an atomic batch is atomic per shard, and this one spans {len(where)} shards ({shown}): send "
            "one atomic batch per shard, or non-atomic"
        )

    def submit(self) -> Future[list[Any]]:
        return self._cluster._background().submit(self.execute)


class ClusterBatchCalls:
    """ClusterClient's pipelines are ClusterPipelines: BatchCalls' read_many and *_many go through
    pipeline(), so they send one batch per server as well."""

    def pipeline(self: Any, atomic: bool = False, *, raise_on_error: bool = True) -> ClusterPipeline:
        return ClusterPipeline(self, atomic=atomic, raise_on_error=raise_on_error)
