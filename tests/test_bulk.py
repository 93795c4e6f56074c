"""The bulk side channel (BatchHeader.bulk): large batches' bytes over a TCP connection next to gRPC.

Real servers on loopback. Batches round-trip over it both ways (atomic or not, per-operation errors, TLS,
mutual TLS, read-only tokens); a wrong or used ticket, a client that never connects and a truncated transfer
change nothing and free their staging; a client falls back to gRPC for good when the bulk port cannot be
reached or the server runs with --bulk-port off, with exactly-once writes throughout.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from pki import Pki
from test_security import tls_flags

from support import ServerProcess, same_values, wait_until
from tensorps.client import (
    BatchError,
    Client,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    batch_transport,
)
from tensorps.client import bulk as client_bulk
from tensorps.server.__main__ import config_from_args
from tensorps.v1 import tensorps_pb2 as pb

BATCH_STREAM = "/tensorps.v1.ParameterServer/BatchStream"
COUNT = 3 << 19  # float32s: 6 MiB, beyond one Batch message (4 MiB), so that batches stream
Array = np.ndarray[Any, Any]


@pytest.fixture(scope="module")
def bulk_server() -> Iterator[ServerProcess]:
    """Two workers, each with an ephemeral bulk port; a short idle timeout for the stalled-client tests."""
    with ServerProcess("--stream-idle-timeout", "3", workers=2) as server:
        yield server


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch that streams takes the bulk channel, also over TLS (which needs 32 MiB by default)."""
    monkeypatch.setattr(batch_transport, "BULK_THRESHOLD", 0)


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bulk ports every client of the test tried to connect to."""
    ports: list[int] = []
    original = client_bulk.BulkChannel.connect

    def counting(self: client_bulk.BulkChannel, port: int, ticket: bytes, timeout: float | None) -> Any:
        ports.append(port)
        return original(self, port, ticket, timeout)

    monkeypatch.setattr(client_bulk.BulkChannel, "connect", counting)
    return ports


def model(seed: int, prefix: str) -> dict[str, Array]:
    """A few MiB in tensors of several dtypes and sizes, scalars and empty ones included."""
    rng = np.random.default_rng(seed)
    return {
        f"{prefix}/kernel": rng.standard_normal((512, 1024), dtype=np.float32),
        f"{prefix}/bias": rng.standard_normal(1024).astype(np.float64),
        f"{prefix}/scale": np.array(rng.standard_normal(), np.float32),
        f"{prefix}/steps": rng.integers(-100, 100, (7, 11), dtype=np.int64),
        f"{prefix}/mask": rng.integers(0, 2, 300).astype(bool),
        f"{prefix}/empty": np.zeros((0, 3), np.int8),
        f"{prefix}/big": rng.standard_normal(1 << 19).astype(np.complex64),
    }


def assert_same(got: dict[str, Any], want: dict[str, Array]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert same_values(np.asarray(got[key]), np.asarray(value)), key


@pytest.mark.parametrize("atomic", [False, True])
def test_bulk_batches_round_trip_both_ways(
    bulk_server: ServerProcess, connects: list[int], name: str, atomic: bool
) -> None:
    """Creates, pulls, pushes (with and without read_value) and mixed pipelines go over the bulk channel
    and give exactly what the gRPC data path gives."""
    values = model(1, name)
    deltas = {key: np.ones_like(v) for key, v in values.items() if v.dtype.kind in "fc"}
    with Client(bulk_server.address, timeout=60) as ps:
        ps.create_many({key: {"value": v} for key, v in values.items()}, atomic=atomic)
        assert_same(ps.read_many(list(values)), values)
        assert_same(ps.read_many(prefix=f"{name}/"), values)
        doubled = {key: v * 2 for key, v in values.items() if v.dtype.kind in "fc"}
        infos = ps.assign_many(doubled, atomic=atomic)
        assert all(info.version == 2 for info in infos.values())
        after = ps.assign_add_many(deltas, read_value=True, use_locking=True, atomic=atomic)
        assert_same(after, {key: doubled[key] + 1 for key in deltas})
        echoed = ps.assign_many(values, read_value=True, atomic=atomic)  # locked: the server echoes nothing
        assert_same(echoed, values)
        kernel = f"{name}/kernel"
        results = (
            ps.pipeline(atomic=atomic)
            .assign_sub(kernel, values[kernel])
            .read(kernel)
            .info(f"{name}/steps")
            .read(f"{name}/big")
            .execute()
        )
        assert not results[1].any() and results[2].version == 2
        assert same_values(results[3], values[f"{name}/big"])
        assert ps._bulk.usable
    assert len(connects) >= 6


def test_per_operation_errors_and_atomic_failures_over_bulk(
    bulk_server: ServerProcess, connects: list[int], name: str
) -> None:
    """A failed operation of a batch in order leaves the others' values in place (offsets stay right); an
    atomic failure changes nothing."""
    values = model(2, name)
    with Client(bulk_server.address, timeout=60) as ps:
        ps.create_many({key: {"value": v} for key, v in values.items()})
        kernel, big = f"{name}/kernel", f"{name}/big"
        pipe = ps.pipeline(raise_on_error=False)
        pipe.read(kernel).assign_add(f"{name}/missing", values[kernel]).read(big)
        pipe.assign(kernel, np.zeros((2, 2), np.float32)).read(kernel)
        first, missing, second, shape, third = pipe.execute()
        assert same_values(first, values[kernel]) and same_values(second, values[big])
        assert isinstance(missing, NotFoundError) and isinstance(shape, InvalidArgumentError)
        assert same_values(third, values[kernel])
        with pytest.raises(BatchError):
            ps.assign_many({kernel: values[kernel] + 1, f"{name}/nothing": np.zeros(3, np.float32)})
        with pytest.raises(NotFoundError, match="nothing was applied"):
            ps.assign_many({big: values[big] + 1, f"{name}/nothing": values[big]}, atomic=True)
        assert same_values(ps.read(big), values[big])
        assert ps._bulk.usable
    assert connects


@pytest.mark.parametrize("mutual", [False, True])
def test_bulk_over_tls_and_mutual_tls(pki: Pki, connects: list[int], mutual: bool) -> None:
    """With TLS the bulk port serves the gRPC port's certificate (and asks for the client's); the client
    wraps its connection with its channel's roots and certificate."""
    values = model(3, "tls")
    chain, key = (pki.client.cert, pki.client.key) if mutual else (None, None)
    with ServerProcess(*tls_flags(pki, mutual=mutual), workers=2) as server:
        target = f"localhost:{server.port}"
        with Client(
            target, root_certificates=pki.ca.cert, certificate_chain=chain, private_key=key, timeout=30
        ) as ps:
            ps.create_many({key: {"value": v} for key, v in values.items()})
            assert_same(ps.read_many(list(values)), values)
            pushed = {key: v + 1 for key, v in values.items() if v.dtype.kind in "fc"}
            added = ps.assign_add_many(pushed, read_value=True)
            assert_same(added, {key: values[key] + pushed[key] for key in pushed})
            assert ps._bulk.usable, ps._bulk.reason
        assert len(connects) >= 3
        if mutual:
            # A live ticket, presented over TLS without a client certificate: refused.
            credentials = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
            with grpc.secure_channel(target, credentials) as channel:
                replies, offer = open_bulk_call(channel, read_header("tls/kernel"), timeout=20)
                context = ssl.create_default_context(cadata=pki.ca.cert.decode())
                assert bulk_answer(offer.bulk_port, offer.bulk_ticket, context) == b""
                replies.cancel()


