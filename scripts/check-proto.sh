#!/usr/bin/env bash
# Fails when the committed generated protobuf modules differ from what
# scripts/gen-proto.sh produces now.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
scripts/gen-proto.sh "$tmp"
stale=0
while IFS= read -r f; do
  if ! cmp -s "$tmp/$f" "proto/$f"; then echo "stale generated file: proto/$f (run scripts/gen-proto.sh)"; stale=1; fi
done < <(cd "$tmp" && find . -type f -name '*_pb2*' | sed 's#^\./##' | sort)
exit $stale
