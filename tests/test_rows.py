"""Rows (gather, scatter_*, scatter_nd_*) through the real server and shm://: TF's semantics, texts, codes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tensorps.client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    VariableInfo,
)

SCATTERS = ("update", "add", "sub", "mul", "div", "min", "max")


def table(ps: Client, name: str, shape: tuple[int, ...] = (6, 2), dtype: str = "float32") -> np.ndarray:
    value = np.arange(np.prod(shape), dtype=dtype).reshape(shape) + 1
    ps.create(name, value=value)
    return value


def test_gather_rows(ps: Client, name: str) -> None:
    """gather returns indices.shape + var.shape[1:], int32 or int64 indices, any index shape."""
    value = table(ps, name, (6, 2))
    for dtype in (np.int32, np.int64):
        idx = np.array([[5, 0], [2, 2]], dtype)
        np.testing.assert_array_equal(ps.gather(name, idx), value[idx])
    np.testing.assert_array_equal(ps.gather(name, 3), value[3])
    np.testing.assert_array_equal(ps.gather(name, [1, 4]), value[[1, 4]])
    empty = ps.gather(name, np.zeros((0,), np.int64))
    assert empty.shape == (0, 2) and empty.dtype == np.float32


def test_gather_batch_dims(ps: Client, name: str) -> None:
    """batch_dims=1 gathers per batch entry, as tf.gather(..., batch_dims=1)."""
    value = table(ps, name, (4, 5, 3))
    idx = np.array([[0, 4], [1, 1], [3, 2], [4, 0]], np.int32)
    expected = np.stack([value[b][idx[b]] for b in range(4)])
    np.testing.assert_array_equal(ps.gather(name, idx, batch_dims=1), expected)


def test_gather_errors(ps: Client, name: str) -> None:
    """Out-of-range indices, scalar variables, negative batch_dims and float indices: TF's texts."""
    table(ps, name, (6, 2))
    with pytest.raises(InvalidArgumentError, match=r"indices\[1,0\] = 7 is not in \[0, 6\)"):
        ps.gather(name, np.array([[0], [7]], np.int32))
    with pytest.raises(InvalidArgumentError, match=r"batch_dims is negative \(-1\)"):
        ps.gather(name, np.array([0], np.int32), batch_dims=-1)
    with pytest.raises(InvalidArgumentError, match="'Tindices' of float32 is not in the list of allowed"):
        ps.gather(name, np.array([0.0], np.float32))
    ps.create(f"{name}/s", value=np.float32(3))
    with pytest.raises(InvalidArgumentError, match="params must be at least 1 dimensional"):
        ps.gather(f"{name}/s", np.array([0], np.int32))
    ps.create(f"{name}/u", dtype="float32", shape=(3, 2))
    with pytest.raises(FailedPreconditionError, match=f"Attempting to use uninitialized value {name}/u"):
        ps.gather(f"{name}/u", [0])
    with pytest.raises(NotFoundError):
        ps.gather(f"{name}/missing", [0])


@pytest.mark.parametrize("kind", SCATTERS)
def test_scatter_kinds_with_duplicates(ps: Client, name: str, kind: str) -> None:
    """Every scatter kind; duplicates accumulate in index order (update: the last wins)."""
    value = table(ps, name, (6, 2)).astype(np.float64)
    idx = np.array([1, 4, 1], np.int64)
    upd = np.array([[2, 3], [4, 5], [6, 7]], np.float32)
    info = getattr(ps, f"scatter_{kind}")(name, idx, upd)
    assert isinstance(info, VariableInfo) and info.version == 2 and info.shape == (6, 2)
    expected = value.copy()
    combine: Callable[[Any, Any], Any] = {  # type: ignore[assignment]
        "update": lambda a, b: b,
        "add": np.add,
        "sub": np.subtract,
        "mul": np.multiply,
        "div": np.divide,
        "min": np.minimum,
        "max": np.maximum,
    }[kind]
    for i, row in enumerate(idx):
        expected[row] = combine(expected[row], upd[i].astype(np.float64))
    np.testing.assert_allclose(ps.read(name), expected.astype(np.float32), rtol=1e-6)


def test_scatter_scalar_broadcast_and_read_value(ps: Client, name: str) -> None:
    """A scalar update applies to every indexed row; read_value returns the variable after the update."""
    value = table(ps, name, (4, 3), "int32")
    out = ps.scatter_add(name, [0, 2, 0], np.int32(10), read_value=True)
    expected = value.copy()
    expected[0] += 20
    expected[2] += 10
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(ps.scatter_update(name, [3], 7, read_value=True)[3], [7, 7, 7])


