"""The supervisor: claims the port, forks N workers over one store, restarts those that die (with
backoff), follows their readiness for health, and stops them all on SIGTERM/SIGINT within the grace period.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from tensorps.server.auth import TokenAuth
from tensorps.server.config import ServerConfig
from tensorps.server.metrics import Metrics
from tensorps.server.persist import lifecycle
from tensorps.server.signals import SignalPipe, blocked, die_with_parent
from tensorps.server.worker import StartupError, run_worker

log = logging.getLogger("tensorps.server")


def claim_bulk_ports(config: ServerConfig) -> None:
    """With a fixed --bulk-port P, fail unless P..P+workers-1 are free on the host."""
    if config.bulk_port <= 0:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    for index in range(config.workers):
        port = config.worker_bulk_port(index)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host.strip("[]"), port))
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                what = "is already in use" if in_use else f"cannot be bound: {exc.strerror}"
                raise StartupError(f"bulk port {port} (worker {index}) on {config.host} {what}") from None


def claim_port(config: ServerConfig) -> tuple[int, socket.socket]:
    """Fail if any socket holds the port; resolve port 0 to a free port; return it with a socket that
    holds it for the server's lifetime.

    gRPC sets SO_REUSEPORT, which would let a second server silently share a busy port, so the check binds a
    plain socket first. The held socket (SO_REUSEPORT like the workers' gRPC sockets, never listening) keeps
    anything else from taking the port before the workers bind it: an ephemeral bind of another process, or
    of a worker's own bulk listener.
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host.strip("[]"), config.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {config.port} on {config.host} is already in use") from None
            raise StartupError(f"cannot bind {config.address}: {exc.strerror}") from None
        port: int = probe.getsockname()[1]
    held = socket.socket(family, socket.SOCK_STREAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((config.host.strip("[]"), port))
    except OSError as exc:
        held.close()
        taken = f"port {port} on {config.host} was taken while the server started: {exc.strerror}"
        raise StartupError(taken) from None
    return port, held


@dataclass
class _Worker:
    pid: int
    started: float
    failures: int = 0


# The supervisor's signals: SIGTERM/SIGINT stop (a second one forces), SIGHUP reloads the tokens.
SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_RESTART_BACKOFF_MAX = 10.0


@dataclass
class Supervisor:
    config: ServerConfig
    auth: TokenAuth | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    stopping: bool = False
    force: bool = False
    # One byte shared with the workers (inherited through fork): 1 while every worker is up.
    status: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 1))
    metrics: Metrics | None = None

    def _spawn(self, slot: int, failures: int = 0) -> None:
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        with blocked(SUPERVISOR_SIGNALS) as mask:
            pid = os.fork()
            if pid == 0:
                self._become_worker(parent, ready_r, ready_w, mask, slot)
        os.close(ready_w)
        self.workers[slot] = _Worker(pid, time.monotonic(), failures)
        self._ready_fds.append(ready_r)
        self._count_workers()

    def _count_workers(self) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self.workers))

    def _worker_died(self, slot: int, *, replaced: bool) -> None:
        pid = self.workers.pop(slot).pid
        if self.metrics is not None:
            self.metrics.worker_died(pid, replaced=replaced)
        self._count_workers()

    def _become_worker(
        self, parent: int, ready_r: int, ready_w: int, mask: Sequence[int], slot: int
    ) -> NoReturn:
        """The child's side of _spawn: serve as a worker, then exit without returning into the supervisor."""
        code = 1
        try:
            os.close(ready_r)
            self._signals.close()  # the supervisor's pipe: this process handles its own signals
            # A worker must not outlive its supervisor (SIGKILLed, say): it would keep the port and the
            # store, and a new server would refuse to start. The kernel sends SIGTERM when it dies.
            if die_with_parent(parent):
                code = run_worker(
                    self.config, ready_w, self.status, self.auth, mask, index=slot, metrics=self.metrics
                )
            else:
                log.warning("worker %d: the supervisor died before it started; exiting", os.getpid())
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def _pause(self, timeout: float, fds: Sequence[int] = ()) -> list[int]:
        """Wait up to `timeout` seconds, acting on any signal received; returns the readable `fds`."""
        received, readable = self._signals.wait(max(0.0, timeout), fds)
        for signum in received:
            self._on_signal(signum)
        return readable

    def _sleep(self, seconds: float) -> None:
        """Sleep, acting on signals, until `seconds` pass or the server is stopping."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            self._pause(left)

    def _on_signal(self, signum: int) -> None:
        """Act on a signal (from the main loop, never from a handler: this logs and signals workers)."""
        if signum == signal.SIGHUP:
            # Workers reload only if the file reads well; otherwise every process keeps the same tokens.
            if self.auth is not None and self.auth.reload(announce=False):
                self._signal_workers(signal.SIGHUP)
            return
        if self.stopping:
            if not self.force:
                self.force = True
                log.warning("second signal: stopping workers at once")
                self._signal_workers(signal.SIGKILL)
            return
        self.stopping = True
        self.status[0] = 0
        log.info(
            "received %s: finishing in-flight calls (grace %.1f s)",
            signal.Signals(signum).name,
            self.config.grace,
        )
        self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def _wait_ready(self, timeout: float) -> bool:
        """Whether every newly spawned worker reported ready in time; their pipes are closed either way."""
        deadline = time.monotonic() + timeout
        pending = list(self._ready_fds)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for fd in self._pause(left, pending):
                    if not os.read(fd, 1):
                        return False  # the worker died before it was ready
                    pending.remove(fd)
            return True
        finally:
            for fd in self._ready_fds:
                os.close(fd)
            self._ready_fds.clear()

    def run(self, signals: SignalPipe | None = None) -> int:
        """Supervise the workers until told to stop; `signals` may hold signals that came before."""
        self._ready_fds: list[int] = []
        self._signals = signals or SignalPipe(SUPERVISOR_SIGNALS)
        try:
            return self._serve()
        finally:
            self._signals.close()
            # Stopped: later signals (a second SIGTERM sent a moment too late) change nothing now. Ignored
            # rather than left to Python, which restores the default handlers at exit and would turn
            # exit code 0 into death by SIGTERM.
            for signum in SUPERVISOR_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)

    def _serve(self) -> int:
        self._pause(0.0)  # a signal that came while the store was being made
        if self.stopping:
            return 0
        for slot in range(self.config.workers):
            self._spawn(slot)
        ready = self._wait_ready(30.0)
        if self.stopping:  # told to stop while the workers started
            self._reap_all(self.config.grace + 5.0)
            return 0
        if not ready:
            log.error("workers failed to start")
            self._signal_workers(signal.SIGKILL)
            self._reap_all(5.0)
            return 1
        self.status[0] = 1  # before the ready line: health answers SERVING once it is printed
        log.info(
            "tensorps ready: serving on %s with %d worker%s, store %s",
            self.config.address,
            self.config.workers,
            "" if self.config.workers == 1 else "s",
            self.config.store_path,
        )
        while not self.stopping:
            self._reap_and_restart()
            self._pause(0.05)
        self._reap_all(self.config.grace + 5.0)
        return 0

    def _reap_and_restart(self) -> None:
        for slot, worker in list(self.workers.items()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0 or self.stopping:
                continue
            cause = _describe_exit(status)
            lived = time.monotonic() - worker.started
            failures = worker.failures + 1 if lived < 5.0 else 0
            delay = min(_RESTART_BACKOFF_MAX, 0.1 * 2**failures) if failures else 0.0
            log.warning("worker %d %s; restarting it in %.1f s", worker.pid, cause, delay)
            lifecycle.sweep(self.config.store_path)  # it may have died amid a create or a delete
            self.status[0] = 0
            self._worker_died(slot, replaced=True)
            self._sleep(delay)
            if not self.stopping:
                self._spawn(slot, failures)
                if self._wait_ready(30.0) and not self.stopping:
                    log.info("worker %d replaced worker %d", self.workers[slot].pid, worker.pid)
                    self.status[0] = 1

    def _reap_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.workers:
            for slot, worker in list(self.workers.items()):
                try:
                    pid, status = os.waitpid(worker.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = worker.pid, 0
                if pid:
                    log.info("worker %d %s", worker.pid, _describe_exit(status))
                    self._worker_died(slot, replaced=False)
            if time.monotonic() > deadline and not self.force:
                log.warning("workers still running after the grace period: killing them")
                self.force = True
                self._signal_workers(signal.SIGKILL)
            self._pause(0.02)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"
