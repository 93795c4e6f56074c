"""`make run`: start a real server, show a few plain calls, train a model with async SGD, stop the server.

    python -m tensorps.examples.demo [--port 50051] [--server-workers 2] [training flags...]
    make run ARGS="--num-workers 4 --update assign --steps 3000"

Flags it does not know go to `python -m tensorps.examples.train --role all` (see its --help). The exit code
is the training's (0 converged, 1 not, 2 error); if training succeeded but the server did not stop cleanly
with exit code 0, it is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO

from tensorps.client import TensorPSError
from tensorps.examples import basics
from tensorps.examples.healthcheck import wait_until_serving

EXIT_ERROR = 2
# The server's ready line names the port it really listens on (--port 0 picks one).
READY_LINE = re.compile(r"tensorps ready: serving on (\S+):(\d+) with")


def _say(text: str) -> None:
    print(f"== {text}", flush=True)


def _stop_once(signum: int, frame: FrameType | None) -> None:
    """SIGINT or SIGTERM: stop like ^C, and ignore further signals so that the cleanup runs to its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_training(command: list[str]) -> int:
    train = subprocess.Popen(command)
    try:
        return train.wait()
    except KeyboardInterrupt:
        # SIGTERM makes the trainer stop its worker processes before it exits.
        if train.poll() is None:
            train.send_signal(signal.SIGTERM)
        try:
            train.wait(15)
        except subprocess.TimeoutExpired:
            train.kill()
            train.wait()
        raise


class ServerLog:
    """Passes the server's log (its stderr) through to ours and catches the port in its ready line."""

    def __init__(self, stream: IO[str]) -> None:
        self.port: int | None = None
        self._done = threading.Event()  # the ready line came, or the log ended
        self._thread = threading.Thread(target=self._follow, args=(stream,), daemon=True)
        self._thread.start()

    def _follow(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            match = READY_LINE.search(line)
            if match and self.port is None:
                self.port = int(match.group(2))
                self._done.set()
        self._done.set()

    def wait_for_port(self, timeout: float) -> int | None:
        """The port from the ready line, or None if the log ended or `timeout` passed without one."""
        self._done.wait(timeout)
        return self.port

    def close(self) -> None:
        """Wait for the rest of the log (the server has exited: its end of the pipe is closed)."""
        self._thread.join(5)


def start_server(args: argparse.Namespace) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "tensorps.server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.server_workers),
        "--grace",
        str(args.grace),
    ]
    if args.store:
        command += ["--store", args.store]
    _say(f"starting the server: {' '.join(command[1:])}")
    # Its own session: a terminal's ^C reaches only the demo, which then stops the server with one SIGTERM
    # (a second signal would make the server kill its workers at once). Its log comes through a pipe,
    # so that the demo learns the port from the ready line.
    return subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True)


def stop_server(server: subprocess.Popen[str], grace: float) -> int:
    if server.poll() is None:
        _say(f"stopping the server (SIGTERM to pid {server.pid})")
        server.send_signal(signal.SIGTERM)
    try:
        # The server gives in-flight calls `grace` seconds, then kills its workers after 5 more.
        code = server.wait(grace + 15)
    except subprocess.TimeoutExpired:
        _say("the server did not stop in time: killing it")
        server.kill()
        code = server.wait()
    _say(f"server exited with code {code}")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorps.examples.demo",
        allow_abbrev=False,
        description="Start a tensorps server, run the example worker and the training job against it, "
        "stop it. Other flags are passed to `python -m tensorps.examples.train`.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the server listens on")
    parser.add_argument(
        "--port", type=int, default=50051, help="server port; 0 picks a free one (named by its ready line)"
    )
    parser.add_argument("--server-workers", type=int, default=2, help="server processes")
    parser.add_argument("--store", default=None, help="store directory (default /dev/shm/tensorps-PORT)")
    parser.add_argument("--grace", type=float, default=5.0, help="server's shutdown grace period, seconds")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds for the server to start")
    args, train_args = parser.parse_known_args(argv)
    host = f"[{args.host}]" if ":" in args.host else args.host

    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    server = start_server(args)
    assert server.stderr is not None
    server_log = ServerLog(server.stderr)

    def exited() -> str | None:
        status = server.poll()
        return None if status is None else f"the server exited with code {status}"

    code = EXIT_ERROR
    try:
        started = time.monotonic()
        # Wait for the ready line rather than polling --port: with --port 0 only the line names the port,
        # and a health check of a fixed port could be answered by another server that holds it.
        port = server_log.wait_for_port(args.ready_timeout)
        if port is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(5)  # the log ended: the server is exiting
            reason = exited() or f"no ready line within {args.ready_timeout:g} s"
            _say(f"the server did not become ready: {reason}")
            return EXIT_ERROR
        target = f"{host}:{port}"
        left = max(1.0, args.ready_timeout - (time.monotonic() - started))
        serving, description = wait_until_serving(target, left, give_up=exited)
        if not serving:
            _say(f"the server did not become ready: {description}")
            return EXIT_ERROR
        _say(f"server healthy at {target} after {time.monotonic() - started:.1f} s")

        basics.run(target)

        command = [sys.executable, "-m", "tensorps.examples.train", "--role", "all", *train_args]
        command += ["--target", target]
        _say(f"training: {' '.join(command[1:])}")
        code = run_training(command)
        _say(f"training exited with code {code}")
    except TensorPSError as exc:
        _say(f"the example worker failed: {exc}")
        code = EXIT_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        code = 130
    finally:
        server_code = stop_server(server, args.grace)
        server_log.close()
    if code == 0 and server_code != 0:
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
