"""A hypothesis state machine drives the real Client against a dict model of the store (DESIGN §3).

Random sequences of create (declared, unknown shape, with a value, zero-element shapes), assign (random
validate_shape, use_locking and read_value; matching and mismatching shapes and dtypes), assign_add,
assign_sub, read, info, delete, list, gather, scatter_add and scatter_update (duplicate, out-of-range and
int32/int64 indices, scalar updates) and apply_gradient_descent over a few colliding names. The model says,
for every call, either which exception class it must raise (a set where DESIGN leaves the order of two
checks open) or exactly what it returns; a failed call changes nothing, every successful write adds 1 to
the version, zero-element variables count as initialized, an unknown shape takes the first assigned one,
integers wrap around and float results are compared exactly (numpy computes them on both sides). After
every step the server's variables must equal the model's.

TENSORPS_FUZZ=long selects a profile with many more and longer runs.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from support import same_values
from tensorps.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    VariableInfo,
)

LONG = os.environ.get("TENSORPS_FUZZ") == "long"

settings.register_profile(
    "tensorps-model",
    max_examples=60,
    stateful_step_count=40,
    deadline=None,  # loopback round trips vary with the machine's load
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "tensorps-model-long", settings.get_profile("tensorps-model"), max_examples=1000, stateful_step_count=100
)
MODEL = settings.get_profile("tensorps-model-long" if LONG else "tensorps-model")

pytestmark = pytest.mark.timeout(7200 if LONG else 300)

Array = np.ndarray[Any, Any]
Shape = tuple[int, ...]
Errors = frozenset[type[TensorPSError]]

DTYPES = [np.dtype(t) for t in (np.float32, np.int32, np.int8, np.float64, np.bool_, np.complex64)]
NAMES = ["a", "b", "c"]
INVALID: Errors = frozenset({InvalidArgumentError})
NOT_FOUND: Errors = frozenset({NotFoundError})
EXISTS: Errors = frozenset({AlreadyExistsError})
PRECONDITION: Errors = frozenset({FailedPreconditionError})

shapes = st.lists(st.integers(0, 3), max_size=2).map(tuple)
# The integer types twice as often: their sums wrap around, the floats' only round.
dtypes = st.sampled_from([*DTYPES, np.dtype(np.int32), np.dtype(np.int8)])


def arrays(dtype: np.dtype[Any], shape: Shape) -> st.SearchStrategy[Array]:
    """Arrays whose integers are often at their type's limits, so that sums wrap around."""
    elements = None
    if dtype.kind == "i":
        low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        elements = st.sampled_from([low, high, low + 1, high - 1, -1, 1]) | st.integers(low, high)
    return hnp.arrays(dtype, shape, elements=elements)


@dataclass(frozen=True)
class Entry:
    """The model of one variable."""

    dtype: np.dtype[Any]
    shape: Shape | None
    initialized: bool
    version: int
    value: Array | None

    def info(self, name: str) -> VariableInfo:
        return VariableInfo(name, self.dtype, self.shape, self.initialized, self.version)


