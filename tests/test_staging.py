"""Memory in transit counts against a budget and idle readers are cut off (issue 10, defect 13)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from support import ServerProcess, wait_until
from tensorps.client import Client, ResourceExhaustedError
from tensorps.client.codec import shape_to_proto
from tensorps.v1 import tensorps_pb2 as pb

MiB = 1 << 20
SERVICE = "/tensorps.v1.ParameterServer/"
WRITE = np.arange(6 * MiB // 4, dtype=np.float32)  # 6 MiB: streamed (above 4 MiB)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One worker (staging is per worker) with an 8 MiB staging budget and a 1 s idle timeout."""
    with ServerProcess(
        "--max-staging-bytes",
        "8M",
        "--max-total-bytes",
        "256M",
        "--stream-idle-timeout",
        "1",
        "--log-level",
        "DEBUG",  # the staging lines tell when a stalled stream holds its bytes
        workers=1,
    ) as proc:
        yield proc


def _wait_for_staging(server: ServerProcess, since: int, text: str) -> None:
    """Until the server logged (after line `since`) that it took staging bytes: `text` names the call."""
    assert wait_until(lambda: any(text in line for line in server.log[since:]), 30), "\n".join(server.log)


def _stalled_write(channel: grpc.Channel, name: str, go: threading.Event) -> Iterator[bytes]:
    """A streamed assign of WRITE that sends its header and first MiB, then waits for `go`."""
    raw = WRITE.view(np.uint8)
    header = pb.WriteHeader(
        op=pb.WRITE_OP_ASSIGN,
        name=name,
        dtype=pb.DT_FLOAT,
        shape=shape_to_proto(WRITE.shape),
        read_value=False,
    )

    def messages() -> Iterator[bytes]:
        yield pb.WriteChunk(header=header, data=raw[:MiB].tobytes()).SerializeToString()
        go.wait(30)
        for offset in range(MiB, raw.nbytes, MiB):
            yield pb.WriteChunk(offset=offset, data=raw[offset : offset + MiB].tobytes()).SerializeToString()

    stream = channel.stream_stream(SERVICE + "WriteStream", None, None)
    return iter(stream(messages(), timeout=60))


def test_streamed_writes_beyond_the_staging_budget_are_refused(server: ServerProcess) -> None:
    """A second 6 MiB streamed write while one is received is RESOURCE_EXHAUSTED; after it, room again."""
    with Client(server.address, timeout=60) as ps, grpc.insecure_channel(server.address) as channel:
        for name in ("s1", "s2"):
            ps.create(name, value=np.zeros_like(WRITE))
        go = threading.Event()
        since = len(server.log)
        first = _stalled_write(channel, "s1", go)
        try:
            _wait_for_staging(server, since, "for a streamed write, 6291456 of")
            with pytest.raises(ResourceExhaustedError, match="staging budget"):
                ps.assign("s2", WRITE, read_value=False)
            assert ps.info("s2").version == 1, "a refused write changes nothing"
        finally:
            go.set()
        assert len(list(first)) == 1  # its reply: the info
        assert ps.assign("s2", WRITE, read_value=False).version == 2
        np.testing.assert_array_equal(ps.read("s1"), WRITE)


def _stalled_batch(channel: grpc.Channel, name: str, go: threading.Event) -> Iterator[bytes]:
    """A batch assigning WRITE to `name` that sends its header and first MiB, then waits for `go`."""
    raw = WRITE.view(np.uint8)
    op = pb.BatchOp(kind=pb.BATCH_OP_ASSIGN, name=name, read_value=False)
    op.value.dtype = pb.DT_FLOAT
    shape_to_proto(WRITE.shape, op.value.tensor_shape)
    header = pb.BatchHeader(ops=[op])

    def messages() -> Iterator[bytes]:
        yield pb.BatchChunk(header=header, data=raw[:MiB].tobytes()).SerializeToString()
        go.wait(30)
        for offset in range(MiB, raw.nbytes, MiB):
            yield pb.BatchChunk(offset=offset, data=raw[offset : offset + MiB].tobytes()).SerializeToString()

    stream = channel.stream_stream(SERVICE + "BatchStream", None, None)
    return iter(stream(messages(), timeout=60))


