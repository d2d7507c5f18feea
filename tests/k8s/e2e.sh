#!/usr/bin/env bash
# The operator's end-to-end tests on a real control plane: starts the local Swift
# (tests/swift/swift.sh) unless one runs, builds (cached under target/tools) and starts
# kube-apiserver + etcd (tests/k8s/cluster.sh), runs the operator_e2e tests of
# controller/tests/operator.rs against both, and stops what it started. Exits 0 only when all
# pass. Needs root (FUSE mounts) and Go.
set -euo pipefail
cd "$(dirname "$0")/../.."

started_swift=0
if ! bash tests/swift/swift.sh status >/dev/null 2>&1; then
  bash tests/swift/swift.sh start
  started_swift=1
fi
cleanup() {
  bash tests/k8s/cluster.sh stop >/dev/null 2>&1 || true
  if ((started_swift)); then bash tests/swift/swift.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
eval "$(bash tests/swift/swift.sh env)"
bash tests/k8s/cluster.sh start
eval "$(bash tests/k8s/cluster.sh env)"

cargo build --quiet -p cloudfs
cargo test -p cloudfs-controller --test operator -- operator_e2e
