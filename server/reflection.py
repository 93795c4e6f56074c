"""gRPC server reflection (grpc.reflection.v1alpha, grpcio-reflection), so that grpcurl, buf curl, Postman and
other generic clients discover the service, its methods and messages without the .proto file.

Reflection and health answer without a bearer token (auth.py): both describe only what is public anyway
(the protocol, whether the server serves). `--no-reflection` leaves it out (its calls: UNIMPLEMENTED).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from tensorps.v1 import tensorps_pb2

PARAMETER_SERVER = tensorps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION: str = reflection.SERVICE_NAME
# Services every caller may use without a token.
OPEN_SERVICES = (HEALTH, REFLECTION)


def enable(server: grpc.Server) -> None:
    """Serve reflection listing the parameter server, health and reflection itself (the descriptors come
    from the protobuf pool the generated tensorps_pb2 registered)."""
    reflection.enable_server_reflection((PARAMETER_SERVER, HEALTH, REFLECTION), server)
