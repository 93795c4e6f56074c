"""TensorFlow's TensorProto, both ways, against serialized bytes TensorFlow made.

tests/fixtures/tf_tensor_protos.json (written by scripts/make_tf_fixtures.py with TensorFlow) holds the
output of tf.make_tensor_proto for every dtype x shapes (), (1,), (0,), (3,4), (2,3,4), Python values and
the splat rule, each with the array tf.make_ndarray reads from it. The bytes go to a real server raw (no
re-serialization) in CreateVariable, Assign, AssignAdd, Batch and BatchStream; what the server stores and
what it replies must be that array. Replies always carry tensor_content (the script checked with TensorFlow
that tf.make_ndarray reads such replies); bad combinations of fields are refused, naming the field.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from support import ServerProcess, same_values
from tensorps.client import Client, codec, wire
from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "/tensorps.v1.ParameterServer/"
FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "tf_tensor_protos.json").read_text())
CASES: list[dict[str, Any]] = FIXTURES["cases"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def proto_bytes(case: dict[str, Any]) -> bytes:
    return base64.b64decode(case["proto"])


def expected(case: dict[str, Any]) -> np.ndarray[Any, Any]:
    dtype = codec.dtype_of(case["dtype"])
    return np.frombuffer(base64.b64decode(case["expected"]), dtype.numpy).reshape(case["shape"])


def with_tensor(message: bytes, field: int, tensor: bytes) -> bytes:
    """`message` with the serialized TensorProto `tensor` appended as field `field`, byte for byte."""
    return message + wire.encode_varint(field << 3 | 2) + wire.encode_varint(len(tensor)) + tensor


def unary(channel: grpc.Channel, method: str, payload: bytes) -> bytes:
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    reply: bytes = call(payload, timeout=30)
    return reply


def refused(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        unary(channel, method, payload)
    error: grpc.RpcError = caught.value
    return error


def check_reply_tensor(tensor: pb.TensorProto, want: np.ndarray[Any, Any]) -> None:
    """A reply's tensor: dtype, shape and tensor_content only (TensorFlow reads that for every dtype)."""
    fields = {field.name for field, _ in tensor.ListFields()} - {"tensor_content"}
    assert fields == {"dtype", "tensor_shape"}, fields
    got = codec.tensor_from_parts(tensor, tensor.tensor_content)
    assert same_values(got, want), (got, want)


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, timeout=30) as ps:
        yield ps


def test_the_fixtures_cover_every_dtype_shape_and_encoding() -> None:
    labels = {case["label"] for case in CASES}
    for dtype in codec.DTYPES:
        for shape in ("scalar", "1", "0", "3x4", "2x3x4"):
            assert f"{dtype.name}/{shape}" in labels
        assert f"{dtype.name}/splat 3x4" in labels
    encodings = {field for case in CASES for field in case["fields"]}
    assert encodings >= {
        "tensor_content",
        "half_val",
        "float_val",
        "double_val",
        "int_val",
        "int64_val",
        "bool_val",
        "scomplex_val",
        "dcomplex_val",
        "uint32_val",
        "uint64_val",
    }
    assert any(not case["fields"] and np.prod(case["shape"]) for case in CASES)  # no values: zeros


