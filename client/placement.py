"""Where a variable lives in a cluster: rendezvous hashing of its name, and TensorFlow's partitioners.

Placement is a pure function of the variable's name and the cluster's size, so that every client and every
server computes it alike with no coordinator (the definition is in the .proto, for other languages):

    score(i, name) = the first 8 bytes, big-endian, of SHA-256(UTF-8 of f"{i}\\n{name}")
    owner(name)    = the shard index i in 0..N-1 with the highest score (the lowest i on a tie)

Shards are named by index, not by address, so that "ps-0.ps:50051" and "ps-0.ps.default.svc:50051" place
alike. Growing the cluster from N to N+1 shards moves only the names whose new shard scores highest:
about 1/(N+1) of them, all onto the new shard.

Partitioned variables (TensorFlow's `partitioned_variables`): a logical variable split along axis 0 into
parts named `NAME/part_K`; the first `dim0 % n` parts get one more row. Its layout is a small int64
variable `PARTITIONS_PREFIX + NAME` (see `PartitionSpec`), which every client lists to find the partitioned
variables of the cluster.

Colocation (TensorFlow's colocate_with, for an optimizer's slots): `create(NAME, ..., colocate_with=PRIMARY)`
stores NAME on PRIMARY's shard, with a record `COLOCATED_PREFIX + NAME` beside it. A server serves a name
its hash gives another shard only when its own store holds that record; clients find the records by a
prefix read per shard. A slot of a partitioned PRIMARY is partitioned like it, part k colocated with
PRIMARY's part k.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tensorps.client import codec
from tensorps.client.codec import DType, Shape

# The layout variables of partitioned variables: `.partitions/NAME` holds [LAYOUT_VERSION, parts, *shape].
PARTITIONS_PREFIX = ".partitions/"
LAYOUT_VERSION = 1
PART_INFIX = "/part_"
# The colocation records: `.colocated/NAME` (uint8, the UTF-8 name of its primary) lives on the shard that
# holds NAME because it was created with colocate_with=PRIMARY (see `colocation_name`).
COLOCATED_PREFIX = ".colocated/"
METADATA_PREFIXES = (PARTITIONS_PREFIX, COLOCATED_PREFIX)


def score(index: int, name: str) -> int:
    """Shard `index`'s rendezvous score for `name` (the module docstring's definition)."""
    digest = hashlib.sha256(f"{index}\n{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(name: str, shards: int) -> int:
    """The shard index that owns `name` in a cluster of `shards` servers."""
    if shards <= 1:
        return 0
    best, best_score = 0, -1
    for index in range(shards):
        value = score(index, name)
        if value > best_score:
            best, best_score = index, value
    return best


def part_name(name: str, part: int) -> str:
    return f"{name}{PART_INFIX}{part}"


def layout_name(name: str) -> str:
    return PARTITIONS_PREFIX + name


def colocation_name(name: str) -> str:
    """The colocation record of `name` (and of the record itself: the record's own record is its own)."""
    return name if name.startswith(COLOCATED_PREFIX) else COLOCATED_PREFIX + name


def is_metadata(name: str) -> bool:
    """Whether `name` is one of the cluster's records (layouts, colocations), hidden from listings."""
    return name.startswith(METADATA_PREFIXES)


def split_rows(dim0: int, parts: int) -> list[int]:
    """TensorFlow's split of `dim0` rows into `parts`: the first dim0 % parts get one more row."""
    base, extra = divmod(dim0, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


@dataclass(frozen=True)
class PartitionSpec:
    """A partitioned variable's layout: its logical dtype and shape, and how many parts along axis 0."""

    name: str
    dtype: DType
    shape: Shape
    parts: int

    @property
    def rows(self) -> list[int]:
        return split_rows(self.shape[0], self.parts)

    @property
    def part_names(self) -> list[str]:
        return [part_name(self.name, k) for k in range(self.parts)]

    def part_shapes(self) -> list[Shape]:
        return [(rows, *self.shape[1:]) for rows in self.rows]

    def offsets(self) -> list[int]:
        """The first logical row of every part, and the row count as the last entry."""
        return [0, *np.cumsum(self.rows).tolist()]

    def split(self, array: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        """A value of the logical shape cut into its parts (views, no copy)."""
        bounds = self.offsets()
        return [array[bounds[k] : bounds[k + 1]] for k in range(self.parts)]

    def locate(self, rows: Any) -> list[tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
        """Where logical rows live, for row-wise (sparse) operations: per part that holds any of them,
        (part index, the rows' indices within that part, their positions in `rows`), parts in order.
        IndexError names a row outside [0, dim0)."""
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        dim0 = self.shape[0]
        bad = wanted[(wanted < 0) | (wanted >= dim0)]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} of variable '{self.name}' is not in [0, {dim0})")
        bounds = np.asarray(self.offsets(), dtype=np.int64)
        part_of = np.searchsorted(bounds, wanted, side="right") - 1
        found = []
        for part in np.unique(part_of):
            positions = np.flatnonzero(part_of == part)
            found.append((int(part), wanted[positions] - bounds[part], positions))
        return found

    def encode(self) -> np.ndarray[Any, Any]:
        """The layout variable's value: [LAYOUT_VERSION, parts, dtype code, rank, *shape] (int64)."""
        return np.array([LAYOUT_VERSION, self.parts, self.dtype.code, len(self.shape), *self.shape], np.int64)

    @classmethod
    def decode(cls, name: str, value: np.ndarray[Any, Any]) -> PartitionSpec:
        """The layout read back from its variable; CodecError if it is not one this client understands."""
        flat = [int(v) for v in np.asarray(value).reshape(-1)]
        if len(flat) < 4 or flat[0] != LAYOUT_VERSION or len(flat) != 4 + flat[3] or flat[1] < 1:
            raise codec.CodecError(f"{layout_name(name)} is not a partition layout: {flat[:8]}")
        return cls(name, codec.dtype_from_code(flat[2]), tuple(flat[4:]), flat[1])


class Partitioner(Protocol):
    """TensorFlow's partitioner interface: how many parts along each axis for a shape and dtype."""

    def __call__(self, shape: Sequence[int], dtype: Any) -> list[int]: ...


def fixed_size_partitioner(num_shards: int, axis: int = 0) -> Partitioner:
    """tf.compat.v1.fixed_size_partitioner: `num_shards` parts along `axis` (tensorps: axis 0 only), at
    most one per row."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, not {num_shards!r}")
    if axis != 0:
        raise ValueError("tensorps partitions along axis 0 only")

    def partitioner(shape: Sequence[int], dtype: Any) -> list[int]:
        parts = [1] * len(shape)
        if shape:
            parts[0] = max(1, min(num_shards, shape[0]))
        return parts

    return partitioner


def min_max_variable_partitioner(
    max_partitions: int = 1, axis: int = 0, min_slice_size: int = 256 << 10
) -> Partitioner:
    """tf.compat.v1.min_max_variable_partitioner: parts of at least `min_slice_size` bytes along axis 0,
    at most `max_partitions` and at most one per row."""
    if not isinstance(max_partitions, int) or max_partitions < 1:
        raise ValueError(f"max_partitions must be a positive int, not {max_partitions!r}")
    if axis != 0:
        raise ValueError("tensorps partitions along axis 0 only")
    if min_slice_size < 1:
        raise ValueError("min_slice_size must be positive")

    def partitioner(shape: Sequence[int], dtype: Any) -> list[int]:
        parts = [1] * len(shape)
        if not shape or shape[0] == 0:
            return parts
        nbytes = math.prod(shape) * codec.dtype_of(dtype).numpy.itemsize
        # TensorFlow rounds up: 1.5 slices' worth of bytes make two parts.
        parts[0] = int(max(1, min(max_partitions, shape[0], math.ceil(nbytes / min_slice_size))))
        return parts

    return partitioner


class MinSizePartitioner:
    """tf.distribute.experimental.partitioners.MinSizePartitioner: parts of at least `min_shard_bytes`
    along axis 0, at most `max_shards`."""

    def __init__(self, min_shard_bytes: int = 256 << 10, max_shards: int = 1, bytes_per_string: int = 16):
        if min_shard_bytes < 1 or max_shards < 1:
            raise ValueError("min_shard_bytes and max_shards must be positive")
        self._inner = min_max_variable_partitioner(max_shards, 0, min_shard_bytes)

    def __call__(self, shape: Sequence[int], dtype: Any) -> list[int]:
        return self._inner(shape, dtype)


class FixedShardsPartitioner:
    """tf.distribute.experimental.partitioners.FixedShardsPartitioner: `num_shards` parts along axis 0."""

    def __init__(self, num_shards: int) -> None:
        self._inner = fixed_size_partitioner(num_shards)

    def __call__(self, shape: Sequence[int], dtype: Any) -> list[int]:
        return self._inner(shape, dtype)


def parts_along_axis0(partitioner: Any, name: str, shape: Shape, dtype: DType) -> int:
    """How many parts `partitioner` gives the variable; ValueError if it splits any other axis."""
    parts = list(partitioner(list(shape), dtype.numpy))
    if len(parts) != len(shape) or any(p < 1 for p in parts):
        raise ValueError(f"the partitioner gave {parts} for variable '{name}' of shape {list(shape)}")
    if any(p != 1 for p in parts[1:]):
        raise ValueError(f"variable '{name}': tensorps partitions along axis 0 only, not {parts}")
    return parts[0] if parts else 1
