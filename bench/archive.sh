#!/usr/bin/env bash
# Archive benchmark: reads of archived data (warm chunk cache vs the kernel's erofs on the same
# layer exported with `spinfs export`; cold through the media model vs the model's bandwidth)
# and write latency while a seal runs vs idle. One "<metric> <value>" line per figure; ratios
# against baselines measured in the same run.
#
# usage: bench/archive.sh [SPINFS_BINARY]            (run as root)
# env:
#   SPINFS              spinfs binary (the argument wins; default target/release/spinfs)
#   BENCH_DIR           where the temporary directory goes (default /var/tmp, ext4)
#   ARCH_READ_MIB       archived file read back (default 1024)
#   ARCH_SEAL_MIB       generation sealed while the writer runs (default 2048)
#   ARCH_SEAL_DATA      unique (default: every chunk differs, the seal writes it all to the
#                       media) or pattern (64 MiB repeated: the seal reads it all and writes
#                       64 MiB, deduplicated; a read-bound seal)
#   BENCH_REPEAT        rounds of each read figure (default 3; median reported, runs listed)
#   MODEL_BANDWIDTH     media model bandwidth in bytes/s (default 200000000)
#   MODEL_SWITCH_MS     media model container switch (default 10)
#   MODEL_SEEK_MS       media model seek (default 1)
#   ARCH_MEDIA_IO       [media_io] settings for the run, "key=value;key=value" (TOML values,
#                       e.g. 'background_io_class="inherit";background_write_adaptive=false')
#   LAT_SECS            idle writer run (default 15)
#   ARCH_PARTS          figures to measure, comma-separated: warm, cold, latency (default all)
#   SPINFS_MOUNT_ARGS   extra mount arguments (word-split), e.g. "-o passthrough_writes"
#   LAT_RATE LAT_BS LAT_FSYNC_EVERY
#                       writer: LAT_RATE writes/s of LAT_BS bytes (default 500 x 4096) with an
#                       fdatasync after every LAT_FSYNC_EVERY writes (default 16)
#
# Figures:
#   archived_first_read_MBps      first read of the archived file (media, no model; fills the cache)
#   archived_warm_read_MBps       read again after drop_caches: every byte from the chunk cache
#   kernel_erofs_read_MBps        the exported pair, file-backed kernel erofs mount, after drop_caches
#   archived_warm_read_vs_kernel_erofs   goal >= 0.8
#   archived_cold_read_MBps       chunk cache emptied, remounted, [media_model] in spinfs.toml
#   model_bandwidth_MBps          the model's bandwidth
#   archived_cold_read_vs_model   goal >= 0.9
#   write_p99_idle_us / write_p99_during_seal_us (medians of rounds; each round's p50, p99,
#                                 p999, max on a "# latency round" line), seal_seconds, seal_MBps
#   write_p99_during_seal_vs_idle goal <= 2 (ratio of the medians; _paired: median of each
#                                 round's ratio to the idle run just before it)
# MB = 10^6 bytes. The machine is shared: compare figures of one run only.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SPINFS=${1:-${SPINFS:-$here/../target/release/spinfs}}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
READ_MIB=${ARCH_READ_MIB:-1024}
SEAL_MIB=${ARCH_SEAL_MIB:-2048}
case ${ARCH_SEAL_DATA:-unique} in
unique) SEAL_WRITE=seqwrite-unique ;;
pattern) SEAL_WRITE=seqwrite ;;
*) echo "archive.sh: ARCH_SEAL_DATA must be unique or pattern" >&2; exit 2 ;;
esac
REPEAT=${BENCH_REPEAT:-3}
MODEL_BW=${MODEL_BANDWIDTH:-200000000}
MODEL_SWITCH=${MODEL_SWITCH_MS:-10}
MODEL_SEEK=${MODEL_SEEK_MS:-1}
LAT_SECS=${LAT_SECS:-15}
LAT_RATE=${LAT_RATE:-500}
LAT_BS=${LAT_BS:-4096}
LAT_FSYNC=${LAT_FSYNC_EVERY:-16}
T=${BENCH_OP_TIMEOUT:-900}
PARTS=${ARCH_PARTS:-warm,cold,latency}
part() { [[ ",$PARTS," == *",$1,"* ]]; }

