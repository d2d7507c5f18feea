#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs all of it:
# formatting, lints, unit tests, engine tests on the in-memory store, a real local OpenStack
# Swift (tests/swift/swift.sh) for the Swift client and store tests, real FUSE mount tests on
# the local store and again on Swift, the crash tests, csi-sanity, the Helm chart's checks
# (tests/helm/check.sh: lint, template, drift, a server-side dry run on a real control plane built
# from Go modules, then the operator's and the CSI sidecars' end-to-end tests with the chart's
# RBAC, tests/k8s/e2e.sh) and the quick-start smoke test. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# Runs a harness, keeping its output in target/<name>-output.log and its exit status in
# <name>_status.
run_harness() { # NAME COMMAND...
  local name=$1
  shift
  set +e
  "$@" 2>&1 | tee "target/$name-output.log"
  printf -v "${name}_status" '%s' "${PIPESTATUS[0]}"
  set -e
}

# A clean CI clone builds once: incremental caches would only double the disk it needs.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi

log "installing system packages"
missing=()
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v tar >/dev/null 2>&1 || missing+=(tar)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "tests/run.sh: /dev/fuse is missing; FUSE tests cannot run" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

log "starting the local Swift"
export SWIFT_STATE_DIR=${SWIFT_STATE_DIR:-/var/tmp/cloudfs-swift}
bash tests/swift/swift.sh start
# A CI run leaves the machine as it found it: the Swift state (objects, logs) goes with it.
swift_stop=(bash tests/swift/swift.sh stop)
if [ "${CI:-}" = true ]; then swift_stop+=(--purge); fi
tools_pid=
finish() {
  if [ -n "$tools_pid" ]; then kill -- "-$tools_pid" 2>/dev/null || true; fi
  "${swift_stop[@]}" >/dev/null 2>&1 || true
}
trap finish EXIT

# The Go tools (the control plane, the CSI sidecars, csi-sanity, helm) build at the lowest CPU
# priority beside the Rust build and tests, which leave cores idle while they wait on I/O.
log "building the Go test tools in the background (target/tools-build.log)"
mkdir -p target
set -m
nice -n 19 bash -c 'bash tests/k8s/cluster.sh build && bash tests/csi/sanity.sh --build-only &&
  bash tests/helm/check.sh --build-only' >target/tools-build.log 2>&1 &
tools_pid=$!
set +m
wait_for_tools() {
  [ -n "$tools_pid" ] || return 0
  log "waiting for the Go test tools"
  if ! wait "$tools_pid"; then
    tail -n 40 target/tools-build.log
    echo "building the Go test tools failed (target/tools-build.log); the harnesses retry it" >&2
  fi
  tools_pid=
}
eval "$(bash tests/swift/swift.sh env)"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test"
set +e
# The operator's end-to-end tests and the chart's dry run need a control plane:
# tests/helm/check.sh runs them below.
cargo test --workspace --no-fail-fast -- --skip operator_e2e --skip chart_e2e --skip mount_pod_e2e 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}

log "FUSE mount tests over Swift"
CLOUDFS_TEST_STORE=swift cargo test -p cloudfs --test fuse_mount 2>&1 | tee -a target/test-output.log
swift_status=${PIPESTATUS[0]}
set -e

wait_for_tools
log "csi-sanity against cloudfs-node and cloudfs-controller on Swift"
run_harness sanity bash tests/csi/sanity.sh --swift
read -r sanity_passed sanity_failed < <(awk '/ Passed \| / {
    for (i = 2; i <= NF; i++) { if ($(i) == "Passed") p = $(i-1); if ($(i) == "Failed") f = $(i-1) }
  } END { print p + 0, f + 0 }' target/sanity-output.log)
if [ "$sanity_status" -ne 0 ] && [ "$sanity_failed" -eq 0 ]; then sanity_failed=1; fi

log "Helm chart: lint, template, drift, dry run, RBAC-bound end to end (tests/helm/check.sh)"
run_harness helm bash tests/helm/check.sh
cat target/helm-output.log >>target/test-output.log

log "quick start (README)"
quick=0
if ./tests/quickstart.sh --check; then quick=1; fi

read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) }
  } END { print p + 0, f + 0 }' target/test-output.log)
passed=$((passed + quick + sanity_passed))
failed=$((failed + sanity_failed))
if [ "$quick" -eq 0 ]; then failed=$((failed + 1)); fi
# A harness that failed before any test could (a build, the control plane, a lint) is a failure.
if [ "$helm_status" -ne 0 ] && ! grep -q "^test result: FAILED" target/helm-output.log; then
  failed=$((failed + 1))
fi
echo
echo "summary: ${passed} passed, ${failed} failed"
[ "$status" -eq 0 ] && [ "$swift_status" -eq 0 ] && [ "$sanity_status" -eq 0 ] &&
  [ "$helm_status" -eq 0 ] && [ "$failed" -eq 0 ]
