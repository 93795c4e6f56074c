"""One port, several worker processes (DESIGN §5): balance, crash replacement, graceful shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path, wait_until
from tensorps.client import Client, TensorPSError, UnavailableError


def test_calls_from_several_channels_land_on_every_worker() -> None:
    """With 2 workers, clients' connections reach both processes, and both see every write."""
    with ServerProcess(workers=2) as server:
        workers = set(server.worker_pids())
        assert len(workers) == 2
        seen: set[int] = set()
        clients = [Client(server.address, channels=2) for _ in range(8)]
        try:
            clients[0].create("v", value=np.zeros(4, np.int64))
            for step, client in enumerate(clients * 2):
                seen.add(client.server_info().pid)
                client.assign_add("v", np.ones(4, np.int64), use_locking=True)
                np.testing.assert_array_equal(client.read("v"), np.full(4, step + 1))
        finally:
            for client in clients:
                client.close()
        assert seen == workers


def test_server_info_reports_the_worker_and_the_store() -> None:
    """GetServerInfo names the answering worker, the worker count and the store's usage."""
    with ServerProcess(workers=2) as server, Client(server.address) as ps:
        ps.create("x", value=np.zeros(1024, np.float32))
        info = ps.server_info()
        assert info.pid in server.worker_pids()
        assert info.workers == 2 and info.store == server.store
        assert info.variables == 1 and info.used_bytes >= 4096
        assert info.max_total_bytes > info.used_bytes


def test_killed_worker_is_replaced_and_nothing_is_torn() -> None:
    """SIGKILL a worker under load: it is replaced, no stripe stays held, locked adds stay exact."""
    shape = (256, 1024)
    with ServerProcess(workers=2) as server:
        with Client(server.address) as ps:
            ps.create("counter", value=np.zeros(shape, np.float32))
            ps.create("whole", value=np.zeros(shape, np.float32))
        stop = threading.Event()
        results = {"ok": 0, "unavailable": 0, "torn": 0, "other": 0}
        lock = threading.Lock()

        def adder() -> None:
            with Client(server.address, channels=1, timeout=10) as client:
                while not stop.is_set():
                    try:
                        client.assign_add(
                            "counter", np.ones(shape, np.float32), use_locking=True, read_value=False
                        )
                        key = "ok"
                    except UnavailableError:
                        key = "unavailable"
                    except TensorPSError:
                        key = "other"
                    with lock:
                        results[key] += 1

        def assigner(seed: int) -> None:
            with Client(server.address, channels=1, timeout=10) as client:
                i = seed
                while not stop.is_set():
                    i += 1
                    try:
                        out = client.assign("whole", np.full(shape, i, np.float32))
                        value = client.read("whole")
                    except UnavailableError:
                        continue
                    if out.min() != out.max() or value.min() != value.max():
                        with lock:
                            results["torn"] += 1

        threads = [threading.Thread(target=adder) for _ in range(3)]
        threads += [threading.Thread(target=assigner, args=(1000 * k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids())
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert any("was killed by SIGKILL" in line for line in server.log)
        assert results["ok"] > 0 and results["torn"] == 0 and results["other"] == 0
        with Client(server.address, timeout=10) as ps:
            final = ps.read("counter")
            assert final.min() == final.max(), "a locked assign_add was torn"
            # Calls that failed with UNAVAILABLE may or may not have landed; none that succeeded is lost.
            assert results["ok"] <= final[0, 0] <= results["ok"] + results["unavailable"]
            # No stripe is left held: a locked write of both variables goes through at once.
            ps.assign("counter", np.zeros(shape, np.float32), read_value=False)
            ps.assign("whole", np.zeros(shape, np.float32), read_value=False)
        assert wait_until(server.healthy)


def test_sigterm_during_a_streamed_write_exits_cleanly() -> None:
    """SIGTERM while a large write streams: it completes or fails cleanly; exit 0; no segment left."""
    server = ServerProcess(workers=2)
    outcome: dict[str, object] = {}
    try:
        with Client(server.address, timeout=60) as ps:
            ps.create("big", dtype="float32", shape=(64 << 20,))

            def write() -> None:
                try:
                    ps.assign("big", np.ones(64 << 20, np.float32), read_value=False)
                    outcome["result"] = "ok"
                except TensorPSError as exc:
                    outcome["result"] = exc.code.name

            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(0.2)
            started = time.monotonic()
            code = server.stop(signal.SIGTERM)
            elapsed = time.monotonic() - started
            writer.join(30)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code == 0, "\n".join(server.log)
    assert elapsed < 5 + 5  # --grace 5 plus process exit
    assert outcome["result"] in ("ok", "UNAVAILABLE", "CANCELLED")
    assert not os.path.exists(server.store)


def test_busy_port_refused_fast() -> None:
    """A second server on a port that is in use exits 1 at once with a clear message."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        store = fresh_store_path()
        result = subprocess.run(
            [sys.executable, "-m", "tensorps.server", "--port", str(port), "--store", store],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert time.monotonic() - started < 10
    assert not os.path.exists(store)


def test_second_server_on_a_running_servers_port_is_refused() -> None:
    """gRPC's SO_REUSEPORT must not let a second tensorps server share a live server's port."""
    with ServerProcess(workers=1) as first:
        second = ServerProcess(port=first.port, wait=False)
        assert second.proc.wait(30) == 1
        second.stop()
        assert any("already in use" in line for line in second.log)
        assert first.healthy()


def test_health_is_serving_then_not_serving_on_shutdown() -> None:
    """The standard health service says SERVING as soon as the ready line is out, NOT_SERVING after."""
    server = ServerProcess(workers=2)
    try:
        assert server.healthy()
    finally:
        assert server.stop() == 0
    assert not server.healthy(timeout=0.5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_with_exit_0_and_remove_the_store(sig: int) -> None:
    """SIGINT and SIGTERM stop the server gracefully: exit 0, store removed."""
    server = ServerProcess(workers=2)
    with Client(server.address) as ps:
        ps.create("x", value=np.ones(100, np.float32))
    assert server.stop(sig) == 0
    assert not os.path.exists(server.store)
    assert any("worker" in line and "stopped" in line for line in server.log)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--stripes", "0"], {}, "--stripes must be at least 1"),
        (["--stream-idle-timeout", "0"], {}, "--stream-idle-timeout must be positive"),
        (["--threads", "0"], {}, "--threads must be at least 1"),
        (["--log-level", "loud"], {}, "invalid choice"),
        ([], {"TENSORPS_PORT": "abc"}, "TENSORPS_PORT='abc' is not a valid --port"),
        (["--max-total-bytes", "12Q"], {}, "not a byte count"),
    ],
)
def test_bad_settings_are_refused_with_a_message(args: list[str], env: dict[str, str], message: str) -> None:
    """Out-of-range flags and unparsable TENSORPS_* values stop the CLI with a usage error, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "tensorps.server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **env},
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
