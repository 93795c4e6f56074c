"""TensorFlow's TensorProto encodings of a value, read exactly as tf.make_ndarray reads them.

A TensorProto holds its elements either in tensor_content (little-endian bytes in C order: the fast path,
viewed without a copy) or in the typed value field of its dtype (float_val, int_val, half_val, ...), as
tf.make_tensor_proto writes scalars, one-element tensors, bool, complex, uint16 and "splat" tensors. In the
typed form TensorFlow's rules apply: fewer values than elements repeat the last value ("splat":
make_tensor_proto(1.5, shape=[3, 4])), and no values at all mean zeros. What TensorFlow itself would
misread or reject is refused with a CodecError naming the field: tensor_content together with values, more
values than elements, a field of another dtype, values outside the dtype's range, and the string,
resource, variant and float8 fields (tensorps stores none of those dtypes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import CodecError, DType, Shape
from tensorps.v1 import tensorps_pb2 as pb

# Field numbers up to tensor_content are the header and the content; the typed fields come after.
_LAST_HEADER_FIELD = pb.TensorProto.TENSOR_CONTENT_FIELD_NUMBER

# The typed field of each dtype, as tf.make_ndarray reads it.
FIELD_OF: dict[str, str] = {
    "float16": "half_val",
    "bfloat16": "half_val",
    "float32": "float_val",
    "float64": "double_val",
    "int8": "int_val",
    "int16": "int_val",
    "int32": "int_val",
    "uint8": "int_val",
    "uint16": "int_val",
    "int64": "int64_val",
    "uint32": "uint32_val",
    "uint64": "uint64_val",
    "complex64": "scomplex_val",
    "complex128": "dcomplex_val",
    "bool": "bool_val",
}
# Fields of dtypes tensorps does not store.
_FOREIGN = {
    "string_val": "strings",
    "resource_handle_val": "resource handles",
    "variant_val": "variants",
    "float8_val": "float8/float4 values",
}


def typed_fields(proto: pb.TensorProto) -> list[str]:
    """The names of the value fields set besides tensor_content (empty: the tensor_content form)."""
    return [field.name for field, _ in proto.ListFields() if field.number > _LAST_HEADER_FIELD]


def has_values(proto: pb.TensorProto) -> bool:
    """Whether the proto carries its elements itself (tensor_content or a typed field)."""
    return bool(proto.tensor_content) or bool(typed_fields(proto))


def decode(
    proto: pb.TensorProto, content: Any, *, what: str = "value", header: tuple[DType, Shape] | None = None
) -> np.ndarray[Any, Any]:
    """The tensor `proto` holds, `content` being its tensor_content (cut out of the message by wire.parse,
    or proto.tensor_content itself). A view of `content` when the proto uses it (no copy), else a new
    array built from the typed field. `what` names the proto in errors ("variable 'w': value").

    The caller checks the size against its limits first (tensor_header_from_proto gives dtype and shape):
    a splat proto of a few bytes may describe a large tensor; `header` passes on what it found.
    """
    dtype, shape = header if header is not None else codec.tensor_header_from_proto(proto)
    return expand(values(proto, content, dtype, shape, what=what), dtype, shape)


def values(
    proto: pb.TensorProto, content: Any, dtype: DType, shape: Shape, *, what: str
) -> np.ndarray[Any, Any]:
    """Every check of decode, without filling the tensor: the content viewed as the tensor, or the typed
    values (fewer than the elements for a splat, none for zeros) as a flat array."""
    fields = typed_fields(proto)
    if not fields:
        if not memoryview(content).nbytes:
            return np.zeros(0, dtype.numpy)  # no values at all: TensorFlow reads zeros
        try:
            return codec.array_from_buffer(content, dtype, shape)
        except CodecError as exc:
            raise CodecError(f"{what}: {exc}") from None
    for field in fields:
        if field in _FOREIGN:
            raise CodecError(
                f"{what}: {field} holds {_FOREIGN[field]}, which tensorps does not store "
                f"(dtypes: {codec.supported_dtypes()})"
            )
    expected = FIELD_OF[dtype.name]
    if memoryview(content).nbytes:
        raise CodecError(f"{what}: both tensor_content and {fields[0]} are set; send the elements in one")
    wrong = [field for field in fields if field != expected]
    if wrong:
        raise CodecError(f"{what}: a {dtype.name} tensor holds its values in {expected}, not in {wrong[0]}")
    flat = _values(proto, expected, dtype, what)
    elements = math.prod(shape)
    if flat.size > elements:
        raise CodecError(
            f"{what}: {expected} has {flat.size} values, more than the {elements} elements of shape "
            f"{codec.format_shape(shape)}"
        )
    return flat


def expand(flat: np.ndarray[Any, Any], dtype: DType, shape: Shape) -> np.ndarray[Any, Any]:
    """The tensor of `values`' result: itself when it holds every element, else TensorFlow's fill."""
    if flat.shape == shape:
        return flat
    elements = math.prod(shape)
    if flat.size == elements:
        return flat.reshape(shape)
    if not flat.size:
        return np.zeros(shape, dtype.numpy)
    # TensorFlow's splat rule: the last value fills the remaining elements.
    out = np.empty(elements, dtype.numpy)
    out[: flat.size] = flat
    out[flat.size :] = flat[-1]
    return out.reshape(shape)


def _values(proto: pb.TensorProto, field: str, dtype: DType, what: str) -> np.ndarray[Any, Any]:
    """The field's values as a flat array of `dtype` (at least one: the field is set)."""
    raw = getattr(proto, field)
    target = dtype.numpy
    if field == "half_val":
        bits = np.array(raw, np.int64)
        _check_range(bits, 0, 0xFFFF, f"{what}: {field} (16-bit patterns of {dtype.name})")
        return bits.astype(np.uint16).view(target)
    if field in ("scomplex_val", "dcomplex_val"):
        parts = np.array(raw, np.float32 if field == "scomplex_val" else np.float64)
        if parts.size % 2:
            raise CodecError(
                f"{what}: {field} has {parts.size} numbers; each {dtype.name} element takes two "
                "(real, imaginary)"
            )
        return parts.view(target)
    if field == "int_val" and target != np.int32:
        ints = np.array(raw, np.int64)
        info = np.iinfo(target)
        _check_range(ints, int(info.min), int(info.max), f"{what}: {field} ({dtype.name})")
        return ints.astype(target)
    return np.array(raw, target)


def _check_range(values: np.ndarray[Any, Any], low: int, high: int, where: str) -> None:
    outside = (values < low) | (values > high)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise CodecError(f"{where}: value {int(values[first])} at index {first} is outside [{low}, {high}]")
