#!/usr/bin/env bash
# A real, local, one-replica OpenStack Swift for cloudfs tests (Debian's packages, no systemd,
# no docker, 127.0.0.1 only).
#
#   tests/swift/swift.sh start          install packages if missing, configure, start, wait until ready
#   tests/swift/swift.sh stop [--purge] stop the servers; --purge also deletes the state directory
#   tests/swift/swift.sh status         one line; exit 0 only if the proxy answers GET /info
#   tests/swift/swift.sh env            shell exports for tests: eval "$(tests/swift/swift.sh env)"
#
# Everything lives in one state directory (SWIFT_STATE_DIR, default /var/tmp/cloudfs-swift):
#   etc/   swift.conf, {proxy,account,container,object}-server.conf, rings and builders
#   srv/d1 the one storage device (a directory, or a mount point: see "Storage" below)
#   run/   pid files          log/  one log file per server (stderr of the server)
#   bin/   swift-server.py: runs a server like /usr/bin/swift-*-server but with swift.conf from etc/
#   disk.img  the XFS image, when storage is "xfs"
# Nothing in /etc/swift is used (the packages' swift.conf there has hash "changeme"), so several
# state directories can coexist on different ports. memcached is started too (own port): tempauth
# keeps its tokens there and refuses to work without it.
#
# Settings (environment; a later `start` reuses what the state directory was started with unless
# the variable is set again): SWIFT_PORT (proxy, 8880; account, container, object and memcached
# use the next four ports unless SWIFT_ACCOUNT_PORT, SWIFT_CONTAINER_PORT, SWIFT_OBJECT_PORT,
# SWIFT_MEMCACHE_PORT say otherwise), SWIFT_TOKEN_LIFE (tempauth token lifetime in seconds,
# 86400), SWIFT_WORKERS (proxy and object server worker processes, 1), SWIFT_LOG_LEVEL (INFO),
# SWIFT_UPDATERS (1 = also run the container and object updaters, which keep account-level
# object/byte counts current; default 0), SWIFT_STORAGE (auto|dir|xfs|tmpfs, see below),
# SWIFT_DISK_SIZE (size of the sparse XFS image, 32G), SWIFT_TMPFS_SIZE (4G),
# SWIFT_START_TIMEOUT (seconds to wait for readiness, 60).
#
# Storage: Swift keeps object metadata in user.* extended attributes (a pickle cut into 254-byte
# xattrs; up to ~8 KiB with the maximum 4 KiB of user metadata). `auto` probes the state
# directory's file system by writing 32 such xattrs:
#   dir    if the probe passes, objects are stored in a plain directory;
#   xfs    else (ext4 with 4 KiB blocks fails: it holds only ~3.5 KiB of xattrs per inode, so
#          objects with a few KiB of metadata would fail with 503/ENOSPC; that is the case for
#          /var/tmp on the project's machines) a sparse XFS image file
#          ($STATE/disk.img) is mounted through a loop device on srv/d1. XFS is what Swift is
#          deployed on and has no practical xattr limit; the image persists across stop/start
#          and reboots (it is unmounted by `stop` and mounted again by `start`) and is mounted
#          with `discard`, so deleted objects give their space back to the host. Needs root,
#          loop devices and xfsprogs (installed on demand);
#   tmpfs  else, if tmpfs supports user xattrs (Linux >= 6.6), a tmpfs is mounted on srv/d1
#          (no loop device needed; RAM-backed; kept mounted by `stop` so data survives a
#          restart, unmounted by `stop --purge`, lost on reboot);
#   dir    as a last resort, with a warning (large object metadata will fail).
# The choice is recorded in the state directory and reused by later starts.
set -euo pipefail

STATE=${SWIFT_STATE_DIR:-/var/tmp/cloudfs-swift}
case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac
STATE=${STATE%/}
ETC=$STATE/etc
RUN=$STATE/run
LOGS=$STATE/log
DEV=$STATE/srv/d1
PY=/usr/bin/python3
PACKAGES=(swift swift-proxy swift-account swift-container swift-object python3-swiftclient memcached curl)

