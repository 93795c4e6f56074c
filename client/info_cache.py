"""What a client remembers of the variables it has seen: their dtypes and sizes, to convert Python values
and to choose how a call travels (one message, a stream, the bulk channel) before it is sent."""

from __future__ import annotations

import threading

from tensorps.client import codec
from tensorps.client.codec import DType
from tensorps.client.infos import Array, VariableInfo
from tensorps.client.queued import QueuedOp

# How many prefixes' last reply sizes a client keeps (read_prefix batches: bulk or not).
_PREFIXES_KEPT = 1024


class InfoCache:
    """Dtypes and sizes last seen, by variable name; safe to use from any number of threads."""

    def __init__(self) -> None:
        self.dtypes: dict[str, DType] = {}
        self.sizes: dict[str, int] = {}
        self.prefix_sizes: dict[str, int] = {}  # bytes a read_prefix batch's prefix read last time
        self.row_sizes: dict[str, int] = {}  # bytes per index of a variable's last gather
        self._lock = threading.Lock()

    def remember(self, info: VariableInfo) -> VariableInfo:
        dtype = codec.dtype_of(info.dtype)
        with self._lock:
            self.dtypes[info.name] = dtype
            if info.shape is not None:
                self.sizes[info.name] = codec.nbytes_of(info.shape, dtype)
        return info

    def forget(self, name: str) -> None:
        with self._lock:
            self.dtypes.pop(name, None)
            self.sizes.pop(name, None)

    def note_rows(self, op: QueuedOp, rows: Array | None) -> None:
        """Remember a gather's bytes per index: the next gather's reply size is then known (a small one
        goes as one message, not over the bulk channel)."""
        if rows is not None and op.inputs[0].size:
            with self._lock:
                self.row_sizes[op.name] = rows.nbytes // op.inputs[0].size

    def note_prefix(self, prefix: str, nbytes: int) -> None:
        """Remember the bytes a read_prefix batch's prefix read."""
        with self._lock:
            if len(self.prefix_sizes) >= _PREFIXES_KEPT:
                self.prefix_sizes.clear()
            self.prefix_sizes[prefix] = nbytes
