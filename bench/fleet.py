"""Concurrent clients as separate processes: one Python process is bound by its GIL long before a server is.

The processes are spawned once (fork would copy grpc's threads) and reused for every measurement. A
measurement has two phases: every client connects and warms up, then all count the calls they complete
inside one shared wall-clock window while the parent samples the server's CPU time at its edges.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from bench import workloads
from bench.backends import Target, connect

_WARMUP_CALLS = 20
# Time for the "go" message to reach every client before the window opens.
_LEAD = 0.2


@dataclass(frozen=True)
class Task:
    target: Target
    name: str
    nbytes: int


@dataclass(frozen=True)
class Window:
    start: float  # time.time(): the one clock every process reads alike
    stop: float


@dataclass(frozen=True)
class Outcome:
    calls: int
    cpu: float  # this client process's CPU seconds over the window
    error: str | None = None


@dataclass(frozen=True)
class Concurrent:
    rate: float  # calls per second, all clients together
    server_cpu: float  # server CPU seconds per call, summed over its processes
    client_cpu: float  # client CPU seconds per call, summed over the client processes


def _client(task: Task, conn: Connection) -> Outcome:
    endpoint = connect(task.target)
    try:
        value = workloads.payload(task.nbytes, seed=zlib.crc32(task.name.encode()))
        endpoint.put(task.name, value)
        for _ in range(_WARMUP_CALLS):
            workloads.check(
                task.name, endpoint.assign(task.name, workloads.tag(value), read_value=True), value
            )
        conn.send(None)
        window: Window = conn.recv()
        time.sleep(max(0.0, window.start - time.time()))
        cpu = time.process_time()
        calls = 0
        while True:
            got = endpoint.assign(task.name, workloads.tag(value), read_value=True)
            done = time.time()
            workloads.check(f"assign {task.name}", got, value)
            if done > window.stop:
                break
            calls += 1
        cpu = time.process_time() - cpu
        workloads.check(f"read back {task.name}", endpoint.read(task.name), value)
        return Outcome(calls, cpu)
    finally:
        endpoint.close()


def _serve(conn: Connection) -> None:
    conn.send(None)  # imports done: the parent measures nothing while 8 interpreters still start
    while (task := conn.recv()) is not None:
        try:
            conn.send(_client(task, conn))
        except Exception as exc:
            conn.send(Outcome(0, 0.0, f"{type(exc).__name__}: {exc}"))


class Fleet:
    """`size` client processes; use as a context manager."""

    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[BaseProcess] = []
        for _ in range(size):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            conn.recv()

    def run(
        self, target: Target, names: list[str], nbytes: int, window: float, cpu: Callable[[], float]
    ) -> Concurrent:
        """Every client assigns its own variable for `window` seconds; `cpu` reads the server's CPU time."""
        for conn, name in zip(self.conns, names, strict=True):
            conn.send(Task(target, name, nbytes))
        errors: list[str] = []
        ready: list[Connection] = []
        for conn in self.conns:
            reply: Outcome | None = conn.recv()
            if reply is None:
                ready.append(conn)
            else:
                errors.append(str(reply.error))
        start = time.time() + _LEAD
        for conn in ready:
            conn.send(Window(start, start + window))
        time.sleep(max(0.0, start - time.time()))
        cpu_start = cpu()
        time.sleep(max(0.0, start + window - time.time()))
        cpu_used = cpu() - cpu_start
        outcomes: list[Outcome] = [conn.recv() for conn in ready]
        errors += [str(o.error) for o in outcomes if o.error]
        if errors:
            raise workloads.VerificationError(f"{target.kind} concurrent clients failed: {errors[0]}")
        calls = sum(o.calls for o in outcomes)
        if not calls:
            raise workloads.VerificationError(f"{target.kind}: no call completed in the {window} s window")
        client_cpu = sum(o.cpu for o in outcomes)
        return Concurrent(calls / window, cpu_used / calls, client_cpu / calls)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a client that died has closed its end
                conn.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
