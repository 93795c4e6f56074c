"""Property-based fuzzing of every RPC with random and mutated raw requests, against a live server.

Requests go out as raw bytes (no serializer), so they can be anything: well-formed messages with wild field
values (negative, huge and rank-40 shapes, unknown dtype codes, off-by-one and huge byte-length claims, bad
names), broken write streams (gaps, overlaps, overruns, missing or repeated headers) and bit-flipped,
truncated or spliced serializations of valid requests. The oracle parses each request with plain protobuf
(the reference decoder, not the server's field scanner) and predicts from DESIGN §3, §4 and §7 and the known
state of the store either the set of acceptable error codes (every rule the request breaks names one; a
server may check them in any order) or the exact result. The server must agree: a clean status
(INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED; never INTERNAL or
UNKNOWN) that changed nothing, or OK with the predicted reply and store. Afterwards the server must be
healthy with the same worker processes, a sentinel variable unchanged and its memory bounded.

The suite runs its own server (2 workers, a 64 MiB budget) so that the oracle knows the whole store and the
memory measure sees only this traffic. TENSORPS_FUZZ=long selects a profile with many more examples.
"""

from __future__ import annotations

import itertools
import math
import os
import string
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import ServerProcess, same_values, wait_until
from tensorps.v1 import tensorps_pb2 as pb

LONG = os.environ.get("TENSORPS_FUZZ") == "long"

