"""DESIGN §3 row by row, against a real server: TF's Assign/AssignAdd/AssignSub semantics and error texts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from tensorps.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    TensorPSError,
    VariableInfo,
)


def snapshot(ps: Client, name: str) -> tuple[VariableInfo, bytes | None]:
    info = ps.info(name)
    return info, (ps.read(name).tobytes() if info.initialized else None)


def assert_unchanged(ps: Client, name: str, before: tuple[VariableInfo, bytes | None]) -> None:
    assert snapshot(ps, name) == before


# ---- the decision table ------------------------------------------------------------------------


def test_uninitialized_declared_same_shape_assigns(ps: Client, name: str) -> None:
    """An uninitialized variable with declared shape S takes a value of shape S."""
    ps.create(name, dtype="float32", shape=(2, 3))
    out = ps.assign(name, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(out, np.ones((2, 3)))
    info = ps.info(name)
    assert info.initialized and info.shape == (2, 3) and info.version == 1


def test_uninitialized_declared_other_shape_fails_with_tf_text(ps: Client, name: str) -> None:
    """validate_shape=True refuses another shape even before the first write, with TF's message."""
    ps.create(name, dtype="float32", shape=(4, 5))
    before = snapshot(ps, name)
    with pytest.raises(InvalidArgumentError) as err:
        ps.assign(name, np.ones(20, np.float32))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "Assign requires shapes of both tensors to match. lhs shape= [4,5] rhs shape= [20]"
        in err.value.message
    )
    assert name in err.value.message
    assert_unchanged(ps, name, before)


def test_uninitialized_declared_other_shape_without_validation_reshapes(ps: Client, name: str) -> None:
    """validate_shape=False lets an uninitialized variable take the value's shape."""
    ps.create(name, dtype="float32", shape=(4, 5))
    ps.assign(name, np.arange(20, dtype=np.float32), validate_shape=False)
    assert ps.info(name).shape == (20,)
    np.testing.assert_array_equal(ps.read(name), np.arange(20))


@pytest.mark.parametrize("validate_shape", [True, False])
def test_unknown_shape_takes_the_first_values_shape(ps: Client, name: str, validate_shape: bool) -> None:
    """A variable created with shape=None takes any shape on its first assign, then validates it."""
    info = ps.create(name, dtype="int32")
    assert info.shape is None and not info.initialized
    ps.assign(name, np.arange(6, dtype=np.int32).reshape(2, 3), validate_shape=validate_shape)
    assert ps.info(name).shape == (2, 3)
    with pytest.raises(InvalidArgumentError, match=r"lhs shape= \[2,3\] rhs shape= \[6\]"):
        ps.assign(name, np.arange(6, dtype=np.int32))


def test_initialized_same_shape_assigns(ps: Client, name: str) -> None:
    """An initialized variable takes a value of its own shape, and its version grows."""
    ps.create(name, value=np.zeros((3,), np.float64))
    v1 = ps.info(name).version
    ps.assign(name, np.array([1.0, 2.0, 3.0]))
    assert ps.info(name).version == v1 + 1
    np.testing.assert_array_equal(ps.read(name), [1, 2, 3])


@pytest.mark.parametrize(
    ("shape", "value_shape", "lhs", "rhs"),
    [
        ((4, 5), (20,), "[4,5]", "[20]"),
        ((), (1,), "[]", "[1]"),
        ((1,), (), "[1]", "[]"),
        ((20,), (4, 5), "[20]", "[4,5]"),
        ((2, 3), (3, 2), "[2,3]", "[3,2]"),
    ],
)
def test_initialized_other_shape_fails_even_with_same_size(
    ps: Client, name: str, shape: tuple[int, ...], value_shape: tuple[int, ...], lhs: str, rhs: str
) -> None:
    """Shapes match only by rank and every dim: (), (1,), (20,), (4,5) all differ; nothing changes."""
    ps.create(name, value=np.zeros(shape, np.float32))
    before = snapshot(ps, name)
    with pytest.raises(InvalidArgumentError) as err:
        ps.assign(name, np.ones(value_shape, np.float32))
    assert f"lhs shape= {lhs} rhs shape= {rhs}" in err.value.message
    assert_unchanged(ps, name, before)


