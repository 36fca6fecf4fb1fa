#!/usr/bin/env bash
# Crash soak: the kill -9 crash-consistency tests (crates/cli/tests/crash.rs) with many more
# iterations than CI runs. Seals: each iteration writes files (some fsync'ed), forces and
# triggers seals, SIGKILLs the daemon at a random moment, remounts and checks recovery.
# Merges: each iteration seals a few changes over a 15,000-inode base, starts a merge and
# SIGKILLs the daemon during it, remounts and checks the layers (old or merged), leftovers,
# contents and inode numbers.
#
# usage: scripts/crash-soak.sh [ITERATIONS [NEXTEST ARGS...]]    (default 500; run as root)
# env:   SPINFS_CRASH_SEED  replay a failing run (the test prints its seed)
#        SPINFS_TEST_DIR    where test stores live (default /var/tmp/spt)
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-500}
case $iterations in
    '' | *[!0-9]*) echo "usage: $0 [ITERATIONS [NEXTEST ARGS...]]" >&2; exit 2 ;;
esac
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
export SPINFS_CRASH_ITERATIONS=$iterations
# Debug build, as the CI run of the same test (extra arguments go to cargo nextest, e.g.
# --release). About 0.6 s per iteration on 2 shared cores.
exec cargo nextest run -p spinfs --test crash --no-capture "${@:2}" kill_9_during
