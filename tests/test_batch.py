"""Batches (pipeline, *_many, futures): each operation as its single call, atomic batches all or nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import ServerProcess, same_values
from tensorps.client import (
    BatchError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TensorPSError,
    VariableInfo,
)
from tensorps.v1 import tensorps_pb2 as pb


def test_model_step_round_trip(ps: Client, name: str) -> None:
    """create_many, assign_many, read_many and assign_add_many move a whole model in one call each."""
    shapes = {f"{name}/layer{i}/kernel": (3, i + 1) for i in range(5)} | {f"{name}/bias": (7,)}
    infos = ps.create_many({n: {"dtype": "float32", "shape": s} for n, s in shapes.items()})
    assert {n: (i.shape, i.initialized) for n, i in infos.items()} == {
        n: (s, False) for n, s in shapes.items()
    }
    values = {n: np.random.default_rng(1).standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    written = ps.assign_many(values)
    assert all(isinstance(i, VariableInfo) and i.version == 1 for i in written.values())
    pulled = ps.read_many(list(shapes))
    assert list(pulled) == list(shapes)
    for n in shapes:
        np.testing.assert_array_equal(pulled[n], values[n])
        assert not pulled[n].flags.writeable
    added = ps.assign_add_many({n: np.ones(s, np.float32) for n, s in shapes.items()}, read_value=True)
    for n in shapes:
        np.testing.assert_array_equal(added[n], values[n] + 1)
    subtracted = ps.assign_sub_many({n: np.ones(s, np.float32) for n, s in shapes.items()})
    assert all(i.version == 3 for i in subtracted.values())
    under = ps.read_many(prefix=f"{name}/layer")
    assert sorted(under) == sorted(n for n in shapes if "/layer" in n)
    for n, value in under.items():
        np.testing.assert_array_equal(value, (values[n] + 1) - np.float32(1))


def test_pipeline_results_match_single_calls(ps: Client, name: str) -> None:
    """Every kind of operation in a pipeline returns what its single call returns, in order."""
    a, b = f"{name}/a", f"{name}/b"
    with ps.pipeline() as pipe:
        pipe.create(a, dtype="int32", shape=(2,)).create(b, value=np.zeros(3, np.float64))
        pipe.assign(a, [1, 2]).assign(a, [3, 4], read_value=False).assign_add(b, [1.0, 2.0, 3.0])
        pipe.assign_sub(b, [0.5, 0.5, 0.5], read_value=False).read(a).info(b).delete(a)
    results = pipe.results
    assert results is not None
    assert results[0] == VariableInfo(a, np.dtype("int32"), (2,), False, 0)
    assert results[1] == VariableInfo(b, np.dtype("float64"), (3,), True, 1)
    np.testing.assert_array_equal(results[2], [1, 2])
    assert results[3] == VariableInfo(a, np.dtype("int32"), (2,), True, 2)
    np.testing.assert_array_equal(results[4], [1.0, 2.0, 3.0])
    assert results[5].version == 3
    np.testing.assert_array_equal(results[6], [3, 4])
    assert results[7] == ps.info(b)
    assert results[8] is None
    with pytest.raises(NotFoundError):
        ps.info(a)


def test_non_atomic_batch_reports_each_error_and_applies_the_rest(ps: Client, name: str) -> None:
    """A failing operation of a plain batch fails alone; BatchError carries every result in order."""
    w, missing = f"{name}/w", f"{name}/missing"
    ps.create(w, value=np.zeros((2, 2), np.float32))
    pipe = ps.pipeline()
    pipe.assign(w, np.ones(4, np.float32)).assign(w, np.ones((2, 2), np.float32), read_value=False)
    pipe.read(missing).assign_add(w, np.ones((2, 2), np.float32), read_value=False)
    with pytest.raises(BatchError) as caught:
        pipe.execute()
    error = caught.value
    assert isinstance(error, TensorPSError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(error.errors) == [0, 2]
    assert isinstance(error.results[0], InvalidArgumentError)
    assert "lhs shape= [2,2] rhs shape= [4]" in error.results[0].message
    assert isinstance(error.results[2], NotFoundError)
    assert error.results[3].version == 3
    np.testing.assert_array_equal(ps.read(w), np.full((2, 2), 2, np.float32))
    quiet = ps.pipeline(raise_on_error=False).read(missing).read(w)
    results = quiet.execute()
    assert isinstance(results[0], NotFoundError)
    np.testing.assert_array_equal(results[1], np.full((2, 2), 2, np.float32))


def test_atomic_batch_failure_changes_nothing(ps: Client, name: str) -> None:
    """An atomic batch with one bad operation raises its error, names it, and changes nothing at all."""
    w, b, fresh = f"{name}/w", f"{name}/b", f"{name}/fresh"
    ps.create(w, value=np.zeros(3, np.float32))
    ps.create(b, dtype="float32", shape=(2,))
    before = ps.info(w)
    pipe = ps.pipeline(atomic=True)
    pipe.assign(w, np.ones(3, np.float32)).create(fresh, value=np.ones(2, np.int8)).delete(w)
    pipe.assign_add(b, np.ones(2, np.float32))
    with pytest.raises(FailedPreconditionError) as caught:
        pipe.execute()
    assert caught.value.message.startswith(
        f"operation 3 (AssignAdd of '{b}'): Attempting to use uninitialized"
    )
    assert "nothing was applied" in caught.value.message
    assert ps.info(w) == before
    np.testing.assert_array_equal(ps.read(w), np.zeros(3, np.float32))
    with pytest.raises(NotFoundError):
        ps.info(fresh)
    assert not ps.info(b).initialized


def test_atomic_batch_sees_its_own_writes_in_order(ps: Client, name: str) -> None:
    """Within an atomic batch, the same variable may appear several times and each op sees the last."""
    v = f"{name}/v"
    pipe = ps.pipeline(atomic=True)
    pipe.create(v, dtype="int64").assign(v, [1, 2, 3]).assign_add(v, [10, 10, 10]).read(v)
    pipe.assign(v, [7], validate_shape=False).assign_sub(v, [2]).read(v).info(v)
    results = pipe.execute()
    np.testing.assert_array_equal(results[3], [11, 12, 13])
    np.testing.assert_array_equal(results[6], [5])
    assert results[7] == VariableInfo(v, np.dtype("int64"), (1,), True, 4)
    assert ps.info(v) == results[7]
    recreate = ps.pipeline(atomic=True).delete(v).create(v, value=np.ones(2, np.float16)).read(v)
    results = recreate.execute()
    assert ps.info(v) == VariableInfo(v, np.dtype("float16"), (2,), True, 1)
    np.testing.assert_array_equal(results[2], np.ones(2, np.float16))


def test_streamed_batches_beyond_one_message(ps: Client, name: str) -> None:
    """A batch of many megabytes in both directions travels as a stream, bytes intact."""
    rng = np.random.default_rng(7)
    values = {
        f"{name}/{i}": rng.standard_normal(n).astype(np.float32)
        for i, n in enumerate((3_000_000, 5, 1 << 20))
    }
    ps.create_many({n: {"value": v} for n, v in values.items()})
    doubled = {n: v * 2 for n, v in values.items()}
    echoed = ps.assign_many(doubled, read_value=True, atomic=True)
    pulled = ps.read_many(list(values))
    for n in values:
        np.testing.assert_array_equal(echoed[n], doubled[n])
        np.testing.assert_array_equal(pulled[n], doubled[n])


def test_futures_overlap_with_other_work(ps: Client, name: str) -> None:
    """read_many/assign_many with wait=False and pipeline().submit() return futures of the results."""
    v = f"{name}/v"
    ps.create(v, value=np.zeros(4, np.int32))
    pushed = ps.assign_add_many({v: np.ones(4, np.int32)}, wait=False)
    assert pushed.result(30)[v].version == 2
    pulled = ps.read_many([v], wait=False)
    np.testing.assert_array_equal(pulled.result(30)[v], np.ones(4, np.int32))
    submitted = ps.pipeline().read(v).assign(v, [5, 5, 5, 5], read_value=False).submit()
    results = submitted.result(30)
    np.testing.assert_array_equal(results[0], np.ones(4))
    assert results[1].version == 3
    failing = ps.read_many([f"{name}/missing"], wait=False)
    with pytest.raises(BatchError):
        failing.result(30)


def test_python_values_take_the_dtype_a_pipeline_creates(ps: Client, name: str) -> None:
    """A Python list assigned after a create in the same pipeline converts to the created dtype."""
    v = f"{name}/v"
    results = ps.pipeline().create(v, dtype="uint8", shape=(2,)).assign(v, [200, 3]).execute()
    assert results[1].dtype == np.dtype("uint8")
    with pytest.raises(InvalidArgumentError):
        ps.pipeline().assign(v, [300, 1])


def test_read_many_of_nothing_and_of_an_unknown_prefix(ps: Client, name: str) -> None:
    """Empty batches and prefixes that match nothing give empty results, not errors."""
    assert ps.read_many([]) == {}
    assert ps.read_many(prefix=f"{name}/nothing/") == {}
    assert ps.pipeline().execute() == []


def test_concurrent_atomic_batches_never_deadlock_nor_show_halves(server: ServerProcess, name: str) -> None:
    """Atomic batches over overlapping variables, from threads of both transports, in random orders:
    they finish, and a reader's atomic read of all of them always sees one batch's values everywhere."""
    names = [f"{name}/{i}" for i in range(12)]
    with Client(server.address, timeout=60) as ps:
        ps.create_many({n: {"value": np.zeros(64, np.int64)} for n in names})
    stop = threading.Event()
    failures: list[str] = []

    def writer(target: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(target, timeout=60) as ps:
            for step in range(40):
                chosen = [names[i] for i in rng.permutation(len(names))[: rng.integers(2, len(names))]]
                stamp = seed * 1000 + step
                ps.assign_many({n: np.full(64, stamp, np.int64) for n in chosen}, atomic=True)
                ps.assign_add_many({n: np.zeros(64, np.int64) for n in reversed(chosen)}, atomic=True)

    def reader(target: str) -> None:
        with Client(target, timeout=60) as ps:
            while not stop.is_set():
                pipe = ps.pipeline(atomic=True)
                for n in names:
                    pipe.read(n)
                for value in pipe.execute():
                    if len(set(value.tolist())) != 1:
                        failures.append(f"a torn value: {value}")

    targets = [server.address, f"shm://{server.store}"]
    writers = [threading.Thread(target=writer, args=(targets[i % 2], i + 1)) for i in range(4)]
    readers = [threading.Thread(target=reader, args=(t,)) for t in targets]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join(120)
        assert not thread.is_alive(), "an atomic batch deadlocked"
    stop.set()
    for thread in readers:
        thread.join(60)
    assert not failures, failures[:3]


def test_atomic_reads_never_see_part_of_an_atomic_write(server: ServerProcess, name: str) -> None:
    """Every atomic write sets all variables to one stamp; atomic reads always find one stamp in all."""
    names = [f"{name}/{i}" for i in range(6)]
    with Client(server.address, timeout=60) as ps:
        ps.create_many({n: {"value": np.zeros(1000, np.float64)} for n in names})
        done = threading.Event()
        seen: set[float] = set()

        def write() -> None:
            with Client(f"shm://{server.store}") as local:
                for stamp in range(1, 150):
                    local.assign_many({n: np.full(1000, float(stamp)) for n in names}, atomic=True)
            done.set()

        thread = threading.Thread(target=write)
        thread.start()
        while not done.is_set():
            pipe = ps.pipeline(atomic=True)
            for n in names:
                pipe.read(n)
            stamps = {float(v[0]) for v in pipe.execute()} | {float(v[-1]) for v in pipe.results or []}
            assert len(stamps) == 1, f"a partial batch: {stamps}"
            seen |= stamps
        thread.join()
    assert len(seen) > 1, "the reader never overlapped a write"


def test_read_only_token_may_batch_reads_only(tmp_path: Any) -> None:
    """A read-only token's batch of reads runs; one with any write is PERMISSION_DENIED, changing nothing."""
    tokens = tmp_path / "tokens"
    tokens.write_text("writer\nviewer read-only\n")
    with ServerProcess("--token-file", str(tokens)) as server:
        with Client(server.address, token="writer", timeout=30) as ps:
            ps.create("v", value=np.zeros(2, np.float32))
        with Client(server.address, token="viewer", timeout=30) as viewer:
            np.testing.assert_array_equal(viewer.read_many(["v"])["v"], np.zeros(2))
            assert viewer.pipeline().info("v").execute()[0].version == 1
            with pytest.raises(PermissionDeniedError, match="operation 1 \\(Assign of 'v'\\)"):
                viewer.pipeline().read("v").assign("v", np.ones(2, np.float32)).execute()
            with pytest.raises(PermissionDeniedError):
                viewer.create_many({"x": {"dtype": "int8"}})
            assert viewer.info("v").version == 1
            assert [i.name for i in viewer.list()] == ["v"]


