"""Server-side optimizers (apply_*, sparse_apply_*) through the real server and shm://: TensorFlow's values
for TensorFlow's inputs, TF's checks and texts, locking, pipelines."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from kernel_cases import load, ulps
from test_kernels import NOT_BIT_EXACT

from tensorps.client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError, VariableInfo
from tensorps.server import optimizers

CASES = load()
# One fixture per op and dtype (2-D variables), run through the server.
PICKED = sorted(
    {
        (name.split("/")[0], name.split("/")[1]): name
        for name in CASES
        if name.split("/")[0] in optimizers.SPECS and name.endswith("/37x3") and "/0/" in name
    }.values()
)


def call(ps: Any, kind: str, var: str, slots: list[str], case: dict[str, Any], **flags: Any) -> Any:
    """The client call of `kind` with the fixture's inputs, as TF's raw op takes them."""
    spec = optimizers.SPECS[kind]
    h = {k: case[f"in/hyper/{k}"][()] for k in spec.hyper}
    grad = case["in/grad"]
    method = getattr(ps, kind)
    if kind == "apply_gradient_descent":
        return method(var, h["alpha"], grad, **flags)
    if kind == "apply_momentum":
        return method(var, slots[0], h["lr"], grad, h["momentum"], **flags)
    if kind == "apply_adagrad":
        return method(var, slots[0], h["lr"], grad, **flags)
    if kind == "apply_adam":
        hs = [h[k] for k in ("beta1_power", "beta2_power", "lr", "beta1", "beta2", "epsilon")]
        return method(var, slots[0], slots[1], *hs, grad, **flags)
    if kind == "apply_rms_prop":
        return method(var, *slots, h["lr"], h["rho"], h["momentum"], h["epsilon"], grad, **flags)
    if kind == "apply_ftrl":
        return method(var, *slots, grad, h["lr"], h["l1"], h["l2"], h["lr_power"], **flags)
    indices = case["in/indices"]
    if kind == "sparse_apply_adagrad":
        return method(var, slots[0], h["lr"], grad, indices, **flags)
    if kind == "sparse_apply_momentum":
        return method(var, slots[0], h["lr"], grad, indices, h["momentum"], **flags)
    if kind == "sparse_apply_ftrl":
        return method(var, *slots, grad, indices, h["lr"], h["l1"], h["l2"], h["lr_power"], **flags)
    assert kind == "sparse_apply_rms_prop"
    return method(var, *slots, h["lr"], h["rho"], h["momentum"], h["epsilon"], grad, indices, **flags)


def setup(ps: Client, name: str, case: dict[str, Any], kind: str) -> tuple[str, list[str]]:
    spec = optimizers.SPECS[kind]
    ps.create(name, value=case["in/var"])
    slots = []
    for i, slot in enumerate(spec.slots):
        ps.create(f"{name}/{slot}", value=case[f"in/slot{i}"])
        slots.append(f"{name}/{slot}")
    return name, slots


@pytest.mark.parametrize("locked", [False, True], ids=["unlocked", "locked"])
@pytest.mark.parametrize("case_name", PICKED)
def test_server_matches_tensorflow(ps: Client, name: str, case_name: str, locked: bool) -> None:
    """The server's apply gives TensorFlow's values for TensorFlow's inputs, locked and unlocked, and
    updates the variable and every slot by one version."""
    case = CASES[case_name]
    kind, dtype = case_name.split("/")[:2]
    var, slots = setup(ps, name, case, kind)
    flags = {k[len("in/flag/") :]: bool(v) for k, v in case.items() if k.startswith("in/flag/")}
    info = call(ps, kind, var, slots, case, use_locking=locked, **flags)
    assert isinstance(info, VariableInfo) and info.version == 2
    allowed = NOT_BIT_EXACT.get((kind, dtype), 0)
    for i, n in enumerate([var, *slots]):
        expected = case["out/var" if i == 0 else f"out/slot{i - 1}"]
        assert ulps(ps.read(n), expected) <= allowed, n
        assert ps.info(n).version == 2


def test_read_value_returns_the_variable(ps: Client, name: str) -> None:
    """read_value=True returns var after the update; the default returns its VariableInfo."""
    ps.create(name, value=np.ones(3, np.float32))
    out = ps.apply_gradient_descent(name, np.float32(0.5), np.full(3, 2, np.float32), read_value=True)
    np.testing.assert_array_equal(out, np.zeros(3, np.float32))
    info = ps.apply_gradient_descent(name, 0.5, np.full(3, 2, np.float32))
    assert isinstance(info, VariableInfo) and info.version == 3


def test_hyperparameters_convert_losslessly(ps: Client, name: str) -> None:
    """Python hyperparameters take the variable's dtype losslessly: 0.5 is a float32, 0.1 is not; numpy
    scalars of another dtype are never cast."""
    ps.create(name, value=np.ones(2, np.float32))
    ps.apply_gradient_descent(name, 0.5, np.ones(2, np.float32))
    with pytest.raises(InvalidArgumentError, match=r"cannot convert 0\.1 to float32 .*without loss"):
        ps.apply_gradient_descent(name, 0.1, np.ones(2, np.float32))
    with pytest.raises(InvalidArgumentError, match=r"alpha has dtype float64 but var .* has dtype float32"):
        ps.apply_gradient_descent(name, np.float64(0.5), np.ones(2, np.float32))
    ps.create(f"{name}/d", value=np.ones(2, np.float64))
    ps.apply_gradient_descent(f"{name}/d", 0.1, np.ones(2, np.float64))
    np.testing.assert_array_equal(ps.read(f"{name}/d"), np.ones(2) - np.ones(2) * 0.1)


def test_dense_errors_change_nothing(ps: Client, name: str) -> None:
    """TF's texts for shapes, scalars, uninitialized slots and dtypes; nothing changes."""
    f32 = np.float32
    ps.create(name, value=np.zeros((3, 2), f32))
    ps.create(f"{name}/m", value=np.zeros((3, 2), f32))
    ps.create(f"{name}/v", value=np.zeros((3, 3), f32))
    ps.create(f"{name}/u", dtype="float32", shape=(3, 2))
    ps.create(f"{name}/d", value=np.zeros((3, 2), np.float64))
    ps.create(f"{name}/l", value=np.zeros((3, 2), f32))
    g = np.ones((3, 2), f32)
    hyper = (f32(0.5), f32(0.5), f32(1), f32(0.5), f32(0.5), f32(1))
    with pytest.raises(InvalidArgumentError, match=r"var and v do not have the same shape\[3,2\] \[3,3\]"):
        ps.apply_adam(name, f"{name}/m", f"{name}/v", *hyper, g)
    with pytest.raises(InvalidArgumentError, match=r"beta1_power is not a scalar: \[2\]"):
        ps.apply_adam(name, f"{name}/m", f"{name}/l", np.ones(2, f32), *hyper[1:], g)
    with pytest.raises(InvalidArgumentError, match=r"var and grad do not have the same shape\[3,2\] \[3,3\]"):
        ps.apply_adagrad(name, f"{name}/m", f32(1), np.ones((3, 3), f32))
    with pytest.raises(FailedPreconditionError, match=f"Attempting to use uninitialized value {name}/u"):
        ps.apply_momentum(name, f"{name}/u", f32(1), g, f32(0.5))
    with pytest.raises(InvalidArgumentError, match=r"accum .* has dtype float64 but var .* has dtype"):
        ps.apply_momentum(name, f"{name}/d", f32(1), g, f32(0.5))
    with pytest.raises(InvalidArgumentError, match=r"l1 regularization strength is not a scalar: \[1\]"):
        ps.apply_ftrl(name, f"{name}/m", f"{name}/l", g, f32(1), np.ones(1, f32), f32(0), f32(-0.5))
    with pytest.raises(NotFoundError):
        ps.apply_adagrad(name, f"{name}/missing", f32(1), g)
    with pytest.raises(InvalidArgumentError, match="a variable is named twice"):
        ps.apply_adagrad(name, name, f32(1), g)
    ps.create(f"{name}/i", value=np.zeros(2, np.int32))
    with pytest.raises(InvalidArgumentError, match="no kernel for dtype int32"):
        ps.apply_gradient_descent(f"{name}/i", np.int32(1), np.ones(2, np.int32))
    ps.create(f"{name}/c", value=np.zeros(2, np.complex64))
    ps.create(f"{name}/c1", value=np.zeros(2, np.complex64))
    ps.create(f"{name}/c2", value=np.zeros(2, np.complex64))
    one = np.complex64(1)
    with pytest.raises(InvalidArgumentError, match="no kernel for dtype complex64"):
        ps.apply_ftrl(f"{name}/c", f"{name}/c1", f"{name}/c2", np.ones(2, np.complex64), one, one, one, one)
    for n in (name, f"{name}/m"):
        np.testing.assert_array_equal(ps.read(n), np.zeros((3, 2), f32))
        assert ps.info(n).version == 1