@pytest.mark.parametrize("case", CASES, ids=[case["label"] for case in CASES])
def test_tensorflow_protos_are_read_as_make_ndarray_reads_them(
    channel: grpc.Channel, client: Client, name: str, case: dict[str, Any]
) -> None:
    tensor, want = proto_bytes(case), expected(case)
    # CreateVariable with the proto as its initial value.
    created = f"{name}/created"
    unary(
        channel,
        "CreateVariable",
        with_tensor(pb.CreateVariableRequest(name=created).SerializeToString(), 4, tensor),
    )
    assert same_values(client.read(created), want)
    # Assign into a variable of unknown shape: a locked Assign answers that the value is the request's.
    assigned = f"{name}/assigned"
    client.create(assigned, dtype=case["dtype"], shape=None)
    locked = pb.AssignRequest(name=assigned).SerializeToString()
    reply = pb.AssignResponse.FromString(unary(channel, "Assign", with_tensor(locked, 8, tensor)))
    assert reply.value_is_request and reply.info.version == 1
    assert same_values(client.read(assigned), want)
    # Unlocked, into the initialized variable: the reply holds the variable's copy.
    flags = pb.AssignRequest(name=assigned, use_locking=False).SerializeToString()
    reply = pb.AssignResponse.FromString(unary(channel, "Assign", with_tensor(flags, 8, tensor)))
    assert reply.info.version == 2 and not reply.value_is_request
    check_reply_tensor(reply.value, want)
    # Read answers with tensor_content.
    read = pb.ReadResponse.FromString(
        unary(channel, "Read", pb.ReadRequest(name=assigned).SerializeToString())
    )
    check_reply_tensor(read.value, want)
    if case["dtype"] != "bool":  # TensorFlow's AssignAdd takes no bool (test_semantics)
        request = pb.AssignRequest(name=assigned).SerializeToString()
        reply = pb.AssignResponse.FromString(unary(channel, "AssignAdd", with_tensor(request, 8, tensor)))
        with np.errstate(all="ignore"):
            check_reply_tensor(reply.value, want + want)


def _batch(ops: list[pb.BatchOp], *, atomic: bool) -> pb.BatchChunk:
    return pb.BatchChunk(header=pb.BatchHeader(ops=ops, atomic=atomic))


def test_batches_take_tensorflow_protos_in_their_header(
    channel: grpc.Channel, client: Client, name: str
) -> None:
    """A batch operation's value may be TensorFlow's proto as it is (it then takes no bytes of the data),
    next to values whose bytes follow in the data."""
    creates = [
        pb.BatchOp(
            kind=pb.BATCH_OP_CREATE, name=f"{name}/{i}", value=pb.TensorProto.FromString(proto_bytes(c))
        )
        for i, c in enumerate(CASES)
    ]
    # A value without tensor_content and typed values is the batch protocol's: its bytes are in the data
    # (for TensorFlow's "no values" zeros, the zeros are sent there).
    chunk = _batch(creates, atomic=True)
    chunk.data = b"".join(expected(c).tobytes() for c in CASES if not c["fields"])
    reply = pb.BatchReply.FromString(unary(channel, "Batch", chunk.SerializeToString()))
    assert [r.code for r in reply.results] == [0] * len(CASES)
    values = client.read_many([f"{name}/{i}" for i in range(len(CASES))])
    for i, case in enumerate(CASES):
        assert same_values(values[f"{name}/{i}"], expected(case)), case["label"]

    # A stream: data-carried values around header-carried ones, and each reply's value as tensor_content.
    floats = [i for i, c in enumerate(CASES) if c["dtype"] == "float32"]
    ops, data = [], b""
    for i in floats:
        head = pb.TensorProto(dtype=pb.DT_FLOAT)
        codec.shape_to_proto(tuple(CASES[i]["shape"]), head.tensor_shape)
        ops.append(pb.BatchOp(kind=pb.BATCH_OP_ASSIGN, name=f"{name}/{i}", value=head, use_locking=False))
        data += expected(CASES[i]).tobytes()
        inline = pb.TensorProto.FromString(proto_bytes(CASES[i]))
        ops.append(pb.BatchOp(kind=pb.BATCH_OP_ASSIGN_SUB, name=f"{name}/{i}", value=inline))
        if not CASES[i]["fields"]:
            data += expected(CASES[i]).tobytes()  # no values: the protocol's bytes-in-the-data
    first = _batch(ops, atomic=True)
    first.data = data
    call = channel.stream_stream(SERVICE + "BatchStream", None, None)
    replies = [pb.BatchReply.FromString(raw) for raw in call(iter([first.SerializeToString()]), timeout=30)]
    results = replies[0].results
    assert [r.code for r in results] == [0] * len(ops)
    received = b"".join(r.data for r in replies)
    offset = 0
    for result, i in zip(results, [i for i in floats for _ in (0, 1)], strict=True):
        if result.op % 2 == 0:  # the Assign of an atomic batch: its value is the request's
            assert result.value_is_request and not result.HasField("value")
            continue
        assert {f.name for f, _ in result.value.ListFields()} <= {"dtype", "tensor_shape"}
        dtype, shape = codec.tensor_header_from_proto(result.value)
        nbytes = codec.nbytes_of(shape, dtype)
        got = codec.array_from_buffer(received[offset : offset + nbytes], dtype, shape)
        offset += nbytes
        want = expected(CASES[i])
        with np.errstate(invalid="ignore"):  # inf - inf
            assert same_values(got, want - want), CASES[i]["label"]
    assert offset == len(received)


