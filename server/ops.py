"""TensorFlow's variable semantics over the shared-memory store (no gRPC here).

Mirrors TF's ref-variable kernels (core/kernels/assign_op.h, dense_update_ops.cc):
- Assign: the shape check and any reshape always run under the variable's lock stripe; the data copy runs
  under it only with use_locking. A locked copy goes to the inactive buffer and is published with one
  byte store, so that a process killed mid-copy leaves the old value complete.
- AssignAdd/AssignSub: initialized variable, identical shapes, no broadcasting; with use_locking the whole
  read-modify-write is locked, without it the update runs in place, as TF's does.
- A failed call changes nothing: every check runs before the first byte is written.
- Waiting for a variable's stripe is bounded by the call's deadline (Ops.deadline), so that a stopped
  holder (a SIGSTOPped same-host client) costs callers their deadline, not a thread for ever.
- With a write-ahead log (persist/journal.py), a write appends its record under its lock once every
  fallible step is done and before it becomes visible; a failed append fails the write, which then changes
  nothing. The call waits for durability (--wal always) after it lets go of its lock (@durable).
- A buffer a snapshot pinned (store.pin) is never written in place: an unlocked write takes the locked
  path (a fresh buffer) while the pin lasts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import numpy as np

from tensorps.client.codec import (
    DType,
    Shape,
    check_values,
    dtype_from_code,
    dtype_of,
    format_shape,
    nbytes_of,
    validate_name,
)
from tensorps.server.locks import LockTimeout
from tensorps.server.persist import records
from tensorps.server.persist.records import Entry
from tensorps.server.persist.runtime import Persistence
from tensorps.server.requests import INLINE, Applied
from tensorps.server.store import Descriptor, Store, StoreFullError

logger = logging.getLogger("tensorps.server")
T = TypeVar("T")
P = ParamSpec("P")
NO_REQUEST = bytes(16)
Array = np.ndarray[Any, Any]


class OpError(Exception):
    """A call that TF's semantics refuse; `code` names the gRPC status it maps to."""

    code = "UNKNOWN"


class InvalidArgument(OpError):
    code = "INVALID_ARGUMENT"


class NotFound(OpError):
    code = "NOT_FOUND"