def test_sparse_errors(ps: Client, name: str) -> None:
    """Sparse applies: TF's texts for indices and grad shapes; nothing changes."""
    f32 = np.float32
    ps.create(name, value=np.zeros((3, 2), f32))
    ps.create(f"{name}/a", value=np.ones((3, 2), f32))
    g = np.ones((2, 2), f32)
    with pytest.raises(InvalidArgumentError, match="Index 3 at offset 1 in indices is out of range"):
        ps.sparse_apply_adagrad(name, f"{name}/a", f32(1), g, [0, 3])
    with pytest.raises(InvalidArgumentError, match="indices must be one-dimensional"):
        ps.sparse_apply_adagrad(name, f"{name}/a", f32(1), g, [[0, 1]])
    with pytest.raises(InvalidArgumentError, match="var and grad must match in dimension 1"):
        ps.sparse_apply_adagrad(name, f"{name}/a", f32(1), np.ones((2, 3), f32), [0, 1])
    with pytest.raises(
        InvalidArgumentError, match=r"grad must be the same size as indices in the first dimension\."
    ):
        ps.sparse_apply_momentum(name, f"{name}/a", f32(1), np.ones((3, 2), f32), [0, 1], f32(0.9))
    ps.create(f"{name}/s", value=f32(1))
    ps.create(f"{name}/s2", value=f32(1))
    with pytest.raises(InvalidArgumentError, match="var must be at least 1 dimensional"):
        ps.sparse_apply_adagrad(f"{name}/s", f"{name}/s2", f32(1), f32(1), [0])
    np.testing.assert_array_equal(ps.read(name), np.zeros((3, 2), f32))
    assert ps.info(f"{name}/a").version == 1


