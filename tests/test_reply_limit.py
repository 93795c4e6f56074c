"""A unary write whose reply would exceed the client's receive limit is refused before it applies.

Without this, a client with gRPC's default 4 MiB receive limit that sends a 5 MiB AssignAdd (read_value
defaults to true) would see RESOURCE_EXHAUSTED from its own library although the server applied the write,
and a retry would apply it twice. Clients declare their limit in `tensorps-max-receive-bytes`; without it
the server assumes gRPC's default.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, codec
from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "/tensorps.v1.ParameterServer/"
KEY = "tensorps-max-receive-bytes"
MiB = 1 << 20
BIG = (5 * MiB) // 4  # float32 elements: a 5 MiB tensor


def request(name: str, value: np.ndarray, **flags: bool) -> bytes:
    proto = pb.AssignRequest(name=name)
    for flag, on in flags.items():
        setattr(proto, flag, on)
    proto.value.dtype = codec.dtype_of(value.dtype).code  # type: ignore[assignment]
    codec.shape_to_proto(value.shape, proto.value.tensor_shape)
    proto.value.tensor_content = value.tobytes()
    return proto.SerializeToString()


def call(channel: grpc.Channel, method: str, payload: bytes, limit: str | None = None) -> bytes:
    metadata = ((KEY, limit),) if limit is not None else None
    stub = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    reply: bytes = stub(payload, timeout=30, metadata=metadata)
    return reply


@pytest.fixture
def default_channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    """A channel with gRPC's default limits (4 MiB received), as most clients have."""
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def large_channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * MiB)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield channel


@pytest.fixture
def variable(server: ServerProcess, name: str) -> Iterator[str]:
    with Client(server.address, timeout=30) as ps:
        ps.create(name, value=np.zeros(BIG, np.float32))
        yield name


def version(server: ServerProcess, name: str) -> int:
    with Client(server.address, timeout=30) as ps:
        return ps.info(name).version


def test_a_write_whose_reply_exceeds_the_default_limit_is_refused_unapplied(
    server: ServerProcess, default_channel: grpc.Channel, variable: str
) -> None:
    ones = np.ones(BIG, np.float32)
    for method, flags in (("AssignAdd", {}), ("AssignSub", {}), ("Assign", {"use_locking": False})):
        with pytest.raises(grpc.RpcError) as caught:
            call(default_channel, method, request(variable, ones, **flags))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details() or ""
        assert f"variable '{variable}'" in details and KEY in details and "nothing was applied" in details
    assert version(server, variable) == 1
    # The same writes without a copy in the reply go through: read_value=false, or a locked Assign.
    reply = pb.AssignResponse.FromString(
        call(default_channel, "AssignAdd", request(variable, ones, read_value=False))
    )
    assert reply.info.version == 2 and not reply.HasField("value")
    reply = pb.AssignResponse.FromString(call(default_channel, "Assign", request(variable, ones)))
    assert reply.value_is_request and reply.info.version == 3


def test_a_declared_limit_is_honoured_both_ways(
    server: ServerProcess, large_channel: grpc.Channel, variable: str
) -> None:
    ones = np.ones(BIG, np.float32)
    reply = pb.AssignResponse.FromString(
        call(large_channel, "AssignAdd", request(variable, ones), limit=str(64 * MiB))
    )
    assert reply.info.version == 2
    np.testing.assert_array_equal(codec.tensor_from_parts(reply.value, reply.value.tensor_content), ones)
    with pytest.raises(grpc.RpcError) as caught:
        call(large_channel, "AssignAdd", request(variable, ones), limit=str(MiB))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"the {MiB} bytes the client accepts" in (caught.value.details() or "")
    assert version(server, variable) == 2
    # Read changes nothing: checked only against a declared limit, naming ReadStream.
    read = pb.ReadRequest(name=variable).SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        call(large_channel, "Read", read, limit=str(MiB))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ReadStream" in (caught.value.details() or "")
    assert pb.ReadResponse.FromString(call(large_channel, "Read", read)).info.version == 2


@pytest.mark.parametrize("limit", ["", "-1", "4M", "1" * 20])
def test_a_malformed_limit_is_an_invalid_argument(
    server: ServerProcess, default_channel: grpc.Channel, variable: str, limit: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call(default_channel, "AssignAdd", request(variable, np.ones(BIG, np.float32)), limit=limit)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert KEY in (caught.value.details() or "")
    assert version(server, variable) == 1


def test_the_reference_client_declares_its_limit(server: ServerProcess, name: str) -> None:
    """Its unary writes go up to 4 MiB, whose replies are a little more: declared, they arrive."""
    value = np.ones(MiB, np.float32)  # exactly 4 MiB: the largest unary write
    with Client(server.address, timeout=30) as ps:
        ps.create(name, value=np.zeros(MiB, np.float32))
        np.testing.assert_array_equal(ps.assign_add(name, value), value)
        np.testing.assert_array_equal(ps.assign(name, value * 2, use_locking=False), value * 2)
        assert ps.info(name).version == 3


def test_batch_streams_cut_their_replies_to_the_declared_limit(
    server: ServerProcess, default_channel: grpc.Channel, variable: str
) -> None:
    """A client with gRPC's default limit declares it, and gets a 5 MiB value in messages that fit."""
    ones = np.ones(BIG, np.float32)
    value = pb.TensorProto(dtype=pb.DT_FLOAT)
    codec.shape_to_proto(ones.shape, value.tensor_shape)
    ops = [
        pb.BatchOp(kind=pb.BATCH_OP_ASSIGN_ADD, name=variable, value=value),
        pb.BatchOp(kind=pb.BATCH_OP_READ, name=variable),
    ]
    first = pb.BatchChunk(header=pb.BatchHeader(ops=ops, atomic=True), data=ones.tobytes())
    stream = default_channel.stream_stream(SERVICE + "BatchStream", None, None)
    raw = list(stream(iter([first.SerializeToString()]), timeout=30, metadata=((KEY, str(4 * MiB)),)))
    assert all(len(message) <= 4 * MiB for message in raw)
    replies = [pb.BatchReply.FromString(message) for message in raw]
    assert [result.code for result in replies[0].results] == [0, 0]
    data = b"".join(reply.data for reply in replies)
    assert len(data) == 2 * ones.nbytes
    np.testing.assert_array_equal(np.frombuffer(data, np.float32), np.ones(2 * BIG, np.float32))
    assert version(server, variable) == 2