def test_read_only_tokens_pull_over_bulk_and_never_push(tmp_path: Path, connects: list[int]) -> None:
    """The ticket comes from an authenticated call: a read-only token pulls over bulk, its pushes are
    PERMISSION_DENIED before any ticket is handed out, and change nothing."""
    tokens = tmp_path / "tokens"
    tokens.write_text("writer-token\nreader-token read-only\n")
    values = model(4, "ro")
    with ServerProcess("--token-file", str(tokens)) as server:
        with Client(server.address, token="writer-token", timeout=30) as writer:
            writer.create_many({key: {"value": v} for key, v in values.items()})
        with Client(server.address, token="reader-token", timeout=30) as reader:
            assert_same(reader.read_many(list(values)), values)
            pulls = len(connects)
            assert pulls >= 1
            with pytest.raises(PermissionDeniedError):
                reader.assign_many({key: v for key, v in values.items() if v.size})
            assert len(connects) == pulls and reader._bulk.usable
            assert_same(reader.read_many(list(values)), values)
        with Client(server.address, timeout=30) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.read_many(list(values))


# ---- the protocol by hand ------------------------------------------------------------------------


def assign_header(name: str, count: int) -> pb.BatchHeader:
    header = pb.BatchHeader(bulk=True)
    op = header.ops.add(kind=pb.BATCH_OP_ASSIGN, name=name, read_value=False)
    op.value.dtype = pb.DT_FLOAT
    op.value.tensor_shape.dim.add(size=count)
    return header


