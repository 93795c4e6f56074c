"""Rows and optimizers on a cluster: three real servers on loopback ports, the real ClusterClient.

Slots created with colocate_with live beside their variable (the gate agrees, another client finds them,
a restarted shard keeps them); gather/scatter/apply on plain and partitioned variables give what a lone
server (the oracle) gives for the same calls, values and errors alike, single and pipelined.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from cluster_support import LocalCluster

from tensorps.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    TensorPSError,
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