def test_batch_limits_apply_per_operation_and_as_a_whole() -> None:
    """A value beyond the variable limit fails its operation alone in order (as its single call) and the
    whole batch when atomic; a batch beyond the byte budget is refused before its bytes; nothing changes."""
    limits = ("--max-variable-bytes", "1M", "--max-total-bytes", "8M")
    with ServerProcess(*limits) as server, Client(server.address, timeout=30) as ps:
        ps.create("small", value=np.zeros(4, np.float32))
        atomic = ps.pipeline(atomic=True).assign("small", np.ones(4, np.float32))
        atomic.create("big", value=np.zeros(1 << 19))
        with pytest.raises(ResourceExhaustedError, match="operation 1 \\(CreateVariable of 'big'\\)"):
            atomic.execute()
        assert ps.info("small").version == 1
        in_order = (
            ps.pipeline().assign("small", np.ones(4, np.float32)).create("big", value=np.zeros(1 << 19))
        )
        with pytest.raises(BatchError) as caught:
            in_order.execute()
        assert list(caught.value.errors) == [1]
        assert isinstance(caught.value.errors[1], ResourceExhaustedError)
        assert ps.info("small").version == 2
        many = {f"v{i}": {"value": np.zeros(1 << 17, np.float32)} for i in range(20)}
        with pytest.raises(ResourceExhaustedError):
            ps.create_many(many)
        assert [i.name for i in ps.list()] == ["small"]


