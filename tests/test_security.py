"""TLS, mutual TLS, bearer tokens and limits (DESIGN §7), end to end with real server processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from pki import Pki

from support import ServerProcess, wait_until
from tensorps.client import (
    Client,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from tensorps.v1 import tensorps_pb2 as pb


def tls_flags(pki: Pki, *, mutual: bool) -> list[str]:
    flags = [
        "--tls-cert",
        pki.write("server.pem", pki.server.cert),
        "--tls-key",
        pki.write("server.key", pki.server.key),
    ]
    if mutual:
        flags += ["--tls-client-ca", pki.write("ca.pem", pki.ca.cert)]
    return flags


def localhost(server: ServerProcess) -> str:
    return f"localhost:{server.port}"


# ---- TLS ---------------------------------------------------------------------------------------


def test_tls_serves_verified_clients_and_refuses_plaintext(pki: Pki) -> None:
    """With --tls-cert/--tls-key a client trusting the CA works; a plaintext client cannot connect."""
    with ServerProcess(*tls_flags(pki, mutual=False)) as server:
        with Client(localhost(server), root_certificates=pki.ca.cert, timeout=10) as ps:
            ps.create("secret", value=np.arange(3, dtype=np.int32))
            np.testing.assert_array_equal(ps.read("secret"), [0, 1, 2])
        with Client(localhost(server), timeout=5) as plain, pytest.raises(UnavailableError):
            plain.list()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki: Pki) -> None:
    """Under mTLS a client without a certificate, or with one from another CA, fails; a good one works."""
    with ServerProcess(*tls_flags(pki, mutual=True)) as server:
        target = localhost(server)
        with (
            Client(target, root_certificates=pki.ca.cert, timeout=5) as anonymous,
            pytest.raises(UnavailableError),
        ):
            anonymous.list()
        rogue = pki.rogue_client
        with (
            Client(
                target,
                root_certificates=pki.ca.cert,
                certificate_chain=rogue.cert,
                private_key=rogue.key,
                timeout=5,
            ) as intruder,
            pytest.raises(UnavailableError),
        ):
            intruder.list()
        good = pki.client
        with Client(
            target,
            root_certificates=pki.ca.cert,
            certificate_chain=good.cert,
            private_key=good.key,
            timeout=10,
        ) as ps:
            ps.create("m", value=np.ones(2, np.float32))
            assert ps.read("m").tolist() == [1.0, 1.0]


def test_bad_tls_settings_refuse_to_start(pki: Pki) -> None:
    """A key without a certificate, or an unreadable file, stops the server at start with a message."""
    half = ServerProcess("--tls-key", pki.write("k.key", pki.server.key), wait=False)
    assert half.proc.wait(30) == 1
    half.stop()
    missing = ServerProcess("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key", wait=False)
    assert missing.proc.wait(30) == 1
    missing.stop()
    assert any("TLS" in line for line in half.log)
    assert any("cannot read" in line for line in missing.log)


# ---- tokens ------------------------------------------------------------------------------------

WRITER, READER = "w-" + "a" * 40, "r-" + "b" * 40


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# tensorps tokens\n{WRITER}\n{READER} read-only\n")
    with ServerProcess("--token-file", str(path), workers=2) as server:
        with Client(server.address, token=WRITER) as ps:
            ps.create("guarded", value=np.arange(4, dtype=np.float32))
        yield server, path


def every_call(ps: Client) -> dict[str, Callable[[], object]]:
    return {
        "create": lambda: ps.create("new", dtype="float32", shape=(2,)),
        "delete": lambda: ps.delete("guarded"),
        "assign": lambda: ps.assign("guarded", np.zeros(4, np.float32)),
        "assign_add": lambda: ps.assign_add("guarded", np.ones(4, np.float32)),
        "assign_sub": lambda: ps.assign_sub("guarded", np.ones(4, np.float32)),
        "assign_stream": lambda: ps.assign("guarded", np.zeros(4 << 20, np.float32), validate_shape=False),
        "read": lambda: ps.read("guarded"),
        "read_stream": lambda: ps._read_stream("guarded"),
        "info": lambda: ps.info("guarded"),
        "list": ps.list,
        "server_info": ps.server_info,
    }


READS = {"read", "read_stream", "info", "list", "server_info"}


@pytest.mark.parametrize("token", [None, "wrong", WRITER[:-1], WRITER + "x", f"{READER} x"])
def test_missing_or_wrong_tokens_are_unauthenticated(
    token_server: tuple[ServerProcess, Path], token: str | None
) -> None:
    """Without a valid token every RPC is UNAUTHENTICATED and changes nothing."""
    server, _path = token_server
    with Client(server.address, token=token, timeout=10) as ps:
        for call_name, call in every_call(ps).items():
            with pytest.raises(UnauthenticatedError):
                call()
            assert call_name
    with Client(server.address, token=WRITER) as ps:
        np.testing.assert_array_equal(ps.read("guarded"), np.arange(4))
        assert [v.name for v in ps.list()] == ["guarded"]


def test_read_only_tokens_read_but_never_write(token_server: tuple[ServerProcess, Path]) -> None:
    """A read-only token may Read, ReadStream, GetVariable, ListVariables; the rest is PERMISSION_DENIED."""
    server, _path = token_server
    with Client(server.address, token=READER, timeout=10) as ps:
        for call_name, call in every_call(ps).items():
            if call_name in READS:
                call()
            else:
                with pytest.raises(PermissionDeniedError):
                    call()
    with Client(server.address, token=WRITER) as ps:
        np.testing.assert_array_equal(ps.read("guarded"), np.arange(4))


def test_good_token_reaches_every_call(token_server: tuple[ServerProcess, Path]) -> None:
    """A full token reaches every call: each answers as it would without auth (after delete: NOT_FOUND)."""
    server, _path = token_server
    # In every_call's order: "guarded" is deleted second, so the calls on it that follow find nothing.
    after_delete = {"assign", "assign_add", "assign_sub", "assign_stream", "read", "read_stream", "info"}
    with Client(server.address, token=WRITER, timeout=10) as ps:
        for call_name, call in every_call(ps).items():
            if call_name in after_delete:
                with pytest.raises(NotFoundError):
                    call()
            else:
                call()
        ps.delete("new")
        ps.create("guarded", value=np.arange(4, dtype=np.float32))


def test_health_service_needs_no_token(token_server: tuple[ServerProcess, Path]) -> None:
    """Orchestrators probe health without a token."""
    server, _path = token_server
    assert server.healthy()


def test_tokens_reload_on_sighup(tmp_path: Path) -> None:
    """SIGHUP re-reads the token file: a new token works, a removed one stops working."""
    path = tmp_path / "tokens"
    path.write_text("first-token\n")
    with ServerProcess("--token-file", str(path), workers=2) as server:
        with Client(server.address, token="first-token") as ps:
            ps.list()
        path.write_text("second-token\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: sum("reloaded 1 token" in line for line in server.log) == 2)
        with Client(server.address, token="second-token") as ps:
            ps.list()
        with Client(server.address, token="first-token") as ps, pytest.raises(UnauthenticatedError):
            ps.list()


# ---- limits ------------------------------------------------------------------------------------


def test_variable_size_total_and_count_limits() -> None:
    """Beyond max_variable_bytes, max_total_bytes or max_variables: RESOURCE_EXHAUSTED naming it."""
    flags = ["--max-variable-bytes", "64K", "--max-total-bytes", "160K", "--max-variables", "3"]
    with ServerProcess(*flags) as server, Client(server.address) as ps:
        with pytest.raises(ResourceExhaustedError, match="max_variable_bytes"):
            ps.create("huge", value=np.zeros(64 * 1024 // 4 + 1, np.float32))
        with pytest.raises(ResourceExhaustedError, match="max_variable_bytes"):
            ps.create("declared", dtype="float32", shape=(1 << 20,))
        ps.create("a", value=np.zeros(16 * 1024, np.float32))  # 64 KiB
        ps.create("b", value=np.zeros(16 * 1024, np.float32))  # 128 KiB in use
        with pytest.raises(ResourceExhaustedError, match="budget"):
            ps.create("c", value=np.zeros(16 * 1024, np.float32))
        assert [v.name for v in ps.list()] == ["a", "b"]
        ps.create("c", dtype="float32", shape=(4,))  # declared: no bytes yet
        with pytest.raises(ResourceExhaustedError, match="limit"):
            ps.create("d", dtype="float32", shape=(4,))
        # A locked write needs a second buffer; beyond the budget it fails and changes nothing.
        before = ps.info("a")
        with pytest.raises(ResourceExhaustedError):
            ps.assign("a", np.ones(16 * 1024, np.float32))
        assert ps.info("a") == before
        np.testing.assert_array_equal(ps.read("a"), np.zeros(16 * 1024))
        # Unlocked same-shape writes go in place and need no second buffer.
        ps.assign("a", np.ones(16 * 1024, np.float32), use_locking=False)
        ps.delete("b")
        ps.assign("a", np.full(16 * 1024, 2, np.float32))
        np.testing.assert_array_equal(ps.read("a"), np.full(16 * 1024, 2))


def test_message_size_limit_is_resource_exhausted(server: ServerProcess) -> None:
    """A unary message beyond --max-message-bytes (64 MiB by default) is refused by gRPC itself."""
    request = pb.AssignRequest(name="too-big")
    request.value.tensor_content = b"\0" * (65 << 20)
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = channel.unary_unary("/tensorps.v1.ParameterServer/Assign", None, None)
        with pytest.raises(grpc.RpcError) as err:
            stub(request.SerializeToString(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_too_small_message_limit_refuses_to_start() -> None:
    """The client sends up to 4 MiB in one message, so the server insists on at least that."""
    proc = ServerProcess("--max-message-bytes", "1M", wait=False)
    assert proc.proc.wait(30) == 1
    proc.stop()
    assert any("max-message-bytes" in line for line in proc.log)


def stalled_write(address: str, name: str, stop: threading.Event, outcome: dict[str, object]) -> None:
    """Open a streamed write, send only its header, then stall until told to stop."""

    def chunks() -> Iterator[bytes]:
        shape = pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=1024)])
        header = pb.WriteHeader(op=pb.WRITE_OP_ASSIGN, name=name, dtype=pb.DT_FLOAT, shape=shape)
        yield pb.WriteChunk(header=header).SerializeToString()
        stop.wait(30)

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/tensorps.v1.ParameterServer/WriteStream", None, None)
        try:
            list(call(chunks(), timeout=30))
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()


def test_stalled_stream_is_cancelled_after_the_idle_timeout() -> None:
    """A streamed write that stops sending is cancelled after --stream-idle-timeout."""
    with ServerProcess("--stream-idle-timeout", "1") as server, Client(server.address) as ps:
        ps.create("slow", dtype="float32", shape=(1024,))
        stop, outcome = threading.Event(), dict[str, object]()
        writer = threading.Thread(target=stalled_write, args=(server.address, "slow", stop, outcome))
        started = time.monotonic()
        writer.start()
        writer.join(20)
        stop.set()
        assert outcome["code"] == grpc.StatusCode.CANCELLED
        assert time.monotonic() - started < 10
        assert not ps.is_initialized("slow")
        assert server.healthy()


def test_concurrent_rpc_limit_is_resource_exhausted() -> None:
    """Beyond --max-concurrent-rpcs calls in flight, further calls get RESOURCE_EXHAUSTED."""
    with ServerProcess("--max-concurrent-rpcs", "1", "--workers", "1") as server:
        stop, outcome = threading.Event(), dict[str, object]()
        holder = threading.Thread(target=stalled_write, args=(server.address, "x", stop, outcome))
        holder.start()
        try:
            time.sleep(0.5)
            with Client(server.address, timeout=5) as ps, pytest.raises(ResourceExhaustedError):
                ps.list()
        finally:
            stop.set()
            holder.join(20)


def test_exposed_plaintext_port_warns_loudly() -> None:
    """Listening beyond loopback without TLS or tokens logs a SECURITY warning."""
    with ServerProcess(host="0.0.0.0") as server:
        assert any("SECURITY" in line and "without TLS or tokens" in line for line in server.log)
    with ServerProcess() as server:
        assert not any("SECURITY" in line for line in server.log)
