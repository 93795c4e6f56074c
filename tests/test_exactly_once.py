"""Exactly-once writes: a write retried with its request id answers with its first outcome, never twice."""

from __future__ import annotations

import os
import random
import secrets
import signal
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, TensorPSError, codec, wire
from tensorps.v1 import tensorps_pb2 as pb

METHOD = "/tensorps.v1.ParameterServer/"


def _call(channel: grpc.Channel, method: str, payload: bytes, request_id: str | None) -> bytes:
    metadata = None if request_id is None else (("tensorps-request-id", request_id),)
    call = channel.unary_unary(METHOD + method, None, None)
    response: bytes = call(payload, timeout=30, metadata=metadata)
    return response


def _write(name: str, value: Any, *, read_value: bool, use_locking: bool = True) -> bytes:
    request = pb.AssignRequest(name=name, read_value=read_value, use_locking=use_locking)
    head = codec.tensor_head(codec.dtype_of(value.dtype), value.shape)
    return wire.frame(request.SerializeToString(), 8, head, 4, value)


def _answer(raw: bytes) -> tuple[int, np.ndarray[Any, Any] | None]:
    response, content = wire.parse(pb.AssignResponse, raw, (2, 4))
    value = codec.tensor_from_parts(response.value, content) if response.HasField("value") else None
    return response.info.version, value


@pytest.mark.parametrize("use_locking", [True, False])
def test_retried_assign_add_applies_once_and_answers_alike(
    server: ServerProcess, name: str, use_locking: bool
) -> None:
    """AssignAdd sent twice with one request id: added once; the retry answers with the first version and
    value, also after other writes replaced the variable (small values are remembered with the id)."""
    with Client(server.address, timeout=30) as ps:
        ps.create(name, value=np.zeros((), np.int64))
    with grpc.insecure_channel(server.address) as channel:
        rid = secrets.token_hex(16)
        payload = _write(name, np.int64(5), read_value=True, use_locking=use_locking)
        first = _answer(_call(channel, "AssignAdd", payload, rid))
        again = _answer(_call(channel, "AssignAdd", payload, rid))
        assert first[0] == again[0] and first[1] is not None and again[1] is not None
        assert np.array_equal(first[1], again[1])
        _call(channel, "AssignAdd", _write(name, np.int64(1), read_value=False), secrets.token_hex(16))
        late = _answer(_call(channel, "AssignAdd", payload, rid))
        assert late[0] == first[0] and late[1] is not None and int(late[1]) == 5
        without_id = _answer(_call(channel, "AssignAdd", payload, None))
        assert without_id[0] == first[0] + 2
    with Client(server.address, timeout=30) as ps:
        assert int(ps.read(name)) == 11
        assert ps.info(name).version == 4


def test_retry_of_a_large_update_whose_result_is_gone_is_aborted(server: ServerProcess, name: str) -> None:
    """A replayed AssignAdd with read_value whose result was replaced and is too large to remember: ABORTED,
    naming the version it made; the variable is not changed again."""
    with Client(server.address, timeout=30) as ps:
        ps.create(name, value=np.zeros(100, np.float32))
    with grpc.insecure_channel(server.address) as channel:
        rid = secrets.token_hex(16)
        payload = _write(name, np.ones(100, np.float32), read_value=True)
        version, _value = _answer(_call(channel, "AssignAdd", payload, rid))
        _call(
            channel,
            "Assign",
            _write(name, np.zeros(100, np.float32), read_value=False),
            secrets.token_hex(16),
        )
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, "AssignAdd", payload, rid)
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert f"version {version}" in (caught.value.details() or "")
        no_value = _write(name, np.ones(100, np.float32), read_value=False)
        assert _answer(_call(channel, "AssignAdd", no_value, rid))[0] == version
    with Client(server.address, timeout=30) as ps:
        np.testing.assert_array_equal(ps.read(name), np.zeros(100, np.float32))