say() { printf 'swift.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ---- settings ---------------------------------------------------------------------------------
load_settings() {
  local saved=$STATE/settings.env
  SAVED_PORT='' SAVED_ACCOUNT_PORT='' SAVED_CONTAINER_PORT='' SAVED_OBJECT_PORT=''
  SAVED_MEMCACHE_PORT='' SAVED_TOKEN_LIFE='' SAVED_WORKERS='' SAVED_LOG_LEVEL='' SAVED_UPDATERS=''
  # shellcheck disable=SC1090
  [ -f "$saved" ] && . "$saved"
  PORT=${SWIFT_PORT:-${SAVED_PORT:-8880}}
  ACCOUNT_PORT=${SWIFT_ACCOUNT_PORT:-${SAVED_ACCOUNT_PORT:-$((PORT + 1))}}
  CONTAINER_PORT=${SWIFT_CONTAINER_PORT:-${SAVED_CONTAINER_PORT:-$((PORT + 2))}}
  OBJECT_PORT=${SWIFT_OBJECT_PORT:-${SAVED_OBJECT_PORT:-$((PORT + 3))}}
  MEMCACHE_PORT=${SWIFT_MEMCACHE_PORT:-${SAVED_MEMCACHE_PORT:-$((PORT + 4))}}
  TOKEN_LIFE=${SWIFT_TOKEN_LIFE:-${SAVED_TOKEN_LIFE:-86400}}
  WORKERS=${SWIFT_WORKERS:-${SAVED_WORKERS:-1}}
  LOG_LEVEL=${SWIFT_LOG_LEVEL:-${SAVED_LOG_LEVEL:-INFO}}
  UPDATERS=${SWIFT_UPDATERS:-${SAVED_UPDATERS:-0}}
  local v
  for v in PORT ACCOUNT_PORT CONTAINER_PORT OBJECT_PORT MEMCACHE_PORT TOKEN_LIFE WORKERS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
  done
  AUTH_URL=http://127.0.0.1:$PORT/auth/v1.0
}

save_settings() {
  cat >"$STATE/settings.env.tmp" <<EOF
SAVED_PORT=$PORT
SAVED_ACCOUNT_PORT=$ACCOUNT_PORT
SAVED_CONTAINER_PORT=$CONTAINER_PORT
SAVED_OBJECT_PORT=$OBJECT_PORT
SAVED_MEMCACHE_PORT=$MEMCACHE_PORT
SAVED_TOKEN_LIFE=$TOKEN_LIFE
SAVED_WORKERS=$WORKERS
SAVED_LOG_LEVEL=$LOG_LEVEL
SAVED_UPDATERS=$UPDATERS
EOF
  mv "$STATE/settings.env.tmp" "$STATE/settings.env"
}

servers() {
  echo memcached account container object
  [ "$UPDATERS" = 1 ] && echo container-updater object-updater
  echo proxy
}

# ---- processes --------------------------------------------------------------------------------
# Every process started here carries CLOUDFS_SWIFT_STATE=$STATE in its environment; a pid file
# only counts if that process is alive and carries it (so a recycled pid is never signalled).
pid_of() {
  local f=$RUN/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  grep -qzxF "CLOUDFS_SWIFT_STATE=$STATE" "/proc/$pid/environ" 2>/dev/null || return 1
  echo "$pid"
}

alive() { # pid: running and not a zombie waiting to be reaped
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

group_alive() { # pgid: does any live process remain in the group?
  ps -eo pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^[ZX]/ {f = 1} END {exit !f}'
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

http_code() { curl -s -o /dev/null -m 5 -w '%{http_code}' "$@" 2>/dev/null || true; }

proxy_up() { [ "$(http_code "http://127.0.0.1:$PORT/info")" = 200 ]; }

log_tail() {
  local f=$LOGS/$1.log
  if [ -s "$f" ]; then
    say "last lines of $f:"
    tail -n "${2:-25}" "$f" | sed 's/^/    /' >&2
  else
    say "($f is empty)"
  fi
}

launch() { # name port command...
  local name=$1 port=$2 pid
  shift 2
  if pid=$(pid_of "$name"); then return 0; fi
  if [ "$port" != - ] && port_busy "$port"; then
    say "error: cannot start $name: 127.0.0.1:$port is already in use by another process"
    stop_all
    release_storage
    exit 1
  fi
  # Verbose servers log every request: a log is cut back to its last 8 MiB when it restarts.
  if [ "$(stat -c %s "$LOGS/$name.log" 2>/dev/null || echo 0)" -gt $((64 << 20)) ]; then
    tail -c $((8 << 20)) "$LOGS/$name.log" >"$LOGS/$name.log.tmp" && mv "$LOGS/$name.log.tmp" "$LOGS/$name.log"
  fi
  printf '\n==== %s starting %s\n' "$(date '+%F %T')" "$name" >>"$LOGS/$name.log"
  # setsid: each server leads its own process group, so `stop` reaches its worker processes too.
  CLOUDFS_SWIFT_STATE=$STATE CLOUDFS_SWIFT_ETC=$ETC setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&- &
  echo $! >"$RUN/$name.pid"
}

start_server() {
  local name=$1
  case $name in
    memcached)
      local user_opt=()
      [ "$(id -u)" = 0 ] && user_opt=(-u root)
      launch memcached "$MEMCACHE_PORT" memcached -l 127.0.0.1 -p "$MEMCACHE_PORT" -U 0 -m 64 -c 1024 "${user_opt[@]}" ;;
    proxy) launch proxy "$PORT" "$PY" "$STATE/bin/swift-server.py" proxy "$ETC/proxy-server.conf" -v ;;
    account) launch account "$ACCOUNT_PORT" "$PY" "$STATE/bin/swift-server.py" account "$ETC/account-server.conf" -v ;;
    container) launch container "$CONTAINER_PORT" "$PY" "$STATE/bin/swift-server.py" container "$ETC/container-server.conf" -v ;;
    object) launch object "$OBJECT_PORT" "$PY" "$STATE/bin/swift-server.py" object "$ETC/object-server.conf" -v ;;
    container-updater) launch "$name" - "$PY" "$STATE/bin/swift-server.py" "$name" "$ETC/container-server.conf" -v ;;
    object-updater) launch "$name" - "$PY" "$STATE/bin/swift-server.py" "$name" "$ETC/object-server.conf" -v ;;
  esac
}