class StoreMachine(RuleBasedStateMachine):
    """The store as a dict: name -> Entry (absent names are not in it)."""

    client: ClassVar[Client]
    calls: ClassVar[int] = 0
    steps: ClassVar[int] = 0
    runs: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"model{uuid.uuid4().hex[:10]}/"
        self.model: dict[str, Entry] = {}
        type(self).runs += 1

    # ---- helpers -------------------------------------------------------------------------------

    def call(self, errors: Errors, action: Callable[[], Any]) -> Any:
        """Run one client call: it must raise one of `errors` (if any) or succeed."""
        type(self).calls += 1
        try:
            result = action()
        except TensorPSError as exc:
            assert type(exc) in errors, (
                f"expected {sorted(e.__name__ for e in errors) or 'success'}, got {exc!r}"
            )
            return None
        assert not errors, f"expected {sorted(e.__name__ for e in errors)}, got success: {result!r}"
        return result

    def pick(self, data: st.DataObject) -> str:
        """A name, mostly one that exists (so that calls get past NOT_FOUND), sometimes any of the pool."""
        if self.model and data.draw(st.integers(0, 4), label="existing name?") > 0:
            return data.draw(st.sampled_from(sorted(self.model)), label="name")
        return self.prefix + data.draw(st.sampled_from(NAMES), label="name")

    def draw_value(self, data: st.DataObject, name: str) -> Array:
        """A value for `name`: mostly of its dtype and shape (to get past the checks), sometimes not."""
        entry = self.model.get(name)
        if entry is not None and data.draw(st.integers(0, 3), label="same dtype?") > 0:
            dtype = entry.dtype
        else:
            dtype = data.draw(dtypes, label="dtype")
        if (
            entry is not None
            and entry.shape is not None
            and data.draw(st.integers(0, 3), label="same shape?") > 0
        ):
            shape = entry.shape
        else:
            shape = data.draw(shapes, label="shape")
        value: Array = data.draw(arrays(dtype, shape), label="value")
        return value

    def check_result(self, result: Any, name: str, new: Entry, read_value: bool) -> None:
        """A write's return: the value after the write, or the VariableInfo without read_value."""
        if read_value:
            assert isinstance(result, np.ndarray) and new.value is not None
            assert same_values(result, new.value), (result, new.value)
        else:
            assert result == new.info(name), (result, new.info(name))

    # ---- catalog -------------------------------------------------------------------------------

    @initialize(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        """Start most names as variables: with a value, declared, or of unknown shape."""
        for n in NAMES:
            name = self.prefix + n
            kinds = ["value", "value", "value", "declared", "unknown", "absent"]
            kind = data.draw(st.sampled_from(kinds), label="kind")
            dtype = data.draw(dtypes, label="dtype")
            shape = data.draw(shapes, label="shape")
            if kind == "value":
                value = data.draw(arrays(dtype, shape), label="value")
                new = Entry(dtype, shape, True, 1, value.copy())
                assert self.client.create(name, value=value) == new.info(name)
            elif kind != "absent":
                declared = shape if kind == "declared" else None
                empty = declared is not None and math.prod(declared) == 0
                new = Entry(dtype, declared, empty, 0, np.zeros(shape, dtype) if empty else None)
                assert self.client.create(name, dtype=dtype, shape=declared) == new.info(name)
            else:
                continue
            self.model[name] = new

    @rule(n=st.sampled_from(NAMES), dtype=dtypes, shape=st.none() | shapes)
    def create_declared(self, n: str, dtype: np.dtype[Any], shape: Shape | None) -> None:
        """create(dtype, shape): uninitialized, unless the shape has no elements; shape=None is unknown."""
        name = self.prefix + n
        empty = shape is not None and math.prod(shape) == 0
        new = Entry(dtype, shape, empty, 0, np.zeros(shape, dtype) if empty else None)
        errors = EXISTS if name in self.model else frozenset()
        result = self.call(errors, lambda: self.client.create(name, dtype=dtype, shape=shape))
        if not errors:
            assert result == new.info(name), (result, new)
            self.model[name] = new

    @rule(n=st.sampled_from(NAMES), data=st.data())
    def create_with_value(self, n: str, data: st.DataObject) -> None:
        """create(value=...), perhaps with a dtype and a shape that do not match the value."""
        name = self.prefix + n
        value = data.draw(dtypes.flatmap(lambda d: shapes.flatmap(lambda s: arrays(d, s))), label="value")
        dtype = data.draw(st.sampled_from([None, None, value.dtype]) | dtypes, label="dtype argument")
        shape = data.draw(st.sampled_from([None, None, value.shape]) | shapes, label="shape argument")
        errors: set[type[TensorPSError]] = set()
        if dtype is not None and dtype != value.dtype:
            errors.add(InvalidArgumentError)
        if shape is not None and tuple(shape) != value.shape:
            errors.add(InvalidArgumentError)
        if name in self.model:
            errors.add(AlreadyExistsError)  # either check may come first
        new = Entry(value.dtype, value.shape, True, 1, value.copy())
        result = self.call(
            frozenset(errors), lambda: self.client.create(name, value=value, dtype=dtype, shape=shape)
        )
        if not errors:
            assert result == new.info(name), (result, new)
            self.model[name] = new

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """delete: NOT_FOUND for an absent name."""
        name = self.pick(data)
        errors = frozenset() if name in self.model else NOT_FOUND
        self.call(errors, lambda: self.client.delete(name))
        self.model.pop(name, None)

    @rule(data=st.data())
    def info(self, data: st.DataObject) -> None:
        """info and is_initialized: the model's metadata, NOT_FOUND for an absent name."""
        name = self.pick(data)
        entry = self.model.get(name)
        errors = NOT_FOUND if entry is None else frozenset()
        result = self.call(errors, lambda: self.client.info(name))
        initialized = self.call(errors, lambda: self.client.is_initialized(name))
        if entry is not None:
            assert result == entry.info(name) and initialized == entry.initialized, (result, entry)

    @rule(which=st.sampled_from(["", "a", "b", "c", "x"]))
    def list_variables(self, which: str) -> None:
        """list(prefix): exactly the model's variables under the prefix."""
        prefix = self.prefix + which
        listed = self.call(frozenset(), lambda: self.client.list(prefix))
        expected = {name: e.info(name) for name, e in self.model.items() if name.startswith(prefix)}
        assert {v.name: v for v in listed} == expected

    # ---- reads and writes ----------------------------------------------------------------------

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """read: the model's value; FAILED_PRECONDITION while uninitialized."""
        name = self.pick(data)
        entry = self.model.get(name)
        errors = NOT_FOUND if entry is None else frozenset() if entry.initialized else PRECONDITION
        result = self.call(errors, lambda: self.client.read(name))
        if not errors:
            assert entry is not None and entry.value is not None
            assert isinstance(result, np.ndarray) and same_values(result, entry.value), (result, entry)

    @rule(
        data=st.data(),
        validate_shape=st.booleans(),
        use_locking=st.booleans(),
        read_value=st.booleans(),
    )
    def assign(self, data: st.DataObject, validate_shape: bool, use_locking: bool, read_value: bool) -> None:
        """assign: DESIGN §3's table; the value's shape replaces the variable's when allowed."""
        name = self.pick(data)
        value = self.draw_value(data, name)
        entry = self.model.get(name)
        if entry is None:
            errors = NOT_FOUND
        elif value.dtype != entry.dtype or (
            validate_shape and entry.shape is not None and entry.shape != value.shape
        ):
            errors = INVALID
        else:
            errors = frozenset()
        result = self.call(
            errors,
            lambda: self.client.assign(
                name, value, validate_shape=validate_shape, use_locking=use_locking, read_value=read_value
            ),
        )
        if not errors:
            assert entry is not None
            new = Entry(entry.dtype, value.shape, True, entry.version + 1, value.copy())
            self.check_result(result, name, new, read_value)
            self.model[name] = new

    @rule(data=st.data(), use_locking=st.booleans(), read_value=st.booleans())
    def assign_add(self, data: st.DataObject, use_locking: bool, read_value: bool) -> None:
        """assign_add: see update."""
        self.update(data, False, use_locking, read_value)

    @rule(data=st.data(), use_locking=st.booleans(), read_value=st.booleans())
    def assign_sub(self, data: st.DataObject, use_locking: bool, read_value: bool) -> None:
        """assign_sub: see update."""
        self.update(data, True, use_locking, read_value)

    def update(self, data: st.DataObject, subtract: bool, use_locking: bool, read_value: bool) -> None:
        """assign_add/assign_sub: initialized, same dtype and shape, no bool; integers wrap."""
        name = self.pick(data)
        delta = self.draw_value(data, name)
        entry = self.model.get(name)
        errors: set[type[TensorPSError]] = set()
        if entry is None:
            errors.add(NotFoundError)
            if delta.dtype == np.bool_:
                errors.add(InvalidArgumentError)  # either check may come first
        elif delta.dtype == np.bool_ or delta.dtype != entry.dtype:
            errors.add(InvalidArgumentError)
            if not entry.initialized:
                errors.add(FailedPreconditionError)  # either check may come first
        elif not entry.initialized:
            errors.add(FailedPreconditionError)  # TF checks this before the shapes
        elif entry.shape != delta.shape:
            errors.add(InvalidArgumentError)
        op = self.client.assign_sub if subtract else self.client.assign_add
        result = self.call(
            frozenset(errors), lambda: op(name, delta, use_locking=use_locking, read_value=read_value)
        )
        if not errors:
            assert entry is not None and entry.value is not None
            with np.errstate(all="ignore"):
                value = (np.subtract if subtract else np.add)(entry.value, delta)
            new = Entry(entry.dtype, entry.shape, True, entry.version + 1, value)
            self.check_result(result, name, new, read_value)
            self.model[name] = new

    # ---- rows ----------------------------------------------------------------------------------

    def draw_indices(self, data: st.DataObject) -> Array:
        """Row indices, int32 or int64, 0-2 dimensions, sometimes out of range (-1, 3)."""
        shape = data.draw(st.lists(st.integers(0, 3), max_size=2).map(tuple), label="indices shape")
        dtype = data.draw(st.sampled_from([np.int32, np.int64]), label="indices dtype")
        indices: Array = data.draw(hnp.arrays(dtype, shape, elements=st.integers(-1, 3)), label="indices")
        return indices

    @rule(data=st.data())
    def gather(self, data: st.DataObject) -> None:
        """gather: the model's rows; TF's checks (initialized, at least 1-D, indices in range)."""
        name = self.pick(data)
        indices = self.draw_indices(data)
        entry = self.model.get(name)
        errors = NOT_FOUND if entry is None else frozenset() if entry.initialized else PRECONDITION
        shape = None if entry is None else entry.shape
        if not errors and shape is not None and (not shape or ((indices < 0) | (indices >= shape[0])).any()):
            errors = INVALID
        result = self.call(errors, lambda: self.client.gather(name, indices))
        if not errors:
            assert entry is not None and entry.value is not None
            assert same_values(result, entry.value[indices]), (result, entry.value[indices])

    @rule(data=st.data(), add=st.booleans(), use_locking=st.booleans(), read_value=st.booleans())
    def scatter(self, data: st.DataObject, add: bool, use_locking: bool, read_value: bool) -> None:
        """scatter_add (duplicates accumulate, integers wrap; no bool) or scatter_update (the last duplicate
        wins); a scalar update broadcasts; a refused call changes nothing."""
        name = self.pick(data)
        indices = self.draw_indices(data)
        entry = self.model.get(name)
        if entry is not None and entry.shape and data.draw(st.integers(0, 3), label="fitting updates?") > 0:
            dtype = entry.dtype if data.draw(st.integers(0, 3), label="same dtype?") else data.draw(dtypes)
            shape = (
                () if data.draw(st.integers(0, 4), label="scalar?") == 0 else indices.shape + entry.shape[1:]
            )
            updates = data.draw(arrays(dtype, shape), label="updates")
        else:
            updates = self.draw_value(data, name)
        errors: Errors = frozenset()
        if entry is None:
            errors = NOT_FOUND
        elif (add and entry.dtype == np.bool_) or updates.dtype != entry.dtype:
            errors = INVALID
        elif not entry.initialized:
            errors = PRECONDITION
        elif entry.shape is not None and (
            not entry.shape
            or (updates.ndim and updates.shape != indices.shape + entry.shape[1:])
            or ((indices < 0) | (indices >= entry.shape[0])).any()
        ):
            errors = INVALID
        op = self.client.scatter_add if add else self.client.scatter_update
        result = self.call(
            errors, lambda: op(name, indices, updates, use_locking=use_locking, read_value=read_value)
        )
        if not errors:
            assert entry is not None and entry.value is not None and entry.shape is not None
            value = entry.value.copy()
            rows = indices.reshape(-1)
            per_row = np.broadcast_to(updates, indices.shape + entry.shape[1:]).reshape(
                rows.size, *entry.shape[1:]
            )
            with np.errstate(all="ignore"):
                for i, row in enumerate(rows):
                    value[row] = value[row] + per_row[i] if add else per_row[i]
            new = Entry(entry.dtype, entry.shape, True, entry.version + 1, value)
            self.check_result(result, name, new, read_value)
            self.model[name] = new

    @rule(data=st.data(), use_locking=st.booleans(), read_value=st.booleans())
    def apply_gradient_descent(self, data: st.DataObject, use_locking: bool, read_value: bool) -> None:
        """apply_gradient_descent: var - delta * alpha for floating and complex variables (no kernel for the
        others), initialized, the same dtype and shape."""
        name = self.pick(data)
        delta = self.draw_value(data, name)
        entry = self.model.get(name)
        alpha = np.asarray(data.draw(st.sampled_from([0.5, -2.0, 0.0])), delta.dtype)[()]
        errors: Errors = frozenset()
        if entry is None:
            errors = NOT_FOUND
        elif entry.dtype.kind not in "fc":
            errors = INVALID
        elif not entry.initialized:
            errors = PRECONDITION
        elif delta.dtype != entry.dtype or delta.shape != entry.shape:
            errors = INVALID
        result = self.call(
            errors,
            lambda: self.client.apply_gradient_descent(
                name, alpha, delta, use_locking=use_locking, read_value=read_value
            ),
        )
        if not errors:
            assert entry is not None and entry.value is not None
            with np.errstate(all="ignore"):
                value = entry.value - delta * alpha
            new = Entry(entry.dtype, entry.shape, True, entry.version + 1, value)
            self.check_result(result, name, new, read_value)
            self.model[name] = new

    # ---- the server equals the model after every step --------------------------------------------

    @invariant()
    def server_matches_model(self) -> None:
        """Every name of the pool: absent on both sides, or the same info and value."""
        type(self).steps += 1
        for n in NAMES:
            name = self.prefix + n
            entry = self.model.get(name)
            try:
                info = self.client.info(name)
            except NotFoundError:
                assert entry is None, f"{name} vanished"
                continue
            assert entry is not None, f"{name} exists on the server only: {info}"
            assert info == entry.info(name), (info, entry)
            if entry.initialized:
                assert entry.value is not None
                value = self.client.read(name)
                assert same_values(value, entry.value), (value, entry.value)

    def teardown(self) -> None:
        for name in self.model:
            self.client.delete(name)


def test_store_follows_the_model(ps: Client) -> None:
    """Random call sequences over colliding names answer exactly as the model of DESIGN §3 says."""
    StoreMachine.client = ps
    StoreMachine.calls = StoreMachine.steps = StoreMachine.runs = 0
    run_state_machine_as_test(StoreMachine, settings=MODEL)
    machine = StoreMachine
    print(f"\nstate machine: {machine.runs} runs, {machine.steps} steps, {machine.calls} calls checked")
