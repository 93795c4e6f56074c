"""The client's own contract over both transports: one validation path, usage errors, lossless conversion,
its dtype cache, credentials, deadlines and retries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tensorps.client import Client, InvalidArgumentError, NotFoundError

# ---- one validation path for both transports ---------------------------------------------------


def _bool_bytes(*raw: int) -> np.ndarray[Any, Any]:
    return np.array(raw, np.uint8).view(np.bool_)


def test_bool_bytes_other_than_0_and_1_are_refused(ps: Client, name: str) -> None:
    """A bool array holding byte 2 is refused by create and every write, over gRPC and shm:// alike."""
    bad = _bool_bytes(1, 2, 0)
    with pytest.raises(InvalidArgumentError, match=r"byte 2 at element \[1\]"):
        ps.create(name, value=bad)
    with pytest.raises(NotFoundError):
        ps.info(name)
    ps.create(name, value=np.array([True, False, True]))
    for use_locking in (True, False):
        with pytest.raises(InvalidArgumentError, match=r"byte 2 at element \[1\]"):
            ps.assign(name, bad, use_locking=use_locking)
        with pytest.raises(InvalidArgumentError):
            ps.assign(name, _bool_bytes(7, 0, 0), validate_shape=False, use_locking=use_locking)
    assert ps.info(name).version == 1
    assert ps.read(name).tolist() == [True, False, True]


def test_streamed_bool_values_are_checked_too(ps: Client, name: str) -> None:
    """A bool value large enough to be streamed is checked as a small one is."""
    raw = np.zeros(5 << 20, np.uint8)
    raw[-1] = 3
    with pytest.raises(InvalidArgumentError, match=rf"byte 3 at element \[{raw.size - 1}\]"):
        ps.create(name, value=raw.view(np.bool_))
    ps.create(name, value=np.zeros(raw.size, np.bool_))
    with pytest.raises(InvalidArgumentError, match="byte 3"):
        ps.assign(name, raw.view(np.bool_))
    assert not ps.read(name).any()


# ---- Python values convert only losslessly -----------------------------------------------------

DTYPES = [
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "complex64",
    "complex128",
    "bool",
]
# Significand bits of each floating dtype: 2**bits + 1 is the smallest positive integer it cannot hold.
SIGNIFICAND = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53, "complex64": 24, "complex128": 53}
NAN, INF = float("nan"), float("inf")


def conversion_case(dtype: str, source: str) -> tuple[list[Any] | None, Any]:
    """Python values of kind `source` that `dtype` holds exactly (None: the kind never converts, as in
    TF), and one element it cannot hold (None: every value of that kind fits)."""
    if dtype == "bool":
        if source == "bool":
            return [True, False], None
        return None, {"int": 1, "float": 1.0, "complex": 1j}[source]
    if source == "bool":
        return None, True
    if dtype not in SIGNIFICAND:  # an integer dtype
        info = np.iinfo(dtype)
        if source == "int":
            return [int(info.min), int(info.max), 0], int(info.max) + 1
        return None, {"float": 2.0, "complex": 2 + 0j}[source]
    bits = SIGNIFICAND[dtype]
    double = bits == 53
    if source == "int":
        return [2**bits, -(2**bits), 3], 2**bits + 1
    if source == "float":
        lossy = {"float16": 1.0001, "bfloat16": 0.1, "float32": 0.1, "complex64": 0.1}.get(dtype)
        return [0.375, -0.0, NAN, INF, -INF, float(2**bits)] + ([0.1, 1e300] if double else []), lossy
    if dtype.startswith("complex"):
        exact = [1.5 - 0.25j, complex(NAN, 1.0), complex(INF, 0.0)] + ([0.1 + 0.2j] if double else [])
        return exact, None if double else 1 + 0.1j
    return None, 2 + 0j