class AlreadyExists(OpError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(OpError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(OpError):
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(OpError):
    code = "PERMISSION_DENIED"


class Aborted(OpError):
    code = "ABORTED"


class DeadlineExceeded(OpError):
    code = "DEADLINE_EXCEEDED"


def durable(method: Callable[Concatenate[Ops, P], T]) -> Callable[Concatenate[Ops, P], T]:
    """A write whose records must be durable before it returns (--wal always); waits after its locks."""

    @functools.wraps(method)
    def wrapper(self: Ops, /, *args: P.args, **kwargs: P.kwargs) -> T:
        persistence = self.persistence
        if persistence is None:
            return method(self, *args, **kwargs)
        try:
            result = method(self, *args, **kwargs)
        except BaseException:
            persistence.sync()  # a record appended before the call failed is on its way to disk anyway
            raise
        persistence.sync()
        return result

    return wrapper


class Info(NamedTuple):
    """A variable's metadata as the ops return it."""

    name: str
    dtype: DType
    shape: Shape | None
    initialized: bool
    version: int


def _info(name: str, d: Descriptor) -> Info:
    return Info(name, dtype_from_code(d.dtype), d.shape, d.initialized, d.version)


# ---- the checks of each op, shared by single calls and batches (batch.py) ------------------------


def check_dtype(name: str, op: str, current: Descriptor, dtype: DType) -> None:
    if current.dtype != dtype.code:
        have = dtype_from_code(current.dtype)
        raise InvalidArgument(
            f"{op} of variable '{name}': the variable has dtype {have.name} but the value has "
            f"dtype {dtype.name}; nothing is cast"
        )


def check_assign(name: str, current: Descriptor, dtype: DType, shape: Shape, validate_shape: bool) -> None:
    """TF's Assign: same dtype; with validate_shape, the same shape unless the variable has none yet."""
    check_dtype(name, "Assign", current, dtype)
    if validate_shape and current.shape is not None and current.shape != shape:
        raise InvalidArgument(
            f"Assign requires shapes of both tensors to match. lhs shape= "
            f"{format_shape(current.shape)} rhs shape= {format_shape(shape)} (variable '{name}')"
        )


def check_update(name: str, op_name: str, current: Descriptor, dtype: DType, shape: Shape) -> None:
    """TF's AssignAdd/AssignSub: numeric, initialized, identical shapes (no broadcasting)."""
    if dtype.name == "bool":
        raise InvalidArgument(f"{op_name} of variable '{name}': dtype bool is not numeric")
    check_dtype(name, op_name, current, dtype)
    check_readable(name, current)
    if current.shape != shape:
        raise InvalidArgument(
            f"Parameters and update must be the same size. lhs shape= {format_shape(current.shape)} "
            f"rhs shape= {format_shape(shape)} (variable '{name}')"
        )


def check_readable(name: str, current: Descriptor) -> None:
    if not current.initialized:
        raise FailedPrecondition(f"Attempting to use uninitialized value {name}")


def created_descriptor(name: str, dtype: DType, shape: Shape | None, value: Array | None) -> Descriptor:
    """The descriptor CreateVariable starts from (uninitialized unless zero-sized), after its checks."""
    validate_name(name)
    if value is not None:
        check_values(value, name=name)  # here, not in a transport: gRPC and shm:// pass the same check
        if value.dtype != dtype.numpy:
            raise InvalidArgument(
                f"variable '{name}' is declared {dtype.name} but its initial value is {value.dtype}"
            )
        if shape is not None and tuple(shape) != value.shape:
            raise InvalidArgument(
                f"variable '{name}' is declared with shape {format_shape(shape)} but its initial value "
                f"has shape {format_shape(value.shape)}"
            )
        shape = value.shape
    # A variable with zero elements has nothing left to initialize (as in TF).
    initialized = shape is not None and 0 in shape
    return Descriptor(dtype.code, initialized, shape, 0, 0)


class Ops:
    """The operations of DESIGN §3 over one store. Thread-safe and process-safe."""

    def __init__(self, store: Store, *, max_variable_bytes: int | None = None) -> None:
        self.store = store
        self.locks = store.locks
        self.max_variable_bytes = max_variable_bytes
        self._call = threading.local()  # .deadline: this thread's current call's, time.monotonic()
        # Called with the seconds each stripe acquisition waited (the server's metrics; None: not measured).
        self.on_lock_wait: Callable[[float], None] | None = None
        # The data directory's snapshots and write-ahead log, if the store's server has one.
        self.persistence = Persistence.attach(store.path)
        if self.persistence is not None and self.persistence.journal is not None:
            store.on_undone = self._log_undone

    def log(self, *entries: Entry) -> None:
        """Append a write's record to the write-ahead log (if any); the caller holds its stripes and has
        made nothing visible yet. A log that cannot take it fails the write."""
        if self.persistence is None or self.persistence.journal is None:
            return
        try:
            self.persistence.log(entries)
        except OSError as exc:
            names = sorted({f"'{e.name}'" for e in entries})
            what = f"variable {names[0]}" if len(names) == 1 else f"variables {', '.join(names)}"
            raise ResourceExhausted(
                f"the write of {what} cannot be logged: {exc.strerror}; nothing was changed"
            ) from None

    def _log_undone(self, undone: list[tuple[str, Descriptor | None, Any]]) -> None:
        """A process that died amid a write may have logged it (records go to the log before the write is
        visible): its change is undone now (Store.recover), so the log gets each variable as it is again,
        ordered before any later write of it (whose writer waits for this recovery). A log that cannot
        take it is reported: a restore would then replay the dead write."""
        entries = [
            Entry(records.DELETE, name)
            if d is None
            else Entry(records.PUT, name, d.dtype, d.shape, d.initialized, d.version, raw)
            for name, d, raw in undone
        ]
        try:
            self.log(*entries)
        except OpError as exc:
            logger.error("cannot log the undoing of a dead process's write: %s", exc)

    def close(self) -> None:
        """Make this process's logged writes durable and let go of the log (a stopping worker or client)."""
        if self.persistence is not None:
            self.persistence.close()

    # ---- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Bound this thread's waits for a stripe to `seconds` from now (None: no bound)."""
        previous = getattr(self._call, "deadline", None)
        self._call.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield
        finally:
            self._call.deadline = previous

    def acquire(self, stripe: int, *, exclusive: bool, name: str | None = None) -> None:
        """Take a stripe within the call's deadline (DeadlineExceeded naming `name`), first finishing any
        atomic batch that a dead holder of it left half-published."""
        deadline: float | None = getattr(self._call, "deadline", None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        observe = self.on_lock_wait
        started = time.perf_counter() if observe is not None else 0.0
        try:
            self.locks.acquire(stripe, exclusive=exclusive, timeout=timeout)
        except LockTimeout:
            what = f"variable '{name}'" if name is not None else f"stripe {stripe}"
            raise DeadlineExceeded(f"timed out waiting for the lock of {what}") from None
        finally:
            if observe is not None:
                observe(time.perf_counter() - started)
        if self.store.in_commit(stripe):
            try:
                self.store.recover(stripe)
            except BaseException:
                self.locks.release(stripe)
                raise

    @contextlib.contextmanager
    def hold(self, stripe: int, *, exclusive: bool = True, name: str | None = None) -> Iterator[None]:
        self.acquire(stripe, exclusive=exclusive, name=name)
        try:
            yield
        finally:
            self.locks.release(stripe)

    def begin_copy(self, stripes: list[int]) -> None:
        """Before an unlocked write lets go of `stripes` to copy in place: take their copy locks (shared;
        never waited for, as a snapshot's cut takes them only while it holds every stripe), so that a cut
        waits for the copy instead of pinning and saving a half-written buffer whose log record went to
        the log before it. Without persistence (no snapshots) there is nothing to wait for."""
        if self.persistence is None:
            return
        for stripe in stripes:
            self.locks.acquire(self.locks.copy_lock(stripe), exclusive=False)

    def end_copy(self, stripes: list[int]) -> None:
        """The copy is done (before the stripes are taken again: a cut holding them waits for this)."""
        if self.persistence is None:
            return
        for stripe in stripes:
            self.locks.release(self.locks.copy_lock(stripe))

    def _lookup(self, name: str, request: bytes | None) -> int:
        """A write's slot; a retried write of a variable deleted since still finds its outcome (-1)."""
        slot = self.store.find(name)
        if slot is None:
            if request is not None and self.store.requests.lookup(self.locks.stripe(name), request):
                return -1
            raise NotFound(f"variable '{name}' does not exist")
        return slot

    def _slot(self, name: str) -> int:
        slot = self.store.find(name)
        if slot is None:
            raise NotFound(f"variable '{name}' does not exist")
        return slot

    def check_size(self, name: str, shape: Shape, dtype: DType) -> int:
        """Byte size of a tensor for `name`, refused before anything is allocated if beyond a limit."""
        nbytes = nbytes_of(shape, dtype)
        for limit, setting in (
            (self.max_variable_bytes, "max_variable_bytes"),
            (self.store.limits.max_total_bytes, "max_total_bytes"),
        ):
            if limit is not None and nbytes > limit:
                raise ResourceExhausted(
                    f"variable '{name}': shape {format_shape(shape)} of {dtype.name} needs {nbytes} bytes, "
                    f"more than the server's {setting} of {limit}"
                )
        return nbytes

    def _view(self, slot: int, d: Descriptor) -> Array:
        assert d.shape is not None
        raw = self.store.segment_array(slot, d.segment, d.capacity, d.nbytes)
        return raw.view(dtype_from_code(d.dtype).numpy).reshape(d.shape)

    def _write_spare(
        self, name: str, slot: int, dtype: DType, shape: Shape, *, version: int, request: bytes
    ) -> tuple[Array, Any]:
        """Prepare the inactive buffer for `shape`; returns it and a function that publishes it."""
        nbytes = nbytes_of(shape, dtype)
        try:
            segment, capacity = self.store.spare_segment(slot, nbytes)
        except StoreFullError as exc:
            raise ResourceExhausted(f"variable '{name}': {exc}") from None
        d = Descriptor(dtype.code, True, shape, version, nbytes, segment, capacity, request)

        def publish() -> Info:
            self.retire(name, slot)
            self.store.publish(slot, d)
            return _info(name, d)

        return self._view(slot, d), publish

    # ---- exactly-once writes (requests.py) -----------------------------------------------------

    def retire(self, name: str, slot: int) -> None:
        """Remember the write that made the slot's active descriptor, which is about to be replaced."""
        current = self.store.active(slot)
        if current.request != NO_REQUEST:
            value = None
            if current.initialized and current.shape is not None and current.nbytes <= INLINE:
                value = self._view(slot, current).tobytes()
            self.store.requests.record(self.locks.stripe(name), current.request, current.version, value)

    def _applied_unlocked(self, name: str, slot: int, version: int, request: bytes | None) -> None:
        """Remember an unlocked write once its copy is done (a crash before it must not count it as done):
        in the descriptor it made if no write replaced it meanwhile, else in the table."""
        if request is None:
            return
        with self.hold(self.locks.stripe(name)):
            current = self.store.active(slot) if self.store.find(name) == slot else None
            if current is not None and current.version == version and current.request == NO_REQUEST:
                self.store.set_request(slot, request)
            else:
                self.store.requests.record(self.locks.stripe(name), request, version, None)

    def applied(self, name: str, slot: int | None, request: bytes | None) -> tuple[Applied, bool] | None:
        """If the write `request` happened already: its outcome, and whether it made the current value."""
        if request is None:
            return None
        if slot is not None and slot >= 0:
            current = self.store.active(slot)
            if current.request == request:
                return Applied(current.version, None), True
        found = self.store.requests.lookup(self.locks.stripe(name), request)
        return None if found is None else (found, False)

    def replayed_write(
        self, name: str, slot: int, applied: tuple[Applied, bool], value: Array, *, op: str, read_value: bool
    ) -> tuple[Info, Array | None]:
        """A retried write's first outcome: its info, and its value when it can still be known."""
        (version, kept), current = applied
        info = Info(name, dtype_of(value.dtype), value.shape, True, version)
        if not read_value:
            return info, None
        if current:
            d = self.store.active(slot)
            return info, self._view(slot, d).copy()
        if kept is not None:
            return info, np.frombuffer(kept, value.dtype).reshape(value.shape).copy()
        if op == "Assign":
            return info, value  # the value right after an assign is the value it wrote
        raise Aborted(
            f"{op} of variable '{name}' was applied already (version {version}); the value it produced "
            "is no longer known: read the variable"
        )

    # ---- catalog -------------------------------------------------------------------------------

    @durable
    def create(
        self,
        name: str,
        dtype: DType,
        shape: Shape | None,
        value: Array | None = None,
        *,
        request: bytes | None = None,
    ) -> Info:
        initial = created_descriptor(name, dtype, shape, value)
        if value is None:  # the insert is the whole create; with a value, the value's publish is
            initial = initial._replace(request=request or NO_REQUEST)
        if initial.shape is not None:
            self.check_size(name, initial.shape, dtype)
        with self.hold(self.locks.stripe(name), name=name):
            slot = self.store.find(name)
            done = self.applied(name, slot, request)
            if done is not None:
                if slot is not None and done[1]:
                    return _info(name, self.store.active(slot))
                made = initial._replace(version=done[0].version)
                return _info(name, made._replace(initialized=made.initialized or value is not None))
            if slot is not None:
                raise AlreadyExists(f"variable '{name}' already exists")
            try:
                if value is None:
                    slot = self.store.insert(name, initial)
                    self._log_or_undo(
                        name,
                        slot,
                        Entry(
                            records.PUT, name, dtype.code, initial.shape, initial.initialized, initial.version
                        ),
                    )
                    return _info(name, self.store.active(slot))
                # Filled before it is inserted, so that a crash leaves no variable or the whole one (the
                # unnamed segment of a crash is a sweep's to reclaim).
                with self.store.new_segment(value.nbytes) as (segment, capacity, raw):
                    np.copyto(raw.view(dtype.numpy).reshape(value.shape), value)
                    d = initial._replace(
                        initialized=True,
                        version=1,
                        nbytes=value.nbytes,
                        segment=segment,
                        capacity=capacity,
                        request=request or NO_REQUEST,
                    )
                    slot = self.store.insert(name, d)
                    entry = Entry(records.PUT, name, dtype.code, d.shape, True, 1, value)
                    self._log_or_undo(name, slot, entry, keep_segment=True)
                return _info(name, d)
            except StoreFullError as exc:
                raise ResourceExhausted(f"cannot create variable '{name}': {exc}") from None

    def _log_or_undo(self, name: str, slot: int, entry: Entry, *, keep_segment: bool = False) -> None:
        """Log a create, whose insert (the only step that may fail) is done; if the log refuses it, undo
        the insert (the stripe is still held: nobody used the variable). With `keep_segment`, the value's
        segment is left to its owner (new_segment frees it as the create fails)."""
        try:
            self.log(entry)
        except OpError:
            if keep_segment:
                self.store.forget_segments(slot)
            self.store.delete_slot(slot)
            raise

    @durable
    def delete(self, name: str, *, request: bytes | None = None) -> None:
        with self.hold(self.locks.stripe(name), name=name):
            # The id first: a retry must not delete a variable that someone created again since.
            if self.applied(name, None, request) is not None:
                return
            slot = self._slot(name)
            self.log(Entry(records.DELETE, name))
            self.retire(name, slot)
            self.store.delete_slot(slot)
            if request is not None:
                # After the delete: a crash in between makes the retry answer NOT_FOUND (the variable is
                # gone either way), never report a delete that did not happen.
                self.store.requests.record(self.locks.stripe(name), request, 0, None)

    def info(self, name: str) -> Info:
        with self.hold(self.locks.stripe(name), exclusive=False, name=name):
            return _info(name, self.store.active(self._slot(name)))

    def list(self, prefix: str = "") -> list[Info]:
        found = []
        for name in self.store.names(prefix):
            with contextlib.suppress(NotFound):  # deleted since the listing
                found.append(self.info(name))
        return found

    # ---- reads and writes ----------------------------------------------------------------------

    def read(self, name: str, consume: Callable[[Info, Array], T]) -> T:
        """Calls consume(info, view) under a shared lock; the view is valid only during the call."""
        with self.hold(self.locks.stripe(name), exclusive=False, name=name):
            slot = self._slot(name)
            d = self.store.active(slot)
            check_readable(name, d)
            return consume(_info(name, d), self._view(slot, d))

    @durable
    def assign(
        self,
        name: str,
        value: Array,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
        request: bytes | None = None,
    ) -> tuple[Info, Array | None]:
        """TF's Assign. Returns the info after the write and, with read_value, the variable's value.

        A locked write returns `value` itself: under the lock, the variable's value right after the write
        is exactly the value written.
        """
        dtype = dtype_of(value.dtype)
        check_values(value, name=name)
        shape: Shape = value.shape
        stripe = self.locks.stripe(name)
        self.acquire(stripe, exclusive=True, name=name)
        try:
            slot = self._lookup(name, request)
            done = self.applied(name, slot, request)
            if done is not None:
                return self.replayed_write(name, slot, done, value, op="Assign", read_value=read_value)
            current = self.store.active(slot)
            check_assign(name, current, dtype, shape, validate_shape)
            self.check_size(name, shape, dtype)
            pinned = self.store.pinned(slot, current.segment)
            if use_locking or not current.initialized or current.shape != shape or pinned:
                # A fresh buffer (TF allocates one to reshape) is filled before anyone sees it.
                version = current.version + 1
                buffer, publish = self._write_spare(
                    name, slot, dtype, shape, version=version, request=request or NO_REQUEST
                )
                np.copyto(buffer, value)
                self.log(Entry(records.PUT, name, dtype.code, shape, True, version, value))
                info: Info = publish()
                return info, (value if read_value else None)
            # Same shape, unlocked: TF copies outside the lock, so concurrent writers may interleave.
            self.log(Entry(records.PUT, name, dtype.code, shape, True, current.version + 1, value))
            self.retire(name, slot)
            version = self.store.bump_version(slot, NO_REQUEST)
            target = self._view(slot, current)
            self.begin_copy([stripe])
        finally:
            self.locks.release(stripe)
        try:
            np.copyto(target, value)
        finally:
            self.end_copy([stripe])
        self._applied_unlocked(name, slot, version, request)
        info = Info(name, dtype, shape, True, version)
        return info, (target.copy() if read_value else None)

    @durable
    def assign_add(
        self,
        name: str,
        delta: Array,
        *,
        use_locking: bool = False,
        read_value: bool = True,
        subtract: bool = False,
        request: bytes | None = None,
    ) -> tuple[Info, Array | None]:
        """TF's AssignAdd (or AssignSub with subtract=True); integer overflow wraps as in numpy."""
        op_name = "AssignSub" if subtract else "AssignAdd"
        ufunc = np.subtract if subtract else np.add
        dtype = dtype_of(delta.dtype)
        check_values(delta, name=name)
        stripe = self.locks.stripe(name)
        self.acquire(stripe, exclusive=True, name=name)
        try:
            slot = self._lookup(name, request)
            done = self.applied(name, slot, request)
            if done is not None:
                return self.replayed_write(name, slot, done, delta, op=op_name, read_value=read_value)
            current = self.store.active(slot)
            check_update(name, op_name, current, dtype, delta.shape)
            source = self._view(slot, current)
            kind = records.SUB if subtract else records.ADD
            update = Entry(kind, name, dtype.code, delta.shape, True, current.version + 1, delta)
            if use_locking or self.store.pinned(slot, current.segment):
                version = current.version + 1
                buffer, publish = self._write_spare(
                    name, slot, dtype, delta.shape, version=version, request=request or NO_REQUEST
                )
                with np.errstate(all="ignore"):
                    ufunc(source, delta, out=buffer)
                self.log(update)
                info: Info = publish()
                return info, (buffer.copy() if read_value else None)
            self.log(update)
            self.retire(name, slot)
            version = self.store.bump_version(slot, NO_REQUEST)
            self.begin_copy([stripe])
        finally:
            self.locks.release(stripe)
        try:
            with np.errstate(all="ignore"):
                ufunc(source, delta, out=source)
        finally:
            self.end_copy([stripe])
        self._applied_unlocked(name, slot, version, request)
        info = Info(name, dtype, delta.shape, True, version)
        return info, (source.copy() if read_value else None)
