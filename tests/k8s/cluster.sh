#!/usr/bin/env bash
# Test control plane for the operator tests: a real kube-apiserver backed by a real etcd, both
# on 127.0.0.1, with no kubelet, scheduler or controller-manager. The two binaries are built
# from their Go modules at the versions pinned below and cached under target/tools/; a change
# of pin rebuilds them. `start` writes a kubeconfig (own CA, bearer token of an admin in
# system:masters) into the state dir.
#
#   tests/k8s/cluster.sh build    # build kube-apiserver and etcd if the pinned ones are missing
#   tests/k8s/cluster.sh start    # build if needed, start etcd + kube-apiserver, wait for /readyz
#   tests/k8s/cluster.sh status   # say whether it runs, and where
#   tests/k8s/cluster.sh env      # print `export KUBECONFIG=...`, for: eval "$(... env)"
#   tests/k8s/cluster.sh stop     # stop both and remove the state dir
#
# Settings (environment):
#   KUBE_STATE_DIR                 state dir (default /var/tmp/cloudfs-kube)
#   CLOUDFS_KUBE_VERSION           k8s.io/kubernetes version to build kube-apiserver from
#   CLOUDFS_ETCD_VERSION           go.etcd.io/etcd/server/v3 version to build etcd from
#   CLOUDFS_TOOLS_DIR              where binaries are cached (default <repo>/target/tools)
#   CLOUDFS_KUBE_START_TIMEOUT     seconds to wait for /readyz (default 90)
#   CLOUDFS_KUBE_DISABLE_ADMISSION admission plugins to turn off (default below)
#   CLOUDFS_KEEP_GOCACHE=1         keep the Go build cache after a successful build
#
# With no controller-manager, nothing acts on stored objects: no pod runs, a deleted namespace
# stays Terminating, ownerReferences are not garbage-collected, Deployments make no ReplicaSets.
# Tests should use their own namespaces with unique names rather than delete and reuse them.
#
# Builds run at the lowest CPU priority, one package at a time, so they can share a small
# machine with other work. The Kubernetes minor must stay one that the k8s-openapi crate used
# by the operator has a feature for (v1.37 -> feature v1_37).
set -euo pipefail

CLOUDFS_KUBE_VERSION="${CLOUDFS_KUBE_VERSION:-v1.37.2}"
CLOUDFS_ETCD_VERSION="${CLOUDFS_ETCD_VERSION:-v3.7.3}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
TOOLS_DIR="${CLOUDFS_TOOLS_DIR:-$REPO_ROOT/target/tools}"
STATE_DIR="${KUBE_STATE_DIR:-/var/tmp/cloudfs-kube}"
START_TIMEOUT="${CLOUDFS_KUBE_START_TIMEOUT:-90}"
# Without a controller-manager nobody creates the "default" service account of a namespace
# nor removes the pvc/pv protection finalizers, so those two plugins would only get in the way.
DISABLE_ADMISSION="${CLOUDFS_KUBE_DISABLE_ADMISSION:-ServiceAccount,StorageObjectInUseProtection}"
SERVICE_CIDR="10.0.0.0/24"
MIN_BUILD_FREE_GIB=4

APISERVER_BIN="$TOOLS_DIR/kube-apiserver-$CLOUDFS_KUBE_VERSION"
ETCD_BIN="$TOOLS_DIR/etcd-$CLOUDFS_ETCD_VERSION"
STATE_MARKER=".cloudfs-kube-state"

log() { printf '[kube] %s\n' "$*" >&2; }
die() { printf '[kube] error: %s\n' "$*" >&2; exit 1; }

