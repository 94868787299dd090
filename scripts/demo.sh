#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine (as root): scripts/setup.sh
# installs everything and builds the python image (Debian minbase + python3),
# then scripts/demo.py shows what crfs is for: the image, pushed to a local
# registry and converted to eStargz with `crfs convert`, is run through
# containerd + crfs twice, side by side: an ordinary pull (`ctr images pull`)
# and a lazy one (`crfs rpull`), each with the time to the container's first
# output and the bytes the registry served by then. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python scripts/demo.py
