#!/usr/bin/env bash
# Media benchmarks: append throughput (io_uring / pwrite / dd oflag=direct, same run) and
# scheduled vs FIFO recall through the media model. Usage: bench/media_bench.sh [DIR] [MiB] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p spinfs-media --example media_bench
exec target/release/examples/media_bench "$@"