usage() {
  echo "usage:" >&2
  sed -n 's|^#   \(tests/k8s/cluster\.sh .*\)|  \1|p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# helpers

ensure_debian_pkgs() {
  local missing=() cmd
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing ${missing[*]}; install them (needs root)"
    sudo=(sudo)
  fi
  log "installing ${missing[*]} with apt-get"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

free_gib() { # free space, in GiB, of the file system holding $1 (or its nearest existing parent)
  local p="$1"
  while [ ! -e "$p" ]; do p="$(dirname "$p")"; done
  df -Pk "$p" | awk 'NR==2 { printf "%d", $4 / 1048576 }'
}

dir_size() { du -sh "$1" 2>/dev/null | cut -f1; }

# Runs a go command at the lowest CPU (and I/O) priority.
go_low() {
  local prio=(nice -n 19)
  command -v ionice >/dev/null 2>&1 && prio+=(ionice -c 3)
  "${prio[@]}" go "$@"
}

# go_low, with its chatter (one line per module fetched) kept in a file and shown on failure.
go_quiet() {
  local out rc=0
  out="$(mktemp "${TMPDIR:-/tmp}/cloudfs-go.XXXXXX")"
  go_low "$@" >"$out" 2>&1 || rc=$?
  ((rc == 0)) || { tail -n 40 "$out" >&2; log "failed: go $*"; }
  rm -f "$out"
  return "$rc"
}

# A pid counts as ours while it lives, is no zombie and runs the expected program.
pid_alive() {
  local pid="$1" name="$2" state argv0
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ "$state" != "Z" ] || return 1
  argv0="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1)" || return 1
  [[ "$(basename -- "$argv0")" == "$name"* ]]
}

read_pid() { if [ -f "$1" ]; then cat "$1" 2>/dev/null || true; fi; }

# Picks a port on 127.0.0.1 that nothing listens on, below the usual ephemeral range.
pick_port() {
  local exclude=" $* " port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + RANDOM % 12000))
    [[ "$exclude" == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "found no free port on 127.0.0.1"
}

# ---------------------------------------------------------------------------------------------
# build

build_lock() {
  mkdir -p "$TOOLS_DIR"
  exec 8>"$TOOLS_DIR/.build.lock"
  # A concurrent build of the same binaries is waited for, up to an hour.
  flock -w 3600 8 || die "timed out waiting for another build in $TOOLS_DIR"
}

check_build_space() {
  local free
  free="$(free_gib "$TOOLS_DIR")"
  ((free >= MIN_BUILD_FREE_GIB)) ||
    die "only ${free} GiB free under $TOOLS_DIR; the build needs about ${MIN_BUILD_FREE_GIB} GiB"
  free="$(free_gib "$(go env GOMODCACHE)")"
  ((free >= 2)) || die "only ${free} GiB free for the Go module cache ($(go env GOMODCACHE))"
}

# Environment for the go commands of a build: a private build cache, a throwaway module.
go_build_env() {
  export GOCACHE="$TOOLS_DIR/.go-build-cache"
  export GOWORK=off
  export CGO_ENABLED=0
  export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=1"
}

build_etcd() {
  local out="$ETCD_BIN" work start
  [ -x "$out" ] && return 0
  start=$SECONDS
  log "building etcd $CLOUDFS_ETCD_VERSION (go.etcd.io/etcd/server/v3) -> $out"
  work="$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-etcd-build.XXXXXX")"
  BUILD_LEFTOVERS+=("$work" "$out.partial")
  # The etcd module carries replace directives, which `go install mod@version` refuses; as a
  # dependency of a throwaway module its own go.mod requirements are used instead.
  (
    cd "$work"
    go mod init cloudfs.test/etcd-build 2>/dev/null
    go_quiet get "go.etcd.io/etcd/server/v3@$CLOUDFS_ETCD_VERSION"
    go_low build -p 1 -mod=mod -trimpath -ldflags "-s -w" -o "$out.partial" go.etcd.io/etcd/server/v3
  )
  rm -rf "$work"
  mv -f "$out.partial" "$out"
  log "built $(basename "$out") in $((SECONDS - start)) s ($(dir_size "$out"))"
}