settings.register_profile(
    "tensorps-fuzz",
    max_examples=500,
    deadline=None,  # loopback round trips vary with the machine's load
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("tensorps-fuzz-long", settings.get_profile("tensorps-fuzz"), max_examples=5000)
FUZZ = settings.get_profile("tensorps-fuzz-long" if LONG else "tensorps-fuzz")

pytestmark = pytest.mark.timeout(7200 if LONG else 300)

SERVICE = "/tensorps.v1.ParameterServer/"
TIMEOUT = 20.0
MiB = 1 << 20
BUDGET = 64 * MiB
RSS_GROWTH_LIMIT = 300 * MiB
MAX_RANK = 32

Code = grpc.StatusCode
INVALID = Code.INVALID_ARGUMENT
NOT_FOUND = Code.NOT_FOUND
EXISTS = Code.ALREADY_EXISTS
PRECONDITION = Code.FAILED_PRECONDITION
EXHAUSTED = Code.RESOURCE_EXHAUSTED
CLEAN = frozenset({INVALID, NOT_FOUND, EXISTS, PRECONDITION, EXHAUSTED})

SMALL_MESSAGE = 64 << 10
# The requests whose tensor bytes the server's scanner cuts out, and the field path to them.
SCANNED = {"CreateVariable": (4, 4), "Assign": (8, 4), "AssignAdd": (8, 4), "AssignSub": (8, 4)}
PAD_FIELD = 1000  # a field number no message has: protobuf keeps it as an unknown field

Array = np.ndarray[Any, Any]
Shape = tuple[int, ...]

# DESIGN §4: TF's DataType numbers and the numpy types tensorps maps them to (reference table, not codec's).
DTYPES: dict[int, Any] = {
    pb.DT_FLOAT: np.float32,
    pb.DT_DOUBLE: np.float64,
    pb.DT_INT32: np.int32,
    pb.DT_UINT8: np.uint8,
    pb.DT_INT16: np.int16,
    pb.DT_INT8: np.int8,
    pb.DT_COMPLEX64: np.complex64,
    pb.DT_INT64: np.int64,
    pb.DT_BOOL: np.bool_,
    pb.DT_BFLOAT16: ml_dtypes.bfloat16,
    pb.DT_UINT16: np.uint16,
    pb.DT_COMPLEX128: np.complex128,
    pb.DT_HALF: np.float16,
    pb.DT_UINT32: np.uint32,
    pb.DT_UINT64: np.uint64,
}
ASSIGN, ASSIGN_ADD, ASSIGN_SUB = pb.WRITE_OP_ASSIGN, pb.WRITE_OP_ASSIGN_ADD, pb.WRITE_OP_ASSIGN_SUB
CREATE = pb.WRITE_OP_CREATE
WRITE_METHODS = {"Assign": ASSIGN, "AssignAdd": ASSIGN_ADD, "AssignSub": ASSIGN_SUB}
UNARY = ["CreateVariable", "DeleteVariable", "ListVariables", "GetVariable", *WRITE_METHODS, "Read"]
ALL_METHODS = [*UNARY, "WriteStream", "ReadStream", "GetServerInfo"]
REQUEST_TYPES: dict[str, type[Message]] = {
    "CreateVariable": pb.CreateVariableRequest,
    "DeleteVariable": pb.DeleteVariableRequest,
    "ListVariables": pb.ListVariablesRequest,
    "GetVariable": pb.GetVariableRequest,
    "Assign": pb.AssignRequest,
    "AssignAdd": pb.AssignRequest,
    "AssignSub": pb.AssignRequest,
    "Read": pb.ReadRequest,
    "ReadStream": pb.ReadRequest,
    "GetServerInfo": pb.GetServerInfoRequest,
    "WriteStream": pb.WriteChunk,
}


def itemsize(dtype: int) -> int:
    return int(np.dtype(DTYPES[dtype]).itemsize)


def valid_name(name: str) -> bool:
    """DESIGN §2's rule, written out independently of the codec."""
    allowed = set(string.ascii_letters + string.digits + "_.-/:")
    return (
        1 <= len(name) <= 255
        and set(name) <= allowed
        and (name[0].isalnum() or name[0] == ".")
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated varint")


def representable(shape: Shape, dtype: int) -> bool:
    """Whether numpy can hold an array of this shape and dtype (not so for a zero dim beside dims too big)."""
    if dtype not in DTYPES or math.prod(shape) != 0:
        return True  # refused anyway, or non-empty and so within the budget
    try:
        np.empty(0, DTYPES[dtype]).reshape(shape)
    except ValueError:
        return False
    return True


def flag(message: Any, name: str, default: bool) -> bool:
    return bool(getattr(message, name)) if message.HasField(name) else default


# ---- the store as the oracle sees it -------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    dtype: int
    shape: Shape | None
    initialized: bool
    version: int
    # The value when initialized and representable (None otherwise).
    value: Array | None = field(default=None, compare=False)


def same_var(a: Var | None, b: Var | None) -> bool:
    if a is None or b is None:
        return a is b
    if a != b:
        return False
    if a.value is None or b.value is None:
        return True
    return same_values(a.value, b.value)


def shape_of(proto: pb.TensorShapeProto) -> Shape | None:
    return None if proto.unknown_rank else tuple(d.size for d in proto.dim)


def info_matches(info: pb.VariableInfo, name: str, var: Var) -> bool:
    return (info.name, info.dtype, shape_of(info.shape), info.initialized, info.version) == (
        name,
        var.dtype,
        var.shape,
        var.initialized,
        var.version,
    )


def array_of(dtype: int, shape: Shape, content: bytes) -> Array | None:
    if not representable(shape, dtype):
        return None
    return np.frombuffer(content, DTYPES[dtype]).reshape(shape).copy()


@dataclass
class Prediction:
    """Either the acceptable error codes (non-empty `errors`) or the result of a successful call."""

    errors: frozenset[grpc.StatusCode] = frozenset()
    # On success: the state of these names afterwards (None: absent).
    after: dict[str, Var | None] = field(default_factory=dict)
    # On success: the variable the reply describes, and whether the reply carries its value.
    reply_name: str = ""
    reply: Var | None = None
    reply_value: bool = False
    # The request involves a zero-element shape numpy cannot represent: INVALID_ARGUMENT is fine too.
    odd: bool = False


def fail(*codes: grpc.StatusCode, odd: bool = False) -> Prediction:
    return Prediction(errors=frozenset(codes), odd=odd)


@dataclass
class World:
    """What the store holds before a call: the sentinel, the example's target and nothing else."""

    state: dict[str, Var | None]

    def lookup(self, name: str) -> Var | None:
        return self.state.get(name)


# ---- the oracle ----------------------------------------------------------------------------------


def header_errors(dtype: int, shape: pb.TensorShapeProto | None) -> tuple[set[grpc.StatusCode], Shape | None]:
    """Errors of a tensor's dtype and shape alone, and its dims when they are well-formed."""
    errors: set[grpc.StatusCode] = set()
    if dtype not in DTYPES:
        errors.add(INVALID)
    if shape is None or shape.unknown_rank:
        return errors | {INVALID}, None
    dims = tuple(d.size for d in shape.dim)
    if len(dims) > MAX_RANK or any(d < 0 for d in dims):
        return errors | {INVALID}, None
    if dtype in DTYPES and math.prod(dims) * itemsize(dtype) > BUDGET:
        errors.add(EXHAUSTED)
        if math.prod(dims) * itemsize(dtype) > 2**63 - 1:
            errors.add(INVALID)  # too large for any array (§7: malformed)
    return errors, dims


# tf.make_ndarray's typed field per dtype (TensorFlow's core/framework/tensor.proto).
TYPED_FIELDS: dict[int, str] = {
    pb.DT_HALF: "half_val",
    pb.DT_BFLOAT16: "half_val",
    pb.DT_FLOAT: "float_val",
    pb.DT_DOUBLE: "double_val",
    pb.DT_INT8: "int_val",
    pb.DT_INT16: "int_val",
    pb.DT_INT32: "int_val",
    pb.DT_UINT8: "int_val",
    pb.DT_UINT16: "int_val",
    pb.DT_INT64: "int64_val",
    pb.DT_UINT32: "uint32_val",
    pb.DT_UINT64: "uint64_val",
    pb.DT_COMPLEX64: "scomplex_val",
    pb.DT_COMPLEX128: "dcomplex_val",
    pb.DT_BOOL: "bool_val",
}


def content_errors(
    dtype: int, dims: Shape, tensor: pb.TensorProto
) -> tuple[set[grpc.StatusCode], Array | None]:
    """tf.make_ndarray's reading of a TensorProto: tensor_content; else the dtype's typed field, the last
    value repeated to fill the shape; no values at all: zeros. Refused: content with values, a field of
    another dtype or none tensorps stores, more values than elements, values outside the dtype."""
    typed = [field.name for field, _ in tensor.ListFields() if field.number > 4]
    content = tensor.tensor_content
    elements = math.prod(dims)
    if not typed:
        if not content:
            fits = elements * itemsize(dtype) <= BUDGET  # beyond: refused by header_errors
            return set(), np.zeros(dims, DTYPES[dtype]) if fits and representable(dims, dtype) else None
        if len(content) != elements * itemsize(dtype):
            return {INVALID}, None
        if dtype == pb.DT_BOOL and any(b > 1 for b in content):
            return {INVALID}, None
        return set(), array_of(dtype, dims, content)
    if content or typed != [TYPED_FIELDS[dtype]]:
        return {INVALID}, None
    values = list(getattr(tensor, typed[0]))
    target = np.dtype(DTYPES[dtype])
    if typed[0] == "half_val":
        if not all(0 <= v <= 0xFFFF for v in values):
            return {INVALID}, None
        flat = np.array(values, np.uint16).view(target)
    elif typed[0] == "int_val":
        info = np.iinfo(target)
        if not all(info.min <= v <= info.max for v in values):
            return {INVALID}, None
        flat = np.array(values, target)
    elif target.kind == "c":
        if len(values) % 2:
            return {INVALID}, None
        flat = np.array(values, np.float32 if target == np.complex64 else np.float64).view(target)
    else:
        flat = np.array(values, target)
    if flat.size > elements:
        return {INVALID}, None
    if elements * itemsize(dtype) > BUDGET:
        return set(), None
    return set(), np.pad(flat, (0, elements - flat.size), "edge").reshape(dims)


def write_errors(op: int, var: Var, dtype: int, dims: Shape, validate_shape: bool) -> set[grpc.StatusCode]:
    """DESIGN §3's refusals of a well-formed write to an existing variable."""
    errors: set[grpc.StatusCode] = set()
    if var.dtype != dtype:
        errors.add(INVALID)
    if op == ASSIGN:
        if validate_shape and var.shape is not None and var.shape != dims:
            errors.add(INVALID)
        return errors
    if dtype == pb.DT_BOOL:
        errors.add(INVALID)
    if not var.initialized:
        errors.add(PRECONDITION)
    if var.shape != dims:
        errors.add(INVALID)
    return errors


def written(op: int, var: Var, dtype: int, dims: Shape, value: Array | None) -> Var:
    if op == ASSIGN or value is None or var.value is None:
        result = value
    else:
        ufunc = np.add if op == ASSIGN_ADD else np.subtract
        with np.errstate(all="ignore"):
            result = ufunc(var.value, value)
    return Var(dtype, dims, True, var.version + 1, result)


def predict_write(
    op: int,
    name: str,
    flags: Any,
    dtype: int,
    shape: pb.TensorShapeProto | None,
    tensor: pb.TensorProto,
    world: World,
    *,
    unary: bool = True,
) -> Prediction:
    """Assign/AssignAdd/AssignSub, unary or streamed, once the tensor's bytes are known (a stream's as
    tensor_content). A unary write whose reply would carry the variable beyond gRPC's default 4 MiB (the
    requests declare no tensorps-max-receive-bytes) is refused before it applies."""
    errors: set[grpc.StatusCode] = set()
    var = None
    if not valid_name(name):
        errors.add(INVALID)
    else:
        var = world.lookup(name)
        if var is None:
            errors.add(NOT_FOUND)
    if op != ASSIGN and dtype == pb.DT_BOOL:
        errors.add(INVALID)
    tensor_errors, dims = header_errors(dtype, shape)
    errors |= tensor_errors
    value = None
    odd = dims is not None and not representable(dims, dtype)
    if dims is not None and dtype in DTYPES:
        bad_content, value = content_errors(dtype, dims, tensor)
        errors |= bad_content
        if var is not None:
            errors |= write_errors(op, var, dtype, dims, flag(flags, "validate_shape", True))
        copy = flag(flags, "read_value", True) and not (op == ASSIGN and flag(flags, "use_locking", True))
        if unary and copy and math.prod(dims) * itemsize(dtype) + 2048 > 4 * MiB:
            errors.add(EXHAUSTED)
    if errors:
        return Prediction(errors=frozenset(errors), odd=odd)
    assert var is not None and dims is not None
    new = written(op, var, dtype, dims, value)
    return Prediction(
        after={name: new}, reply_name=name, reply=new, reply_value=flag(flags, "read_value", True), odd=odd
    )


def predict_create(request: pb.CreateVariableRequest, world: World) -> Prediction:
    errors: set[grpc.StatusCode] = set()
    name = request.name
    if not valid_name(name):
        errors.add(INVALID)
    elif world.lookup(name) is not None:
        errors.add(EXISTS)
    declared: Shape | None = None
    if request.HasField("shape") and not request.shape.unknown_rank:
        dims = tuple(d.size for d in request.shape.dim)
        if len(dims) > MAX_RANK or any(d < 0 for d in dims):
            errors.add(INVALID)
        else:
            declared = dims
    odd = declared is not None and not representable(declared, request.dtype)
    if request.HasField("value"):
        tensor = request.value
        dtype = tensor.dtype
        tensor_errors, shape = header_errors(
            dtype, tensor.tensor_shape if tensor.HasField("tensor_shape") else None
        )
        errors |= tensor_errors
        if request.dtype not in (0, dtype):
            errors.add(INVALID)
        if declared is not None and shape is not None and declared != shape:
            errors.add(INVALID)
        value = None
        if shape is not None and dtype in DTYPES:
            odd = odd or not representable(shape, dtype)
            bad_content, value = content_errors(dtype, shape, tensor)
            errors |= bad_content
        new = Var(dtype, shape, True, 1, value)
    else:
        dtype = request.dtype
        if dtype not in DTYPES:
            errors.add(INVALID)
        elif declared is not None and math.prod(declared) * itemsize(dtype) > BUDGET:
            errors |= {EXHAUSTED, INVALID}  # beyond the budget (§7: a limit) or huge dims (§7: malformed)
        empty = declared is not None and math.prod(declared) == 0
        value = np.zeros(declared, DTYPES[dtype]) if empty and not odd and dtype in DTYPES else None
        new = Var(dtype, declared, empty, 0, value)
    if errors:
        return Prediction(errors=frozenset(errors), odd=odd)
    return Prediction(after={name: new}, reply_name=name, reply=new, odd=odd)


def predict_lookup(method: str, name: str, world: World) -> Prediction:
    """DeleteVariable, GetVariable, Read and ReadStream."""
    if not valid_name(name):
        return fail(INVALID)
    var = world.lookup(name)
    if var is None:
        return fail(NOT_FOUND)
    odd = var.shape is not None and not representable(var.shape, var.dtype)
    if method == "DeleteVariable":
        return Prediction(after={name: None})
    if method == "GetVariable":
        return Prediction(after={name: var}, reply_name=name, reply=var)
    if not var.initialized:
        return fail(PRECONDITION)
    return Prediction(after={name: var}, reply_name=name, reply=var, reply_value=True, odd=odd)


def predict_stream(messages: list[bytes], world: World) -> Prediction:
    """WriteStream: a header first, then every message's data at the offset where the last one ended."""
    errors: set[grpc.StatusCode] = set()
    chunks: list[pb.WriteChunk] = []
    for raw in messages:
        try:
            chunks.append(pb.WriteChunk.FromString(raw))
        except DecodeError:
            errors.add(INVALID)
            break
    if not chunks or not chunks[0].HasField("header"):
        return fail(INVALID)
    header = chunks[0].header
    if any(chunk.HasField("header") for chunk in chunks[1:]):
        errors.add(INVALID)
    if header.op not in (ASSIGN, ASSIGN_ADD, ASSIGN_SUB, CREATE):
        errors.add(INVALID)
    _, dims = header_errors(header.dtype, header.shape if header.HasField("shape") else None)
    nbytes = math.prod(dims) * itemsize(header.dtype) if dims is not None and header.dtype in DTYPES else None
    content = bytearray()
    for chunk in chunks:
        if chunk.offset != len(content) or (nbytes is not None and len(content) + len(chunk.data) > nbytes):
            errors.add(INVALID)
            break
        content += chunk.data
    else:
        if nbytes is not None and len(content) != nbytes:
            errors.add(INVALID)
    shape = header.shape if header.HasField("shape") else None
    if header.op == CREATE:
        # A streamed create is the unary create of the same value.
        value = pb.TensorProto(dtype=header.dtype, tensor_content=bytes(content))
        if shape is not None:
            value.tensor_shape.CopyFrom(shape)
        prediction = predict_create(pb.CreateVariableRequest(name=header.name, value=value), world)
    else:
        op = header.op if header.op in (ASSIGN, ASSIGN_ADD, ASSIGN_SUB) else ASSIGN
        tensor = pb.TensorProto(tensor_content=bytes(content))
        prediction = predict_write(op, header.name, header, header.dtype, shape, tensor, world, unary=False)
    if errors:
        return Prediction(errors=frozenset(errors | prediction.errors), odd=prediction.odd)
    return prediction


def predict(method: str, payload: bytes | list[bytes], world: World) -> Prediction:
    """What a correct server answers to `payload` sent to `method`."""
    if method == "WriteStream":
        assert isinstance(payload, list)
        return predict_stream(payload, world)
    assert isinstance(payload, bytes)
    try:
        request: Any = REQUEST_TYPES[method].FromString(payload)
    except DecodeError:
        return fail(INVALID)
    if method == "CreateVariable":
        return predict_create(request, world)
    if method in WRITE_METHODS:
        if not request.HasField("value"):
            missing = valid_name(request.name) and world.lookup(request.name) is None
            return fail(INVALID, *([NOT_FOUND] if missing else []))
        tensor = request.value
        shape = tensor.tensor_shape if tensor.HasField("tensor_shape") else None
        return predict_write(WRITE_METHODS[method], request.name, request, tensor.dtype, shape, tensor, world)
    if method in ("DeleteVariable", "GetVariable", "Read", "ReadStream"):
        return predict_lookup(method, request.name, world)
    return Prediction()  # ListVariables, GetServerInfo: always answer


# ---- talking to the server -----------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]


def send(channel: grpc.Channel, method: str, payload: bytes | list[bytes]) -> Answer:
    responses: list[bytes] = []
    try:
        if method == "WriteStream":
            assert isinstance(payload, list)
            call = channel.stream_stream(
                SERVICE + method, request_serializer=None, response_deserializer=None
            )
            responses.extend(call(iter(payload), timeout=TIMEOUT))
        elif method == "ReadStream":
            assert isinstance(payload, bytes)
            call_s = channel.unary_stream(
                SERVICE + method, request_serializer=None, response_deserializer=None
            )
            responses.extend(call_s(payload, timeout=TIMEOUT))
        else:
            assert isinstance(payload, bytes)
            call_u = channel.unary_unary(
                SERVICE + method, request_serializer=None, response_deserializer=None
            )
            responses.append(call_u(payload, timeout=TIMEOUT))
    except grpc.RpcError as exc:
        return Answer(exc.code(), exc.details() or "", responses)
    return Answer(Code.OK, "", responses)


def snapshot(channel: grpc.Channel, name: str) -> Var | None:
    """The variable as the server reports it (GetVariable, then Read when initialized)."""
    answer = send(channel, "GetVariable", pb.GetVariableRequest(name=name).SerializeToString())
    if answer.code == NOT_FOUND:
        return None
    assert answer.code == Code.OK, (name, answer)
    info = pb.GetVariableResponse.FromString(answer.responses[0]).info
    shape = shape_of(info.shape)
    var = Var(info.dtype, shape, info.initialized, info.version)
    assert info.dtype in DTYPES, info
    if not info.initialized or shape is None or not representable(shape, info.dtype):
        return var
    answer = send(channel, "Read", pb.ReadRequest(name=name).SerializeToString())
    assert answer.code == Code.OK, (name, answer)
    value = pb.ReadResponse.FromString(answer.responses[0]).value
    assert (value.dtype, shape_of(value.tensor_shape)) == (info.dtype, shape)
    return Var(info.dtype, shape, True, info.version, array_of(info.dtype, shape, value.tensor_content))


def assembled(responses: list[bytes]) -> tuple[pb.VariableInfo, bytes]:
    """A ReadChunk stream: the info of the first message and the data of all, checked to be in order."""
    assert responses, "an OK stream without messages"
    chunks = [pb.ReadChunk.FromString(raw) for raw in responses]
    assert chunks[0].HasField("info")
    data = bytearray()
    for chunk in chunks:
        assert chunk.offset == len(data), "the server's chunks are out of order"
        data += chunk.data
    return chunks[0].info, bytes(data)


def check_value(dtype: int, shape: Shape | None, content: bytes, expected: Var) -> None:
    assert (dtype, shape) == (expected.dtype, expected.shape)
    assert shape is not None
    assert len(content) == math.prod(shape) * itemsize(dtype)
    if expected.value is not None:
        actual = array_of(dtype, shape, content)
        assert actual is not None and same_values(actual, expected.value), (actual, expected.value)


def check_reply(method: str, prediction: Prediction, answer: Answer, fz: Fuzz) -> None:
    """The reply of a call that succeeded, against the prediction."""
    name, var = prediction.reply_name, prediction.reply
    if method in ("WriteStream", "ReadStream"):
        info, data = assembled(answer.responses)
        assert var is not None and info_matches(info, name, var), (info, var)
        if pb.ReadChunk.FromString(answer.responses[0]).value_is_request:
            # A locked Assign's result is the value it sent (the oracle's var holds it): not echoed.
            assert method == "WriteStream" and prediction.reply_value and len(answer.responses) == 1
        elif prediction.reply_value:
            check_value(info.dtype, shape_of(info.shape), data, var)
        else:
            assert len(answer.responses) == 1 and not data
        return
    (raw,) = answer.responses
    if method == "CreateVariable":
        assert var is not None and info_matches(pb.CreateVariableResponse.FromString(raw).info, name, var)
    elif method == "GetVariable":
        assert var is not None and info_matches(pb.GetVariableResponse.FromString(raw).info, name, var)
    elif method == "DeleteVariable":
        pb.DeleteVariableResponse.FromString(raw)
    elif method in ("Read", *WRITE_METHODS):
        reply: Any = (pb.ReadResponse if method == "Read" else pb.AssignResponse).FromString(raw)
        assert var is not None and info_matches(reply.info, name, var), (reply.info, var)
        echoed = method != "Read" and reply.value_is_request
        assert (reply.HasField("value") or echoed) == prediction.reply_value
        if echoed:
            assert method == "Assign" and not reply.HasField("value")  # the value sent: not echoed
        elif prediction.reply_value:
            value = reply.value
            check_value(value.dtype, shape_of(value.tensor_shape), value.tensor_content, var)
    elif method == "GetServerInfo":
        about = pb.ServerInfo.FromString(raw)
        assert about.workers == 2 and about.pid in fz.server.worker_pids()
        assert about.store == fz.server.store and about.max_total_bytes == BUDGET
        assert about.used_bytes <= BUDGET
    elif method == "ListVariables":
        # The example's store is exactly the sentinel and its target: the listing is predictable.
        prefix = pb.ListVariablesRequest.FromString(next(iter(fz.last_payloads))).prefix
        listed = pb.ListVariablesResponse.FromString(raw).variables
        expected = {n: v for n, v in fz.world.state.items() if v is not None and n.startswith(prefix)}
        assert sorted(v.name for v in listed) == sorted(expected), (prefix, listed)
        for info in listed:
            assert info_matches(info, info.name, expected[info.name])


# ---- the suite's server --------------------------------------------------------------------------


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class Fuzz:
    server: ServerProcess
    channel: grpc.Channel
    prefix: str
    sentinel: str
    sentinel_var: Var
    target: str
    workers: list[int]
    baseline_rss: int
    world: World = field(default_factory=lambda: World({}))
    last_payloads: list[bytes] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)

    def __repr__(self) -> str:
        return f"Fuzz({self.server.address}, target={self.target!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis prints fixtures with this

    def pids(self) -> list[int]:
        return [self.server.proc.pid, *self.server.worker_pids()]

    def setup(self, spec: Var | None) -> None:
        """Make the target `spec` (absent, declared, or created with a value) with plain requests."""
        send(self.channel, "DeleteVariable", pb.DeleteVariableRequest(name=self.target).SerializeToString())
        if spec is not None:
            request = pb.CreateVariableRequest(name=self.target)
            if spec.version == 1:
                assert spec.value is not None
                tensor_proto(spec.dtype, spec.value.shape, spec.value.tobytes(), request.value)
            else:
                request.dtype = spec.dtype  # type: ignore[assignment]
                if spec.shape is not None:
                    request.shape.dim.extend(pb.TensorShapeProto.Dim(size=d) for d in spec.shape)
            answer = send(self.channel, "CreateVariable", request.SerializeToString())
            assert answer.code == Code.OK, answer
        self.world = World({self.sentinel: self.sentinel_var, self.target: spec})

    def run(self, method: str, payload: bytes | list[bytes], kind: str) -> None:
        """Send one fuzzed request and hold the answer and the store against the oracle's prediction."""
        prediction = predict(method, payload, self.world)
        self.last_payloads = payload if isinstance(payload, list) else [payload]
        answer = send(self.channel, method, payload)
        self.sent[kind] += 1
        self.sent["total"] += 1
        self.outcomes[f"{kind.partition(':')[0]}:{answer.code.name}"] += 1
        touched = {self.target, *self._names(method, payload)}
        context = f"{method} {kind}: predicted {prediction}, got {answer.code} {answer.details!r}"
        acceptable = prediction.errors | ({INVALID} if prediction.odd else set())
        assert answer.code == Code.OK or answer.code in CLEAN | acceptable, context
        if answer.code != Code.OK:
            assert answer.code in acceptable, context
            for name in touched:
                assert same_var(snapshot(self.channel, name), self.world.lookup(name)), (
                    f"{context}: {name} changed"
                )
            self._cleanup(touched)
            return
        assert not prediction.errors, context
        check_reply(method, prediction, answer, self)
        for name in touched:
            expected = prediction.after.get(name, self.world.lookup(name))
            assert same_var(snapshot(self.channel, name), expected), f"{context}: {name} is not as predicted"
        self._cleanup(touched)

    def _names(self, method: str, payload: bytes | list[bytes]) -> set[str]:
        """Valid variable names the request may touch (so that the check reads them back)."""
        try:
            if method == "WriteStream":
                assert isinstance(payload, list)
                name = pb.WriteChunk.FromString(payload[0]).header.name if payload else ""
            elif method in ("ListVariables", "GetServerInfo"):
                return set()
            else:
                assert isinstance(payload, bytes)
                name = getattr(REQUEST_TYPES[method].FromString(payload), "name", "")
        except DecodeError:
            return set()
        return {name} if valid_name(name) else set()

    def _cleanup(self, touched: set[str]) -> None:
        """Delete what the request may have created besides the target, so the next example starts clean."""
        for name in touched - {self.target, self.sentinel}:
            send(self.channel, "DeleteVariable", pb.DeleteVariableRequest(name=name).SerializeToString())


@pytest.fixture(scope="module")
def fz() -> Iterator[Fuzz]:
    """A server of our own (2 workers, 64 MiB budget) with a sentinel variable no request may change."""
    with ServerProcess("--max-total-bytes", str(BUDGET), workers=2) as server:
        assert wait_until(server.healthy, timeout=10)
        with grpc.insecure_channel(server.address) as channel:
            prefix = f"fz{uuid.uuid4().hex[:8]}/"
            sentinel = f"{prefix}Sentinel_{uuid.uuid4().hex}"
            value = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
            request = pb.CreateVariableRequest(name=sentinel)
            tensor_proto(pb.DT_DOUBLE, value.shape, value.tobytes(), request.value)
            assert send(channel, "CreateVariable", request.SerializeToString()).code == Code.OK
            sentinel_var = snapshot(channel, sentinel)
            assert sentinel_var is not None
            fuzz = Fuzz(server, channel, prefix, sentinel, sentinel_var, f"{prefix}target", [], 0)
            for _ in range(200):  # warm up gRPC's and Python's allocators before the baseline
                fuzz.setup(Var(pb.DT_FLOAT, (4,), True, 1, np.ones(4, np.float32)))
                snapshot(channel, fuzz.target)
            fuzz.workers = server.worker_pids()
            fuzz.baseline_rss = rss_bytes(fuzz.pids())
            yield fuzz


# ---- strategies ----------------------------------------------------------------------------------

SETUP_DTYPES = [
    pb.DT_FLOAT,
    pb.DT_DOUBLE,
    pb.DT_INT32,
    pb.DT_INT8,
    pb.DT_UINT64,
    pb.DT_BOOL,
    pb.DT_COMPLEX64,
    pb.DT_HALF,
    pb.DT_BFLOAT16,
]
BAD_NAMES = [
    "",
    ".",
    "..",
    "/",
    "a/../b",
    "a/..",
    "../etc/passwd",
    "x/./y",
    "/abs",
    "trailing/",
    "a//b",
    "a\0b",
    "\0",
    "a" * 256,
    "a" * 300,
    "é",
    "名前/変数",
    "sp ace",
    "-dash",
    "_under",
    ":colon",
    "new\nline",
]
ODD_VALID_NAMES = [".a", "a:0", "dense/kernel:0", "0", "a" * 255, "x-y.z_w/v:1", "..a/b.."]
WILD_DIMS = [-1, -(2**63), 2**31, 2**32, 2**40, 2**62, 2**63 - 1]

small_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
wild_dims = st.one_of(
    st.integers(0, 5), st.sampled_from(WILD_DIMS), st.integers(-(2**63), 2**63 - 1), st.integers(-5, -1)
)
wild_shapes = st.lists(wild_dims, max_size=40).map(tuple)
# Zero elements beside dims whose product overflows: 0 bytes, yet too big for numpy: INVALID_ARGUMENT.
zero_huge_shapes = st.lists(st.sampled_from([0, 3, 2**40, 2**62]), min_size=2, max_size=4).map(tuple)
dtype_codes = st.one_of(st.sampled_from(sorted(DTYPES)), st.integers(0, 30), st.integers(-(2**31), 2**31 - 1))


def tensor_proto(
    dtype: int,
    dims: Shape | None,
    content: bytes,
    out: pb.TensorProto | None = None,
    *,
    unknown: bool = False,
) -> pb.TensorProto:
    proto = out if out is not None else pb.TensorProto()
    proto.dtype = dtype  # type: ignore[assignment]
    if dims is not None:
        proto.tensor_shape.SetInParent()
        proto.tensor_shape.dim.extend(pb.TensorShapeProto.Dim(size=d) for d in dims)
        proto.tensor_shape.unknown_rank = unknown
    proto.tensor_content = content
    return proto


@st.composite
def setups(draw: st.DrawFn) -> Var | None:
    """The example's target before the request: absent, declared (maybe shapeless) or initialized."""
    kind = draw(st.sampled_from(["absent", "declared", "unknown", "value", "value", "value"]))
    dtype = draw(st.sampled_from(SETUP_DTYPES))
    if kind == "absent":
        return None
    shape = draw(small_shapes)
    if kind == "unknown":
        return Var(dtype, None, False, 0)
    empty = math.prod(shape) == 0
    if kind == "declared":
        return Var(dtype, shape, empty, 0, np.zeros(shape, DTYPES[dtype]) if empty else None)
    return Var(dtype, shape, True, 1, draw(values(dtype, shape)))


@st.composite
def values(draw: st.DrawFn, dtype: int, shape: Shape) -> Array:
    count = math.prod(shape)
    if dtype == pb.DT_BOOL:
        raw = bytes(draw(st.lists(st.integers(0, 1), min_size=count, max_size=count)))
    elif draw(st.booleans()):
        raw = draw(st.binary(min_size=count * itemsize(dtype), max_size=count * itemsize(dtype)))
    else:  # small integers: sums that are neither NaN nor overflowing
        ints = draw(st.lists(st.integers(-3, 3), min_size=count, max_size=count))
        return np.array(ints).astype(DTYPES[dtype]).reshape(shape)
    return np.frombuffer(raw, DTYPES[dtype]).reshape(shape).copy()


@st.composite
def names(draw: st.DrawFn, fz: Fuzz) -> str:
    choice = draw(st.integers(0, 9))
    if choice < 6:
        return fz.target
    if choice == 6:
        return draw(st.sampled_from(BAD_NAMES))
    if choice == 7:
        return fz.prefix + draw(st.sampled_from(ODD_VALID_NAMES))
    if choice == 8:
        return draw(st.text(max_size=300))
    return fz.prefix + draw(st.text(alphabet=string.ascii_letters + string.digits + "_.-/:", max_size=40))


@st.composite
def tensors(draw: st.DrawFn, fz: Fuzz) -> tuple[int, pb.TensorShapeProto | None, bytes]:
    """A tensor's dtype, shape and content: mostly plausible for the target, sometimes anything."""
    var = fz.world.lookup(fz.target)
    pick = draw(st.integers(0, 9))  # 0-5: the target's dtype, 6-7: a common one, 8-9: any code
    if pick <= 5:
        dtype = var.dtype if var is not None else pb.DT_FLOAT
    else:
        dtype = draw(st.sampled_from(SETUP_DTYPES) if pick <= 7 else dtype_codes)
    known = var.shape if var is not None and var.shape is not None else (2,)
    pick = draw(st.integers(0, 9))  # 0-4: the target's shape, 5-7: a small one, 8-9: a wild one
    if pick <= 4:
        dims = known
    else:
        dims = draw(small_shapes if pick <= 7 else st.one_of(wild_shapes, zero_huge_shapes))
    shape: pb.TensorShapeProto | None = pb.TensorShapeProto(
        dim=[pb.TensorShapeProto.Dim(size=d) for d in dims]
    )
    layout = draw(st.integers(0, 19))  # rarely an unknown rank or no shape at all
    if layout == 18:
        assert shape is not None
        shape.unknown_rank = True
    elif layout == 19:
        shape = None
    nbytes = math.prod(dims) * itemsize(dtype) if dtype in DTYPES and min(dims, default=0) >= 0 else -1
    pick = draw(st.integers(0, 9))  # 0-6: the right length, 7: one more, 8: one less, 9: any
    if 0 <= nbytes <= 4096 and pick <= 8:
        length = max(0, nbytes + {7: 1, 8: -1}.get(pick, 0))
    else:
        length = draw(st.one_of(st.just(0), st.integers(0, 64)))
    if length == nbytes and dtype in DTYPES and representable(dims, dtype) and draw(st.integers(0, 4)) > 0:
        content = draw(values(dtype, dims)).tobytes()
    else:
        content = draw(st.binary(min_size=length, max_size=length))
    return dtype, shape, content


_NUMBERS: dict[str, st.SearchStrategy[Any]] = {
    "half_val": st.one_of(st.integers(0, 0xFFFF), st.integers(-(2**31), 2**31 - 1)),
    "int_val": st.one_of(st.integers(-3, 3), st.integers(-(2**31), 2**31 - 1)),
    "int64_val": st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1)),
    "uint32_val": st.integers(0, 2**32 - 1),
    "uint64_val": st.integers(0, 2**64 - 1),
    "float_val": st.floats(width=32),
    "double_val": st.floats(),
    "scomplex_val": st.floats(width=32),
    "dcomplex_val": st.floats(),
    "bool_val": st.booleans(),
    "string_val": st.binary(max_size=4),
    "resource_handle_val": st.just(b""),
    "variant_val": st.just(b""),
}


