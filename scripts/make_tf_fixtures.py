"""Writes tests/fixtures/tf_tensor_protos.json: TensorProtos serialized by TensorFlow itself, and what
tf.make_ndarray reads from each, for the interop tests (which must not need TensorFlow).

Run with a Python that has TensorFlow: `/path/to/tf-venv/bin/python scripts/make_tf_fixtures.py`.

Each case holds the bytes of `tf.make_tensor_proto(...)` (base64), the dtype and shape, and the expected
array as little-endian C-order bytes (base64), as tf.make_ndarray reads that proto. The cases cover every
dtype tensorps stores x the shapes (), (1,), (0,), (3,4), (2,3,4), Python scalars, TensorFlow's "splat"
rule (fewer values than elements: the last repeats) and an empty value list (zeros). The script also checks
that tf.make_ndarray reads a reply as tensorps writes it (dtype, shape and tensor_content, for every dtype
and shape), so that replies are known to be TensorFlow-readable.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_dtypes
import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tf_tensor_protos.json"

DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "bool": np.bool_,
}
SHAPES: list[tuple[int, ...]] = [(), (1,), (0,), (3, 4), (2, 3, 4)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Distinct values per element, with each dtype's extremes and, for floats, -0, inf and NaN."""
    np_type = np.dtype(DTYPES[dtype])
    n = int(np.prod(shape))
    if dtype == "bool":
        flat = (np.arange(n) % 3 == 1).astype(np.bool_)
    elif np_type.kind in "iu":
        info = np.iinfo(np_type)
        flat = (np.arange(n, dtype=np.int64) * 7 - 3).astype(np_type) if n else np.zeros(0, np_type)
        if n:
            flat[0] = info.max
        if n > 1:
            flat[1] = info.min
    elif np_type.kind == "c":
        flat = (np.arange(n) * 0.5 - 1.25 + 1j * (np.arange(n) * -0.75 + 2)).astype(np_type)
        if n > 3:
            flat[1] = complex(np.inf, -0.0)
            flat[2] = complex(np.nan, 1)
    else:
        flat = (np.arange(n) * 0.375 - 2.5).astype(np_type)
        if n:
            flat[0] = 1.5
        if n > 3:
            flat[1], flat[2], flat[3] = -0.0, np.inf, np.nan
    return flat.reshape(shape)


def scalar(dtype: str) -> np.ndarray[Any, Any]:
    return sample(dtype, (1,)).reshape(())


def case(label: str, proto: Any) -> dict[str, Any]:
    expected = tf.make_ndarray(proto)
    dtype = tf.dtypes.as_dtype(proto.dtype).name
    assert np.dtype(DTYPES[dtype]) == expected.dtype, (label, expected.dtype)
    fields = sorted(f.name for f, _ in proto.ListFields() if f.name not in ("dtype", "tensor_shape"))
    return {
        "label": label,
        "dtype": dtype,
        "shape": list(expected.shape),
        "fields": fields,
        "proto": base64.b64encode(proto.SerializeToString()).decode(),
        "expected": base64.b64encode(np.ascontiguousarray(expected).tobytes()).decode(),
    }


def check_reply_readable(dtype: str, shape: tuple[int, ...]) -> None:
    """A tensorps reply (tensor_content for every dtype) reads back in TensorFlow as the array it holds."""
    array = sample(dtype, shape)
    made = tf.make_tensor_proto(array)  # dtype and shape as TensorFlow writes them
    proto = type(made)(dtype=made.dtype, tensor_shape=made.tensor_shape, tensor_content=array.tobytes())
    read = tf.make_ndarray(proto)
    assert read.dtype == array.dtype and read.shape == array.shape, (dtype, shape)
    assert read.tobytes() == array.tobytes(), (dtype, shape)


def main() -> int:
    cases = []
    for dtype, np_type in DTYPES.items():
        for shape in SHAPES:
            name = "x".join(map(str, shape)) or "scalar"
            cases.append(case(f"{dtype}/{name}", tf.make_tensor_proto(sample(dtype, shape))))
            check_reply_readable(dtype, shape)
        one = scalar(dtype)
        # The splat rule: one value for many elements, and a few values whose last one repeats.
        cases.append(case(f"{dtype}/splat 3x4", tf.make_tensor_proto(one, shape=[3, 4])))
        few = sample(dtype, (2,))
        cases.append(case(f"{dtype}/splat 2 values to 2x3x4", tf.make_tensor_proto(few, shape=[2, 3, 4])))
        cases.append(case(f"{dtype}/splat 1 value to (1,)", tf.make_tensor_proto(one, shape=[1])))
        # No values at all for 3 elements: TensorFlow reads zeros.
        empty = np.zeros(0, np_type)
        cases.append(case(f"{dtype}/no values for 3", tf.make_tensor_proto(empty, shape=[3])))
    # Python values as tf.make_tensor_proto converts them (float -> float32, int -> int32, ...).
    python_values: list[tuple[str, Any, dict[str, Any]]] = [
        ("python float", 1.5, {}),
        ("python int", 7, {}),
        ("python big int", 2**40, {}),
        ("python bool", True, {}),
        ("python complex", 1 + 2j, {}),
        ("python list of floats", [1.0, 2.5, -3.0], {}),
        ("python nested ints", [[1, 2], [3, 4]], {}),
        ("python list of bools", [True, False, True], {}),
        ("python float splat", 1.5, {"shape": [3, 4]}),
        ("python int as int64 splat", 3, {"dtype": tf.int64, "shape": [2, 2]}),
        ("python float as float16", 0.1, {"dtype": tf.float16}),
        ("python float as bfloat16 splat", -2.75, {"dtype": tf.bfloat16, "shape": [5]}),
        ("python list as uint16", [1, 65535, 2], {"dtype": tf.uint16}),
        ("python complex as complex64 splat", 1 - 1j, {"dtype": tf.complex64, "shape": [2, 2]}),
        ("python empty list for 3", [], {"shape": [3]}),
        ("python float as float64", 0.1, {"dtype": tf.float64}),
    ]
    for label, value, kwargs in python_values:
        cases.append(case(label, tf.make_tensor_proto(value, **kwargs)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "generator": "scripts/make_tf_fixtures.py",
        "tensorflow": tf.__version__,
        "cases": cases,
    }
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{len(cases)} cases written to {OUT} (TensorFlow {tf.__version__})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
