"""Tensors on the wire: dtypes, shapes, names and tensor bytes, shared by the client and the server.

Everything here validates before it allocates: a shape's byte size is computed with Python integers
(an int64 product can wrap to 0), dims must be non-negative, and the rank is bounded.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from tensorps.v1 import tensorps_pb2 as pb

MAX_RANK = 32
MAX_NAME_LENGTH = 255
_MAX_DIM = 2**63 - 1

Shape = tuple[int, ...]


class CodecError(ValueError):
    """A tensor, shape, dtype or name that tensorps cannot accept (INVALID_ARGUMENT on the server)."""


@dataclass(frozen=True)
class DType:
    name: str
    numpy: np.dtype[Any]
    code: int


def _dtype(name: str, numpy: Any, code: int) -> DType:
    # Native order: tensorps runs on little-endian hosts, which is also the wire's order.
    return DType(name, np.dtype(numpy), code)


DTYPES: tuple[DType, ...] = (
    _dtype("float16", np.float16, pb.DT_HALF),
    _dtype("bfloat16", ml_dtypes.bfloat16, pb.DT_BFLOAT16),
    _dtype("float32", np.float32, pb.DT_FLOAT),
    _dtype("float64", np.float64, pb.DT_DOUBLE),
    _dtype("int8", np.int8, pb.DT_INT8),
    _dtype("int16", np.int16, pb.DT_INT16),
    _dtype("int32", np.int32, pb.DT_INT32),
    _dtype("int64", np.int64, pb.DT_INT64),
    _dtype("uint8", np.uint8, pb.DT_UINT8),
    _dtype("uint16", np.uint16, pb.DT_UINT16),
    _dtype("uint32", np.uint32, pb.DT_UINT32),
    _dtype("uint64", np.uint64, pb.DT_UINT64),
    _dtype("complex64", np.complex64, pb.DT_COMPLEX64),
    _dtype("complex128", np.complex128, pb.DT_COMPLEX128),
    _dtype("bool", np.bool_, pb.DT_BOOL),
)
_BY_CODE = {d.code: d for d in DTYPES}
_BY_NAME = {d.name: d for d in DTYPES}
_BY_NUMPY = {d.numpy: d for d in DTYPES}
# TensorFlow's spellings, so that "float" and "half" work as they do in tf.as_dtype.
_BY_NAME.update({"float": _BY_NAME["float32"], "double": _BY_NAME["float64"], "half": _BY_NAME["float16"]})


def dtype_from_code(code: int) -> DType:
    try:
        return _BY_CODE[code]
    except KeyError:
        raise CodecError(f"unsupported dtype code {code} (supported: {supported_dtypes()})") from None


def dtype_of(spec: Any) -> DType:
    """The tensorps dtype of a name ("float32"), a numpy dtype or type, or an array's dtype."""
    if isinstance(spec, DType):
        return spec
    if isinstance(spec, str) and spec in _BY_NAME:
        return _BY_NAME[spec]
    try:
        npdtype = np.dtype(spec)
    except TypeError:
        raise CodecError(f"unsupported dtype {spec!r} (supported: {supported_dtypes()})") from None
    found = _BY_NUMPY.get(npdtype.newbyteorder("=") if npdtype.byteorder in "<>" else npdtype)
    if found is None:
        raise CodecError(f"unsupported dtype {npdtype} (supported: {supported_dtypes()})")
    return found


def supported_dtypes() -> str:
    return " ".join(d.name for d in DTYPES)


_NAME_RE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\-/:]*")