def typed_values(draw: st.DrawFn, proto: pb.TensorProto) -> None:
    """Sometimes TensorFlow's typed values instead of (rarely beside) the content: mostly the dtype's own
    field, with fewer values than elements (a splat), as many, or one too many; rarely another field."""
    if draw(st.integers(0, 3)) > 0:
        return
    field = TYPED_FIELDS.get(proto.dtype, "float_val")
    if draw(st.integers(0, 5)) == 0:
        field = draw(st.sampled_from([*sorted(_NUMBERS), "float8_val"]))
    if draw(st.integers(0, 5)) > 0:
        proto.tensor_content = b""
    if field == "float8_val":
        proto.float8_val = draw(st.binary(min_size=1, max_size=4))
        return
    dims = [d.size for d in proto.tensor_shape.dim]
    elements = math.prod(dims) if all(d >= 0 for d in dims) else 0
    per_element = 2 if field in ("scomplex_val", "dcomplex_val") else 1
    most = per_element * min(elements, 6) + 1
    getattr(proto, field).extend(draw(st.lists(_NUMBERS[field], max_size=most)))


def optional_flags(draw: st.DrawFn, message: Any, fields: list[str]) -> None:
    for name in fields:
        value = draw(st.sampled_from([None, True, False]))
        if value is not None:
            setattr(message, name, value)


