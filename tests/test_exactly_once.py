"""Exactly-once writes: a write retried with its request id answers with its first outcome, never twice."""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from support import ServerProcess, fresh_store_path
from tensorps.client import Client, TensorPSError, codec, wire
from tensorps.client.codec import dtype_of
from tensorps.server import batch
from tensorps.server.ops import NotFound, Ops
from tensorps.server.store import Store
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
            # One worker at a time: the other serves the retries (with both down, a retry meets a closed
            # port until the supervisor restarts one, which a loaded machine may take longer than retries do).
            deadline = time.monotonic() + 30
            while not server.healthy() and time.monotonic() < deadline:
                time.sleep(0.05)
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


# ---- crash windows, at the level of the store (a process killed at a chosen instant) -------------------

CHILD = str(Path(__file__).with_name("ops_child.py"))


@pytest.fixture
def ops() -> Iterator[Ops]:
    store = Store.open(fresh_store_path(), max_total_bytes=1 << 26)
    yield Ops(store)
    store.destroy()


def _die_in(ops: Ops, what: str, name: str, request: bytes) -> None:
    command = [sys.executable, CHILD, ops.store.path, what, name, request.hex()]
    assert subprocess.run(command, check=False, timeout=60).returncode == 9


def test_an_unlocked_update_killed_in_its_copy_is_applied_by_its_retry(ops: Ops) -> None:
    """An unlocked assign_add whose process dies after the lock, before its copy: the retry applies it."""
    ops.create("v", dtype_of("float32"), None, np.zeros(4, np.float32))
    rid = secrets.token_bytes(16)
    _die_in(ops, "add-during-copy", "v", rid)
    info, _value = ops.assign_add("v", np.ones(4, np.float32), request=rid)
    again, _value = ops.assign_add("v", np.ones(4, np.float32), request=rid)
    assert again.version == info.version
    np.testing.assert_array_equal(ops.read("v", lambda _i, view: view.copy()), np.ones(4, np.float32))


def test_a_create_killed_before_its_variable_appears_is_made_by_its_retry(ops: Ops) -> None:
    """A create with a value dies after filling the value, before the variable appears: nothing is left
    half-made, and the retry creates it whole (it is not taken for done)."""
    rid = secrets.token_bytes(16)
    _die_in(ops, "create-before-insert", "c", rid)
    with pytest.raises(NotFound):
        ops.info("c")
    info = ops.create("c", dtype_of("float32"), None, np.full(4, 3.0, np.float32), request=rid)
    assert info.initialized and info.version == 1
    np.testing.assert_array_equal(ops.read("c", lambda _i, view: view.copy()), np.full(4, 3.0))


def test_a_retried_delete_spares_a_variable_created_again_since(ops: Ops) -> None:
    """delete(id), another create of the name, then the retry of delete(id): the new variable stays."""
    ops.create("d", dtype_of("int8"), (2,))
    rid = secrets.token_bytes(16)
    ops.delete("d", request=rid)
    ops.create("d", dtype_of("int8"), (3,))
    ops.delete("d", request=rid)
    assert ops.info("d").shape == (3,)


def test_an_atomic_delete_killed_after_its_commit_point_answers_its_retry(ops: Ops) -> None:
    """An atomic batch [delete x] killed after its commit point: recovery finishes it, and its retry
    answers OK instead of NOT_FOUND."""
    ops.create("x", dtype_of("int8"), (2,))
    rid = secrets.token_bytes(16)
    _die_in(ops, "atomic-delete-after-commit", "x", rid)
    with pytest.raises(NotFound):
        ops.info("x")
    retried = batch.run_batch(
        ops, [batch.BatchOp(batch.DELETE, "x")], atomic=True, consume=lambda i, v: None, request=rid
    )
    assert retried == [batch.Result(0)]


def test_request_ids_must_be_32_hex_digits_not_all_zero(server: ServerProcess, name: str) -> None:
    """An all-zero or malformed request id is INVALID_ARGUMENT (a zero id would match every variable's
    'no request'), and changes nothing."""
    with Client(server.address, timeout=30) as ps:
        ps.create(name, value=np.zeros((), np.int64))
    with grpc.insecure_channel(server.address) as channel:
        for bad in ("0" * 32, "12 34" + "0" * 27, "xyz"):
            with pytest.raises(grpc.RpcError) as caught:
                _call(channel, "AssignAdd", _write(name, np.int64(1), read_value=False), bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with Client(server.address, timeout=30) as ps:
        assert ps.info(name).version == 1


def test_zero_element_variables_created_in_an_atomic_batch_read_as_empty(ops: Ops) -> None:
    """[create z with shape (0,), read z, read_prefix] in an atomic batch, as the single calls do."""
    results = batch.run_batch(
        ops,
        [
            batch.BatchOp(batch.CREATE, "z", dtype=dtype_of("float32"), shape=(0,)),
            batch.BatchOp(batch.READ, "z"),
            batch.BatchOp(batch.READ_PREFIX, "z"),
        ],
        atomic=True,
        consume=lambda info, view: view.copy(),
    )
    assert results[1].value.shape == (0,) and results[2].value.shape == (0,)
