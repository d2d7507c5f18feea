#!/usr/bin/env python3
"""Metadata and small-file rates in one directory: prints `name rate` lines (operations/s),
each the median of PASSES passes (a pass is short enough for a background hiccup to skew it),
and `roundtrip_us`: the microseconds of a `getxattr` of a name the file does not have, which
FUSE never caches, so on a FUSE mount it is one request to the server and back with next to
no work there. Every create, stat, rename and delete costs one to three such trips, and their
price is set by the host (how fast it wakes an idle CPU), not by the file system.

Usage: metaops.py DIR [FILES] [SMALL_FILES] [PASSES] [--only create] [--tag PREFIX]
"""
import argparse
import errno
import os
import statistics
import time


def rate(count, fn):
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def one_pass(root, n, small, tag, only):
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

    def roundtrip_us(trips=20_000):
        probe = os.path.join(work, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644))
        start = time.perf_counter()
        for _ in range(trips):
            try:
                os.getxattr(probe, "user.metaops-absent")
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
        elapsed = time.perf_counter() - start
        os.unlink(probe)
        return elapsed / trips * 1e6

    jobs = {
        "roundtrip_us": roundtrip_us,
        "create": lambda: rate(n, create),
        "stat": lambda: rate(n, stat),
        "rename": lambda: rate(n, rename),
        "delete": lambda: rate(n, delete),
        "small64k": lambda: rate(small, small_files),
    }
    return {name: job() for name, job in jobs.items() if only in (None, name)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir")
    parser.add_argument("files", nargs="?", type=int, default=10_000)
    parser.add_argument("small_files", nargs="?", type=int, default=1000)
    parser.add_argument("passes", nargs="?", type=int, default=3)
    parser.add_argument("--only", choices=["create"], help="measure this rate alone")
    parser.add_argument("--tag", default="", help="prefix of the directories made")
    args = parser.parse_args()
    results = [
        one_pass(args.dir, args.files, args.small_files, f"{args.tag}{tag}", args.only)
        for tag in range(args.passes)
    ]
    for name in results[0]:
        value = statistics.median(r[name] for r in results)
        print(f"{name} {value:.1f}" if name == "roundtrip_us" else f"{name} {value:.0f}")


if __name__ == "__main__":
    main()
