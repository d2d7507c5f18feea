#!/usr/bin/env bash
# Benchmark (not a test) of the data-management commands on the embedded LocalStore, printed
# as a table: snapshot create, clone, rollback and subtree snapshot of a volume of FILES small
# files, then garbage collection of a pool that also holds BLOCKS unreferenced blocks (made
# directly in the store, dated two hours back), with its peak RSS. Needs root (FUSE).
#
#   tests/bench/data.sh [--files N] [--blocks N]     # defaults: 20000 files, 1000000 blocks
set -euo pipefail
cd "$(dirname "$0")/../.."
files=20000
garbage=1000000
while (($#)); do
  case $1 in
    --files) files=$2; shift 2 ;;
    --blocks) garbage=$2; shift 2 ;;
    *) echo "usage: $0 [--files N] [--blocks N]" >&2; exit 2 ;;
  esac
done
command -v fusermount3 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --bin cloudfs
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cloudfs"
work=$(mktemp -d /var/tmp/cloudfs-bench.XXXXXX)
export CLOUDFS_RUN_DIR="$work/run"
mnt="$work/mnt"
cleanup() {
  "$bin" umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/store" "$mnt"
pool="file://$work/store"
rows=()

# Runs a command; records "<label>|<seconds>|<peak RSS MiB>".
measure() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || {
    cat "$work/err" >&2; exit 1; }
  read -r secs kib <"$work/time"
  rows+=("$label|$secs|$((kib / 1024))")
}

"$bin" format "$pool" vol --block-size 64KiB >/dev/null
"$bin" mount "$pool" vol "$mnt" --cache-dir "$work/cache"
python3 - "$mnt/tree" "$files" <<'EOF'
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    d = os.path.join(root, f"d{i // 1000:04d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(os.urandom(4096))
EOF
measure "subtree snapshot ($files files)" "$bin" snapshot tree "$mnt/tree" "$mnt/tree-copy"
"$bin" umount "$mnt"
measure "snapshot create" "$bin" snapshot create "$pool" vol s1
measure "clone" "$bin" clone "$pool" vol@s1 copy
measure "rollback" "$bin" rollback "$pool" vol s1

python3 - "$work/store" "$garbage" <<'EOF'
import os, sys, time
root, count = sys.argv[1], int(sys.argv[2])
old = time.time() - 7200
for _ in range(count):
    name = os.urandom(32).hex()
    d = os.path.join(root, "blocks", name[0:2], name[2:4])
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(b"x")
    os.utime(path, (old, old))
EOF
measure "gc --dry-run ($garbage garbage blocks)" "$bin" gc "$pool" --dry-run --state-dir "$work/gc"
measure "gc ($garbage garbage blocks)" "$bin" gc "$pool" --state-dir "$work/gc"
echo "gc: $(cat "$work/out" | tr '\n' ' ')"

printf '\n%-40s %10s %14s\n' "operation" "seconds" "peak RSS MiB"
for row in "${rows[@]}"; do
  IFS='|' read -r label secs rss <<<"$row"
  printf '%-40s %10s %14s\n' "$label" "$secs" "$rss"
done
