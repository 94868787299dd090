#!/usr/bin/env bash
# containerd + crfs for an unprivileged user, the way containerd's rootless
# guide sets it up: RootlessKit creates the user, mount and network
# namespaces; crfs and containerd are started inside them with nsenter.
# Run it as the user (never as root). docs/rootless.md has the details.
#
#   scripts/rootless.sh check            what is missing, and how to fix it
#   scripts/rootless.sh start            rootlesskit, then crfs, then containerd
#   scripts/rootless.sh status           exit 0 when all three are running
#   scripts/rootless.sh stop             everything in the namespaces, cleanly
#   scripts/rootless.sh nsenter CMD...   run CMD inside (ctr, crfs rpull, ...),
#                                        with CONTAINERD_ADDRESS set
#   scripts/rootless.sh run-rootlesskit|run-crfs|run-containerd
#                                        one part in the foreground (systemd units)
#   scripts/rootless.sh rootlesskit-child   (internal: the namespaces' holder)
#
# Environment:
#   CRFS_ROOTLESS_NET   slirp4netns (default when installed) or host
#   CRFS                crfs command (default: crfs on PATH)
#   CONTAINERD          containerd command (default: containerd on PATH)
#   CRFS_ROOTLESS_LOG_LEVEL   crfs's --log-level (default info)
#   CRFS_ROOTLESSKIT_FLAGS    extra rootlesskit flags (e.g. --disable-host-loopback)
set -euo pipefail

SELF="$(readlink -f "$0")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
TEMPLATE="$REPO/config/containerd-rootless-config.toml"

die() { echo "rootless.sh: $*" >&2; exit 1; }

if [ "$(id -u)" = 0 ] && [ "${1:-}" != rootlesskit-child ]; then
  die "run this as the unprivileged user, not as root (e.g. runuser -u USER -- $0 ${1:-start})"
fi

USER_NAME="$(id -un)"
USER_ID="$(id -u)"
: "${XDG_RUNTIME_DIR:=}"
: "${XDG_DATA_HOME:=$HOME/.local/share}"
: "${XDG_CONFIG_HOME:=$HOME/.config}"
CRFS="${CRFS:-crfs}"
CONTAINERD="${CONTAINERD:-containerd}"
if [ -z "${CRFS_ROOTLESS_NET:-}" ]; then
  if command -v slirp4netns >/dev/null 2>&1; then CRFS_ROOTLESS_NET=slirp4netns; else CRFS_ROOTLESS_NET=host; fi
fi

# Paths (all under the user's own directories)
RK_STATE="$XDG_RUNTIME_DIR/containerd-crfs-rootlesskit"   # rootlesskit's --state-dir
RUN_DIR="$XDG_RUNTIME_DIR/containerd-crfs-rootless"       # our pids, logs, rendered config
CRFS_ROOT="$XDG_DATA_HOME/containerd-crfs"
CRFS_SOCK="$XDG_RUNTIME_DIR/containerd-crfs/containerd-crfs-grpc.sock"
CRFS_CONFIG="$XDG_CONFIG_HOME/containerd-crfs/config.toml"
CTRD_SOCK="$XDG_RUNTIME_DIR/containerd/containerd.sock"
CTRD_CONFIG="$RUN_DIR/containerd.toml"
LAZYFS_STATE="$XDG_RUNTIME_DIR/crfs/lazyfs"

# --- checks: each failure says what is missing and how to fix it ---------------------

problems=()
problem() { problems+=("$*"); }

check_runtime_dir() {
  if [ -z "$XDG_RUNTIME_DIR" ]; then
    problem "XDG_RUNTIME_DIR is not set. Fix: log in through systemd-logind (it creates /run/user/$USER_ID), or as root: mkdir -m 700 /run/user/$USER_ID && chown $USER_NAME: /run/user/$USER_ID; then export XDG_RUNTIME_DIR=/run/user/$USER_ID"
  elif [ ! -d "$XDG_RUNTIME_DIR" ] || [ ! -O "$XDG_RUNTIME_DIR" ] || [ ! -w "$XDG_RUNTIME_DIR" ]; then
    problem "XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR is not a directory owned and writable by $USER_NAME. Fix (as root): mkdir -p -m 700 $XDG_RUNTIME_DIR && chown $USER_NAME: $XDG_RUNTIME_DIR"
  fi
}

