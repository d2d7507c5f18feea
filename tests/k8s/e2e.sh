#!/usr/bin/env bash
# The operator's and the CSI driver's end-to-end tests on a real control plane: starts the local
# Swift (tests/swift/swift.sh) unless one runs, builds (cached under target/tools) and starts
# etcd, kube-apiserver and the controller manager's volume binder (tests/k8s/cluster.sh),
# installs the VolumeSnapshot CRDs, then runs what a cluster runs beside cloudfs:
#   cloudfs-controller  the CSI controller plugin, on a Unix socket;
#   csi-provisioner     turns PVCs of a cloudfs StorageClass into CreateVolume calls and PVs;
#   snapshot-controller turns VolumeSnapshots into VolumeSnapshotContents;
#   csi-snapshotter     turns those into CreateSnapshot calls;
#   csi-resizer         turns a claim's larger request into ControllerExpandVolume calls.
# The chart (manifests/cloudfs.yaml) is applied, and the operator, the three sidecars and the
# mount-pod launcher run with its ServiceAccounts' tokens: its RBAC is what they get. Then it
# runs the operator_e2e tests of controller/tests/operator.rs against all of it (they play
# kubelet through the node plugin's library) and the mount-pod launcher's test
# (csi/tests/mount_pods.rs), and stops what it started. Logs of every
# process are in target/e2e-logs/. Exits 0 only when all pass. Needs root (FUSE) and Go.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=${CARGO_TARGET_DIR:-target}
logs=$target/e2e-logs
rm -rf "$logs"
mkdir -p "$logs"
run="$(mktemp -d "${TMPDIR:-/tmp}/cloudfs-e2e.XXXXXX")"
started_swift=0
started_cluster=0
pids=()
cleanup() {
  local rc=$? pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if ((rc != 0)); then
    for log in "$logs"/*.log; do
      printf '\n---- last lines of %s\n' "$log"
      tail -n 25 "$log"
    done
  fi
  if ((started_cluster)); then bash tests/k8s/cluster.sh stop >/dev/null 2>&1 || true; fi
  if ((started_swift)); then bash tests/swift/swift.sh stop >/dev/null 2>&1 || true; fi
  rm -rf "$run"
}
trap cleanup EXIT

if ! bash tests/swift/swift.sh status >/dev/null 2>&1; then
  bash tests/swift/swift.sh start
  started_swift=1
fi
eval "$(bash tests/swift/swift.sh env)"
if ! bash tests/k8s/cluster.sh status >/dev/null 2>&1; then
  bash tests/k8s/cluster.sh start
  started_cluster=1
fi
eval "$(bash tests/k8s/cluster.sh env)"
bash tests/k8s/cluster.sh install-crds "$CLOUDFS_SNAPSHOT_CRDS"/*.yaml

# The chart, as rendered with its defaults, applied for real: the controller side (the operator,
# csi-provisioner, csi-snapshotter) and the mount-pod launcher run below with the tokens of the
# chart's own ServiceAccounts, so a permission its RBAC lacks fails the tests.
kubectl=("$CLOUDFS_KUBECTL" --kubeconfig "$KUBECONFIG")
"${kubectl[@]}" get namespace cloudfs-system >/dev/null 2>&1 ||
  "${kubectl[@]}" create namespace cloudfs-system >/dev/null
"${kubectl[@]}" apply --server-side -f manifests/cloudfs.yaml >"$logs/chart-apply.log"
service_account_kubeconfig() { # SERVICE-ACCOUNT -> path of a kubeconfig with its token
  local token
  token="$("${kubectl[@]}" -n cloudfs-system create token "$1" --duration=3h)"
  sed "s|^    token: .*|    token: $token|" "$KUBECONFIG" >"$run/$1.kubeconfig"
  echo "$run/$1.kubeconfig"
}
CLOUDFS_OPERATOR_KUBECONFIG="$(service_account_kubeconfig cloudfs-controller)"
CLOUDFS_NODE_KUBECONFIG="$(service_account_kubeconfig cloudfs-node)"
export CLOUDFS_OPERATOR_KUBECONFIG CLOUDFS_NODE_KUBECONFIG

cargo build --quiet -p cloudfs -p cloudfs-controller

background() { # NAME COMMAND...
  local name=$1
  shift
  "$@" >"$logs/$name.log" 2>&1 </dev/null &
  pids+=($!)
}

socket=$run/csi.sock
# Volumes go to the pool each StorageClass names; this one only answers the readiness probe.
background cloudfs-controller "$target/debug/cloudfs-controller" --endpoint "unix://$socket" \
  --pool swift://cloudfs-e2e --metrics-addr "unix:$run/controller-metrics.sock"
for ((i = 0; i < 300; i++)); do
  [ -S "$socket" ] && break
  sleep 0.1
done
[ -S "$socket" ] || { echo "e2e: cloudfs-controller did not open $socket" >&2; exit 1; }

# As the chart runs them (leader election in its namespace), with its ServiceAccount.
sidecar=(--kubeconfig="$CLOUDFS_OPERATOR_KUBECONFIG" --csi-address="$socket" --leader-election
  --leader-election-namespace=cloudfs-system --extra-create-metadata --timeout=60s --v=3)
background csi-provisioner "$CLOUDFS_CSI_PROVISIONER" "${sidecar[@]}"
background csi-snapshotter "$CLOUDFS_CSI_SNAPSHOTTER" "${sidecar[@]}"
# No kubelet runs pods here, and cloudfs expands volumes in use: the resizer need not look
# for pods using a claim (the chart runs it so too).
background csi-resizer "$CLOUDFS_CSI_RESIZER" --kubeconfig="$CLOUDFS_OPERATOR_KUBECONFIG" \
  --csi-address="$socket" --leader-election --leader-election-namespace=cloudfs-system \
  --timeout=60s --handle-volume-inuse-error=false --v=3
# A cluster component, not cloudfs's: it runs as an admin.
background snapshot-controller "$CLOUDFS_SNAPSHOT_CONTROLLER" --kubeconfig="$KUBECONFIG" \
  --leader-election=false --v=3

cargo test -p cloudfs-controller --test operator -- operator_e2e
cargo test -p cloudfs-csi --test mount_pods -- mount_pod_e2e
