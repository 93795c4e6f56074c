"""TensorFlow's training ops as pure functions: ResourceApply* and ResourceSparseApply* (training_ops.cc).

Each op is a `Spec`: its slot variables, its scalar hyperparameters (with the names TF's error texts use),
the dtypes TF registers its CPU kernel for, and the arithmetic in the order of TF's CPU kernel. The order
matters for bit-exactness: every Eigen expression node rounds to T, as every numpy operation here does
(`grad * lr * rsqrt(accum)` is `(grad * lr) * rsqrt(accum)`, never `grad * (lr * rsqrt(accum))`).

Dense ops compute fresh arrays for the variable and its slots (the caller publishes them). Sparse ops
compute the new values of the touched rows only, from their old values; updates of a row that repeats in
`indices` are applied one after another in index order (TF's loop; its multi-threaded shards would race).

float16 and bfloat16: Eigen evaluates sqrt, rsqrt and pow in float32 and rounds once, as here. float32
pow is computed in float64 and rounded, as TF's scalar loops do. The checks are optimizer_checks.py's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import Shape
from tensorps.server.rows import rounds

Array = np.ndarray[Any, Any]
Hyper = Mapping[str, Any]  # hyperparameter name -> numpy scalar of the variable's dtype

_FLOATS = ("float16", "bfloat16", "float32", "float64")
_COMPLEX = ("complex64", "complex128")


class Spec(NamedTuple):
    op: str  # TF's op name
    slots: tuple[str, ...]  # slot variables after var, as TF names its inputs
    hyper: tuple[str, ...]  # scalar inputs in the raw op's order
    dtypes: tuple[str, ...]
    grad: str = "grad"  # the gradient input's name ("delta" for gradient descent)
    sparse: bool = False


SPECS: dict[str, Spec] = {
    "apply_gradient_descent": Spec(
        "ResourceApplyGradientDescent", (), ("alpha",), _FLOATS + _COMPLEX, grad="delta"
    ),
    "apply_momentum": Spec("ResourceApplyMomentum", ("accum",), ("lr", "momentum"), _FLOATS + _COMPLEX),
    "apply_adagrad": Spec("ResourceApplyAdagrad", ("accum",), ("lr",), _FLOATS + _COMPLEX),
    "apply_adam": Spec(
        "ResourceApplyAdam",
        ("m", "v"),
        ("beta1_power", "beta2_power", "lr", "beta1", "beta2", "epsilon"),
        _FLOATS + _COMPLEX,
    ),
    "apply_rms_prop": Spec(
        "ResourceApplyRMSProp", ("ms", "mom"), ("lr", "rho", "momentum", "epsilon"), _FLOATS + _COMPLEX
    ),
    "apply_ftrl": Spec("ResourceApplyFtrl", ("accum", "linear"), ("lr", "l1", "l2", "lr_power"), _FLOATS),
    "sparse_apply_adagrad": Spec(
        "ResourceSparseApplyAdagrad", ("accum",), ("lr",), _FLOATS + _COMPLEX, sparse=True
    ),
    "sparse_apply_momentum": Spec(
        "ResourceSparseApplyMomentum", ("accum",), ("lr", "momentum"), _FLOATS + _COMPLEX, sparse=True
    ),
    "sparse_apply_ftrl": Spec(
        "ResourceSparseApplyFtrl", ("accum", "linear"), ("lr", "l1", "l2", "lr_power"), _FLOATS, sparse=True
    ),
    "sparse_apply_rms_prop": Spec(
        "ResourceSparseApplyRMSProp",
        ("ms", "mom"),
        ("lr", "rho", "momentum", "epsilon"),
        ("float16", "float32", "float64", *_COMPLEX),
        sparse=True,
    ),
}


class Flags(NamedTuple):
    use_nesterov: bool = False
    update_slots: bool = True
    multiply_linear_by_lr: bool = False


# ---- arithmetic helpers: each rounds to T once, as an Eigen node does ------------------------------


def _low(x: Array) -> bool:
    return x.dtype.kind not in "fc" or x.dtype.itemsize < 4


def _sqrt(x: Array) -> Array:
    if _low(x):
        return np.sqrt(x.astype(np.float32)).astype(x.dtype)
    return np.sqrt(x)


def _rsqrt(x: Array) -> Array:
    if _low(x):
        return (np.float32(1) / np.sqrt(x.astype(np.float32))).astype(x.dtype)
    one = np.ones((), x.dtype)
    result: Array = one / np.sqrt(x)
    return result


def _pow(x: Array, p: Any) -> Array:
    x = np.asarray(x)
    if x.dtype.itemsize <= 4:
        narrow: Array = np.power(x.astype(np.float64), np.float64(p)).astype(x.dtype)
        return narrow
    wide: Array = np.power(x, p)
    return wide


def _t(value: float, like: Array) -> Any:
    return np.asarray(value, like.dtype)[()]


# ---- dense ----------------------------------------------------------------------------------------


def apply_dense(
    kind: str, var: Array, slots: Sequence[Array], h: Hyper, *, grad: Array, flags: Flags
) -> list[Array]:
    """New values of [var, *slots] (fresh arrays; the inputs are not changed)."""
    with np.errstate(all="ignore"):
        return _DENSE[kind](var, list(slots), h, grad, flags)


def _gradient_descent(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    return [var - grad * h["alpha"]]


def _momentum(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    lr, momentum = h["lr"], h["momentum"]
    accum = s[0] * momentum + grad
    if f.use_nesterov:
        return [var - (grad * lr + accum * momentum * lr), accum]
    return [var - accum * lr, accum]


def _adagrad(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    accum = s[0] + np.square(grad) if f.update_slots else s[0].copy()
    return [var - grad * h["lr"] * _rsqrt(accum), accum]


def _adam(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    one = _t(1, var)
    beta1, beta2, epsilon = h["beta1"], h["beta2"], h["epsilon"]
    # TF computes the step size as a scalar of T first: lr * sqrt(1 - beta2^t) / (1 - beta1^t).
    alpha = h["lr"] * _sqrt(np.asarray(one - h["beta2_power"]))[()] / (one - h["beta1_power"])
    m = s[0] + (grad - s[0]) * (one - beta1)
    v = s[1] + (np.square(grad) - s[1]) * (one - beta2)
    if f.use_nesterov:
        new = var - ((grad * (one - beta1) + beta1 * m) * alpha) / (_sqrt(v) + epsilon)
    else:
        new = var - (m * alpha) / (_sqrt(v) + epsilon)
    return [new, m, v]


def _rms_prop(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    one = _t(1, var)
    ms = s[0] + (np.square(grad) - s[0]) * (one - h["rho"])
    mom = s[1] * h["momentum"] + (grad * h["lr"]) / _sqrt(ms + h["epsilon"])
    return [var - mom, ms, mom]


def _ftrl_power(x: Array, lr_power: Any) -> Array:
    return _sqrt(x) if lr_power == _t(-0.5, x) else _pow(x, -lr_power)


def _ftrl(var: Array, s: list[Array], h: Hyper, grad: Array, f: Flags) -> list[Array]:
    accum, linear = s
    lr, l1, l2, lr_power = h["lr"], h["l1"], h["l2"], h["lr_power"]
    two = _t(2, var)
    new_accum = accum + np.square(grad)
    sigma = _ftrl_power(new_accum, lr_power) - _ftrl_power(accum, lr_power)
    if f.multiply_linear_by_lr:
        linear = linear + (grad * lr - sigma * var)
        limit = l1 * lr
        quadratic = _ftrl_power(new_accum, lr_power) + two * l2 * lr
    else:
        linear = linear + (grad - sigma / lr * var)
        limit = l1
        quadratic = _ftrl_power(new_accum, lr_power) / lr + two * l2
    adjust = np.maximum(np.minimum(linear, limit), -limit)
    return [(adjust - linear) / quadratic, accum + np.square(grad), linear]


_DENSE: dict[str, Callable[[Array, list[Array], Hyper, Array, Flags], list[Array]]] = {
    "apply_gradient_descent": _gradient_descent,
    "apply_momentum": _momentum,
    "apply_adagrad": _adagrad,
    "apply_adam": _adam,
    "apply_rms_prop": _rms_prop,
    "apply_ftrl": _ftrl,
}


# ---- sparse ---------------------------------------------------------------------------------------


class SparsePlan(NamedTuple):
    """The unique rows a sparse apply touches (sorted) and, per gradient row, its row's position."""

    rows: Array
    where: Array


