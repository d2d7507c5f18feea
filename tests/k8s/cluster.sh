#!/usr/bin/env bash
# Test control plane for the operator and provisioning tests, on 127.0.0.1: a real etcd,
# kube-apiserver and kube-controller-manager (its persistent-volume binder and garbage collector
# only: no kubelet, no scheduler). Built from their Go modules at the versions pinned below
# (kubectl too), with the CSI sidecars the tests run beside cloudfs (csi-provisioner,
# csi-snapshotter, snapshot-controller, csi-resizer) and the VolumeSnapshot and VolumeGroupSnapshot CRDs,
# all cached under target/tools/; a change of pin rebuilds. `start` writes a kubeconfig (own
# CA, bearer token of an admin in system:masters) into the state dir.
#
#   tests/k8s/cluster.sh build    # build whatever of the pinned binaries is missing
#   tests/k8s/cluster.sh start    # build if needed, start etcd, kube-apiserver, the controller
#                                 # manager; wait for /readyz
#   tests/k8s/cluster.sh status   # say whether it runs, and where
#   tests/k8s/cluster.sh env      # print the exports tests use (KUBECONFIG, the sidecars' paths),
#                                 # for: eval "$(tests/k8s/cluster.sh env)"
#   tests/k8s/cluster.sh install-crds FILE...  # create CRDs from YAML, wait until served
#   tests/k8s/cluster.sh stop     # stop everything and remove the state dir
#
# Settings (environment):
#   KUBE_STATE_DIR                  state dir (default /var/tmp/cloudfs-kube)
#   CLOUDFS_KUBE_VERSION            k8s.io/kubernetes version (kube-apiserver, controller manager)
#   CLOUDFS_ETCD_VERSION            go.etcd.io/etcd/server/v3 version to build etcd from
#   CLOUDFS_CSI_PROVISIONER_VERSION external-provisioner version (csi-provisioner)
#   CLOUDFS_CSI_SNAPSHOTTER_VERSION external-snapshotter version (csi-snapshotter,
#                                   snapshot-controller, VolumeSnapshot CRDs)
#   CLOUDFS_CSI_RESIZER_VERSION     external-resizer version (csi-resizer)
#   CLOUDFS_TOOLS_DIR               where binaries are cached (default <repo>/target/tools)
#   CLOUDFS_KUBE_START_TIMEOUT      seconds to wait for /readyz (default 90)
#   CLOUDFS_KUBE_DISABLE_ADMISSION  admission plugins to turn off (default below)
#   CLOUDFS_KEEP_GOCACHE=1          keep the Go build cache after a successful build
#   CLOUDFS_GO_BUILD_JOBS           packages compiled at once (default 1; all cores if CI=true)
#
# Only the volume binder and the garbage collector run in the controller manager: no pod runs
# and a deleted namespace stays Terminating. Tests should use their own namespaces with unique
# names rather than delete and reuse them.
#
# Builds run at the lowest CPU priority so they can share a small machine with other work. The
# Kubernetes minor must stay one that the k8s-openapi crate used by the operator has a feature
# for (v1.37 -> feature v1_37).
set -euo pipefail

CLOUDFS_KUBE_VERSION="${CLOUDFS_KUBE_VERSION:-v1.37.2}"
CLOUDFS_ETCD_VERSION="${CLOUDFS_ETCD_VERSION:-v3.7.3}"
CLOUDFS_CSI_PROVISIONER_VERSION="${CLOUDFS_CSI_PROVISIONER_VERSION:-v6.4.0}"
CLOUDFS_CSI_SNAPSHOTTER_VERSION="${CLOUDFS_CSI_SNAPSHOTTER_VERSION:-v8.7.0}"
CLOUDFS_CSI_RESIZER_VERSION="${CLOUDFS_CSI_RESIZER_VERSION:-v1.14.0}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
TOOLS_DIR="${CLOUDFS_TOOLS_DIR:-$REPO_ROOT/target/tools}"
STATE_DIR="${KUBE_STATE_DIR:-/var/tmp/cloudfs-kube}"
START_TIMEOUT="${CLOUDFS_KUBE_START_TIMEOUT:-90}"
# With only the volume binder running, nobody creates the "default" service account of a
# namespace nor removes the pvc/pv protection finalizers, so those two plugins would only get in
# the way.
DISABLE_ADMISSION="${CLOUDFS_KUBE_DISABLE_ADMISSION:-ServiceAccount,StorageObjectInUseProtection}"
SERVICE_CIDR="10.0.0.0/24"
MIN_BUILD_FREE_GIB=4

