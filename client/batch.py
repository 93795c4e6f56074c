"""Batched calls: a model step in one call per server (pipeline, read_many, assign_many, ...).

A Pipeline queues any mix of create/assign/assign_add/assign_sub/read/info/delete and sends them as one
Batch call (the pattern of redis-py's pipeline): in order, each operation with its own outcome, or atomic,
all or nothing. Every queued operation behaves exactly as its single call: same flags, defaults, checks and
errors. The *_many calls are conveniences over it; `submit()` and `wait=False` return futures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import DType
from tensorps.client.errors import InvalidArgumentError, TensorPSError, UsageError
from tensorps.client.queued import QueuedOp
from tensorps.client.rows import GATHER, ROW_KINDS, RowCalls, returns_value
from tensorps.v1 import tensorps_pb2 as pb

if TYPE_CHECKING:
    from tensorps.client.client import Client
    from tensorps.client.infos import VariableInfo

Array = np.ndarray[Any, Any]


class BatchError(TensorPSError):
    """Operations of a batch (not atomic) failed; the others took effect.

    `results` holds every operation's result in order, with the exception in place of each failed one;
    `errors` maps the failed operations' indices to their exceptions. `code` is the first failure's.
    """

    def __init__(self, results: list[Any], errors: dict[int, TensorPSError]) -> None:
        index = min(errors)
        first = errors[index]
        super().__init__(
            f"{len(errors)} of {len(results)} operations failed; operation {index}: {first.message}",
            first.code,
        )
        self.results = results
        self.errors = errors


class Outcome(NamedTuple):
    """One result of a batch: an info and a value, or an error."""

    info: VariableInfo | None = None
    value: Array | None = None
    error: TensorPSError | None = None


# Per queued operation, its outcomes (one; a READ_PREFIX operation's one per variable read).
Outcomes = list[list[Outcome]]


class Pipeline(RowCalls):
    """Operations queued for one Batch call; use it as a context manager, or call execute()/submit().

    Each queueing method returns the pipeline, so calls chain. `execute()` returns the results in order:
    create/info -> VariableInfo; assign* -> the value with read_value, else VariableInfo; read -> array;
    delete -> None. With atomic=True every operation is checked before any applies (a failure raises that
    operation's error and changes nothing); otherwise they run in order, and failures raise one BatchError
    (or, with raise_on_error=False, stand as exceptions in the results).
    """

    def __init__(self, client: Client, *, atomic: bool = False, raise_on_error: bool = True) -> None:
        self._client = client
        self.atomic = atomic
        self.raise_on_error = raise_on_error
        self._ops: list[QueuedOp] = []
        self._created: dict[str, DType] = {}  # dtypes of variables this pipeline creates, for Python values
        self.results: list[Any] | None = None

    def __len__(self) -> int:
        return len(self._ops)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None and self.results is None and self._ops:
            self.execute()

    # ---- queueing ------------------------------------------------------------------------------

    def _queue(self, op: QueuedOp) -> Pipeline:
        if self.results is not None:
            raise InvalidArgumentError("this pipeline was executed already; start a new one")
        self._ops.append(op)
        return self

    def create(
        self,
        name: str,
        *,
        dtype: Any = None,
        shape: Any = None,
        value: Any = None,
        colocate_with: str | None = None,
    ) -> Pipeline:
        if colocate_with is not None:  # one server: every variable lives together (see Client.create)
            self._client._checked(colocate_with)
        declared, dims, array = self._client._create_args(name, dtype, shape, value)
        self._created[name] = declared
        return self._queue(QueuedOp(pb.BATCH_OP_CREATE, name, array, declared, dims))

    def assign(
        self,
        name: str,
        value: Any,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
    ) -> Pipeline:
        name = self._client._checked(name)
        array = self._client._as_array(name, value, self._created.get(name))
        flags = (
            self._client._checked_flag(validate_shape, "validate_shape"),
            self._client._checked_flag(use_locking, "use_locking"),
        )
        return self._queue(
            QueuedOp(
                pb.BATCH_OP_ASSIGN,
                name,
                array,
                None,
                None,
                *flags,
                self._client._checked_flag(read_value, "read_value"),
            )
        )

    def assign_add(
        self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True
    ) -> Pipeline:
        return self._update(pb.BATCH_OP_ASSIGN_ADD, name, delta, use_locking, read_value)

    def assign_sub(
        self, name: str, delta: Any, *, use_locking: bool = False, read_value: bool = True
    ) -> Pipeline:
        return self._update(pb.BATCH_OP_ASSIGN_SUB, name, delta, use_locking, read_value)

    def _update(self, kind: int, name: str, delta: Any, use_locking: bool, read_value: bool) -> Pipeline:
        name = self._client._checked(name)
        flags = (
            self._client._checked_flag(use_locking, "use_locking"),
            self._client._checked_flag(read_value, "read_value"),
        )
        array = self._client._as_array(name, delta, self._created.get(name))
        return self._queue(QueuedOp(kind, name, array, None, None, None, *flags))

    def read(self, name: str) -> Pipeline:
        return self._queue(QueuedOp(pb.BATCH_OP_READ, self._client._checked(name)))

    # The row operations and optimizers of RowCalls (gather, scatter_*, apply_*, ...) queue themselves.
    def _row_op(self, op: QueuedOp) -> Pipeline:
        return self._queue(op)

    def _row_value(self, name: str, value: Any) -> Array:
        return self._client._as_array(name, value, self._created.get(name))

    def _row_name(self, name: Any) -> str:
        return self._client._checked(name)

    def _row_flag(self, value: Any, what: str) -> bool:
        return self._client._checked_flag(value, what)

    def info(self, name: str) -> Pipeline:
        return self._queue(QueuedOp(pb.BATCH_OP_INFO, self._client._checked(name)))

    def delete(self, name: str) -> Pipeline:
        return self._queue(QueuedOp(pb.BATCH_OP_DELETE, self._client._checked(name)))

    def read_prefix(self, prefix: str = "") -> Pipeline:
        """Every initialized variable whose name starts with `prefix`: its result is a dict name -> array."""
        if not isinstance(prefix, str):
            raise UsageError(f"a prefix is a str, not {type(prefix).__name__}")
        return self._queue(QueuedOp(pb.BATCH_OP_READ_PREFIX, prefix))

    # ---- running -------------------------------------------------------------------------------

    def execute(self) -> list[Any]:
        """Send the queued operations as one call; the results in order (see the class docstring)."""
        if self.results is not None:
            return self.results
        ops = self._ops
        outcomes = self._client._run_batch(ops, atomic=self.atomic) if ops else []
        results: list[Any] = []
        errors: dict[int, TensorPSError] = {}
        for index, (op, found) in enumerate(zip(ops, outcomes, strict=True)):
            result = _result(op, found)
            if isinstance(result, TensorPSError):
                errors[index] = result
            elif op.kind == GATHER:
                self._client._note_rows(op, result)
            results.append(result)
        self.results = results
        if errors and self.raise_on_error:
            raise BatchError(results, errors)
        return results

    def submit(self) -> Future[list[Any]]:
        """execute() on the client's background threads: a future of the results."""
        return self._client._background().submit(self.execute)


def _result(op: QueuedOp, found: list[Outcome]) -> Any:
    if op.kind == pb.BATCH_OP_READ_PREFIX:
        for outcome in found:
            if outcome.error is not None:
                return outcome.error
        return {o.info.name: o.value for o in found if o.info is not None}
    (outcome,) = found
    if outcome.error is not None:
        return outcome.error
    if op.kind in ROW_KINDS:
        return outcome.value if returns_value(op) else outcome.info
    if op.kind == pb.BATCH_OP_DELETE:
        return None
    if op.kind == pb.BATCH_OP_READ or (
        op.array is not None and op.kind != pb.BATCH_OP_CREATE and op.read_value
    ):
        return outcome.value
    return outcome.info


class BatchCalls:
    """The batched calls of Client (a mixin: Client provides _run_batch, _create_args and _as_array)."""

    def pipeline(self: Any, atomic: bool = False, *, raise_on_error: bool = True) -> Pipeline:
        """Queue operations and send them as one call (see Pipeline)."""
        return Pipeline(self, atomic=atomic, raise_on_error=raise_on_error)

    def read_many(
        self: Any, names: Iterable[str] | None = None, *, prefix: str | None = None, wait: bool = True
    ) -> Any:
        """Every named variable (or every initialized one under `prefix`, or all) in one call per server.

        Returns a dict name -> read-only array (a future of it with wait=False).
        """
        pipe = self.pipeline()
        if names is None:
            pipe.read_prefix(prefix or "")
        elif prefix is not None:
            raise InvalidArgumentError("read_many takes names or a prefix, not both")
        else:
            names = list(names)
            for name in names:
                pipe.read(name)

        def run() -> dict[str, Array]:
            results = pipe.execute()
            if names is None:
                found: dict[str, Array] = results[0]
                return found
            return dict(zip(names, results, strict=True))

        return run() if wait else self._background().submit(run)

    def _write_many(self: Any, kind: str, values: Mapping[str, Any], wait: bool, **flags: Any) -> Any:
        atomic = flags.pop("atomic")
        pipe = self.pipeline(atomic=atomic)
        queue = getattr(pipe, kind)
        for name, value in values.items():
            queue(name, value, **flags)

        def run() -> dict[str, Any]:
            return dict(zip(values, pipe.execute(), strict=True))

        return run() if wait else self._background().submit(run)

    def assign_many(
        self: Any,
        values: Mapping[str, Any],
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = False,
        atomic: bool = False,
        wait: bool = True,
    ) -> Any:
        """TF's Assign of every name -> value in one call per server: a dict name -> VariableInfo (or the
        values after the writes with read_value); a future of it with wait=False."""
        return self._write_many(
            "assign",
            values,
            wait,
            validate_shape=validate_shape,
            use_locking=use_locking,
            read_value=read_value,
            atomic=atomic,
        )

    def assign_add_many(
        self: Any,
        deltas: Mapping[str, Any],
        *,
        use_locking: bool = False,
        read_value: bool = False,
        atomic: bool = False,
        wait: bool = True,
    ) -> Any:
        """TF's AssignAdd of every name -> delta in one call per server (see assign_many)."""
        return self._write_many(
            "assign_add", deltas, wait, use_locking=use_locking, read_value=read_value, atomic=atomic
        )

    def assign_sub_many(
        self: Any,
        deltas: Mapping[str, Any],
        *,
        use_locking: bool = False,
        read_value: bool = False,
        atomic: bool = False,
        wait: bool = True,
    ) -> Any:
        """TF's AssignSub of every name -> delta in one call per server (see assign_many)."""
        return self._write_many(
            "assign_sub", deltas, wait, use_locking=use_locking, read_value=read_value, atomic=atomic
        )

    def create_many(self: Any, specs: Mapping[str, Mapping[str, Any]], *, atomic: bool = False) -> Any:
        """Create every variable of `specs` (name -> create()'s keyword arguments) in one call per server;
        returns a dict name -> VariableInfo."""
        pipe = self.pipeline(atomic=atomic)
        for name, spec in specs.items():
            pipe.create(name, **spec)
        return dict(zip(specs, pipe.execute(), strict=True))


def encode_header(ops: Sequence[QueuedOp], atomic: bool) -> tuple[pb.BatchHeader, list[Array]]:
    """The Batch header for `ops` and the arrays whose bytes follow it, in order."""
    header = pb.BatchHeader(atomic=atomic)
    arrays = []
    for queued in ops:
        op = header.ops.add(kind=queued.kind, name=queued.name)
        if queued.validate_shape is not None:
            op.validate_shape = queued.validate_shape
        if queued.use_locking is not None:
            op.use_locking = queued.use_locking
        op.read_value = queued.read_value
        if queued.kind == pb.BATCH_OP_CREATE:
            assert queued.dtype is not None
            op.dtype = queued.dtype.code  # type: ignore[assignment]
            if queued.shape is not None:
                codec.shape_to_proto(queued.shape, op.shape)
        if queued.array is not None:
            op.value.dtype = codec.dtype_of(queued.array.dtype).code  # type: ignore[assignment]
            codec.shape_to_proto(queued.array.shape, op.value.tensor_shape)
            arrays.append(queued.array)
        if queued.kind in ROW_KINDS:
            _encode_row(queued, op)
            arrays.extend(queued.inputs)
        elif queued.slots:  # a CREATE's colocation claim (a cluster's pipeline queues it)
            op.slots.extend(queued.slots)
    return header, arrays


def _encode_row(queued: QueuedOp, op: pb.BatchOp) -> None:
    for array in queued.inputs:
        tensor = op.inputs.add(dtype=codec.dtype_of(array.dtype).code)
        codec.shape_to_proto(array.shape, tensor.tensor_shape)
    op.slots.extend(queued.slots)
    op.batch_dims = queued.batch_dims
    op.use_nesterov = queued.use_nesterov
    op.update_slots = queued.update_slots
    op.multiply_linear_by_lr = queued.multiply_linear_by_lr