def read_header(name: str) -> pb.BatchHeader:
    header = pb.BatchHeader(bulk=True)
    header.ops.add(kind=pb.BATCH_OP_READ, name=name)
    return header


def open_bulk_call(
    channel: grpc.Channel, header: pb.BatchHeader, *, timeout: float | None = None, data: bytes = b""
) -> tuple[Any, pb.BatchReply]:
    """A BatchStream call asking for bulk; its reply stream and the server's offer."""
    call = channel.stream_stream(BATCH_STREAM, None, None)
    request = pb.BatchChunk(header=header, data=data).SerializeToString()
    replies: Any = call(iter([request]), timeout=timeout)
    return replies, pb.BatchReply.FromString(next(replies))


def bulk_answer(port: int, ticket: bytes, context: ssl.SSLContext | None = None) -> bytes:
    """Present `ticket` on a new connection and stop sending; the server's answer (b"\\x01", or b"" when
    it closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            if context is None:
                raw.sendall(ticket)
                raw.shutdown(socket.SHUT_WR)
                return raw.recv(1)
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(ticket)
                return sock.recv(1)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


def final_code(replies: Any) -> grpc.StatusCode:
    try:
        for _ in replies:
            pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def worker_rss(server: ServerProcess) -> int:
    (pid,) = server.worker_pids()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_wrong_used_and_truncated_tickets_change_nothing(bulk_server: ServerProcess, name: str) -> None:
    """A wrong ticket is closed without an answer and does not burn the real one; a truncated transfer
    fails the call and applies nothing; a used ticket is dead."""
    count = 1 << 20
    with Client(bulk_server.address, timeout=30) as ps:
        ps.create(name, value=np.arange(count, dtype=np.float32))
    with grpc.insecure_channel(bulk_server.address) as channel:
        replies, offer = open_bulk_call(channel, assign_header(name, count), timeout=30)
        assert len(offer.bulk_ticket) == 16 and 0 < offer.bulk_port < 65536 and not offer.results
        assert bulk_answer(offer.bulk_port, secrets.token_bytes(16)) == b""
        assert bulk_answer(offer.bulk_port, offer.bulk_ticket[:8]) == b""  # too short: closed
        with socket.create_connection(("127.0.0.1", offer.bulk_port), timeout=10) as sock:
            sock.sendall(offer.bulk_ticket)
            assert sock.recv(1) == b"\x01"
            sock.sendall(np.zeros(count // 2, np.float32).tobytes())  # half the value, then gone
        assert final_code(replies) == grpc.StatusCode.INVALID_ARGUMENT
        assert bulk_answer(offer.bulk_port, offer.bulk_ticket) == b""
    with Client(bulk_server.address, timeout=30) as ps:
        assert ps.info(name).version == 1
        np.testing.assert_array_equal(ps.read(name), np.arange(count, dtype=np.float32))


def test_a_client_that_never_connects_is_cancelled(bulk_server: ServerProcess, name: str) -> None:
    """The call's deadline, or the server's idle timeout (3 s here) without one, ends a call whose data
    never comes: nothing changes and its ticket dies with it."""
    count = 1 << 16
    with Client(bulk_server.address, timeout=30) as ps:
        ps.create(name, value=np.arange(count, dtype=np.float32))
    with grpc.insecure_channel(bulk_server.address) as channel:
        started = time.monotonic()
        replies, offer = open_bulk_call(channel, assign_header(name, count), timeout=1.5)
        assert final_code(replies) == grpc.StatusCode.DEADLINE_EXCEEDED
        replies, idle_offer = open_bulk_call(channel, assign_header(name, count))
        assert final_code(replies) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 15
        for dead in (offer, idle_offer):
            assert bulk_answer(dead.bulk_port, dead.bulk_ticket) == b""
    with Client(bulk_server.address, timeout=30) as ps:
        assert ps.info(name).version == 1


def test_failed_transfers_free_their_staging() -> None:
    """A truncated transfer drops its staging buffer; a client that never connects never gets one."""
    count = 24 << 20  # 96 MiB of float32
    with ServerProcess("--stream-idle-timeout", "2") as server:
        with Client(server.address, timeout=30) as ps:
            ps.create("staged", dtype="float32", shape=(count,))
        before = worker_rss(server)
        with grpc.insecure_channel(server.address) as channel:
            replies, offer = open_bulk_call(channel, assign_header("staged", count), timeout=30)
            with socket.create_connection(("127.0.0.1", offer.bulk_port), timeout=10) as sock:
                sock.sendall(offer.bulk_ticket)
                assert sock.recv(1) == b"\x01"
                sock.sendall(bytes(80 << 20))
            assert final_code(replies) == grpc.StatusCode.INVALID_ARGUMENT
            assert wait_until(lambda: worker_rss(server) < before + (16 << 20), timeout=10)
            replies, offer = open_bulk_call(channel, assign_header("staged", count))
            assert final_code(replies) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert worker_rss(server) < before + (16 << 20)
        with Client(server.address, timeout=30) as ps:
            assert not ps.is_initialized("staged")


def test_bulk_requests_must_be_well_formed(bulk_server: ServerProcess, name: str) -> None:
    """Bulk with data in the stream, or in a unary Batch: INVALID_ARGUMENT, before any ticket."""
    with grpc.insecure_channel(bulk_server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            open_bulk_call(channel, assign_header(name, 4), data=bytes(16), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unary = channel.unary_unary("/tensorps.v1.ParameterServer/Batch", None, None)
        request = pb.BatchChunk(header=assign_header(name, 4), data=bytes(16)).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            unary(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "BatchStream" in str(caught.value.details())


# ---- falling back to gRPC ------------------------------------------------------------------------


def test_unreachable_bulk_port_falls_back_to_grpc_for_good(
    bulk_server: ServerProcess, connects: list[int], name: str
) -> None:
    """The first connection that fails turns the channel off for the client; the cancelled call changed
    nothing and its resend (same request id) applies once."""
    counter = f"{name}/counter"
    with Client(bulk_server.address, timeout=30) as ps:
        ps.create(counter, value=np.zeros(COUNT, np.float32))
        ps._bulk.host = "127.0.0.2"  # loopback, but not where the server listens: refused
        after = ps.assign_add_many({counter: np.ones(COUNT, np.float32)}, use_locking=True, read_value=True)
        assert not ps._bulk.usable and "127.0.0.2" in ps._bulk.reason
        np.testing.assert_array_equal(after[counter], np.ones(COUNT, np.float32))
        assert len(connects) == 1
        np.testing.assert_array_equal(ps.read_many([counter])[counter], np.ones(COUNT, np.float32))
        assert len(connects) == 1  # not tried again
        assert ps.info(counter).version == 2


def test_a_transfer_that_breaks_is_retried_exactly_once(
    bulk_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The reply's transfer fails after the writes applied: the retry (same request id) answers with the
    first outcome instead of adding again."""
    counter = f"{name}/counter"
    real = client_bulk.receive_values
    failures: list[int] = []

    def flaky(sock: socket.socket, expected: int | None) -> list[memoryview]:
        if not failures:
            failures.append(expected or 0)
            raise ConnectionResetError("connection reset by a test")
        return real(sock, expected)

    monkeypatch.setattr(client_bulk, "receive_values", flaky)
    with Client(bulk_server.address, timeout=30) as ps:
        ps.create(counter, value=np.zeros(COUNT, np.float32))
        after = ps.assign_add_many({counter: np.ones(COUNT, np.float32)}, use_locking=True, read_value=True)
        assert failures and ps._bulk.usable
        np.testing.assert_array_equal(after[counter], np.ones(COUNT, np.float32))
        assert ps.info(counter).version == 2


