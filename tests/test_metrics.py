"""Prometheus metrics (--metrics-port) and the log lines of refused calls (--log-format), end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from support import ServerProcess, fresh_store_path, remove_store, wait_until
from tensorps.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from tensorps.server.metrics import SnapshotStatus, _StoreCollector
from tensorps.server.store import Store

WRITER = "metrics-writer-token"
READER = "metrics-reader-token"
METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics \(worker files in (\S+)\)")
SERVICE = "tensorps.v1.ParameterServer"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def calls(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], method: str, code: str) -> float:
    return value(samples, "tensorps_calls_total", service=SERVICE, method=method, code=code)


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, int, str]]:
    """A 2-worker server with metrics, JSON logs, tokens and a variable size limit."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{WRITER}\n{READER} read-only\n")
    args = ["--metrics-port", "0", "--log-format", "json", "--token-file", str(tokens)]
    with ServerProcess(*args, "--max-variable-bytes", "1M", workers=2) as server:
        match = next(m for line in server.log if (m := METRICS.search(line)))
        yield server, int(match.group(1)), match.group(2)
    assert not os.path.exists(match.group(2)), "the supervisor left its metrics directory behind"


def test_scrape_counts_every_call_exactly_over_two_workers(observed: tuple[ServerProcess, int, str]) -> None:
    """After known calls through both workers, the endpoint shows exactly those calls by method and code."""
    server, port, _directory = observed
    before = scrape(port)
    small = np.arange(1024, dtype=np.float32)  # 4 KiB
    infos = 0
    clients: dict[int, Client] = {}  # a client (one connection) on each worker
    try:
        while len(clients) < 2:  # the kernel balances connections: connect until both workers answered
            infos += 1
            assert infos < 100
            ps = Client(server.address, token=WRITER, channels=1, timeout=30)
            pid = ps.server_info().pid
            if pid in clients:
                ps.close()
            else:
                clients[pid] = ps
        first, second = clients.values()
        first.create("m/a", value=small)
        for i in range(7):
            (first, second)[i % 2].assign("m/a", small, read_value=False)
        for i in range(3):
            with pytest.raises(InvalidArgumentError):
                (first, second)[i % 2].assign("m/a", small[:3])
        with pytest.raises(NotFoundError):
            second.read("m/none")
        for i in range(4):
            (first, second)[i % 2].read("m/a")
        used = first.server_info().used_bytes
        infos += 1
    finally:
        for ps in clients.values():
            ps.close()
    after = scrape(port)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert calls(delta, "GetServerInfo", "OK") == infos
    assert calls(delta, "CreateVariable", "OK") == 1
    assert calls(delta, "Assign", "OK") == 7
    assert calls(delta, "Assign", "INVALID_ARGUMENT") == 3
    assert calls(delta, "Read", "NOT_FOUND") == 1
    assert calls(delta, "Read", "OK") == 4
    kind = {"service": SERVICE, "method": "Assign"}
    assert value(delta, "tensorps_call_duration_seconds_count", **kind) == 10
    assert value(delta, "tensorps_call_duration_seconds_bucket", **kind, le="+Inf") == 10
    assert 0 < value(delta, "tensorps_call_duration_seconds_sum", **kind) < 10
    # Each Assign carries the 4 KiB tensor plus a small header; a refused one 12 bytes of values.
    received = value(delta, "tensorps_received_bytes_total", **kind)
    assert 7 * 4096 + 3 * 12 < received < 7 * 4096 + 3 * 12 + 10 * 100
    sent = value(delta, "tensorps_sent_bytes_total", service=SERVICE, method="Read")
    assert 4 * 4096 < sent < 4 * 4096 + 5 * 100
    assert value(delta, "tensorps_lock_wait_seconds_count") >= 7 + 4
    assert value(after, "tensorps_stored_bytes") == used
    assert value(after, "tensorps_variables") == 1
    assert value(after, "tensorps_budget_bytes") > 0
    assert value(after, "tensorps_workers") == 2
    assert staging_by_pid(after) == {pid: 0.0 for pid in clients}  # each worker, nothing in transit now
    assert value(after, "tensorps_staging_limit_bytes") >= 1 << 20


