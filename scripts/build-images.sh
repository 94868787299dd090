#!/usr/bin/env bash
# Builds the realistic test images the end-to-end tests and the hello-bench
# use, from Debian packages, into a fixed cache directory (run as root;
# setup.sh builds python, bench/hello/run.py builds gcc on first use).
#
#   python  Debian 12 minbase + python3, an OCI image layout with 3 layers:
#             1. the debootstrap --variant=minbase system (apt lists/caches removed)
#             2. python3 and its libraries (apt-get install in a chroot)
#             3. the app: /app/hello.py
#           config: Cmd ["python3", "/app/hello.py"], Env PATH and LANG.
#   gcc     the same with gcc and libc6-dev in layer 2 and /app/hello.c in
#           layer 3; Cmd compiles and runs it.
#
# Where: ${CRFS_IMAGE_CACHE:-/var/cache/crfs/images}/IMAGE/oci, tag IMAGE
# (tests/harness/pyimage.py looks there for python). Idempotent: a complete image (the
# "complete" marker, written last) is reused; --force rebuilds it. Atomic:
# built in a temp dir beside the cache entry and renamed into place.
#
#   usage: scripts/build-images.sh [--force] [python|gcc]   (default python)
set -euo pipefail

CACHE=${CRFS_IMAGE_CACHE:-/var/cache/crfs/images}
SUITE=bookworm
FORCE=0
TAG=python
for arg in "$@"; do
  case $arg in
    --force) FORCE=1 ;;
    python|gcc) TAG=$arg ;;
    *) echo "build-images.sh: unknown argument $arg (usage: [--force] [python|gcc])" >&2; exit 2 ;;
  esac
done
DEST=$CACHE/$TAG
case $TAG in
  python) PACKAGES="python3" ;;
  gcc) PACKAGES="gcc libc6-dev" ;;
esac

