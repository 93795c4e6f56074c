"""gRPC server reflection (grpcio-reflection), so that grpcurl, buf curl, Postman and other generic clients
discover the service, its methods and messages without the .proto file.

grpcio-reflection implements grpc.reflection.v1alpha. grpc.reflection.v1 is the same protocol (the same
messages, field for field, in another package), so the same servicer answers it too: tools that ask v1
first work without falling back. Reflection and health answer without a bearer token (auth.py): both
describe only what is public anyway (the protocol, whether the server serves). `--no-reflection` leaves
both reflection services out (their calls: UNIMPLEMENTED).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tensorps.v1 import tensorps_pb2

PARAMETER_SERVER = tensorps_pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION: str = reflection.SERVICE_NAME
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# Services every caller may use without a token.
OPEN_SERVICES = (HEALTH, REFLECTION, REFLECTION_V1)


def enable(server: grpc.Server) -> None:
    """Serve reflection listing the parameter server, health and reflection itself (the descriptors come
    from the protobuf pool the generated tensorps_pb2 registered)."""
    servicer = reflection.ReflectionServicer((PARAMETER_SERVER, HEALTH, REFLECTION))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