def test_initialized_other_shape_without_validation_reshapes(ps: Client, name: str) -> None:
    """validate_shape=False lets an initialized variable take a new shape and size."""
    ps.create(name, value=np.zeros((2, 3), np.float32))
    out = ps.assign(name, np.ones(6, np.float32), validate_shape=False)
    assert out.shape == (6,)
    assert ps.info(name).shape == (6,)
    out = ps.assign(name, np.full((1024,), 7, np.float32), validate_shape=False, use_locking=False)
    np.testing.assert_array_equal(ps.read(name), np.full(1024, 7))


def test_zero_element_variable_is_initialized_from_creation(ps: Client, name: str) -> None:
    """A declared shape with zero elements counts as initialized, is readable, and still validates."""
    info = ps.create(name, dtype="float32", shape=(0, 2))
    assert info.initialized
    assert ps.read(name).shape == (0, 2)
    np.testing.assert_array_equal(ps.assign_add(name, np.zeros((0, 2), np.float32)), np.zeros((0, 2)))
    with pytest.raises(InvalidArgumentError, match=r"lhs shape= \[0,2\] rhs shape= \[0,3\]"):
        ps.assign(name, np.zeros((0, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"lhs shape= \[0,2\] rhs shape= \[0,3\]"):
        ps.assign_add(name, np.zeros((0, 3), np.float32))


# ---- dtypes, names and conversions -------------------------------------------------------------


def test_dtype_mismatch_names_both_and_casts_nothing(ps: Client, name: str) -> None:
    """A numpy array of another dtype is an error naming both dtypes, never a cast."""
    ps.create(name, value=np.zeros(3, np.float32))
    before = snapshot(ps, name)
    for wrong in (np.zeros(3, np.float64), np.zeros(3, np.int32)):
        with pytest.raises(InvalidArgumentError) as err:
            ps.assign(name, wrong)
        assert "float32" in err.value.message and str(wrong.dtype) in err.value.message
    with pytest.raises(InvalidArgumentError):
        ps.assign_add(name, np.zeros(3, np.float64))
    assert_unchanged(ps, name, before)


def test_python_values_take_the_variables_dtype_losslessly(ps: Client, name: str) -> None:
    """Lists and scalars convert to the variable's dtype when every element round-trips; lossy ones fail."""
    ps.create(name, dtype="int32", shape=(1, 2))
    out = ps.assign(name, [[2, 3]])
    assert out.dtype == np.int32
    before = snapshot(ps, name)
    with pytest.raises(InvalidArgumentError):
        ps.assign(name, [[2.5, 3]])
    with pytest.raises(InvalidArgumentError):
        ps.assign(name, [[2**40, 3]])
    assert_unchanged(ps, name, before)
    floats = f"{name}.f"
    ps.create(floats, dtype="float32", shape=())
    assert ps.assign(floats, 3).dtype == np.float32
    assert ps.assign(floats, 0.375) == np.float32(0.375)
    with pytest.raises(InvalidArgumentError, match=r"0\.1 is no float32"):
        ps.assign(floats, 0.1)  # no float32 is 0.1: pass np.float32(0.1) to round it on purpose
    assert ps.assign(floats, np.float32(0.1)) == np.float32(0.1)
    with pytest.raises(InvalidArgumentError):
        ps.assign(floats, 1e300)


def test_unknown_dtype_is_rejected_by_name(ps: Client, name: str) -> None:
    """Dtypes outside DESIGN §2 are refused, naming the dtype."""
    with pytest.raises(InvalidArgumentError, match=r"str|<U"):
        ps.create(name, dtype="str")
    with pytest.raises(InvalidArgumentError, match=r"float128|longdouble"):
        ps.create(name, value=np.zeros(2, np.longdouble))


@pytest.mark.parametrize(
    "bad", ["", "a" * 256, "a//b", "a/./b", "../x", "a/..", "-x", "_x", "a b", "a\0b", "é"]
)
def test_bad_names_are_invalid_arguments(ps: Client, bad: str) -> None:
    """Names follow TF's op-name rule plus ':'; no empty, '.' or '..' parts."""
    with pytest.raises(InvalidArgumentError):
        ps.create(bad, dtype="float32")


@pytest.mark.parametrize("good", ["dense/kernel:0", ".hidden", "a" * 255, "0/1/2", "x-y_z.w"])
def test_good_names_work(ps: Client, good: str) -> None:
    """TF-style names, ':'-suffixed and 255-character names are accepted."""
    ps.create(good, value=np.ones(2, np.int8))
    assert ps.read(good).tolist() == [1, 1]
    ps.delete(good)


# ---- catalog -----------------------------------------------------------------------------------


def test_create_existing_is_already_exists(ps: Client, name: str) -> None:
    """create() of an existing name fails with ALREADY_EXISTS and leaves the variable alone."""
    ps.create(name, value=np.ones(2, np.float32))
    before = snapshot(ps, name)
    with pytest.raises(AlreadyExistsError):
        ps.create(name, dtype="int32")
    assert_unchanged(ps, name, before)


def test_unknown_name_is_not_found_everywhere(ps: Client, name: str) -> None:
    """Every operation on a missing variable is NOT_FOUND."""
    calls: list[Callable[[], object]] = [
        lambda: ps.read(name),
        lambda: ps.info(name),
        lambda: ps.delete(name),
        lambda: ps.assign(name, np.ones(2, np.float32)),
        lambda: ps.assign_add(name, np.ones(2, np.float32)),
        lambda: ps.assign_sub(name, np.ones(2, np.float32)),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as err:
            call()
        assert name in err.value.message


def test_create_read_delete_list(ps: Client, name: str) -> None:
    """A variable appears in list() after create and disappears after delete."""
    ps.create(name, value=np.arange(4, dtype=np.int64))
    listed = {v.name: v for v in ps.list(prefix=name)}
    assert listed[name].shape == (4,) and listed[name].dtype == np.int64
    assert ps.is_initialized(name)
    ps.delete(name)
    assert name not in {v.name for v in ps.list(prefix=name)}
    ps.create(name, dtype="float32", shape=(2,))
    assert not ps.is_initialized(name)


def test_create_with_mismatched_declaration_fails(ps: Client, name: str) -> None:
    """An initial value must match a declared dtype and shape."""
    with pytest.raises(InvalidArgumentError):
        ps.create(name, dtype="float64", value=np.zeros(2, np.float32))
    with pytest.raises(InvalidArgumentError):
        ps.create(name, dtype="float32", shape=(3,), value=np.zeros(2, np.float32))
    with pytest.raises(NotFoundError):
        ps.info(name)


# ---- uninitialized and AssignAdd/AssignSub -----------------------------------------------------


@pytest.mark.parametrize("op", ["read", "assign_add", "assign_sub"])
def test_uninitialized_use_is_failed_precondition(ps: Client, name: str, op: str) -> None:
    """read/assign_add/assign_sub of an uninitialized variable: TF's FAILED_PRECONDITION text."""
    ps.create(name, dtype="float32", shape=(2,))
    with pytest.raises(FailedPreconditionError) as err:
        if op == "read":
            ps.read(name)
        else:
            getattr(ps, op)(name, np.ones(2, np.float32))
    assert err.value.message == f"Attempting to use uninitialized value {name}"
    assert ps.info(name).version == 0


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_assign_add_and_sub(ps: Client, name: str, dtype: str) -> None:
    """TF's AssignAdd/AssignSub cases on float32/float64/int32/int64, locked and not."""
    ps.create(name, value=np.array([1, 2, 3], dtype))
    np.testing.assert_array_equal(ps.assign_add(name, np.array([10, 20, 30], dtype)), [11, 22, 33])
    np.testing.assert_array_equal(
        ps.assign_sub(name, np.array([1, 2, 3], dtype), use_locking=True), [10, 20, 30]
    )
    info = ps.assign_add(name, np.array([1, 1, 1], dtype), read_value=False)
    assert isinstance(info, VariableInfo) and info.version == 4
    np.testing.assert_array_equal(ps.read(name), [11, 21, 31])


@pytest.mark.parametrize("delta_shape", [(), (1,), (3, 1), (2,)])
def test_assign_add_needs_identical_shapes(ps: Client, name: str, delta_shape: tuple[int, ...]) -> None:
    """No broadcasting, no scalar update: 'Parameters and update must be the same size'."""
    ps.create(name, value=np.zeros(3, np.float32))
    before = snapshot(ps, name)
    with pytest.raises(InvalidArgumentError, match="Parameters and update must be the same size"):
        ps.assign_add(name, np.ones(delta_shape, np.float32))
    assert_unchanged(ps, name, before)


def test_integer_overflow_wraps(ps: Client, name: str) -> None:
    """AssignAdd wraps around on integer overflow, as numpy does."""
    ps.create(name, value=np.array([127, -128], np.int8))
    np.testing.assert_array_equal(ps.assign_add(name, np.array([1, 0], np.int8)), [-128, -128])
    np.testing.assert_array_equal(
        ps.assign_sub(name, np.array([0, 1], np.int8), use_locking=True), [-128, 127]
    )


def test_assign_add_rejects_bool(ps: Client, name: str) -> None:
    """AssignAdd/AssignSub are numeric only."""
    ps.create(name, value=np.array([True, False]))
    with pytest.raises(InvalidArgumentError, match="bool"):
        ps.assign_add(name, np.array([True, True]))


def test_read_value_false_returns_info_only(ps: Client, name: str) -> None:
    """read_value=False returns the VariableInfo with the new version and no tensor."""
    ps.create(name, dtype="float32", shape=(2,))
    info = ps.assign(name, np.ones(2, np.float32), read_value=False)
    assert isinstance(info, VariableInfo)
    assert info.version == 1 and info.initialized and info.shape == (2,)


def test_unlocked_assign_writes(ps: Client, name: str) -> None:
    """use_locking=False still assigns (the copy just runs outside the stripe lock)."""
    ps.create(name, value=np.zeros(4, np.float32))
    out = ps.assign(name, np.arange(4, dtype=np.float32), use_locking=False)
    np.testing.assert_array_equal(out, np.arange(4))
    np.testing.assert_array_equal(ps.read(name), np.arange(4))
    assert ps.info(name).version == 2


def test_tf_case_large_value_into_uninitialized_small_variable(ps: Client, name: str) -> None:
    """TF's test: a [1024,1024] value into an uninitialized [1] variable with validate_shape=False."""
    ps.create(name, dtype="float32", shape=(1,))
    value = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    out = ps.assign(name, value, validate_shape=False)
    np.testing.assert_array_equal(out, value)
    assert ps.info(name).shape == (1024, 1024)
    np.testing.assert_array_equal(ps.read(name), value)


# ---- every dtype -------------------------------------------------------------------------------

DTYPES = [
    np.float16,
    ml_dtypes.bfloat16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.complex64,
    np.complex128,
    np.bool_,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_round_trips_bit_exactly(ps: Client, name: str, dtype: type) -> None:
    """Random bytes of every DESIGN §2 dtype come back identical, through create, assign and read."""
    rng = np.random.default_rng(1)
    npdtype = np.dtype(dtype)
    if npdtype == np.bool_:
        value: np.ndarray[Any, Any] = rng.integers(0, 2, (3, 5)).astype(np.bool_)
    else:
        value = rng.integers(0, 256, (3, 5, npdtype.itemsize), dtype=np.uint8).view(npdtype)[..., 0]
    ps.create(name, value=value)
    assert ps.read(name).tobytes() == value.tobytes()
    flipped = value[::-1].copy()
    assert ps.assign(name, flipped).tobytes() == flipped.tobytes()
    assert ps.read(name).dtype == npdtype
    assert ps.read(name).tobytes() == flipped.tobytes()


def test_big_endian_input_is_normalised(ps: Client, name: str) -> None:
    """A big-endian array is sent as the same values, little-endian."""
    value = np.arange(5, dtype=">i4")
    ps.create(name, dtype="int32", shape=(5,))
    ps.assign(name, value)
    np.testing.assert_array_equal(ps.read(name), np.arange(5))


def test_non_contiguous_input(ps: Client, name: str) -> None:
    """Strided and transposed arrays are sent in C order."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    ps.create(name, value=base.T)
    np.testing.assert_array_equal(ps.read(name), base.T)
    strided = base[::-1, :].T
    assert not strided.flags.c_contiguous
    ps.assign(name, strided)
    np.testing.assert_array_equal(ps.read(name), strided)


def test_errors_are_typed(ps: Client, name: str) -> None:
    """Every error is a TensorPSError carrying the gRPC status code and the server's message."""
    with pytest.raises(TensorPSError) as err:
        ps.read(name)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert str(err.value).startswith("NOT_FOUND:")


@pytest.mark.parametrize("shape", [("a",), (2.7,), 5, [[1]]])
def test_shapes_must_be_integers(ps: Client, name: str, shape: object) -> None:
    """A declared shape of non-integers is an InvalidArgumentError, never silently truncated."""
    with pytest.raises(InvalidArgumentError):
        ps.create(name, dtype="float32", shape=shape)  # type: ignore[arg-type]
