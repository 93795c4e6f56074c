"""What the client takes as a value and as a dtype, whatever library made it.

Values: numpy arrays and scalars; any object with `__dlpack__` (PyTorch, JAX, CuPy on the host, ...),
viewed through np.from_dlpack without a copy; any object with `__array__` (TensorFlow's eager tensors,
pandas, ...), through np.asarray (a copy only if the object makes one). The result is numpy data, sent as
it is (never cast); codec.as_wire_array copies it only when it is not C-contiguous little-endian memory.
Anything else is a Python value (numbers, nested lists), converted losslessly by codec.from_python.

Dtypes: tensorps's names ("float32", TensorFlow's "float", "double", "half"), numpy dtypes and types,
and framework dtype objects by their names: `torch.float32` (whose str is "torch.float32"), `tf.float32`
(whose .name is "float32"), `jnp.float32` (a numpy type).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import CodecError, DType

Array = np.ndarray[Any, Any]

# Prefixes of dtype names as frameworks print them ("torch.float32", "tf.float32").
_PREFIXES = ("torch.", "tf.", "tensorflow.", "jnp.", "jax.numpy.", "np.", "numpy.", "ml_dtypes.")


def as_array(value: Any) -> Array | None:
    """`value` as numpy data without a copy where its memory allows, or None for a Python value."""
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    if hasattr(value, "__dlpack__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, TypeError, ValueError, RuntimeError) as exc:
            # Not on the host, or a dtype DLPack cannot say to numpy (bfloat16): try __array__ next.
            if not hasattr(value, "__array__"):
                raise CodecError(
                    f"cannot view {type(value).__name__} through DLPack: {exc} (move it to the CPU, or "
                    "pass a numpy array)"
                ) from None
    if hasattr(value, "__array__"):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CodecError(f"cannot convert {type(value).__name__} to an array: {exc}") from None
        if array.dtype.kind == "O":
            raise CodecError(f"{type(value).__name__}.__array__ gave Python objects, not numbers")
        return array
    return None


def dtype_of(spec: Any) -> DType:
    """The tensorps dtype of a name, a numpy dtype or type, or a framework's dtype object (by its name)."""
    try:
        return codec.dtype_of(spec)
    except CodecError:
        # tf.DType has .name ("float32"); torch.dtype prints as "torch.float32".
        attribute = getattr(spec, "name", None)
        if isinstance(spec, type):
            name = spec.__name__
        elif isinstance(attribute, str) and not isinstance(spec, np.dtype | str):
            name = attribute
        else:
            name = str(spec)
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name.removeprefix(prefix)
                break
        if name != spec:
            try:
                return codec.dtype_of(name)
            except CodecError:
                pass
        raise CodecError(f"unsupported dtype {spec!r} (supported: {codec.supported_dtypes()})") from None
