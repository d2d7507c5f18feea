#!/usr/bin/env python3
"""Metadata and small-file rates in one directory: prints `name rate` lines (operations/s).

Usage: metaops.py DIR [FILES] [SMALL_FILES]
"""
import os
import sys
import time


def rate(count, fn):
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def main():
    root = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    small = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    work = os.path.join(root, "metaops")
    os.makedirs(work, exist_ok=True)
    names = [os.path.join(work, f"f{i:06d}") for i in range(n)]
    moved = [name + ".r" for name in names]

    def create():
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644))

    def stat():
        for name in names:
            os.stat(name)

    def rename():
        for a, b in zip(names, moved):
            os.rename(a, b)

    def delete():
        for name in moved:
            os.unlink(name)

    payload = os.urandom(64 * 1024)
    small_dir = os.path.join(root, "small")
    os.makedirs(small_dir, exist_ok=True)

    def small_files():
        for i in range(small):
            with open(os.path.join(small_dir, f"s{i:05d}"), "wb") as f:
                f.write(payload[:8] + i.to_bytes(8, "little") + payload[16:])

    print(f"create {rate(n, create):.0f}")
    print(f"stat {rate(n, stat):.0f}")
    print(f"rename {rate(n, rename):.0f}")
    print(f"delete {rate(n, delete):.0f}")
    print(f"small64k {rate(small, small_files):.0f}")


if __name__ == "__main__":
    main()