def _tensor(dtype: int, dims: list[int], **fields: Any) -> pb.TensorProto:
    proto = pb.TensorProto(dtype=dtype, **fields)  # type: ignore[arg-type]
    codec.shape_to_proto(tuple(dims), proto.tensor_shape)
    return proto


BAD = {
    "content and values": (
        _tensor(pb.DT_FLOAT, [2], tensor_content=bytes(8), float_val=[1.0]),
        "tensor_content",
    ),
    "too many values": (_tensor(pb.DT_FLOAT, [3, 4], float_val=[1.0] * 13), "float_val has 13 values"),
    "values for no elements": (_tensor(pb.DT_INT32, [0], int_val=[1]), "int_val has 1 values"),
    "string_val": (_tensor(pb.DT_FLOAT, [1], string_val=[b"x"]), "string_val"),
    "another dtype's field": (_tensor(pb.DT_FLOAT, [2], int_val=[1, 2]), "not in int_val"),
    "two fields": (_tensor(pb.DT_DOUBLE, [2], double_val=[1.0], float_val=[2.0]), "not in float_val"),
    "half pattern out of range": (_tensor(pb.DT_HALF, [1], half_val=[70000]), "half_val"),
    "negative half pattern": (_tensor(pb.DT_BFLOAT16, [1], half_val=[-1]), "half_val"),
    "int8 out of range": (_tensor(pb.DT_INT8, [2], int_val=[1, 300]), "int_val (int8): value 300"),
    "uint16 negative": (_tensor(pb.DT_UINT16, [1], int_val=[-1]), "int_val (uint16)"),
    "odd complex parts": (_tensor(pb.DT_COMPLEX64, [2], scomplex_val=[1.0, 2.0, 3.0]), "scomplex_val has 3"),
    "resource handle": (_tensor(pb.DT_FLOAT, [1], resource_handle_val=[b"\x0a\x01x"]), "resource_handle_val"),
    "variant": (_tensor(pb.DT_FLOAT, [1], variant_val=[b""]), "variant_val"),
    "float8": (_tensor(pb.DT_FLOAT, [1], float8_val=b"\x01"), "float8_val"),
    "short content": (_tensor(pb.DT_FLOAT, [3], tensor_content=bytes(8)), "tensor content has 8 bytes"),
}


@pytest.fixture
def victim(client: Client, name: str) -> Iterator[str]:
    """A variable every refused request leaves as it was."""
    client.create(name, value=np.arange(3, dtype=np.float32))
    before = client.info(name)
    yield name
    assert client.info(name) == before
    np.testing.assert_array_equal(client.read(name), np.arange(3, dtype=np.float32))


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_combinations_are_refused_naming_the_field(channel: grpc.Channel, victim: str, case: str) -> None:
    tensor, words = BAD[case]
    for method in ("Assign", "AssignAdd"):
        error = refused(channel, method, pb.AssignRequest(name=victim, value=tensor).SerializeToString())
        assert error.code() == INVALID, error.details()
        assert f"variable '{victim}'" in (error.details() or "") and words in (error.details() or "")
    created = f"{victim}-new"
    error = refused(
        channel, "CreateVariable", pb.CreateVariableRequest(name=created, value=tensor).SerializeToString()
    )
    assert error.code() == INVALID and words in (error.details() or ""), error.details()
    op = pb.BatchOp(kind=pb.BATCH_OP_ASSIGN, name=victim, value=tensor)
    error = refused(channel, "Batch", _batch([op], atomic=False).SerializeToString())
    assert error.code() == INVALID, error.details()
    assert f"operation 0 (Assign of '{victim}')" in (error.details() or "") and words in (
        error.details() or ""
    )


