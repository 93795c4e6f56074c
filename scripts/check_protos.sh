#!/usr/bin/env bash
# Fails if the committed generated protocol code differs from a fresh generation.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -Iprotos \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  protos/tensorps/v1/tensorps.proto
for f in tensorps_pb2.py tensorps_pb2.pyi tensorps_pb2_grpc.py; do
  if ! diff -q "$tmp/tensorps/v1/$f" "protos/tensorps/v1/$f" >/dev/null; then
    echo "protos/tensorps/v1/$f is out of date: run 'make protos' and commit the result" >&2
    exit 1
  fi
done
echo "generated protocol code is up to date"
