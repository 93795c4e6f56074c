"""Variables sharded over a cluster: three real servers on three loopback ports, the real ClusterClient.

Every call on sharded and partitioned variables is checked against a lone server (the oracle: the same
calls on plain variables of the same names); misrouted calls and stale maps are refused; a shard killed
mid-training leaves the others serving and comes back under the same client.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cluster_support import LocalCluster

from support import ServerProcess, fresh_store_path, remove_store, run, wait_until
from tensorps.client import (
    AlreadyExistsError,
    BatchError,
    Client,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    TensorPSError,
    UnauthenticatedError,
    UnavailableError,
    UsageError,
    VariableInfo,
    codec,
    placement,
)
from tensorps.client import cluster as cluster_module
from tensorps.client.cluster import ClusterClient
from tensorps.client.placement import MinSizePartitioner, fixed_size_partitioner
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]


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


def _owned_by(shard: int, size: int, prefix: str, count: int = 1) -> list[str]:
    """`count` names under `prefix` that shard `shard` of `size` owns."""
    names = (f"{prefix}v{i}" for i in range(10_000))
    return [n for n in names if placement.owner(n, size) == shard][:count]


# ---- the map ---------------------------------------------------------------------------------------


def test_placement_is_the_documented_hash() -> None:
    """Rendezvous hashing as the .proto defines it (pinned values, so that no change goes unnoticed), and
    growing a cluster moves only the names the new shard wins."""
    import hashlib

    def by_definition(name: str, size: int) -> int:
        scores = [
            int.from_bytes(hashlib.sha256(f"{i}\n{name}".encode()).digest()[:8], "big") for i in range(size)
        ]
        return scores.index(max(scores))

    names = [f"layer{i}/kernel" for i in range(300)]
    assert all(placement.owner(n, 3) == by_definition(n, 3) for n in names)
    assert [placement.owner(n, 3) for n in ("w", "b", "dense/kernel:0", "emb/part_0")] == [0, 2, 2, 1]
    moved = [n for n in names if placement.owner(n, 3) != placement.owner(n, 4)]
    assert all(placement.owner(n, 4) == 3 for n in moved)
    assert 0.15 < len(moved) / len(names) < 0.35  # about 1/4


def test_servers_report_the_cluster(cluster: LocalCluster, cc: ClusterClient) -> None:
    infos = cc.server_info()
    assert [info.shard_index for info in infos] == [0, 1, 2]
    assert all(info.cluster == tuple(cluster.members) for info in infos)


def test_one_member_gives_the_whole_map(cluster: LocalCluster) -> None:
    with Client(f"cluster://{cluster.members[2]}", timeout=30) as client:
        assert isinstance(client, ClusterClient) and client.members == cluster.members
    with Client([cluster.members[1]], timeout=30) as client:
        assert isinstance(client, ClusterClient) and client.members == cluster.members


def test_a_lone_server_is_a_cluster_of_one(server: ServerProcess) -> None:
    name = _unique("lone")
    with Client([server.address], timeout=30) as client:
        client.create(name + "x", value=np.ones(3, np.float32))
        assert isinstance(client, ClusterClient) and client.server_info()[0].cluster == ()
        assert client.read(name + "x").tolist() == [1, 1, 1]
        client.delete(name + "x")


def test_misrouted_calls_are_refused_naming_the_owner(cluster: LocalCluster, cc: ClusterClient) -> None:
    """A plain client of shard 0 asking for shard 1's variables: every kind of call is refused with
    FAILED_PRECONDITION naming shard 1 and its address, and changes nothing."""
    prefix = _unique("misrouted")
    (mine,) = _owned_by(0, 3, prefix)
    theirs, fresh = _owned_by(1, 3, prefix, 2)
    cc.create(mine, value=np.zeros(4, np.float32))
    cc.create(theirs, value=np.zeros(4, np.float32))
    owner = re.escape(f"shard 1 ({cluster.members[1]})")
    with Client(cluster.members[0], timeout=30) as one:
        calls: list[Callable[[], Any]] = [
            lambda: one.read(theirs),
            lambda: one.info(theirs),
            lambda: one.assign(theirs, np.ones(4, np.float32)),
            lambda: one.assign_add(theirs, np.ones(4, np.float32)),
            lambda: one.delete(theirs),
            lambda: one.create(fresh, dtype=np.float32),
            lambda: one.assign(theirs, np.ones(3 << 20, np.float32)),  # a streamed write
            lambda: one.read_many([mine, theirs]),
            lambda: one.assign_many({mine: np.ones(4, np.float32), theirs: np.ones(4, np.float32)}),
            lambda: one.assign_many({mine: np.ones(1 << 21, np.float32), theirs: np.ones(4, np.float32)}),
        ]
        for call in calls:
            refused = f"'({re.escape(theirs)}|{re.escape(fresh)})' belongs to {owner}"
            with pytest.raises(FailedPreconditionError, match=refused):
                call()
        # ReadStream, which the client uses for large variables, through a raw stub.
        with grpc.insecure_channel(cluster.members[0]) as channel:
            stream = channel.unary_stream(
                "/tensorps.v1.ParameterServer/ReadStream", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as refused_stream:
                list(stream(pb.ReadRequest(name=theirs).SerializeToString(), timeout=30))
            assert refused_stream.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"belongs to shard 1 ({cluster.members[1]})" in str(refused_stream.value.details())
        assert one.read(mine).tolist() == [0, 0, 0, 0]  # the refused batches changed nothing
        assert theirs not in [info.name for info in one.list(prefix)]
    assert cc.read(theirs).tolist() == [0, 0, 0, 0]


def test_a_client_with_another_map_is_refused_loudly(cluster: LocalCluster) -> None:
    """A client routing by a map of other size or order fails on every call, even one the server owns."""
    for members in (cluster.members[:2], cluster.members[::-1]):
        with Client(members, timeout=30) as stale:
            with pytest.raises(FailedPreconditionError, match="cluster map changed"):
                stale.server_info()
            with pytest.raises(FailedPreconditionError, match="cluster map changed"):
                stale.read("anything")


def test_a_store_of_another_map_refuses_to_start() -> None:
    """A server restarted with a cluster map its store's variables do not fit stops with a clear error."""
    store = fresh_store_path()
    try:
        with ServerProcess("--keep-store", store=store) as lone, Client(lone.address, timeout=30) as client:
            for i in range(8):
                client.create(f"resharded/v{i}", value=np.zeros(2, np.float32))
        refused = ServerProcess(
            "--cluster", "127.0.0.1:1,127.0.0.1:2", "--shard-index", "0", store=store, wait=False
        )
        assert refused.proc.wait(30) == 1
        refused.stop()
        assert any("cluster map changed" in line for line in refused.log), refused.log
    finally:
        remove_store(store)