server_port() {
  case $1 in
    memcached) echo "$MEMCACHE_PORT" ;; proxy) echo "$PORT" ;; account) echo "$ACCOUNT_PORT" ;;
    container) echo "$CONTAINER_PORT" ;; object) echo "$OBJECT_PORT" ;; *) echo - ;;
  esac
}

# Ready = the process is alive and (for the WSGI servers) GET /healthcheck answers 200,
# (for memcached) the port accepts connections.
server_ready() {
  local name=$1 port
  port=$(server_port "$name")
  case $name in
    memcached) port_busy "$port" ;;
    *-updater) return 0 ;;
    *) [ "$(http_code "http://127.0.0.1:$port/healthcheck")" = 200 ] ;;
  esac
}

stop_server() { # name; TERM its process group, wait up to 10 s, then KILL
  local name=$1 pid i
  if ! pid=$(pid_of "$name"); then rm -f "$RUN/$name.pid"; return 0; fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || group_alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid" || group_alive "$pid"; then
    say "$name (process group $pid) did not stop within 10 s; killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$RUN/$name.pid"
}

stop_all() {
  local name
  for name in proxy object-updater container-updater object container account memcached; do
    stop_server "$name"
  done
}

# ---- installation -----------------------------------------------------------------------------
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

install_packages() { # packages...
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" = 0 ] || die "missing Debian packages (${missing[*]}); run as root or install them: apt-get install ${missing[*]}"
  say "installing ${missing[*]} (apt-get)"
  # Keep the packages' init scripts from starting the system-wide daemons (swift-*, memcached,
  # rsyslog) during installation: without systemd, invoke-rc.d honours policy-rc.d.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0 out=$LOGS/apt.log
  {
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${APT_UPDATED:-}" ]; then
      timeout 300 apt-get update -qq -o DPkg::Lock::Timeout=120 && APT_UPDATED=1
    fi &&
      timeout 600 apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "${missing[@]}"
  } >>"$out" 2>&1 || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  if [ "$rc" != 0 ]; then
    tail -n 20 "$out" | sed 's/^/    /' >&2
    die "apt-get failed (exit $rc) installing ${missing[*]}; full output in $out"
  fi
}