def staging_by_pid(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[int, float]:
    series = {key: v for key, v in samples.items() if key[0] == "tensorps_staging_bytes"}
    return {int(dict(labels)["pid"]): v for (_name, labels), v in series.items()}


def test_refusals_are_counted_and_logged_as_json(observed: tuple[ServerProcess, int, str]) -> None:
    """Token, permission, limit and input refusals: counted by code, one JSON log line each with the peer."""
    server, port, _directory = observed
    before = scrape(port)
    with Client(server.address, token="not-a-token", timeout=10) as ps, pytest.raises(UnauthenticatedError):
        ps.list()
    with Client(server.address, token=READER, timeout=10) as ps, pytest.raises(PermissionDeniedError):
        ps.delete("m/anything")
    with Client(server.address, token=WRITER, timeout=10) as ps:
        with pytest.raises(ResourceExhaustedError):
            ps.create("m/huge", value=np.zeros(1 << 19, np.float32))  # 2 MiB > --max-variable-bytes 1M
        ps.create("m/declared", dtype="int32", shape=(2,))
        with pytest.raises(InvalidArgumentError):
            ps.assign("m/declared", np.zeros(5, np.int32))
    after = scrape(port)
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert calls(delta, "ListVariables", "UNAUTHENTICATED") == 1
    assert calls(delta, "DeleteVariable", "PERMISSION_DENIED") == 1
    assert calls(delta, "CreateVariable", "RESOURCE_EXHAUSTED") == 1
    assert calls(delta, "Assign", "INVALID_ARGUMENT") == 1

    def refusals() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in server.log if line.startswith("{")]
        return [line for line in lines if str(line["message"]).startswith("refused ")]

    assert wait_until(lambda: len(refusals()) >= 4, timeout=10)
    by_code = {line["code"]: line for line in refusals()}
    for code, method in (
        ("UNAUTHENTICATED", "ListVariables"),
        ("PERMISSION_DENIED", "DeleteVariable"),
        ("RESOURCE_EXHAUSTED", "CreateVariable"),
        ("INVALID_ARGUMENT", "Assign"),
    ):
        line = by_code[code]
        assert line["level"] == "INFO"
        assert line["logger"] == "tensorps.server.calls"
        assert line["method"] == method
        assert line["service"] == SERVICE
        assert str(line["peer"]).startswith("ipv4:127.0.0.1:")
        assert line["worker"] in (0, 1)
        assert isinstance(line["pid"], int)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))
        assert line["reason"] and str(line["reason"]) in str(line["message"])
    assert "bearer token" in str(by_code["UNAUTHENTICATED"]["reason"])
    assert "m/huge" in str(by_code["RESOURCE_EXHAUSTED"]["reason"])
    assert "lhs shape= [2] rhs shape= [5]" in str(by_code["INVALID_ARGUMENT"]["reason"])
    # Every line the server wrote is one JSON object.
    for text in server.log:
        record = json.loads(text)
        assert {"time", "level", "logger", "message", "pid", "worker"} <= record.keys()


def test_bulk_batches_count_their_bytes(observed: tuple[ServerProcess, int, str]) -> None:
    """A batch whose values travel over the bulk channel counts them there, each way."""
    server, port, _directory = observed
    values = {f"m/bulk{i}": np.full(1 << 18, i, np.float32) for i in range(5)}  # 5 x 1 MiB: over bulk
    with Client(server.address, token=WRITER, timeout=30) as ps:
        for name, value in values.items():
            ps.create(name, value=value)
        before = scrape(port)
        ps.assign_many(values, read_value=False)
        got = ps.read_many(list(values))
        after = scrape(port)
        for name in values:
            ps.delete(name)
    for name, value in values.items():
        np.testing.assert_array_equal(got[name], value)
    received = value_of(after, before, "tensorps_bulk_received_bytes_total")
    sent = value_of(after, before, "tensorps_bulk_sent_bytes_total")
    assert (received, sent) == (5 << 20, 5 << 20)


def value_of(after: dict[Any, float], before: dict[Any, float], name: str) -> float:
    return value(after, name) - value(before, name)


def test_restarted_workers_are_counted_and_counts_survive(observed: tuple[ServerProcess, int, str]) -> None:
    """A killed worker is counted as a restart; the calls it had served stay counted."""
    server, port, directory = observed
    before = scrape(port)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2, 20)
    assert wait_until(server.healthy, 20)
    after = scrape(port)
    restarts = "tensorps_worker_restarts_total"
    assert value(after, restarts) == value(before, restarts) + 1
    assert value(after, "tensorps_workers") == 2
    assert set(staging_by_pid(after)) == set(server.worker_pids())  # the dead worker's series is gone
    for key, old in before.items():
        if key[0] == "tensorps_calls_total":
            assert after[key] >= old, key
    # The dead worker's files stay (its counts), its live gauges go.
    assert any(name.endswith(f"_{victim}.db") for name in os.listdir(directory))
    files = os.listdir(directory)
    assert not [name for name in files if name.startswith("gauge_live") and f"_{victim}." in name]


def test_metrics_are_off_by_default(server: ServerProcess) -> None:
    """Without --metrics-port no endpoint is served and no metrics directory made."""
    assert not any("metrics on" in line for line in server.log)