APISERVER_BIN="$TOOLS_DIR/kube-apiserver-$CLOUDFS_KUBE_VERSION"
CONTROLLER_MANAGER_BIN="$TOOLS_DIR/kube-controller-manager-$CLOUDFS_KUBE_VERSION"
KUBECTL_BIN="$TOOLS_DIR/kubectl-$CLOUDFS_KUBE_VERSION"
ETCD_BIN="$TOOLS_DIR/etcd-$CLOUDFS_ETCD_VERSION"
PROVISIONER_BIN="$TOOLS_DIR/csi-provisioner-$CLOUDFS_CSI_PROVISIONER_VERSION"
SNAPSHOTTER_BIN="$TOOLS_DIR/csi-snapshotter-$CLOUDFS_CSI_SNAPSHOTTER_VERSION"
SNAPSHOT_CONTROLLER_BIN="$TOOLS_DIR/snapshot-controller-$CLOUDFS_CSI_SNAPSHOTTER_VERSION"
SNAPSHOT_CRDS_DIR="$TOOLS_DIR/snapshot-crds-$CLOUDFS_CSI_SNAPSHOTTER_VERSION"
RESIZER_BIN="$TOOLS_DIR/csi-resizer-$CLOUDFS_CSI_RESIZER_VERSION"
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
  # One package at a time beside other work; a CI run has the machine to itself by then.
  local jobs=1
  if [ "${CI:-}" = true ]; then jobs=$(nproc); fi
  export GOFLAGS="${GOFLAGS:+$GOFLAGS }-p=${CLOUDFS_GO_BUILD_JOBS:-$jobs}"
}