# ---- storage ----------------------------------------------------------------------------------
xattr_ok() { # dir: can it hold Swift-sized metadata (32 user.* xattrs of 254 bytes, ~8 KiB)?
  local py=$PY
  [ -x "$py" ] || py=python3
  "$py" - "$1" 2>/dev/null <<'EOF'
import os, sys, tempfile
fd, path = tempfile.mkstemp(dir=sys.argv[1], prefix='.xattr-probe-')
ok = False
try:
    for i in range(32):
        os.setxattr(fd, 'user.swift.metadata%s' % (i or ''), b'x' * 254)
    ok = len(os.getxattr(fd, 'user.swift.metadata31')) == 254
except OSError:
    pass
finally:
    os.close(fd)
    os.unlink(path)
sys.exit(0 if ok else 1)
EOF
}

try_xfs() {
  [ "$(id -u)" = 0 ] || return 1
  [ -e /dev/loop-control ] || ls /dev/loop[0-9]* >/dev/null 2>&1 || return 1
  grep -qw xfs /proc/filesystems || modprobe xfs 2>/dev/null || return 1
  install_packages xfsprogs
  local img=$STATE/disk.img
  truncate -s "${SWIFT_DISK_SIZE:-32G}" "$img" || return 1
  mkfs.xfs -q -f "$img" >>"$LOGS/storage.log" 2>&1 || { rm -f "$img"; return 1; }
  if mount -o loop,noatime,discard "$img" "$DEV" >>"$LOGS/storage.log" 2>&1; then
    if xattr_ok "$DEV"; then return 0; fi
    umount "$DEV" || true
  fi
  rm -f "$img"
  return 1
}

try_tmpfs() {
  [ "$(id -u)" = 0 ] || return 1
  mount -t tmpfs -o "size=${SWIFT_TMPFS_SIZE:-4G},mode=0755" cloudfs-swift "$DEV" >>"$LOGS/storage.log" 2>&1 || return 1
  if xattr_ok "$DEV"; then return 0; fi
  umount "$DEV" || true
  return 1
}

setup_storage() {
  mkdir -p "$DEV"
  local mode=''
  [ -f "$STATE/storage.mode" ] && mode=$(cat "$STATE/storage.mode")
  if [ -z "$mode" ]; then
    local want=${SWIFT_STORAGE:-auto}
    case $want in
      auto)
        if xattr_ok "$DEV"; then mode=dir
        elif try_xfs; then mode=xfs
        elif try_tmpfs; then mode=tmpfs
        else
          mode=dir
          say "warning: $DEV cannot hold large xattrs and neither an XFS loop image nor tmpfs worked;"
          say "warning: objects with more than ~3 KiB of metadata may fail with 507/ENOSPC"
        fi ;;
      dir) mode=dir ;;
      xfs) try_xfs || die "SWIFT_STORAGE=xfs: could not create/mount an XFS loop image (see $LOGS/storage.log)"; mode=xfs ;;
      tmpfs) try_tmpfs || die "SWIFT_STORAGE=tmpfs: could not mount a tmpfs with user xattrs (see $LOGS/storage.log)"; mode=tmpfs ;;
      *) die "SWIFT_STORAGE must be auto, dir, xfs or tmpfs (got '$want')" ;;
    esac
    echo "$mode" >"$STATE/storage.mode"
    say "storage: $(storage_desc "$mode")"
    return 0
  fi
  case $mode in
    xfs)
      if ! mountpoint -q "$DEV"; then
        [ -f "$STATE/disk.img" ] || die "$STATE/disk.img is missing (storage mode xfs); use 'stop --purge' to start over"
        install_packages xfsprogs
        mount -o loop,noatime,discard "$STATE/disk.img" "$DEV" >>"$LOGS/storage.log" 2>&1 ||
          die "cannot mount $STATE/disk.img on $DEV (see $LOGS/storage.log)"
      fi ;;
    tmpfs)
      mountpoint -q "$DEV" || {
        say "warning: the tmpfs on $DEV is gone (reboot?); stored objects were lost, starting empty"
        try_tmpfs || die "cannot mount a tmpfs on $DEV"
      } ;;
  esac
}

