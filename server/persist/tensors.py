"""Variables as safetensors tensors and back.

Every dtype safetensors defines is stored as itself (bfloat16 as BF16, complex64 as C64, bool as BOOL);
complex128, which it lacks, as float64 pairs: shape + [2], marked `"stored_as": "float64_pairs"` in the
manifest (numpy's own layout of complex128, so `tensor.view(np.complex128)[..., 0]` gives it back).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorps.client.codec import DType, Shape

FLOAT64_PAIRS = "float64_pairs"
Array = np.ndarray[Any, Any]


def stored_as(dtype: DType, shape: Shape) -> tuple[str, list[int], str | None]:
    """(safetensors dtype, shape, manifest mark) of a variable of `dtype` and `shape`."""
    if dtype.name == "complex128":
        return "float64", [*shape, 2], FLOAT64_PAIRS
    return dtype.name, list(shape), None