def test_batches_beyond_the_staging_budget_are_refused(server: ServerProcess) -> None:
    """A 6 MiB batch while another one is received is RESOURCE_EXHAUSTED and changes nothing."""
    with Client(server.address, timeout=60) as ps, grpc.insecure_channel(server.address) as channel:
        for name in ("b1", "b2"):
            ps.create(name, value=np.zeros_like(WRITE))
        go = threading.Event()
        since = len(server.log)
        first = _stalled_batch(channel, "b1", go)
        try:
            _wait_for_staging(server, since, "for a batch, 6291456 of")
            with pytest.raises(ResourceExhaustedError, match="staging budget"):
                ps.assign_many({"b2": WRITE})
            assert ps.info("b2").version == 1
        finally:
            go.set()
        replies = list(first)
        assert pb.BatchReply.FromString(replies[0]).results[0].code == 0
        assert ps.assign_many({"b2": WRITE})["b2"].version == 2
        np.testing.assert_array_equal(ps.read("b1"), WRITE)


def test_batch_write_whose_returned_value_finds_no_room_is_not_applied(server: ServerProcess) -> None:
    """In a batch, a write with read_value whose reply finds no staging room fails before it is applied."""
    value = np.ones(2 * MiB // 4, np.float32)  # 2 MiB: three take 6 MiB in, each 2 MiB more back
    with Client(server.address, timeout=60) as ps:
        names = [f"p{i}" for i in range(3)]
        for name in names:
            ps.create(name, value=np.zeros_like(value))
        pipe = ps.pipeline(raise_on_error=False)
        for name in names:
            pipe.assign_add(name, value, read_value=True)  # its reply is a copy (a locked assign's is not)
        results = pipe.execute()
        np.testing.assert_array_equal(results[0], value)
        for result in results[1:]:
            assert isinstance(result, ResourceExhaustedError) and "staging budget" in result.message
        assert [ps.info(name).version for name in names] == [2, 1, 1], "a refused write changes nothing"


def test_readers_that_stop_reading_are_cancelled_and_their_staging_freed() -> None:
    """A ReadStream or Batch reply whose client stops draining holds its copy only until the idle timeout."""
    # Far more than gRPC's flow-control windows take in (a few MiB): the server cannot finish sending.
    value = np.arange(40 * MiB // 4, dtype=np.float32)
    with (
        ServerProcess("--max-staging-bytes", "64M", "--stream-idle-timeout", "1", workers=1) as server,
        Client(server.address, timeout=60) as ps,
        grpc.insecure_channel(server.address, [("grpc.max_receive_message_length", -1)]) as channel,
    ):
        ps.create("r", value=value)
        call = channel.unary_stream(SERVICE + "ReadStream", None, None)
        stalled = iter(call(pb.ReadRequest(name="r").SerializeToString(), timeout=60))
        next(stalled)  # the info; then this client reads nothing more for a while
        with pytest.raises(ResourceExhaustedError, match="staging budget"):
            ps.read("r")  # the stalled reader's copy holds 40 of the 64 MiB
        time.sleep(2.5)
        np.testing.assert_array_equal(ps.read("r"), value)
        with pytest.raises(grpc.RpcError) as cancelled:
            for _message in stalled:
                pass
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED
        assert any("cancelling a reply stream whose client stopped reading" in line for line in server.log)

        batch = channel.stream_stream(SERVICE + "BatchStream", None, None)
        header = pb.BatchHeader(ops=[pb.BatchOp(kind=pb.BATCH_OP_READ, name="r")])
        stalled = iter(batch(iter([pb.BatchChunk(header=header).SerializeToString()]), timeout=60))
        assert pb.BatchReply.FromString(next(stalled)).results[0].code == 0
        with pytest.raises(ResourceExhaustedError, match="staging budget"):
            ps.read("r")
        time.sleep(2.5)
        np.testing.assert_array_equal(ps.read("r"), value)
        with pytest.raises(grpc.RpcError) as cancelled:
            for _message in stalled:
                pass
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED


def test_staging_limit_flag_environment_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-staging-bytes takes sizes and TENSORPS_MAX_STAGING_BYTES; unset, it follows the budget."""
    from tensorps.server.__main__ import config_from_args
    from tensorps.server.staging import GiB, default_staging_bytes

    assert config_from_args(["--max-staging-bytes", "64M"]).max_staging_bytes == 64 * MiB
    monkeypatch.setenv("TENSORPS_MAX_STAGING_BYTES", "2G")
    assert config_from_args([]).max_staging_bytes == 2 * GiB
    monkeypatch.delenv("TENSORPS_MAX_STAGING_BYTES")
    assert config_from_args([]).max_staging_bytes is None
    assert default_staging_bytes(256 * MiB) == 256 * MiB  # small stores: any tensor that fits can stage
    assert default_staging_bytes(2 * GiB) == GiB
    assert default_staging_bytes(16 * GiB) == 4 * GiB