def _raw_batch(address: str, messages: list[bytes]) -> grpc.RpcError | list[bytes]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream("/tensorps.v1.ParameterServer/BatchStream", None, None)
        try:
            return list(call(iter(messages), timeout=30))
        except grpc.RpcError as error:
            return error


def _assign_header(name: str, count: int) -> pb.BatchChunk:
    op = pb.BatchOp(kind=pb.BATCH_OP_ASSIGN, name=name)
    op.value.dtype = pb.DT_FLOAT
    op.value.tensor_shape.dim.add(size=count)
    return pb.BatchChunk(header=pb.BatchHeader(ops=[op]))


@pytest.mark.parametrize(
    "case",
    [
        "out_of_order",
        "truncated",
        "too_long",
        "second_header",
        "no_header",
        "empty",
        "bad_kind",
    ],
)
def test_malformed_batch_streams_are_refused_and_change_nothing(
    server: ServerProcess, name: str, case: str
) -> None:
    """Out-of-order, truncated, overlong and otherwise malformed Batch streams get INVALID_ARGUMENT."""
    v = f"{name}/v"
    with Client(server.address, timeout=30) as ps:
        ps.create(v, value=np.zeros(1000, np.float32))
    data = np.ones(1000, np.float32).tobytes()
    unknown = pb.BatchOp(name=v)
    unknown.kind = 99  # type: ignore[assignment]
    header = _assign_header(v, 1000)
    first = header.SerializeToString()
    messages = {
        "out_of_order": [first, pb.BatchChunk(offset=2000, data=data[2000:]).SerializeToString()],
        "truncated": [first, pb.BatchChunk(offset=0, data=data[:3000]).SerializeToString()],
        "too_long": [first, pb.BatchChunk(offset=0, data=data + b"xxxx").SerializeToString()],
        "second_header": [first, first],
        "no_header": [pb.BatchChunk(offset=0, data=data).SerializeToString()],
        "empty": [],
        "bad_kind": [pb.BatchChunk(header=pb.BatchHeader(ops=[unknown])).SerializeToString()],
    }[case]
    answer = _raw_batch(server.address, messages)
    assert isinstance(answer, grpc.RpcError)
    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT, answer.details()
    with Client(server.address, timeout=30) as ps:
        assert ps.info(v).version == 1
        np.testing.assert_array_equal(ps.read(v), np.zeros(1000, np.float32))


