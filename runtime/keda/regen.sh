#!/bin/sh
# Regenerates externalscaler_pb2.py and externalscaler_pb2_grpc.py from externalscaler.proto
# (needs grpcio-tools: pip install grpcio-tools). The generated gRPC module imports its messages as a
# top-level module; rewrite that to a relative import so it works as thaw.runtime.keda.externalscaler_pb2.
set -eu
cd "$(dirname "$0")"
python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. externalscaler.proto
sed -i 's/^import externalscaler_pb2 as /from . import externalscaler_pb2 as /' externalscaler_pb2_grpc.py
