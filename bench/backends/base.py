"""What every system under test provides: a Target to reach it, an Endpoint to call it, a running Server."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bench import procstat
from bench.backends.process import ServerProcess

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Target:
    kind: str  # "tensorps", "naive", "redis" or "tf"
    address: str


class Endpoint(Protocol):
    """The operations every system offers, in the words of tensorps's client.

    `pull` and `push` move a whole model in as few calls as the system allows; `calls` counts the requests
    they send (pull and push add theirs), `batching` says how they travel and `note` is appended to the
    system's label in the model-step table ("" when there is nothing to say).
    """

    calls: int
    note: str

    def put(self, name: str, value: Array) -> None:
        """Create the variable with `value`, or overwrite it if it exists (untimed setup)."""

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        """Overwrite the variable; with read_value, return its value after the write."""

    def read(self, name: str) -> Array: ...

    def pull(self, names: Sequence[str]) -> dict[str, Array]:
        """Every named variable's value."""

    def push(self, values: Mapping[str, Array], *, add: bool) -> None:
        """Assign every variable (add=False) or add a delta to each (add=True), without reading back."""

    def batching(self, *, add: bool) -> str:
        """How a pull and a push of this kind travel, for the report."""

    def close(self) -> None: ...


@dataclass
class Server:
    """A running system: where to reach it, its processes, and what it held before any data."""

    label: str
    target: Target
    process: ServerProcess
    store: str | None = None  # tensorps's shared-memory directory, measured and removed
    idle: procstat.Memory = field(init=False)

    def __post_init__(self) -> None:
        self.idle = procstat.tree_memory(self.process.pid)

    def cpu_seconds(self) -> float:
        return procstat.tree_cpu_seconds(self.process.pid)

    def memory(self) -> procstat.Memory:
        return procstat.tree_memory(self.process.pid)

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True)
class Skipped:
    """A system that cannot run here, and what to install to run it."""

    label: str
    reason: str
