#!/bin/sh
# Bounded fuzz run of the EROFS reader for CI (about 2 minutes of build + SECONDS of fuzzing).
# Needs a C++ compiler (libFuzzer) and cargo-fuzz; stable rustc works with RUSTC_BOOTSTRAP=1.
set -eu
SECONDS_TO_RUN="${1:-60}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
RUSTC_BOOTSTRAP=1 cargo fuzz run reader "$scratch" corpus/reader -- \
    -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048