storage_desc() {
  case $1 in
    dir) echo "directory $DEV" ;;
    xfs) echo "XFS image $STATE/disk.img on loop, mounted at $DEV" ;;
    tmpfs) echo "tmpfs mounted at $DEV" ;;
    *) echo "unknown" ;;
  esac
}

release_storage() { # only the XFS image is unmounted on stop (tmpfs would lose its data)
  local mode=''
  [ -f "$STATE/storage.mode" ] && mode=$(cat "$STATE/storage.mode")
  if [ "$mode" = xfs ] && mountpoint -q "$DEV"; then
    umount "$DEV" 2>/dev/null || { sleep 1; umount "$DEV"; } || say "warning: could not unmount $DEV"
  fi
}

# ---- configuration ----------------------------------------------------------------------------
write_launcher() {
  cat >"$STATE/bin/swift-server.py.tmp" <<'EOF'
# Runs one Swift server exactly like /usr/bin/swift-<name>-server (or swift-<name>), except that
# swift.conf (hash prefix/suffix, storage policies, constraints) is read from $CLOUDFS_SWIFT_ETC
# instead of /etc/swift. Usage: swift-server.py NAME CONF_FILE [-v]
import os
import sys

import swift.common.utils as utils

if 'swift.common.constraints' in sys.modules or 'swift.common.storage_policy' in sys.modules:
    sys.exit('swift-server.py: swift.conf was read before it could be redirected')
# swift.common.utils already read the hash prefix/suffix from /etc/swift/swift.conf (if any) when
# it was imported: forget them and read ours (exits if [swift-hash] is missing). Policies and
# constraints are read later, from utils.SWIFT_CONF_FILE, when their modules are imported.
utils.SWIFT_CONF_FILE = os.path.join(os.environ['CLOUDFS_SWIFT_ETC'], 'swift.conf')
utils.HASH_PATH_PREFIX = b''
utils.HASH_PATH_SUFFIX = b''
utils.validate_configuration()

name = sys.argv.pop(1)
conf_file, options = utils.parse_options()
if name.endswith('-updater'):
    from swift.common.daemon import run_daemon
    if name == 'container-updater':
        from swift.container.updater import ContainerUpdater as klass
    else:
        from swift.obj.updater import ObjectUpdater as klass
    run_daemon(klass, conf_file, **options)
else:
    from swift.common.wsgi import run_wsgi
    if name == 'object':
        from swift.obj import server
        options['global_conf_callback'] = server.global_conf_callback
    sys.exit(run_wsgi(conf_file, name + '-server', **options))
EOF
  mv "$STATE/bin/swift-server.py.tmp" "$STATE/bin/swift-server.py"
}

