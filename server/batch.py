"""Batches: many operations in one call, run in order (each with its own outcome) or atomically.

In order, a batch is exactly a sequence of single calls (Ops methods): same checks, locks and errors.

Atomically, it is all or nothing:
- plan: every stripe the batch names is taken once, in sorted order (OFD locks are not reentrant; a
  global order means concurrent batches never deadlock); then every operation is checked against the state
  the earlier ones leave, with the very checks the single calls use (ops.check_*). Nothing is changed yet:
  writes are kept as pending arrays (the request's own bytes, or a fresh array for an update).
- commit: a commit record (commits.py) lists the variables the batch creates; their slots are inserted,
  every written variable's inactive buffer is filled and its descriptor prepared; the record's COMMITTED
  byte is the commit point; then the selectors flip and deleted variables go. A process killed before the
  commit point leaves nothing (its creations are undone), after it everything (the flips are redone).
Reads in an atomic batch see the batch's own earlier writes; readers elsewhere see none or all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import (
    CodecError,
    DType,
    Shape,
    check_values,
    dtype_from_code,
    dtype_of,
    validate_name,
)
from tensorps.server import commits, row_ops, row_patches
from tensorps.server.ops import (
    NO_REQUEST,
    Aborted,
    AlreadyExists,
    Info,
    InvalidArgument,
    NotFound,
    OpError,
    Ops,
    ResourceExhausted,
    check_assign,
    check_readable,
    check_update,
    created_descriptor,
)
from tensorps.server.persist import records
from tensorps.server.persist.records import Entry
from tensorps.server.requests import INLINE, Applied, pack_applied
from tensorps.server.row_ops import GATHER, ROW_KINDS, ROW_WRITES, RowArgs
from tensorps.server.store import Descriptor, StoreFullError
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]
# consume(info, value) turns a value the batch returns (a read, or a write with read_value) into what the
# caller keeps; it runs under the variable's lock, so that it may copy or frame the value in place.
Consume = Callable[[Info, Array], Any]

CREATE, ASSIGN, ASSIGN_ADD, ASSIGN_SUB = (
    pb.BATCH_OP_CREATE,
    pb.BATCH_OP_ASSIGN,
    pb.BATCH_OP_ASSIGN_ADD,
    pb.BATCH_OP_ASSIGN_SUB,
)
READ, INFO, DELETE, READ_PREFIX = (
    pb.BATCH_OP_READ,
    pb.BATCH_OP_INFO,
    pb.BATCH_OP_DELETE,
    pb.BATCH_OP_READ_PREFIX,
)
WRITES = frozenset((CREATE, ASSIGN, ASSIGN_ADD, ASSIGN_SUB, DELETE, *ROW_WRITES))
OP_NAMES: dict[int, str] = {
    CREATE: "CreateVariable",
    ASSIGN: "Assign",
    ASSIGN_ADD: "AssignAdd",
    ASSIGN_SUB: "AssignSub",
    READ: "Read",
    INFO: "GetVariable",
    DELETE: "DeleteVariable",
    READ_PREFIX: "Read prefix",
    **row_ops.OP_NAMES,
}


class BatchOp(NamedTuple):
    """One operation of a batch, decoded; flags already hold TF's defaults where the sender left them."""

    kind: int
    name: str
    value: Array | None = None
    dtype: DType | None = None  # CreateVariable's declared dtype
    shape: Shape | None = None  # CreateVariable's declared shape (None: unknown)
    validate_shape: bool = True
    use_locking: bool = True
    read_value: bool = True
    request: bytes | None = None  # this operation's request id (exactly-once retries), if any
    refused: OpError | None = None  # refused before it ran (a limit of its value): its outcome
    rows: RowArgs | None = None  # a row op's or optimizer's slots, inputs and attributes


class Result(NamedTuple):
    """One operation's outcome: its info, what consume made of its value, or its error."""

    op: int
    info: Info | None = None
    value: Any = None
    error: OpError | None = None
    # The value after the write is exactly the one the operation sent (a locked Assign): not consumed,
    # the sender has it.
    echo: bool = False