check_fuse() {
  if [ ! -c /dev/fuse ]; then
    problem "/dev/fuse does not exist: FUSE (lazy layers, fuse-overlayfs) cannot work. Fix (as root): modprobe fuse"
  elif [ ! -r /dev/fuse ] || [ ! -w /dev/fuse ]; then
    problem "/dev/fuse is not readable and writable by $USER_NAME ($(stat -c '%A %U:%G' /dev/fuse)): FUSE mounts would fail. Fix (as root): chmod 0666 /dev/fuse (the mode every ordinary distribution gives it; make it last with a udev rule: KERNEL==\"fuse\", MODE=\"0666\")"
  fi
}

# /etc/subuid and /etc/subgid lines are NAME:START:COUNT or UID:START:COUNT
subid_range() {  # FILE -> "START COUNT" of the first range of this user
  [ -r "$1" ] || return 1
  awk -F: -v n="$USER_NAME" -v u="$USER_ID" '($1==n || $1==u) && $3>0 {print $2, $3; exit}' "$1" | grep .
}

check_subids() {
  local f kind
  for f in /etc/subuid /etc/subgid; do
    kind=$([ "$f" = /etc/subuid ] && echo uid || echo gid)
    if ! subid_range "$f" >/dev/null; then
      problem "$USER_NAME has no subordinate ${kind} range in $f: the namespace could map only one $kind, and image files owned by other ${kind}s could not be created. Fix (as root): usermod --add-sub${kind}s 100000-165535 $USER_NAME (any free range of 65536 ids)"
    fi
  done
  for f in newuidmap newgidmap; do
    command -v "$f" >/dev/null 2>&1 || problem "$f is missing (it maps the subordinate ids). Fix (as root): apt-get install uidmap"
  done
}

check_userns() {
  local v
  if [ -r /proc/sys/kernel/unprivileged_userns_clone ]; then
    v=$(cat /proc/sys/kernel/unprivileged_userns_clone)
    if [ "$v" = 0 ]; then
      problem "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0). Fix (as root): sysctl -w kernel.unprivileged_userns_clone=1 (and in /etc/sysctl.d/ to keep it)"
      return
    fi
  fi
  if [ -r /proc/sys/user/max_user_namespaces ]; then
    v=$(cat /proc/sys/user/max_user_namespaces)
    if [ "$v" = 0 ]; then
      problem "user namespaces are disabled (user.max_user_namespaces = 0). Fix (as root): sysctl -w user.max_user_namespaces=28633 (and in /etc/sysctl.d/ to keep it)"
      return
    fi
  fi
  if ! unshare --user --map-root-user true 2>/dev/null; then
    problem "$USER_NAME cannot create a user namespace (unshare --user --map-root-user true fails: $(unshare --user --map-root-user true 2>&1 | head -1)). Look for an AppArmor/SELinux policy restricting unprivileged user namespaces (e.g. Ubuntu's kernel.apparmor_restrict_unprivileged_userns=1) or a seccomp filter of the session"
  fi
}

