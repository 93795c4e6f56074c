"""Single-client measurements. Every write carries a fresh tag and every result is compared with what was
written, so that a system that drops or mixes up writes fails the run instead of looking fast.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.backends import Array, Endpoint

_tags = itertools.count(1)


class VerificationError(AssertionError):
    """A system returned or stored something other than what was written."""


def payload(nbytes: int, seed: int) -> Array:
    return np.random.default_rng(seed).standard_normal(nbytes // 4, dtype=np.float32)


def tag(value: Array) -> Array:
    """Mark `value` (in place) as a write never seen before; float32 holds the counter exactly to 2**24."""
    number = float(next(_tags) % (1 << 24))
    value[0] = value[-1] = number
    return value


def check(what: str, got: Any, want: Array) -> None:
    if not isinstance(got, np.ndarray) or got.dtype != want.dtype or got.shape != want.shape:
        seen = f"{got.dtype}{list(got.shape)}" if isinstance(got, np.ndarray) else type(got).__name__
        raise VerificationError(f"{what}: expected float32{list(want.shape)}, got {seen}")
    if not np.array_equal(got, want):
        raise VerificationError(f"{what}: the value differs from the one written")


@dataclass(frozen=True)
class Latency:
    p50: float  # seconds
    p99: float
    rate: float  # calls per second, back to back


def small_assigns(endpoint: Endpoint, name: str, value: Array, calls: int) -> Latency:
    """Sequential read_value=True assigns (the API's default), each result checked outside its timing."""
    times = np.empty(calls)
    for i in range(calls):
        tag(value)
        start = time.perf_counter()
        got = endpoint.assign(name, value, read_value=True)
        times[i] = time.perf_counter() - start
        check(f"assign {name}", got, value)
    check(f"read back {name}", endpoint.read(name), value)
    p50, p99 = np.percentile(times, [50, 99])
    return Latency(float(p50), float(p99), calls / float(times.sum()))


def large_assigns(endpoint: Endpoint, name: str, value: Array, calls: int, *, read_value: bool) -> float:
    """GB/s of tensor bytes written (10**9 bytes), median call; read_value=True moves them back as well."""
    times = []
    for _ in range(calls):
        tag(value)
        start = time.perf_counter()
        got = endpoint.assign(name, value, read_value=read_value)
        times.append(time.perf_counter() - start)
        if read_value:
            check(f"assign {name}", got, value)
        check(f"read back {name}", endpoint.read(name), value)
    return value.nbytes / statistics.median(times) / 1e9


def large_reads(endpoint: Endpoint, name: str, value: Array, calls: int) -> float:
    """GB/s of tensor bytes read, median call."""
    endpoint.assign(name, tag(value), read_value=False)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        got = endpoint.read(name)
        times.append(time.perf_counter() - start)
        check(f"read {name}", got, value)
    return value.nbytes / statistics.median(times) / 1e9
