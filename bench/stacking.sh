#!/usr/bin/env bash
# File stacking benchmark: append 4 KiB (and fsync) to each of N archived files of M MiB,
# through spinfs (only the touched chunk comes up; here none: the append starts a new chunk)
# and through kernel overlayfs over the same files in a lower directory (every append copies
# the whole file up). Prints
#   stacked_append_bytes_vs_overlayfs <ratio>  bytes the appends left on the SSD (allocated
#                                              bytes of the upper files), spinfs / overlayfs
#   stacked_append_time_vs_overlayfs <ratio>   wall time of the appends, spinfs / overlayfs
# and the raw figures. usage: bench/stacking.sh [SPINFS_BINARY]  (run as root)
# env: STACK_FILES (default 200), STACK_FILE_MIB (default 100), BENCH_DIR (default /var/tmp).
# Peak disk use is about 2 × N × M MiB (the lower files plus overlayfs's copies; the spinfs
# store gets the same files by rename and seals them to its media after overlayfs is done).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
spinfs=${1:-${SPINFS:-$here/target/release/spinfs}}
[ -x "$spinfs" ] || { echo "stacking.sh: build first: cargo build --release" >&2; exit 2; }
n=${STACK_FILES:-200}
mib=${STACK_FILE_MIB:-100}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/spinfs-stack-bench.XXXXXX")
mnt=$work/mnt
ovl=$work/ovl
cleanup() {
    grep -q " $mnt fuse" /proc/mounts && "$spinfs" umount "$mnt" || true
    grep -q " $ovl overlay" /proc/mounts && umount "$ovl" || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$mnt" "$ovl" "$work/lower" "$work/upper" "$work/ovlwork"

# The files: non-zero, different in every 4 KiB block (no dedup, no zero elision).
python3 - "$work/lower" "$n" "$mib" <<'PY'
import os, sys
root, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = bytearray(os.urandom(1 << 20))
for i in range(n):
    with open(os.path.join(root, f"f{i:04}"), "wb") as f:
        for m in range(mib):
            block[0:8] = (i * 1_000_003 + m).to_bytes(8, "little")
            for b in range(4096, 1 << 20, 4096):
                block[b:b + 8] = (i * 7919 + m * 256 + b).to_bytes(8, "little")
            f.write(block)
PY
sync

append='
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
data = b"\xa5" * 4096
t = time.perf_counter()
for i in range(n):
    fd = os.open(os.path.join(root, f"f{i:04}"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
print(time.perf_counter() - t)
'
allocated() { # bytes allocated by the regular files under $1
    find "$1" -type f -printf '%b\n' | awk '{s += $1 * 512} END {printf "%d\n", s}'
}

# kernel overlayfs
mount -t overlay overlay -o "lowerdir=$work/lower,upperdir=$work/upper,workdir=$work/ovlwork" "$ovl"
ovl_time=$(python3 -c "$append" "$ovl" "$n")
umount "$ovl"
ovl_bytes=$(allocated "$work/upper")
rm -rf "$work/upper" "$work/ovlwork"

# spinfs: the same files, sealed into an archived layer (moved into the writable tree of an
# unmounted store by rename, then `spinfs archive`), then appended to through the mount.
# No threshold seal while appending; the threshold still fits the disk 1.5 times (a larger one
# makes the mount count the SSD as short of space, and warn).
threshold=$(($(df --output=avail -B1 "$work" | tail -1) / 2))
"$spinfs" mkfs "$work/s" --archive-threshold "$threshold" >/dev/null
tree=$(ls -d "$work"/s/gens/*/tree)
mv "$work"/lower/* "$tree"/
"$spinfs" archive "$work/s" >/dev/null
"$spinfs" mount "$work/s" "$mnt"
before=$("$spinfs" status "$work/s" --json)
spin_time=$(python3 -c "$append" "$mnt" "$n")
after=$("$spinfs" status "$work/s" --json)
"$spinfs" umount "$mnt"
upper=$(ls -d "$work"/s/gens/*/tree)
spin_bytes=$(allocated "$upper")
copied=$(python3 -c 'import json,sys; print(json.loads(sys.argv[2])["stacking"]["bytes_copied_up"] - json.loads(sys.argv[1])["stacking"]["bytes_copied_up"])' "$before" "$after")

echo "files $n x ${mib} MiB, 4 KiB appended to each (with fsync)"
echo "overlayfs_append_seconds $ovl_time"
echo "overlayfs_upper_bytes $ovl_bytes"
echo "spinfs_append_seconds $spin_time"
echo "spinfs_upper_bytes $spin_bytes"
echo "spinfs_chunk_bytes_copied_up $copied"
python3 -c "import sys; print('stacked_append_bytes_vs_overlayfs %.6f' % (int(sys.argv[1]) / int(sys.argv[2])))" "$spin_bytes" "$ovl_bytes"
python3 -c "import sys; print('stacked_append_time_vs_overlayfs %.4f' % (float(sys.argv[1]) / float(sys.argv[2])))" "$spin_time" "$ovl_time"
