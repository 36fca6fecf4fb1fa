#!/usr/bin/env bash
# Run pjdfstest (crates.io rewrite, pinned in .ci/install-deps.sh) against DIR and demand that
# the set of failing test cases is EXACTLY the expected set.
#
# usage: scripts/pjdfstest.sh DIR [EXPECTED_FAILURES_FILE]
#   DIR                     directory on the filesystem under test (must exist; run as root so
#                           that the privileged and user-switching cases run)
#   EXPECTED_FAILURES_FILE  one test name per line (e.g. chmod::change_perm::char); blank lines
#                           and "# reason" comments (whole-line or trailing) are allowed.
#                           Default: no failures expected.
# env:
#   PJDFSTEST_CONFIG        config file (default tests/pjdfstest/pjdfstest.toml)
#   PJDFSTEST_LOG           where to keep pjdfstest's full output (default: a temp file, printed)
#   PJDFSTEST_TIMEOUT       seconds before the run is killed (default 900)
#   PJDFSTEST_SECONDARY_FS  directory on another filesystem for the exdev cases (default none:
#                           those 2 cases are skipped, as in the reference counts)
#
# Exit 0 only if: pjdfstest ran to its summary, and failed == expected (no unexpected failure,
# no expected failure that passed or was skipped, no expected name that pjdfstest lacks).
# Prints "N passed, N failed, N skipped" (pjdfstest's own counts) as the last line.
set -euo pipefail

# cargo-installed tools (.ci/install-deps.sh) live here; CI may not have it on PATH.
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

here=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 DIR [EXPECTED_FAILURES_FILE]" >&2
    exit 2
fi
dir=$1
expected_file=${2:-}
config=${PJDFSTEST_CONFIG:-$here/tests/pjdfstest/pjdfstest.toml}
timeout_s=${PJDFSTEST_TIMEOUT:-900}

command -v pjdfstest >/dev/null || { echo "pjdfstest.sh: pjdfstest not installed (.ci/install-deps.sh)" >&2; exit 2; }
[ -d "$dir" ] || { echo "pjdfstest.sh: not a directory: $dir" >&2; exit 2; }
[ -f "$config" ] || { echo "pjdfstest.sh: config not found: $config" >&2; exit 2; }
if [ -n "$expected_file" ] && [ ! -f "$expected_file" ]; then
    echo "pjdfstest.sh: expected-failures file not found: $expected_file" >&2
    exit 2
fi
[ "$(id -u)" -eq 0 ] || echo "pjdfstest.sh: WARNING: not root; privileged cases will be skipped" >&2
# Many cases switch to the dummy users (nobody, daemon): every ancestor of DIR must be
# searchable by others, or those cases fail with EACCES for reasons unrelated to the filesystem
# (e.g. a `mktemp -d` parent, mode 0700).
p=$(cd "$dir" && pwd -P)
while [ "$p" != / ]; do
    p=$(dirname "$p")
    if [ $(( 0$(stat -c %a "$p") & 1 )) -eq 0 ]; then
        echo "pjdfstest.sh: $p (an ancestor of $dir) is not searchable by others (mode $(stat -c %a "$p")); chmod o+x it" >&2
        exit 2
    fi
done

