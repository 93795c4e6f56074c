"""Server processes started by the benchmark: wait for their ready line, always stop them."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence

from bench import procstat


class StartError(RuntimeError):
    """A server did not come up; the message carries its log."""


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot be told to pick one themselves)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """A child process whose log (stdout and stderr merged) is drained until it exits."""

    def __init__(
        self,
        command: Sequence[str],
        ready: re.Pattern[str],
        *,
        cleanup: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> None:
        self.command = list(command)
        self.cleanup = list(cleanup)
        self.log: list[str] = []
        self.match: re.Match[str] | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group: a ^C at the terminal reaches the benchmark, which stops servers in order.
            start_new_session=True,
        )
        # The pipe must be drained for the server's whole life, or a chatty server would block on it.
        self._reader = threading.Thread(target=self._drain, args=(ready,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or self.match is None:
            self.stop()
            raise StartError(f"{' '.join(self.command)} did not become ready:\n" + "\n".join(self.log[-30:]))

    def _drain(self, ready: re.Pattern[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            if self.match is None:
                self.match = ready.search(line)
                if self.match is not None:
                    self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL for the whole tree if it lingers; removes the cleanup paths either way."""
        try:
            if self.proc.poll() is None:
                pids = procstat.tree(self.proc.pid)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.proc.wait(10)
            self._reader.join(5)
            return self.proc.returncode
        finally:
            for path in self.cleanup:
                shutil.rmtree(path, ignore_errors=True)