# Builds commands of Go module MODULE@VERSION into $TOOLS_DIR/<name>-VERSION, each PACKAGE given
# as name=import/path. `go install mod@version` refuses a module with replace directives, and a
# dependency's replaces are ignored, so a throwaway module requires MODULE and carries them over:
# one naming a published version as is, one naming a directory of MODULE's own tree (etcd's
# sibling modules, Kubernetes' staging repos, the snapshotter's client) as that module at
# TREE_VERSION, the version the directory is published under for this release.
build_module_commands() { # MODULE VERSION TREE_VERSION LDFLAGS PACKAGE...
  local module="$1" version="$2" tree_version="$3" ldflags="$4" work start gomod
  shift 4
  local names=() pkgs=() spec
  for spec in "$@"; do
    names+=("${spec%%=*}")
    pkgs+=("${spec#*=}")
  done
  start=$SECONDS
  log "building ${names[*]} $version ($module)"
  work="$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-go-build.XXXXXX")"
  BUILD_LEFTOVERS+=("$work")
  (
    cd "$work"
    go mod init cloudfs.test/tool-build 2>/dev/null
    gomod="$(go_low mod download -json "$module@$version" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
    [ -f "$gomod" ] || { echo "no go.mod found for $module@$version" >&2; exit 1; }
    local edits=() from to to_version
    while read -r from to to_version; do
      case $to in
        ./* | ../*) edits+=("-replace=$from=${from%@*}@$tree_version") ;;
        *) edits+=("-replace=$from=$to@$to_version") ;;
      esac
    done < <(awk '/=>/ {
        sub(/^[[:space:]]*replace[[:space:]]+/, ""); split($0, side, "=>")
        nl = split(side[1], l, " "); nr = split(side[2], r, " ")
        print l[1] (nl > 1 ? "@" l[2] : ""), r[1], (nr > 1 ? r[2] : "-")
      }' "$gomod")
    ((${#edits[@]} == 0)) || go mod edit "${edits[@]}"
    go_quiet get "$module@$version"
    mkdir bin
    go_low build -mod=mod -trimpath -ldflags "$ldflags" -o bin/ "${pkgs[@]}"
  )
  local i built
  for i in "${!names[@]}"; do
    # go names a command after its import path's last element, or the one before a /vN.
    built="${pkgs[$i]}"
    [[ "$(basename "$built")" =~ ^v[0-9]+$ ]] && built="$(dirname "$built")"
    built="$work/bin/$(basename "$built")"
    mv -f "$built" "$TOOLS_DIR/${names[$i]}-$version"
  done
  rm -rf "$work"
  log "built ${names[*]} in $((SECONDS - start)) s"
  # Each module pins its own versions of the shared dependencies, so its compiled packages are
  # of no use to the next build: dropping them keeps the disk a build needs to one module's.
  if [ "${CLOUDFS_KEEP_GOCACHE:-0}" != 1 ]; then go clean -cache >/dev/null 2>&1 || true; fi
}

build_etcd() {
  [ -x "$ETCD_BIN" ] && return 0
  build_module_commands go.etcd.io/etcd/server/v3 "$CLOUDFS_ETCD_VERSION" "$CLOUDFS_ETCD_VERSION" \
    "-s -w" etcd=go.etcd.io/etcd/server/v3
}

build_kube() {
  [ -x "$APISERVER_BIN" ] && [ -x "$CONTROLLER_MANAGER_BIN" ] && [ -x "$KUBECTL_BIN" ] && return 0
  [[ "$CLOUDFS_KUBE_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] ||
    die "CLOUDFS_KUBE_VERSION must look like v1.MINOR.PATCH, got $CLOUDFS_KUBE_VERSION"
  local minor="${BASH_REMATCH[1]}" ldflags="-s -w" pkg
  # The staging repos (k8s.io/api, k8s.io/apiserver, ...) are tagged v0.MINOR.PATCH.
  local staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$CLOUDFS_KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  local missing=() command
  for command in kube-apiserver kube-controller-manager kubectl; do
    [ -x "$TOOLS_DIR/$command-$CLOUDFS_KUBE_VERSION" ] ||
      missing+=("$command=k8s.io/kubernetes/cmd/$command")
  done
  build_module_commands k8s.io/kubernetes "$CLOUDFS_KUBE_VERSION" "$staging_version" "$ldflags" \
    "${missing[@]}"
}

build_sidecars() {
  [ -x "$PROVISIONER_BIN" ] ||
    build_module_commands github.com/kubernetes-csi/external-provisioner/v6 \
      "$CLOUDFS_CSI_PROVISIONER_VERSION" "$CLOUDFS_CSI_PROVISIONER_VERSION" "-s -w" \
      csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
  [ -x "$RESIZER_BIN" ] ||
    build_module_commands github.com/kubernetes-csi/external-resizer \
      "$CLOUDFS_CSI_RESIZER_VERSION" "$CLOUDFS_CSI_RESIZER_VERSION" "-s -w" \
      csi-resizer=github.com/kubernetes-csi/external-resizer/cmd/csi-resizer
  if [ ! -x "$SNAPSHOTTER_BIN" ] || [ ! -x "$SNAPSHOT_CONTROLLER_BIN" ]; then
    build_module_commands github.com/kubernetes-csi/external-snapshotter/v8 \
      "$CLOUDFS_CSI_SNAPSHOTTER_VERSION" "$CLOUDFS_CSI_SNAPSHOTTER_VERSION" "-s -w" \
      csi-snapshotter=github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter \
      snapshot-controller=github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
  fi
  if [ ! -d "$SNAPSHOT_CRDS_DIR" ]; then
    # The VolumeSnapshot CRDs ship in the snapshotter's client module; snapshot-controller waits
    # for the VolumeGroupSnapshot ones too.
    local client
    client="$(go_low mod download -json \
      "github.com/kubernetes-csi/external-snapshotter/client/v8@$CLOUDFS_CSI_SNAPSHOTTER_VERSION" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    [ -d "$client/config/crd" ] || die "no config/crd in the snapshotter client module ($client)"
    mkdir -p "$SNAPSHOT_CRDS_DIR.partial"
    cp "$client"/config/crd/*snapshot.storage.k8s.io_*.yaml "$SNAPSHOT_CRDS_DIR.partial/"
    mv "$SNAPSHOT_CRDS_DIR.partial" "$SNAPSHOT_CRDS_DIR"
  fi
}

all_built() {
  local bin
  for bin in "$ETCD_BIN" "$APISERVER_BIN" "$CONTROLLER_MANAGER_BIN" "$KUBECTL_BIN" "$PROVISIONER_BIN" \
    "$SNAPSHOTTER_BIN" "$SNAPSHOT_CONTROLLER_BIN" "$RESIZER_BIN"; do
    [ -x "$bin" ] || return 1
  done
  [ -d "$SNAPSHOT_CRDS_DIR" ]
}

cmd_build() {
  all_built && return 0
  command -v go >/dev/null 2>&1 || die "go is not on PATH; the binaries are built from Go modules"
  build_lock
  # Checked again under the lock: a concurrent run may have built them meanwhile.
  if all_built; then
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
    build_kube
    build_sidecars
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
controller_manager_pid() { read_pid "$STATE_DIR/kube-controller-manager.pid"; }

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
  pid_alive "$(etcd_pid)" etcd && pid_alive "$(apiserver_pid)" kube-apiserver &&
    pid_alive "$(controller_manager_pid)" kube-controller-manager
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
  stop_pid "$(controller_manager_pid)" kube-controller-manager 20
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

  # The persistent-volume binder marks a claim of a CSI StorageClass for the external
  # provisioner and binds the claim to the volume the provisioner creates; the garbage
  # collector deletes objects whose owners are gone.
  log "starting kube-controller-manager $CLOUDFS_KUBE_VERSION (volume binder, garbage collector)"
  spawn "$STATE_DIR/kube-controller-manager.pid" "$STATE_DIR/kube-controller-manager.log" -- \
    "$CONTROLLER_MANAGER_BIN" \
    --kubeconfig="$STATE_DIR/kubeconfig" \
    --controllers=persistentvolume-binder-controller,garbage-collector-controller \
    --pvclaimbinder-sync-period=2s \
    --leader-elect=false \
    --secure-port=0 \
    --v=1
  sleep 1
  pid_alive "$(controller_manager_pid)" kube-controller-manager || {
    tail -n 30 "$STATE_DIR/kube-controller-manager.log" >&2 || true
    stop_processes
    die "kube-controller-manager did not start; state left in $STATE_DIR"
  }

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
  printf 'export CLOUDFS_KUBECTL=%q\n' "$KUBECTL_BIN"
  printf 'export CLOUDFS_CSI_PROVISIONER=%q\n' "$PROVISIONER_BIN"
  printf 'export CLOUDFS_CSI_SNAPSHOTTER=%q\n' "$SNAPSHOTTER_BIN"
  printf 'export CLOUDFS_CSI_RESIZER=%q\n' "$RESIZER_BIN"
  printf 'export CLOUDFS_SNAPSHOT_CONTROLLER=%q\n' "$SNAPSHOT_CONTROLLER_BIN"
  printf 'export CLOUDFS_SNAPSHOT_CRDS=%q\n' "$SNAPSHOT_CRDS_DIR"
}

# Creates the CustomResourceDefinitions in FILEs (YAML; one that exists already is left as it is)
# and waits until the API serves them.
cmd_install_crds() {
  is_running && readyz_ok || die "not running; run: $0 start"
  local port token file code out name deadline
  port="$(state_value API_PORT)"
  token="$(state_value TOKEN)"
  out="$(mktemp "${TMPDIR:-/tmp}/cloudfs-crd.XXXXXX")"
  local api=(curl -sS --max-time 20 --cacert "$STATE_DIR/pki/ca.crt" -H "Authorization: Bearer $token")
  local crds="https://127.0.0.1:$port/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
  for file in "$@"; do
    [ -f "$file" ] || die "no such file: $file"
    code="$("${api[@]}" -o "$out" -w '%{http_code}' -X POST -H 'Content-Type: application/yaml' \
      --data-binary "@$file" "$crds")"
    case $code in
      201 | 409) ;;
      *) cat "$out" >&2; rm -f "$out"; die "creating the CRD of $file: HTTP $code" ;;
    esac
    name="$(sed -n 's/^  name: \(.*\)$/\1/p' "$file" | head -n1)"
    deadline=$((SECONDS + 30))
    until "${api[@]}" "$crds/$name" 2>/dev/null | tr -d ' \n' | grep -q '"type":"Established","status":"True"'; do
      ((SECONDS < deadline)) || { rm -f "$out"; die "CRD $name not established after 30 s"; }
      sleep 0.5
    done
    log "CRD $name established"
  done
  rm -f "$out"
}

case "${1:-}" in
  build) cmd_build ;;
  install-crds) shift; cmd_install_crds "$@" ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) usage ;;
esac
