"""Process lifecycle under hostile signals: group signals, a second signal, a killed supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from support import ServerProcess, wait_until
from tensorps.client import Client

HOLDER = str(Path(__file__).with_name("lock_holder.py"))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def waiting_for(path: str) -> int:
    """How many lock requests wait for the file at `path` (the blocked, "->", lines of /proc/locks)."""
    inode = str(os.stat(path).st_ino)
    lines = Path("/proc/locks").read_text().splitlines()
    # A line: "1: -> OFDLCK ADVISORY  WRITE -1 00:1b:266395 0 0" (the file is MAJOR:MINOR:INODE).
    return sum(
        "->" in line and any(w.count(":") == 2 and w.rsplit(":", 1)[1] == inode for w in line.split())
        for line in lines
    )


def test_group_sigterm_stops_every_process_cleanly() -> None:
    """SIGTERM to the whole process group (as `timeout` or systemd send it), 4 rounds: exit 0 at once."""
    for _round in range(4):
        # Each worker gets two SIGTERMs (the group's and the supervisor's), the second often while its
        # handler still runs: with a handler that takes a lock, one worker in three used to hang.
        server = ServerProcess(workers=3, session=True)
        try:
            workers = server.worker_pids()
            assert len(workers) == 3
            started = time.monotonic()
            os.killpg(server.proc.pid, signal.SIGTERM)
            code = server.proc.wait(15)
            elapsed = time.monotonic() - started
            server.stop()
        finally:
            if server.proc.poll() is None:
                server.kill()
        log = "\n".join(server.log)
        assert code == 0, log
        # --grace 5: a hung worker would be killed only after 10 s.
        assert elapsed < 8, f"the group took {elapsed:.1f} s to stop:\n{log}"
        assert not any(alive(pid) for pid in workers)
        assert log.count("stopped") >= 3 and "Traceback" not in log, log
        assert not os.path.exists(server.store)


def test_a_stream_of_group_signals_still_ends_with_exit_0() -> None:
    """SIGTERM to the group every 10 ms until the server is gone: it stops at once and still exits 0."""
    server = ServerProcess(workers=2, session=True)
    try:
        started = time.monotonic()
        while server.proc.poll() is None and time.monotonic() - started < 15:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGTERM)
            time.sleep(0.01)
        code = server.proc.wait(5)
        server.stop()
    finally:
        if server.proc.poll() is None:
            server.kill()
    log = "\n".join(server.log)
    # A signal that arrives while the interpreter exits must not turn exit 0 into death by SIGTERM.
    assert code == 0, log
    assert "Traceback" not in log and not os.path.exists(server.store), log


def test_second_signal_stops_the_workers_at_once() -> None:
    """The first SIGTERM drains in-flight calls; a second one kills the workers at once, still exit 0."""
    server = ServerProcess(workers=1)
    holder = stuck = None
    try:
        with Client(server.address, timeout=10) as ps:
            ps.create("x", value=np.zeros(4, np.float32))
        holder = subprocess.Popen(
            [sys.executable, HOLDER, "hold", server.store, "x"], stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # A call without a deadline waits for the stripe: the graceful stop would wait the whole grace.
        stuck = subprocess.Popen(
            [sys.executable, "-c", STUCK_ASSIGN, server.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        locks = os.path.join(server.store, "locks")
        assert wait_until(lambda: waiting_for(locks) > 0, timeout=30), "the call never reached the stripe"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: any("finishing in-flight calls" in line for line in server.log))
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(15)
        elapsed = time.monotonic() - started
        server.stop()
    finally:
        for helper in (holder, stuck):
            if helper is not None:
                helper.kill()
                helper.communicate()
        if server.proc.poll() is None:
            server.kill()
    log = "\n".join(server.log)
    assert code == 0 and "second signal: stopping workers at once" in log, log
    assert elapsed < 4, f"{elapsed:.1f} s:\n{log}"  # the graceful stop would take the 5 s grace
    assert not os.path.exists(server.store)


STUCK_ASSIGN = """
import sys
import numpy as np
from tensorps.client import Client
with Client(sys.argv[1]) as ps:
    ps.assign("x", np.ones(4, np.float32))
"""


def test_workers_exit_when_the_supervisor_is_killed() -> None:
    """SIGKILL the supervisor: its workers stop too, so the port is free for a new server."""
    server = ServerProcess(workers=2)
    workers = server.worker_pids()
    try:
        assert len(workers) == 2
        with Client(server.address, timeout=10) as ps:
            ps.create("x", value=np.zeros(4, np.float32))
        server.proc.kill()
        server.proc.wait(10)
        assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10), "workers outlived it"
        assert any("stopped" in line for line in server.log)
        with ServerProcess(port=server.port, workers=1) as again:
            assert again.healthy()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.kill()


def test_a_restarted_worker_keeps_the_last_good_tokens(tmp_path: Path) -> None:
    """Token file gone: a new worker serves with the last good tokens; SIGHUP logs one line and keeps them."""
    tokens = tmp_path / "tokens"
    tokens.write_text("good-token\n")
    with ServerProcess("--token-file", str(tokens), workers=1) as server:
        tokens.unlink()
        (victim,) = server.worker_pids()
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: server.worker_pids() not in ([], [victim]) and server.healthy(), timeout=20)
        with Client(server.address, token="good-token", timeout=10) as ps:
            ps.list()
        os.kill(server.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: any("keeping the previous tokens" in line for line in server.log))
        time.sleep(0.5)  # a worker that reloaded on its own would log its own line by now
        with Client(server.address, token="good-token", timeout=10) as ps:
            ps.list()
    log = "\n".join(server.log)
    assert "Traceback" not in log, log
    assert sum("keeping the previous tokens" in line for line in server.log) == 1, log