def test_bulk_port_off(connects: list[int]) -> None:
    """--bulk-port off: no listener; a bulk request is UNIMPLEMENTED, the client learns it once and sends
    its batches over gRPC."""
    values = model(5, "off")
    with ServerProcess("--bulk-port", "off") as server:
        assert not any("bulk port" in line for line in server.log)
        with Client(server.address, timeout=30) as ps:
            ps.create_many({key: {"value": v} for key, v in values.items()})
            assert_same(ps.read_many(list(values)), values)
            assert not ps._bulk.usable and "--bulk-port off" in ps._bulk.reason
            assert_same(ps.read_many(list(values)), values)
        assert not connects
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as caught:
            open_bulk_call(channel, read_header("off/kernel"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two consecutive free ports")


def test_fixed_bulk_port_gives_each_worker_its_own(connects: list[int]) -> None:
    """--bulk-port P: worker i listens on P+i; a server whose ports are taken refuses to start."""
    base = _free_port_pair()
    with ServerProcess("--bulk-port", str(base), workers=2) as server:
        assert wait_until(lambda: sum("bulk port" in line for line in server.log) == 2)
        assert {base, base + 1} == {
            int(line.rsplit("bulk port ", 1)[1]) for line in server.log if "bulk port" in line
        }
        values = model(6, "fixed")
        with Client(server.address, timeout=30) as ps:
            ps.create_many({key: {"value": v} for key, v in values.items()})
            assert_same(ps.read_many(list(values)), values)
        assert set(connects) <= {base, base + 1} and connects
        taken = ServerProcess("--bulk-port", str(base + 1), wait=False)
        assert taken.proc.wait(30) == 1
        taken.stop()
        assert any(f"bulk port {base + 1}" in line and "in use" in line for line in taken.log)


def test_bulk_port_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_from_args([]).bulk_port == 0
    assert config_from_args(["--bulk-port", "off"]).bulk_port == -1
    assert config_from_args(["--bulk-port", "-1"]).bulk == False  # noqa: E712
    assert config_from_args(["--bulk-port", "7000", "--workers", "3"]).worker_bulk_port(2) == 7002
    for bad in (["--bulk-port", "65536"], ["--bulk-port", "x"], ["--bulk-port", "65535", "--workers", "2"]):
        with pytest.raises(SystemExit):
            config_from_args(bad)
    monkeypatch.setenv("TENSORPS_BULK_PORT", "off")
    assert config_from_args([]).bulk_port == -1


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("localhost:50051", "localhost"),
        ("10.0.0.7:1", "10.0.0.7"),
        ("[::1]:50051", "::1"),
        ("dns:///ps.example:443", "ps.example"),
        ("ipv4:127.0.0.1:50051", "127.0.0.1"),
        ("ps.example", "ps.example"),
        ("unix:/tmp/sock", None),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", None),
        ("dns://8.8.8.8/ps.example:443", None),
    ],
)
def test_bulk_host_of_a_target(target: str, host: str | None) -> None:
    assert client_bulk.target_host(target) == host


