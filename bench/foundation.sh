#!/usr/bin/env bash
# Foundation benchmark: the same workloads, in one run, on
#   (a) native ext4 (a temporary directory), (b) kernel overlayfs (lower+upper+work on that same
#   ext4), (c) a spinfs mount (when a spinfs binary is given),
# printing one "<metric> <value>" line per figure, then ratios against (a) and (b).
#
# usage: bench/foundation.sh [SPINFS_BINARY]         (run as root)
# env:
#   SPINFS             spinfs binary (the argument wins); unset = measure (a) and (b) only.
#                      The script runs:  $SPINFS mkfs STORE $SPINFS_MKFS_ARGS
#                                        $SPINFS mount STORE MNT $SPINFS_MOUNT_ARGS  (returns
#                                        when mounted; the daemon backgrounds itself)
#                                        $SPINFS umount MNT                          (at the end)
#   SPINFS_MKFS_ARGS   extra mkfs arguments (word-split), e.g. "--archive-threshold 64G" to keep
#                      sealing out of the figures (the run writes BENCH_REPEAT x BENCH_SIZE_MIB)
#   SPINFS_MOUNT_ARGS  extra mount arguments (word-split)
#   BENCH_DIR          where the temporary directory goes (default /var/tmp; must be ext4 for
#                      the comparison to mean what it says)
#   BENCH_SIZE_MIB     sequential file size (default 2048)
#   BENCH_FILES        files for create+stat+unlink (default 10000)
#   BENCH_RAND_SECS    runtime of each 4 KiB random-read run (default 5)
#   BENCH_REPEAT       rounds of every workload (default 3); the median is reported and the
#                      runs of the noisiest figures are listed on a "# NAME runs:" line
#   BENCH_WORKLOADS    which workloads to run (default "io,meta"): "io" = seq_write, seq_read,
#                      seq_read_hot, rand_read, rand_read_hot; "seq_write" = the sequential
#                      write alone; "rdwr" = seq_write_rdwr, seq_read_rdwr_hot,
#                      rand_read_rdwr_hot; "meta" = meta_ops. Figures and ratios of the others
#                      are left out. E.g. compare write paths:
#                        BENCH_WORKLOADS=seq_write SPINFS_MOUNT_ARGS="-o passthrough_writes" ...
#
# Fairness: all targets are mounted at once and measured round-robin (round 1 on a, b, c, then
# round 2, ...), so background load on this shared machine hits every target alike; the page
# cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every cold figure.
# Workloads (identical for every target):
#   seq_write     bench/fsbench.c writes BENCH_SIZE_MIB MiB in 1 MiB writes of pseudo-random
#                 data, then fsync + close; time covers open..close (MB = 10^6 bytes)
#   seq_read      cold: drop caches, read the file in 1 MiB reads
#   seq_read_hot  the same read again, right after (page cache warm)
#   rand_read     cold: drop caches, fio 4 KiB randread psync direct=0 for BENCH_RAND_SECS s
#   rand_read_hot after a full sequential read, fio again with invalidate=0
#   seq_write_rdwr     as seq_write, through an O_RDWR descriptor (databases, recorders, fsx
#                      open read-write; spinfs may serve those differently from write-only opens)
#   seq_read_rdwr_hot  that file read twice in 1 MiB reads through an O_RDWR descriptor; the
#                      second read is reported (what a read-heavy read-write user re-reads)
#   rand_read_rdwr_hot then fsbench 4 KiB preads at random offsets through an O_RDWR
#                      descriptor for BENCH_RAND_SECS s (IOPS)
#   meta_ops      bench/fsbench.c: create (open O_CREAT|O_EXCL + close), stat, unlink of
#                 BENCH_FILES files in a fresh directory; ops/s counting each as one op
# Exit status: 0 if every requested target was measured, non-zero otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SPINFS=${1:-${SPINFS:-}}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
NFILES=${BENCH_FILES:-10000}
RAND_SECS=${BENCH_RAND_SECS:-5}
REPEAT=${BENCH_REPEAT:-3}
OP_TIMEOUT=${BENCH_OP_TIMEOUT:-900}
WORKLOADS=${BENCH_WORKLOADS:-io,meta}
want() { [[ ",$WORKLOADS," == *",$1,"* ]]; }
for w in ${WORKLOADS//,/ }; do
    case $w in io | seq_write | rdwr | meta) ;; *) echo "foundation.sh: unknown workload '$w'" >&2; exit 1 ;; esac
