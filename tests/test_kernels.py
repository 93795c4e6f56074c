"""The row and training kernels against TensorFlow's own results (tests/fixtures/kernels.npz, made by
scripts/make_kernel_fixtures.py with TensorFlow 2.21's CPU kernels), bit for bit except where listed."""

from __future__ import annotations

import collections

import pytest
from kernel_cases import all_cases, dtype_matrix, run_case, ulps

from tensorps.server import optimizers, rows

# (kernel, dtype) -> the largest difference in ulps seen, and why it is not zero. Everything else is
# bit-identical to TensorFlow.
NOT_BIT_EXACT = {
    # Eigen's vectorized rsqrt (fast math: the CPU's rsqrt estimate refined by one Newton step; the
    # estimate differs between CPU makers) is not correctly rounded: an ulp or two of the rsqrt, more
    # ulps of a result that the subtraction from var brings near zero.
    ("apply_adagrad", "float32"): 16,
    ("sparse_apply_adagrad", "float16"): 1,
    ("sparse_apply_adagrad", "bfloat16"): 1,
    # Eigen's vectorized pow (FTRL with lr_power != -0.5) differs from libm's by an ulp or two; the
    # difference new_accum^-p - accum^-p cancels most digits and the ulps grow with it.
    ("apply_ftrl", "float32"): 399,
    ("apply_ftrl", "float64"): 409,
    ("sparse_apply_ftrl", "float32"): 7,
    ("sparse_apply_ftrl", "float64"): 16,
    # The nesterov step of SparseApplyMomentum rounds differently in Eigen's packets (a result near zero
    # after cancellation: its ulps are well under one ulp of the operands).
    ("sparse_apply_momentum", "float16"): 2,
    ("sparse_apply_momentum", "bfloat16"): 1,
    ("sparse_apply_momentum", "float32"): 1,
    ("sparse_apply_momentum", "float64"): 2,
    # complex64: Eigen's packet complex multiply, divide and sqrt round differently from numpy's; the ulps
    # are of a part (real or imaginary) that can be tiny next to the other.
    ("apply_adagrad", "complex64"): 32,
    ("apply_adam", "complex64"): 16,
    ("apply_rms_prop", "complex64"): 4,
    ("scatter_div", "complex64"): 37,
    ("scatter_mul", "complex64"): 15,
    ("sparse_apply_adagrad", "complex64"): 4,
    ("sparse_apply_momentum", "complex64"): 2,
    ("sparse_apply_rms_prop", "complex64"): 2,
}

CASES = list(all_cases())


def test_fixtures_cover_every_kernel() -> None:
    """Every op of the issue has TensorFlow fixtures, in several dtypes each."""
    dtypes = collections.defaultdict(set)
    for name, _case in CASES:
        kernel, dtype = name.split("/")[:2]
        dtypes[kernel].add(dtype)
    expected = {
        "gather",
        *(f"scatter_{k}" for k in ("update", "add", "sub", "mul", "div", "min", "max")),
        *(f"scatter_nd_{k}" for k in ("update", "add", "sub")),
        *(f"apply_{k}" for k in ("gradient_descent", "momentum", "adagrad", "adam", "rms_prop", "ftrl")),
        *(f"sparse_apply_{k}" for k in ("adagrad", "momentum", "ftrl", "rms_prop")),
    }
    assert set(dtypes) == expected
    assert all(len(found) >= 3 for found in dtypes.values()), dtypes


@pytest.mark.parametrize("kernel", sorted({name.split("/")[0] for name, _ in CASES}))
def test_kernel_matches_tensorflow(kernel: str) -> None:
    """tensorps' kernel gives TensorFlow's values for the same inputs: the same bits, or (for the kernels
    listed in NOT_BIT_EXACT) within the recorded number of ulps."""
    worst: dict[str, int] = collections.defaultdict(int)
    for name, case in CASES:
        if name.split("/")[0] != kernel:
            continue
        dtype = name.split("/")[1]
        for output, (got, expected) in run_case(name, case).items():
            distance = ulps(got, expected)
            worst[dtype] = max(worst[dtype], distance)
            allowed = NOT_BIT_EXACT.get((kernel, dtype), 0)
            assert distance <= allowed, f"{name} {output}: {distance} ulps (allowed {allowed})"
    for dtype, allowed in ((d, a) for (k, d), a in NOT_BIT_EXACT.items() if k == kernel):
        assert worst[dtype] <= allowed


def test_dtypes_are_tensorflows() -> None:
    """Each kernel accepts exactly the dtypes TensorFlow's CPU kernel runs for (tried by the fixture script
    for every tensorps dtype)."""
    matrix = dtype_matrix()
    ours = {f"scatter_{k}": set(v) for k, v in rows.SCATTER_DTYPES.items()}
    ours |= {f"scatter_nd_{k}": set(v) for k, v in rows.SCATTER_ND_DTYPES.items()}
    ours |= {k: set(spec.dtypes) for k, spec in optimizers.SPECS.items()}
    assert set(matrix) == set(ours)
    for kernel, dtypes in ours.items():
        assert dtypes == matrix[kernel], (kernel, sorted(dtypes ^ matrix[kernel]))
