#!/usr/bin/env python3
"""Writes a new file of SIZE_MIB MiB through a write-only handle, 1 MiB per write(2), as cp,
dd and shell redirections do, then fsyncs it; prints the rate in MiB/s. Every MiB differs
(its index is stamped into a random buffer), so nothing deduplicates.

Usage: stream_write.py PATH SIZE_MIB
"""
import os
import sys
import time


def main():
    path, size_mib = sys.argv[1], int(sys.argv[2])
    chunk = bytearray(os.urandom(1 << 20))
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size_mib):
            chunk[:8] = i.to_bytes(8, "little")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    print("%.0f" % (size_mib / (time.perf_counter() - start)))


if __name__ == "__main__":
    main()
