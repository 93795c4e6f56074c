"""tensorps itself: `python -m tensorps.server` on a free port with its own store, and its Client."""

from __future__ import annotations

import re
import sys
import uuid

from bench.backends.base import Array, Server, Target
from bench.backends.process import ServerProcess
from tensorps.client import AlreadyExistsError, Client

_READY = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")


def label(workers: int) -> str:
    return f"tensorps ({workers} worker{'' if workers == 1 else 's'})"


def start(workers: int) -> Server:
    # A store of our own, so that a benchmark never touches a real server's variables.
    store = f"/dev/shm/tensorps-bench-{uuid.uuid4().hex[:12]}"
    command = [sys.executable, "-m", "tensorps.server", "--host", "127.0.0.1", "--port", "0"]
    command += ["--workers", str(workers), "--store", store, "--grace", "5", "--log-level", "INFO"]
    process = ServerProcess(command, _READY, cleanup=[store])
    assert process.match is not None
    address = f"{process.match.group(1)}:{process.match.group(2)}"
    return Server(label(workers), Target("tensorps", address), process, store=store)


class TensorpsEndpoint:
    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=300)

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

    def close(self) -> None:
        self.client.close()