def test_refused_calls_are_logged_as_text(server: ServerProcess) -> None:
    """In the default text format a refusal is one INFO line naming the call, the peer and the reason."""
    with Client(server.address, timeout=10) as ps:
        ps.create("m/text", dtype="float32", shape=(2,))
        try:
            with pytest.raises(InvalidArgumentError):
                ps.assign("m/text", np.zeros(3, np.float32))
        finally:
            ps.delete("m/text")
    pattern = re.compile(
        r" INFO tensorps\[\d+\] refused Assign from ipv4:127\.0\.0\.1:\d+: INVALID_ARGUMENT: "
        r"Assign requires shapes of both tensors to match\. lhs shape= \[2\] rhs shape= \[3\]"
    )
    assert wait_until(lambda: any(pattern.search(line) for line in server.log), timeout=10), server.log[-5:]


def test_metrics_port_in_use_fails_startup(tmp_path: Path) -> None:
    """A metrics port that cannot be bound stops the server at startup, with the store removed."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        store = fresh_store_path()
        proc = ServerProcess("--metrics-port", str(busy.getsockname()[1]), store=store, wait=False)
        try:
            assert proc.proc.wait(30) == 1
        finally:
            proc.stop()
            remove_store(store)
    assert any("cannot serve metrics on port" in line for line in proc.log), proc.log
    assert not os.path.exists(store)


def test_store_and_snapshot_gauges_come_from_their_sources() -> None:
    """The supervisor's collector reads the store at scrape time, and snapshot gauges from the hook."""
    path = fresh_store_path()
    store = Store.open(path, max_variables=16, max_total_bytes=1 << 20)
    try:
        status: list[SnapshotStatus | None] = [None]
        collector = _StoreCollector(path, lambda: lambda: status[0])
        families = {family.name: family.samples[0].value for family in collector.collect()}
        assert families == {
            "tensorps_stored_bytes": 0,
            "tensorps_budget_bytes": 1 << 20,
            "tensorps_variables": 0,
            "tensorps_max_variables": 16,
        }
        status[0] = SnapshotStatus(finished=time.time() - 30, duration=2.5)
        families = {family.name: family.samples[0].value for family in collector.collect()}
        assert 29 < families["tensorps_snapshot_age_seconds"] < 60
        assert families["tensorps_snapshot_duration_seconds"] == 2.5
    finally:
        store.destroy()


def test_readme_lists_every_metric(observed: tuple[ServerProcess, int, str]) -> None:
    """Every metric family the endpoint serves is in the README's list (the Grafana-ready names)."""
    _server, port, _directory = observed
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name, _labels in scrape(port)}
    assert {"tensorps_calls_total", "tensorps_call_duration_seconds", "tensorps_stored_bytes"} <= families
    missing = sorted(name for name in families if f"`{name}`" not in readme)
    assert not missing, f"README's metric list lacks {missing}"


def test_a_dead_supervisors_metrics_directory_is_swept(tmp_path: Path) -> None:
    """A metrics directory left by a supervisor that was killed is removed by the next server's."""
    dead = subprocess.Popen(["true"])  # a process that has exited: its pid names no supervisor
    dead.wait()
    stale = tmp_path / f"tensorps-metrics-{dead.pid}-abcdef"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    alive = tmp_path / f"tensorps-metrics-{os.getpid()}-abcdef"  # this test's own pid: alive
    alive.mkdir()
    other = tmp_path / "tensorps-metrics-notes"
    other.mkdir()
    with ServerProcess("--metrics-port", "0", env={"TMPDIR": str(tmp_path)}) as server:
        match = next(m for line in server.log if (m := METRICS.search(line)))
        assert Path(match.group(2)).parent == tmp_path
        assert not stale.exists()
        assert alive.exists() and other.exists()
    assert not Path(match.group(2)).exists()


def test_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """--metrics-port (off by default, 0, a port, off) and --log-format, also through TENSORPS_*."""
    from tensorps.server.__main__ import config_from_args

    assert config_from_args([]).metrics_port is None
    assert config_from_args([]).log_format == "text"
    assert config_from_args(["--metrics-port", "0"]).metrics_port == 0
    assert config_from_args(["--metrics-port", "9100", "--log-format", "JSON"]).log_format == "json"
    assert config_from_args(["--metrics-port", "off"]).metrics_port is None
    monkeypatch.setenv("TENSORPS_METRICS_PORT", "9101")
    monkeypatch.setenv("TENSORPS_LOG_FORMAT", "json")
    config = config_from_args([])
    assert (config.metrics_port, config.log_format) == (9101, "json")
    for bad in (["--metrics-port", "70000"], ["--metrics-port", "x"], ["--log-format", "xml"]):
        with pytest.raises(SystemExit) as exited:
            config_from_args(bad)
        assert exited.value.code == 2
