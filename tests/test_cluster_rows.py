"""Rows and optimizers on a cluster: three real servers on loopback ports, the real ClusterClient.

Slots created with colocate_with live beside their variable (the gate agrees, another client finds them,
a restarted shard keeps them); gather/scatter/apply on plain and partitioned variables give what a lone
server (the oracle) gives for the same calls, values and errors alike, single and pipelined.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from cluster_support import LocalCluster

from support import ServerProcess, run
from tensorps.client import (
    AlreadyExistsError,
    BatchError,
    Client,
    FailedPreconditionError,
    TensorPSError,
    UsageError,
    VariableInfo,
    placement,
)
from tensorps.client.cluster import ClusterClient
from tensorps.client.placement import fixed_size_partitioner
from tensorps.v1 import tensorps_pb2 as pb
from tensorps.v1 import tensorps_pb2_grpc as pb_grpc

Array = np.ndarray[Any, Any]
F32 = np.float32


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(3) as running:
        yield running


@pytest.fixture
def cc(cluster: LocalCluster) -> Iterator[ClusterClient]:
    with Client(cluster.target, timeout=30) as client:
        assert isinstance(client, ClusterClient)
        yield client


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}/"


def _apart(prefix: str, slot: str = "Adam") -> str:
    """A variable name under `prefix` whose slot `NAME/slot` hashes to another shard than it."""
    return next(
        name
        for name in (f"{prefix}w{i}" for i in range(1000))
        if placement.owner(name, 3) != placement.owner(f"{name}/{slot}", 3)
    )


# ---- colocation ------------------------------------------------------------------------------------


def test_slots_live_beside_their_variable(cluster: LocalCluster, cc: ClusterClient) -> None:
    """create(..., colocate_with=) puts a slot on its variable's shard with a record the gate consults;
    listings show it once; another client finds it; a partitioned variable's slot is partitioned like it."""
    prefix = _unique("colo")
    w = _apart(prefix)
    cc.create(w, value=np.ones((4, 2), F32))
    info = cc.create(w + "/Adam", value=np.zeros((4, 2), F32), colocate_with=w)
    assert info.shape == (4, 2) and info.initialized
    home = placement.owner(w, 3)
    assert cc.owner(w + "/Adam") == home
    assert [i.name for i in cc.shards[home].list(w)] == [w, w + "/Adam"]
    assert [i.name for i in cc.list(prefix)] == [w, w + "/Adam"]
    assert cc.read_many(prefix=prefix).keys() == {w, w + "/Adam"}
    with pytest.raises(AlreadyExistsError):
        cc.create(w + "/Adam", value=np.zeros((4, 2), F32), colocate_with=w)
    with Client(cluster.target, timeout=30) as other:
        assert isinstance(other, ClusterClient)
        assert other.owner(w + "/Adam") == home
        assert other.read(w + "/Adam").tolist() == [[0, 0]] * 4
    # Partitioned: part k of the slot beside part k of the variable.
    emb = prefix + "emb"
    cc.create(emb, value=np.arange(20, dtype=F32).reshape(10, 2), partitioner=fixed_size_partitioner(3))
    cc.create(emb + "/Adagrad", value=np.full((10, 2), 0.1, F32), colocate_with=emb)
    for k in range(3):
        assert cc.owner(f"{emb}/Adagrad/part_{k}") == cc.owner(f"{emb}/part_{k}")
    assert [(i.name, i.shape) for i in cc.list(emb)] == [(emb, (10, 2)), (emb + "/Adagrad", (10, 2))]
    with pytest.raises(TensorPSError, match="partitioned like it and needs that shape"):
        cc.create(emb + "/bad", value=np.zeros((9, 2), F32), colocate_with=emb)
    # A restarted shard keeps serving its colocated slots (its store check knows the records).
    cluster.crash(home)
    cluster.start(home)
    assert cc.read(w + "/Adam").tolist() == [[0, 0]] * 4
    cc.delete(w + "/Adam")
    cc.delete(emb + "/Adagrad")
    left = sorted(i.name for shard in cc.shards for i in shard.list(prefix))
    assert left == sorted([w, *[f"{emb}/part_{k}" for k in range(3)]])
    records = [
        i.name
        for shard in cc.shards
        for i in shard.list(".")
        if i.name.startswith(placement.METADATA_PREFIXES)
    ]
    assert sorted(r for r in records if prefix in r) == [placement.layout_name(emb)]