def same_python(stored: np.ndarray[Any, Any], values: list[Any]) -> bool:
    """The stored elements, as Python numbers, equal the values exactly (NaN matching NaN, part by part)."""
    wide = stored.astype(np.float64) if stored.dtype.kind == "V" else stored
    for got, want in zip(wide.reshape(-1).tolist(), values, strict=True):
        if got == want:
            continue
        parts = [(complex(got).real, complex(want).real), (complex(got).imag, complex(want).imag)]
        if not all(a == b or (np.isnan(a) and np.isnan(b)) for a, b in parts):
            return False
    return True


@pytest.mark.parametrize("source", ["bool", "int", "float", "complex"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_values_convert_only_losslessly(ps: Client, name: str, dtype: str, source: str) -> None:
    """Python values are stored exactly as given, or refused naming the first element that would change."""
    exact, lossy = conversion_case(dtype, source)
    ps.create(name, dtype=dtype)
    if exact is not None:
        out = ps.assign(name, exact, validate_shape=False)
        assert out.dtype == ps.info(name).dtype and same_python(out, exact)
        assert same_python(ps.read(name), exact)
        assert same_python(ps.assign(name, exact[0], validate_shape=False), [exact[0]])  # a scalar
    if lossy is None:
        return
    before = ps.info(name)
    filler = True if dtype == "bool" else 0  # a first element that converts
    with pytest.raises(InvalidArgumentError) as err:
        ps.assign(name, [filler, lossy], validate_shape=False)
    assert f"element [1] {lossy!r}" in err.value.message and dtype in err.value.message
    with pytest.raises(InvalidArgumentError, match="without loss"):
        ps.assign(name, [[filler], [lossy]], validate_shape=False)
    assert ps.info(name) == before


def test_the_reported_lossy_conversions_are_refused(ps: Client, name: str) -> None:
    """The cases of the report: 16777217 to float32, [1.0001, 1e-10] to float16, a numpy float64 in a list."""
    ps.create(name, value=np.zeros(1, np.float32))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] 16777217 is no float32"):
        ps.assign(name, [16777217])
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] is numpy float64 data, which is never cast"):
        ps.assign(name, [np.float64(1.5)])
    np.testing.assert_array_equal(ps.assign(name, [np.float32(1.5)]), [1.5])  # its own dtype: fine
    half = f"{name}.half"
    ps.create(half, value=np.zeros(2, np.float16))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] 1.0001 is no float16"):
        ps.assign(half, [1.0001, 1e-10])
    with pytest.raises(InvalidArgumentError, match=r"element \[1\] 1e-10 underflows to 0 in float16"):
        ps.assign(half, [1.0, 1e-10])
    assert ps.read(half).tolist() == [0, 0] and ps.read(name).tolist() == [1.5]


def test_integers_beyond_64_bits_and_numpy_promotion_stay_exact(ps: Client, name: str) -> None:
    """Huge Python ints are compared exactly, also where numpy would first round them to float64."""
    ps.create(name, dtype="float64", shape=(2,))
    assert ps.assign(name, [2**70, 0.5]).tolist() == [2.0**70, 0.5]
    with pytest.raises(InvalidArgumentError, match=rf"element \[0\] {2**53 + 1} is no float64"):
        ps.assign(name, [2**53 + 1, 0.5])  # numpy alone makes 2**53 of it before any check
    with pytest.raises(InvalidArgumentError, match=rf"element \[1\] {2**70 + 1} is no float64"):
        ps.assign(name, [1, 2**70 + 1])
    unsigned = f"{name}.u"
    ps.create(unsigned, dtype="uint64", shape=(2,))
    with pytest.raises(InvalidArgumentError, match=r"element \[0\] -1 is outside the range of uint64"):
        ps.assign(unsigned, [-1, 2**63])  # numpy alone makes float64 of it
    assert ps.assign(unsigned, [2**64 - 1, 2**63]).tolist() == [2**64 - 1, 2**63]
