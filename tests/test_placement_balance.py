"""Placement balance: 1,000 variables of random sizes over 3 shards, variables above 256 KiB partitioned with
TensorFlow's MinSizePartitioner; the largest shard holds at most 1.25 times the mean bytes."""

from __future__ import annotations

import numpy as np
import pytest

from tensorps.client import codec, placement
from tensorps.client.placement import MinSizePartitioner, PartitionSpec

SHARDS = 3
MIN_SHARD_BYTES = 256 << 10
ROW_BYTES = 1024  # rows of 256 float32


def shard_bytes(seed: int, *, partition: bool) -> np.ndarray:
    """Bytes per shard of 1,000 variables of log-uniform sizes from 64 B to 64 MiB."""
    rng = np.random.default_rng(seed)
    float32 = codec.dtype_of(np.float32)
    partitioner = MinSizePartitioner(min_shard_bytes=MIN_SHARD_BYTES, max_shards=16)
    loads = np.zeros(SHARDS)
    for i in range(1000):
        nbytes = int(np.exp(rng.uniform(np.log(64), np.log(64 << 20))))
        shape = (max(1, nbytes // ROW_BYTES), 256)
        name = f"model/layer{i}/kernel"
        size = shape[0] * ROW_BYTES
        parts = 1
        if partition and size > MIN_SHARD_BYTES:
            parts = placement.parts_along_axis0(partitioner, name, shape, float32)
        if parts == 1:
            loads[placement.owner(name, SHARDS)] += size
            continue
        spec = PartitionSpec(name, float32, shape, parts)
        for part, part_shape in zip(spec.part_names, spec.part_shapes(), strict=True):
            loads[placement.owner(part, SHARDS)] += part_shape[0] * ROW_BYTES
    return loads


@pytest.mark.parametrize("seed", range(5))
def test_largest_shard_within_a_quarter_of_the_mean(seed: int) -> None:
    loads = shard_bytes(seed, partition=True)
    assert loads.sum() == shard_bytes(seed, partition=False).sum()  # partitioning loses no row
    assert loads.max() <= 1.25 * loads.mean(), loads
