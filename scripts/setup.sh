#!/usr/bin/env bash
# Installs everything crfs, its tests and its demo need on a fresh Debian 12
# machine (run as root), then installs crfs itself into .venv/.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  containerd runc                 # containerd 1.6 + ctr, the OCI runtime
  fuse3 libfuse3-dev fuse-overlayfs gcc pkg-config   # pyfuse3 is built from source
  docker-registry skopeo umoci busybox-static
  golang-go golang-github-containerd-containerd-dev   # containerd's snapshotter test suite
  golang-github-containerd-stargz-snapshotter-dev     # the eStargz reference sources
  python3 python3-venv python3-dev
  iproute2 procps util-linux ca-certificates
  debootstrap                     # scripts/build-images.sh: the python test image
  uidmap rootlesskit slirp4netns  # rootless: scripts/rootless.sh, tests/test_rootless.py
)

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# containerd is started by the tests and the demo with their own roots and
# sockets; the packaged system service is not needed.
systemctl disable --now containerd >/dev/null 2>&1 || true

# --- rootless (scripts/rootless.sh, tests/test_rootless.py) -------------------
# What an ordinary distribution already has: FUSE and tap devices usable by
# every user (FUSE mounts inside a user namespace; slirp4netns). The test
# creates its own user with subordinate uid/gid ranges.
chmod 0666 /dev/fuse
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun
# --- end rootless ---------------------------------------------------------------

# crfs and its Python dependencies, isolated from the system's Python
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import snapshotter, grpc, pytest' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
# --- lazyfs: pyfuse3 with third_party/pyfuse3/zero-fh-is-inode.patch ---------
# (pinned 3.5.0 sdist, sha256-checked; lets lazyfs keep file pages and
# directory listings in the kernel without OPEN/OPENDIR round trips; lazyfs
# still works, slower, with a stock pyfuse3). A no-op when already installed.
third_party/pyfuse3/build.sh .venv/bin/python
# --- end lazyfs pyfuse3 -----------------------------------------------------------
scripts/build-images.sh   # the python test image, cached in /var/cache/crfs/images (quick when present)
echo "setup: done ($(.venv/bin/crfs --help >/dev/null && echo crfs ready))"