log() { echo "build-images: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "build-images.sh: run as root (debootstrap and chroot need it)" >&2
  exit 1
fi

complete() { [ -f "$DEST/complete" ] && [ -f "$DEST/oci/index.json" ]; }
if [ "$FORCE" = 0 ] && complete; then
  log "$TAG image already in $DEST (use --force to rebuild)"
  exit 0
fi

for tool in debootstrap umoci chroot mount umount flock; do
  command -v "$tool" >/dev/null || { echo "build-images.sh: $tool is missing (run scripts/setup.sh)" >&2; exit 1; }
done

# The Debian mirror apt already uses here, else deb.debian.org. Only enabled
# sources (*.list, *.sources); the security archive is not a mirror of bookworm.
mirror() {
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }' \
          | grep -v -e security -e '^$' | grep '/debian/\?$' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
            | awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' \
            | grep -v security | grep '/debian/\?$' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Unmounts whatever is mounted below $1 (deepest first), then deletes it,
# never crossing into another filesystem (a build killed with /dev bound
# into its chroot must not take the host's /dev with it).
remove_build_dir() {
  local dir=$1 m
  while read -r m; do umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
  if awk -v d="$dir/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    echo "build-images.sh: mounts left below $dir, not deleting it" >&2
    return 1
  fi
  rm -rf --one-file-system "$dir"
}

MIRROR=$(mirror)
mkdir -p "$CACHE"
# One build at a time; a second caller waits, then finds the image complete.
exec 9>"$CACHE/.lock"
flock 9
if [ "$FORCE" = 0 ] && complete; then
  log "$TAG image already in $DEST (built while waiting for the lock)"
  exit 0
fi
# Left by a build that was killed (we hold the lock: none is running).
for stale in "$CACHE"/.$TAG.build.* "$CACHE"/.$TAG.old.*; do
  [ -e "$stale" ] && remove_build_dir "$stale"
done
WORK=$(mktemp -d "$CACHE/.$TAG.build.XXXXXX")
ROOTFS=$WORK/bundle/rootfs
MOUNTED=()

unmount_chroot() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount -l "${MOUNTED[$i]}" 2>/dev/null || true
  done
  MOUNTED=()
}
cleanup() {
  unmount_chroot
  remove_build_dir "$WORK" || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP   # so that the EXIT trap runs on a signal too

mount_chroot() {
  mount -t proc proc "$ROOTFS/proc"; MOUNTED+=("$ROOTFS/proc")
  mount --bind /dev "$ROOTFS/dev"; MOUNTED+=("$ROOTFS/dev")
}

in_chroot() {
  chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"
}

no_mounts_below() {
  if awk -v d="$1/" 'index($2, d) == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    echo "build-images.sh: something is still mounted below $1" >&2
    exit 1
  fi
}
# What must not end up in any layer: package lists, caches, logs of the build.
clean_rootfs() {
  no_mounts_below "$ROOTFS"   # /dev is bound in during apt: never clean through it
  rm -rf --one-file-system "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
         "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/archives/partial/* "$ROOTFS"/var/cache/apt/archives/lock \
         "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old \
         "$ROOTFS"/var/log/apt/* "$ROOTFS"/var/log/dpkg.log "$ROOTFS"/var/log/alternatives.log \
         "$ROOTFS"/var/log/bootstrap.log "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache
  # The host's resolver configuration, copied by debootstrap; runtimes supply their own.
  : > "$ROOTFS/etc/resolv.conf"
  # The device nodes debootstrap made; runtimes mount their own /dev.
  find "$ROOTFS/dev" -mindepth 1 -delete
}

repack() {  # one new layer with what changed in the rootfs since the last one
  unmount_chroot
  umoci repack --refresh-bundle --image "$WORK/oci:$TAG" --history.created_by "$1" "$WORK/bundle"
}

start=$(date +%s)
log "building the $TAG image in $WORK (mirror $MIRROR)"
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:$TAG"
umoci unpack --image "$WORK/oci:$TAG" "$WORK/bundle" >/dev/null

# Layer 1: the minbase system.
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
  || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
clean_rootfs
repack "debootstrap --variant=minbase $SUITE"
log "layer 1 (minbase) done after $(( $(date +%s) - start )) s"

# Layer 2: the image's packages, installed with apt in a chroot.
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount_chroot
in_chroot apt-get update -qq
in_chroot apt-get install -y -qq --no-install-recommends $PACKAGES > "$WORK/apt.log" 2>&1 \
  || { tail -n 30 "$WORK/apt.log" >&2; exit 1; }
in_chroot apt-get clean
unmount_chroot
clean_rootfs
repack "apt-get install --no-install-recommends $PACKAGES"
log "layer 2 ($PACKAGES) done after $(( $(date +%s) - start )) s"

# Layer 3: a small app.
mkdir -p "$ROOTFS/app"
if [ "$TAG" = python ]; then
  APP=hello.py
  CMD=(python3 /app/hello.py)
  printf '%s\n' 'import platform' 'import sys' '' \
    'print(f"hello from python {platform.python_version()} on {sys.platform}")' > "$ROOTFS/app/$APP"
else
  APP=hello.c
  CMD=(sh -c 'gcc -o /tmp/hello /app/hello.c && /tmp/hello')
  printf '%s\n' '#include <stdio.h>' '' 'int main(void) {' \
    '    printf("hello from gcc %d.%d\n", __GNUC__, __GNUC_MINOR__);' '    return 0;' '}' > "$ROOTFS/app/$APP"
fi
chmod 0644 "$ROOTFS/app/$APP"
repack "COPY $APP /app/$APP"

cmd_args=()
for word in "${CMD[@]}"; do cmd_args+=(--config.cmd "$word"); done
umoci config --image "$WORK/oci:$TAG" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env LANG=C.UTF-8 \
  "${cmd_args[@]}" \
  --config.workingdir /app \
  --history.created_by "CMD ${CMD[*]}"
umoci gc --layout "$WORK/oci"

# Keep only the layout; the bundle was the build area.
no_mounts_below "$WORK"
rm -rf --one-file-system "$WORK/bundle"
secs=$(( $(date +%s) - start ))
echo "$secs" > "$WORK/build-seconds"
date -u +%Y-%m-%dT%H:%M:%SZ > "$WORK/complete"

# Atomic swap: the old entry (if any) moves aside first, then is deleted.
if [ -e "$DEST" ]; then
  old=$(mktemp -d "$CACHE/.$TAG.old.XXXXXX")
  mv "$DEST" "$old/"
  rm -rf --one-file-system "$old"
fi
chmod 0755 "$WORK"
mv "$WORK" "$DEST"
trap - EXIT
log "$TAG image ready in $DEST/oci:$TAG after $secs s"
