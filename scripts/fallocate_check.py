#!/usr/bin/env python3
"""Randomised check of raw fallocate(2) modes against an in-memory model.

fsx 0.3.2 has no zero-range operation, and its posix_fallocate goes through glibc, which
silently emulates it by writing zeros when the filesystem answers EOPNOTSUPP. So scripts/fsx.sh
runs this after fsx: each step is a pwrite, fallocate mode 0 or KEEP_SIZE, a zero range (with or
without KEEP_SIZE), a punch hole or an ftruncate, all with the raw syscall; every few steps the
whole file is read back and compared with the model. Any fallocate error fails the check.

usage: fallocate_check.py FILE NOPS SEED     exit 0 = all good, 1 = mismatch or error
"""
import ctypes
import os
import random
import sys

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
MAX_LEN = 8 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd, mode, off, length, what):
    if libc.fallocate(fd, mode, off, length) != 0:
        err = ctypes.get_errno()
        sys.exit(f"fallocate_check: {what} off={off} len={length} failed: {os.strerror(err)}")


def main():
    path, nops, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    for step in range(1, nops + 1):
        op = rng.choice(["write", "write", "zero", "zero_keep", "punch", "truncate", "alloc",
                         "alloc_keep"])
        off = rng.randrange(0, MAX_LEN)
        length = rng.randrange(1, 1 << 18)
        if op == "write":
            data = rng.randbytes(length)
            os.pwrite(fd, data, off)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off:off + length] = data
        elif op in ("zero", "zero_keep"):
            keep = op == "zero_keep"
            fallocate(fd, FALLOC_FL_ZERO_RANGE | (FALLOC_FL_KEEP_SIZE if keep else 0), off,
                      length, op)
            end = off + length
            if not keep and len(model) < end:
                model.extend(bytes(end - len(model)))
            lo, hi = min(off, len(model)), min(end, len(model))
            model[lo:hi] = bytes(hi - lo)
        elif op in ("alloc", "alloc_keep"):
            keep = op == "alloc_keep"
            fallocate(fd, FALLOC_FL_KEEP_SIZE if keep else 0, off, length, op)
            if not keep and len(model) < off + length:
                model.extend(bytes(off + length - len(model)))
        elif op == "punch":
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length, op)
            lo, hi = min(off, len(model)), min(off + length, len(model))
            model[lo:hi] = bytes(hi - lo)
        else:
            os.ftruncate(fd, off)
            if len(model) > off:
                del model[off:]
            else:
                model.extend(bytes(off - len(model)))
        if step % 16 == 0 or step == nops:
            size = os.fstat(fd).st_size
            if size != len(model):
                sys.exit(f"fallocate_check: step {step} ({op}): size {size}, expected {len(model)}")
            got = os.pread(fd, len(model) + 1, 0)
            if got != model:
                first = next(i for i in range(min(len(got), len(model)))
                             if got[i] != model[i]) if len(got) == len(model) else len(got)
                sys.exit(f"fallocate_check: step {step} ({op}): data differs at byte {first}")
    os.close(fd)
    print(f"fallocate_check: {nops} operations OK (seed {seed})")


if __name__ == "__main__":
    main()