@st.composite
def unary_requests(draw: st.DrawFn, fz: Fuzz) -> tuple[str, bytes]:
    """A well-formed message for a unary RPC (or ReadStream) with wild field values."""
    method = draw(st.sampled_from([*UNARY, "ReadStream", "GetServerInfo"]))
    message: Message
    if method == "CreateVariable":
        create = pb.CreateVariableRequest(name=draw(names(fz)))
        if draw(st.booleans()):
            create.dtype = draw(dtype_codes)  # type: ignore[assignment]
        if draw(st.booleans()):
            dims = draw(st.one_of(small_shapes, wild_shapes))
            create.shape.dim.extend(pb.TensorShapeProto.Dim(size=d) for d in dims)
            create.shape.unknown_rank = draw(st.integers(0, 9)) == 0
        if draw(st.booleans()):
            dtype, shape, content = draw(tensors(fz))
            tensor_proto(dtype, None, content, create.value)
            if shape is not None:
                create.value.tensor_shape.CopyFrom(shape)
            typed_values(draw, create.value)
        message = create
    elif method in WRITE_METHODS:
        assign = pb.AssignRequest(name=draw(names(fz)))
        optional_flags(draw, assign, ["validate_shape", "use_locking", "read_value"])
        if draw(st.integers(0, 19)) > 0:
            dtype, shape, content = draw(tensors(fz))
            tensor_proto(dtype, None, content, assign.value)
            if shape is not None:
                assign.value.tensor_shape.CopyFrom(shape)
            typed_values(draw, assign.value)
        message = assign
    elif method == "ListVariables":
        prefix = draw(st.one_of(st.just(""), st.just(fz.prefix), st.text(max_size=20), names(fz)))
        message = pb.ListVariablesRequest(prefix=prefix)
    elif method == "GetServerInfo":
        message = pb.GetServerInfoRequest()
    else:
        message = REQUEST_TYPES[method](name=draw(names(fz)))
    return method, message.SerializeToString()