build_apiserver() {
  local out="$APISERVER_BIN" work start gomod staging_version major minor
  [ -x "$out" ] && return 0
  [[ "$CLOUDFS_KUBE_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] ||
    die "CLOUDFS_KUBE_VERSION must look like v1.MINOR.PATCH, got $CLOUDFS_KUBE_VERSION"
  major=1
  minor="${BASH_REMATCH[1]}"
  # The staging repos (k8s.io/api, k8s.io/apiserver, ...) are tagged v0.MINOR.PATCH.
  staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  start=$SECONDS
  log "building kube-apiserver $CLOUDFS_KUBE_VERSION (staging $staging_version) -> $out"
  work="$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-apiserver-build.XXXXXX")"
  BUILD_LEFTOVERS+=("$work" "$out.partial")
  (
    cd "$work"
    go mod init cloudfs.test/apiserver-build 2>/dev/null
    # k8s.io/kubernetes points every staging repo at a directory of its own tree; the throwaway
    # module points each of them at the published module of the matching version instead.
    gomod="$(go_low mod download -json "k8s.io/kubernetes@$CLOUDFS_KUBE_VERSION" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [ -f "$gomod" ] || { echo "no go.mod found for k8s.io/kubernetes@$CLOUDFS_KUBE_VERSION" >&2; exit 1; }
    local replaces=() repo
    while read -r repo; do
      replaces+=("-replace=$repo=$repo@$staging_version")
    done < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")
    ((${#replaces[@]})) || { echo "no staging replace lines in $gomod" >&2; exit 1; }
    go mod edit "${replaces[@]}"
    go_quiet get "k8s.io/kubernetes/cmd/kube-apiserver@$CLOUDFS_KUBE_VERSION"
    local ldflags="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$CLOUDFS_KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean"
    done
    go_low build -p 1 -mod=mod -trimpath -ldflags "$ldflags" -o "$out.partial" \
      k8s.io/kubernetes/cmd/kube-apiserver
  )
  rm -rf "$work"
  mv -f "$out.partial" "$out"
  log "built $(basename "$out") in $((SECONDS - start)) s ($(dir_size "$out"))"
}

cmd_build() {
  if [ -x "$APISERVER_BIN" ] && [ -x "$ETCD_BIN" ]; then
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "go is not on PATH; the binaries are built from Go modules"
  build_lock
  # Checked again under the lock: a concurrent run may have built them meanwhile.
  if [ -x "$APISERVER_BIN" ] && [ -x "$ETCD_BIN" ]; then
    exec 8>&-
    return 0
  fi
  check_build_space
  local start=$SECONDS
  (
    BUILD_LEFTOVERS=()
    # shellcheck disable=SC2154 # rc is set inside the trap
    trap 'rc=$?; rm -rf "${BUILD_LEFTOVERS[@]}"; ((rc == 0)) || log "build failed (exit $rc)"' EXIT
    go_build_env
    build_etcd
    build_apiserver
    if [ "${CLOUDFS_KEEP_GOCACHE:-0}" != 1 ] && [ -d "$GOCACHE" ]; then
      log "Go build cache took $(dir_size "$GOCACHE"); removing it (CLOUDFS_KEEP_GOCACHE=1 keeps it)"
      go clean -cache >/dev/null 2>&1 || true
      rm -rf "$GOCACHE"
    fi
  )
  exec 8>&-
  log "build done in $((SECONDS - start)) s"
  # Binaries of other pins are left alone, since another checkout may still use them.
}

# ---------------------------------------------------------------------------------------------
# start / stop

etcd_pid() { read_pid "$STATE_DIR/etcd.pid"; }
apiserver_pid() { read_pid "$STATE_DIR/kube-apiserver.pid"; }

state_value() { # KEY -> value from cluster.env
  sed -n "s/^$1=//p" "$STATE_DIR/cluster.env" 2>/dev/null | head -n1
}

readyz_ok() {
  local port token
  port="$(state_value API_PORT)"
  token="$(state_value TOKEN)"
  [ -n "$port" ] && [ -n "$token" ] || return 1
  [ "$(curl -sS --max-time 5 --cacert "$STATE_DIR/pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$port/readyz" 2>/dev/null)" = "ok" ]
}

is_running() {
  pid_alive "$(etcd_pid)" etcd && pid_alive "$(apiserver_pid)" kube-apiserver
}

# Sends SIGTERM, waits up to $3 seconds, then SIGKILL.
stop_pid() {
  local pid="$1" name="$2" wait_s="$3" i
  pid_alive "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do
    pid_alive "$pid" "$name" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for ${wait_s} s; killing it"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_alive "$pid" "$name" || return 0
    sleep 0.1
  done
  die "$name (pid $pid) did not exit"
}

stop_processes() {
  stop_pid "$(apiserver_pid)" kube-apiserver 20
  stop_pid "$(etcd_pid)" etcd 20
}

remove_state() {
  [ -e "$STATE_DIR" ] || return 0
  # Only a directory this script made is removed, whatever KUBE_STATE_DIR says.
  [ -f "$STATE_DIR/$STATE_MARKER" ] ||
    die "$STATE_DIR exists but was not made by this script; not removing it"
  rm -rf "$STATE_DIR"
}

state_lock() {
  mkdir -p "$(dirname "$STATE_DIR")"
  exec 9>"$STATE_DIR.lock"
  flock -w 300 9 || die "timed out waiting for another start/stop on $STATE_DIR"
}

gen_pki() {
  local pki="$STATE_DIR/pki"
  mkdir -p "$pki"
  chmod 700 "$pki"
  cat >"$pki/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = cloudfs-test
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  # Serving chain: a CA of its own, and a cert for 127.0.0.1/localhost signed by it.
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/ca.key" 2>/dev/null
  openssl req -x509 -new -config "$pki/openssl.cnf" -extensions ca -key "$pki/ca.key" \
    -subj "/CN=cloudfs-test-ca" -days 3650 -out "$pki/ca.crt"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/apiserver.key" 2>/dev/null
  openssl req -new -config "$pki/openssl.cnf" -key "$pki/apiserver.key" \
    -subj "/CN=kube-apiserver" -out "$pki/apiserver.csr"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$pki/openssl.cnf" \
    -extensions server -out "$pki/apiserver.crt" 2>/dev/null
  # Service-account token signing pair.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
}

wait_for() { # DESCRIPTION TIMEOUT_S PID NAME LOG -- COMMAND...
  local what="$1" timeout_s="$2" pid="$3" name="$4" logf="$5"
  shift 6
  local deadline=$((SECONDS + timeout_s))
  until "$@"; do
    if ! pid_alive "$pid" "$name"; then
      log "$name exited while waiting for $what; last lines of $logf:"
      tail -n 30 "$logf" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "no $what after ${timeout_s} s; last lines of $logf:"
      tail -n 30 "$logf" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

etcd_healthy() {
  curl -sS --max-time 3 "http://127.0.0.1:$1/health" 2>/dev/null | grep -q '"health":"true"'
}

# Starts a program detached from this shell (own session, no stdin), logging to a file.
spawn() { # PIDFILE LOGFILE -- COMMAND...
  local pidf="$1" logf="$2"
  shift 3
  if command -v setsid >/dev/null 2>&1; then
    nohup setsid "$@" >"$logf" 2>&1 </dev/null 8>&- 9>&- &
  else
    nohup "$@" >"$logf" 2>&1 </dev/null 8>&- 9>&- &
  fi
  echo $! >"$pidf"
}

write_kubeconfig() {
  local port="$1" token="$2" ca_data
  ca_data="$(base64 -w0 <"$STATE_DIR/pki/ca.crt")"
  cat >"$STATE_DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: cloudfs-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca_data
users:
- name: cloudfs-admin
  user:
    token: $token
contexts:
- name: cloudfs-test
  context:
    cluster: cloudfs-test
    user: cloudfs-admin
    namespace: default
current-context: cloudfs-test
EOF
  chmod 600 "$STATE_DIR/kubeconfig"
}

cmd_start() {
  ensure_debian_pkgs openssl curl
  cmd_build
  state_lock
  if is_running; then
    if readyz_ok; then
      log "already running: https://127.0.0.1:$(state_value API_PORT) (KUBECONFIG=$STATE_DIR/kubeconfig)"
      return 0
    fi
    log "processes run but /readyz does not answer ok; restarting"
  fi
  # Anything left over (a half-started or crashed cluster) is cleared first.
  if [ -e "$STATE_DIR" ]; then
    stop_processes
    remove_state
  fi

  mkdir -p "$STATE_DIR"
  chmod 700 "$STATE_DIR"
  : >"$STATE_DIR/$STATE_MARKER"
  gen_pki

  local token etcd_port peer_port api_port
  token="$(openssl rand -hex 32)"
  printf '%s,cloudfs-admin,cloudfs-admin,"system:masters"\n' "$token" >"$STATE_DIR/tokens.csv"
  chmod 600 "$STATE_DIR/tokens.csv"
  etcd_port="$(pick_port)"
  peer_port="$(pick_port "$etcd_port")"
  api_port="$(pick_port "$etcd_port" "$peer_port")"
  cat >"$STATE_DIR/cluster.env" <<EOF
API_PORT=$api_port
ETCD_PORT=$etcd_port
TOKEN=$token
KUBE_VERSION=$CLOUDFS_KUBE_VERSION
ETCD_VERSION=$CLOUDFS_ETCD_VERSION
EOF
  chmod 600 "$STATE_DIR/cluster.env"

  # etcd reads any ETCD_* variable as a flag, so none of the caller's are passed on.
  local unset_etcd=() var
  while read -r var; do unset_etcd+=(-u "$var"); done < <(compgen -e | grep '^ETCD_' || true)
  log "starting etcd $CLOUDFS_ETCD_VERSION on 127.0.0.1:$etcd_port"
  spawn "$STATE_DIR/etcd.pid" "$STATE_DIR/etcd.log" -- env "${unset_etcd[@]}" "$ETCD_BIN" \
    --name=cloudfs-test \
    --data-dir="$STATE_DIR/etcd-data" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="cloudfs-test=http://127.0.0.1:$peer_port" \
    --initial-cluster-state=new \
    --unsafe-no-fsync \
    --log-level=warn
  wait_for "etcd health" 30 "$(etcd_pid)" etcd "$STATE_DIR/etcd.log" -- etcd_healthy "$etcd_port" || {
    stop_processes
    die "etcd did not start; state left in $STATE_DIR"
  }

  log "starting kube-apiserver $CLOUDFS_KUBE_VERSION on 127.0.0.1:$api_port"
  spawn "$STATE_DIR/kube-apiserver.pid" "$STATE_DIR/kube-apiserver.log" -- "$APISERVER_BIN" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --tls-cert-file="$STATE_DIR/pki/apiserver.crt" \
    --tls-private-key-file="$STATE_DIR/pki/apiserver.key" \
    --cert-dir="$STATE_DIR/pki" \
    --token-auth-file="$STATE_DIR/tokens.csv" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$STATE_DIR/pki/sa.pub" \
    --service-account-signing-key-file="$STATE_DIR/pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --endpoint-reconciler-type=none \
    --disable-admission-plugins="$DISABLE_ADMISSION" \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  wait_for "/readyz ok" "$START_TIMEOUT" "$(apiserver_pid)" kube-apiserver \
    "$STATE_DIR/kube-apiserver.log" -- readyz_ok || {
    stop_processes
    die "kube-apiserver did not become ready; state left in $STATE_DIR"
  }

  write_kubeconfig "$api_port" "$token"
  log "ready: https://127.0.0.1:$api_port"
  log "use it with: eval \"\$($0 env)\""
}

cmd_stop() {
  state_lock
  if [ ! -e "$STATE_DIR" ]; then
    log "not running (no $STATE_DIR)"
    return 0
  fi
  stop_processes
  remove_state
  log "stopped; removed $STATE_DIR"
}

cmd_status() {
  if is_running && readyz_ok; then
    echo "running: https://127.0.0.1:$(state_value API_PORT) (etcd 127.0.0.1:$(state_value ETCD_PORT))"
    echo "kubeconfig: $STATE_DIR/kubeconfig"
    return 0
  fi
  echo "not running"
  return 1
}

cmd_env() {
  [ -f "$STATE_DIR/kubeconfig" ] || die "no kubeconfig in $STATE_DIR; run: $0 start"
  printf 'export KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) usage ;;
esac
