#!/bin/sh
# Bounded fuzz run for CI: each target for SECONDS (default 20) from its committed seeds
# (corpus/TARGET) into a scratch corpus; fails on any crash. Prints the executions each target
# reached. Needs a C++ compiler (libFuzzer) and cargo-fuzz; stable rustc works with
# RUSTC_BOOTSTRAP=1. Targets: reader (EROFS meta images), manifest, container (media container
# header and record log), control (control-socket requests).
set -eu
SECONDS_TO_RUN="${1:-20}"
TARGETS="${FUZZ_TARGETS:-reader manifest container control}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
summary=""
for t in $TARGETS; do
    mkdir -p "$scratch/$t"
    RUSTC_BOOTSTRAP=1 cargo fuzz build "$t"
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048 -print_final_stats=1 \
        2>"$scratch/$t.log" || { tail -50 "$scratch/$t.log"; echo "fuzz: $t FAILED" >&2; exit 1; }
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log" | tail -1)
    summary="$summary
fuzz_execs $t ${execs:-?} in ${SECONDS_TO_RUN}s"
done
echo "$summary"