@st.composite
def write_streams(draw: st.DrawFn, fz: Fuzz) -> tuple[str, list[bytes]]:
    """A WriteStream: a header and chunks, then perhaps a gap, an overlap, an overrun or a lost header."""
    header = pb.WriteHeader(name=draw(names(fz)))
    header.op = draw(
        st.one_of(st.sampled_from([ASSIGN, ASSIGN_ADD, ASSIGN_SUB, CREATE]), st.integers(0, 2**31 - 1))
    )  # type: ignore[assignment]
    optional_flags(draw, header, ["validate_shape", "use_locking", "read_value"])
    dtype, shape, content = draw(tensors(fz))
    header.dtype = dtype  # type: ignore[assignment]
    if shape is not None:
        header.shape.CopyFrom(shape)
    cuts = sorted(draw(st.lists(st.integers(0, len(content)), max_size=4)))
    bounds = [0, *cuts, len(content)]
    chunks = [pb.WriteChunk(offset=a, data=content[a:b]) for a, b in itertools.pairwise(bounds)]
    first = pb.WriteChunk(header=header)
    carry = draw(st.booleans())
    if chunks and carry:  # the header message carries the first data
        first.data = chunks.pop(0).data
    sequence = [first, *chunks]
    fault = draw(
        st.sampled_from(
            ["none"] * 6
            + ["gap", "overlap", "overrun", "truncate", "no_header", "two_headers", "late_header", "empty"]
            + ["swap", "empty_chunk"]
        )
    )
    data_chunks = [i for i, c in enumerate(sequence) if c.data]
    if fault == "gap" and data_chunks:
        sequence[draw(st.sampled_from(data_chunks))].offset += draw(st.integers(1, 2**64 - 1 - 2**40))
    elif fault == "overlap" and [i for i in data_chunks if sequence[i].offset]:
        i = draw(st.sampled_from([i for i in data_chunks if sequence[i].offset]))
        sequence[i].offset -= draw(st.integers(1, sequence[i].offset))
    elif fault == "overrun":
        sequence.append(pb.WriteChunk(offset=len(content), data=draw(st.binary(min_size=1, max_size=16))))
    elif fault == "truncate" and len(sequence) > 1:
        sequence.pop()
    elif fault == "no_header":
        sequence[0].ClearField("header")
    elif fault == "two_headers":
        sequence.insert(
            draw(st.integers(1, len(sequence))), pb.WriteChunk(header=header, offset=len(content))
        )
    elif fault == "late_header" and len(sequence) > 1:
        sequence[0], sequence[1] = sequence[1], sequence[0]
    elif fault == "empty":
        sequence = []
    elif fault == "swap" and len(sequence) > 2:
        sequence[1], sequence[2] = sequence[2], sequence[1]
    elif fault == "empty_chunk":
        at = draw(st.integers(1, len(sequence)))
        offset = sum(len(c.data) for c in sequence[:at])
        sequence.insert(at, pb.WriteChunk(offset=offset))
    return fault, [c.SerializeToString() for c in sequence]


