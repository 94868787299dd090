#!/usr/bin/env bash
# Regenerates the Python modules beside the .proto sources in proto/.
# The .proto files are containerd 1.6's api/types/mount.proto and
# api/services/snapshots/v1/snapshots.proto with the gogoproto options removed
# (Go code-generation hints only; field numbers, names and types are unchanged,
# so the wire format is containerd's).
#   usage: scripts/gen-proto.sh [OUTDIR]   (default: proto/, i.e. in place)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-proto}
protos=$(cd proto && find crfs_proto -name '*.proto' | sort)
python3 -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" $protos
