"""The baseline people hand-roll: a dict of numpy arrays behind grpcio, one process, plain protobuf.

It reuses tensorps.v1's messages but none of tensorps's tricks: every tensor is a `bytes` field that
protobuf copies on serialize, parse and access, and large tensors go as one unary message.
Run as `python -m bench.backends.naive_server`; it prints its port and serves until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import grpc
import numpy as np

from tensorps.v1 import tensorps_pb2 as pb

SERVICE = "benchnaive.Store"
# No message limit: a 64 MiB tensor is one message, as in the simplest hand-rolled server.
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
DTYPES: dict[int, Any] = {
    pb.DT_FLOAT: np.float32,
    pb.DT_DOUBLE: np.float64,
    pb.DT_INT32: np.int32,
    pb.DT_INT64: np.int64,
}

Array = np.ndarray[Any, Any]


def to_proto(array: Array) -> pb.TensorProto:
    code = next(code for code, dtype in DTYPES.items() if np.dtype(dtype) == array.dtype)
    proto = pb.TensorProto(dtype=code, tensor_content=array.tobytes())  # type: ignore[arg-type]
    proto.tensor_shape.dim.extend(pb.TensorShapeProto.Dim(size=d) for d in array.shape)
    return proto


def from_proto(proto: pb.TensorProto) -> Array:
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    return np.frombuffer(proto.tensor_content, DTYPES[proto.dtype]).reshape(shape)


class Store:
    def __init__(self) -> None:
        self.values: dict[str, Array] = {}

    def assign(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignResponse:
        self.values[request.name] = value = from_proto(request.value)
        response = pb.AssignResponse(info=pb.VariableInfo(name=request.name))
        if request.read_value:
            response.value.CopyFrom(to_proto(value))
        return response

    def assign_add(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.AssignResponse:
        # Read, add, store, without a lock: concurrent adds to one name may lose one (no benchmark does that).
        value = self.values.get(request.name)
        delta = from_proto(request.value)
        if value is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no variable {request.name!r}")
        if value.shape != delta.shape or value.dtype != delta.dtype:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Parameters and update must be the same size")
        self.values[request.name] = value = value + delta
        response = pb.AssignResponse(info=pb.VariableInfo(name=request.name))
        if request.read_value:
            response.value.CopyFrom(to_proto(value))
        return response

    def read(self, request: pb.ReadRequest, context: grpc.ServicerContext) -> pb.ReadResponse:
        value = self.values.get(request.name)
        if value is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no variable {request.name!r}")
        return pb.ReadResponse(info=pb.VariableInfo(name=request.name), value=to_proto(value))

    def gather(self, request: pb.AssignRequest, context: grpc.ServicerContext) -> pb.ReadResponse:
        """Rows of a table: `value` holds the indices."""
        table = self.values.get(request.name)
        if table is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no variable {request.name!r}")
        rows = np.take(table, from_proto(request.value), axis=0)
        return pb.ReadResponse(info=pb.VariableInfo(name=request.name), value=to_proto(rows))

    def scatter_add(self, request: pb.BatchOp, context: grpc.ServicerContext) -> pb.AssignResponse:
        """table[indices] += updates in place (inputs: indices, updates), without a lock."""
        table = self.values.get(request.name)
        if table is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no variable {request.name!r}")
        if not table.flags.writeable:  # a received value is a view of its message: copied once
            self.values[request.name] = table = table.copy()
        indices, updates = (from_proto(t) for t in request.inputs)
        np.add.at(table, indices, updates)
        return pb.AssignResponse(info=pb.VariableInfo(name=request.name))

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handlers = {
            "Gather": grpc.unary_unary_rpc_method_handler(
                self.gather,
                request_deserializer=pb.AssignRequest.FromString,
                response_serializer=pb.ReadResponse.SerializeToString,
            ),
            "ScatterAdd": grpc.unary_unary_rpc_method_handler(
                self.scatter_add,
                request_deserializer=pb.BatchOp.FromString,
                response_serializer=pb.AssignResponse.SerializeToString,
            ),
            "Assign": grpc.unary_unary_rpc_method_handler(
                self.assign,
                request_deserializer=pb.AssignRequest.FromString,
                response_serializer=pb.AssignResponse.SerializeToString,
            ),
            "AssignAdd": grpc.unary_unary_rpc_method_handler(
                self.assign_add,
                request_deserializer=pb.AssignRequest.FromString,
                response_serializer=pb.AssignResponse.SerializeToString,
            ),
            "Read": grpc.unary_unary_rpc_method_handler(
                self.read,
                request_deserializer=pb.ReadRequest.FromString,
                response_serializer=pb.ReadResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def main() -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The same thread count as a tensorps worker, so that neither side wins by its pool size.
    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((Store().handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"naive ready: serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