tmp=$(mktemp -d /tmp/pjdfstest-run.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
log=${PJDFSTEST_LOG:-$(mktemp /tmp/pjdfstest-log.XXXXXX)}

extra=()
if [ -n "${PJDFSTEST_SECONDARY_FS:-}" ]; then
    extra=(-s "$PJDFSTEST_SECONDARY_FS")
fi

echo "pjdfstest.sh: dir=$dir fstype=$(findmnt -n -o FSTYPE -T "$dir") config=$config expected=${expected_file:-<none>}"
start=$(date +%s.%N)
set +e
# Run from / so that a relative cwd on the target cannot interfere; no colours in the log.
(cd / && NO_COLOR=1 CLICOLOR=0 timeout "$timeout_s" \
    pjdfstest -c "$config" -p "$dir" "${extra[@]}") >"$log" 2>&1
rc=$?
set -e
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

summary=$(grep -E '^Summary: ' "$log" | tail -1 || true)
if [ -z "$summary" ]; then
    echo "pjdfstest.sh: pjdfstest did not finish (exit $rc after ${secs}s, no summary); log: $log" >&2
    tail -20 "$log" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

# Result lines are "<name><spaces><status>" with status ok | FAILED | skipped (and, when the
# config itself lists expected failures, "failed as expected" / "PASSED UNEXPECTEDLY").
sed -nE 's/^([A-Za-z0-9_:]+) +(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$/\1\t\2/p' \
    "$log" >"$tmp/results"
awk -F'\t' '$2 == "FAILED" || $2 == "failed as expected" { print $1 }' "$tmp/results" \
    | sort -u >"$tmp/failed"
awk -F'\t' '$2 == "ok" || $2 == "PASSED UNEXPECTEDLY" { print $1 }' "$tmp/results" | sort -u >"$tmp/passed"
awk -F'\t' '$2 == "skipped" { print $1 }' "$tmp/results" | sort -u >"$tmp/skipped"
cut -f1 "$tmp/results" | sort -u >"$tmp/all"
n_failed=$(wc -l <"$tmp/failed")
n_passed=$(wc -l <"$tmp/passed")
n_skipped=$(wc -l <"$tmp/skipped")

# Cross-check the parse against pjdfstest's own summary line.
s_failed=x s_skipped=x s_passed=x
read -r s_failed s_skipped s_passed < <(sed -nE \
    's/^Summary: ([0-9]+) failed, ([0-9]+) skipped, ([0-9]+) passed.*/\1 \2 \3/p' <<<"$summary") || true
if [ "$s_failed" != "$n_failed" ] || [ "$s_skipped" != "$n_skipped" ] || [ "$s_passed" != "$n_passed" ]; then
    echo "pjdfstest.sh: parsed $n_failed failed/$n_skipped skipped/$n_passed passed but pjdfstest says: $summary" >&2
    echo "pjdfstest.sh: log: $log" >&2
    echo "$n_passed passed, $((n_failed + 1)) failed, $n_skipped skipped"
    exit 1
fi

if [ -n "$expected_file" ]; then
    sed -e 's/#.*//' -e 's/[[:space:]]//g' "$expected_file" | { grep -v '^$' || true; } | sort -u >"$tmp/expected"
else
    : >"$tmp/expected"
fi

status=0
unexpected=$(comm -23 "$tmp/failed" "$tmp/expected")
if [ -n "$unexpected" ]; then
    echo "pjdfstest.sh: UNEXPECTED FAILURES ($(wc -l <<<"$unexpected")):"
    while read -r t; do
        # first line of pjdfstest's message for that case
        msg=$(grep -A1 -E "^$t +FAILED$" "$log" | sed -n '2p' | sed 's/^[[:space:]]*//')
        echo "  $t: $msg"
    done <<<"$unexpected"
    status=1
fi
newly_passing=$(comm -12 "$tmp/expected" "$tmp/passed")
if [ -n "$newly_passing" ]; then
    echo "pjdfstest.sh: EXPECTED TO FAIL BUT PASSED ($(wc -l <<<"$newly_passing")) - remove from $expected_file:"
    sed 's/^/  /' <<<"$newly_passing"
    status=1
fi
expected_skipped=$(comm -12 "$tmp/expected" "$tmp/skipped")
if [ -n "$expected_skipped" ]; then
    echo "pjdfstest.sh: EXPECTED TO FAIL BUT SKIPPED:"
    sed 's/^/  /' <<<"$expected_skipped"
    status=1
fi
unknown=$(comm -23 "$tmp/expected" "$tmp/all")
if [ -n "$unknown" ]; then
    echo "pjdfstest.sh: EXPECTED FAILURES THAT PJDFSTEST DOES NOT HAVE (typo or renamed?):"
    sed 's/^/  /' <<<"$unknown"
    status=1
fi

if [ $status -eq 0 ]; then
    echo "pjdfstest.sh: OK in ${secs}s: failures match the expected set ($(wc -l <"$tmp/expected") expected)"
    [ -z "${PJDFSTEST_LOG:-}" ] && rm -f "$log"
else
    echo "pjdfstest.sh: MISMATCH after ${secs}s; full log: $log"
fi
echo "$n_passed passed, $n_failed failed, $n_skipped skipped"
exit $status