@st.composite
def padded(draw: st.DrawFn, payload: bytes) -> bytes:
    """Mostly as it is; sometimes past SMALL_MESSAGE by an unknown field before or after the message."""
    where = draw(st.integers(0, 5))  # 0-3: as it is, 4: before, 5: after
    if where <= 3:
        return payload
    size = SMALL_MESSAGE + draw(st.integers(0, 64))
    pad = varint(PAD_FIELD << 3 | 2) + varint(size) + bytes(size)
    return pad + payload if where == 4 else payload + pad


@st.composite
def mutations(draw: st.DrawFn, payload: bytes, other: bytes) -> bytes:
    """Bit flips, byte changes, truncation, insertion, deletion, duplication and splicing of a message."""
    buf = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(["flip", "flip", "set", "truncate", "insert", "delete", "repeat", "splice"])
        )
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[min(at, len(buf) - 1)] = draw(
                st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x42])
            )
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        elif kind == "repeat":
            buf[at:at] = buf[at : at + draw(st.integers(1, 16))]
        elif kind == "splice":  # protobuf merges concatenated messages: a valid request of its own
            buf += other[draw(st.integers(0, len(other))) :] if draw(st.booleans()) else other
    return bytes(buf)


# ---- the properties ------------------------------------------------------------------------------


