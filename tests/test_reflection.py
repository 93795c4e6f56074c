"""gRPC server reflection: a generic client (grpcio-reflection's descriptor database, as grpcurl uses the
protocol) learns the whole service from a real server with tokens on, without a token and without the
.proto; --no-reflection (or TENSORPS_NO_REFLECTION) turns it off."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from support import ServerProcess
from tensorps.client import Client
from tensorps.client.errors import UnauthenticatedError
from tensorps.v1 import tensorps_pb2 as pb

TOKEN = "reflection-test-token"


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"{TOKEN}\n")
    with ServerProcess("--token-file", str(path)) as server:
        yield server


def test_reflection_describes_the_service_without_a_token(token_server: ServerProcess) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert services == {
            "tensorps.v1.ParameterServer",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = descriptor_pool.DescriptorPool(database)
        served = pool.FindServiceByName("tensorps.v1.ParameterServer")
        ours = pb.DESCRIPTOR.services_by_name["ParameterServer"]
        assert [m.name for m in served.methods] == [m.name for m in ours.methods]
        for method in served.methods:
            mine = ours.methods_by_name[method.name]
            assert method.input_type.full_name == mine.input_type.full_name
            assert method.output_type.full_name == mine.output_type.full_name
            assert (method.client_streaming, method.server_streaming) == (
                mine.client_streaming,
                mine.server_streaming,
            )
        # Every message as the .proto declares it: field names, numbers and types (TensorFlow's TensorProto).
        for name in pb.DESCRIPTOR.message_types_by_name:
            served_message = pool.FindMessageTypeByName(f"tensorps.v1.{name}")
            mine_message = pb.DESCRIPTOR.message_types_by_name[name]
            assert [(f.name, f.number, f.type) for f in served_message.fields] == [
                (f.name, f.number, f.type) for f in mine_message.fields
            ]
        tensor = pool.FindMessageTypeByName("tensorps.v1.TensorProto")
        assert tensor.fields_by_name["half_val"].number == 13
        # Health is open too; the parameter server itself is not.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(token_server.address, timeout=10) as ps, pytest.raises(UnauthenticatedError):
        ps.list()
    with Client(token_server.address, token=TOKEN, timeout=10) as ps:
        assert ps.list() == []


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_reflection_can_be_switched_off(how: str) -> None:
    args, env = (("--no-reflection",), None) if how == "flag" else ((), {"TENSORPS_NO_REFLECTION": "1"})
    with ServerProcess(*args, env=env) as server, grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        with pytest.raises(grpc.RpcError) as caught:
            database.get_services()
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None, None)
        with pytest.raises(grpc.RpcError) as caught:
            list(v1(iter([b""]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with Client(server.address, timeout=10) as ps:
            assert ps.list() == []  # the parameter server itself serves as always


def test_reflection_v1_answers_the_same(token_server: ServerProcess) -> None:
    """grpc.reflection.v1 (the same messages in another package), for tools that ask it first."""
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(token_server.address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="tensorps.v1.ParameterServer"),
        ]
        listing, files = list(call(iter(requests), timeout=10))
    names = {service.name for service in listing.list_services_response.service}
    assert "tensorps.v1.ParameterServer" in names
    (served,) = files.file_descriptor_response.file_descriptor_proto
    assert served == pb.DESCRIPTOR.serialized_pb
