#!/usr/bin/env bash
# The main job: sets everything up on a fresh Debian 12 machine, then pulls
# an image from a local registry through crfs and runs a container from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python scripts/demo.py