@pytest.mark.parametrize("case", ["short", "long", "offset", "no_header", "garbage"])
def test_malformed_unary_batches_are_refused_and_change_nothing(
    server: ServerProcess, name: str, case: str
) -> None:
    """A one-message Batch whose data does not match its header, or is no batch at all, changes nothing."""
    v = f"{name}/v"
    with Client(server.address, timeout=30) as ps:
        ps.create(v, value=np.zeros(10, np.float32))
    header = _assign_header(v, 10)
    data = np.ones(10, np.float32).tobytes()
    chunk = {
        "short": pb.BatchChunk(header=header.header, data=data[:-4]),
        "long": pb.BatchChunk(header=header.header, data=data + data),
        "offset": pb.BatchChunk(header=header.header, offset=4, data=data),
        "no_header": pb.BatchChunk(data=data),
        "garbage": None,
    }[case]
    raw = b"\xff\xff\xff" if chunk is None else chunk.SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/tensorps.v1.ParameterServer/Batch", None, None)
        with pytest.raises(grpc.RpcError) as caught:
            call(raw, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with Client(server.address, timeout=30) as ps:
        assert ps.info(v).version == 1


# ---- differential: a batch against the same operations as single calls ------------------------------

_DTYPES = ["float32", "int32", "bool"]
_KINDS = ["create", "assign", "assign_add", "assign_sub", "read", "info", "delete"]


@st.composite
def _operations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    ops = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(
            st.sampled_from(["create", "assign", "assign_add", "assign_sub", "read", "info", "delete"])
        )
        var = draw(st.sampled_from("abc"))
        dtype = draw(st.sampled_from(_DTYPES))
        shape = draw(st.sampled_from([(2,), (3,), (1, 2), ()]))
        value = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
        flags = {
            "create": {},
            "assign": {"validate_shape": draw(st.booleans()), "use_locking": draw(st.booleans())},
            "assign_add": {"use_locking": draw(st.booleans())},
            "assign_sub": {"use_locking": draw(st.booleans())},
        }.get(kind, {})
        with_value = draw(st.booleans())
        ops.append((kind, var, dtype, shape, value, flags, with_value))
    return ops


def _apply_single(ps: Client, prefix: str, op: tuple[Any, ...]) -> Any:
    kind, var, dtype, shape, value, flags, with_value = op
    name = f"{prefix}/{var}"
    try:
        if kind == "create":
            return ps.create(name, value=value) if with_value else ps.create(name, dtype=dtype, shape=shape)
        if kind in ("assign", "assign_add", "assign_sub"):
            return getattr(ps, kind)(name, value, read_value=True, **flags)
        return getattr(ps, kind)(name)
    except TensorPSError as error:
        return error


def _queue(pipe: Any, prefix: str, op: tuple[Any, ...]) -> None:
    kind, var, dtype, shape, value, flags, with_value = op
    name = f"{prefix}/{var}"
    if kind == "create":
        pipe.create(name, value=value) if with_value else pipe.create(name, dtype=dtype, shape=shape)
    elif kind in ("assign", "assign_add", "assign_sub"):
        getattr(pipe, kind)(name, value, read_value=True, **flags)
    else:
        getattr(pipe, kind)(name)


def _comparable(result: Any, prefix: str) -> Any:
    if isinstance(result, TensorPSError):
        return (type(result).__name__, result.message.replace(prefix, "P"))
    if isinstance(result, VariableInfo):
        return dataclasses.replace(result, name=result.name.replace(prefix, "P"))
    if isinstance(result, np.ndarray):
        return ("array", result.dtype.str, result.shape, result.tobytes())
    return result


def _state(ps: Client, prefix: str) -> list[Any]:
    found: list[Any] = []
    for var in "abc":
        try:
            info = ps.info(f"{prefix}/{var}")
        except NotFoundError:
            found.append(None)
            continue
        value = ps.read(f"{prefix}/{var}") if info.initialized else None
        found.append((_comparable(info, prefix), None if value is None else _comparable(value, prefix)))
    return found


_counter = iter(range(1 << 30))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=_operations(), atomic=st.booleans())
def test_batches_behave_as_their_single_calls(ps: Client, ops: list[tuple[Any, ...]], atomic: bool) -> None:
    """Random operation sequences: a plain batch gives exactly the single calls' results and final state;
    an atomic one gives the same when every call succeeds, and otherwise the first error and no change."""
    n = next(_counter)
    single, batched = f"diff{n}/s", f"diff{n}/b"
    expected = [_comparable(_apply_single(ps, single, op), single) for op in ops]
    pipe = ps.pipeline(atomic=atomic, raise_on_error=False)
    try:
        for op in ops:
            _queue(pipe, batched, op)
        results: list[Any] | TensorPSError = pipe.execute()
    except TensorPSError as error:
        results = error
    if isinstance(results, TensorPSError):
        failures = [e for e in expected if isinstance(e, tuple) and e and str(e[0]).endswith("Error")]
        assert atomic and failures, results
        assert type(results).__name__ == failures[0][0]
        assert failures[0][1] in results.message.replace(batched, "P")
        assert _state(ps, batched) == [None, None, None]
    else:
        assert [_comparable(r, batched) for r in results] == expected
        assert _state(ps, batched) == _state(ps, single)
    for prefix in (single, batched):
        for var in "abc":
            with contextlib.suppress(NotFoundError):
                ps.delete(f"{prefix}/{var}")


