"""One operation of a batch as the client sends it (shared by batch.py and rows.py)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from tensorps.client.codec import DType, Shape

Array = np.ndarray[Any, Any]


class QueuedOp(NamedTuple):
    """One operation as the client sends it; flags are explicit (None: the op has no such flag)."""

    kind: int
    name: str
    array: Array | None = None
    dtype: DType | None = None
    shape: Shape | None = None
    validate_shape: bool | None = None
    use_locking: bool | None = None
    read_value: bool = True
    # Row operations and optimizers (rows.py): their tensor inputs, slot variables and attributes.
    inputs: tuple[Array, ...] = ()
    slots: tuple[str, ...] = ()
    batch_dims: int = 0
    use_nesterov: bool = False
    update_slots: bool = True
    multiply_linear_by_lr: bool = False
