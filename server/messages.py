"""Server-side values as protocol messages."""

from __future__ import annotations

from tensorps.client import codec
from tensorps.server.ops import Info
from tensorps.v1 import tensorps_pb2 as pb


def info_to_proto(info: Info, out: pb.VariableInfo | None = None) -> pb.VariableInfo:
    proto = out if out is not None else pb.VariableInfo()
    proto.name = info.name
    proto.dtype = info.dtype.code  # type: ignore[assignment]
    codec.shape_to_proto(info.shape, proto.shape)
    proto.initialized = info.initialized
    proto.version = info.version
    return proto