def finish(fz: Fuzz) -> None:
    """After a test's examples: the sentinel is untouched and no worker process died."""
    assert same_var(snapshot(fz.channel, fz.sentinel), fz.sentinel_var)
    assert fz.server.worker_pids() == fz.workers, "a worker process died and was replaced"


@FUZZ
@given(data=st.data())
def test_wild_field_values(fz: Fuzz, data: st.DataObject) -> None:
    """Well-formed requests with wild shapes, dtypes, lengths and names get the oracle's answer."""
    fz.setup(data.draw(setups(), label="target"))
    method, payload = data.draw(unary_requests(fz), label="request")
    fz.run(method, data.draw(padded(payload), label="padded"), "fields")


@FUZZ
@given(data=st.data())
def test_write_stream_sequences(fz: Fuzz, data: st.DataObject) -> None:
    """Write streams with gaps, overlaps, overruns and missing or repeated headers get the oracle's answer."""
    fz.setup(data.draw(setups(), label="target"))
    fault, messages = data.draw(write_streams(fz), label="stream")
    if messages:
        at = data.draw(st.integers(0, len(messages) - 1), label="at")
        messages[at] = data.draw(padded(messages[at]), label="padded")
    fz.run("WriteStream", messages, f"stream:{fault}")


@FUZZ
@given(data=st.data())
def test_mutated_requests(fz: Fuzz, data: st.DataObject) -> None:
    """Bit-flipped, truncated, spliced and extended valid requests get the oracle's answer."""
    fz.setup(data.draw(setups(), label="target"))
    if data.draw(st.integers(0, 3), label="stream?") == 0:
        _, messages = data.draw(write_streams(fz), label="stream")
        if messages:
            at = data.draw(st.integers(0, len(messages) - 1), label="at")
            mutated = data.draw(mutations(messages[at], messages[-1]), label="mutated")
            messages[at] = data.draw(padded(mutated), label="padded")
        fz.run("WriteStream", messages, "mutated:WriteStream")
        return
    method, payload = data.draw(unary_requests(fz), label="request")
    _, other = data.draw(unary_requests(fz), label="other")
    mutated = data.draw(mutations(payload, other), label="mutated")
    fz.run(method, data.draw(padded(mutated), label="padded"), f"mutated:{method}")


