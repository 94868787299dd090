#!/usr/bin/env bash
# Builds pyfuse3 3.5.0 with zero-fh-is-inode.patch and file-range-replies.patch
# and installs it into the given Python's environment (default: .venv/bin/python
# of the repository).
# The sdist is fetched with pip and checked against its sha256 first.
# Quick no-op when that Python's pyfuse3 already has both patches.
#
#     third_party/pyfuse3/build.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-$here/../../.venv/bin/python}"

VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
LOCAL_VERSION="$VERSION+crfs.2"

if "$python" -c 'import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, "FILE_RANGE_REPLIES", False) else 1)' 2>/dev/null; then
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$VERSION" -d "$work"
sdist="$work/pyfuse3-$VERSION.tar.gz"
echo "$SHA256  $sdist" | sha256sum -c --quiet -
tar -xzf "$sdist" -C "$work"
src="$work/pyfuse3-$VERSION"
patch -s -p1 -d "$src" < "$here/zero-fh-is-inode.patch"
patch -s -p1 -d "$src" < "$here/file-range-replies.patch"
rm -f "$src/src/pyfuse3/__init__.c"   # generated from the unpatched .pyx: regenerate
SETUPTOOLS_SCM_PRETEND_VERSION="$LOCAL_VERSION" "$python" -m pip wheel -q --no-deps "$src" -w "$work/dist"
"$python" -m pip install -q --no-deps --force-reinstall "$work"/dist/pyfuse3-*.whl
"$python" -c 'import pyfuse3; assert pyfuse3.ZERO_FH_IS_INODE; assert pyfuse3.FILE_RANGE_REPLIES; print("pyfuse3", pyfuse3.__version__, "with zero_fh_is_inode and FileRange replies")'
