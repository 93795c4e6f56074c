#!/usr/bin/env bash
# Regenerates the committed protocol code from protos/tensorps/v1/tensorps.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
"$python" -m grpc_tools.protoc -Iprotos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/tensorps/v1/tensorps.proto
