#!/usr/bin/env python3
"""Metadata and small-file rates in one directory: prints `name rate` lines (operations/s),
each the median of PASSES passes (a pass is short enough for a background hiccup to skew it).

Usage: metaops.py DIR [FILES] [SMALL_FILES] [PASSES]
"""
import os
import statistics
import sys
import time


def rate(count, fn):
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def one_pass(root, n, small, tag):
    work = os.path.join(root, f"metaops-{tag}")
    os.makedirs(work)
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
    small_dir = os.path.join(root, f"small-{tag}")
    os.makedirs(small_dir)

    def small_files():
        for i in range(small):
            with open(os.path.join(small_dir, f"s{i:05d}"), "wb") as f:
                f.write(payload[:8] + i.to_bytes(8, "little") + payload[16:])

    return {
        "create": rate(n, create),
        "stat": rate(n, stat),
        "rename": rate(n, rename),
        "delete": rate(n, delete),
        "small64k": rate(small, small_files),
    }


def main():
    root = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    small = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    passes = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    results = [one_pass(root, n, small, tag) for tag in range(passes)]
    for name in results[0]:
        print(f"{name} {statistics.median(r[name] for r in results):.0f}")


if __name__ == "__main__":
    main()
