#!/usr/bin/env bash
# Regenerates the gateway's gRPC modules from services/gateway/proto/grpc_service.proto:
# grpc_service_pb2.py, grpc_service_pb2_grpc.py and their .pyi stubs (grpcio-tools and
# mypy-protobuf, the dev extra), into services/gateway/proto or the folder given.
#
# The proto is compiled as gpufaas/gateway/proto/grpc_service.proto so that the modules
# import each other by their installed names. Its messages are registered in a pool of
# their own, not protobuf's default one: Triton's clients define the same names
# (package `inference`) in the default pool, and a process may hold both.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${1:-services/gateway/proto}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkg=gpufaas/gateway/proto
mkdir -p "$tmp/in/$pkg" "$tmp/out" "$out"
cp services/gateway/proto/grpc_service.proto "$tmp/in/$pkg/"
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
PATH="$(dirname "$py"):$PATH" "$py" -m grpc_tools.protoc -I "$tmp/in" \
  --python_out="$tmp/out" --grpc_python_out="$tmp/out" \
  --mypy_out="$tmp/out" --mypy_grpc_out="$tmp/out" \
  "$tmp/in/$pkg/grpc_service.proto"
gen="$tmp/out/$pkg/grpc_service_pb2.py"
grep -q '^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(' "$gen"
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(/' "$gen"
cp "$tmp/out/$pkg"/grpc_service_pb2*.py* "$out/"
