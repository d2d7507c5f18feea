#!/usr/bin/env bash
# Benchmark (not a test): the same job set on a plain local directory and on cloudfs over the
# embedded LocalStore, in one run, printed as a table. Needs root (FUSE, drop_caches).
#
#   tests/bench/fs.sh [SIZE_MIB]      # sequential file size, default 1024
set -euo pipefail
cd "$(dirname "$0")/../.."
size_mib=${1:-1024}
command -v fio >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }
command -v fusermount3 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
cargo build --release --quiet --bin cloudfs
bin="$PWD/target/release/cloudfs"
work=$(mktemp -d /var/tmp/cloudfs-bench.XXXXXX)
export CLOUDFS_RUN_DIR="$work/run"
mnt="$work/mnt"
cleanup() {
  "$bin" umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/plain" "$work/store" "$mnt"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

fio_bw() { # fio_bw DIR NAME RW BS [extra...] -> MiB/s
  local dir=$1 name=$2 rw=$3 bs=$4; shift 4
  fio --name="$name" --directory="$dir" --rw="$rw" --bs="$bs" --size="${size_mib}M" \
      --ioengine=psync --output-format=json "$@" 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f %.0f" % (max(j["read"]["bw"], j["write"]["bw"])/1024, max(j["read"]["iops"], j["write"]["iops"])))'
}

mount_cloudfs() { # fresh cache dir each time: cold cache
  "$bin" mount "file://$work/store" bench "$mnt" --cache-dir "$work/cache.$1" --cache-size 4GiB >/dev/null
  pid=$(cat "$CLOUDFS_RUN_DIR"/*.pid)
}

stored_bytes() { du -sb "$1" | cut -f1; }

declare -A R
run_jobs() { # run_jobs LABEL DIR REMOUNT_CMD
  local label=$1 dir=$2 remount=$3
  read -r R[$label.seqw] _ < <(fio_bw "$dir" seq write 1M --end_fsync=1)
  $remount; drop_caches
  read -r R[$label.seqr] _ < <(fio_bw "$dir" seq read 1M)
  read -r _ R[$label.rand] < <(fio_bw "$dir" seq randread 4k --runtime=15 --time_based)
  while read -r key value; do R[$label.$key]=$value; done < <(python3 tests/bench/metaops.py "$dir")
  local before after
  before=$(stored_bytes "$4")
  head -c $((256 << 20)) /dev/urandom > "$dir/dup1"; sync "$dir/dup1"
  after=$(stored_bytes "$4")
  cp "$dir/dup1" "$dir/dup2"; sync "$dir/dup2"
  $remount
  R[$label.dup]=$(( ($(stored_bytes "$4") - after) / 1024 ))
}

echo "plain directory: $work/plain"
run_jobs plain "$work/plain" drop_caches "$work/plain"

"$bin" format "file://$work/store" bench >/dev/null
mount_cloudfs 0
remount_cloudfs() {
  local hwm
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  [ "${hwm:-0}" -gt "${R[rss]:-0}" ] && R[rss]=$hwm
  "$bin" umount "$mnt" >/dev/null
  mount_cloudfs $((++remounts))
}
remounts=0
echo "cloudfs: $mnt over file://$work/store"
run_jobs cloudfs "$mnt" remount_cloudfs "$work/store"
remount_cloudfs

pct() { python3 -c "print('%.0f%%' % (100.0 * $2 / $1) if $1 else '-')"; }
printf '\n%-34s %14s %14s %8s\n' "job" "plain dir" "cloudfs" "ratio"
row() { printf '%-34s %14s %14s %8s\n' "$1" "${R[plain.$2]}" "${R[cloudfs.$2]}" "$(pct "${R[plain.$2]}" "${R[cloudfs.$2]}")"; }
row "seq write ${size_mib} MiB + fsync (MiB/s)" seqw
row "cold seq read 1 MiB (MiB/s)" seqr
row "4 KiB random read (IOPS)" rand
row "create (files/s)" create
row "stat (files/s)" stat
row "rename (files/s)" rename
row "delete (files/s)" delete
row "1000 x 64 KiB files (files/s)" small64k
row "256 MiB duplicate: stored KiB added" dup
printf '%-34s %14s %14s\n' "mount process peak RSS (MiB)" "-" "$(( ${R[rss]:-0} / 1024 ))"