def plan_sparse(indices: Array) -> SparsePlan:
    rows, where = np.unique(indices.astype(np.int64, copy=False), return_inverse=True)
    return SparsePlan(rows.astype(np.int64), where.reshape(-1).astype(np.int64))


def apply_sparse(
    kind: str, plan: SparsePlan, old: Sequence[Array], h: Hyper, *, grad: Array, flags: Flags
) -> list[Array]:
    """New values of the touched rows of [var, *slots]; `old` holds their current rows as (rows, inner)
    matrices, `grad` is (len(indices), inner)."""
    new = [o.copy() for o in old]
    inner = grad.shape[1] if grad.ndim == 2 else 1
    step = _SPARSE[kind]
    with np.errstate(all="ignore"):
        for group in rounds(plan.where):
            at = plan.where[group]
            rows = [n[at] for n in new]
            for n, value in zip(new, step(rows, h, grad[group], flags, inner), strict=True):
                n[at] = value
    return new


def _sparse_adagrad(r: list[Array], h: Hyper, g: Array, f: Flags, inner: int) -> list[Array]:
    var, accum = r
    lr = h["lr"]
    if inner > 1:
        if f.update_slots:
            accum = accum + np.square(g)
        return [var - lr * g * _rsqrt(accum), accum]
    if f.update_slots:
        accum = accum + g * g
    return [var - lr * g / _sqrt(accum), accum]


