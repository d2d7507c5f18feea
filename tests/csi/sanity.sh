#!/usr/bin/env bash
# Runs csi-sanity, the upstream CSI conformance suite, against cloudfs-node and
# cloudfs-controller on a pool of their own: the real local Swift (tests/swift/swift.sh, started
# if it is not running) with --swift, else a local-directory pool. csi-sanity is built from its
# Go module at the pinned version and kept under target/tools. Exits 0 only when every spec
# passes. Needs root (FUSE, bind mounts) and Go.
#
#   tests/csi/sanity.sh [--swift] [-- <extra csi-sanity flags, e.g. -ginkgo.focus=Node>]
#   tests/csi/sanity.sh --build-only   # only build csi-sanity if it is missing
set -euo pipefail
cd "$(dirname "$0")/../.."
CSI_SANITY_VERSION=v5.6.0
swift=0
build_only=0
extra=()
while (($#)); do
  case $1 in
    --swift) swift=1; shift ;;
    --build-only) build_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: $0 [--swift] [--build-only] [-- <csi-sanity flags>]" >&2; exit 2 ;;
  esac
done
command -v go >/dev/null 2>&1 || { echo "tests/csi/sanity.sh: Go is needed to build csi-sanity" >&2; exit 1; }
target=${CARGO_TARGET_DIR:-$PWD/target}
tools="$target/tools/csi-sanity-$CSI_SANITY_VERSION"
if [ ! -x "$tools/csi-sanity" ]; then
  echo "building csi-sanity $CSI_SANITY_VERSION"
  GOBIN="$tools" go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
fi
((build_only == 0)) || exit 0
cargo build --quiet -p cloudfs -p cloudfs-node -p cloudfs-controller
bin="$target/debug"

work=$(mktemp -d /tmp/cloudfs-sanity.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Whatever csi-sanity or a failing spec left mounted.
  { grep -F " $work/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

secrets="$work/secrets.yaml"
if ((swift)); then
  bash tests/swift/swift.sh start >/dev/null
  eval "$(bash tests/swift/swift.sh env)"
  pool="swift://csi-sanity-${work##*.}"
  # The same keys in every secret csi-sanity sends (provisioner, snapshotter, node).
  keys=$(printf '  ST_AUTH: "%s"\n  ST_USER: "%s"\n  ST_KEY: "%s"\n' "$ST_AUTH" "$ST_USER" "$ST_KEY")
  : >"$secrets"
  for secret in CreateVolumeSecret DeleteVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
    NodePublishVolumeSecret CreateSnapshotSecret DeleteSnapshotSecret ListSnapshotsSecret \
    ControllerExpandVolumeSecret; do
    printf '%s:\n%s\n' "$secret" "$keys" >>"$secrets"
  done
else
  mkdir -p "$work/pool"
  pool="file://$work/pool"
  echo "{}" >"$secrets"
fi
printf 'pool: "%s"\n' "$pool" >"$work/parameters.yaml"

"$bin/cloudfs-node" --endpoint "unix://$work/node.sock" --node-id sanity-node \
  --state-dir "$work/state" --cloudfs "$bin/cloudfs" \
  --metrics-addr "unix:$work/node-metrics.sock" 2>"$work/node.log" &
pids+=($!)
"$bin/cloudfs-controller" --endpoint "unix://$work/controller.sock" --pool "$pool" \
  --metrics-addr "unix:$work/controller-metrics.sock" 2>"$work/controller.log" &
pids+=($!)
for _ in $(seq 100); do
  [ -S "$work/node.sock" ] && [ -S "$work/controller.sock" ] && break
  sleep 0.1
done

status=0
"$tools/csi-sanity" \
  --csi.endpoint "$work/node.sock" \
  --csi.controllerendpoint "$work/controller.sock" \
  --csi.mountdir "$work/target" \
  --csi.stagingdir "$work/staging" \
  --csi.testvolumeparameters "$work/parameters.yaml" \
  --csi.secrets "$secrets" \
  --csi.testvolumesize 1073741824 \
  -ginkgo.no-color \
  "${extra[@]}" || status=$?
# The calls csi-sanity made are counted on each plugin's /metrics.
for check in node:NodePublishVolume controller:CreateVolume; do
  plugin=${check%%:*} method=${check#*:}
  if ! curl -sf --unix-socket "$work/$plugin-metrics.sock" http://localhost/metrics |
    grep -q "^cloudfs_csi_requests_total{.*method=\"$method\"}"; then
    echo "sanity.sh: the /metrics of cloudfs-$plugin does not count its $method calls" >&2
    status=1
  fi
done
if ((status)); then
  echo "--- cloudfs-node log (tail)"; tail -n 30 "$work/node.log"
  echo "--- cloudfs-controller log (tail)"; tail -n 30 "$work/controller.log"
fi
exit "$status"