def test_retried_create_and_delete_succeed_once(server: ServerProcess, name: str) -> None:
    """CreateVariable and DeleteVariable retried with their ids: the first outcome, not ALREADY_EXISTS or
    NOT_FOUND."""
    with grpc.insecure_channel(server.address) as channel:
        create = pb.CreateVariableRequest(name=name, dtype=pb.DT_FLOAT).SerializeToString()
        rid = secrets.token_hex(16)
        first = pb.CreateVariableResponse.FromString(_call(channel, "CreateVariable", create, rid))
        again = pb.CreateVariableResponse.FromString(_call(channel, "CreateVariable", create, rid))
        assert first == again
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, "CreateVariable", create, secrets.token_hex(16))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        delete = pb.DeleteVariableRequest(name=name).SerializeToString()
        rid = secrets.token_hex(16)
        _call(channel, "DeleteVariable", delete, rid)
        _call(channel, "DeleteVariable", delete, rid)
        with pytest.raises(grpc.RpcError) as caught:
            _call(channel, "DeleteVariable", delete, secrets.token_hex(16))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("atomic", [False, True])
def test_retried_batch_applies_each_operation_once(server: ServerProcess, name: str, atomic: bool) -> None:
    """A Batch sent twice with one request id: every write applied once, the retry answers like the first."""
    counter, other = f"{name}/counter", f"{name}/other"
    with Client(server.address, timeout=30) as ps:
        ps.create_many(
            {counter: {"value": np.zeros((), np.int64)}, other: {"value": np.zeros(3, np.float32)}}
        )
    header = pb.BatchHeader(atomic=atomic)
    for op_name, value in ((counter, np.int64(1)), (other, np.ones(3, np.float32)), (counter, np.int64(2))):
        op = header.ops.add(kind=pb.BATCH_OP_ASSIGN_ADD, name=op_name, read_value=True)
        op.value.dtype = codec.dtype_of(value.dtype).code  # type: ignore[assignment]
        codec.shape_to_proto(np.shape(value), op.value.tensor_shape)
    data = [np.int64(1), np.ones(3, np.float32), np.int64(2)]
    payload = wire.join_data(pb.BatchChunk(header=header).SerializeToString(), [np.asarray(d) for d in data])
    rid = secrets.token_hex(16)
    with grpc.insecure_channel(server.address) as channel:
        first = pb.BatchReply.FromString(_call(channel, "Batch", payload, rid))
        again = pb.BatchReply.FromString(_call(channel, "Batch", payload, rid))
    assert [r.info.version for r in first.results] == [r.info.version for r in again.results] == [2, 2, 3]
    with Client(server.address, timeout=30) as ps:
        assert int(ps.read(counter)) == 3
        np.testing.assert_array_equal(ps.read(other), np.ones(3, np.float32))


def test_sigkilled_workers_under_eight_retrying_clients_lose_and_double_nothing() -> None:
    """8 threads of locked assign_add(+1) on one counter while workers are SIGKILLed: every call is answered
    (retried with its request id) and the counter equals the number of calls exactly."""
    with ServerProcess(workers=2) as server:
        with Client(server.address, timeout=60) as ps:
            ps.create("counter", value=np.zeros((), np.int64))
        stop = threading.Event()
        done: list[int] = []
        failures: list[str] = []

        def add() -> None:
            count = 0
            with Client(server.address, timeout=60) as ps:
                while not stop.is_set():
                    try:
                        ps.assign_add("counter", np.int64(1), use_locking=True, read_value=False)
                        count += 1
                    except TensorPSError as error:
                        failures.append(repr(error))
                        return
            done.append(count)

        threads = [threading.Thread(target=add) for _ in range(8)]
        for thread in threads:
            thread.start()
        rng = random.Random(5)
        for _ in range(6):
            time.sleep(rng.uniform(0.3, 0.8))
            with Client(server.address, timeout=60) as ps:
                pid = ps.server_info().pid
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(120)
        assert not failures, failures[:3]
        with Client(server.address, timeout=60) as ps:
            assert int(ps.read("counter")) == sum(done)
        assert sum(done) > 0