@FUZZ
@given(data=st.data())
def test_random_bytes(fz: Fuzz, data: st.DataObject) -> None:
    """Random bytes sent to every RPC (random messages to WriteStream) get the oracle's answer."""
    fz.setup(None if data.draw(st.booleans()) else Var(pb.DT_INT8, (2,), True, 1, np.array([1, 2], np.int8)))
    method = data.draw(st.sampled_from(ALL_METHODS), label="method")
    payload: bytes | list[bytes]
    if method == "WriteStream":
        payload = data.draw(st.lists(st.binary(max_size=64), max_size=4), label="messages")
    else:
        payload = data.draw(st.binary(max_size=128), label="bytes")
    fz.run(method, payload, f"random:{method}")


def test_fuzz_left_the_server_intact(fz: Fuzz) -> None:
    """After every fuzz test: healthy, same workers, sentinel unchanged, memory grown by < 300 MiB."""
    finish(fz)
    assert fz.server.healthy()
    growth = rss_bytes(fz.pids()) - fz.baseline_rss
    print(f"\nfuzz requests: {dict(sorted(fz.sent.items()))}")
    print(f"answers: {dict(fz.outcomes)}")
    print(f"server RSS growth {growth / MiB:.1f} MiB")
    assert growth < RSS_GROWTH_LIMIT, f"the server's memory grew by {growth / MiB:.0f} MiB"


# ---- bugs the fuzzer found, pinned ------------------------------------------------------------------------


def test_zero_element_shape_beyond_numpy_is_a_clean_answer(fz: Fuzz) -> None:
    """A [0, 2**62] float tensor (0 bytes) is either stored and read back or refused as INVALID_ARGUMENT."""
    name = f"{fz.prefix}zero-huge"
    value = tensor_proto(pb.DT_FLOAT, (0, 2**62), b"")
    create = pb.CreateVariableRequest(name=name, value=value).SerializeToString()
    answer = send(fz.channel, "CreateVariable", create)
    send(fz.channel, "DeleteVariable", pb.DeleteVariableRequest(name=name).SerializeToString())
    assert answer.code in (Code.OK, INVALID), answer
    declared = pb.CreateVariableRequest(name=name, dtype=pb.DT_FLOAT, shape=value.tensor_shape)
    assert send(fz.channel, "CreateVariable", declared.SerializeToString()).code in (Code.OK, INVALID)
    try:
        read = send(fz.channel, "Read", pb.ReadRequest(name=name).SerializeToString())
        assert read.code in (Code.OK, NOT_FOUND), read
    finally:
        send(fz.channel, "DeleteVariable", pb.DeleteVariableRequest(name=name).SerializeToString())


def test_large_message_with_a_group_field_parses_as_protobuf(fz: Fuzz) -> None:
    """An Assign over 64 KiB holding an unknown group-encoded field is as valid as the same one when small."""
    fz.setup(Var(pb.DT_FLOAT, (2,), True, 1, np.zeros(2, np.float32)))
    request = pb.AssignRequest(name=fz.target, value=tensor_proto(pb.DT_FLOAT, (2,), bytes(8)))
    group = varint(20 << 3 | 3) + varint(20 << 3 | 4)  # an empty group, unknown field 20
    pad = varint(PAD_FIELD << 3 | 2) + varint(SMALL_MESSAGE) + bytes(SMALL_MESSAGE)
    small, large = request.SerializeToString() + group, request.SerializeToString() + pad + group
    parsed = pb.AssignRequest.FromString(large)  # protobuf skips both unknown fields
    assert (parsed.name, parsed.value.tensor_content) == (fz.target, bytes(8))
    assert send(fz.channel, "Assign", small).code == Code.OK
    answer = send(fz.channel, "Assign", large)
    assert answer.code == Code.OK, answer


def _channels_to_two_workers(server: ServerProcess) -> list[grpc.Channel]:
    """Two channels whose connections reached different worker processes."""
    by_pid: dict[int, grpc.Channel] = {}
    for index in range(64):
        channel = grpc.insecure_channel(server.address, options=[("tensorps.test_index", index)])
        answer = send(channel, "GetServerInfo", b"")
        pid = pb.ServerInfo.FromString(answer.responses[0]).pid
        if pid in by_pid or len(by_pid) == 2:
            channel.close()
        else:
            by_pid[pid] = channel
    assert len(by_pid) == 2, "every connection reached the same worker"
    return list(by_pid.values())


def rss_shmem(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


def test_deleted_variables_release_their_memory_in_every_worker() -> None:
    """Variables created and deleted through one worker and read through another leave no pages mapped."""
    with ServerProcess(workers=2) as server:
        writer, reader = _channels_to_two_workers(server)
        try:
            value = tensor_proto(pb.DT_FLOAT, (1 << 18,), bytes(1 << 20))  # 1 MiB each
            for i in range(32):
                name = f"released{i}"
                create = pb.CreateVariableRequest(name=name, value=value).SerializeToString()
                assert send(writer, "CreateVariable", create).code == Code.OK
                assert send(reader, "Read", pb.ReadRequest(name=name).SerializeToString()).code == Code.OK
                assert (
                    send(
                        writer, "DeleteVariable", pb.DeleteVariableRequest(name=name).SerializeToString()
                    ).code
                    == Code.OK
                )
            pinned = sum(rss_shmem(pid) for pid in server.worker_pids())
            assert pinned < 8 * MiB, f"{pinned / MiB:.0f} MiB of deleted variables still mapped"
        finally:
            writer.close()
            reader.close()
