"""The .proto is the contract for other languages: every message, field, enum, service and RPC carries a
comment (protoc's source info, as code generators and reflection-based tools show it)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "tensorps/v1/tensorps.proto"
# FileDescriptorProto field numbers (descriptor.proto), the path elements of source locations.
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, NESTED, METHOD = 2, 3, 2


def test_every_declaration_is_commented(tmp_path: Path) -> None:
    out = tmp_path / "tensorps.desc"
    status = protoc.main(
        ["protoc", f"-I{ROOT / 'protos'}", "--include_source_info", f"--descriptor_set_out={out}", PROTO]
    )
    assert status == 0
    fileset = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (source,) = fileset.file
    commented = {
        tuple(location.path)
        for location in source.source_code_info.location
        if location.leading_comments.strip() or location.trailing_comments.strip()
    }
    missing: list[str] = []

    def message(path: tuple[int, ...], proto: descriptor_pb2.DescriptorProto) -> None:
        if path not in commented:
            missing.append(f"message {proto.name}")
        for i, field in enumerate(proto.field):
            if (*path, FIELD, i) not in commented:
                missing.append(f"field {proto.name}.{field.name}")
        for i, nested in enumerate(proto.nested_type):
            message((*path, NESTED, i), nested)

    for i, proto in enumerate(source.message_type):
        message((MESSAGE, i), proto)
    for i, enum in enumerate(source.enum_type):
        if (ENUM, i) not in commented:
            missing.append(f"enum {enum.name}")
    for i, service in enumerate(source.service):
        if (SERVICE, i) not in commented:
            missing.append(f"service {service.name}")
        for j, method in enumerate(service.method):
            if (SERVICE, i, METHOD, j) not in commented:
                missing.append(f"rpc {method.name}")
    assert not missing, missing
