"""The systems under test. Each one is a server started here and a client ("endpoint") that any process
can open from a picklable Target, so that spawned client processes reach the same server.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.backends import naive, rediskv, tfps, tps
from bench.backends.base import Array, Endpoint, Server, Skipped, Target

__all__ = ["Array", "Endpoint", "Server", "Skipped", "Target", "connect"]

_ENDPOINTS: dict[str, Callable[[str], Endpoint]] = {
    "tensorps": tps.TensorpsEndpoint,
    "naive": naive.NaiveEndpoint,
    "redis": rediskv.RedisEndpoint,
    "tf": tfps.TFEndpoint,
}


def connect(target: Target) -> Endpoint:
    return _ENDPOINTS[target.kind](target.address)
