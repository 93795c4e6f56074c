"""Values from any array library, dtypes by any spelling: objects implementing `__dlpack__` or `__array__`
(as PyTorch, JAX, TensorFlow and pandas objects do) are accepted by every method that takes a value, viewed
without a copy where their memory allows, and framework dtype objects are taken by their names. The fakes
below implement the protocols the way those libraries do, so no framework needs to be installed."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from tensorps.client import Client, arrays
from tensorps.client.codec import CodecError
from tensorps.client.errors import InvalidArgumentError

Array = np.ndarray[Any, Any]


class DLPackTensor:
    """Like a PyTorch CPU tensor: its memory through DLPack, no __array__."""

    def __init__(self, array: Array) -> None:
        self.array = array

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.array.__dlpack_device__()


class ArrayTensor:
    """Like a TensorFlow eager tensor: __array__ only, returning its own buffer."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.calls = 0

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Array:
        self.calls += 1
        return self.array if dtype is None else self.array.astype(dtype)


class DeviceTensor:
    """Like a GPU tensor: DLPack refuses to hand its memory to numpy, and there is no __array__."""

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise BufferError("the tensor lives on cuda:0")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)


class BothTensor(ArrayTensor):
    """Like a JAX array of bfloat16: both protocols, but DLPack cannot describe the dtype to numpy."""

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise BufferError("bfloat16 has no DLPack code numpy reads")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


class TorchDType:
    """Like torch.float32: no numpy conversion; prints as 'torch.float32'."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return f"torch.{self._name}"


class TFDType:
    """Like tf.float32: its .name is the numpy-style name; prints as "tf.float32"."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"tf.{self.name}"


def test_array_protocols_are_viewed_without_a_copy() -> None:
    source = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.shares_memory(arrays.as_array(DLPackTensor(source)), source)
    assert np.shares_memory(arrays.as_array(ArrayTensor(source)), source)
    bf16 = np.arange(4).astype(ml_dtypes.bfloat16)
    both = BothTensor(bf16)
    viewed = arrays.as_array(both)
    assert viewed is not None and np.shares_memory(viewed, bf16) and both.calls == 1
    assert arrays.as_array([1.0, 2.0]) is None and arrays.as_array(3) is None  # Python values
    with pytest.raises(CodecError, match="cuda:0"):
        arrays.as_array(DeviceTensor())


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        (TorchDType("float32"), "float32"),
        (TorchDType("bfloat16"), "bfloat16"),
        (TorchDType("int64"), "int64"),
        (TorchDType("complex64"), "complex64"),
        (TorchDType("bool"), "bool"),
        (TFDType("float16"), "float16"),
        (TFDType("half"), "float16"),
        (TFDType("uint16"), "uint16"),
        ("torch.float64", "float64"),
        ("tf.int8", "int8"),
        ("float", "float32"),
        (np.float32, "float32"),
        (np.dtype("<u4"), "uint32"),
        (ml_dtypes.bfloat16, "bfloat16"),
    ],
)
def test_dtype_specs(spec: Any, name: str) -> None:
    assert arrays.dtype_of(spec).name == name


@pytest.mark.parametrize("spec", [TorchDType("qint8"), TFDType("string"), "torch.strange", object()])
def test_unknown_dtypes_are_refused_by_name(spec: Any) -> None:
    with pytest.raises(CodecError, match="unsupported dtype"):
        arrays.dtype_of(spec)


def test_every_method_that_takes_a_value_takes_array_protocols(ps: Client, name: str) -> None:
    """create, assign, assign_add, assign_sub, pipelines and the *_many calls, over gRPC and shm://."""
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    ones = np.ones((2, 3), np.float32)
    ps.create(f"{name}/a", value=DLPackTensor(base), dtype=TorchDType("float32"))
    ps.create(f"{name}/b", value=ArrayTensor(base), dtype=TFDType("float32"))
    ps.create(f"{name}/c", dtype=TorchDType("float32"), shape=(2, 3))
    np.testing.assert_array_equal(ps.read(f"{name}/a"), base)
    np.testing.assert_array_equal(ps.read(f"{name}/b"), base)
    np.testing.assert_array_equal(ps.assign(f"{name}/c", DLPackTensor(base * 2)), base * 2)
    np.testing.assert_array_equal(ps.assign_add(f"{name}/a", ArrayTensor(ones)), base + 1)
    np.testing.assert_array_equal(ps.assign_sub(f"{name}/b", DLPackTensor(ones)), base - 1)
    results = (
        ps.pipeline()
        .create(f"{name}/d", value=DLPackTensor(ones), dtype="torch.float32")
        .assign(f"{name}/c", ArrayTensor(base))
        .assign_add(f"{name}/d", DLPackTensor(ones))
        .read(f"{name}/d")
        .execute()
    )
    np.testing.assert_array_equal(results[-1], ones * 2)
    ps.assign_many({f"{name}/a": DLPackTensor(base), f"{name}/b": ArrayTensor(base)})
    ps.assign_add_many({f"{name}/a": ArrayTensor(ones)})
    ps.create_many({f"{name}/e": {"value": DLPackTensor(base)}})
    values = ps.read_many([f"{name}/a", f"{name}/b", f"{name}/c", f"{name}/e"])
    for key, want in (("a", base + 1), ("b", base), ("c", base), ("e", base)):
        np.testing.assert_array_equal(values[f"{name}/{key}"], want)
    # Array data is never cast: a float64 tensor for a float32 variable is refused, naming both.
    with pytest.raises(InvalidArgumentError, match="float64"):
        ps.assign(f"{name}/a", DLPackTensor(base.astype(np.float64)))
    with pytest.raises(InvalidArgumentError, match="cuda:0"):
        ps.assign(f"{name}/a", DeviceTensor())
    np.testing.assert_array_equal(ps.read(f"{name}/a"), base + 1)


def test_non_contiguous_and_big_endian_array_data(ps: Client, name: str) -> None:
    """Memory numpy must rearrange for the wire is copied once; the values are what the object holds."""
    wide = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = wide[:, ::2]
    ps.create(name, value=DLPackTensor(strided))
    np.testing.assert_array_equal(ps.read(name), strided)
    swapped = strided.astype(">f4")
    np.testing.assert_array_equal(ps.assign(name, ArrayTensor(swapped)), strided)
