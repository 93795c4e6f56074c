"""Malformed requests sent as raw bytes (the client would refuse them): a clean status, nothing changed."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client
from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "/tensorps.v1.ParameterServer/"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def victim(ps: Client, name: str) -> Iterator[str]:
    """A variable that every bad request must leave exactly as it was."""
    ps.create(name, value=np.arange(6, dtype=np.float32).reshape(2, 3))
    before = (ps.info(name), ps.read(name).copy())
    yield name
    info, value = ps.info(name), ps.read(name)
    assert info == before[0]
    np.testing.assert_array_equal(value, before[1])


def call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)(
            payload, timeout=10
        )
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def tensor(dtype: int, dims: list[int], content: bytes, *, unknown_rank: bool = False) -> pb.TensorProto:
    shape = pb.TensorShapeProto(
        dim=[pb.TensorShapeProto.Dim(size=d) for d in dims], unknown_rank=unknown_rank
    )
    return pb.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=content)  # type: ignore[arg-type]


def assign(name: str, value: pb.TensorProto | None) -> bytes:
    request = pb.AssignRequest(name=name)
    if value is not None:
        request.value.CopyFrom(value)
    return request.SerializeToString()


BAD_TENSORS = {
    "short content": tensor(pb.DT_FLOAT, [2, 3], b"\0" * 20),
    "long content": tensor(pb.DT_FLOAT, [2, 3], b"\0" * 28),
    "negative dim": tensor(pb.DT_FLOAT, [-2, -3], b"\0" * 24),
    "int64 overflow": tensor(pb.DT_FLOAT, [2**62, 2**62, 16], b"\0" * 24),
    "wraps to zero": tensor(pb.DT_FLOAT, [2**32, 2**32], b""),
    "unknown dtype 7": tensor(7, [2, 3], b"\0" * 24),
    "unknown dtype 99": tensor(99, [2, 3], b"\0" * 24),
    "invalid dtype": tensor(0, [2, 3], b"\0" * 24),
    "rank 33": tensor(pb.DT_FLOAT, [1] * 33, b"\0" * 4),
    "unknown rank": tensor(pb.DT_FLOAT, [], b"\0" * 24, unknown_rank=True),
    "bool byte 2": tensor(pb.DT_BOOL, [2, 3], b"\2" * 6),
}


@pytest.mark.parametrize("bad", BAD_TENSORS.values(), ids=list(BAD_TENSORS))
@pytest.mark.parametrize("method", ["Assign", "AssignAdd", "AssignSub"])
def test_bad_tensors_are_invalid_arguments(
    channel: grpc.Channel, victim: str, bad: pb.TensorProto, method: str
) -> None:
    """Length mismatches, bad dims, unknown dtypes and huge shapes are refused without allocating."""
    assert call(channel, method, assign(victim, bad)) in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.mark.parametrize("bad", BAD_TENSORS.values(), ids=list(BAD_TENSORS))
def test_bad_initial_values_create_nothing(
    channel: grpc.Channel, ps: Client, name: str, bad: pb.TensorProto
) -> None:
    """A create with a malformed initial value is refused and leaves no variable behind."""
    request = pb.CreateVariableRequest(name=name, value=bad).SerializeToString()
    assert call(channel, "CreateVariable", request) in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert name not in {v.name for v in ps.list(prefix=name)}


@pytest.mark.parametrize(
    "bad_name", ["", "x/../y", "x/..", "a\0b", "a" * 300, "/abs", "a//b", "sp ace", "-dash"]
)
@pytest.mark.parametrize("method", ["CreateVariable", "Assign", "Read", "GetVariable", "DeleteVariable"])
def test_bad_names_are_invalid_arguments(channel: grpc.Channel, bad_name: str, method: str) -> None:
    """Empty names, '..' parts, NUL bytes and 300-character names are refused by every call."""
    payloads = {
        "CreateVariable": pb.CreateVariableRequest(name=bad_name, dtype=pb.DT_FLOAT),
        "Assign": pb.AssignRequest(name=bad_name, value=tensor(pb.DT_FLOAT, [1], b"\0" * 4)),
        "Read": pb.ReadRequest(name=bad_name),
        "GetVariable": pb.GetVariableRequest(name=bad_name),
        "DeleteVariable": pb.DeleteVariableRequest(name=bad_name),
    }
    assert call(channel, method, payloads[method].SerializeToString()) == INVALID


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff",  # truncated varint
        b"\x0a\x10abc",  # a field longer than the message
        b"\x0a\x02\xc3\x28",  # name that is not UTF-8
        b"\x07",  # field number 0
        b"\x0b\x0c",  # group wire types
        b"\x42\x05\x22\x80\x80\x80\x80",  # a tensor_content length past the end
    ],
    ids=["varint", "overrun", "utf8", "field0", "group", "content-overrun"],
)
@pytest.mark.parametrize("method", ["Assign", "CreateVariable", "Read"])
def test_garbage_bytes_are_invalid_arguments(
    channel: grpc.Channel, victim: str, payload: bytes, method: str
) -> None:
    """Bytes that are not a protobuf message get INVALID_ARGUMENT, not INTERNAL."""
    assert call(channel, method, payload) == INVALID


def test_missing_fields(channel: grpc.Channel, victim: str, name: str) -> None:
    """An assign without a value, a create without dtype or value, an empty request: INVALID_ARGUMENT."""
    assert call(channel, "Assign", assign(victim, None)) == INVALID
    assert call(channel, "Assign", b"") == INVALID
    assert call(channel, "CreateVariable", pb.CreateVariableRequest(name=name).SerializeToString()) == INVALID
    no_shape = pb.AssignRequest(
        name=victim, value=pb.TensorProto(dtype=pb.DT_FLOAT, tensor_content=b"\0" * 24)
    )
    assert call(channel, "Assign", no_shape.SerializeToString()) == INVALID


# ---- streams -----------------------------------------------------------------------------------


def stream(channel: grpc.Channel, chunks: list[pb.WriteChunk]) -> grpc.StatusCode:
    try:
        for _ in channel.stream_stream(
            SERVICE + "WriteStream", request_serializer=None, response_deserializer=None
        )(iter([c.SerializeToString() for c in chunks]), timeout=10):
            pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def header(
    name: str, dims: list[int], dtype: int = pb.DT_FLOAT, op: int = pb.WRITE_OP_ASSIGN
) -> pb.WriteChunk:
    shape = pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=d) for d in dims])
    return pb.WriteChunk(header=pb.WriteHeader(op=op, name=name, dtype=dtype, shape=shape))  # type: ignore[arg-type]


def test_stream_ending_early(channel: grpc.Channel, victim: str) -> None:
    """A stream that stops before the declared bytes arrive changes nothing."""
    assert stream(channel, [header(victim, [2, 3]), pb.WriteChunk(offset=0, data=b"\0" * 12)]) == INVALID


def test_stream_out_of_order(channel: grpc.Channel, victim: str) -> None:
    """Chunks with a gap or going backwards are refused."""
    chunks = [
        header(victim, [2, 3]),
        pb.WriteChunk(offset=12, data=b"\0" * 12),
        pb.WriteChunk(offset=0, data=b"\0" * 12),
    ]
    assert stream(channel, chunks) == INVALID


def test_stream_overrun(channel: grpc.Channel, victim: str) -> None:
    """More bytes than the shape holds are refused."""
    assert stream(channel, [header(victim, [2, 3]), pb.WriteChunk(offset=0, data=b"\0" * 28)]) == INVALID


def test_stream_without_header(channel: grpc.Channel, victim: str) -> None:
    """A stream whose first message has no header, an empty stream, and a second header are refused."""
    assert stream(channel, [pb.WriteChunk(offset=0, data=b"\0" * 24)]) == INVALID
    assert stream(channel, []) == INVALID
    assert stream(channel, [header(victim, [2, 3]), header(victim, [2, 3])]) == INVALID


def test_stream_huge_shape_allocates_nothing(channel: grpc.Channel, victim: str) -> None:
    """A header announcing exabytes (or an int64-overflowing shape) is refused before any allocation."""
    assert stream(channel, [header(victim, [2**40, 2**20])]) in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert stream(channel, [header(victim, [2**62, 2**62, 16])]) in (
        INVALID,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert stream(channel, [header(victim, [-1, 6])]) == INVALID


def test_stream_bad_op_and_dtype(channel: grpc.Channel, victim: str) -> None:
    """Unknown write ops and dtypes in a stream header are refused."""
    assert stream(channel, [header(victim, [2, 3], op=0)]) == INVALID
    assert stream(channel, [header(victim, [2, 3], op=42)]) == INVALID
    assert stream(channel, [header(victim, [2, 3], dtype=99)]) == INVALID


def test_server_still_serves_after_abuse(server: ServerProcess, ps: Client, name: str) -> None:
    """After all of the above, the server is healthy and works."""
    assert server.healthy()
    ps.create(name, value=np.ones(3, np.float32))
    np.testing.assert_array_equal(ps.read(name), np.ones(3))
