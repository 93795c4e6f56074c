"""tensorps itself: `python -m tensorps.server` on a free port with its own store, and its Client."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.backends.base import Array, Server, Target
from bench.backends.process import ServerProcess
from tensorps.client import AlreadyExistsError, Client

_READY = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")
SHM_LABEL = "tensorps shm:// (same host)"
PER_VARIABLE = "per-variable calls"  # the model-step rows' note while the client lacks the batch API


def label(workers: int, *, bulk: bool = True) -> str:
    suffix = "" if bulk else ", bulk channel off"
    return f"tensorps ({workers} worker{'' if workers == 1 else 's'}{suffix})"


def start(workers: int, *, bulk: bool = True) -> Server:
    """A server; bulk=False starts it with --bulk-port off (every byte over gRPC, as before the channel)."""
    # A store of our own, so that a benchmark never touches a real server's variables.
    store = f"/dev/shm/tensorps-bench-{uuid.uuid4().hex[:12]}"
    command = [sys.executable, "-m", "tensorps.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--workers", str(workers), "--store", store, "--grace", "5", "--log-level", "INFO"]
    if not bulk:
        command += ["--bulk-port", "off"]
    process = ServerProcess(command, _READY, cleanup=[store])
    assert process.match is not None
    address = f"{process.match.group(1)}:{process.match.group(2)}"
    return Server(label(workers, bulk=bulk), Target("tensorps", address), process, store=store)


class TensorpsEndpoint:
    """A Client on "host:port" or "shm://STORE". A model step uses the batch API of issue 9 (read_many,
    assign_many, assign_add_many: one call each way) when this client has it, else one call per variable.
    """

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=300)
        self.calls = 0
        # Looked up, not called by name: not every client has the batch API (issue 9) yet.
        self._read_many: Callable[..., Any] | None = getattr(self.client, "read_many", None)
        self._assign_many: Callable[..., Any] | None = getattr(self.client, "assign_many", None)
        self._assign_add_many: Callable[..., Any] | None = getattr(self.client, "assign_add_many", None)
        self.batched = None not in (self._read_many, self._assign_many, self._assign_add_many)
        self.note = "" if self.batched else PER_VARIABLE

    def put(self, name: str, value: Array) -> None:
        try:
            self.client.create(name, value=value)
        except AlreadyExistsError:
            self.client.assign(name, value, read_value=False)

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        result = self.client.assign(name, value, read_value=read_value)
        return result if read_value else None

    def read(self, name: str) -> Array:
        return self.client.read(name)

    def gather(self, name: str, indices: Array) -> Array:
        rows: Array = self.client.gather(name, indices)
        return rows

    def scatter_add(self, name: str, indices: Array, updates: Array, *, use_locking: bool) -> None:
        self.client.scatter_add(name, indices, updates, use_locking=use_locking)

    def pull(self, names: Sequence[str]) -> dict[str, Array]:
        if self.batched and self._read_many is not None:
            self.calls += 1
            return dict(self._read_many(list(names)))
        self.calls += len(names)
        return {name: self.client.read(name) for name in names}

    def push(self, values: Mapping[str, Array], *, add: bool) -> None:
        # The API's defaults otherwise, as TF's: assign locks, assign_add does not.
        many = self._assign_add_many if add else self._assign_many
        if self.batched and many is not None:
            self.calls += 1
            many(values, read_value=False)
            return
        self.calls += len(values)
        write = self.client.assign_add if add else self.client.assign
        for name, value in values.items():
            write(name, value, read_value=False)

    def batching(self, *, add: bool) -> str:
        if self.batched:
            return "read_many + " + ("assign_add_many" if add else "assign_many")
        return "read + " + ("assign_add" if add else "assign") + " per variable"

    def close(self) -> None:
        self.client.close()
