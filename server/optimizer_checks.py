"""The checks of TensorFlow's training ops (training_ops.cc), in TF's order and with its texts: dtypes the
kernel is registered for, initialized variables, slots of the variable's dtype and shape, scalar
hyperparameters (and SparseApplyFtrl's values), the shapes of grad and indices. Nothing here computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import Shape, dtype_of, format_shape
from tensorps.server.ops import InvalidArgument
from tensorps.server.optimizers import SPECS, Flags, Spec
from tensorps.server.rows import check_indices_dtype, check_initialized, check_kernel_dtype

Array = np.ndarray[Any, Any]

# Scalar inputs that TF's texts call by a longer name.
_SCALAR_TEXT = {"l1": "l1 regularization strength", "l2": "l2 regularization strength"}


class Operand(NamedTuple):
    """A variable the op reads and writes: its name, dtype name, shape and initialized flag."""

    name: str
    dtype: str
    shape: Shape | None
    initialized: bool


# ---- checks ---------------------------------------------------------------------------------------


def check(
    kind: str,
    var: Operand,
    slots: Sequence[Operand],
    hyper: Mapping[str, Array],
    *,
    grad: Array,
    indices: Array | None,
    flags: Flags | None = None,
) -> None:
    """Every check of the op, in TF's order, with its texts; raises InvalidArgument/FailedPrecondition."""
    spec = SPECS[kind]
    flags = flags or Flags()
    if len(slots) != len(spec.slots):
        raise InvalidArgument(f"{spec.op} takes slot variables {', '.join(spec.slots) or 'none'}")
    check_kernel_dtype(spec.op, var.name, var.dtype, spec.dtypes)
    for operand in (var, *slots):
        check_initialized(operand.name, operand.initialized)
    numpy_dtype = dtype_of(var.dtype).numpy
    for what, operand in zip(spec.slots, slots, strict=True):
        if operand.dtype != var.dtype:
            raise InvalidArgument(
                f"{spec.op}: {what} '{operand.name}' has dtype {operand.dtype} but var '{var.name}' has "
                f"dtype {var.dtype}"
            )
    for what, value in (*hyper.items(), (spec.grad, grad)):
        if value.dtype != numpy_dtype:
            raise InvalidArgument(
                f"{spec.op}: {what} has dtype {dtype_of(value.dtype).name} but var '{var.name}' has dtype "
                f"{var.dtype}; nothing is cast"
            )
    shape = var.shape
    assert shape is not None  # initialized
    if spec.sparse:
        _check_sparse(
            spec,
            var,
            slots,
            hyper,
            grad=grad,
            indices=indices,
            multiply_linear_by_lr=flags.multiply_linear_by_lr,
        )
        return
    for what in spec.hyper:
        _check_scalar(what, hyper[what])
    for what, operand in zip(spec.slots, slots, strict=True):
        _same_shape(what, shape, operand.shape)
    _same_shape(spec.grad, shape, grad.shape)


def _check_scalar(what: str, value: Array) -> None:
    if value.ndim != 0:
        raise InvalidArgument(f"{_SCALAR_TEXT.get(what, what)} is not a scalar: {format_shape(value.shape)}")


def _check_sparse_ftrl(hyper: Mapping[str, Array], *, multiply_linear_by_lr: bool) -> None:
    """SparseApplyFtrl checks its hyperparameters' values too (the dense kernel does not)."""
    lr, l1, l2, lr_power = (hyper[k] for k in ("lr", "l1", "l2", "lr_power"))
    if lr.ndim or not (lr >= 0 if multiply_linear_by_lr else lr > 0):
        raise InvalidArgument(
            "lr is not a positive scalar (or zero if multiply_linear_by_lr is set): " + format_shape(lr.shape)
        )
    for what, value in (("l1", l1), ("l2", l2)):
        if value.ndim or not value >= 0:
            raise InvalidArgument(
                f"{_SCALAR_TEXT[what]} is not a non-negative scalar: {format_shape(value.shape)}"
            )
    if lr_power.ndim or not lr_power <= 0:
        raise InvalidArgument(f"lr_power is not a non-positive scalar: {format_shape(lr_power.shape)}")


def _same_shape(what: str, var: Shape, other: Shape | None) -> None:
    if other != var:
        # TF's text, without a space between "shape" and the first shape.
        raise InvalidArgument(
            f"var and {what} do not have the same shape{format_shape(var)} {format_shape(other)}"
        )


def _check_sparse(
    spec: Spec,
    var: Operand,
    slots: Sequence[Operand],
    hyper: Mapping[str, Array],
    *,
    grad: Array,
    indices: Array | None,
    multiply_linear_by_lr: bool,
) -> None:
    assert var.shape is not None
    if indices is None:
        raise InvalidArgument(f"{spec.op} needs indices")
    check_indices_dtype(indices)
    for what, operand in zip(spec.slots, slots, strict=True):
        _same_shape(what, var.shape, operand.shape)
    if len(var.shape) < 1:
        raise InvalidArgument("var must be at least 1 dimensional")
    if spec.op == "ResourceSparseApplyFtrl":
        _check_sparse_ftrl(hyper, multiply_linear_by_lr=multiply_linear_by_lr)
    for what in spec.hyper:
        _check_scalar(what, hyper[what])
    if indices.ndim != 1:
        raise InvalidArgument("indices must be one-dimensional")
    if grad.ndim < 1 or grad.shape[0] != indices.shape[0]:
        raise InvalidArgument("grad must be the same size as indices in the first dimension.")
    if grad.ndim != len(var.shape):
        raise InvalidArgument(
            f"var and grad must have the same rank: var {format_shape(var.shape)}, grad "
            f"{format_shape(grad.shape)}"
        )
    for d in range(1, len(var.shape)):
        if var.shape[d] != grad.shape[d]:
            raise InvalidArgument(f"var and grad must match in dimension {d}")
    flat = indices.astype(np.int64, copy=False)
    bad = np.flatnonzero((flat < 0) | (flat >= var.shape[0]))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(f"Index {int(flat[i])} at offset {i} in indices is out of range")