def test_sparse_duplicates_apply_in_order(ps: Client, name: str) -> None:
    """A row named twice in indices gets both gradient rows, one after the other (TF's loop)."""
    f32 = np.float32
    ps.create(name, value=np.zeros((4, 2), f32))
    ps.create(f"{name}/a", value=np.full((4, 2), 0.5, f32))
    grad = np.array([[1, 2], [3, 4]], f32)
    ps.sparse_apply_adagrad(name, f"{name}/a", f32(0.5), grad, np.array([1, 1], np.int32))
    var, accum = np.zeros(2, f32), np.full(2, 0.5, f32)
    for g in grad:
        accum = accum + np.square(g)
        var = var - f32(0.5) * g * (f32(1) / np.sqrt(accum))
    np.testing.assert_allclose(ps.read(name)[1], var, rtol=3e-7)
    np.testing.assert_array_equal(ps.read(f"{name}/a")[1], accum)
    np.testing.assert_array_equal(ps.read(name)[[0, 2, 3]], np.zeros((3, 2), f32))


def test_locked_apply_loses_nothing(ps: Client, name: str) -> None:
    """20 threads x locked apply_gradient_descent(-1, ones) = exactly 20 (var and slot of a momentum too)."""
    ps.create(name, value=np.zeros(8, np.float32))
    ps.create(f"{name}/m", value=np.zeros(8, np.float32))
    ps.create(f"{name}/m/accum", value=np.zeros(8, np.float32))

    def work() -> None:
        ps.apply_gradient_descent(name, np.float32(-1), np.ones(8, np.float32), use_locking=True)
        ps.apply_momentum(
            f"{name}/m",
            f"{name}/m/accum",
            np.float32(-1),
            np.ones(8, np.float32),
            np.float32(1),
            use_locking=True,
        )

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(ps.read(name), np.full(8, 20, np.float32))
    np.testing.assert_array_equal(ps.read(f"{name}/m/accum"), np.full(8, 20, np.float32))
    np.testing.assert_array_equal(ps.read(f"{name}/m"), np.full(8, 210, np.float32))  # 1 + 2 + ... + 20