def test_concurrent_bulk_batches(bulk_server: ServerProcess, connects: list[int], name: str) -> None:
    """Several threads' bulk batches at once, over both workers: each gets its own values."""
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            values = model(10 + index, f"{name}/{index}")
            with Client(bulk_server.address, timeout=60) as ps:
                ps.create_many({key: {"value": v} for key, v in values.items()})
                for _ in range(3):
                    assert_same(ps.read_many(list(values)), values)
                    values = {key: v + 1 if v.dtype.kind in "fc" else v for key, v in values.items()}
                    ps.assign_many(values)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(connects) >= 4 * 7
    assert os.path.exists(bulk_server.store)


def test_the_reply_size_decides_once_known(
    bulk_server: ServerProcess, connects: list[int], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A pull of unknown size (new names, a new prefix) takes the bulk channel; once the client has seen
    that the reply is small, the same pull goes as one message."""
    monkeypatch.setattr(batch_transport, "BULK_THRESHOLD", 4 << 20)
    small = {f"{name}/{i}": np.full(256, i, np.float32) for i in range(8)}
    with Client(bulk_server.address, timeout=30) as creator:
        creator.create_many({key: {"value": v} for key, v in small.items()})
    with Client(bulk_server.address, timeout=30) as ps:
        assert_same(ps.read_many(prefix=f"{name}/"), small)
        assert_same(ps.read_many(list(small)), small)
        assert len(connects) == 1  # the prefix's size was unknown; the names' sizes came with it
        assert_same(ps.read_many(prefix=f"{name}/"), small)
        assert len(connects) == 1


def test_a_worker_killed_during_bulk_transfers(connects: list[int]) -> None:
    """SIGKILL of a worker while bulk batches flow: no client hangs; each batch either returns (retried on
    another worker, exactly once) or raises UnavailableError; what the last one wrote reads back."""
    rng = np.random.default_rng(7)
    values = {f"kill/{i}": rng.standard_normal(1 << 21, dtype=np.float32) for i in range(6)}  # 48 MiB
    with ServerProcess(workers=2) as server, Client(server.address, timeout=60) as ps:
        ps.create_many({key: {"value": v} for key, v in values.items()})
        outcomes: list[object] = []

        def pushes() -> None:
            for step in range(6):
                pushed = {key: v + step for key, v in values.items()}
                try:
                    ps.assign_many(pushed)
                    outcomes.append(pushed)
                    assert_same(ps.read_many(list(values)), pushed)
                except UnavailableError as exc:
                    outcomes.append(exc)

        thread = threading.Thread(target=pushes)
        thread.start()
        time.sleep(0.3)
        os.kill(server.worker_pids()[0], signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive()
        assert len(outcomes) == 6
        last = [o for o in outcomes if isinstance(o, dict)]
        assert last, outcomes
        assert wait_until(server.healthy, timeout=20)
        if isinstance(outcomes[-1], dict):
            assert_same(ps.read_many(list(values)), outcomes[-1])
    assert connects
