"""The admin CLI `tensorps`: every command against a real server, over gRPC and shm://, text and --json."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from pki import Pki

from support import ServerProcess, run
from tensorps.cli.__main__ import main
from tensorps.client import Client


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


def tensorps(*argv: str) -> Result:
    """Run one command in this process (argparse usage errors exit: their code is the result's)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        code = main(list(argv), stdout=stdout, stderr=stderr)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return Result(code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(params=["remote", "local"])
def target(server: ServerProcess, request: pytest.FixtureRequest) -> str:
    """The shared server, over gRPC and through its store on this host."""
    return server.address if request.param == "remote" else f"shm://{server.store}"


@pytest.fixture
def npy(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "value.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4))
    yield path


def test_put_get_info_ls_rm_round_trip(target: str, name: str, npy: Path, tmp_path: Path) -> None:
    """put creates then assigns; get, info and ls show it (text and JSON); rm deletes it."""
    created = tensorps("--target", target, "--json", "put", name, str(npy))
    assert created.code == 0, created.stderr
    assert created.json()["created"] is True
    assert created.json()["variable"] == {
        "name": name,
        "dtype": "float32",
        "shape": [3, 4],
        "initialized": True,
        "version": 1,
        "bytes": 48,
    }
    again = tensorps("put", name, str(npy), "--target", target)
    assert again.code == 0
    assert again.stdout.strip() == f"assigned {name}: float32 (3, 4), version 2"

    saved = tmp_path / "out.npy"
    got = tensorps("get", name, "-o", str(saved), "--target", target)
    assert got.code == 0, got.stderr
    np.testing.assert_array_equal(np.load(saved), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert f"{name}: float32 (3, 4), 12 elements" in got.stdout
    assert "min: 0.0" in got.stdout and "max: 11.0" in got.stdout and "mean: 5.5" in got.stdout
    assert "values: 0.0 1.0 2.0 3.0 4.0 5.0 6.0 7.0 ..." in got.stdout
    summary = tensorps("get", name, "--json", "--target", target).json()["summary"]
    assert summary == {
        "shape": [3, 4],
        "dtype": "float32",
        "size": 12,
        "nan": 0,
        "min": 0.0,
        "max": 11.0,
        "mean": 5.5,
        "values": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
    }

    info = tensorps("info", name, "--target", target)
    assert info.code == 0
    assert "initialized: yes" in info.stdout and "version:     2" in info.stdout
    assert tensorps("info", name, "--json", "--target", target).json()["version"] == 2

    prefix = name.rsplit("/", 1)[0] + "/"
    listed = tensorps("ls", prefix, "--target", target)
    assert listed.code == 0
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["NAME", "DTYPE", "SHAPE", "INITIALIZED", "VERSION", "BYTES"]
    assert [row.split() for row in rows] == [[name, "float32", "(3,", "4)", "yes", "2", "48"]]
    variables = tensorps("ls", prefix, "--json", "--target", target).json()["variables"]
    assert [v["name"] for v in variables] == [name]

    removed = tensorps("--json", "--target", target, "rm", name)
    assert removed.code == 0 and removed.json() == {"deleted": [name]}
    gone = tensorps("--json", "--target", target, "rm", name)
    assert gone.code == 3
    assert gone.json()["error"]["code"] == "NOT_FOUND"
    assert tensorps("ls", prefix, "--json", "--target", target).json() == {"variables": []}


def test_errors_map_to_documented_exit_codes(target: str, name: str, npy: Path, tmp_path: Path) -> None:
    """NOT_FOUND 3, a server refusal 1, usage and local files 2; the JSON error names the status."""
    missing = tensorps("--target", target, "--json", "get", name)
    assert missing.code == 3
    assert missing.json() == {
        "error": {"code": "NOT_FOUND", "message": f"variable '{name}' does not exist", "exit": 3}
    }
    assert "tensorps: NOT_FOUND: " in missing.stderr
    assert tensorps("--target", target, "put", "--no-create", name, str(npy)).code == 3

    assert tensorps("--target", target, "put", name, str(npy)).code == 0
    other = tmp_path / "other.npy"
    np.save(other, np.zeros(5, np.float32))
    refused = tensorps("--target", target, "--json", "put", name, str(other))
    assert refused.code == 1
    assert refused.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert "lhs shape= [3,4] rhs shape= [5]" in refused.json()["error"]["message"]
    np.save(other, np.zeros(5, np.int64))
    assert tensorps("--target", target, "put", name, str(other)).code == 1  # no cast
    np.save(other, np.zeros(5, np.float32))
    reshaped = tensorps("--target", target, "--json", "put", "--reshape", name, str(other))
    assert reshaped.code == 0 and reshaped.json()["variable"]["shape"] == [5]

    unreadable = tensorps("--target", target, "--json", "put", name, str(tmp_path / "none.npy"))
    assert unreadable.code == 2 and unreadable.json()["error"]["code"] == "USAGE"
    not_npy = tmp_path / "text.npy"
    not_npy.write_text("hello")
    assert tensorps("--target", target, "put", name, str(not_npy)).code == 2
    assert tensorps("--target", target, "get", name, "-o", str(tmp_path / "no" / "dir.npy")).code == 2
    assert tensorps("--target", target, "get", "bad name").code == 1  # INVALID_ARGUMENT, before sending
    assert tensorps("--target", target, "frobnicate").code == 2
    assert tensorps("--target", target, "get").code == 2
    usage = tensorps("--target", target, "--json", "get")
    assert usage.code == 2 and usage.json()["error"]["code"] == "USAGE"
    assert "the following arguments are required: name" in usage.stderr
    assert tensorps("--target", target, "--timeout", "-1", "ls").code == 2
    assert tensorps("--target", target, "rm", name).code == 0


def test_put_reinterprets_bfloat16_files_with_dtype(target: str, name: str, tmp_path: Path) -> None:
    """numpy saves bfloat16 as 2-byte void; --dtype bfloat16 reads it back as bfloat16."""
    value = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)
    path = tmp_path / "bf16.npy"
    np.save(path, value)
    assert tensorps("--target", target, "put", name, str(path)).code == 1  # V2 is no tensorps dtype
    assert tensorps("--target", target, "put", "--dtype", "bfloat16", name, str(path)).code == 0
    assert tensorps("--target", target, "put", "--dtype", "float32", name, str(path)).code == 2
    got = tensorps("--target", target, "--json", "get", name).json()
    assert got["summary"]["dtype"] == "bfloat16"
    assert got["summary"]["values"] == [1.5, -2.0, 3.25]
    assert tensorps("--target", target, "rm", name).code == 0


def test_get_summarises_every_kind_of_value(server: ServerProcess, name: str) -> None:
    """Bool counts, complex means, NaNs left out and counted, empty tensors without statistics."""
    with Client(server.address) as ps:
        cases = {
            "b": np.array([True, False, True]),
            "c": np.array([1 + 2j, 3 - 4j], np.complex64),
            "f": np.array([np.nan, 1.0, -3.0], np.float64),
            "e": np.zeros((0, 3), np.int32),
        }
        for suffix, value in cases.items():
            ps.create(f"{name}/{suffix}", value=value)
        try:
            got = {s: tensorps("--target", server.address, "--json", "get", f"{name}/{s}") for s in cases}
        finally:
            for suffix in cases:
                ps.delete(f"{name}/{suffix}")
    assert got["b"].json()["summary"]["true"] == 2
    assert got["c"].json()["summary"]["mean"] == [2.0, -1.0]
    assert got["c"].json()["summary"]["values"] == [[1.0, 2.0], [3.0, -4.0]]
    floats = got["f"].json()["summary"]
    assert (floats["nan"], floats["min"], floats["max"], floats["mean"]) == (1, -3.0, 1.0, -1.0)
    assert floats["values"] == ["nan", 1.0, -3.0]
    assert got["e"].json()["summary"] == {"shape": [0, 3], "dtype": "int32", "size": 0, "values": []}


def test_stats_reaches_every_worker(server: ServerProcess) -> None:
    """stats shows the store's use and the pids of both workers of the shared server."""
    result = tensorps("--target", server.address, "--json", "stats")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["workers"] == 2
    assert len(data["worker_pids"]) == 2
    assert sorted(data["worker_pids"]) == sorted(server.worker_pids())
    assert data["store"] == server.store
    assert 0 <= data["budget_used"] < 1
    details = data["worker_details"]
    assert [w["index"] for w in details] == [0, 1]
    assert sorted(w["pid"] for w in details) == sorted(server.worker_pids())
    for worker in details:
        assert worker["uptime_seconds"] > 0 and worker["staging_bytes"] == 0
        assert worker["staging_limit_bytes"] > 0 and worker["bulk_port"] > 0
    text = tensorps("--target", server.address, "stats").stdout
    assert "workers:    2 (all reached): pids " in text
    assert "  worker 0: pid " in text and "  worker 1: pid " in text and "bulk port" in text
    local = tensorps("--target", f"shm://{server.store}", "--json", "stats").json()
    assert local["store"] == server.store and local["workers"] is None


def test_health(server: ServerProcess) -> None:
    """SERVING exits 0 (gRPC and shm://); an unreachable server exits 5."""
    result = tensorps("--target", server.address, "--json", "health")
    assert result.code == 0 and result.json() == {"target": server.address, "status": "SERVING"}
    assert tensorps("--target", f"shm://{server.store}", "health").code == 0
    unknown = tensorps("--target", server.address, "--json", "health", "--service", "no.such.Service")
    assert unknown.code == 3 and unknown.json()["error"]["code"] == "NOT_FOUND"
    with ServerProcess() as stopped:
        address = stopped.address
    down = tensorps("--target", address, "--timeout", "2", "--json", "health")
    assert down.code == 5 and down.json()["error"]["code"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert tensorps("--target", address, "--timeout", "2", "ls").code == 5
    assert tensorps("--target", "shm:///dev/shm/tensorps-no-such-store", "ls").code == 3


def test_bench_reports_latency_and_throughput(target: str) -> None:
    """A one-second bench reports both halves and leaves no variable behind."""
    result = tensorps("--target", target, "--json", "bench", "--duration", "1", "--large-bytes", "4194304")
    assert result.code == 0, result.stderr
    data = result.json()
    assert data["small"]["calls"] > 0 and 0 < data["small"]["p50_ms"] <= data["small"]["p99_ms"]
    assert data["large"]["bytes"] == 4 << 20
    assert data["large"]["write_mb_per_second"] > 0 and data["large"]["read_mb_per_second"] > 0
    assert tensorps("--target", target, "--json", "ls", "tensorps-bench/").json() == {"variables": []}
    assert tensorps("--target", target, "bench", "--duration", "0").code == 2


def test_progress_bars_for_large_transfers(server: ServerProcess, name: str, tmp_path: Path) -> None:
    """--progress shows a bar that reaches the tensor's size for a streamed put and get; none without it."""
    path = tmp_path / "big.npy"
    np.save(path, np.ones(6 << 18, np.float32))  # 6 MiB: streamed
    put = tensorps("--target", server.address, "put", "--progress", name, str(path))
    assert put.code == 0
    assert f"put {name}" in put.stderr and "6.00M/6.00M" in put.stderr
    got = tensorps("--target", server.address, "get", "--progress", name)
    assert got.code == 0 and "6.00M/6.00M" in got.stderr
    quiet = tensorps("--target", server.address, "get", name)  # stderr is no terminal here
    assert quiet.code == 0 and quiet.stderr == ""
    assert tensorps("--target", server.address, "rm", name).code == 0


def test_tokens_and_tls_options(pki: Pki, tmp_path: Path) -> None:
    """--token / --token-file / TLS options reach the server; a missing token exits 4, no TLS 5."""
    tokens = tmp_path / "tokens"
    tokens.write_text("cli-writer\ncli-reader read-only\n")
    ca = pki.write("ca.pem", pki.ca.cert)
    flags = ["--tls-cert", pki.write("server.pem", pki.server.cert)]
    flags += ["--tls-key", pki.write("server.key", pki.server.key), "--token-file", str(tokens)]
    npy = tmp_path / "v.npy"
    np.save(npy, np.arange(3, dtype=np.int32))
    with ServerProcess(*flags) as server:
        target = f"localhost:{server.port}"
        secure = ["--target", target, "--ca-file", ca]
        assert tensorps(*secure, "--token", "cli-writer", "put", "v", str(npy)).code == 0
        listed = tensorps(*secure, "--token-file", str(tokens), "--json", "ls")
        assert listed.code == 0 and [v["name"] for v in listed.json()["variables"]] == ["v"]
        denied = tensorps(*secure, "--token", "cli-reader", "--json", "rm", "v")
        assert denied.code == 4 and denied.json()["error"]["code"] == "PERMISSION_DENIED"
        assert tensorps(*secure, "ls").code == 4  # no token: UNAUTHENTICATED
        assert tensorps(*secure, "health").code == 0  # health needs no token
        assert tensorps("--target", target, "--timeout", "2", "--token", "cli-writer", "ls").code == 5
        assert tensorps(*secure, "--client-cert", ca, "ls").code == 2  # a certificate without its key
        assert tensorps(*secure, "--ca-file", str(tmp_path / "none.pem"), "ls").code == 2


def test_a_bad_timeout_variable_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, server: ServerProcess
) -> None:
    """TENSORPS_TIMEOUT is checked like --timeout: exit 2, with JSON under --json."""
    monkeypatch.setenv("TENSORPS_TIMEOUT", "soon")
    result = tensorps("--target", server.address, "--json", "ls")
    assert result.code == 2 and "--timeout" in result.json()["error"]["message"]
    monkeypatch.setenv("TENSORPS_TIMEOUT", "5")
    assert tensorps("--target", server.address, "ls").code == 0


def test_console_script_and_environment(server: ServerProcess, name: str, npy: Path) -> None:
    """The installed `tensorps` script runs, reading its target from TENSORPS_TARGET."""
    script = Path(sys.executable).parent / "tensorps"
    env = {"TENSORPS_TARGET": server.address, "PATH": "/usr/bin:/bin"}
    put = run([str(script), "put", name, str(npy)], env=env)
    assert put.returncode == 0, put.stderr
    shown = run([str(script), "--json", "info", name], env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == name
    usage = run([str(script), "--help"], env=env)
    assert usage.returncode == 0 and "exit codes:" in usage.stdout
    gone = run([str(script), "rm", name, name], env=env)
    assert gone.returncode == 3  # the first deleted it, the second is NOT_FOUND