def test_model_step_in_one_atomic_batch(ps: Client, name: str) -> None:
    """A worker pushes every gradient of its model with apply_adam in one atomic call; a failure in any
    one changes nothing."""
    f32 = np.float32
    layers = {f"{name}/w{i}": (3, i + 2) for i in range(3)}
    for layer, shape in layers.items():
        ps.create(layer, value=np.ones(shape, f32))
        ps.create(f"{layer}/Adam", value=np.zeros(shape, f32))
        ps.create(f"{layer}/Adam_1", value=np.zeros(shape, f32))
    hyper = (f32(0.9), f32(0.999), f32(0.001), f32(0.9), f32(0.999), f32(1e-7))
    with ps.pipeline(atomic=True) as step:
        for layer, shape in layers.items():
            step.apply_adam(layer, f"{layer}/Adam", f"{layer}/Adam_1", *hyper, np.ones(shape, f32))
    assert all(isinstance(r, VariableInfo) and r.version == 2 for r in step.results or [])
    for layer in layers:
        assert ps.info(f"{layer}/Adam").version == 2
        assert (ps.read(layer) < 1).all()
    bad = ps.pipeline(atomic=True)
    for layer, shape in layers.items():
        bad.apply_adam(layer, f"{layer}/Adam", f"{layer}/Adam_1", *hyper, np.ones((1, *shape), f32))
    with pytest.raises(InvalidArgumentError, match="operation 0"):
        bad.execute()
    for layer in layers:
        assert ps.info(layer).version == 2 and ps.info(f"{layer}/Adam_1").version == 2


def test_sparse_ftrl_checks_its_hyperparameters(ps: Client, name: str) -> None:
    """SparseApplyFtrl refuses lr <= 0 (0 is allowed with multiply_linear_by_lr), negative l1 and l2 and a
    positive lr_power, with TF's texts (the dense ApplyFtrl checks only that they are scalars)."""
    f32 = np.float32
    for n in (name, f"{name}/accum", f"{name}/linear"):
        ps.create(n, value=np.ones((3, 2), f32))
    g = np.ones((1, 2), f32)

    def ftrl(lr: float, l1: float, l2: float, lr_power: float, **flags: Any) -> Any:
        return ps.sparse_apply_ftrl(
            name, f"{name}/accum", f"{name}/linear", g, [0], f32(lr), f32(l1), f32(l2), f32(lr_power), **flags
        )

    text = r"lr is not a positive scalar \(or zero if multiply_linear_by_lr is set\): \[\]"
    with pytest.raises(InvalidArgumentError, match=text):
        ftrl(0, 0, 0, -0.5)
    with pytest.raises(
        InvalidArgumentError, match=r"l1 regularization strength is not a non-negative scalar"
    ):
        ftrl(1, -1, 0, -0.5)
    with pytest.raises(
        InvalidArgumentError, match=r"l2 regularization strength is not a non-negative scalar"
    ):
        ftrl(1, 0, -1, -0.5)
    with pytest.raises(InvalidArgumentError, match=r"lr_power is not a non-positive scalar: \[\]"):
        ftrl(1, 0, 0, 0.5)
    assert ps.info(name).version == 1
    ftrl(0, 0, 0, -0.5, multiply_linear_by_lr=True)
    ps.apply_ftrl(
        name, f"{name}/accum", f"{name}/linear", np.ones((3, 2), f32), f32(0), f32(-1), f32(0), f32(1)
    )
    assert ps.info(name).version == 3


def test_sparse_step_in_one_atomic_batch_equals_single_calls(ps: Client, name: str) -> None:
    """An atomic pipeline of sparse applies and scatters on several tables (rows written in place at commit)
    leaves exactly what the same single calls leave, bit for bit."""
    f32 = np.float32
    rng = np.random.default_rng(12)
    tables = {t: rng.standard_normal((500, 4)).astype(f32) for t in ("users", "items")}
    for copy in ("single", "atomic"):
        for t, value in tables.items():
            ps.create(f"{name}/{copy}/{t}", value=value)
            ps.create(f"{name}/{copy}/{t}/Adagrad", value=np.full((500, 4), 0.1, f32))
        ps.create(f"{name}/{copy}/counts", value=np.zeros(500, np.int64))
    ids = {t: rng.integers(0, 500, 64) for t in tables}
    grads = {t: rng.standard_normal((64, 4)).astype(f32) for t in tables}

    def step(target: Any, copy: str) -> None:
        for t in tables:
            var = f"{name}/{copy}/{t}"
            target.sparse_apply_adagrad(var, f"{var}/Adagrad", f32(0.25), grads[t], ids[t], use_locking=True)
        target.scatter_add(f"{name}/{copy}/counts", ids["users"], np.int64(1))

    step(ps, "single")
    with ps.pipeline(atomic=True) as batch:
        step(batch, "atomic")
    assert all(isinstance(r, VariableInfo) and r.version == 2 for r in batch.results or [])
    for suffix in ("users", "users/Adagrad", "items", "items/Adagrad", "counts"):
        single, atomic = ps.read(f"{name}/single/{suffix}"), ps.read(f"{name}/atomic/{suffix}")
        assert single.tobytes() == atomic.tobytes(), suffix
        assert ps.info(f"{name}/atomic/{suffix}").version == 2
