#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC modules from proto/. Output mirrors the proto paths:
# proto/shapeshifter/api/v1/agent.proto -> shapeshifter/api/v1/agent_pb2.py (+ _grpc.py, .pyi).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
python="${PYTHON:-python3}"
cd "$root"
mapfile -t protos < <(find proto -name '*.proto' | sort)
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" "${protos[@]}"
for d in $(find proto -name '*.proto' -printf '%h\n' | sort -u); do
  pkg="$out/${d#proto/}"
  touch "$pkg/__init__.py"
done
