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
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import numpy as np

from tensorps.client.codec import (
    DType,
    Shape,
    dtype_from_code,
    dtype_of,
    format_shape,
    nbytes_of,
    validate_name,
)
from tensorps.server.locks import LockTimeout
from tensorps.server.store import Descriptor, Store, StoreFullError

T = TypeVar("T")
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


class DeadlineExceeded(OpError):
    code = "DEADLINE_EXCEEDED"


class Info(NamedTuple):
    """A variable's metadata as the ops return it."""

    name: str
    dtype: DType
    shape: Shape | None
    initialized: bool
    version: int


def _info(name: str, d: Descriptor) -> Info:
    return Info(name, dtype_from_code(d.dtype), d.shape, d.initialized, d.version)


class Ops:
    """The operations of DESIGN §3 over one store. Thread-safe and process-safe."""

    def __init__(self, store: Store, *, max_variable_bytes: int | None = None) -> None:
        self.store = store
        self.locks = store.locks
        self.max_variable_bytes = max_variable_bytes
        self._call = threading.local()  # .deadline: this thread's current call's, time.monotonic()

    # ---- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def deadline(self, seconds: float | None) -> Iterator[None]:
        """Bound this thread's waits for a variable's lock to `seconds` from now (None: no bound)."""
        previous = getattr(self._call, "deadline", None)
        self._call.deadline = None if seconds is None else time.monotonic() + seconds
        try:
            yield
        finally:
            self._call.deadline = previous

    def _lock(self, name: str, *, exclusive: bool = True) -> int:
        """Take `name`'s stripe within the call's deadline; returns it (for locks.release)."""
        stripe = self.locks.stripe(name)
        deadline: float | None = getattr(self._call, "deadline", None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.locks.acquire(stripe, exclusive=exclusive, timeout=timeout)
        except LockTimeout:
            raise DeadlineExceeded(f"timed out waiting for the lock of variable '{name}'") from None
        return stripe

    @contextlib.contextmanager
    def _locked(self, name: str, *, exclusive: bool = True) -> Iterator[None]:
        stripe = self._lock(name, exclusive=exclusive)
        try:
            yield
        finally:
            self.locks.release(stripe)

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

    @staticmethod
    def _check_dtype(name: str, op: str, current: Descriptor, dtype: DType) -> DType:
        have = dtype_from_code(current.dtype)
        if have.code != dtype.code:
            raise InvalidArgument(
                f"{op} of variable '{name}': the variable has dtype {have.name} but the value has "
                f"dtype {dtype.name}; nothing is cast"
            )
        return have

    def _view(self, slot: int, d: Descriptor) -> Array:
        assert d.shape is not None
        raw = self.store.segment_array(slot, d.segment, d.capacity, d.nbytes)
        return raw.view(dtype_from_code(d.dtype).numpy).reshape(d.shape)

    def _write_spare(
        self, name: str, slot: int, dtype: DType, shape: Shape, version: int
    ) -> tuple[Array, Any]:
        """Prepare the inactive buffer for `shape`; returns it and a function that publishes it."""
        nbytes = nbytes_of(shape, dtype)
        try:
            segment, capacity = self.store.spare_segment(slot, nbytes)
        except StoreFullError as exc:
            raise ResourceExhausted(f"variable '{name}': {exc}") from None
        d = Descriptor(dtype.code, True, shape, version, nbytes, segment, capacity)

        def publish() -> Info:
            self.store.publish(slot, d)
            return _info(name, d)

        return self._view(slot, d), publish

    # ---- catalog -------------------------------------------------------------------------------

    def create(self, name: str, dtype: DType, shape: Shape | None, value: Array | None = None) -> Info:
        validate_name(name)
        if value is not None:
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
        if shape is not None:
            self.check_size(name, shape, dtype)
        # A variable with zero elements has nothing left to initialize (as in TF).
        initialized = shape is not None and 0 in shape
        with self._locked(name):
            if self.store.find(name) is not None:
                raise AlreadyExists(f"variable '{name}' already exists")
            try:
                slot = self.store.insert(name, Descriptor(dtype.code, initialized, shape, 0, 0))
            except StoreFullError as exc:
                raise ResourceExhausted(f"cannot create variable '{name}': {exc}") from None
            if value is None:
                return _info(name, self.store.active(slot))
            try:
                assert shape is not None
                buffer, publish = self._write_spare(name, slot, dtype, shape, 1)
            except BaseException:
                self.store.delete_slot(slot)
                raise
            np.copyto(buffer, value)
            info: Info = publish()
            return info

    def delete(self, name: str) -> None:
        with self._locked(name):
            self.store.delete_slot(self._slot(name))

    def info(self, name: str) -> Info:
        with self._locked(name, exclusive=False):
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
        with self._locked(name, exclusive=False):
            slot = self._slot(name)
            d = self.store.active(slot)
            if not d.initialized:
                raise FailedPrecondition(f"Attempting to use uninitialized value {name}")
            return consume(_info(name, d), self._view(slot, d))

    def assign(
        self,
        name: str,
        value: Array,
        *,
        validate_shape: bool = True,
        use_locking: bool = True,
        read_value: bool = True,
    ) -> tuple[Info, Array | None]:
        """TF's Assign. Returns the info after the write and, with read_value, the variable's value.

        A locked write returns `value` itself: under the lock, the variable's value right after the write
        is exactly the value written.
        """
        dtype = dtype_of(value.dtype)
        shape: Shape = value.shape
        stripe = self._lock(name)
        try:
            slot = self._slot(name)
            current = self.store.active(slot)
            self._check_dtype(name, "Assign", current, dtype)
            if validate_shape and current.shape is not None and current.shape != shape:
                raise InvalidArgument(
                    f"Assign requires shapes of both tensors to match. lhs shape= "
                    f"{format_shape(current.shape)} rhs shape= {format_shape(shape)} (variable '{name}')"
                )
            self.check_size(name, shape, dtype)
            if use_locking or not current.initialized or current.shape != shape:
                # A fresh buffer (TF allocates one to reshape) is filled before anyone sees it.
                buffer, publish = self._write_spare(name, slot, dtype, shape, current.version + 1)
                np.copyto(buffer, value)
                info: Info = publish()
                return info, (value if read_value else None)
            # Same shape, unlocked: TF copies outside the lock, so concurrent writers may interleave.
            version = self.store.bump_version(slot)
            target = self._view(slot, current)
        finally:
            self.locks.release(stripe)
        np.copyto(target, value)
        info = Info(name, dtype, shape, True, version)
        return info, (target.copy() if read_value else None)

    def assign_add(
        self,
        name: str,
        delta: Array,
        *,
        use_locking: bool = False,
        read_value: bool = True,
        subtract: bool = False,
    ) -> tuple[Info, Array | None]:
        """TF's AssignAdd (or AssignSub with subtract=True); integer overflow wraps as in numpy."""
        op_name = "AssignSub" if subtract else "AssignAdd"
        ufunc = np.subtract if subtract else np.add
        dtype = dtype_of(delta.dtype)
        if dtype.name == "bool":
            raise InvalidArgument(f"{op_name} of variable '{name}': dtype bool is not numeric")
        stripe = self._lock(name)
        try:
            slot = self._slot(name)
            current = self.store.active(slot)
            self._check_dtype(name, op_name, current, dtype)
            if not current.initialized:
                raise FailedPrecondition(f"Attempting to use uninitialized value {name}")
            if current.shape != delta.shape:
                raise InvalidArgument(
                    f"Parameters and update must be the same size. lhs shape= {format_shape(current.shape)} "
                    f"rhs shape= {format_shape(delta.shape)} (variable '{name}')"
                )
            source = self._view(slot, current)
            if use_locking:
                buffer, publish = self._write_spare(name, slot, dtype, delta.shape, current.version + 1)
                with np.errstate(all="ignore"):
                    ufunc(source, delta, out=buffer)
                info: Info = publish()
                return info, (buffer.copy() if read_value else None)
            version = self.store.bump_version(slot)
        finally:
            self.locks.release(stripe)
        with np.errstate(all="ignore"):
            ufunc(source, delta, out=source)
        info = Info(name, dtype, delta.shape, True, version)
        return info, (source.copy() if read_value else None)
