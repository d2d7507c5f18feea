#!/usr/bin/env bash
# Benchmark (not a test) of the data-management commands, printed as a table with each
# command's time and peak RSS: on a volume of FILES small files and EXPORT_GIB GiB of large
# ones (LOGICAL_GIB GiB logical in all: the small files are sparse past their first 4 KiB, the
# large ones repeat a few random 8 MiB blocks, so the pool stores little), it times a subtree
# snapshot, snapshot create / clone / rollback offline and through the mount, a TAR export of
# the large directory, and garbage collection of the pool, which also holds BLOCKS unreferenced
# blocks (local store only: made directly in the store, dated two hours back). Needs root.
#
#   tests/bench/data.sh [--files N] [--logical-gib N] [--export-gib N] [--blocks N] [--swift]
#   defaults: 100000 files, 50 GiB logical, 10 GiB exported, 1000000 garbage blocks, local store
# --swift runs on the test Swift of tests/swift/swift.sh (started if it is not running), where
# the export is a static large object; on the local store the export writes a real tar.
set -euo pipefail
cd "$(dirname "$0")/../.."
files=100000
logical_gib=50
export_gib=10
garbage=1000000
swift=0
while (($#)); do
  case $1 in
    --files) files=$2; shift 2 ;;
    --logical-gib) logical_gib=$2; shift 2 ;;
    --export-gib) export_gib=$2; shift 2 ;;
    --blocks) garbage=$2; shift 2 ;;
    --swift) swift=1; shift ;;
    *) echo "usage: $0 [--files N] [--logical-gib N] [--export-gib N] [--blocks N] [--swift]" >&2
       exit 2 ;;
  esac
done
command -v fusermount3 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
cargo build --release --quiet --bin cloudfs
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cloudfs"
work=$(mktemp -d /var/tmp/cloudfs-bench.XXXXXX)
export CLOUDFS_RUN_DIR="$work/run"
mnt="$work/mnt"
mkdir -p "$work/store" "$mnt"
if ((swift)); then
  bash tests/swift/swift.sh start >/dev/null
  eval "$(bash tests/swift/swift.sh env)"
  pool="swift://bench-${work##*.}"
else
  pool="file://$work/store"
fi
cleanup() {
  "$bin" umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" >/dev/null 2>&1 || true
  if ((swift)); then
    "$bin" export delete "$pool" big.tar >/dev/null 2>&1 || true
    for volume in vol copy; do "$bin" volume delete "$pool" "$volume" >/dev/null 2>&1 || true; done
    "$bin" gc "$pool" --grace 0s --state-dir "$work/gc-cleanup" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
rows=()
# On Swift an export is a manifest of the stored blocks; the local store writes a real tar.
if ((swift)); then export_target="< 5 s"; else export_target="- (copies)"; fi

# Runs a command; records "<label>|<seconds>|<peak RSS MiB>|<target>".
measure() { # LABEL TARGET COMMAND...
  local label=$1 target=$2; shift 2
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/out" 2>"$work/err" || {
    cat "$work/err" >&2; exit 1; }
  read -r secs kib <"$work/time"
  rows+=("$label|$secs|$((kib / 1024))|$target")
}

mount_volume() { "$bin" mount "$pool" vol "$mnt" --cache-dir "$work/cache" --sync-interval 30 >/dev/null; }

"$bin" format "$pool" vol >/dev/null
mount_volume
echo "writing $files small files and $export_gib GiB of large ones ($logical_gib GiB logical)..."
# The first 1000 small files are written; the other directories of 1000 are subtree
# snapshots of that one (metadata copies sharing its blocks), which keeps this quick on Swift.
python3 - "$mnt" "$files" "$logical_gib" "$export_gib" <<'EOF'
import os, sys
root, count, logical_gib, export_gib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
GIB, MIB = 1 << 30, 1 << 20
small_size = max(4096, (logical_gib - export_gib) * GIB // max(count, 1))
d = os.path.join(root, "tree", "d0000")
os.makedirs(d)
for i in range(min(count, 1000)):
    with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(small_size)
chunks = [os.urandom(8 * MIB) for _ in range(4)]
big = os.path.join(root, "big")
os.makedirs(big, exist_ok=True)
for n in range(export_gib * 4):  # 256 MiB files
    with open(os.path.join(big, f"part-{n:04d}"), "wb") as f:
        for k in range(32):
            f.write(chunks[(n + k) % len(chunks)])
EOF
for ((k = 1; k < files / 1000; k++)); do
  "$bin" snapshot tree "$mnt/tree/d0000" "$mnt/tree/$(printf 'd%04d' "$k")" >/dev/null
done
# Replicate what is pending first, as the periodic sync of a mount in steady state has.
python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$mnt"
measure "snapshot create (mounted, frozen)" "< 1 s" "$bin" snapshot create "$pool" vol live1
measure "rollback (mounted, in place)" "< 1 s" "$bin" rollback "$pool" vol live1
"$bin" umount "$mnt"
"$bin" stat "$pool" vol
measure "snapshot create (offline)" "< 1 s" "$bin" snapshot create "$pool" vol s1
measure "clone" "< 1 s" "$bin" clone "$pool" vol@s1 copy
measure "rollback (offline)" "< 1 s" "$bin" rollback "$pool" vol s1
measure "snapshot list (unique bytes)" "-" "$bin" snapshot list "$pool" vol
measure "export tar ($export_gib GiB directory)" "$export_target" "$bin" export tar "$pool" vol:big big.tar
echo "export: $(head -1 "$work/out")"

mount_volume
measure "subtree snapshot ($files files)" "a few s" "$bin" snapshot tree "$mnt/tree" "$mnt/tree-copy"
"$bin" umount "$mnt"

if ((!swift)); then
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
fi
measure "gc --dry-run" "RSS < 256 MiB" "$bin" gc "$pool" --dry-run --state-dir "$work/gc"
measure "gc" "RSS < 256 MiB" "$bin" gc "$pool" --state-dir "$work/gc"
echo "gc: $(tr '\n' ' ' <"$work/out")"

printf '\n%-40s %10s %14s   %s\n' "operation" "seconds" "peak RSS MiB" "target"
for row in "${rows[@]}"; do
  IFS='|' read -r label secs rss target <<<"$row"
  printf '%-40s %10s %14s   %s\n' "$label" "$secs" "$rss" "$target"
done
