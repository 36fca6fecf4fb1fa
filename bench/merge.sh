#!/usr/bin/env bash
# Merge benchmark: prints
#   merge_4x250k_seconds <s>   time of `spinfs merge` over 4 archived layers of 250k inodes each
#   layers_after_64_seals <n>  archived layers left after 64 seals with the default fan-in (4)
# usage: bench/merge.sh [SPINFS_BINARY]   (run as root; BENCH_DIR default /var/tmp,
#        MERGE_INODES default 250000 per layer)
# The 250k-inode layers are made by writing the files straight into the writable tree of an
# unmounted store and sealing it offline (`spinfs archive`): how files got there does not
# matter to the merge, and it spares creating a million files through FUSE.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
spinfs=${1:-${SPINFS:-$here/target/release/spinfs}}
[ -x "$spinfs" ] || { echo "merge.sh: build first: cargo build --release (or pass the binary)" >&2; exit 2; }
n=${MERGE_INODES:-250000}
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/spinfs-merge-bench.XXXXXX")
mnt=$work/mnt
cleanup() {
    grep -q " $mnt fuse" /proc/mounts && "$spinfs" umount "$mnt" || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$mnt"

# (1) four layers of $n inodes, merged by `spinfs merge`
# fan-in 8: the four seals below do not merge by themselves; `spinfs merge` then merges the
# newest four layers, i.e. exactly these
"$spinfs" mkfs "$work/s" --merge-fanin 8 >/dev/null
for layer in 1 2 3 4; do
    tree=$(ls -d "$work"/s/gens/*/tree)
    python3 - "$tree" "$n" "$layer" <<'PY'
import os, sys
root, n, layer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
per_dir = 1000
for i in range(n):
    d = os.path.join(root, f"l{layer}", f"d{i // per_dir}")
    if i % per_dir == 0:
        os.makedirs(d, exist_ok=True)
    # each layer its own top directory l1..l4: the merge resolves and rewrites all 4 x $n inodes
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(layer.encode())
PY
    "$spinfs" archive "$work/s" >/dev/null
done
layers=$("$spinfs" status "$work/s" --json | python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin)["layers"] if l["kind"]=="archived"))')
[ "$layers" -eq 4 ] || { echo "merge.sh: expected 4 layers, found $layers" >&2; exit 1; }
start=$(date +%s.%N)
"$spinfs" merge "$work/s" >/dev/null
end=$(date +%s.%N)
merged=$("$spinfs" status "$work/s" --json | python3 -c 'import json,sys; l=[l for l in json.load(sys.stdin)["layers"] if l["kind"]=="archived"]; print(len(l), len(l[0]["generations"]), l[0]["files"])')
[ "$merged" = "1 4 $((4 * n))" ] || { echo "merge.sh: expected one layer of 4 generations and $((4 * n)) files after the merge, found (layers, generations, files) $merged" >&2; exit 1; }
echo "merge_4x250k_seconds $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"

# (2) 64 seals through a live mount with the default fan-in
"$spinfs" mkfs "$work/u" --container-size 32M --object-size 64K --chunk-size 64K >/dev/null
"$spinfs" mount "$work/u" "$mnt"
for i in $(seq 1 64); do
    echo "$i" > "$mnt/f$i"
    "$spinfs" archive "$work/u" --wait >/dev/null
done
# let the background merges that are due finish (the count stops changing)
count=-1
for _ in $(seq 1 100); do
    sleep 0.5
    now=$("$spinfs" status "$work/u" --json | python3 -c 'import json,sys; print(sum(1 for l in json.load(sys.stdin)["layers"] if l["kind"]=="archived"))')
    [ "$now" = "$count" ] && break
    count=$now
done
echo "layers_after_64_seals $count"
"$spinfs" umount "$mnt"
