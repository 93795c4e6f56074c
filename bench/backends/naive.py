"""Client of the naive baseline server (naive_server.py): plain generated-protobuf calls."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence

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
    """One call per variable, also for a model step: the service has no batch call."""

    note = ""

    def __init__(self, address: str) -> None:
        self.calls = 0
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self._assign, self._assign_add = (
            self.channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=pb.AssignRequest.SerializeToString,
                response_deserializer=pb.AssignResponse.FromString,
            )
            for method in ("Assign", "AssignAdd")
        )
        self._gather = self.channel.unary_unary(
            f"/{SERVICE}/Gather",
            request_serializer=pb.AssignRequest.SerializeToString,
            response_deserializer=pb.ReadResponse.FromString,
        )
        self._scatter = self.channel.unary_unary(
            f"/{SERVICE}/ScatterAdd",
            request_serializer=pb.BatchOp.SerializeToString,
            response_deserializer=pb.AssignResponse.FromString,
        )
        self._read = self.channel.unary_unary(
            f"/{SERVICE}/Read",
            request_serializer=pb.ReadRequest.SerializeToString,
            response_deserializer=pb.ReadResponse.FromString,
        )

    def gather(self, name: str, indices: Array) -> Array:
        request = pb.AssignRequest(name=name, value=to_proto(indices))
        response: pb.ReadResponse = self._gather(request, timeout=300)
        return from_proto(response.value)

    def scatter_add(self, name: str, indices: Array, updates: Array, *, use_locking: bool) -> None:
        """Unlocked whatever use_locking says: the baseline has no locks."""
        self._scatter(pb.BatchOp(name=name, inputs=[to_proto(indices), to_proto(updates)]), timeout=300)

    def put(self, name: str, value: Array) -> None:
        self.assign(name, value, read_value=False)

    def assign(self, name: str, value: Array, *, read_value: bool) -> Array | None:
        request = pb.AssignRequest(name=name, read_value=read_value, value=to_proto(value))
        response: pb.AssignResponse = self._assign(request, timeout=300)
        return from_proto(response.value) if read_value else None

    def read(self, name: str) -> Array:
        response: pb.ReadResponse = self._read(pb.ReadRequest(name=name), timeout=300)
        return from_proto(response.value)

    def pull(self, names: Sequence[str]) -> dict[str, Array]:
        self.calls += len(names)
        return {name: self.read(name) for name in names}

    def push(self, values: Mapping[str, Array], *, add: bool) -> None:
        self.calls += len(values)
        call = self._assign_add if add else self._assign
        for name, value in values.items():
            call(pb.AssignRequest(name=name, read_value=False, value=to_proto(value)), timeout=300)

    def batching(self, *, add: bool) -> str:
        return "Read + " + ("AssignAdd" if add else "Assign") + " per variable"

    def close(self) -> None:
        self.channel.close()