def _sparse_momentum(r: list[Array], h: Hyper, g: Array, f: Flags, inner: int) -> list[Array]:
    var, accum = r
    lr, momentum = h["lr"], h["momentum"]
    accum = accum * momentum + g
    if f.use_nesterov:
        return [var - (lr * g + lr * accum * momentum), accum]
    return [var - lr * accum, accum]


def _sparse_rms_prop(r: list[Array], h: Hyper, g: Array, f: Flags, inner: int) -> list[Array]:
    var, ms, mom = r
    one = _t(1, var)
    ms = ms * h["rho"] + np.square(g) * (one - h["rho"])
    mom = mom * h["momentum"] + _rsqrt(ms + h["epsilon"]) * h["lr"] * g
    return [var - mom, ms, mom]


def _sparse_ftrl(r: list[Array], h: Hyper, g: Array, f: Flags, inner: int) -> list[Array]:
    if inner > 1:
        var, accum, linear = r
        new_var, new_accum, new_linear = _ftrl(var, [accum, linear], h, g, f)
        return [new_var, new_accum, new_linear]
    # TF's scalar loop for one-element rows: pow even for lr_power -0.5, sigma divided by lr first.
    var, accum, linear = r
    lr, l1, l2, lr_power = h["lr"], h["l1"], h["l2"], h["lr_power"]
    two = _t(2, var)
    updated = accum + g * g
    sigma = _pow(updated, -lr_power) - _pow(accum, -lr_power)
    if f.multiply_linear_by_lr:
        linear = linear + g * lr - sigma * var
        root = _sqrt(updated) if lr_power == _t(-0.5, var) else _pow(updated, -lr_power)
        quadratic = root + two * l2 * lr
        limit = l1 * lr
    else:
        sigma = sigma / lr
        linear = linear + g - sigma * var
        root = _sqrt(updated) if lr_power == _t(-0.5, var) else _pow(updated, -lr_power)
        quadratic = root / lr + two * l2
        limit = l1
    adjust = np.maximum(np.minimum(linear, limit), -limit)
    return [(adjust - linear) / quadratic, updated, linear]


_SPARSE: dict[str, Callable[[list[Array], Hyper, Array, Flags, int], list[Array]]] = {
    "sparse_apply_adagrad": _sparse_adagrad,
    "sparse_apply_momentum": _sparse_momentum,
    "sparse_apply_rms_prop": _sparse_rms_prop,
    "sparse_apply_ftrl": _sparse_ftrl,
}


def inner_size(shape: Shape) -> int:
    return math.prod(shape[1:])