check_binaries() {
  local b
  for b in rootlesskit "$CRFS" "$CONTAINERD" ctr runc fuse-overlayfs nsenter fusermount3; do
    command -v "$b" >/dev/null 2>&1 || problem "$b not found on PATH. Fix (as root): apt-get install rootlesskit containerd runc fuse-overlayfs fuse3 util-linux; crfs: pip install it (scripts/setup.sh) and put it on PATH or set CRFS=/path/to/crfs"
  done
  if [ "$CRFS_ROOTLESS_NET" = slirp4netns ] && ! command -v slirp4netns >/dev/null 2>&1; then
    problem "CRFS_ROOTLESS_NET=slirp4netns but slirp4netns is not installed. Fix (as root): apt-get install slirp4netns, or use CRFS_ROOTLESS_NET=host"
  fi
  case "$CRFS_ROOTLESS_NET" in slirp4netns|host) ;; *) problem "CRFS_ROOTLESS_NET must be slirp4netns or host, not $CRFS_ROOTLESS_NET";; esac
  # slirp4netns needs a tap device in the new network namespace
  if [ "$CRFS_ROOTLESS_NET" = slirp4netns ] && { [ ! -r /dev/net/tun ] || [ ! -w /dev/net/tun ]; }; then
    problem "/dev/net/tun is not readable and writable by $USER_NAME ($(stat -c '%A %U:%G' /dev/net/tun 2>/dev/null || echo missing)): slirp4netns cannot create its tap device. Fix (as root): chmod 0666 /dev/net/tun (its usual mode), or use CRFS_ROOTLESS_NET=host"
  fi
  [ -r "$TEMPLATE" ] || problem "the containerd config template $TEMPLATE is not readable"
}

