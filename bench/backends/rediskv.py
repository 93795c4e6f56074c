"""Redis as a tensor store: the raw bytes under a key with SET and GET, the client keeping dtype and shape.

The server is Debian's redis-server on a free loopback port, with persistence off (no RDB, no AOF) so
that it measures what it holds in memory, not its disk.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np

try:
    import redis
except ImportError:  # optional: the run then reports Redis as skipped
    redis = None  # type: ignore[assignment]

from bench.backends.base import Array, Server, Skipped, Target
from bench.backends.process import ServerProcess, free_port

LABEL = "Redis"
_READY = re.compile(r"Ready to accept connections")
INSTALL = "install with `apt-get install redis-server` and `pip install redis`"


def start() -> Server | Skipped:
    binary = shutil.which("redis-server")
    if binary is None or redis is None:
        missing = "redis-server" if binary is None else "the redis Python package"
        return Skipped(LABEL, f"skipped: {missing} not found; {INSTALL}")
    workdir = tempfile.mkdtemp(prefix="tensorps-bench-redis-")
    port = free_port()
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    # --dir: even a stray SAVE or a shutdown writes nowhere near the user's working directory.
    command += ["--dir", workdir, "--logfile", "", "--daemonize", "no"]
    process = ServerProcess(command, _READY, cleanup=[workdir])
    return Server(LABEL, Target("redis", f"127.0.0.1:{port}"), process)


def _bytes(value: Array) -> memoryview:
    # redis-py sends a memoryview without copying it, and takes len() as the byte count: give it bytes.
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8).data


class RedisEndpoint:
    """GET/SET per tensor; a model step pulls with one MGET and assigns with one MSET. Redis cannot add two
    tensors, so assign_add is a read-modify-write in the client: MGET, numpy add, MSET (two round trips,
    and not atomic: a concurrent writer's update between them would be lost).
    """

    note = ""

    def __init__(self, address: str) -> None:
        self.calls = 0
        host, port = address.rsplit(":", 1)
        self.client = redis.Redis(host=host, port=int(port))
        self.layout: dict[str, tuple[np.dtype[np.generic], tuple[int, ...]]] = {}

    def _array(self, name: str, raw: object) -> Array:
        if not isinstance(raw, bytes):
            raise KeyError(f"redis has no key {name!r}")
        dtype, shape = self.layout[name]
        return np.frombuffer(raw, dtype).reshape(shape)

    def put(self, name: str, value: Array) -> None:
        self.assign(name, value, read_value=False)

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        self.layout[name] = (value.dtype, value.shape)
        if not read_value:
            self.client.set(name, _bytes(value))
            return None
        # SET then GET in one round trip: Redis has no "set and return the new value".
        pipe = self.client.pipeline(transaction=False)
        pipe.set(name, _bytes(value))
        pipe.get(name)
        _ok, raw = pipe.execute()
        return self._array(name, raw)

    def read(self, name: str) -> Array:
        return self._array(name, self.client.get(name))

    # ---- rows: a table is a hash of row id -> the row's bytes ------------------------------------------

    def put_table(self, name: str, table: Array) -> None:
        self.layout[name] = (table.dtype, table.shape[1:])
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(table), 10_000):
            chunk = table[start : start + 10_000]
            pipe.hset(name, mapping={start + i: _bytes(row) for i, row in enumerate(chunk)})
            if start % 100_000 == 0:
                pipe.execute()
        pipe.execute()

    def gather(self, name: str, indices: Array) -> Array:
        """HMGET of the rows."""
        dtype, shape = self.layout[name]
        raws = self.client.hmget(name, indices.tolist())
        if not all(isinstance(raw, bytes) for raw in raws):
            raise KeyError(f"redis's hash {name!r} lacks rows")
        return np.frombuffer(b"".join(raws), dtype).reshape(len(indices), *shape)  # type: ignore[arg-type]

    def scatter_add(self, name: str, indices: Array, updates: Array, *, use_locking: bool) -> None:
        """HMGET, add in the client (duplicates accumulate), HSET: two round trips, not atomic."""
        unique, where = np.unique(indices, return_inverse=True)
        rows = self.gather(name, unique).copy()
        np.add.at(rows, where, updates)
        self.client.hset(name, mapping={int(i): _bytes(row) for i, row in zip(unique, rows, strict=True)})

    def pull(self, names: Sequence[str]) -> dict[str, Array]:
        self.calls += 1
        raws = self.client.mget(names)
        return {name: self._array(name, raw) for name, raw in zip(names, raws, strict=True)}

    def push(self, values: Mapping[str, Array], *, add: bool) -> None:
        if add:
            current = self.pull(list(values))
            values = {name: current[name] + delta for name, delta in values.items()}
        for name, value in values.items():
            self.layout[name] = (value.dtype, value.shape)
        self.calls += 1
        self.client.mset({name: _bytes(value) for name, value in values.items()})

    def batching(self, *, add: bool) -> str:
        return "MGET + " + ("MGET, add in the client, MSET (not atomic)" if add else "MSET")

    def close(self) -> None:
        self.client.close()
