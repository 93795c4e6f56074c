"""TensorFlow's own test cases for these kernels, translated: scatter_ops_test.py (variable-rank updates
against numpy references, repeated indices, bool updates, out-of-range indices), resource_variable_ops_test
and gather tests (gather with batch_dims), training_ops_test.py (SGD, Adagrad, sparse Adagrad, Momentum
against their numpy formulas) — through the real server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tensorps.client import Client, InvalidArgumentError

Array = np.ndarray[Any, Any]


def _numpy_update(ref: Array, indices: Array, updates: Array) -> Array:
    for i, index in np.ndenumerate(indices):
        ref[index] = updates[i]
    return ref


def _numpy_op(op: Callable[[Array, Array], Array]) -> Callable[[Array, Array, Array], Array]:
    def apply(ref: Array, indices: Array, updates: Array) -> Array:
        for i, index in np.ndenumerate(indices):
            ref[index] = op(ref[index], updates[i])
        return ref

    return apply


REFERENCES = {
    "update": _numpy_update,
    "add": _numpy_op(np.add),
    "sub": _numpy_op(np.subtract),
    "mul": _numpy_op(np.multiply),
    "div": _numpy_op(np.divide),
    "min": _numpy_op(np.minimum),
    "max": _numpy_op(np.maximum),
}


@pytest.mark.parametrize("kind", sorted(REFERENCES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_variable_rank_update(ps: Client, name: str, kind: str, dtype: Any) -> None:
    """scatter_ops_test._VariableRankTest: tables of rank 1-3, indices of rank 0-2 (repeated), vs numpy."""
    rng = np.random.default_rng(8)
    for case, (shape, ishape) in enumerate(
        (((10,), (3,)), ((10, 2), ()), ((10, 2, 3), (2, 2)), ((5, 3), (7,)))
    ):
        table = (rng.random(shape) * 4 + 1).astype(dtype)
        indices = rng.integers(0, shape[0], ishape).astype(np.int32)
        updates = (rng.random(ishape + shape[1:]) * 4 + 1).astype(dtype)
        if kind == "div" and np.dtype(dtype).kind == "i":
            updates = np.maximum(updates, 1)
        var = f"{name}/{case}"
        ps.create(var, value=table)
        getattr(ps, f"scatter_{kind}")(var, indices, updates)
        expected = REFERENCES[kind](table.copy(), indices, updates)
        if kind == "div" and np.dtype(dtype).kind == "i":
            expected = _int_div(table.copy(), indices, updates)
        np.testing.assert_allclose(ps.read(var), expected, rtol=1e-6)


def _int_div(ref: Array, indices: Array, updates: Array) -> Array:
    for i, index in np.ndenumerate(indices):
        ref[index] = np.trunc(ref[index] / updates[i]).astype(ref.dtype)
    return ref


def test_boolean_scatter_update(ps: Client, name: str) -> None:
    """scatter_ops_test.testBooleanScatterUpdate."""
    ps.create(name, value=np.array([False, False]))
    ps.scatter_update(name, 1, np.True_)
    ps.scatter_update(name, [0], np.array([False]))
    np.testing.assert_array_equal(ps.read(name), [False, True])


def test_scatter_out_of_range(ps: Client, name: str) -> None:
    """scatter_ops_test.testScatterOutOfRangeCpu: the first bad index in order is named, for every kind."""
    params = np.array([1, 2, 3, 4, 5, 6], np.float32)
    updates = np.array([-3, -4, -5], np.float32)
    ps.create(name, value=params)
    for kind in REFERENCES:
        op = getattr(ps, f"scatter_{kind}")
        op(name, np.array([2, 0, 5], np.int32), updates if kind != "div" else -updates)
        with pytest.raises(
            InvalidArgumentError, match=r"indices\[0\] = \[-1\] does not index|indices\[0\] = -1 is"
        ):
            op(name, np.array([-1, 0, 5], np.int32), updates)
        with pytest.raises(InvalidArgumentError, match=r"indices\[2\] = 6 is not in \[0, 6\)"):
            op(name, np.array([2, 0, 6], np.int32), updates)


def test_gather_with_batch_dims(ps: Client, name: str) -> None:
    """gather_op_test.testBatchDims: tf.gather(params, indices, axis=batch_dims, batch_dims=batch_dims)."""
    params = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)
    ps.create(name, value=params)
    indices = np.array([[2, 0], [1, 1]], np.int32)
    expected = np.stack([params[b][indices[b]] for b in range(2)])
    np.testing.assert_array_equal(ps.gather(name, indices, batch_dims=1), expected)
    indices2 = np.array([[[3], [0], [1]], [[2], [2], [0]]], np.int64)
    expected2 = np.stack([np.stack([params[b, c][indices2[b, c]] for c in range(3)]) for b in range(2)])
    np.testing.assert_array_equal(ps.gather(name, indices2, batch_dims=2), expected2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_training_ops_formulas(ps: Client, name: str, dtype: Any) -> None:
    """training_ops_test: ApplyGradientDescent, ApplyAdagrad, SparseApplyAdagrad and ApplyMomentum against
    their numpy formulas (TF's tests allow the same tolerances)."""
    rng = np.random.default_rng(4)
    x = np.arange(100).astype(dtype)
    y = np.arange(1, 101).astype(dtype)
    lr = np.asarray(2.0, dtype)[()]
    ps.create(f"{name}/sgd", value=x)
    ps.apply_gradient_descent(f"{name}/sgd", lr, y)
    np.testing.assert_allclose(ps.read(f"{name}/sgd"), x - lr * y, rtol=1e-3)
    grad = rng.random(100).astype(dtype)
    accum = (rng.random(100) + 1).astype(dtype)
    ps.create(f"{name}/ada", value=x)
    ps.create(f"{name}/ada/accum", value=accum)
    ps.apply_adagrad(f"{name}/ada", f"{name}/ada/accum", lr, grad)
    new_accum = accum + grad * grad
    np.testing.assert_allclose(ps.read(f"{name}/ada/accum"), new_accum, rtol=1e-3)
    np.testing.assert_allclose(ps.read(f"{name}/ada"), x - lr * grad / np.sqrt(new_accum), rtol=1e-3)
    table = rng.random((20, 3)).astype(dtype)
    acc = (rng.random((20, 3)) + 1).astype(dtype)
    rows = np.array([0, 5, 19], np.int64)
    g = rng.random((3, 3)).astype(dtype)
    ps.create(f"{name}/sada", value=table)
    ps.create(f"{name}/sada/accum", value=acc)
    ps.sparse_apply_adagrad(f"{name}/sada", f"{name}/sada/accum", lr, g, rows)
    expected_acc = acc.copy()
    expected_acc[rows] += g * g
    expected = table.copy()
    expected[rows] -= lr * g / np.sqrt(expected_acc[rows])
    np.testing.assert_allclose(ps.read(f"{name}/sada"), expected, rtol=2e-3, atol=1e-3)
    mom = np.asarray(0.5, dtype)[()]
    ps.create(f"{name}/mom", value=x)
    ps.create(f"{name}/mom/accum", value=np.zeros(100, dtype))
    ps.apply_momentum(f"{name}/mom", f"{name}/mom/accum", lr, grad, mom)
    np.testing.assert_allclose(ps.read(f"{name}/mom"), x - lr * grad, rtol=1e-3)