write_confs() {
  local user
  user=$(id -un)
  if [ ! -f "$ETC/swift.conf" ]; then # written once: the hash prefix/suffix must never change
    local prefix suffix
    prefix=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    suffix=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    cat >"$ETC/swift.conf" <<EOF
[swift-hash]
swift_hash_path_prefix = cloudfs-$prefix
swift_hash_path_suffix = cloudfs-$suffix

[storage-policy:0]
name = Policy-0
default = yes

[swift-constraints]
EOF
  fi

  # Common [DEFAULT] of every server. Logging: there is no syslog daemon, so each server runs
  # with -v (log to stderr) and its stderr goes to log/NAME.log; log_address points at a path
  # that is not a socket, so Swift's syslog handler falls back to UDP 127.0.0.1:514 (ignored).
  common() { # name port
    cat <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $2
user = $user
swift_dir = $ETC
devices = $STATE/srv
mount_check = false
log_name = $1
log_level = $LOG_LEVEL
log_address = $RUN/no-syslog
recon_cache_path = $STATE/cache
EOF
  }

  {
    common proxy-server "$PORT"
    cat <<EOF
workers = $WORKERS
expose_info = true

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl tempauth copy container-quotas account-quotas slo dlo versioned_writes symlink proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
allow_account_management = true
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
reseller_prefix = AUTH
token_life = $TOKEN_LIFE
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
user_test2_tester2 = testing2 .admin
user_test_tester3 = testing3

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MEMCACHE_PORT

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:bulk]
use = egg:swift#bulk

[filter:tempurl]
use = egg:swift#tempurl

[filter:copy]
use = egg:swift#copy

[filter:container-quotas]
use = egg:swift#container_quotas

[filter:account-quotas]
use = egg:swift#account_quotas

[filter:slo]
use = egg:swift#slo
# By default Swift serves segments under 1 MiB at one per second after the tenth; a cloudfs
# TAR export has one such segment per small file. Deployments that export set this too.
rate_limit_segments_per_sec = 0

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes
allow_versioned_writes = true

[filter:symlink]
use = egg:swift#symlink
EOF
  } >"$ETC/proxy-server.conf"

  local kind port
  for kind in account container object; do
    case $kind in account) port=$ACCOUNT_PORT ;; container) port=$CONTAINER_PORT ;; object) port=$OBJECT_PORT ;; esac
    {
      common "$kind-server" "$port"
      if [ "$kind" = object ]; then echo "workers = $WORKERS"; else echo "workers = 1"; fi
      cat <<EOF

[pipeline:main]
pipeline = healthcheck $kind-server

[app:$kind-server]
use = egg:swift#$kind

[filter:healthcheck]
use = egg:swift#healthcheck

[$kind-replicator]

[$kind-auditor]
EOF
      if [ "$kind" != account ]; then
        printf '\n[%s-updater]\nlog_name = %s-updater\ninterval = 2\n' "$kind" "$kind"
      fi
    } >"$ETC/$kind-server.conf"
  done
}

build_rings() {
  # One replica, part power 8, one device ("d1", all partitions) per ring. Partitions depend only
  # on the hash and the part power, so rebuilding a ring (e.g. after a port change) finds all data.
  local kind port want have=''
  want="account=$ACCOUNT_PORT container=$CONTAINER_PORT object=$OBJECT_PORT"
  [ -f "$ETC/rings.ports" ] && have=$(cat "$ETC/rings.ports")
  if [ "$want" = "$have" ] && [ -f "$ETC/account.ring.gz" ] && [ -f "$ETC/container.ring.gz" ] && [ -f "$ETC/object.ring.gz" ]; then
    return 0
  fi
  for kind in account container object; do
    case $kind in account) port=$ACCOUNT_PORT ;; container) port=$CONTAINER_PORT ;; object) port=$OBJECT_PORT ;; esac
    rm -f "$ETC/$kind.builder" "$ETC/$kind.ring.gz"
    (
      cd "$ETC"
      swift-ring-builder "$kind.builder" create 8 1 1 &&
        swift-ring-builder "$kind.builder" add "r1z1-127.0.0.1:$port/d1" 100 &&
        swift-ring-builder "$kind.builder" rebalance
    ) >>"$LOGS/rings.log" 2>&1 || {
      # rebalance exits 1 on mere warnings; what matters is that the ring file was written
      [ -f "$ETC/$kind.ring.gz" ] || { tail -n 20 "$LOGS/rings.log" >&2; die "swift-ring-builder failed for $kind (see $LOGS/rings.log)"; }
    }
  done
  echo "$want" >"$ETC/rings.ports"
}

