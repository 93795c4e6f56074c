"""Client of the naive baseline server (naive_server.py): plain generated-protobuf calls."""

from __future__ import annotations

import re
import sys

import grpc

from bench.backends.base import Array, Server, Target
from bench.backends.naive_server import OPTIONS, SERVICE, from_proto, to_proto
from bench.backends.process import ServerProcess
from tensorps.v1 import tensorps_pb2 as pb

LABEL = "naive gRPC"
_READY = re.compile(r"naive ready: serving on (\S+)")


def start() -> Server:
    process = ServerProcess([sys.executable, "-m", "bench.backends.naive_server"], _READY)
    assert process.match is not None
    return Server(LABEL, Target("naive", process.match.group(1)), process)


class NaiveEndpoint:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self._assign = self.channel.unary_unary(
            f"/{SERVICE}/Assign",
            request_serializer=pb.AssignRequest.SerializeToString,
            response_deserializer=pb.AssignResponse.FromString,
        )
        self._read = self.channel.unary_unary(
            f"/{SERVICE}/Read",
            request_serializer=pb.ReadRequest.SerializeToString,
            response_deserializer=pb.ReadResponse.FromString,
        )

    def put(self, name: str, value: Array) -> None:
        self.assign(name, value, read_value=False)

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        request = pb.AssignRequest(name=name, read_value=read_value, value=to_proto(value))
        response: pb.AssignResponse = self._assign(request, timeout=300)
        return from_proto(response.value) if read_value else None

    def read(self, name: str) -> Array:
        response: pb.ReadResponse = self._read(pb.ReadRequest(name=name), timeout=300)
        return from_proto(response.value)

    def close(self) -> None:
        self.channel.close()
