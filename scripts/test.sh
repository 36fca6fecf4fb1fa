#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (Debian packages,
# pinned pjdfstest and fsx), then every unit, property and integration test of the workspace,
# in release mode (the daemon under fsx and pjdfstest runs optimised), with real FUSE mounts.
# Run as root from anywhere. Extra arguments go to cargo nextest (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo-nextest >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --release --locked --no-fail-fast "$@"