class BatchFailed(OpError):
    """An atomic batch refused: names the failing operation; nothing was applied."""

    def __init__(self, index: int, op: BatchOp, error: OpError, *, applied: bool = False) -> None:
        what = OP_NAMES.get(op.kind, f"operation kind {op.kind}")
        outcome = "the batch was applied before (a retry)" if applied else "nothing was applied"
        super().__init__(f"operation {index} ({what} of '{op.name}'): {error}; {outcome}")
        self.code = error.code
        self.index = index
        self.error = error


def run_batch(
    ops: Ops,
    batch: Sequence[BatchOp],
    *,
    atomic: bool,
    consume: Consume,
    request: bytes | None = None,
    reserve: Callable[[int], None] | None = None,
) -> list[Result]:
    """Run `batch` over `ops`; results in order (a READ_PREFIX op gives one per variable it read).

    With a request id, each operation gets its own (derived from the batch's and its index), so that a
    retried batch applies no operation twice: each one that happened answers with its first outcome.

    `reserve(nbytes)`, if given, runs before a write whose value comes back (of that many bytes) is
    applied, so that room for what consume keeps is refused before the write rather than after it (in an
    atomic batch consume runs before anything is applied, so a refusal there is in time anyway).
    """
    if request is not None:
        batch = [op._replace(request=op_request(request, index)) for index, op in enumerate(batch)]
    if atomic:
        done = _Atomic(ops, batch, consume).run()
        if ops.persistence is not None:
            ops.persistence.sync()  # after its locks: the record is durable before the reply (--wal always)
        return done
    results: list[Result] = []
    for index, op in enumerate(batch):
        try:
            if op.refused is not None:
                raise op.refused
            copies = op.kind in (ASSIGN_ADD, ASSIGN_SUB) or (op.kind == ASSIGN and not op.use_locking)
            if reserve is not None and copies and op.read_value:
                # The value after the write has the value's shape and dtype; a locked Assign's is the
                # value itself, echoed without a copy.
                assert op.value is not None
                reserve(op.value.nbytes)
            results.extend(_run_one(ops, index, op, consume))
        except OpError as error:
            results.append(Result(index, error=error))
        except CodecError as exc:  # a value the codec refuses: as its single call, INVALID_ARGUMENT
            results.append(Result(index, error=InvalidArgument(str(exc))))
    return results


def op_request(request: bytes, index: int) -> bytes:
    """The request id of a batch's operation `index`."""
    return hashlib.blake2b(request + index.to_bytes(4, "little"), digest_size=16).digest()


def _checked_name(name: str) -> str:
    try:
        validate_name(name)
    except CodecError as exc:
        raise InvalidArgument(str(exc)) from None
    return name


def _run_one(ops: Ops, index: int, op: BatchOp, consume: Consume) -> list[Result]:
    """One operation as its single call."""
    kind = op.kind
    if kind == READ_PREFIX:
        found = []
        for info in ops.list(op.name):
            if info.initialized:
                try:
                    found.append(Result(index, *ops.read(info.name, lambda i, v: (i, consume(i, v)))))
                except OpError:
                    continue  # deleted or reset since the listing
        return found
    name = _checked_name(op.name)
    if kind in ROW_KINDS:
        return [_run_row(ops, index, op, consume)]
    if kind == CREATE:
        assert op.dtype is not None
        return [Result(index, ops.create(name, op.dtype, op.shape, op.value, request=op.request))]
    if kind in (ASSIGN, ASSIGN_ADD, ASSIGN_SUB):
        assert op.value is not None
        if kind == ASSIGN:
            info, value = ops.assign(
                name,
                op.value,
                validate_shape=op.validate_shape,
                use_locking=op.use_locking,
                read_value=op.read_value,
                request=op.request,
            )
        else:
            info, value = ops.assign_add(
                name,
                op.value,
                use_locking=op.use_locking,
                read_value=op.read_value,
                subtract=kind == ASSIGN_SUB,
                request=op.request,
            )
        if value is op.value:
            return [Result(index, info, echo=True)]
        return [Result(index, info, None if value is None else consume(info, value))]
    if kind == READ:
        return [Result(index, *ops.read(name, lambda i, v: (i, consume(i, v))))]
    if kind == INFO:
        return [Result(index, ops.info(name))]
    if kind == DELETE:
        ops.delete(name, request=op.request)
        return [Result(index)]
    raise InvalidArgument(f"unknown batch operation kind {kind}")