# ---- readiness --------------------------------------------------------------------------------
login() { # user key -> prints "token storage_url"
  local hdrs
  hdrs=$(curl -s -m 5 -D - -o /dev/null -H "X-Auth-User: $1" -H "X-Auth-Key: $2" "$AUTH_URL" 2>/dev/null) || return 1
  grep -qE '^HTTP/[0-9.]+ 20[0-9]' <<<"$hdrs" || return 1
  local tok url
  tok=$(tr -d '\r' <<<"$hdrs" | awk -F': ' 'tolower($1)=="x-auth-token" {print $2}')
  url=$(tr -d '\r' <<<"$hdrs" | awk -F': ' 'tolower($1)=="x-storage-url" {print $2}')
  [ -n "$tok" ] && [ -n "$url" ] || return 1
  echo "$tok $url"
}

fail_start() { # name reason
  say "error: $1 $2"
  log_tail "$1" 30
  say "stopping the servers started so far"
  stop_all
  release_storage
  exit 1
}

wait_ready() {
  local timeout=${SWIFT_START_TIMEOUT:-60} deadline name
  deadline=$((SECONDS + timeout))
  for name in $(servers); do
    while ! server_ready "$name"; do
      pid_of "$name" >/dev/null || fail_start "$name" "exited during startup"
      ((SECONDS < deadline)) || fail_start "$name" "did not become ready within ${timeout}s"
      sleep 0.2
    done
  done
  while ! proxy_up; do
    pid_of proxy >/dev/null || fail_start proxy "exited during startup"
    ((SECONDS < deadline)) || fail_start proxy "did not answer GET /info within ${timeout}s"
    sleep 0.2
  done
  # full stack: tempauth login (proxy + memcached), then HEAD the account (autocreate: proxy ->
  # account server) and PUT/DELETE a probe object (container and object servers and the disk).
  # A short token life (SWIFT_TOKEN_LIFE) can run out between two steps of a slow start: a 401
  # starts over with a fresh login; any other failure of a probe PUT is final.
  local creds tok url code probe
  while :; do
    if creds=$(login test:tester testing); then
      read -r tok url <<<"$creds"
      probe=$url/.cloudfs-swift-probe
      code=$(http_code -I -H "X-Auth-Token: $tok" "$url")
      if [[ $code == 2?? ]]; then
        code=$(http_code -X PUT -H "X-Auth-Token: $tok" -H 'Content-Length: 0' "$probe")
        case $code in 2?? | 401) ;; *) fail_start container "PUT of a probe container failed (HTTP $code)" ;; esac
      fi
      if [[ $code == 2?? ]]; then
        code=$(http_code -X PUT -H "X-Auth-Token: $tok" --data-binary ok "$probe/probe")
        case $code in 2?? | 401) ;; *) fail_start object "PUT of a probe object failed (HTTP $code)" ;; esac
      fi
      [[ $code == 2?? ]] && break
    fi
    ((SECONDS < deadline)) || fail_start proxy "tempauth login and probe writes did not succeed within ${timeout}s (last status ${code:-none})"
    sleep 0.3
  done
  http_code -X DELETE -H "X-Auth-Token: $tok" "$probe/probe" >/dev/null
  http_code -X DELETE -H "X-Auth-Token: $tok" "$probe" >/dev/null
}

# ---- subcommands ------------------------------------------------------------------------------
status_line() {
  local name pid parts=() mode=''
  for name in $(servers); do
    if pid=$(pid_of "$name"); then parts+=("$name=$pid"); else parts+=("$name=down"); fi
  done
  [ -f "$STATE/storage.mode" ] && mode=$(cat "$STATE/storage.mode")
  echo "swift ${1}: proxy http://127.0.0.1:$PORT (auth $AUTH_URL), ${parts[*]}, storage ${mode:-none}, token_life ${TOKEN_LIFE}s, state $STATE"
}