def test_same_values_helper_still_compares(ps: Client, name: str) -> None:
    """read_many's arrays compare with the suite's NaN-aware comparison like single reads do."""
    v = f"{name}/v"
    ps.create(v, value=np.array([np.nan, 1.0]))
    assert same_values(ps.read_many([v])[v], ps.read(v))


def test_atomic_prefix_reads_see_whole_atomic_creations(server: ServerProcess, name: str) -> None:
    """Pairs of variables created by atomic batches: an atomic read of their prefix holds both or neither
    of every pair (the prefix is listed again under the locks)."""
    done = threading.Event()

    def create_pairs() -> None:
        with Client(f"shm://{server.store}") as local:
            for i in range(60):
                pair = {f"{name}/x{i}": {"value": np.zeros(2)}, f"{name}/y{i}": {"value": np.zeros(2)}}
                local.create_many(pair, atomic=True)
        done.set()

    thread = threading.Thread(target=create_pairs)
    thread.start()
    with Client(server.address, timeout=60) as ps:
        while not done.is_set():
            seen = ps.pipeline(atomic=True).read_prefix(f"{name}/").execute()[0]
            xs = {n.rsplit("/", 1)[1][1:] for n in seen if "/x" in n}
            ys = {n.rsplit("/", 1)[1][1:] for n in seen if "/y" in n}
            assert xs == ys, f"half an atomic creation: {sorted(xs ^ ys)}"
    thread.join()
