#!/usr/bin/env bash
# The test command: sets up what is missing, checks the generated protobuf
# code is fresh, and runs the whole suite with the real containerd, registry
# and FUSE. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
scripts/check-proto.sh
# pytest exits 5 when it collects no tests: that is a failure here too
exec python -m pytest -p no:cacheprovider "$@"
