"""Row operations and optimizers on the wire: malformed ones sent as raw bytes get INVALID_ARGUMENT and
change nothing; gather is a read (allowed to read-only tokens), every scatter and apply a write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from support import ServerProcess
from tensorps.client import Client, PermissionDeniedError
from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "/tensorps.v1.ParameterServer/"


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def victim(ps: Client, name: str) -> Iterator[str]:
    """A table that every bad request must leave exactly as it was."""
    ps.create(name, value=np.arange(12, dtype=np.float32).reshape(6, 2))
    ps.create(f"{name}/accum", value=np.ones((6, 2), np.float32))
    before = [(ps.info(n), ps.read(n).copy()) for n in (name, f"{name}/accum")]
    yield name
    for n, (info, value) in zip((name, f"{name}/accum"), before, strict=True):
        assert ps.info(n) == info
        np.testing.assert_array_equal(ps.read(n), value)


def tensor_header(dtype: int, dims: list[int]) -> pb.TensorProto:
    shape = pb.TensorShapeProto(dim=[pb.TensorShapeProto.Dim(size=d) for d in dims])
    return pb.TensorProto(dtype=dtype, tensor_shape=shape)  # type: ignore[arg-type]


def batch(op: pb.BatchOp, data: bytes, *, atomic: bool = False) -> bytes:
    return pb.BatchChunk(header=pb.BatchHeader(atomic=atomic, ops=[op]), data=data).SerializeToString()


def status(channel: grpc.Channel, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """The call's status, or for a batch in order, its operation's."""
    try:
        raw = channel.unary_unary(SERVICE + "Batch", request_serializer=None, response_deserializer=None)(
            payload, timeout=10
        )
    except grpc.RpcError as exc:
        return exc.code(), str(exc.details())
    reply = pb.BatchReply.FromString(raw)
    (result,) = reply.results
    codes = {code.value[0]: code for code in grpc.StatusCode}
    return codes[result.code], result.message


def scatter(name: str, indices: pb.TensorProto, updates: pb.TensorProto) -> pb.BatchOp:
    return pb.BatchOp(kind=pb.BATCH_OP_SCATTER_ADD, name=name, inputs=[indices, updates], use_locking=True)


I64, F32 = pb.DT_INT64, pb.DT_FLOAT


def cases(name: str) -> dict[str, tuple[pb.BatchOp, bytes]]:
    idx = np.array([0, 1], np.int64).tobytes()
    upd = np.ones((2, 2), np.float32).tobytes()
    return {
        "data shorter than its inputs": (
            scatter(name, tensor_header(I64, [2]), tensor_header(F32, [2, 2])),
            idx,
        ),
        "data longer than its inputs": (
            scatter(name, tensor_header(I64, [2]), tensor_header(F32, [2, 2])),
            idx + upd + b"x",
        ),
        "one input missing": (
            pb.BatchOp(kind=pb.BATCH_OP_SCATTER_ADD, name=name, inputs=[tensor_header(I64, [2])]),
            idx,
        ),
        "negative dim": (scatter(name, tensor_header(I64, [-2]), tensor_header(F32, [2, 2])), idx + upd),
        "huge dims": (scatter(name, tensor_header(I64, [2**40]), tensor_header(F32, [2**40, 2])), b""),
        "float indices": (
            scatter(name, tensor_header(F32, [2]), tensor_header(F32, [2, 2])),
            np.zeros(2, np.float32).tobytes() + upd,
        ),
        "index out of range": (
            scatter(name, tensor_header(I64, [2]), tensor_header(F32, [2, 2])),
            np.array([0, 6], np.int64).tobytes() + upd,
        ),
        "negative index": (
            scatter(name, tensor_header(I64, [2]), tensor_header(F32, [2, 2])),
            np.array([-1, 0], np.int64).tobytes() + upd,
        ),
        "value instead of inputs": (
            pb.BatchOp(kind=pb.BATCH_OP_SCATTER_ADD, name=name, value=tensor_header(F32, [2, 2])),
            upd,
        ),
        "missing slot": (
            pb.BatchOp(
                kind=pb.BATCH_OP_SPARSE_APPLY_ADAGRAD,
                name=name,
                inputs=[tensor_header(F32, []), tensor_header(F32, [2, 2]), tensor_header(I64, [2])],
            ),
            np.float32(1).tobytes() + upd + idx,
        ),
        "bad slot name": (
            pb.BatchOp(
                kind=pb.BATCH_OP_SPARSE_APPLY_ADAGRAD,
                name=name,
                slots=["../x"],
                inputs=[tensor_header(F32, []), tensor_header(F32, [2, 2]), tensor_header(I64, [2])],
            ),
            np.float32(1).tobytes() + upd + idx,
        ),
        "inputs on an assign": (
            pb.BatchOp(
                kind=pb.BATCH_OP_ASSIGN,
                name=name,
                value=tensor_header(F32, [6, 2]),
                inputs=[tensor_header(I64, [2])],
            ),
            np.zeros((6, 2), np.float32).tobytes() + idx,
        ),
        "tensor_content in an input": (
            scatter(
                name,
                pb.TensorProto(
                    dtype=I64, tensor_shape=tensor_header(I64, [2]).tensor_shape, tensor_content=idx
                ),
                tensor_header(F32, [2, 2]),
            ),
            upd,
        ),
    }


@pytest.mark.parametrize("atomic", [False, True], ids=["in_order", "atomic"])
@pytest.mark.parametrize("case", list(cases("x")))
def test_malformed_row_operations(channel: grpc.Channel, victim: str, case: str, atomic: bool) -> None:
    """Each malformed row operation: INVALID_ARGUMENT (in order: as its result; sizes beyond the server's
    limits RESOURCE_EXHAUSTED, before any byte is taken), nothing changed."""
    op, data = cases(victim)[case]
    code, message = status(channel, batch(op, data, atomic=atomic))
    expected = grpc.StatusCode.RESOURCE_EXHAUSTED if case == "huge dims" else grpc.StatusCode.INVALID_ARGUMENT
    assert code == expected, (case, code, message)


# ---- read-only tokens -----------------------------------------------------------------------------

WRITER, READER = "w-" + "c" * 40, "r-" + "d" * 40


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path: Path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"{WRITER}\n{READER} read-only\n")
    with ServerProcess("--token-file", str(path), workers=1) as server:
        with Client(server.address, token=WRITER) as ps:
            ps.create("emb", value=np.arange(8, dtype=np.float32).reshape(4, 2))
            ps.create("emb/accum", value=np.ones((4, 2), np.float32))
        yield server


def test_read_only_tokens_gather_but_never_scatter_or_apply(token_server: ServerProcess) -> None:
    """gather is a read: allowed to a read-only token; scatters and applies are PERMISSION_DENIED and change
    nothing, alone or in a pipeline with a gather."""
    with Client(token_server.address, token=READER, timeout=10) as ps:
        np.testing.assert_array_equal(ps.gather("emb", [3]), [[6, 7]])
        writes: dict[str, Callable[[], object]] = {
            "scatter_update": lambda: ps.scatter_update("emb", [0], np.zeros((1, 2), np.float32)),
            "scatter_add": lambda: ps.scatter_add("emb", [0], np.float32(1)),
            "scatter_nd_add": lambda: ps.scatter_nd_add("emb", [[0, 1]], np.ones(1, np.float32)),
            "apply_gradient_descent": lambda: ps.apply_gradient_descent(
                "emb", np.float32(1), np.ones((4, 2), np.float32)
            ),
            "sparse_apply_adagrad": lambda: ps.sparse_apply_adagrad(
                "emb", "emb/accum", np.float32(1), np.ones((1, 2), np.float32), [0]
            ),
            "pipeline": lambda: (
                ps.pipeline().gather("emb", [0]).scatter_add("emb", [0], np.float32(1)).execute()
            ),
        }
        for call_name, call in writes.items():
            with pytest.raises(PermissionDeniedError):
                call()
            assert call_name
    with Client(token_server.address, token=WRITER) as ps:
        np.testing.assert_array_equal(ps.read("emb"), np.arange(8).reshape(4, 2))
        assert ps.info("emb").version == 1