def _run_row(ops: Ops, index: int, op: BatchOp, consume: Consume) -> Result:
    """A row op or optimizer as its single call (row_ops)."""
    args = op.rows or RowArgs()
    for slot in args.slots:
        _checked_name(slot)
    row_ops.check_names(op.kind, op.name, args)
    if op.kind == GATHER:
        info, found = row_ops.gather(ops, op.name, args)
        return Result(index, info, consume(info, found))
    info, value = row_ops.update(
        ops, op.kind, op.name, args, use_locking=op.use_locking, read_value=op.read_value, request=op.request
    )
    return Result(index, info, None if value is None else consume(info, value))


@dataclass
class _Var:
    """A variable as the batch leaves it so far."""

    slot: int | None  # its slot before the batch; None if it did not exist
    d: Descriptor | None  # its descriptor now; None while it does not exist
    value: Array | None = None  # bytes the batch wrote; None: the store's (or none)
    created: bool = False  # the variable now is one the batch created
    drop_slot: bool = False  # the variable that existed before the batch is deleted
    patch: row_patches.Patch | None = None  # rows a sparse write changes, in place at commit


def _info(name: str, d: Descriptor) -> Info:
    return Info(name, dtype_from_code(d.dtype), d.shape, d.initialized, d.version)


class _Atomic:
    def __init__(self, ops: Ops, batch: Sequence[BatchOp], consume: Consume) -> None:
        self.ops = ops
        self.store = ops.store
        self.batch = batch
        self.consume = consume
        self.vars: dict[str, _Var] = {}
        self.results: list[Result] = []
        # Request ids of writes a later write of the same variable in this batch supersedes, with the
        # versions they made: remembered once the batch is published.
        self.superseded: list[tuple[str, bytes, int, bytes | None]] = []

    def run(self) -> list[Result]:
        for index, op in enumerate(self.batch):
            if op.kind != READ_PREFIX:
                try:
                    _checked_name(op.name)
                    if op.rows is not None:
                        for slot in op.rows.slots:
                            _checked_name(slot)
                        row_ops.check_names(op.kind, op.name, op.rows)
                except OpError as error:
                    raise BatchFailed(index, op, error) from None
        prefixes = [op.name for op in self.batch if op.kind == READ_PREFIX]
        named = {op.name for op in self.batch if op.kind != READ_PREFIX}
        named.update(slot for op in self.batch if op.rows is not None for slot in op.rows.slots)
        locks = self.ops.locks
        writes = any(op.kind in WRITES for op in self.batch)
        listed = {prefix: self.store.names(prefix) for prefix in prefixes}
        taken: list[int] = []
        try:
            while True:
                stripes = sorted({locks.stripe(n) for n in named.union(*listed.values())})
                for stripe in stripes:
                    self.ops.acquire(stripe, exclusive=writes)
                    taken.append(stripe)
                if not prefixes:
                    break
                # Listed again under the stripes: a variable created between the first listing and the
                # locks (by an atomic batch, say) would otherwise be missing from this cut.
                again = {prefix: self.store.names(prefix) for prefix in prefixes}
                if again == listed:
                    break
                listed = again
                for stripe in reversed(taken):
                    locks.release(stripe)
                taken.clear()
            if writes and self._applied_before():
                self._replay(listed)
                return self.results
            last_write = self._plan(listed)
            if writes:
                self._commit(stripes, last_write)
        finally:
            for stripe in reversed(taken):
                locks.release(stripe)
        return self.results

    # ---- a retried batch that happened already -------------------------------------------------

    def _applied_before(self) -> bool:
        """Whether a write of this batch happened already (an atomic batch happens whole or not at all)."""
        return any(
            op.kind in WRITES
            and op.request is not None
            and self.ops.applied(op.name, self.store.find(op.name), op.request) is not None
            for op in self.batch
        )

    def _replay(self, listed: dict[str, list[str]]) -> None:
        """The results of a batch that happened already: its writes' first outcomes (as far as they are still
        known), and reads and infos of the variables as they are now."""
        for index, op in enumerate(self.batch):
            try:
                self._replay_one(index, op, listed)
            except OpError as error:
                raise BatchFailed(index, op, error, applied=True) from None

    def _replay_one(self, index: int, op: BatchOp, listed: dict[str, list[str]]) -> None:
        name = op.name
        slot = self.store.find(name) if op.kind != READ_PREFIX else None
        current = None if slot is None else self.store.active(slot)
        if op.kind == READ_PREFIX:
            self._read_prefix(index, name, listed[name])
        elif op.kind == DELETE:
            self.results.append(Result(index))
        elif op.kind in (CREATE, INFO):
            if current is None:
                if op.kind == INFO:
                    raise NotFound(f"variable '{name}' does not exist")
                assert op.dtype is not None
                current = created_descriptor(name, op.dtype, op.shape, op.value)
                found = self.ops.applied(name, None, op.request)
                made = op.value is not None
                current = current._replace(version=found[0].version if found else int(made), initialized=made)
            self.results.append(Result(index, _info(name, current)))
        elif op.kind == GATHER:
            self._plan_row(index, op)  # a read: reads anew
        elif op.kind in ROW_WRITES:
            var, d = self._existing(name)
            found = self.ops.applied(name, slot, op.request)
            version = found[0].version if found else d.version
            info = _info(name, d)._replace(version=version)
            if op.read_value and not (found and found[1]):
                raise Aborted(
                    f"{OP_NAMES[op.kind]} of variable '{name}' was applied already (version {version}); the "
                    "value it produced is no longer known: read the variable"
                )
            value = self.consume(info, self._value(var, d)) if op.read_value else None
            self.results.append(Result(index, info, value))
        elif op.kind == READ:
            var, d = self._existing(name)
            check_readable(name, d)
            self.results.append(
                Result(index, _info(name, d), self.consume(_info(name, d), self._value(var, d)))
            )
        else:
            assert op.value is not None
            done = self.ops.applied(name, slot, op.request) or (
                Applied(current.version if current else 0, None),
                False,
            )
            info, value = self.ops.replayed_write(
                name,
                -1 if slot is None else slot,
                done,
                op.value,
                op=OP_NAMES[op.kind],
                read_value=op.read_value,
            )
            if value is op.value:
                self.results.append(Result(index, info, echo=True))
            else:
                self.results.append(Result(index, info, None if value is None else self.consume(info, value)))

    # ---- plan ----------------------------------------------------------------------------------

    def _var(self, name: str) -> _Var:
        var = self.vars.get(name)
        if var is None:
            slot = self.store.find(name)
            var = _Var(slot, None if slot is None else self.store.active(slot))
            self.vars[name] = var
        return var

    def _existing(self, name: str) -> tuple[_Var, Descriptor]:
        var = self._var(name)
        if var.d is None:
            raise NotFound(f"variable '{name}' does not exist")
        return var, var.d

    def _value(self, var: _Var, d: Descriptor) -> Array:
        if var.value is not None:
            return var.value
        if var.patch is not None:  # read after a sparse write: from now on the batch holds the whole value
            assert var.slot is not None
            current = self.ops._view(var.slot, self.store.active(var.slot))
            var.value = row_patches.materialize(current, var.patch.rows, var.patch.new)
            var.patch = None
            return var.value
        if var.slot is None:  # created by this batch without a value: zero elements, or never read
            assert d.shape is not None
            return np.empty(d.shape, dtype_from_code(d.dtype).numpy)
        return self.ops._view(var.slot, d)

    def _plan(self, listed: dict[str, list[str]]) -> dict[str, int]:
        """Every operation's checks and results against the state the earlier ones leave; changes nothing.

        Returns, per variable the batch writes, the index of its last write (to name it on failure).
        """
        last_write: dict[str, int] = {}
        count = self.store.variable_count
        for index, op in enumerate(self.batch):
            try:
                if op.kind == READ_PREFIX:
                    self._read_prefix(index, op.name, listed[op.name])
                    continue
                self._plan_one(index, op)
                if op.kind in WRITES:
                    last_write[op.name] = index
                if op.kind == CREATE:
                    count += 1
                    if count > self.store.limits.max_variables:
                        raise ResourceExhausted(
                            f"cannot create variable '{op.name}': the store's limit is "
                            f"{self.store.limits.max_variables} variables"
                        )
                elif op.kind == DELETE:
                    count -= 1
            except CodecError as exc:
                raise BatchFailed(index, op, InvalidArgument(str(exc))) from None
            except BatchFailed:
                raise
            except OpError as error:
                raise BatchFailed(index, op, error) from None
        return last_write

    def _plan_row(self, index: int, op: BatchOp) -> None:
        """A row op or optimizer: computed against the batch's state so far, its writes kept pending. A
        sparse write of variables the batch has not written yet keeps only its rows (row_patches.py)."""
        written, planned, found = row_ops.plan_atomic(
            op.kind, op.name, op.rows or RowArgs(), self._existing, self._value
        )
        if found is not None:
            _var, d = self._existing(op.name)
            info = _info(op.name, d)
            self.results.append(Result(index, info, self.consume(info, found)))
            return
        assert planned is not None
        rows = planned.rows
        patch = rows is not None and all(
            var.value is None and var.patch is None and var.slot is not None and not var.created
            for _name, var, _d, _value in written
        )
        for position, ((name, var, current, value), new) in enumerate(zip(written, planned.new, strict=True)):
            self._supersede(name, var)
            request = (op.request or NO_REQUEST) if position == 0 else NO_REQUEST
            if patch:
                assert rows is not None and var.slot is not None
                var.patch = row_patches.Patch(name, var.slot, rows, new, request)
            else:
                var.value = new if rows is None else row_patches.materialize(value, rows, new)
            version = current.version + 1
            var.d = Descriptor(current.dtype, True, current.shape, version, current.nbytes, request=request)
        name, var, _current, _value = written[0]
        assert var.d is not None
        info = _info(name, var.d)
        kept = self.consume(info, self._value(var, var.d)) if op.read_value else None
        self.results.append(Result(index, info, kept))

    def _plan_one(self, index: int, op: BatchOp) -> None:
        name, kind = op.name, op.kind
        if kind in ROW_KINDS:
            self._plan_row(index, op)
            return
        if kind == CREATE:
            var = self._var(name)
            if var.d is not None:
                raise AlreadyExists(f"variable '{name}' already exists")
            assert op.dtype is not None
            d = created_descriptor(name, op.dtype, op.shape, op.value)
            if d.shape is not None:
                self.ops.check_size(name, d.shape, op.dtype)
            if op.value is not None:
                d = d._replace(initialized=True, version=1, nbytes=op.value.nbytes)
            self._supersede(name, var)
            var.d, var.value, var.created = d._replace(request=op.request or NO_REQUEST), op.value, True
            self.results.append(Result(index, _info(name, d)))
        elif kind in (ASSIGN, ASSIGN_ADD, ASSIGN_SUB):
            value = op.value
            assert value is not None
            var, current = self._existing(name)
            check_values(value, name=name)
            dtype = dtype_of(value.dtype)
            if kind == ASSIGN:
                check_assign(name, current, dtype, value.shape, op.validate_shape)
                self.ops.check_size(name, value.shape, dtype)
                new = value
            else:
                check_update(name, OP_NAMES[kind], current, dtype, value.shape)
                new = np.empty_like(value)
                with np.errstate(all="ignore"):
                    (np.subtract if kind == ASSIGN_SUB else np.add)(self._value(var, current), value, out=new)
            var.value = new
            self._supersede(name, var)
            request = op.request or NO_REQUEST
            var.d = Descriptor(
                dtype.code, True, value.shape, current.version + 1, value.nbytes, request=request
            )
            info = _info(name, var.d)
            if op.read_value and new is value:
                self.results.append(Result(index, info, echo=True))
            else:
                self.results.append(Result(index, info, self.consume(info, new) if op.read_value else None))
        elif kind == READ:
            var, current = self._existing(name)
            check_readable(name, current)
            info = _info(name, current)
            self.results.append(Result(index, info, self.consume(info, self._value(var, current))))
        elif kind == INFO:
            _var, current = self._existing(name)
            self.results.append(Result(index, _info(name, current)))
        elif kind == DELETE:
            var, _current = self._existing(name)
            if var.slot is not None and not var.created:
                var.drop_slot = True
            self._supersede(name, var)
            if op.request is not None:
                self.superseded.append((name, op.request, 0, None))
            var.d, var.value, var.created = None, None, False
            self.results.append(Result(index))
        else:
            raise InvalidArgument(f"unknown batch operation kind {kind}")

    def _supersede(self, name: str, var: _Var) -> None:
        """A write of this batch replaces the variable's state made by an earlier one of this batch."""
        d = var.d
        if (
            d is not None
            and d.request != NO_REQUEST
            and name in self.vars
            and (var.created or var.value is not None or var.patch is not None)
        ):
            kept = var.value.tobytes() if var.value is not None and var.value.nbytes <= INLINE else None
            self.superseded.append((name, d.request, d.version, kept))
        var.patch = None  # replaced (or made whole by _value before)

    def _read_prefix(self, index: int, prefix: str, listed: list[str]) -> None:
        names = set(listed)
        names.update(name for name, var in self.vars.items() if name.startswith(prefix) and var.d is not None)
        for name in sorted(names):
            var = self._var(name)
            if var.d is not None and var.d.initialized:
                info = _info(name, var.d)
                self.results.append(Result(index, info, self.consume(info, self._value(var, var.d))))

    # ---- commit --------------------------------------------------------------------------------

    def _commit(self, stripes: list[int], last_write: dict[str, int]) -> None:
        store = self.store
        record = store.commit_record()
        store.mark_in_commit(stripes, True)
        inserted: list[int] = []
        committed = published = False
        self._unpatch_pinned()
        patches = row_patches.Patches(
            self.ops,
            [
                var.patch
                for var in self.vars.values()
                if var.patch is not None and var.d is not None and not var.created and not var.drop_slot
            ],
        )
        try:
            flips: list[tuple[int, int]] = []
            for name, var in self.vars.items():
                d = var.d
                if d is None or (not var.created and var.value is None and not var.drop_slot):
                    continue  # gone, or only read
                slot = var.slot
                if var.created and (slot is None or not var.drop_slot):
                    record.add(commits.CREATED, name=name)
                    try:
                        slot = store.insert(name, d._replace(initialized=d.initialized and d.nbytes == 0))
                    except StoreFullError as exc:
                        raise self._failed(
                            name, last_write, f"cannot create variable '{name}': {exc}"
                        ) from None
                    inserted.append(slot)
                    var.slot = slot
                    if var.value is None:
                        continue
                elif var.created:
                    var.drop_slot = False  # deleted and created again: the new variable takes over the slot
                assert slot is not None
                try:
                    segment, capacity = store.spare_segment(slot, d.nbytes)
                except StoreFullError as exc:
                    raise self._failed(name, last_write, f"variable '{name}': {exc}") from None
                d = d._replace(segment=segment, capacity=capacity)
                if var.value is not None:
                    np.copyto(self.ops._view(slot, d), var.value)
                if var.slot is not None and slot not in inserted:
                    self.ops.retire(name, slot)
                flips.append((slot, store.prepare(slot, d)))
            for slot, selector in flips:
                record.add(commits.FLIP, slot, selector)
            drops = [(name, var.slot) for name, var in self.vars.items() if var.drop_slot]
            for name, slot in drops:
                assert slot is not None
                record.add(commits.DELETE, slot, name=name)
                self.ops.retire(name, slot)  # its last write happened, whatever becomes of this batch
            for name, request, version, value in self.superseded:
                record.add(commits.REQUEST, name=name, payload=pack_applied(request, version, value))
            if patches.patches:
                patches.apply(record)
            # Logged once every step that may fail is done (a failure before the commit point changes
            # nothing, so its record must not be in the log either), and before the commit point.
            self._log(last_write)
            record.commit()
            committed = True
            # From here on the batch is applied: if finishing it fails (a mapping or a file cannot be made,
            # an interrupt), the record and the marks stay, and the next holder of a stripe redoes it.
            for slot, selector in flips:
                store.flip(slot, selector)
            for _name, slot in drops:
                assert slot is not None
                store.delete_slot(slot)
            for name, request, version, value in self.superseded:
                store.requests.record(self.ops.locks.stripe(name), request, version, value)
            patches.count()
            published = True
        finally:
            # The undo record goes before the commit record (see row_patches).
            patches.finish(committed=committed, published=published)
            if committed and not published:
                record.abandon()
            else:
                if not committed:
                    for slot in inserted:
                        store.delete_slot(slot)
                # The record goes before the marks: a kill in between leaves marks without a record (whoever
                # takes such a stripe finds nothing to replay), never a finished batch's record to replay.
                record.finish()
                store.mark_in_commit(stripes, False)

    def _unpatch_pinned(self) -> None:
        """A variable whose buffer a snapshot pinned gets its patch as a whole new value (a fresh buffer)
        rather than rows written in place."""
        for var in self.vars.values():
            if var.patch is None or var.slot is None or var.created or var.drop_slot:
                continue
            d = self.store.active(var.slot)
            if self.store.pinned(var.slot, d.segment):
                var.value = row_patches.materialize(
                    self.ops._view(var.slot, d), var.patch.rows, var.patch.new
                )
                var.patch = None

    def _log(self, last_write: dict[str, int]) -> None:
        """Append the batch's record to the write-ahead log (one record: replayed whole or not at all);
        a log that refuses it fails the batch at the last write of its first variable."""
        entries = self._log_entries()
        if not entries:
            return
        try:
            self.ops.log(*entries)
        except ResourceExhausted as exc:
            named = [e.name for e in entries if e.name in last_write]
            if not named:
                raise
            raise self._failed(named[0], last_write, str(exc)) from None

    def _log_entries(self) -> list[Entry]:
        """What the batch leaves, variable by variable: the write-ahead log's record of it."""
        entries = []
        for name, var in self.vars.items():
            if var.drop_slot:
                entries.append(Entry(records.DELETE, name))
            elif var.d is not None and (var.created or var.value is not None):
                d = var.d
                value = var.value if var.value is not None else b""
                entries.append(Entry(records.PUT, name, d.dtype, d.shape, d.initialized, d.version, value))
            elif var.patch is not None and var.d is not None:
                d, rows = var.d, np.ascontiguousarray(var.patch.rows, np.int64).tobytes()
                entries.append(
                    Entry(records.ROWS, name, d.dtype, d.shape, True, d.version, var.patch.new, rows)
                )
        return entries

    def _failed(self, name: str, last_write: dict[str, int], message: str) -> BatchFailed:
        index = last_write[name]
        return BatchFailed(index, self.batch[index], ResourceExhausted(message))
