"""The examples against real servers: training converges, failures exit non-zero fast, health checks, demo."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pki import Pki

from support import ServerProcess, fresh_store_path, remove_store, run, wait_until

TRAIN = [sys.executable, "-m", "tensorps.examples.train"]
HEALTHCHECK = [sys.executable, "-m", "tensorps.examples.healthcheck"]
DEMO = [sys.executable, "-m", "tensorps.examples.demo"]

FINAL = re.compile(r"final loss (\S+) \(threshold (\S+),.*: (converged|did NOT converge)$", re.MULTILINE)
PROGRESS = re.compile(r"^\s*(\d+)/(\d+)\s+(\S+)\s+(\d+)$", re.MULTILINE)
WORKER = re.compile(r"^worker (\d+)/(\d+) \(pid \d+\): \d+ rows", re.MULTILINE)


def _model() -> str:
    """A model prefix of its own, since the session's server is shared with other suites."""
    return f"examples-{uuid.uuid4().hex[:8]}"


def _final(output: str) -> tuple[float, float, str]:
    match = FINAL.search(output)
    assert match, output
    return float(match.group(1)), float(match.group(2)), match.group(3)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections are refused, and no other test can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _train(server: ServerProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run([*TRAIN, "--target", server.address, "--model", _model(), *args], timeout=timeout)


@pytest.mark.parametrize(("update", "workers"), [("assign_sub", 2), ("assign", 3)])
def test_training_converges_with_worker_processes(server: ServerProcess, update: str, workers: int) -> None:
    """--role all runs a coordinator and K workers whose printed loss falls below the threshold."""
    result = _train(server, "--update", update, "--num-workers", str(workers), "--log-interval", "0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    loss, threshold, verdict = _final(result.stdout)
    assert verdict == "converged" and loss < threshold == 0.05
    progress = [(int(m[0]), float(m[2]), int(m[3])) for m in PROGRESS.findall(result.stdout)]
    assert progress and progress[-1][0] == 1500, result.stdout
    start_loss = float(re.search(r"loss at start (\S+)", result.stdout)[1])  # type: ignore[index]
    assert start_loss > 1 and progress[-1][1] < progress[0][1] and loss < start_loss / 100
    assert any(rate > 0 for _, _, rate in progress)
    assert sorted(int(m[0]) for m in WORKER.findall(result.stdout)) == list(range(workers))


def test_standalone_workers_share_the_work_and_take_distinct_shards(server: ServerProcess) -> None:
    """Two --role worker processes started together create the model once and split shards 0 and 1."""
    model = _model()
    command = [*TRAIN, "--role", "worker", "--target", server.address, "--model", model, "--steps", "600"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, out + err
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    shards = sorted(int(WORKER.search(out)[1]) for out in outputs)  # type: ignore[index]
    assert shards == [0, 1]
    for out in outputs:
        loss, threshold, verdict = _final(out)
        assert verdict == "converged" and loss < threshold
        assert "shard loss" in out


def test_coordinator_role_resets_and_watches_external_workers(server: ServerProcess) -> None:
    """--role coordinator resets a finished model, and reports once external workers reach --steps."""
    model = _model()
    common = ["--target", server.address, "--model", model, "--steps", "400"]
    first = run([*TRAIN, "--role", "worker", *common], timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    coordinator = subprocess.Popen(
        [*TRAIN, "--role", "coordinator", *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert coordinator.stdout is not None
        # The worker must start after the reset, or it would find the earlier run finished.
        header = ""
        for line in coordinator.stdout:
            if line.startswith(f"model '{model}'"):
                header = line
                break
        worker = run(
            [*TRAIN, "--role", "worker", "--worker-index", "0", "--num-workers", "1", *common], timeout=120
        )
        out, err = coordinator.communicate(timeout=120)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.communicate()
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert coordinator.returncode == 0, out + err
    assert "external workers" in header and _final(out)[2] == "converged"
    assert re.search(r"worker 0/1 \(pid \d+\): 400 steps", worker.stdout), worker.stdout


def test_unmet_threshold_exits_1(server: ServerProcess) -> None:
    """A threshold no model can reach gives exit code 1 and says it did not converge."""
    result = _train(server, "--steps", "50", "--threshold", "1e-9")
    assert result.returncode == 1, result.stdout + result.stderr
    assert _final(result.stdout)[2] == "did NOT converge"


@pytest.mark.parametrize("role", ["all", "worker", "coordinator"])
def test_unreachable_server_exits_2_quickly(dead_port: int, role: str) -> None:
    """Nothing listening at --target: a clear message and exit code 2 within the connect timeout."""
    started = time.monotonic()
    result = run(
        [*TRAIN, "--role", role, "--target", f"127.0.0.1:{dead_port}", "--connect-timeout", "2"], timeout=60
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot reach a serving tensorps server at 127.0.0.1:{dead_port} within 2 s" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 15


def test_target_defaults_to_the_environment(dead_port: int) -> None:
    """TENSORPS_TARGET is the default --target of the trainer and of the health check."""
    env = {**os.environ, "TENSORPS_TARGET": f"127.0.0.1:{dead_port}"}
    result = run([*TRAIN, "--connect-timeout", "1"], timeout=60, env=env)
    assert result.returncode == 2 and f"127.0.0.1:{dead_port}" in result.stderr
    health = run(HEALTHCHECK, timeout=30, env=env)
    assert health.returncode == 1 and f"127.0.0.1:{dead_port}" in health.stderr


def test_healthcheck_reports_serving_and_dead(server: ServerProcess, dead_port: int) -> None:
    """The health check exits 0 for a serving server and 1, quickly, for a port with no server."""
    # The session's server may have just started: its ready line can precede SERVING by a moment.
    assert wait_until(lambda: run([*HEALTHCHECK, "--target", server.address], timeout=30).returncode == 0)
    ok = run([*HEALTHCHECK, "--target", server.address], timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stdout
    started = time.monotonic()
    dead = run([*HEALTHCHECK, "--target", f"127.0.0.1:{dead_port}", "--timeout", "3"], timeout=30)
    assert dead.returncode == 1 and "UNAVAILABLE" in dead.stderr
    assert time.monotonic() - started < 10
    quiet = run([*HEALTHCHECK, "--quiet", "--target", f"127.0.0.1:{dead_port}"], timeout=30)
    assert quiet.returncode == 1 and quiet.stdout == quiet.stderr == ""


def test_healthcheck_fails_once_the_server_stopped() -> None:
    """After SIGTERM the same address is no longer healthy."""
    with ServerProcess(workers=1) as own:
        address = own.address
        # The ready line can precede SERVING by one poll of the supervisor's verdict.
        assert wait_until(lambda: run([*HEALTHCHECK, "--target", address], timeout=30).returncode == 0)
        assert own.stop() == 0
    assert run([*HEALTHCHECK, "--target", address], timeout=30).returncode == 1


def _demo(args: Sequence[str], store: str) -> subprocess.CompletedProcess[str]:
    try:
        return run([*DEMO, "--store", store, *args], timeout=180)
    finally:
        remove_store(store)  # only a killed demo could leave it; the server removes its own


def test_demo_starts_trains_and_stops_the_server() -> None:
    """`make run`'s demo: server up, plain calls printed, training converges, server exits 0."""
    store = fresh_store_path()
    result = _demo(["--port", str(_free_port()), "--steps", "600", "--seed", "7"], store)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "== server healthy at 127.0.0.1:" in out
    assert "assign('demo/w', ones((2, 3)))" in out and "[[1., 1., 1.], [1., 1., 1.]]" in out
    assert "Assign requires shapes of both tensors to match. lhs shape= [2,3] rhs shape= [6]" in out
    assert _final(out)[2] == "converged"
    assert "== training exited with code 0" in out and "== server exited with code 0" in out
    assert "tensorps ready" in result.stderr  # the server's own log, passed through
    assert not os.path.exists(store)


def test_demo_propagates_the_training_exit_code() -> None:
    """A training that misses its threshold makes the demo exit 1, and the server is still stopped."""
    store = fresh_store_path()
    result = _demo(["--port", str(_free_port()), "--steps", "30", "--threshold", "1e-9"], store)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "== training exited with code 1" in result.stdout
    assert "== server exited with code 0" in result.stdout


def test_demo_stops_training_and_server_on_sigterm() -> None:
    """SIGTERM mid-training: the demo stops the trainer and the server, removes the store, exits 130."""
    store = fresh_store_path()
    command = [*DEMO, "--store", store, "--port", str(_free_port()), "--steps", "10000000"]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if PROGRESS.match(line) and not line.strip().startswith("0/"):
                break
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
        assert demo.returncode == 130, out + err
        assert "== interrupted" in out and "== server exited with code 0" in out
        assert not os.path.exists(store)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.communicate()
        remove_store(store)


def test_demo_reports_a_server_that_cannot_start(dead_port: int) -> None:
    """A busy port: the server exits at once and the demo says so with exit code 2, without waiting."""
    started = time.monotonic()
    result = _demo(["--port", str(dead_port)], fresh_store_path())
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the server did not become ready: the server exited with code 1" in result.stdout
    assert time.monotonic() - started < 20


def test_training_against_a_server_with_tls_and_tokens(pki: Pki, tmp_path: Path) -> None:
    """--ca-file and --token-file (as the secure compose override passes them) train over TLS with a token."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# trainers\ntrainer-token-1234\n")
    flags = [
        "--tls-cert",
        pki.write("s.pem", pki.server.cert),
        "--tls-key",
        pki.write("s.key", pki.server.key),
    ]
    with ServerProcess(*flags, "--token-file", str(tokens), workers=2) as server:
        ca = pki.write("ca.pem", pki.ca.cert)
        target = f"localhost:{server.port}"
        common = ["--target", target, "--model", _model(), "--ca-file", ca]
        result = run([*TRAIN, *common, "--token-file", str(tokens)], timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert _final(result.stdout)[2] == "converged"
        refused = run([*TRAIN, *common, "--token", "wrong"], timeout=60)
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
        assert run([*HEALTHCHECK, "--target", target, "--ca-file", ca]).returncode == 0
