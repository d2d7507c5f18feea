#!/usr/bin/env bash
# Builds cloudfs, formats a volume on the embedded local-directory store in a temp dir and
# mounts it. Prints where, and how to unmount. With --check (used by tests/run.sh) it also
# writes and reads a file through the mount, then unmounts and removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fusermount3 >/dev/null 2>&1 || {
  echo "installing fuse3"; apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
cargo build --release --quiet --bin cloudfs
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/cloudfs"
dir=$(mktemp -d /tmp/cloudfs-quickstart.XXXXXX)
mkdir -p "$dir/store" "$dir/mnt"
"$bin" format "file://$dir/store" demo
"$bin" mount "file://$dir/store" demo "$dir/mnt" --cache-dir "$dir/cache"
if [ "${1:-}" = "--check" ]; then
  trap '"$bin" umount "$dir/mnt" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
  echo "hello from cloudfs" > "$dir/mnt/hello.txt"
  sync "$dir/mnt/hello.txt"
  grep -q "hello from cloudfs" "$dir/mnt/hello.txt"
  "$bin" umount "$dir/mnt"
  "$bin" stat "file://$dir/store" demo
  "$bin" fsck "file://$dir/store" demo
  echo "quick start: ok"
  exit 0
fi
cat <<MSG

cloudfs volume 'demo' is mounted at $dir/mnt (store: $dir/store).
Use it like any directory. When done:
  $bin umount $dir/mnt
MSG