def test_a_splat_beyond_the_budget_is_refused_before_anything_is_allocated(
    channel: grpc.Channel, victim: str
) -> None:
    """One float_val for 2**40 elements: a message of a few bytes, a tensor of 4 TiB."""
    huge = _tensor(pb.DT_FLOAT, [2**20, 2**20], float_val=[1.0])
    error = refused(channel, "Assign", pb.AssignRequest(name=victim, value=huge).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    op = pb.BatchOp(kind=pb.BATCH_OP_ASSIGN, name=victim, value=huge)
    error = refused(channel, "Batch", _batch([op], atomic=True).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()


def test_a_splat_beyond_the_staging_budget_is_refused() -> None:
    """A splat is filled in the worker's heap: it counts in --max-staging-bytes like a streamed value."""
    with ServerProcess("--max-staging-bytes", str(1 << 20)) as server, Client(server.address) as ps:
        ps.create("w", dtype="float32", shape=None)
        big = _tensor(pb.DT_FLOAT, [1 << 19], float_val=[2.5])  # 2 MiB once filled
        with grpc.insecure_channel(server.address) as channel:
            error = refused(channel, "Assign", pb.AssignRequest(name="w", value=big).SerializeToString())
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            small = _tensor(pb.DT_FLOAT, [1 << 16], float_val=[2.5])
            unary(channel, "Assign", pb.AssignRequest(name="w", value=small).SerializeToString())
        np.testing.assert_array_equal(ps.read("w"), np.full(1 << 16, 2.5, np.float32))


def test_bulk_batches_take_tensorflow_protos_in_their_header(
    channel: grpc.Channel, client: Client, name: str
) -> None:
    """Over the bulk channel, a header-carried value takes no bytes of the data either."""
    splat = next(case for case in CASES if case["label"] == "python float splat")  # 1.5 into [3, 4]
    inline = pb.TensorProto.FromString(proto_bytes(splat))
    head = pb.TensorProto(dtype=pb.DT_FLOAT)
    codec.shape_to_proto((3, 4), head.tensor_shape)
    ops = [
        pb.BatchOp(kind=pb.BATCH_OP_CREATE, name=f"{name}/a", value=inline),
        pb.BatchOp(kind=pb.BATCH_OP_CREATE, name=f"{name}/b", value=head),
        pb.BatchOp(kind=pb.BATCH_OP_ASSIGN_ADD, name=f"{name}/b", value=inline),
    ]
    data = np.arange(12, dtype=np.float32).tobytes()
    call = channel.stream_stream(SERVICE + "BatchStream", None, None)
    first = pb.BatchChunk(header=pb.BatchHeader(ops=ops, atomic=True, bulk=True)).SerializeToString()
    replies: Any = call(iter([first]), timeout=30)
    offer = pb.BatchReply.FromString(next(replies))
    with socket.create_connection(("127.0.0.1", offer.bulk_port), timeout=10) as conn:
        conn.sendall(offer.bulk_ticket)
        assert conn.recv(1) == b"\x01"
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(1 << 16):
            received += chunk
    results = pb.BatchReply.FromString(next(replies)).results
    assert [r.code for r in results] == [0, 0, 0]
    want = np.arange(12, dtype=np.float32).reshape(3, 4) + 1.5
    assert received == want.tobytes()  # the AssignAdd's value, read back
    values = client.read_many([f"{name}/a", f"{name}/b"])
    np.testing.assert_array_equal(values[f"{name}/a"], np.full((3, 4), 1.5, np.float32))
    np.testing.assert_array_equal(values[f"{name}/b"], want)