lock_state() {
  mkdir -p "$STATE"
  command -v flock >/dev/null || die "flock (util-linux) is required"
  exec 9>"$STATE/.lock"
  flock -w 180 9 || die "another swift.sh is busy with $STATE (lock $STATE/.lock)"
}

cmd_start() {
  local t0=$SECONDS
  lock_state
  load_settings
  local running=1 name
  for name in $(servers); do pid_of "$name" >/dev/null || running=0; done
  if [ "$running" = 1 ] && proxy_up; then
    if [ -n "${SWIFT_TOKEN_LIFE:-}" ] && [ "$SWIFT_TOKEN_LIFE" != "${SAVED_TOKEN_LIFE:-}" ]; then
      say "note: already running with token_life=${SAVED_TOKEN_LIFE}s; stop first to change it"
    fi
    status_line "already running"
    return 0
  fi
  local busy=()
  for name in $(servers); do
    if ! pid_of "$name" >/dev/null && [ "$(server_port "$name")" != - ] && port_busy "$(server_port "$name")"; then
      busy+=("$name:$(server_port "$name")")
    fi
  done
  ((${#busy[@]} == 0)) || die "port(s) already in use by other processes: ${busy[*]} (another Swift? set SWIFT_PORT to move all five ports, or stop it)"
  mkdir -p "$ETC" "$RUN" "$LOGS" "$STATE/bin" "$STATE/cache" "$STATE/srv"
  install_packages "${PACKAGES[@]}"
  touch "$STATE/.cloudfs-swift"
  setup_storage
  save_settings
  write_launcher
  write_confs
  build_rings
  for name in $(servers); do start_server "$name"; done
  wait_ready
  status_line "started in $((SECONDS - t0))s"
}

cmd_stop() {
  local purge=0
  case ${1:-} in --purge) purge=1 ;; '') ;; *) die "usage: $0 stop [--purge]" ;; esac
  if [ ! -d "$STATE" ]; then echo "swift: not running (no state dir $STATE)"; return 0; fi
  lock_state
  load_settings
  stop_all
  release_storage
  if [ "$purge" = 1 ]; then
    [ -f "$STATE/.cloudfs-swift" ] || [ -z "$(ls -A "$STATE" | grep -vx .lock)" ] ||
      die "$STATE does not look like a cloudfs-swift state dir; not deleting it"
    if mountpoint -q "$DEV"; then umount "$DEV" || die "cannot unmount $DEV"; fi
    rm -rf "$STATE"
    echo "swift: stopped, state dir $STATE deleted"
  else
    echo "swift: stopped (state kept in $STATE)"
  fi
}

cmd_status() {
  load_settings
  if proxy_up; then
    local name down=()
    for name in $(servers); do pid_of "$name" >/dev/null || down+=("$name"); done
    if ((${#down[@]})); then status_line "running (degraded: ${down[*]} down)"; else status_line running; fi
  else
    status_line "not running"
    return 1
  fi
}

cmd_env() {
  load_settings
  cat <<EOF
export ST_AUTH=$AUTH_URL
export ST_USER=test:tester
export ST_KEY=testing
export ST2_USER=test2:tester2
export ST2_KEY=testing2
export ST3_USER=test:tester3
export ST3_KEY=testing3
export SWIFT_PROXY_URL=http://127.0.0.1:$PORT
export SWIFT_STORAGE_URL=http://127.0.0.1:$PORT/v1/AUTH_test
export SWIFT_STATE_DIR=$STATE
export SWIFT_PORT=$PORT
export SWIFT_TOKEN_LIFE=$TOKEN_LIFE
EOF
  local name pid var
  for name in $(servers); do
    if pid=$(pid_of "$name"); then
      var=SWIFT_${name^^}_PID
      echo "export ${var//-/_}=$pid"
    fi
  done
}

case ${1:-} in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 {start|stop [--purge]|status|env}" >&2; exit 2 ;;
esac