done

die() { echo "foundation.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (drop_caches, mounts)"
tools=(cc python3 mountpoint findmnt timeout)
want io && tools+=(fio)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || die "$tool not found (run .ci/install-deps.sh)"
done
if [ -n "$SPINFS" ]; then
    [ -x "$SPINFS" ] || command -v "$SPINFS" >/dev/null || die "spinfs binary not found: $SPINFS"
fi

work=$(mktemp -d "$BENCH_DIR/spinfs-bench.XXXXXX")
ovl_mnt=$work/ovl/merged
spin_mnt=$work/spinfs/mnt
spin_store=$work/spinfs/store
ovl_mounted=0
spin_mounted=0

cleanup() {
    local rc=$?
    set +e
    if [ "$spin_mounted" = 1 ] && mountpoint -q "$spin_mnt"; then
        timeout 60 "$SPINFS" umount "$spin_mnt" >&2 \
            || echo "foundation.sh: '$SPINFS umount' failed" >&2
        if mountpoint -q "$spin_mnt"; then
            echo "foundation.sh: spinfs still mounted, lazy unmount" >&2
            umount -l "$spin_mnt"
        fi
    fi
    if [ "$ovl_mounted" = 1 ] && mountpoint -q "$ovl_mnt"; then
        umount "$ovl_mnt" || umount -l "$ovl_mnt"
    fi
    # Never rm -rf through a mount point that is still mounted.
    if ! mountpoint -q "$spin_mnt" 2>/dev/null && ! mountpoint -q "$ovl_mnt" 2>/dev/null; then
        rm -rf "$work"
    else
        echo "foundation.sh: left $work in place (something is still mounted)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fstype=$(findmnt -n -o FSTYPE -T "$work")
echo "# foundation benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ) kernel $(uname -r) nproc $(nproc)"
echo "# base dir $work on $fstype ($(findmnt -n -o SOURCE -T "$work")); seq file ${SIZE_MIB} MiB;" \
    "meta files $NFILES; random-read runs ${RAND_SECS}s; rounds $REPEAT (median reported)"
[ "$fstype" = ext4 ] || echo "# WARNING: base dir is on $fstype, not ext4: 'native' is not native ext4"

cc -O2 -o "$work/fsbench" "$here/fsbench.c" || die "cannot build bench/fsbench.c"
fsbench=$work/fsbench

drop_caches() {
    sync
    echo 3 > /proc/sys/vm/drop_caches
}

# field KEY: the value of "KEY value" in fsbench's output on stdin
field() { awk -v k="$1" '$1 == k { print $2 }'; }

fio_randread() { # FILE INVALIDATE -> IOPS
    timeout "$OP_TIMEOUT" fio --name=randread --filename="$1" --rw=randread --bs=4k \
        --ioengine=psync --direct=0 --numjobs=1 --time_based=1 --runtime="$RAND_SECS" \
        --norandommap=1 --randrepeat=1 --invalidate="$2" --output-format=json \
        | python3 -c 'import json, sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}

median() { # values... -> median (lower middle for an even count)
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

declare -A runs # "<target>_<metric>" -> space-separated values, one per round
declare -A fig  # "<target>_<metric>" -> reported figure
add() { # KEY VALUE: record one run; a missing or non-numeric figure aborts the benchmark
    [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "no valid figure for $1: '$2'"
    runs[$1]="${runs[$1]:-} $2"
}

io_round() { # NAME DIR: sequential write/read, then random reads of the same file
    local name=$1 f=$2/seq.bin out
    drop_caches
    out=$(timeout "$OP_TIMEOUT" "$fsbench" seqwrite "$f" "$SIZE_MIB")
    add "${name}_seq_write_MBps" "$(field MBps <<<"$out")"
    if ! want io; then
        rm -f "$f"
        return
    fi
    drop_caches
    out=$(timeout "$OP_TIMEOUT" "$fsbench" seqread "$f")
    [ "$(field bytes <<<"$out")" = $((SIZE_MIB * 1048576)) ] || die "$name: short read of $f"
    add "${name}_seq_read_MBps" "$(field MBps <<<"$out")"
    out=$(timeout "$OP_TIMEOUT" "$fsbench" seqread "$f")
    add "${name}_seq_read_hot_MBps" "$(field MBps <<<"$out")"
    drop_caches
    add "${name}_rand_read_iops" "$(fio_randread "$f" 1)"
    timeout "$OP_TIMEOUT" "$fsbench" seqread "$f" >/dev/null
    add "${name}_rand_read_hot_iops" "$(fio_randread "$f" 0)"
    rm -f "$f"
}

rdwr_round() { # NAME DIR: the same through O_RDWR descriptors
    local name=$1 f=$2/rdwr.bin out
    drop_caches
    out=$(timeout "$OP_TIMEOUT" "$fsbench" seqwrite-rdwr "$f" "$SIZE_MIB")
    add "${name}_seq_write_rdwr_MBps" "$(field MBps <<<"$out")"
    timeout "$OP_TIMEOUT" "$fsbench" seqread-rdwr "$f" >/dev/null
    out=$(timeout "$OP_TIMEOUT" "$fsbench" seqread-rdwr "$f")
    [ "$(field bytes <<<"$out")" = $((SIZE_MIB * 1048576)) ] || die "$name: short read of $f"
    add "${name}_seq_read_rdwr_hot_MBps" "$(field MBps <<<"$out")"
    out=$(timeout "$OP_TIMEOUT" "$fsbench" randread-rdwr "$f" "$RAND_SECS")
    add "${name}_rand_read_rdwr_hot_iops" "$(field iops <<<"$out")"
    rm -f "$f"
}

meta_round() { # NAME DIR ROUND
    local name=$1 d=$2/meta.$3 out
    mkdir "$d"
    drop_caches
    out=$(timeout "$OP_TIMEOUT" "$fsbench" meta "$d" "$NFILES")
    add "${name}_meta_ops_per_s" "$(field ops <<<"$out")"
    add "${name}_create_per_s" "$(field create_ops <<<"$out")"
    add "${name}_stat_per_s" "$(field stat_ops <<<"$out")"
    add "${name}_unlink_per_s" "$(field unlink_ops <<<"$out")"
    rmdir "$d"
}

ratio() { # OUT_NAME NUM_KEY DEN_KEY
    awk -v n="${fig[$2]}" -v d="${fig[$3]}" -v k="$1" 'BEGIN { printf "%s %.3f\n", k, n / d }'
}

# Set up every target first.
names=(native overlayfs)
dirs=("$work/native")
mkdir -p "$work/native"
mkdir -p "$work/ovl/lower" "$work/ovl/upper" "$work/ovl/work" "$ovl_mnt"
mount -t overlay overlay \
    -o "lowerdir=$work/ovl/lower,upperdir=$work/ovl/upper,workdir=$work/ovl/work" "$ovl_mnt"
ovl_mounted=1
dirs+=("$ovl_mnt")
if [ -n "$SPINFS" ]; then
    mkdir -p "$spin_store" "$spin_mnt"
    # shellcheck disable=SC2086  # extra arguments are meant to be word-split
    timeout 300 "$SPINFS" mkfs "$spin_store" ${SPINFS_MKFS_ARGS:-} || die "spinfs mkfs failed"
    spin_mounted=1 # from here on, cleanup unmounts whatever got mounted
    # shellcheck disable=SC2086
    timeout 120 "$SPINFS" mount "$spin_store" "$spin_mnt" ${SPINFS_MOUNT_ARGS:-} \
        || die "spinfs mount failed"
    mountpoint -q "$spin_mnt" || die "'$SPINFS mount' returned but $spin_mnt is not a mount point"
    echo "# spinfs mounted: $(findmnt -n -o FSTYPE,SOURCE,OPTIONS "$spin_mnt")"
    names+=(spinfs)
    dirs+=("$spin_mnt")
else
    echo "# spinfs skipped: no SPINFS binary given (bench/foundation.sh SPINFS_BINARY or SPINFS=...)"
fi

if want io || want seq_write; then
    for ((r = 1; r <= REPEAT; r++)); do
        for i in "${!names[@]}"; do
            io_round "${names[$i]}" "${dirs[$i]}"
        done
    done
fi
if want rdwr; then
    for ((r = 1; r <= REPEAT; r++)); do
        for i in "${!names[@]}"; do
            rdwr_round "${names[$i]}" "${dirs[$i]}"
        done
    done
fi
if want meta; then
    for ((r = 1; r <= REPEAT; r++)); do
        for i in "${!names[@]}"; do
            meta_round "${names[$i]}" "${dirs[$i]}" "$r"
        done
    done
fi

metrics=()
if want io; then
    metrics+=(seq_write_MBps seq_read_MBps seq_read_hot_MBps rand_read_iops rand_read_hot_iops)
elif want seq_write; then
    metrics+=(seq_write_MBps)
fi
want rdwr && metrics+=(seq_write_rdwr_MBps seq_read_rdwr_hot_MBps rand_read_rdwr_hot_iops)
want meta && metrics+=(meta_ops_per_s create_per_s stat_per_s unlink_per_s)
for n in "${names[@]}"; do
    for m in "${metrics[@]}"; do
        # shellcheck disable=SC2086  # word-split the list of runs
        fig[${n}_$m]=$(median ${runs[${n}_$m]})
    done
    line="# $n runs:"
    for m in seq_write_MBps seq_read_MBps seq_read_hot_MBps rand_read_iops rand_read_hot_iops \
        seq_write_rdwr_MBps seq_read_rdwr_hot_MBps rand_read_rdwr_hot_iops meta_ops_per_s; do
        short=${m%_MBps}
        short=${short%_iops}
        short=${short%_per_s}
        [ -n "${runs[${n}_$m]:-}" ] && line+=" $short${runs[${n}_$m]};"
    done
    echo "${line%;}"
    for m in "${metrics[@]}"; do
        echo "${n}_$m ${fig[${n}_$m]}"
    done
done

# ratio_if OUT NUM DEN: the ratio, when both figures were measured
ratio_if() { [ -n "${fig[$2]:-}" ] && [ -n "${fig[$3]:-}" ] && ratio "$@" || true; }
for m in seq_write seq_read seq_read_hot seq_write_rdwr seq_read_rdwr_hot; do
    ratio_if "overlayfs_${m}_vs_native" "overlayfs_${m}_MBps" "native_${m}_MBps"
done
for m in rand_read rand_read_hot rand_read_rdwr_hot; do
    ratio_if "overlayfs_${m}_vs_native" "overlayfs_${m}_iops" "native_${m}_iops"
done
ratio_if overlayfs_meta_ops_vs_native overlayfs_meta_ops_per_s native_meta_ops_per_s

umount "$ovl_mnt"
ovl_mounted=0

if [ -z "$SPINFS" ]; then
    echo "spinfs_measured 0"
    exit 0
fi
timeout 120 "$SPINFS" umount "$spin_mnt" || die "spinfs umount failed"
mountpoint -q "$spin_mnt" && die "$spin_mnt still mounted after '$SPINFS umount'"
spin_mounted=0
echo "spinfs_measured 1"

ratio_if seq_write_vs_native spinfs_seq_write_MBps native_seq_write_MBps
ratio_if seq_read_vs_native spinfs_seq_read_MBps native_seq_read_MBps
ratio_if seq_read_hot_vs_native spinfs_seq_read_hot_MBps native_seq_read_hot_MBps
ratio_if rand_read_vs_native spinfs_rand_read_iops native_rand_read_iops
ratio_if rand_read_hot_vs_native spinfs_rand_read_hot_iops native_rand_read_hot_iops
ratio_if seq_write_rdwr_vs_native spinfs_seq_write_rdwr_MBps native_seq_write_rdwr_MBps
ratio_if seq_read_rdwr_hot_vs_native spinfs_seq_read_rdwr_hot_MBps native_seq_read_rdwr_hot_MBps
ratio_if rand_read_rdwr_hot_vs_native spinfs_rand_read_rdwr_hot_iops native_rand_read_rdwr_hot_iops
ratio_if meta_ops_vs_native spinfs_meta_ops_per_s native_meta_ops_per_s
ratio_if meta_ops_vs_overlayfs spinfs_meta_ops_per_s overlayfs_meta_ops_per_s
