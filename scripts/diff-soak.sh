#!/usr/bin/env bash
# Soak the differential test (crates/cli/tests/differential.rs): many more random sequences
# than CI runs, in rounds with fresh seeds, until one diverges.
#
# usage: scripts/diff-soak.sh [N] [OPS] [FIRST_SEED]
#   N           sequences (default 2000), run in rounds of 200
#   OPS         operations per sequence (default 60)
#   FIRST_SEED  first seed (default: random, printed); sequence i uses FIRST_SEED + i
# A divergence prints the seed, the failing and the minimised step lists as
# SPINFS_DIFF_REPLAY='...' (replay: SPINFS_DIFF_REPLAY='...' cargo test -p spinfs --test
# differential differential_random_sequences). Needs root and /dev/fuse, like the test.
# The kernel overlayfs comparison runs on every sequence; SPINFS_DIFF_ORACLE_EVERY=K (every
# K-th seed) or SPINFS_DIFF_NO_ORACLE=1 in the environment thin it out.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-2000}
ops=${2:-60}
seed=${3:-$(( (RANDOM << 15 | RANDOM) * 1000 ))}
[[ $n =~ ^[0-9]+$ && $ops =~ ^[0-9]+$ && $seed =~ ^[0-9]+$ ]] || {
    echo "usage: $0 [N] [OPS] [FIRST_SEED]" >&2
    exit 2
}
cd "$here"
cargo build -q -p spinfs --tests
echo "diff-soak: $n sequences of $ops operations from seed $seed"
round=200
log=$(mktemp)
trap 'rm -f "$log"' EXIT
done_=0
while [ "$done_" -lt "$n" ]; do
    k=$(( n - done_ < round ? n - done_ : round ))
    status=0
    SPINFS_DIFF_SEQUENCES=$k SPINFS_DIFF_OPS=$ops SPINFS_DIFF_SEED=$(( seed + done_ )) \
        cargo test -q -p spinfs --test differential differential_random_sequences \
        -- --nocapture --test-threads=1 >"$log" 2>&1 || status=$?
    grep -v '^ *[0-9]*: \|^ *at ' "$log" || true
    if [ "$status" -ne 0 ]; then
        echo "diff-soak: divergence in seeds $(( seed + done_ ))..$(( seed + done_ + k - 1 ))" >&2
        exit 1
    fi
    done_=$(( done_ + k ))
    echo "diff-soak: $done_/$n sequences clean"
done
