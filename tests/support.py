"""Real server processes for tests: started on a free loopback port, stopped and checked for leaks."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")


# Every store path this test process handed out, so that the suite can check it left none behind.
STORES: list[str] = []


def fresh_store_path() -> str:
    path = f"/dev/shm/tensorps-test-{uuid.uuid4().hex[:12]}"
    STORES.append(path)
    return path


class ServerProcess:
    """`python -m tensorps.server` in a child process; `log` collects its stderr lines."""

    def __init__(
        self,
        *args: str,
        store: str | None = None,
        workers: int = 1,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        port: int = 0,
        wait: bool = True,
        open_files: int | None = None,
        session: bool = False,
        wrapper: Sequence[str] = (),
    ) -> None:
        """`open_files` runs the server under that open-file limit (soft and hard, as `ulimit -n`); `session`
        gives it a session and process group of its own; `wrapper` is a command that runs it (a mount
        namespace of its own, say, or `nsenter --mount=...` for a store on a private tmpfs)."""
        self.store = store or fresh_store_path()
        self.host = host
        command = [
            *wrapper,
            sys.executable,
            "-m",
            "tensorps.server",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--store",
            self.store,
            "--grace",
            "5",
            *args,
        ]
        if open_files is not None:
            command = ["sh", "-c", 'ulimit -n "$0" && exec "$@"', str(open_files), *command]
        self.proc = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            # A session (and process group) of its own, for tests that signal the whole group.
            start_new_session=session,
        )
        self.log: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                self.port = int(match.group(2))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError("server did not become ready:\n" + "\n".join(self.log))

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def healthy(self, timeout: float = 2.0) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code

    def kill(self) -> None:
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        remove_store(self.store)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self.proc.poll() is None:
                self.kill()


def remove_store(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(interval)
    return False


def run(command: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        list(command), capture_output=True, text=True, check=False, **kwargs
    )
    return result


def same_values(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> bool:
    """Equal dtype, shape and bytes; NaNs match NaNs whatever their payload (arithmetic may pick either)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.tobytes() == b.tobytes():
        return True
    if a.dtype.kind not in "fcV":
        return False
    wide_a, wide_b = (x.reshape(-1).astype(np.complex128) for x in (a, b))
    nan_a = np.isnan(wide_a.real) | np.isnan(wide_a.imag)
    nan_b = np.isnan(wide_b.real) | np.isnan(wide_b.imag)
    return bool(np.array_equal(nan_a, nan_b)) and (
        a.reshape(-1)[~nan_a].tobytes() == b.reshape(-1)[~nan_b].tobytes()
    )