def test_scatter_one_and_three_dimensional_tables(ps: Client, name: str) -> None:
    """1-D tables take scalar rows; 3-D tables take (…, d1, d2) updates; 2-D indices work too."""
    one = table(ps, f"{name}/1d", (5,))
    ps.scatter_sub(f"{name}/1d", [4, 0], np.array([1, 2], np.float32))
    np.testing.assert_array_equal(ps.read(f"{name}/1d"), one - np.array([2, 0, 0, 0, 1], np.float32))
    three = table(ps, f"{name}/3d", (4, 2, 3))
    upd = np.full((2, 1, 2, 3), 0.5, np.float32)
    ps.scatter_mul(f"{name}/3d", np.array([[3], [1]], np.int32), upd)
    three[[1, 3]] *= 0.5
    np.testing.assert_array_equal(ps.read(f"{name}/3d"), three)


def test_scatter_zero_indices_changes_nothing_but_counts(ps: Client, name: str) -> None:
    """Zero indices are a valid update that writes no row (the version still counts the write)."""
    value = table(ps, name, (3, 2))
    info = ps.scatter_add(name, np.zeros((0,), np.int32), np.zeros((0, 2), np.float32))
    assert info.version == 2
    np.testing.assert_array_equal(ps.read(name), value)


def test_scatter_errors_change_nothing(ps: Client, name: str) -> None:
    """Bad indices, update shapes and dtypes: TF's texts, INVALID_ARGUMENT, the table untouched (even the
    rows before the bad index, which TF's CPU loop would have written)."""
    value = table(ps, name, (6, 2))
    with pytest.raises(InvalidArgumentError, match=r"indices\[2\] = 6 is not in \[0, 6\)"):
        ps.scatter_add(name, [0, 1, 6], np.ones((3, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"indices\[1,0\] = 7 is not in \[0, 6\)"):
        ps.scatter_update(name, np.array([[0], [7]]), np.ones((2, 1, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"indices\[0\] = -1 is not in \[0, 6\)"):
        ps.scatter_update(name, [-1], np.ones((1, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"Must have updates.shape = indices.shape \+ params"):
        ps.scatter_add(name, [0, 1], np.ones((2, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match="DType of scatter resource and updates does not match"):
        ps.scatter_add(name, [0], np.ones((1, 2), np.float64))
    with pytest.raises(InvalidArgumentError, match="'Tindices' of float64 is not in the list"):
        ps.scatter_add(name, np.array([0.0]), np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(ps.read(name), value)
    assert ps.info(name).version == 1
    ps.create(f"{name}/s", value=np.float32(1))
    with pytest.raises(InvalidArgumentError, match=r"params must be at least 1-D, got shape \[\]"):
        ps.scatter_add(f"{name}/s", [0], np.float32(1))
    ps.create(f"{name}/u", dtype="float32", shape=(3,))
    with pytest.raises(FailedPreconditionError, match=f"Attempting to use uninitialized value {name}/u"):
        ps.scatter_add(f"{name}/u", [0], np.float32(1))
    ps.create(f"{name}/b", value=np.zeros(3, bool))
    with pytest.raises(InvalidArgumentError, match="no kernel for dtype bool"):
        ps.scatter_add(f"{name}/b", [0], np.bool_(True))
    ps.scatter_update(f"{name}/b", [1], np.bool_(True))  # update takes every dtype
    np.testing.assert_array_equal(ps.read(f"{name}/b"), [False, True, False])
    ps.create(f"{name}/c", value=np.zeros(2, np.complex64))
    with pytest.raises(InvalidArgumentError, match="no kernel for dtype complex64"):
        ps.scatter_max(f"{name}/c", [0], np.complex64(1))


def test_scatter_div_integers_truncate_and_refuse_zero(ps: Client, name: str) -> None:
    """Integer scatter_div divides as C++ does (towards zero); a zero divisor is refused, nothing changes."""
    ps.create(name, value=np.array([-7, 7, 9], np.int32))
    ps.scatter_div(name, [0, 1], np.array([2, -2], np.int32))
    np.testing.assert_array_equal(ps.read(name), [-3, -3, 9])
    with pytest.raises(InvalidArgumentError, match="Integer division by zero"):
        ps.scatter_div(name, [2], np.array([0], np.int32))
    np.testing.assert_array_equal(ps.read(name), [-3, -3, 9])


def test_scatter_nd(ps: Client, name: str) -> None:
    """ScatterNd: slices of depth indices.shape[-1], duplicates accumulate; TF's shape and bound texts."""
    value = table(ps, name, (4, 3, 2))
    idx = np.array([[1, 2], [0, 0], [1, 2]], np.int64)
    upd = np.ones((3, 2), np.float32)
    ps.scatter_nd_add(name, idx, upd)
    expected = value.copy()
    expected[1, 2] += 2
    expected[0, 0] += 1
    np.testing.assert_array_equal(ps.read(name), expected)
    ps.scatter_nd_update(name, np.array([[3]], np.int32), np.zeros((1, 3, 2), np.float32))
    expected[3] = 0
    ps.scatter_nd_sub(name, np.array([[0, 1, 1]]), np.array([5], np.float32))
    expected[0, 1, 1] -= 5
    np.testing.assert_array_equal(ps.read(name), expected)
    with pytest.raises(InvalidArgumentError, match=r"indices\[1\] = \[4, 1\] does not index into shape"):
        ps.scatter_nd_add(name, np.array([[0, 0], [4, 1]]), upd[:2])
    with pytest.raises(
        InvalidArgumentError,
        match=r"Dimensions \[0,1\) of indices\[shape=\[2,2\]\] = \[2\] must match dimensions \[0,1\) of "
        r"updates\[shape=\[3,2\]\] = \[3\]",
    ):
        ps.scatter_nd_add(name, np.array([[0, 0], [1, 1]]), upd)
    with pytest.raises(InvalidArgumentError, match=r"Dimensions \[2,3\) of input\[shape=\[4,3,2\]\] must"):
        ps.scatter_nd_add(name, np.array([[0, 0]]), np.ones((1, 3), np.float32))
    np.testing.assert_array_equal(ps.read(name), expected)


def test_locked_scatter_add_loses_nothing(ps: Client, name: str) -> None:
    """20 threads x locked scatter_add of ones on the same rows = exactly 20 on each row."""
    ps.create(name, value=np.zeros((100, 4), np.float32))
    rows = np.array([3, 50, 99, 3], np.int64)
    ones = np.ones((4, 4), np.float32)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            ps.scatter_add(name, rows, ones, use_locking=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    value = ps.read(name)
    np.testing.assert_array_equal(value[3], np.full(4, 40, np.float32))
    np.testing.assert_array_equal(value[[50, 99]], np.full((2, 4), 20, np.float32))
    assert value.sum() == 20 * 16
    assert ps.info(name).version == 21


def test_python_values_take_the_variables_dtype(ps: Client, name: str) -> None:
    """Python numbers and lists become the variable's dtype losslessly; lossy ones are refused."""
    ps.create(name, value=np.zeros((3, 2), np.int64))
    ps.scatter_add(name, [0, 2], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ps.read(name), [[1, 2], [0, 0], [3, 4]])
    with pytest.raises(InvalidArgumentError, match="without loss"):
        ps.scatter_add(name, [0], [[0.5, 1]])


def test_rows_in_pipelines(ps: Client, name: str) -> None:
    """Row ops queue in pipelines (in order and atomic) and give their single calls' results."""
    value = table(ps, name, (5, 2))
    results = (
        ps.pipeline()
        .scatter_add(name, [1], np.ones((1, 2), np.float32))
        .gather(name, [1, 0])
        .scatter_update(name, [9], np.ones((1, 2), np.float32))
        .gather(name, [4])
        .execute
    )
    with pytest.raises(Exception) as caught:
        results()
    found = caught.value.results  # type: ignore[attr-defined]
    assert isinstance(found[0], VariableInfo)
    np.testing.assert_array_equal(found[1], [value[1] + 1, value[0]])
    assert isinstance(found[2], InvalidArgumentError)
    np.testing.assert_array_equal(found[3], value[[4]])
    atomic = ps.pipeline(atomic=True)
    atomic.scatter_add(name, [0], np.ones((1, 2), np.float32)).gather(name, [0])
    info, rows = atomic.execute()
    assert info.version == 3
    np.testing.assert_array_equal(rows, [value[0] + 1])
    failing = ps.pipeline(atomic=True)
    failing.scatter_add(name, [0], np.ones((1, 2), np.float32))
    failing.scatter_add(name, [7], np.ones((1, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"operation 1 .*indices\[0\] = 7 is not in \[0, 5\)"):
        failing.execute()
    np.testing.assert_array_equal(ps.gather(name, [0]), [value[0] + 1])


def test_scatter_nd_on_bools(ps: Client, name: str) -> None:
    """ScatterNdAdd and ScatterNdSub run on bools, as TF's: a sum is a logical or, a difference a logical
    xor, duplicates applied in order (ScatterAdd refuses bool)."""
    ps.create(name, value=np.array([False, False, True, True]))
    idx = np.array([[0], [1], [2], [3], [1]])
    upd = np.array([False, True, False, True, True])
    np.testing.assert_array_equal(
        ps.scatter_nd_add(name, idx, upd, read_value=True), [False, True, True, True]
    )
    ps.assign(name, np.array([False, False, True, True]))
    np.testing.assert_array_equal(
        ps.scatter_nd_sub(name, idx, upd, read_value=True), [False, False, True, False]
    )


def test_unlocked_concurrent_updates_never_break_the_table(ps: Client, name: str) -> None:
    """Unlocked scatter_adds race as TF's do (an update may be lost), but never fail, change the shape or
    write outside their rows; every write is counted in the version."""
    ps.create(name, value=np.zeros((50, 3), np.float32))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                ps.scatter_add(name, [7, 9], np.ones((2, 3), np.float32))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    value = ps.read(name)
    assert value.shape == (50, 3) and ps.info(name).version == 41
    assert ((value[[7, 9]] >= 1) & (value[[7, 9]] <= 40)).all()
    np.testing.assert_array_equal(np.delete(value, [7, 9], axis=0), 0)