preflight() {
  problems=()
  check_runtime_dir
  check_fuse
  check_subids
  check_userns
  check_binaries
  if [ ${#problems[@]} -gt 0 ]; then
    local p
    for p in "${problems[@]}"; do echo "rootless.sh: $p" >&2; done
    return 1
  fi
}

# --- pids ------------------------------------------------------------------------------

pid_of() { cat "$RUN_DIR/$1.pid" 2>/dev/null || true; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

child_pid() { cat "$RK_STATE/child_pid" 2>/dev/null || true; }

# nsenter flags: with --net=host the child shares the host's network
# namespace, which belongs to the initial user namespace: entering it would
# need CAP_SYS_ADMIN there, and there is no need to.
enter() {  # enter CMD...: run CMD in the namespaces of rootlesskit's child
  local child; child=$(child_pid)
  alive "$child" || die "not running (no rootlesskit child): start it first with $0 start"
  local net=(-n)
  [ "$(cat "$RUN_DIR/net" 2>/dev/null)" = host ] && net=()
  exec nsenter -U --preserve-credentials -m "${net[@]}" -t "$child" -- "$@"
}

wait_for() {  # wait_for SECONDS WHAT PID CMD...: until CMD succeeds, PID alive
  local timeout=$1 what=$2 pid=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$pid" ] && ! alive "$pid"; then
      return 1
    fi
    [ $SECONDS -lt $deadline ] || { echo "rootless.sh: $what: timed out after ${timeout}s" >&2; return 1; }
    sleep 0.2
  done
}

socket_up() { [ -S "$1" ] && python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "$1"; }

# --- start -----------------------------------------------------------------------------

render_config() {
  sed -e "s|@XDG_RUNTIME_DIR@|$XDG_RUNTIME_DIR|g" -e "s|@XDG_DATA_HOME@|$XDG_DATA_HOME|g" "$TEMPLATE" >"$CTRD_CONFIG.tmp"
  if [ "$CRFS_SOCK" != "$XDG_RUNTIME_DIR/containerd-crfs/containerd-crfs-grpc.sock" ]; then
    die "internal: crfs socket path mismatch"
  fi
  mv "$CTRD_CONFIG.tmp" "$CTRD_CONFIG"
}

fail_start() {
  echo "rootless.sh: $1; log tail ($2):" >&2
  tail -n 30 "$2" >&2 2>/dev/null || true
  do_stop >/dev/null 2>&1 || true
  exit 1
}

# The three run-* commands run one part in the foreground (exec): `start`
# runs them in the background, the systemd user units run them as services.

run_rootlesskit() {
  preflight || exit 1
  umask 077
  mkdir -p "$RUN_DIR" "$CRFS_ROOT" "$XDG_DATA_HOME/containerd" "$(dirname "$CRFS_SOCK")" "$(dirname "$CTRD_SOCK")" "$LAZYFS_STATE"
  chmod 700 "$RUN_DIR" "$CRFS_ROOT" "$XDG_DATA_HOME/containerd"
  rm -rf "$RK_STATE"
  echo "$CRFS_ROOTLESS_NET" >"$RUN_DIR/net"
  local net_flags=(--net=host)
  if [ "$CRFS_ROOTLESS_NET" = slirp4netns ]; then
    # The host's 127.0.0.1 stays reachable as 10.0.2.2 (no
    # --disable-host-loopback): a registry on the host's loopback is what a
    # developer has. Pass --disable-host-loopback in CRFS_ROOTLESSKIT_FLAGS to cut it.
    net_flags=(--net=slirp4netns --mtu=65520 --slirp4netns-sandbox=auto --slirp4netns-seccomp=auto)
  fi
  # shellcheck disable=SC2086 # CRFS_ROOTLESSKIT_FLAGS: extra flags, split on spaces
  exec rootlesskit --state-dir="$RK_STATE" "${net_flags[@]}" \
    --copy-up=/etc --copy-up=/run --propagation=rslave ${CRFS_ROOTLESSKIT_FLAGS:-} \
    "$SELF" rootlesskit-child
}

wait_child() {
  wait_for 30 "rootlesskit's namespaces ($RK_STATE/child_pid)" "" test -s "$RK_STATE/child_pid" \
    || die "rootlesskit is not running (no $RK_STATE/child_pid): start it first"
}

run_crfs() {
  wait_child
  local crfs_args=(serve --root "$CRFS_ROOT" --address "$CRFS_SOCK" --log-level "${CRFS_ROOTLESS_LOG_LEVEL:-info}")
  [ -r "$CRFS_CONFIG" ] && crfs_args+=(--config "$CRFS_CONFIG")
  rm -f "$CRFS_SOCK"
  # The daemons get the usual 022: crfs and containerd set the modes they
  # need, and their roots are 0700, so nothing is reachable by other users.
  umask 022
  export CRFS_LAZYFS_STATE="$LAZYFS_STATE"
  enter "$(command -v "$CRFS")" "${crfs_args[@]}"
}

run_containerd() {
  wait_child
  wait_for 60 "crfs serving on $CRFS_SOCK" "" socket_up "$CRFS_SOCK" || die "crfs is not serving on $CRFS_SOCK"
  render_config
  rm -f "$CTRD_SOCK"
  umask 022
  enter "$(command -v "$CONTAINERD")" --config "$CTRD_CONFIG"
}

do_start() {
  preflight || exit 1
  if alive "$(pid_of rootlesskit)"; then
    die "already running (rootlesskit pid $(pid_of rootlesskit)); $0 stop first"
  fi
  mkdir -p -m 700 "$RUN_DIR"
  rm -f "$RUN_DIR"/*.pid "$RUN_DIR/userns"
  # The child holds the namespaces until stop; rootlesskit forwards SIGTERM to it.
  setsid "$SELF" run-rootlesskit </dev/null >"$RUN_DIR/rootlesskit.log" 2>&1 &
  echo $! >"$RUN_DIR/rootlesskit.pid"
  wait_for 30 "rootlesskit's namespaces" "$(pid_of rootlesskit)" test -s "$RK_STATE/child_pid" \
    || fail_start "rootlesskit did not start" "$RUN_DIR/rootlesskit.log"
  readlink "/proc/$(child_pid)/ns/user" >"$RUN_DIR/userns"

  setsid "$SELF" run-crfs </dev/null >"$RUN_DIR/crfs.log" 2>&1 &
  echo $! >"$RUN_DIR/crfs.pid"
  wait_for 60 "crfs serving on $CRFS_SOCK" "$(pid_of crfs)" socket_up "$CRFS_SOCK" \
    || fail_start "crfs did not start" "$RUN_DIR/crfs.log"

  setsid "$SELF" run-containerd </dev/null >"$RUN_DIR/containerd.log" 2>&1 &
  echo $! >"$RUN_DIR/containerd.pid"
  wait_for 60 "containerd serving on $CTRD_SOCK" "$(pid_of containerd)" \
      "$SELF" nsenter ctr --address "$CTRD_SOCK" version \
    || fail_start "containerd did not start" "$RUN_DIR/containerd.log"
  echo "rootless.sh: running (net=$CRFS_ROOTLESS_NET): crfs $CRFS_SOCK, containerd $CTRD_SOCK"
  echo "rootless.sh: use it with: $0 nsenter ctr images pull --snapshotter crfs REF"
}

# --- stop ------------------------------------------------------------------------------

term_and_wait() {  # PID SECONDS
  local pid=$1 deadline=$((SECONDS + $2))
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do
    if [ $SECONDS -ge $deadline ]; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; return 0; fi
    sleep 0.1
  done
}

ns_members() {  # pids of our processes in the saved user namespace
  local userns; userns=$(cat "$RUN_DIR/userns" 2>/dev/null) || return 0
  [ -n "$userns" ] || return 0
  local d pid
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [ "$(readlink "$d/ns/user" 2>/dev/null)" = "$userns" ] && echo "$pid"
  done
  return 0
}

do_stop() {
  # containerd first (it stops using crfs), then crfs (it may unmount its
  # layers), then whatever is left in the namespaces: shims, containers,
  # layer mount processes, fuse-overlayfs. When the last process of the
  # mount namespace is gone, the kernel drops its mounts.
  term_and_wait "$(pid_of containerd)" 15
  term_and_wait "$(pid_of crfs)" 15
  local pids
  pids=$(ns_members | grep -vx "$(child_pid)" || true)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
  local deadline=$((SECONDS + 5))
  while [ -n "$(ns_members | grep -vx "$(child_pid)" || true)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  term_and_wait "$(pid_of rootlesskit)" 10
  pids=$(ns_members)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  deadline=$((SECONDS + 5))
  while [ -n "$(ns_members)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if [ -n "$(ns_members)" ]; then
    echo "rootless.sh: processes still in the namespace: $(ns_members | tr '\n' ' ')" >&2
    return 1
  fi
  rm -f "$RUN_DIR"/*.pid "$RUN_DIR/userns" "$CRFS_SOCK" "$CTRD_SOCK" "$CTRD_SOCK.ttrpc"
  rm -rf "$RK_STATE"
  echo "rootless.sh: stopped"
}

do_status() {
  local rc=0 name pid
  for name in rootlesskit crfs containerd; do
    pid=$(pid_of $name)
    if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=3; fi
  done
  [ $rc = 0 ] && echo "net: $(cat "$RUN_DIR/net" 2>/dev/null); crfs: $CRFS_SOCK; containerd: $CTRD_SOCK"
  return $rc
}

# --- the child rootlesskit runs: holds the namespaces ----------------------------------

do_child() {
  # Inside: uid 0 of the new user namespace, own mount namespace with /etc
  # and /run copied up (writable tmpfs copies): runc's state
  # (/run/containerd/runc) lives there.
  # /run/containerd is a symlink to the host's (root's) directory after the
  # copy-up: replace it by the user's own, as containerd's rootless script
  # does (ctr's fifos and runc's state go there).
  rm -f /run/containerd
  mkdir -p "$XDG_RUNTIME_DIR/containerd" /run/containerd
  mount --bind "$XDG_RUNTIME_DIR/containerd" /run/containerd
  trap 'exit 0' TERM INT
  while :; do sleep 3600 & wait $! || true; done
}

case "${1:-}" in
  check)  preflight && echo "rootless.sh: ready: nothing is missing (net=$CRFS_ROOTLESS_NET)" ;;
  start)  do_start ;;
  stop)   do_stop ;;
  status) do_status ;;
  nsenter)
    shift
    [ $# -gt 0 ] || die "usage: $0 nsenter CMD [ARGS...]"
    export CONTAINERD_ADDRESS="$CTRD_SOCK" CRFS_LAZYFS_STATE="${CRFS_LAZYFS_STATE:-$LAZYFS_STATE}"
    enter "$@" ;;
  run-rootlesskit) run_rootlesskit ;;
  run-crfs) run_crfs ;;
  run-containerd) run_containerd ;;
  rootlesskit-child) do_child ;;
  *) echo "usage: $0 check|start|stop|status|nsenter CMD..." >&2; exit 2 ;;
esac