def test_the_gate_checks_colocation_claims(cluster: LocalCluster, cc: ClusterClient) -> None:
    """A CREATE claiming a primary this shard does not serve, or does not hold, is refused; a name that
    hashes elsewhere and has no record here stays refused."""
    prefix = _unique("claim")
    w = _apart(prefix)
    home = placement.owner(w, 3)
    elsewhere = placement.owner(w + "/Adam", 3)
    with grpc.insecure_channel(cluster.members[home]) as channel:
        stub = pb_grpc.ParameterServerStub(channel)  # type: ignore[no-untyped-call]

        def create(name: str, primary: str) -> grpc.RpcError:
            op = pb.BatchOp(kind=pb.BATCH_OP_CREATE, name=name, dtype=pb.DT_FLOAT, slots=[primary])
            op.shape.dim.add(size=2)
            chunk = pb.BatchChunk(header=pb.BatchHeader(ops=[op]))
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.BatchStream(iter([chunk]), timeout=10))
            return caught.value

        refused = create(w + "/Adam", w)  # w does not exist yet
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not exist" in str(refused.details())
        other = next(n for n in (f"{prefix}p{i}" for i in range(100)) if placement.owner(n, 3) != home)
        refused = create(w + "/Adam", other)
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot be colocated" in str(refused.details())
    with pytest.raises(FailedPreconditionError, match=f"belongs to shard {elsewhere}"):
        cc.shards[home].create(w + "/Adam", value=np.zeros(2, F32))
    # Through the client: a primary that does not exist; nothing is left behind, not even the record.
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        cc.create(w + "/Adam", value=np.zeros(2, F32), colocate_with=w)
    assert [i.name for s in cc.shards for i in s.list(".") if prefix in i.name] == []
    assert cc.list(prefix) == []


# ---- rows and optimizers against a lone server -----------------------------------------------------


