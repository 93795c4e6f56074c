"""Bad input to Batch and BatchStream: mutated and random messages get a clean status and harm nothing.

The batches' semantics are pinned by test_batch.py's differential property (each operation as its single
call); here the messages themselves are broken: bit flips, truncation, splices, random bytes, chunks cut
anywhere. Every answer is OK or a client-error status (never INTERNAL or UNKNOWN), a variable no batch
names stays exactly as it was, and the server keeps serving.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import ServerProcess
from tensorps.client import Client, codec, wire
from tensorps.v1 import tensorps_pb2 as pb

Code = grpc.StatusCode
CLEAN = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.ABORTED,
}
SENTINEL = "fuzz-sentinel"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def target() -> Iterator[ServerProcess]:
    """A server of its own (2 workers, a small budget) with a sentinel variable no batch names."""
    with ServerProcess("--max-total-bytes", "64M", workers=2) as server:
        with Client(server.address, timeout=30) as ps:
            ps.create(SENTINEL, value=np.arange(16, dtype=np.float32))
        yield server


@st.composite
def batches(draw: st.DrawFn) -> tuple[pb.BatchHeader, list[np.ndarray[Any, Any]]]:
    """A well-formed batch over two fresh names: any operations, values, flags."""
    prefix = f"f{next(_prefixes)}"
    header = pb.BatchHeader(atomic=draw(st.booleans()))
    arrays: list[np.ndarray[Any, Any]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(list(range(1, 9))))
        op = header.ops.add(kind=kind, name=f"{prefix}/{draw(st.sampled_from('ab'))}")
        for flag in ("validate_shape", "use_locking", "read_value"):
            if draw(st.booleans()):
                setattr(op, flag, draw(st.booleans()))
        if kind == pb.BATCH_OP_READ_PREFIX:
            op.name = prefix
        if kind in (1, 2, 3, 4) and (kind != 1 or draw(st.booleans())):
            dtype = draw(st.sampled_from(["float32", "int8", "bool", "complex64"]))
            shape = draw(st.sampled_from([(), (3,), (2, 2), (0,)]))
            value = np.zeros(shape, dtype)
            op.value.dtype = codec.dtype_of(dtype).code  # type: ignore[assignment]
            codec.shape_to_proto(shape, op.value.tensor_shape)
            arrays.append(value)
        elif kind == 1:
            op.dtype = pb.DT_FLOAT
    return header, arrays


def _mutate(draw: Any, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice"]))
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 6))]
        else:
            buf += raw[draw(st.integers(0, len(raw))) :]
    return bytes(buf)


def _send(server: ServerProcess, stream: bool, messages: list[bytes]) -> Code:
    with grpc.insecure_channel(server.address) as channel:
        try:
            if stream:
                call = channel.stream_stream("/tensorps.v1.ParameterServer/BatchStream", None, None)
                replies: Any = call(iter(messages), timeout=30)
                for reply in replies:
                    if _bulk_offer(reply):
                        # The mutation asked for the bulk channel (BatchHeader.bulk): a valid request. Never
                        # connecting, the client cancels; the ticket dies with the call, nothing changes.
                        replies.cancel()
                        return Code.OK
            else:
                channel.unary_unary("/tensorps.v1.ParameterServer/Batch", None, None)(messages[0], timeout=30)
        except grpc.RpcError as error:
            code: Code = error.code()
            return code
    return Code.OK


def _bulk_offer(reply: bytes) -> bool:
    try:
        return bool(pb.BatchReply.FromString(reply).bulk_ticket)
    except Exception:
        return False


def _check_intact(server: ServerProcess) -> None:
    with Client(server.address, timeout=30) as ps:
        assert ps.info(SENTINEL).version == 1
        np.testing.assert_array_equal(ps.read(SENTINEL), np.arange(16, dtype=np.float32))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_batches_get_clean_answers(target: ServerProcess, data: st.DataObject) -> None:
    """A valid batch, then broken (bits, cuts, splices), in one message or cut into a stream anywhere."""
    header, arrays = data.draw(batches(), label="batch")
    raw = wire.join_data(pb.BatchChunk(header=header).SerializeToString(), arrays)
    stream = data.draw(st.booleans(), label="stream")
    if data.draw(st.booleans(), label="mutate"):
        raw = _mutate(data.draw, raw)
    messages = [raw]
    if stream:
        body = pb.BatchChunk(header=header).SerializeToString()
        content = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        cut = data.draw(st.integers(0, len(content)), label="cut")
        messages = [body]
        for offset, piece in ((0, content[:cut]), (cut, content[cut:])):
            if piece:
                messages.append(pb.BatchChunk(offset=offset, data=piece).SerializeToString())
        if data.draw(st.booleans(), label="break a chunk"):
            at = data.draw(st.integers(0, len(messages) - 1), label="at")
            messages[at] = _mutate(data.draw, messages[at])
    code = _send(target, stream, messages)
    assert code in CLEAN, code
    _check_intact(target)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=st.booleans(), messages=st.lists(st.binary(max_size=96), min_size=1, max_size=4))
def test_random_bytes_get_clean_answers(target: ServerProcess, stream: bool, messages: list[bytes]) -> None:
    """Random bytes as a Batch or as the messages of a BatchStream."""
    assert _send(target, stream, messages) in CLEAN
    _check_intact(target)
