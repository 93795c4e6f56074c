"""Expected values of the row and training kernels, computed by TensorFlow (run with a TF install):

    python scripts/make_kernel_fixtures.py   # writes tests/fixtures/kernels.npz

Fixed inputs (seeded) for each op and dtype; the tests (test_kernels.py) run tensorps' kernels on the same
inputs and compare bit for bit, or in ulps where a kernel cannot match. bfloat16 arrays are stored as their
uint16 bits under "<key>#bfloat16". The tests do not need TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

R = tf.raw_ops
BF16 = tf.bfloat16.as_numpy_dtype
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "kernels.npz")
data: dict[str, Any] = {}
cases: list[str] = []


def put(key: str, array: Any) -> None:
    array = np.asarray(array)
    if array.dtype == BF16:
        data[key + "#bfloat16"] = array.view(np.uint16)
    else:
        data[key] = array


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, positive: bool = False) -> Any:
    dt = np.dtype(dtype)
    if dt.kind == "c":
        x = rng.uniform(0.1, 2, shape) + 1j * rng.uniform(-1, 1, shape)
    elif dt.kind in "iu":
        x = rng.integers(1 if positive else (0 if dt.kind == "u" else -5), 9, shape)
    elif dt.kind == "b":
        x = rng.integers(0, 2, shape).astype(bool)
    else:
        x = rng.uniform(0.1, 2, shape) if positive else rng.uniform(-2, 2, shape)
    return np.asarray(x).astype(dtype)


def case(name: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    cases.append(name)
    for key, value in inputs.items():
        put(f"{name}/in/{key}", value)
    for key, value in outputs.items():
        put(f"{name}/out/{key}", value)


ROW_DTYPES = [np.float32, np.float64, np.float16, BF16, np.int32, np.int64, np.uint8, np.complex64, np.bool_]


def scatters(rng: np.random.Generator) -> None:
    raw = {
        "update": R.ResourceScatterUpdate,
        "add": R.ResourceScatterAdd,
        "sub": R.ResourceScatterSub,
        "mul": R.ResourceScatterMul,
        "div": R.ResourceScatterDiv,
        "min": R.ResourceScatterMin,
        "max": R.ResourceScatterMax,
    }
    layouts = [((10, 3), (7,)), ((5, 2, 3), (2, 3)), ((8,), (6,))]
    for kind, fn in raw.items():
        for dtype in ROW_DTYPES:
            dt = np.dtype(dtype)
            if (kind in ("min", "max") and dt.kind == "c") or (dt.kind == "b" and kind != "update"):
                continue
            for li, (shape, ishape) in enumerate(layouts):
                for idt in (np.int32, np.int64):
                    table = rand(rng, shape, dtype, positive=kind == "div")
                    indices = rng.integers(0, shape[0], ishape).astype(idt)
                    indices.reshape(-1)[-1] = indices.reshape(-1)[0]  # a duplicate
                    updates = rand(rng, ishape + shape[1:], dtype, positive=kind in ("div", "mul"))
                    for scalar in (False, True):
                        upd = updates.reshape(-1)[0] if scalar else updates
                        v = tf.Variable(table)
                        fn(resource=v.handle, indices=indices, updates=upd)
                        name = f"scatter_{kind}/{dt.name}/{li}/{np.dtype(idt).name}/{int(scalar)}"
                        case(
                            name,
                            {"table": table, "indices": indices, "updates": np.asarray(upd, dtype)},
                            {"table": v.numpy()},
                        )


def scatter_nds(rng: np.random.Generator) -> None:
    raw = {"update": R.ResourceScatterNdUpdate, "add": R.ResourceScatterNdAdd, "sub": R.ResourceScatterNdSub}
    layouts = [((6, 4), (5, 1)), ((4, 3, 2), (3, 2)), ((4, 3, 2), (2, 2, 3)), ((5,), (4, 1))]
    for kind, fn in raw.items():
        for dtype in ROW_DTYPES:
            dt = np.dtype(dtype)
            for li, (shape, ishape) in enumerate(layouts):
                depth = ishape[-1]
                table = rand(rng, shape, dtype)
                cols = [rng.integers(0, shape[d], ishape[:-1]) for d in range(depth)]
                indices = np.stack(cols, axis=-1).astype(np.int64)
                indices.reshape(-1, depth)[-1] = indices.reshape(-1, depth)[0]
                updates = rand(rng, ishape[:-1] + shape[depth:], dtype)
                v = tf.Variable(table)
                fn(ref=v.handle, indices=indices, updates=updates)
                case(
                    f"scatter_nd_{kind}/{dt.name}/{li}",
                    {"table": table, "indices": indices, "updates": updates},
                    {"table": v.numpy()},
                )


def gathers(rng: np.random.Generator) -> None:
    for dtype in (np.float32, np.int64, BF16, np.bool_):
        dt = np.dtype(dtype)
        table = rand(rng, (4, 5, 3), dtype)
        for bd, ishape in ((0, (2, 3)), (1, (4, 2)), (2, (4, 5, 2)), (0, ())):
            limit = table.shape[bd]
            indices = rng.integers(0, limit, ishape).astype(np.int32)
            v = tf.Variable(table)
            out = R.ResourceGather(resource=v.handle, indices=indices, batch_dims=bd, dtype=tf.as_dtype(dt))
            case(
                f"gather/{dt.name}/{bd}/{len(ishape)}",
                {"table": table, "indices": indices, "batch_dims": np.int64(bd)},
                {"rows": out.numpy()},
            )


OPT_DTYPES = [np.float32, np.float64, np.float16, BF16, np.complex64]
HYPER = {
    "apply_gradient_descent": {"alpha": 0.1},
    "apply_momentum": {"lr": 0.1, "momentum": 0.9},
    "apply_adagrad": {"lr": 0.1},
    "apply_adam": {
        "beta1_power": 0.81,
        "beta2_power": 0.998,
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "epsilon": 1e-7,
    },
    "apply_rms_prop": {"lr": 0.01, "rho": 0.9, "momentum": 0.5, "epsilon": 1e-6},
    "apply_ftrl": {"lr": 0.05, "l1": 0.01, "l2": 0.02, "lr_power": -0.5},
}
SLOTS = {
    "apply_gradient_descent": (),
    "apply_momentum": ("accum",),
    "apply_adagrad": ("accum",),
    "apply_adam": ("m", "v"),
    "apply_rms_prop": ("ms", "mom"),
    "apply_ftrl": ("accum", "linear"),
}
FLAG_SETS = {
    "apply_gradient_descent": [{}],
    "apply_momentum": [{"use_nesterov": False}, {"use_nesterov": True}],
    "apply_adagrad": [{"update_slots": True}, {"update_slots": False}],
    "apply_adam": [{"use_nesterov": False}, {"use_nesterov": True}],
    "apply_rms_prop": [{}],
    "apply_ftrl": [
        {"multiply_linear_by_lr": False},
        {"multiply_linear_by_lr": True},
        {"multiply_linear_by_lr": False, "lr_power": -0.6},
        {"multiply_linear_by_lr": True, "lr_power": -0.6},
    ],
}
RAW = {
    "apply_gradient_descent": R.ResourceApplyGradientDescent,
    "apply_momentum": R.ResourceApplyMomentum,
    "apply_adagrad": R.ResourceApplyAdagrad,
    "apply_adam": R.ResourceApplyAdam,
    "apply_rms_prop": R.ResourceApplyRMSProp,
    "apply_ftrl": R.ResourceApplyFtrl,
    "sparse_apply_adagrad": R.ResourceSparseApplyAdagrad,
    "sparse_apply_momentum": R.ResourceSparseApplyMomentum,
    "sparse_apply_ftrl": R.ResourceSparseApplyFtrl,
    "sparse_apply_rms_prop": R.ResourceSparseApplyRMSProp,
}


def optimizers(rng: np.random.Generator) -> None:
    for kind in list(HYPER):
        for sparse in (False, True):
            name = ("sparse_" if sparse else "") + kind
            if name not in RAW:
                continue
            for dtype in OPT_DTYPES:
                dt = np.dtype(dtype)
                for fi, flag_set in enumerate(FLAG_SETS[kind]):
                    flags = dict(flag_set)
                    hyper = dict(HYPER[kind])
                    if "lr_power" in flags:
                        hyper["lr_power"] = flags.pop("lr_power")
                    for shape in ((37, 3), (9, 1), (1000,)) if sparse else ((37, 3), ()):
                        var = rand(rng, shape, dtype)
                        slots = [rand(rng, shape, dtype, positive=True) for _ in SLOTS[kind]]
                        if sparse:
                            n = min(shape[0], 8)
                            indices = rng.choice(shape[0], n, replace=False).astype(np.int64)
                            grad = rand(rng, (n, *shape[1:]), dtype)
                        else:
                            grad = rand(rng, shape, dtype)
                        hyper_t = {k: np.asarray(v, dtype) for k, v in hyper.items()}
                        vs = [tf.Variable(var)] + [tf.Variable(s) for s in slots]
                        args: dict[str, Any] = {"var": vs[0].handle}
                        for slot_name, slot_var in zip(SLOTS[kind], vs[1:], strict=True):
                            args[slot_name] = slot_var.handle
                        args.update(hyper_t)
                        args["delta" if kind == "apply_gradient_descent" else "grad"] = grad
                        if sparse:
                            args["indices"] = indices
                        args.update(flags)
                        try:
                            RAW[name](**args)
                        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError):
                            continue  # no kernel for this dtype
                        label = f"{name}/{dt.name}/{fi}/{'x'.join(map(str, shape))}"
                        inputs = {
                            "var": var,
                            "grad": grad,
                            **{f"slot{i}": s for i, s in enumerate(slots)},
                            **{f"hyper/{k}": v for k, v in hyper_t.items()},
                            **{f"flag/{k}": np.bool_(v) for k, v in flags.items()},
                        }
                        if sparse:
                            inputs["indices"] = indices
                        outputs = {
                            "var": vs[0].numpy(),
                            **{f"slot{i}": s.numpy() for i, s in enumerate(vs[1:])},
                        }
                        case(label, inputs, outputs)


ALL_DTYPES = [np.float16, BF16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8]
ALL_DTYPES += [np.uint16, np.uint32, np.uint64, np.complex64, np.complex128, np.bool_]


def _supported(run: Any) -> bool:
    try:
        run()
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError, TypeError):
        return False
    return True


def dtype_matrix() -> None:
    """matrix/<kernel>: the dtypes TF's CPU kernel runs for (tried on small inputs of each dtype)."""
    scatter_raw = {
        "scatter_update": R.ResourceScatterUpdate,
        "scatter_add": R.ResourceScatterAdd,
        "scatter_sub": R.ResourceScatterSub,
        "scatter_mul": R.ResourceScatterMul,
        "scatter_div": R.ResourceScatterDiv,
        "scatter_min": R.ResourceScatterMin,
        "scatter_max": R.ResourceScatterMax,
    }
    nd_raw = {
        "scatter_nd_update": R.ResourceScatterNdUpdate,
        "scatter_nd_add": R.ResourceScatterNdAdd,
        "scatter_nd_sub": R.ResourceScatterNdSub,
    }
    found: dict[str, list[str]] = {}
    for dtype in ALL_DTYPES:
        dt = np.dtype(dtype)
        one = np.ones((2, 2), dtype)
        row = np.ones((1, 2), dtype)
        for key, fn in scatter_raw.items():
            v = tf.Variable(one)
            if _supported(lambda fn=fn, v=v, row=row: fn(resource=v.handle, indices=[0], updates=row)):
                found.setdefault(key, []).append(dt.name)
        for key, fn in nd_raw.items():
            v = tf.Variable(one)
            row = np.ones((1, 2), dtype)
            if _supported(lambda fn=fn, v=v, row=row: fn(ref=v.handle, indices=[[0]], updates=row)):
                found.setdefault(key, []).append(dt.name)
        for kind, slots in SLOTS.items():
            for sparse in (False, True):
                name = ("sparse_" if sparse else "") + kind
                if name not in RAW:
                    continue
                vs = [tf.Variable(one) for _ in range(1 + len(slots))]
                args: dict[str, Any] = {"var": vs[0].handle}
                for slot_name, slot_var in zip(slots, vs[1:], strict=True):
                    args[slot_name] = slot_var.handle
                args.update({k: np.ones((), dtype) for k in HYPER[kind]})
                if "lr_power" in args:
                    args["lr_power"] = np.zeros((), dtype)
                args["delta" if kind == "apply_gradient_descent" else "grad"] = np.ones(
                    (1, 2) if sparse else (2, 2), dtype
                )
                if sparse:
                    args["indices"] = [0]
                if _supported(lambda name=name, args=args: RAW[name](**args)):
                    found.setdefault(name, []).append(dt.name)
    for key, names in found.items():
        data[f"matrix/{key}"] = np.array(names)


def main() -> None:
    rng = np.random.default_rng(20261130)
    scatters(rng)
    scatter_nds(rng)
    gathers(rng)
    optimizers(rng)
    dtype_matrix()
    data["cases"] = np.array(cases)
    data["tensorflow_version"] = np.array(tf.__version__)
    np.savez_compressed(OUT, **data)
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
