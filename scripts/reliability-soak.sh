#!/usr/bin/env bash
# Reliability soak (issue 8 item 8), outside CI: for DURATION, concurrent writers and readers
# with forced seals and merges on fresh stores, crashes at random fail points and passes
# (SPINFS_FAILPOINTS) and kill -9 at random moments, power cuts on the simulated disk (every
# third epoch), and corruption of SSD caches (plus meta images and the manifest, detected and
# repaired by `spinfs fsck`, when the binary has it); every durable file is checked after
# each recovery. Prints the counts: operations, crash points, corruptions injected, files
# verified, bytes lost (must be 0; the run fails otherwise).
#
# usage: scripts/reliability-soak.sh [DURATION [NEXTEST ARGS...]]   (default 10m; run as root)
#        DURATION: seconds, or with a suffix s/m/h (e.g. 90s, 30m, 2h)
# env:   SPINFS_CRASH_SEED  replay a failing run (printed at the start)
#        SPINFS_TEST_DIR    where the test stores live (default /var/tmp/spt)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10m}
case $duration in
    *h) seconds=$(( ${duration%h} * 3600 )) ;;
    *m) seconds=$(( ${duration%m} * 60 )) ;;
    *s) seconds=${duration%s} ;;
    *) seconds=$duration ;;
esac
case $seconds in
    '' | *[!0-9]*) echo "usage: $0 [DURATION [NEXTEST ARGS...]]" >&2; exit 2 ;;
esac
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
export SPINFS_SOAK_SECONDS=$seconds
# Release build, as CI (the same binary, with its fail points compiled in for tests).
exec cargo nextest run --release -p spinfs --test reliability_soak --run-ignored only \
    --no-capture "${@:2}" reliability_soak