die() { echo "archive.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, mounts)"
for tool in cc python3 mountpoint findmnt timeout; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
[ -x "$SPINFS" ] || die "spinfs binary not found: $SPINFS (cargo build --release -p spinfs)"

work=$(mktemp -d "$BENCH_DIR/spinfs-archive-bench.XXXXXX")
store=$work/store
mnt=$work/mnt
kmnt=$work/kernel
spin_mounted=0
k_mounted=0
writer_pid=

cleanup() {
    local rc=$?
    set +e
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
    if [ "$k_mounted" = 1 ] && mountpoint -q "$kmnt"; then
        umount "$kmnt" || umount -l "$kmnt"
    fi
    if [ "$spin_mounted" = 1 ] && mountpoint -q "$mnt"; then
        timeout 120 "$SPINFS" umount "$mnt" >&2 || echo "archive.sh: spinfs umount failed" >&2
        mountpoint -q "$mnt" && umount -l "$mnt"
    fi
    if ! mountpoint -q "$mnt" 2>/dev/null && ! mountpoint -q "$kmnt" 2>/dev/null; then
        rm -rf "$work"
    else
        echo "archive.sh: left $work in place (something is still mounted)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "# archive benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ) kernel $(uname -r) nproc $(nproc)"
echo "# base dir $work on $(findmnt -n -o FSTYPE -T "$work"); read file ${READ_MIB} MiB," \
    "sealed ${SEAL_MIB} MiB (${ARCH_SEAL_DATA:-unique}); rounds $REPEAT (median); model ${MODEL_BW} B/s," \
    "switch ${MODEL_SWITCH} ms, seek ${MODEL_SEEK} ms; writer ${LAT_RATE}/s x ${LAT_BS} B," \
    "fdatasync every ${LAT_FSYNC}"

cc -O2 -o "$work/fsbench" "$here/fsbench.c" || die "cannot build bench/fsbench.c"
cc -O2 -o "$work/latwrite" "$here/latwrite.c" || die "cannot build bench/latwrite.c"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
field() { awk -v k="$1" '$1 == k { print $2 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
num() { [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "no valid figure for $1: '$2'"; echo "$2"; }
ratio() { awk -v n="$2" -v d="$3" -v k="$1" 'BEGIN { printf "%s %.3f\n", k, n / d }'; }
seqread() { # FILE -> MB/s (checks the size)
    local out
    out=$(timeout "$T" "$work/fsbench" seqread "$1")
    [ "$(field bytes <<<"$out")" = $((READ_MIB * 1048576)) ] || die "short read of $1"
    num "read $1" "$(field MBps <<<"$out")"
}
mount_spinfs() {
    spin_mounted=1
    # shellcheck disable=SC2086 # word-split on purpose
    timeout 120 "$SPINFS" mount "$store" "$mnt" ${SPINFS_MOUNT_ARGS:-} || die "spinfs mount failed"
    mountpoint -q "$mnt" || die "$mnt is not a mount point after spinfs mount"
}
umount_spinfs() {
    timeout 120 "$SPINFS" umount "$mnt" || die "spinfs umount failed"
    spin_mounted=0
}

mkdir -p "$mnt" "$kmnt"
# No threshold seal during the run: every seal is the one this script asks for. The threshold
# is still kept below 2/3 of the free space: with less than 1.5 x the threshold free, the SSD
# counts as short of space and daemon-served writers wait for every seal to commit (volume
# flow control), which would stall the writer measured during the seal.
free=$(df --output=avail -B1 "$BENCH_DIR" | tail -1)
threshold=$((free / 2))
((threshold > 64 << 30)) && threshold=$((64 << 30))
need=$(((SEAL_MIB > READ_MIB ? SEAL_MIB : READ_MIB) * 2 + 1024))
((threshold >= need << 20)) || die "$BENCH_DIR has $((free >> 20)) MiB free: too little for a threshold of $need MiB"
timeout 300 "$SPINFS" mkfs "$store" --cache-size 4G --archive-threshold "$threshold" >/dev/null
if [ -n "${ARCH_MEDIA_IO:-}" ]; then
    python3 - "$store/spinfs.toml" "$ARCH_MEDIA_IO" <<'EOF' || die "bad ARCH_MEDIA_IO"
import re, sys
path, settings = sys.argv[1], sys.argv[2]
text = open(path).read()
for kv in filter(None, settings.split(";")):
    k, v = (x.strip() for x in kv.split("=", 1))
    text, n = re.subn(rf"(?m)^{re.escape(k)} = .*$", f"{k} = {v}", text)
    if n != 1:
        sys.exit(f"no media_io key {k}")
open(path, "w").write(text)
EOF
    echo "# media_io: $ARCH_MEDIA_IO"
fi
cp "$store/spinfs.toml" "$work/spinfs.toml.orig"
mount_spinfs

# --- reads of archived data -------------------------------------------------------------
if part warm || part cold; then
timeout "$T" "$work/fsbench" seqwrite "$mnt/big" "$READ_MIB" >/dev/null
timeout "$T" "$SPINFS" archive "$store" --wait >/dev/null
layer=$(timeout 60 "$SPINFS" status "$store" --json | python3 -c '
import json, sys
print([l["id"] for l in json.load(sys.stdin)["layers"] if l["kind"] == "archived"][0])')
fi
if part warm; then
drop_caches
first=$(seqread "$mnt/big")
timeout "$T" "$SPINFS" export "$store" --layer "$layer" "$work/export" >/dev/null
blobs=$(find "$work/export" -name 'blob.*' | sort | sed 's/^/device=/' | paste -sd, -)
python3 - "$work/export/meta.$layer" "$kmnt" "$blobs" <<'EOF'
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
src, target, data = (a.encode() for a in sys.argv[1:])
if libc.mount(src, target, b"erofs", ctypes.c_ulong(1), data) != 0:  # MS_RDONLY
    e = ctypes.get_errno()
    sys.exit(f"mount -t erofs {sys.argv[1]} -o {sys.argv[3]}: {os.strerror(e)}")
EOF
k_mounted=1
cmp -s <(head -c 1048576 "$kmnt/big") <(head -c 1048576 "$mnt/big") \
    || die "the kernel's view of the export differs from the mount's"
warm_runs=() kern_runs=()
for ((r = 1; r <= REPEAT; r++)); do
    drop_caches
    warm_runs+=("$(seqread "$mnt/big")")
    drop_caches
    kern_runs+=("$(seqread "$kmnt/big")")
done
umount "$kmnt"
k_mounted=0
st=$(timeout 60 "$SPINFS" status "$store" --json)
echo "# warm runs: ${warm_runs[*]}; kernel erofs runs: ${kern_runs[*]}"
echo "# after warm reads: $(python3 -c 'import json,sys; v=json.loads(sys.argv[1]); print("media", json.dumps(v["media"]), "cache", json.dumps(v["cache"]))' "$st")"
warm=$(median "${warm_runs[@]}")
kern=$(median "${kern_runs[@]}")
fi
umount_spinfs

if part cold; then
# Cold reads through the media model: chunk cache emptied before every round.
cp "$work/spinfs.toml.orig" "$store/spinfs.toml"
printf '\n[media_model]\nswitch_ms = %s\nseek_ms = %s\nbandwidth = %s\n' \
    "$MODEL_SWITCH" "$MODEL_SEEK" "$MODEL_BW" >> "$store/spinfs.toml"
cold_runs=()
for ((r = 1; r <= REPEAT; r++)); do
    rm -rf "$store/cache"
    mount_spinfs
    drop_caches
    cold_runs+=("$(seqread "$mnt/big")")
    st=$(timeout 60 "$SPINFS" status "$store" --json)
    echo "# cold round $r: $(python3 -c 'import json,sys; v=json.loads(sys.argv[1]); print("media", json.dumps(v["media"]))' "$st")"
    umount_spinfs
done
echo "# cold runs: ${cold_runs[*]}"
cold=$(median "${cold_runs[@]}")
cp "$work/spinfs.toml.orig" "$store/spinfs.toml"
fi

if part latency; then
# --- write latency while a seal runs ----------------------------------------------------
# Each round: SEAL_MIB MiB of unique data (nothing deduplicates: the seal writes it all to
# the media) written and synced, the writer alone for LAT_SECS s (idle), then
# the page cache dropped (a seal reads its generation back from the SSD, as it would long
# after it was written) and the writer again while `spinfs archive --wait` seals it.
mount_spinfs
rm -f "$mnt/big"
idle_p99s=() seal_p99s=() seal_secs=()
for ((r = 1; r <= REPEAT; r++)); do
    timeout "$T" "$work/fsbench" "$SEAL_WRITE" "$mnt/seal.$r" "$SEAL_MIB" >/dev/null
    sync
    idle=$(timeout "$T" "$work/latwrite" "$mnt/lat-idle.$r" "$LAT_SECS" "$LAT_RATE" "$LAT_BS" "$LAT_FSYNC")
    stop=$work/stop-writer.$r
    drop_caches
    "$work/latwrite" "$mnt/lat-seal.$r" 600 "$LAT_RATE" "$LAT_BS" "$LAT_FSYNC" "$stop" \
        >"$work/lat-seal.out" &
    writer_pid=$!
    sleep 0.5
    t0=$(date +%s.%N)
    timeout "$T" "$SPINFS" archive "$store" --wait >/dev/null || die "spinfs archive failed"
    t1=$(date +%s.%N)
    touch "$stop"
    wait "$writer_pid" || die "the writer failed during the seal"
    writer_pid=
    during=$(cat "$work/lat-seal.out")
    idle_p99s+=("$(num idle_p99 "$(field p99_us <<<"$idle")")")
    seal_p99s+=("$(num seal_p99 "$(field p99_us <<<"$during")")")
    seal_secs+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')")
    echo "# latency round $r: idle $(paste -sd' ' <<<"$idle"); during seal" \
        "$(paste -sd' ' <<<"$during"); seal ${seal_secs[-1]} s"
done
umount_spinfs
fi

if part latency; then
seal_s=$(median "${seal_secs[@]}")
idle_p99=$(median "${idle_p99s[@]}")
seal_p99=$(median "${seal_p99s[@]}")
echo "# write p99 runs (us): idle ${idle_p99s[*]}; during seal ${seal_p99s[*]}"
# Each round's ratio (its seal against the idle run just before it), for a machine whose
# load drifts between rounds.
paired=()
for ((r = 0; r < REPEAT; r++)); do
    paired+=("$(awk -v n="${seal_p99s[r]}" -v d="${idle_p99s[r]}" 'BEGIN { printf "%.3f", n / d }')")
done
echo "# per-round ratios: ${paired[*]}"
fi
if part warm; then
echo "archived_first_read_MBps $first"
echo "archived_warm_read_MBps $warm"
echo "kernel_erofs_read_MBps $kern"
ratio archived_warm_read_vs_kernel_erofs "$warm" "$kern"
fi
if part cold; then
echo "archived_cold_read_MBps $cold"
model_mbps=$(awk -v b="$MODEL_BW" 'BEGIN { printf "%.1f", b / 1e6 }')
echo "model_bandwidth_MBps $model_mbps"
ratio archived_cold_read_vs_model "$cold" "$model_mbps"
fi
if part latency; then
echo "write_p99_idle_us $idle_p99"
echo "write_p99_during_seal_us $seal_p99"
echo "seal_seconds $seal_s"
awk -v s="$seal_s" -v m="$SEAL_MIB" 'BEGIN { printf "seal_MBps %.1f\n", m * 1048576 / s / 1e6 }'
ratio write_p99_during_seal_vs_idle "$seal_p99" "$idle_p99"
echo "write_p99_during_seal_vs_idle_paired $(median "${paired[@]}")"
fi