# ---- every call against a lone server ------------------------------------------------------------


def _norm(value: Any) -> Any:
    """A result in a comparable form: arrays by dtype, shape and elements; infos without versions."""
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        return ("array", str(array.dtype), array.shape, array.tolist(), array.flags.writeable)
    if isinstance(value, VariableInfo):
        return ("info", value.name, str(value.dtype), value.shape, value.initialized)
    if isinstance(value, dict):
        return {key: _norm(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [_norm(item) for item in value]
    if isinstance(value, BatchError):
        return ("BatchError", [_norm(r) for r in value.results])
    if isinstance(value, TensorPSError):
        return ("error", type(value).__name__)
    return value


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        return _norm(call())
    except TensorPSError as exc:
        return _norm(exc)


def _script(c: Client, p: str, partitioned: bool) -> list[Any]:
    """Every API call, on plain and partitioned variables (on the oracle: all plain)."""
    three = fixed_size_partitioner(3) if partitioned else None
    small = MinSizePartitioner(min_shard_bytes=64, max_shards=4) if partitioned else None
    f32 = np.float32
    w0 = np.arange(30, dtype=f32).reshape(10, 3)
    big = np.random.default_rng(7).standard_normal((1536, 1024), dtype=f32)  # 6 MiB

    def create(name: str, partitioner: Any, **kwargs: Any) -> Any:
        routed: Any = c  # a ClusterClient's create() takes a partitioner
        return (
            routed.create(name, partitioner=partitioner, **kwargs)
            if partitioner
            else c.create(name, **kwargs)
        )

    steps: list[Callable[[], Any]] = [
        lambda: c.create(p + "a", value=np.arange(12, dtype=f32).reshape(4, 3)),
        lambda: create(p + "w", three, value=w0),
        lambda: create(p + "u", three, dtype=np.float64, shape=(7, 2)),
        lambda: create(p + "m", small, value=np.arange(40, dtype=np.int64).reshape(20, 2)),
        lambda: c.create(p + "s", value=np.int64(5)),
        lambda: c.create(p + "a", value=np.zeros(1, f32)),
        lambda: create(p + "w", three, value=w0),
        lambda: c.read(p + "a"),
        lambda: c.read(p + "w"),
        lambda: c.read(p + "m"),
        lambda: c.read(p + "u"),
        lambda: c.read(p + "missing"),
        lambda: c.info(p + "w"),
        lambda: c.info(p + "u"),
        lambda: c.is_initialized(p + "u"),
        lambda: c.assign(p + "w", w0 * 2),
        lambda: c.assign(p + "w", w0 * 3, read_value=False),
        lambda: c.assign(p + "w", np.zeros((9, 3), f32)),
        lambda: c.assign(p + "w", w0.astype(np.float64)),
        lambda: c.assign(p + "w", [[1, 2, 3]] * 10),
        lambda: c.assign(p + "w", [[1.5, 2, 3]] * 10),
        lambda: c.assign_add(p + "w", np.ones((10, 3), f32)),
        lambda: c.assign_sub(p + "w", np.full((10, 3), 0.5, f32), read_value=False),
        lambda: c.assign_add(p + "w", np.ones((3, 10), f32)),
        lambda: c.assign_add(p + "u", np.ones((7, 2))),
        lambda: c.assign(p + "u", np.arange(14.0).reshape(7, 2)),
        lambda: c.assign_sub(p + "u", np.ones((7, 2))),
        lambda: c.assign_add(p + "m", np.ones((20, 2), np.int64)),
        lambda: c.assign(p + "a", np.zeros(5, f32), validate_shape=False),
        lambda: c.read(p + "w"),
        lambda: c.assign_many({p + "a": np.ones(5, f32), p + "w": w0}),
        lambda: c.assign_add_many({p + "w": w0, p + "s": np.int64(2)}, read_value=True),
        lambda: c.assign_sub_many({p + "u": np.ones((7, 2)), p + "m": np.ones((20, 2), np.int64)}),
        lambda: c.read_many([p + "a", p + "w", p + "u", p + "m", p + "s"]),
        lambda: c.read_many(prefix=p),
        lambda: c.read_many([p + "w", p + "missing"]),
        lambda: (
            c.pipeline(raise_on_error=False)
            .assign_add(p + "s", np.int64(1))
            .read(p + "w")
            .info(p + "u")
            .read(p + "missing")
            .assign(p + "w", np.zeros((2, 2), f32))
            .execute()
        ),
        lambda: c.list(p),
        lambda: c.delete(p + "w"),
        lambda: c.read(p + "w"),
        lambda: c.delete(p + "w"),
        lambda: c.create_many(
            {p + "x": {"value": np.ones(3, f32)}, p + "y": {"dtype": np.int32, "shape": [2]}}
        ),
        lambda: c.list(p),
        lambda: c.read_many(prefix=p),
        # Futures, and values past one message (streamed single calls, streamed or bulk batches).
        lambda: c.read_many([p + "a", p + "m"], wait=False).result(timeout=60),
        lambda: c.assign_add_many({p + "m": np.ones((20, 2), np.int64)}, wait=False).result(timeout=60),
        lambda: c.pipeline().read(p + "s").info(p + "m").submit().result(timeout=60),
        lambda: create(p + "big", three, value=big),
        lambda: c.read(p + "big").sum(),
        lambda: c.assign_add(p + "big", big, read_value=False),
        lambda: float(c.read_many([p + "big"])[p + "big"][-1, -1]),
        lambda: c.assign(p + "big", big * 3).shape,
        lambda: c.create(p + "plainbig", value=big),
        lambda: float(c.assign_sub(p + "plainbig", big)[5, 5]),
    ]
    return [_outcome(step) for step in steps]


def test_every_call_matches_a_lone_server(cc: ClusterClient, server: ServerProcess) -> None:
    prefix = _unique("oracle")
    with Client(server.address, timeout=30) as oracle:
        expected = _script(oracle, prefix, partitioned=False)
    got = _script(cc, prefix, partitioned=True)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"step {index}"
    # The partitioned variables really are split over the shards, TF's way.
    parts = {info.name: info.shape for info in cc.shards[0].list(prefix)}
    for shard in cc.shards[1:]:
        parts.update({info.name: info.shape for info in shard.list(prefix)})
    assert parts[prefix + "u/part_0"] == (3, 2) and parts[prefix + "u/part_2"] == (2, 2)
    assert [parts[f"{prefix}m/part_{k}"] for k in range(4)] == [(5, 2)] * 4
    layouts = [info.name for shard in cc.shards for info in shard.list(placement.layout_name(prefix))]
    assert sorted(layouts) == [placement.layout_name(prefix + n) for n in ("big", "m", "u")]
    assert prefix + "u" not in parts


def test_partitioned_variable_seen_by_another_client(cluster: LocalCluster, cc: ClusterClient) -> None:
    """Another client finds a partitioned variable it has never seen (its layout), and one deleted
    meanwhile and created again plain."""
    name = _unique("seen") + "emb"
    table = np.arange(64, dtype=np.float32).reshape(16, 4)
    with Client(cluster.target, timeout=30) as other:
        assert isinstance(other, ClusterClient)
        other.list()  # it reads the layouts now, before the variable exists
        cc.create(name, value=table, partitioner=fixed_size_partitioner(4))
        assert np.array_equal(other.read(name), table)  # not found plainly: it reads the layouts again
        cc.delete(name)
        cc.create(name, value=np.zeros(2, np.float32))
        assert other.read(name).tolist() == [0, 0]
        assert [i.name for i in other.list(name)] == [name]


def test_partitioner_arguments_are_checked(cc: ClusterClient) -> None:
    name = _unique("bad") + "x"
    with pytest.raises(TensorPSError, match="rank 1 or more"):
        cc.create(name, value=np.float32(1), partitioner=fixed_size_partitioner(2))
    with pytest.raises(TensorPSError, match="axis 0 only"):
        cc.create(name, value=np.zeros((4, 4), np.float32), partitioner=lambda shape, dtype: [1, 2])
    with pytest.raises(AlreadyExistsError):
        cc.create(name, value=np.zeros(4, np.float32))
        cc.create(name, value=np.zeros(4, np.float32), partitioner=fixed_size_partitioner(2))
    assert placement.fixed_size_partitioner(5)([3, 2], np.float32) == [3, 1]
    assert placement.min_max_variable_partitioner(8, min_slice_size=256 << 10)([300, 1000], np.float32) == [
        5,
        1,
    ]


def test_atomic_batches_are_atomic_per_shard(cc: ClusterClient) -> None:
    prefix = _unique("atomic")
    a, b, missing = _owned_by(0, 3, prefix, 3)
    (c,) = _owned_by(2, 3, prefix)
    for name in (a, b, c):
        cc.create(name, value=np.zeros(2, np.float32))
    assert cc.assign_many({a: np.ones(2, np.float32), b: np.ones(2, np.float32)}, atomic=True)
    with pytest.raises(UsageError, match=r"atomic per shard.*spans 2 shards"):
        cc.assign_many({a: np.full(2, 5, np.float32), c: np.full(2, 5, np.float32)}, atomic=True)
    with pytest.raises(NotFoundError):
        cc.pipeline(atomic=True).assign(a, np.full(2, 7, np.float32)).read(missing).execute()
    values = cc.read_many([a, b, c])
    assert {n: v.tolist() for n, v in values.items()} == {a: [1, 1], b: [1, 1], c: [0, 0]}


def test_new_per_variable_methods_route_by_name(cc: ClusterClient) -> None:
    """A method of Client the router has no code for (the sparse ops of another branch, say) is routed by
    its `name` argument to the owner, and refused on a partitioned variable; one without `name` is refused."""
    prefix = _unique("routed")
    plain = _owned_by(2, 3, prefix)[0]
    cc.create(plain, value=np.arange(3, dtype=np.float32))
    cc.create(prefix + "parted", value=np.zeros((4, 2), np.float32), partitioner=fixed_size_partitioner(2))
    routed = cluster_module._route_by_name("read")
    assert routed(cc, plain).tolist() == [0, 1, 2]
    with pytest.raises(UsageError, match="partitioned variable"):
        routed(cc, prefix + "parted")
    with pytest.raises(UsageError, match="not available on a client of a cluster"):
        cluster_module._unsupported("snapshot")(cc)
    with pytest.raises(UsageError, match="cluster has no local store"):
        ClusterClient.local("/dev/shm/x")


def test_rows_of_a_partitioned_variable_are_located_in_their_parts() -> None:
    """PartitionSpec.locate: the routing of row-wise (sparse) operations, parts in TF's split."""
    spec = placement.PartitionSpec("emb", codec.dtype_of(np.float32), (10, 4), 3)  # rows 4, 3, 3
    found = spec.locate([9, 0, 4, 3, 9])
    assert [(p, local.tolist(), where.tolist()) for p, local, where in found] == [
        (0, [0, 3], [1, 3]),
        (1, [0], [2]),
        (2, [2, 2], [0, 4]),
    ]
    with pytest.raises(IndexError, match="row 10 of variable 'emb'"):
        spec.locate([1, 10])


# ---- failure ---------------------------------------------------------------------------------------


def test_a_killed_shard_fails_only_its_variables_and_comes_back(cluster: LocalCluster) -> None:
    """Mid-training, shard 1 is SIGKILLed: its variables are UNAVAILABLE naming it, the others train on; it
    restarts on its store and the same client resumes."""
    prefix = _unique("killed")
    names = [n for shard in range(3) for n in _owned_by(shard, 3, prefix, 2)]
    lost = set(_owned_by(1, 3, prefix, 2))
    # Partitioned, its six parts on every shard.
    tables = (f"{prefix}table{i}" for i in range(1000))
    table = next(
        t for t in tables if {placement.owner(placement.part_name(t, k), 3) for k in range(6)} == {0, 1, 2}
    )
    with Client(cluster.target, timeout=20) as client:
        assert isinstance(client, ClusterClient)
        client.create_many({n: {"value": np.zeros(4, np.float32)} for n in names})
        client.create(table, value=np.zeros((12, 2), np.float32), partitioner=fixed_size_partitioner(6))
        spec = client.layouts.get(table)
        assert spec is not None and {client.owner(p) for p in spec.part_names} == {0, 1, 2}
        ones = {n: np.ones(4, np.float32) for n in names}
        for _ in range(5):
            client.assign_add_many(ones)
        cluster.crash(1)
        try:
            with pytest.raises(UnavailableError, match=re.escape(f"shard 1 ({cluster.members[1]})")):
                client.assign_add(table, np.ones((12, 2), np.float32))
            with pytest.raises(UnavailableError, match=re.escape(f"shard 1 ({cluster.members[1]})")):
                client.read(table)
            with pytest.raises(BatchError) as failed:
                client.assign_add_many(ones)
            assert set(failed.value.errors) == {names.index(n) for n in lost}
            for error in failed.value.errors.values():
                assert (
                    isinstance(error, UnavailableError) and f"shard 1 ({cluster.members[1]})" in error.message
                )
            for name in names:
                if name in lost:
                    with pytest.raises(UnavailableError, match=re.escape(f"shard 1 ({cluster.members[1]})")):
                        client.read(name)
                else:
                    assert client.read(name).tolist() == [6, 6, 6, 6]
        finally:
            cluster.start(1)
        assert wait_until(lambda: _reads(client, names), timeout=20)
        values = client.read_many(names)
        assert {n: values[n][0] for n in names} == {n: 5 if n in lost else 6 for n in names}
        # The parts on the live shards took the write made while shard 1 was down; its own did not.
        parts = zip(spec.part_names, spec.rows, strict=True)
        rows = np.concatenate([np.full(r, client.owner(p) != 1) for p, r in parts])
        assert client.read(table)[:, 0].tolist() == rows.astype(np.float32).tolist()


def _reads(client: Client, names: list[str]) -> bool:
    try:
        client.read_many(names)
    except TensorPSError:
        return False
    return True


# ---- the example training job ----------------------------------------------------------------------


def test_example_training_converges_sharded(cluster: LocalCluster) -> None:
    """examples/train.py against the three shards (its variables spread over them) converges."""
    # A model whose four variables (examples/train.py's Names) span all three shards.
    suffixes = ("weights", "bias", "global_step", "workers_joined")
    models = (_unique("train").rstrip("/") for _ in range(1000))
    model = next(m for m in models if len({placement.owner(f"{m}/{s}", 3) for s in suffixes}) == 3)
    command = [sys.executable, "-m", "tensorps.examples.train", "--target", cluster.target, "--model", model]
    result = run([*command, "--num-workers", "2", "--steps", "600"], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"final loss \S+ .*: converged$", result.stdout, re.M), result.stdout
    with Client(cluster.target, timeout=30) as client:
        assert isinstance(client, ClusterClient)
        shards = {client.owner(info.name) for info in client.list(model)}
        assert shards == {0, 1, 2}


def test_cluster_flags_are_checked() -> None:
    for args, message in (
        (["--cluster", "a:1,b:2"], "needs --shard-index"),
        (["--cluster", "a:1,b:2", "--shard-index", "2"], "outside the cluster"),
        (["--cluster", "a:1,a:1", "--shard-index", "0"], "twice"),
        (["--cluster", "a", "--shard-index", "0"], "not HOST:PORT"),
        (["--shard-index", "1"], "needs --cluster"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tensorps.server", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={"HOSTNAME": "laptop", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_shard_index_from_a_statefulset_hostname() -> None:
    from tensorps.server.cluster import resolve_shard_index, shard_index_from_hostname

    assert shard_index_from_hostname("ps-2") == 2
    assert shard_index_from_hostname("tensorps-ps-10.ps.default.svc.cluster.local") == 10
    assert shard_index_from_hostname("laptop") is None
    assert resolve_shard_index(["a:1", "b:1", "c:1"], None, hostname="ps-1") == 1
    assert resolve_shard_index([], None) == 0


def test_offline_reshard_copies_a_model_into_a_cluster_of_another_size(cluster: LocalCluster) -> None:
    """python -m tensorps.client.reshard copies plain, partitioned, uninitialized variables, 3 shards to 2."""
    prefix = _unique("reshard")
    table = np.arange(60, dtype=np.float32).reshape(20, 3)
    with Client(cluster.target, timeout=30) as old:
        assert isinstance(old, ClusterClient)
        old.create(prefix + "emb", value=table, partitioner=fixed_size_partitioner(4))
        old.create_many({f"{prefix}dense{i}": {"value": np.full(i + 1, i, np.int64)} for i in range(6)})
        old.create(prefix + "later", dtype=np.float64, shape=[2, 2])
        with LocalCluster(2) as new:
            command = [sys.executable, "-m", "tensorps.client.reshard", "--source", cluster.members[0]]
            result = run([*command, "--target", new.target, "--prefix", prefix], timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "copied 8 variable(s) from 3 shards to 2" in result.stdout
            with Client(new.target, timeout=30) as copy:
                assert isinstance(copy, ClusterClient)
                assert [(i.name, i.shape, i.initialized) for i in copy.list(prefix)] == [
                    (i.name, i.shape, i.initialized) for i in old.list(prefix)
                ]
                got, want = copy.read_many(prefix=prefix), old.read_many(prefix=prefix)
                assert {n: v.tolist() for n, v in got.items()} == {n: v.tolist() for n, v in want.items()}
                spec = copy.layouts.get(prefix + "emb")
                assert spec is not None and spec.parts == 4
                assert {info.shard_index for info in copy.server_info()} == {0, 1}
            again = run([*command, "--target", new.target, "--prefix", prefix], timeout=120)
            assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr


def test_tokens_apply_to_every_shard_before_placement(tmp_path: Path) -> None:
    """With --token-file, the client's token reaches every shard; without one, every call is
    UNAUTHENTICATED, a misrouted one too (authentication comes before the cluster gate)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\nreader read-only\n")
    with LocalCluster(2, "--token-file", str(tokens)) as secured:
        prefix = _unique("tokens")
        with Client(secured.target, token="s3cret", timeout=30) as client:
            client.assign_many({})
            client.create_many({f"{prefix}v{i}": {"value": np.ones(2, np.float32)} for i in range(6)})
            assert len(client.list(prefix)) == 6
        with Client(secured.target, token="reader", timeout=30) as reader:
            assert len(reader.read_many([f"{prefix}v{i}" for i in range(6)])) == 6
            with pytest.raises(PermissionDeniedError):  # every shard refused it: the call failed whole
                reader.assign_many({f"{prefix}v{i}": np.zeros(2, np.float32) for i in range(6)})
        (theirs,) = _owned_by(1, 2, prefix)
        with Client(secured.members[0], timeout=30) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.read(theirs)


def test_partitioned_variables_created_in_batches(cc: ClusterClient) -> None:
    """create_many and pipeline().create take a partitioner too: the layout and the parts in one call per
    shard, the variable whole afterwards for this client and a new one."""
    prefix = _unique("batched")
    table = np.arange(24, dtype=np.int32).reshape(8, 3)
    infos = cc.create_many(
        {
            prefix + "t": {"value": table, "partitioner": fixed_size_partitioner(3)},
            prefix + "u": {"dtype": np.float32, "shape": [5, 2], "partitioner": fixed_size_partitioner(5)},
            prefix + "plain": {"value": np.ones(2, np.float32)},
        }
    )
    assert [(i.shape, i.initialized) for i in infos.values()] == [
        ((8, 3), True),
        ((5, 2), False),
        ((2,), True),
    ]
    (made,) = (
        cc.pipeline().create(prefix + "p", value=table * 2, partitioner=fixed_size_partitioner(2)).execute()
    )
    assert made.shape == (8, 3)

    def whole(client: Client) -> None:
        assert np.array_equal(client.read(prefix + "t"), table)
        assert np.array_equal(client.read(prefix + "p"), table * 2)
        assert [i.name for i in client.list(prefix)] == [prefix + n for n in ("p", "plain", "t", "u")]

    whole(cc)
    with Client(cc.target, timeout=30) as fresh:
        whole(fresh)


def test_admin_cli_on_a_cluster_target(cluster: LocalCluster, cc: ClusterClient) -> None:
    """The admin CLI with a cluster target: ls and get see partitioned variables whole, stats reports
    every shard, health checks every member."""
    prefix = _unique("cli")
    cc.create(
        prefix + "emb",
        value=np.arange(12, dtype=np.float32).reshape(6, 2),
        partitioner=fixed_size_partitioner(3),
    )
    cli = [sys.executable, "-m", "tensorps.cli", "--target", cluster.target]
    listed = run([*cli, "ls", prefix], timeout=60)
    assert listed.returncode == 0 and re.search(
        rf"^{re.escape(prefix)}emb +float32 +\(6, 2\)", listed.stdout, re.M
    )
    got = run([*cli, "get", prefix + "emb"], timeout=60)
    assert got.returncode == 0 and "max: 11.0" in got.stdout, got.stdout + got.stderr
    stats = run([*cli, "stats"], timeout=60)
    assert stats.returncode == 0, stats.stderr
    assert [f"shard {i}:    {m}" in stats.stdout for i, m in enumerate(cluster.members)] == [True] * 3
    health = run([*cli, "health"], timeout=60)
    assert health.returncode == 0 and health.stdout.count(": SERVING") == 3, health.stdout + health.stderr