def validate_name(name: str) -> None:
    """TensorFlow's op-name rule plus ':' (so "dense/kernel:0" works); no empty, '.' or '..' parts."""
    if not name:
        raise CodecError("variable name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise CodecError(f"variable name is {len(name)} characters long, the limit is {MAX_NAME_LENGTH}")
    if not _NAME_RE.fullmatch(name):
        raise CodecError(
            f"invalid variable name {name!r}: use 1-{MAX_NAME_LENGTH} characters of [A-Za-z0-9_.-/:], "
            "starting with a letter, digit or '.'"
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise CodecError(f"invalid variable name {name!r}: a '/'-separated part is empty, '.' or '..'")


def format_shape(shape: Shape | None) -> str:
    """TensorFlow's shape text in error messages: [4,5], [] for a scalar, <unknown> for none."""
    if shape is None:
        return "<unknown>"
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate_shape(shape: Sequence[int]) -> Shape:
    try:
        dims = tuple(operator.index(d) for d in shape)  # integers only: 2.7 is no dimension
    except TypeError:
        raise CodecError(f"shape {shape!r} is not a sequence of integers") from None
    if len(dims) > MAX_RANK:
        raise CodecError(f"shape has rank {len(dims)}, the limit is {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise CodecError(f"shape {format_shape(dims)} has a negative dimension")
    if any(d > _MAX_DIM for d in dims):  # the wire's dims are int64
        raise CodecError(f"shape {format_shape(dims)} has a dimension beyond {_MAX_DIM}")
    return dims


# numpy refuses an array whose non-zero dims multiply (times the item size) beyond this, even when
# another dim is zero and it would hold no bytes.
_MAX_ARRAY_SPAN = 2**63 - 1


def nbytes_of(shape: Shape, dtype: DType) -> int:
    """Byte size of a tensor, in Python integers so that huge dims cannot wrap around."""
    if math.prod(d for d in shape if d) * dtype.numpy.itemsize > _MAX_ARRAY_SPAN:
        raise CodecError(f"shape {format_shape(shape)} of {dtype.name} is too large for any array")
    return math.prod(shape) * dtype.numpy.itemsize


def shape_to_proto(shape: Shape | None, out: pb.TensorShapeProto | None = None) -> pb.TensorShapeProto:
    proto = out if out is not None else pb.TensorShapeProto()
    if shape is None:
        proto.unknown_rank = True
    else:
        proto.dim.extend(pb.TensorShapeProto.Dim(size=d) for d in shape)
    return proto


def shape_from_proto(proto: pb.TensorShapeProto) -> Shape | None:
    if proto.unknown_rank:
        return None
    if len(proto.dim) > MAX_RANK:
        raise CodecError(f"shape has rank {len(proto.dim)}, the limit is {MAX_RANK}")
    return validate_shape([d.size for d in proto.dim])


def as_wire_array(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The array as little-endian, C-contiguous memory (a copy only when it is not already)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return array if array.flags.c_contiguous else array.copy(order="C")


@functools.lru_cache(maxsize=4096)
def tensor_head(dtype: DType, shape: Shape) -> bytes:
    """A serialized TensorProto without tensor_content, for wire.frame to append the content to."""
    proto = pb.TensorProto(dtype=dtype.code)  # type: ignore[arg-type]
    shape_to_proto(shape, proto.tensor_shape)
    return proto.SerializeToString()


def array_from_buffer(data: Any, dtype: DType, shape: Shape) -> np.ndarray[Any, Any]:
    """A read-only view of `data` as a tensor, after checking that its length fits the shape exactly."""
    expected = nbytes_of(shape, dtype)
    actual = memoryview(data).nbytes
    if actual != expected:
        raise CodecError(
            f"tensor content has {actual} bytes, but shape {format_shape(shape)} of {dtype.name} "
            f"needs {expected}"
        )
    # Only the length is checked here; whether the bytes are values of the dtype is check_values's job,
    # which the server's ops run on every value, whichever transport brought it.
    return np.frombuffer(data, dtype=dtype.numpy).reshape(shape)


def check_values(array: np.ndarray[Any, Any], *, name: str = "") -> None:
    """Refuse a tensor the store cannot hold: a rank beyond MAX_RANK, or content that holds no value of its
    dtype (a bool byte other than 0 or 1).

    numpy makes arrays of up to 64 dims and stores any byte in a bool array (np.uint8(2).view(bool)); such a
    byte would poison every later read of the variable. The server's ops call this on each value they are
    asked to store, so the network and the same-host (shm://) clients pass through exactly the same check.
    """
    if array.ndim > MAX_RANK:
        where = f" for variable '{name}'" if name else ""
        raise CodecError(f"a value of rank {array.ndim}{where}: the limit is {MAX_RANK}")
    if array.dtype != np.bool_ or not array.size:
        return
    raw = array.view(np.uint8)
    if raw.max() <= 1:
        return
    first = int(np.flatnonzero(raw.reshape(-1) > 1)[0])
    index = [int(i) for i in np.unravel_index(first, array.shape)]
    where = f"variable '{name}': " if name else ""
    raise CodecError(
        f"{where}the bool value holds byte {int(raw.reshape(-1)[first])} at element {index}; a bool is 0 or 1"
    )


def tensor_header_from_proto(proto: pb.TensorProto) -> tuple[DType, Shape]:
    dtype = dtype_from_code(proto.dtype)
    if not proto.HasField("tensor_shape"):
        raise CodecError("tensor has no shape")
    shape = shape_from_proto(proto.tensor_shape)
    if shape is None:
        raise CodecError("tensor has an unknown shape")
    return dtype, shape


def tensor_from_parts(proto: pb.TensorProto, content: Any) -> np.ndarray[Any, Any]:
    """A tensor whose content was cut out of its message (wire.detach): a view, no copy."""
    dtype, shape = tensor_header_from_proto(proto)
    return array_from_buffer(content, dtype, shape)


# Which kinds of Python number become which kinds of dtype, as tf.constant allows it: bools only bool, no
# float becomes an integer ([2.0] for int32 fails, as in TF), no complex a real (bfloat16's kind is "V").
_ALLOWED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "V": "iuf", "c": "iufc"}
_PYTHON_KINDS: dict[type, str] = {bool: "b", int: "i", float: "f", complex: "c"}
# The Python containers a value may nest (numpy takes any sequence; these are the ones that hold numbers).
_SEQUENCES = (list, tuple, range)
_KIND_NAMES = {"b": "a bool", "i": "an int", "f": "a float", "c": "a complex number"}


def from_python(value: Any, dtype: DType, *, name: str = "") -> np.ndarray[Any, Any]:
    """Python scalars and (nested) lists as an array of `dtype`, converted only losslessly.

    - Kinds as tf.constant allows them: bools only become bool, floats never an integer dtype, complex
      numbers never a real one.
    - Every element must round-trip: converted back, it equals the original (NaN matches NaN, complex parts
      each), so 16777217 is no float32, 0.1 no float32, 1e-10 no float16 and 2**40 no int32.
    - A numpy scalar or array inside the list is numpy data, which is never cast (as when passed alone):
      its dtype must be `dtype`.
    Each refusal names the first offending element, by index and value.
    """
    where = f" for variable '{name}'" if name else ""
    target = dtype.numpy
    allowed = _ALLOWED_KINDS[target.kind]
    types = _check_leaves(value, dtype, allowed, where)
    try:
        source = np.array(value)
        if int in types and source.dtype.kind in "fc" and np.any(np.abs(source) >= 2**53):
            # numpy made floats of the ints (mixed with floats, or int64 with uint64), rounding those of
            # 2**53 and beyond before any check could see them: keep the Python ints instead.
            source = np.array(value, dtype=object)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(f"cannot convert {_short(value)} to a tensor{where}: {exc}") from None
    if source.dtype.kind == "O":
        # Integers beyond int64 and uint64 (or a mix of both): numpy keeps them as Python objects.
        converted, same = _convert_objects(source, target)
    elif source.size and source.dtype.kind not in allowed:
        # Every element was allowed, but numpy promoted their mix (uint64 with a negative int: float64).
        raise CodecError(f"cannot convert {_short(value)} to {dtype.name}{where} without loss")
    else:
        with np.errstate(all="ignore"):
            converted = source.astype(target)
        same = _round_trips(source, converted)
    if not same.all():
        first = int(np.flatnonzero(~same.reshape(-1))[0])
        index = tuple(int(i) for i in np.unravel_index(first, source.shape))
        original = source.reshape(-1)[first]
        original = original if source.dtype.kind == "O" else original.item()
        raise CodecError(
            f"cannot convert {_short(value)} to {dtype.name}{where} without loss: {_element(index)}"
            f"{original!r} {_why(original, converted.reshape(-1)[first], dtype)}"
        )
    return converted


def _check_leaves(value: Any, dtype: DType, allowed: str, where: str) -> set[type]:
    """Refuse elements that are no number, of a kind that never becomes `dtype`, or numpy data of another
    dtype; returns the elements' types. The usual case (lists of Python numbers) costs a set per list."""
    types: set[type] = set()
    _leaf_types(value, types)
    fine = {t for t, kind in _PYTHON_KINDS.items() if kind in allowed} | {dtype.numpy.type}
    if types <= fine:
        return types
    for index, leaf in _leaves(value, ()):
        if isinstance(leaf, np.ndarray | np.generic):
            if leaf.dtype != dtype.numpy:
                raise CodecError(
                    f"cannot convert {_short(value)} to {dtype.name}{where}: {_element(index)}is numpy "
                    f"{leaf.dtype} data, which is never cast"
                )
            continue
        kind = _PYTHON_KINDS.get(type(leaf))
        if kind is None:
            raise CodecError(
                f"cannot convert {_short(value)} to {dtype.name}{where}: {_element(index)}{_short(leaf)} "
                "is no bool, int, float or complex"
            )
        if kind not in allowed:
            raise CodecError(
                f"cannot convert {_short(value)} to {dtype.name}{where} without loss: {_element(index)}"
                f"{leaf!r} is {_KIND_NAMES[kind]}, which never becomes {dtype.name} (as in TF)"
            )
    return types


def _leaf_types(value: Any, types: set[type]) -> None:
    if not isinstance(value, _SEQUENCES):
        types.add(type(value))
        return
    kinds = set(map(type, value))
    if any(issubclass(k, _SEQUENCES) for k in kinds):
        for item in value:
            _leaf_types(item, types)
    else:
        types |= kinds


def _leaves(value: Any, index: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], Any]]:
    """The elements of nested lists and tuples with their indices (a numpy array inside is one element)."""
    if isinstance(value, _SEQUENCES):
        for i, item in enumerate(value):
            yield from _leaves(item, (*index, i))
    else:
        yield index, value


def _same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    same: np.ndarray[Any, Any] = (a == b) | (np.isnan(a) & np.isnan(b))
    return same


def _round_trips(source: np.ndarray[Any, Any], converted: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per element: does `converted` hold exactly the value of `source`? Compared in types that hold both
    exactly (never by converting back alone: int64 -> uint64 -> int64 wraps around to the same bits)."""
    kind, target = source.dtype.kind, converted.dtype.kind
    if kind == "b":
        return np.ones(source.shape, np.bool_)
    if kind in "iu" and target in "iu":
        same: np.ndarray[Any, Any] = (converted.astype(source.dtype) == source) & (
            (converted < 0) == (source < 0)
        )
        return same
    wide = converted.astype(np.complex128 if target == "c" else np.float64)
    if kind in "iu":
        # The converted value is an integer (or inf): compare as integers, where it is one of the source's.
        real = np.real(wide)
        info = np.iinfo(source.dtype)
        inside = np.isfinite(real) & (real >= float(info.min)) & (real < float(info.max + 1))
        same = inside & (np.where(inside, real, 0).astype(source.dtype) == source)
        return same
    same = _same(np.real(wide), np.real(source)) & _same(np.imag(wide), np.imag(source))
    return same


def _convert_objects(
    source: np.ndarray[Any, Any], target: np.dtype[Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Element by element, for what numpy keeps as Python objects (integers beyond 64 bits)."""
    flat = source.reshape(-1)
    converted = np.zeros(flat.size, target)
    same = np.zeros(flat.size, np.bool_)
    # float() and complex() first: bfloat16 takes no Python int, and a huge int overflows float().
    as_python = {"i": int, "u": int, "f": float, "V": float, "c": complex}[target.kind]
    with np.errstate(all="ignore"):
        for i, element in enumerate(flat):
            if isinstance(element, np.generic):
                converted[i], same[i] = element, True  # its dtype is the target's (_check_leaves)
                continue
            try:
                converted[i] = as_python(element)
            except (OverflowError, TypeError, ValueError):
                continue
            same[i] = _same_number(as_python(converted[i]), element)
    return converted.reshape(source.shape), same.reshape(source.shape)


def _same_number(a: Any, b: Any) -> bool:
    """Python compares an int with a float or complex exactly; here NaN also matches NaN, part by part."""
    if a == b:
        return True
    if not (isinstance(a, float | complex) and isinstance(b, float | complex)):
        return False
    a, b = complex(a), complex(b)
    pairs = ((a.real, b.real), (a.imag, b.imag))
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in pairs)


def _element(index: tuple[int, ...]) -> str:
    return f"element {list(index)} " if index else ""


def _why(original: Any, converted: Any, dtype: DType) -> str:
    if dtype.numpy.kind in "iu":
        info = np.iinfo(dtype.numpy)
        return f"is outside the range of {dtype.name} [{info.min}, {info.max}]"
    wide = complex(converted)
    if not (math.isfinite(wide.real) and math.isfinite(wide.imag)):
        return f"overflows {dtype.name}"
    if wide == 0:
        return f"underflows to 0 in {dtype.name}"
    return f"is no {dtype.name} (the nearest is {converted})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