def _norm(value: Any) -> Any:
    """A result in a comparable form: arrays by dtype, shape and elements; infos without versions; errors
    by class and text."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        return ("array", str(array.dtype), array.shape, array.tolist(), array.flags.writeable)
    if isinstance(value, VariableInfo):
        return ("info", value.name, str(value.dtype), value.shape, value.initialized)
    if isinstance(value, list):
        return [_norm(item) for item in value]
    if isinstance(value, BatchError):
        return ("BatchError", [_norm(r) for r in value.results])
    if isinstance(value, TensorPSError):
        return ("error", type(value).__name__, value.message)
    return value


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return _norm(call())
    except TensorPSError as exc:
        return _norm(exc)


def _row_script(c: Any, p: str, partitioned: bool) -> list[Any]:
    """Every row operation and optimizer on (partitioned) variables with colocated slots."""
    three = fixed_size_partitioner(3) if partitioned else None
    four = fixed_size_partitioner(4) if partitioned else None
    emb, w, v3 = p + "emb", p + "w", p + "v3"
    table = np.arange(40, dtype=F32).reshape(10, 4)
    rng = np.random.default_rng(3)
    grad = rng.standard_normal((7, 3)).astype(F32)

    def create(name: str, partitioner: Any, **kwargs: Any) -> Any:
        return c.create(name, partitioner=partitioner, **kwargs) if partitioner else c.create(name, **kwargs)

    adam = (F32(0.9), F32(0.99), F32(0.01), F32(0.9), F32(0.999), F32(1e-7))
    steps: list[Callable[[], Any]] = [
        lambda: create(emb, three, value=table),
        lambda: c.create(emb + "/Adagrad", value=np.full((10, 4), 0.1, F32), colocate_with=emb),
        lambda: c.create(emb + "/Momentum", value=np.zeros((10, 4), F32), colocate_with=emb),
        lambda: create(w, four, value=np.linspace(-1, 1, 21, dtype=F32).reshape(7, 3)),
        lambda: c.create(w + "/Adam", value=np.zeros((7, 3), F32), colocate_with=w),
        lambda: c.create(w + "/Adam_1", value=np.zeros((7, 3), F32), colocate_with=w),
        lambda: c.create(w + "/Ftrl", value=np.full((7, 3), 0.1, F32), colocate_with=w),
        lambda: c.create(w + "/Ftrl_1", value=np.zeros((7, 3), F32), colocate_with=w),
        lambda: create(v3, three, value=np.arange(60, dtype=np.int64).reshape(5, 4, 3)),
        lambda: create(p + "u", three, dtype=F32, shape=(6, 2)),
        # gather
        lambda: c.gather(emb, np.array([[7, 1], [3, 3]], np.int32)),
        lambda: c.gather(emb, [9, 0, 4, 4]),
        lambda: c.gather(emb, np.zeros((0, 2), np.int64)),
        lambda: c.gather(emb, np.array([2, 10])),
        lambda: c.gather(emb, np.array([[1, 2], [-1, 0]])),
        lambda: c.gather(emb, np.array([1.0])),
        lambda: c.gather(v3, np.array([4, 0])),
        lambda: c.gather(p + "u", [1]),
        lambda: c.gather(p + "missing", [1]),
        # scatter
        lambda: c.scatter_add(emb, [1, 9, 1], np.ones((3, 4), F32)),
        lambda: c.scatter_update(emb, [0, 5, 9], np.float32(7)),
        lambda: c.scatter_update(emb, [2, 2], np.array([[1, 1, 1, 1], [2, 2, 2, 2]], F32), read_value=True),
        lambda: c.scatter_sub(emb, [[0], [9]], np.ones((2, 1, 4), F32), read_value=True),
        lambda: c.scatter_mul(emb, [3, 8], np.full((2, 4), 2, F32)),
        lambda: c.scatter_div(emb, [3], np.full((1, 4), 4, F32)),
        lambda: c.scatter_min(emb, [4, 6], np.full((2, 4), 17, F32)),
        lambda: c.scatter_max(emb, np.array([4, 6], np.int32), np.full((2, 4), 19, F32)),
        lambda: c.scatter_add(emb, [], np.zeros((0, 4), F32)),
        lambda: c.scatter_add(emb, [1], np.ones((2, 4), F32)),
        lambda: c.scatter_add(emb, [1], np.ones((1, 4), np.float64)),
        lambda: c.scatter_add(emb, [1, 10], np.ones((2, 4), F32)),
        lambda: c.scatter_add(v3, [4, 1], np.ones((2, 4, 3), np.int64)),
        lambda: c.scatter_div(v3, [4], np.zeros((1, 4, 3), np.int64)),
        lambda: c.scatter_add(p + "u", [1], np.ones((1, 2), F32)),
        lambda: c.read(emb),
        # scatter_nd
        lambda: c.scatter_nd_add(emb, [[1, 2], [8, 3], [1, 2]], np.array([5, 6, 7], F32)),
        lambda: c.scatter_nd_update(emb, [[4], [6]], np.ones((2, 4), F32)),
        lambda: c.scatter_nd_sub(v3, [[[4, 3, 2]], [[0, 0, 0]]], np.array([[1], [2]], np.int64)),
        lambda: c.scatter_nd_add(emb, [[1, 7]], np.array([1], F32)),
        lambda: c.scatter_nd_add(emb, [[11, 0]], np.array([1], F32)),
        lambda: c.scatter_nd_add(emb, np.zeros((2, 0), np.int64), np.ones((2, 10, 4), F32)),
        lambda: c.scatter_nd_update(emb, [[2]], np.ones((1, 3), F32)),
        lambda: c.read(emb),
        lambda: c.read(v3),
        # sparse optimizers
        lambda: c.sparse_apply_adagrad(
            emb, emb + "/Adagrad", F32(0.1), np.ones((3, 4), F32), np.array([9, 0, 9])
        ),
        lambda: c.sparse_apply_momentum(
            emb, emb + "/Momentum", F32(0.1), np.ones((2, 4), F32), [5, 2], F32(0.9), read_value=True
        ),
        lambda: c.sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((1, 4), F32), np.array([10])),
        lambda: c.sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((2, 4), F32), np.array([1])),
        lambda: c.sparse_apply_adagrad(
            emb, emb + "/Adagrad", 0.5, np.ones((0, 4), F32), np.zeros(0, np.int32)
        ),
        lambda: c.sparse_apply_adagrad(emb, emb + "/Momentum", F32(0.1), np.ones((1, 4), F32), [3]),
        lambda: c.read(emb),
        lambda: c.read(emb + "/Adagrad"),
        # dense optimizers
        lambda: c.apply_adam(w, w + "/Adam", w + "/Adam_1", *adam, grad),
        lambda: c.apply_adam(
            w, w + "/Adam", w + "/Adam_1", *adam, grad * 2, use_nesterov=True, read_value=True
        ),
        lambda: c.apply_adam(w, w + "/Adam", w + "/Adam_1", *adam, grad[:6]),
        lambda: c.apply_adam(w, w + "/Adam", w + "/Adam_1", *adam[:5], np.ones(2, F32), grad),
        lambda: c.apply_gradient_descent(w, 0.5, grad, read_value=True),
        lambda: c.apply_ftrl(w, w + "/Ftrl", w + "/Ftrl_1", grad, F32(0.1), F32(0.01), F32(0.02), F32(-0.5)),
        lambda: c.apply_momentum(w, w + "/Adam", F32(0.1), grad, F32(0.9), use_nesterov=True),
        lambda: c.apply_adagrad(w, emb + "/Adagrad", F32(0.1), grad),
        lambda: c.read(w),
        lambda: c.read(w + "/Adam_1"),
        lambda: c.read(w + "/Ftrl_1"),
        # pipelines: in order, results and errors in place
        lambda: (
            c.pipeline(raise_on_error=False)
            .gather(emb, [9, 1])
            .scatter_add(emb, [9], np.ones((1, 4), F32))
            .gather(emb, [9, 1])
            .apply_gradient_descent(w, F32(0.1), grad)
            .gather(emb, [12])
            .sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((1, 4), F32), [4])
            .read(w)
            .execute()
        ),
        lambda: c.pipeline().gather(emb, [3]).scatter_nd_add(emb, [[3, 1]], np.array([1], F32)).execute(),
        # Python values take the variable's dtype, also of one the same pipeline creates.
        lambda: c.scatter_add(emb, [2], [[0.5, 1, 2, 4]], read_value=True),
        lambda: (
            c.pipeline()
            .create(p + "new", value=np.zeros((2, 2), F32))
            .scatter_add(p + "new", [1], 2.5)
            .execute()
        ),
        lambda: c.read(p + "new"),
        lambda: c.read(emb),
    ]
    return [_outcome(step) for step in steps]


def test_rows_and_optimizers_match_a_lone_server(cc: ClusterClient, server: ServerProcess) -> None:
    prefix = _unique("rows")
    with Client(server.address, timeout=30) as oracle:
        expected = _row_script(oracle, prefix, partitioned=False)
    got = _row_script(cc, prefix, partitioned=True)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"step {index}"
    # The variables really are partitioned, their slots beside their parts.
    assert cc.layouts.get(prefix + "emb") is not None
    for k in range(4):
        assert cc.owner(f"{prefix}w/Adam/part_{k}") == cc.owner(f"{prefix}w/part_{k}")


def test_slots_must_be_beside_their_variable(cc: ClusterClient) -> None:
    """An apply whose slot lives on another shard, or is not partitioned like a partitioned variable, is
    refused before anything is sent, saying how to create it; nothing changes."""
    prefix = _unique("apart")
    w = _apart(prefix)
    cc.create(w, value=np.ones(3, F32))
    cc.create(w + "/Adam", value=np.zeros(3, F32))  # not colocated: on its own hash's shard
    with pytest.raises(FailedPreconditionError, match="colocate_with"):
        cc.apply_momentum(w, w + "/Adam", F32(0.1), np.ones(3, F32), F32(0.9))
    emb = prefix + "emb"
    cc.create(emb, value=np.ones((6, 2), F32), partitioner=fixed_size_partitioner(3))
    cc.create(emb + "/Adagrad", value=np.ones((6, 2), F32), partitioner=fixed_size_partitioner(2))
    with pytest.raises(TensorPSError, match="not partitioned like variable"):
        cc.sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((1, 2), F32), [0])
    assert cc.read(w).tolist() == [1, 1, 1] and cc.read(emb).tolist() == [[1, 1]] * 6
    # A batched gather cannot be split along axis 0: refused on a partitioned variable, clearly.
    with pytest.raises(TensorPSError, match="batch_dims must be 0"):
        cc.gather(emb, np.zeros((6, 1), np.int64), batch_dims=1)


def test_row_pipelines_are_atomic_on_one_shard_only(cc: ClusterClient) -> None:
    """An atomic pipeline of row operations runs when all of them land on one shard; one that spans shards
    (a partitioned variable's parts, or variables of two shards) is refused before anything is sent."""
    prefix = _unique("atomic")
    w = _apart(prefix)
    cc.create(w, value=np.zeros((4, 2), F32))
    cc.create(w + "/Adam", value=np.zeros((4, 2), F32), colocate_with=w)
    cc.create(w + "/Adam_1", value=np.zeros((4, 2), F32), colocate_with=w)
    adam = (F32(0.9), F32(0.99), F32(0.01), F32(0.9), F32(0.999), F32(1e-7))
    results = (
        cc.pipeline(atomic=True)
        .scatter_add(w, [1, 1], np.ones((2, 2), F32))
        .apply_adam(w, w + "/Adam", w + "/Adam_1", *adam, np.ones((4, 2), F32))
        .gather(w, [1])
        .execute()
    )
    assert results[2].shape == (1, 2) and cc.read(w + "/Adam")[0].tolist() == [pytest.approx(0.1)] * 2
    before = cc.read(w)
    with pytest.raises(TensorPSError, match=r"indices\[0\] = 9 is not in \[0, 4\)"):
        cc.pipeline(atomic=True).scatter_add(w, [0], np.ones((1, 2), F32)).gather(w, [9]).execute()
    assert np.array_equal(cc.read(w), before)  # atomic: the failure changed nothing
    # A table whose first and last parts live on different shards (parts are placed by their own names).
    emb = next(
        name
        for name in (f"{prefix}emb{i}" for i in range(1000))
        if placement.owner(f"{name}/part_0", 3) != placement.owner(f"{name}/part_2", 3)
    )
    cc.create(emb, value=np.zeros((6, 2), F32), partitioner=fixed_size_partitioner(3))
    with pytest.raises(UsageError, match="atomic per shard"):
        cc.pipeline(atomic=True).scatter_add(emb, [0, 5], np.ones((2, 2), F32)).execute()
    assert cc.read(emb).sum() == 0


def test_another_clients_partitioned_table_is_found(cluster: LocalCluster, cc: ClusterClient) -> None:
    """A client that read the layouts before a table was partitioned (and its slots colocated) finds them
    at its first row call: the plain lookup is not found (or a slot seems elsewhere), it reads them again
    and retries."""
    prefix = _unique("late")
    emb = prefix + "emb"
    with Client(cluster.target, timeout=30) as other:
        assert isinstance(other, ClusterClient)
        other.list()  # it reads the layouts now
        cc.create(emb, value=np.arange(12, dtype=F32).reshape(6, 2), partitioner=fixed_size_partitioner(3))
        cc.create(emb + "/Adagrad", value=np.full((6, 2), 0.1, F32), colocate_with=emb)
        assert other.gather(emb, [5, 0]).tolist() == [[10, 11], [0, 1]]
        other.layouts.stale()
        other.sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((1, 2), F32), [5])
        # A plain variable's slot colocated after `other` read the colocations: found, not refused.
        w = _apart(prefix, "Momentum")
        cc.create(w, value=np.ones(2, F32))
        cc.create(w + "/Momentum", value=np.zeros(2, F32), colocate_with=w)
        assert other.apply_momentum(w, w + "/Momentum", F32(1), np.ones(2, F32), F32(0.5)).version == 2
        # Plain calls too, and a delete takes the record with the variable.
        cc.create(w + "/Adam", value=np.full(2, 3, F32), colocate_with=w)
        assert other.read(w + "/Adam").tolist() == [3, 3]
        home = placement.owner(w, 3)
        suffixes = (f"/s{i}" for i in range(1000))
        apart = w + next(x for x in suffixes if placement.owner(w + x, 3) != home)
        beside = w + next(x for x in suffixes if placement.owner(w + x, 3) == home)
        for slot in (apart, beside):
            cc.create(slot, value=np.full(2, 3, F32), colocate_with=w)
            other.delete(slot)
        records = sorted(i.name for s in cc.shards for i in s.list(placement.colocation_name(w)))
        # The slot whose hash is its variable's shard was deleted plainly by `other`: its record stays,
        # and is dropped when it is created beside the variable again.
        expected = [placement.colocation_name(n) for n in (w + "/Adam", w + "/Momentum", beside)]
        assert records == sorted(expected)
        cc.create(beside, value=np.full(2, 4, F32), colocate_with=w)
        assert other.read(beside).tolist() == [4, 4]
    assert cc.read(emb + "/Adagrad")[5].tolist() == [pytest.approx(1.1)] * 2


