"""A cluster of real server processes on loopback ports, for the cluster tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Mapping, Sequence

from support import ServerProcess, fresh_store_path, remove_store
from tensorps.server import __main__ as server_cli
from tensorps.server.config import ServerConfig


def config_with_env(env: Mapping[str, str], hostname: str | None = None) -> ServerConfig:
    """The configuration the server makes of these TENSORPS_* variables (and no flags) on host `hostname`."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        if hostname is not None:
            os.environ["HOSTNAME"] = hostname
        return server_cli.config_from_args([])
    finally:
        os.environ.clear()
        os.environ.update(saved)


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together, so that they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalCluster:
    """`size` servers on loopback, each started with --cluster (all members) and its --shard-index."""

    def __init__(self, size: int, *args: str, workers: int = 1) -> None:
        self.args = args
        self.workers = workers
        self.stores = [fresh_store_path() for _ in range(size)]
        self.servers: list[ServerProcess | None] = [None] * size
        # The ports are chosen before the servers bind them (every member must know every address), so
        # another process on the machine may take one meanwhile: then the cluster starts on new ports.
        for attempt in range(3):
            self.ports = free_ports(size)
            self.members = [f"127.0.0.1:{port}" for port in self.ports]
            try:
                for index in range(size):
                    self.start(index)
                return
            except RuntimeError:
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise

    @property
    def target(self) -> str:
        return ",".join(self.members)

    def start(self, index: int, *, extra: Sequence[str] = ()) -> ServerProcess:
        """Start shard `index` on its port and store (an existing store is attached: --keep-store)."""
        server = ServerProcess(
            "--cluster",
            self.target,
            "--shard-index",
            str(index),
            "--keep-store",
            *self.args,
            *extra,
            port=self.ports[index],
            store=self.stores[index],
            workers=self.workers,
        )
        self.servers[index] = server
        return server

    def crash(self, index: int) -> None:
        """SIGKILL shard `index`'s supervisor and workers; its store stays, as after a crash."""
        server = self.servers[index]
        assert server is not None
        # The supervisor first (it would replace a killed worker), then the workers it had.
        for pid in [server.proc.pid, *server.worker_pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.proc.wait(10)
        server._reader.join(5)
        if server.proc.stderr is not None:
            server.proc.stderr.close()
        self.servers[index] = None

    def close(self) -> None:
        for index, server in enumerate(self.servers):
            if server is not None:
                try:
                    server.stop()
                finally:
                    if server.proc.poll() is None:
                        server.kill()
            self.servers[index] = None
        for store in self.stores:
            remove_store(store)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