def test_locked_scatters_on_a_partitioned_table_lose_nothing(cc: ClusterClient) -> None:
    """Threads scatter_add ones with use_locking=True into rows of every part: exact counts."""
    from concurrent.futures import ThreadPoolExecutor

    emb = _unique("locked") + "emb"
    cc.create(emb, value=np.zeros((9, 2), F32), partitioner=fixed_size_partitioner(3))
    rows = np.array([0, 4, 8, 4], np.int64)

    def push(_: int) -> None:
        for _ in range(10):
            cc.scatter_add(emb, rows, np.ones((4, 2), F32), use_locking=True)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(push, range(6)))
    assert cc.gather(emb, [0, 4, 8, 1]).tolist() == [[60, 60], [120, 120], [60, 60], [0, 0]]


def test_examples_converge_on_a_cluster(cluster: LocalCluster) -> None:
    """The embedding example (tables partitioned over the three shards, gather + sparse_apply_adagrad) and
    the dense Adam example (slots colocated) converge against a cluster target."""
    prefix = _unique("ex").rstrip("/")
    embedding = [sys.executable, "-m", "tensorps.examples.embedding", "--target", cluster.target]
    result = run(
        [*embedding, "--prefix", prefix + "ctr", "--steps", "150", "--threshold", "0.625"], timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    adam = [sys.executable, "-m", "tensorps.examples.adam", "--target", cluster.target]
    result = run([*adam, "--prefix", prefix + "adam", "--steps", "150"], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "converged: mse" in result.stdout


def test_reshard_keeps_slots_beside_their_variables(cluster: LocalCluster, cc: ClusterClient) -> None:
    """The offline re-shard (3 shards to 2) creates colocated slots beside their variables again, after
    them, partitioned slots partitioned like theirs; an apply works on the copy."""
    prefix = _unique("moved")
    emb, w = prefix + "emb", prefix + "w"
    cc.create(emb, value=np.arange(24, dtype=F32).reshape(8, 3), partitioner=fixed_size_partitioner(3))
    cc.create(emb + "/Adagrad", value=np.full((8, 3), 0.5, F32), colocate_with=emb)
    cc.create(w, value=np.ones(4, F32))
    cc.create(prefix + "a_slot", value=np.zeros(4, F32), colocate_with=w)  # sorts before its primary
    with LocalCluster(2) as new:
        command = [sys.executable, "-m", "tensorps.client.reshard", "--source", cluster.members[0]]
        result = run([*command, "--target", new.target, "--prefix", prefix], timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        with Client(new.target, timeout=30) as copy:
            assert isinstance(copy, ClusterClient)
            assert copy.owner(prefix + "a_slot") == copy.owner(w)
            assert copy.layouts.primary(emb + "/Adagrad") == emb
            for k in range(3):
                assert copy.owner(f"{emb}/Adagrad/part_{k}") == copy.owner(f"{emb}/part_{k}")
            copy.apply_momentum(w, prefix + "a_slot", F32(1), np.ones(4, F32), F32(0.5))
            assert copy.read(w).tolist() == [0, 0, 0, 0]
            copy.sparse_apply_adagrad(emb, emb + "/Adagrad", F32(0.1), np.ones((1, 3), F32), [7])
            assert copy.read(emb + "/Adagrad")[7].tolist() == [1.5] * 3
