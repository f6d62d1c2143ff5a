#!/usr/bin/env bash
# The long form of the reliability suite (issue 6), one command:
#
#   crash:    tests/reliability_crash.rs with many SIGKILLs (default 25; CI runs 5)
#   storage:  tests/reliability_storage.rs (full tmpfs, full LMDB map, ext4 shut
#             down under load)
#   remote:   tests/reliability_remote.rs with a 2,000-message fault storm (CI: 200)
#   load:     tests/reliability_load.rs, 10,000 held connections (as in CI)
#   hostile:  abuse matrix, corpus replay, and the session property test with
#             10,000 cases (CI: 256)
#
# It prints the RESULT / figure lines of each. Needs root (mounts, loop devices,
# open-file limits) like CI. Fuzzing itself runs from fuzz/run.sh (nightly).
#
# Usage: bench/reliability.sh [KILLS] [SEED]
#   KILLS  SIGKILLs in the crash test (default 25)
#   SEED   replay the kill moments of an earlier run (printed as SLUICE_CRASH_SEED)
# Env: SLUICE_CRASH_MESSAGES messages per sending round (default 800).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
export SLUICE_CRASH_KILLS=${1:-25}
if [[ -n ${2:-} ]]; then
    export SLUICE_CRASH_SEED=$2
fi
LOG=$(mktemp /tmp/sluice-reliability.XXXXXX)
trap 'rm -f "$LOG"' EXIT

# The tests find sluice-loadgen next to sluice.
cargo build --release -p sluice-engine -p sluice-loadgen --bins
echo "== $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname): $(nproc) CPUs, $(uname -r)"
echo "== crash test: $SLUICE_CRASH_KILLS kills"
cargo nextest run --release -p sluice-engine --test reliability_crash --no-capture 2>&1 \
    | tee "$LOG" | grep -E '^(crash test|kill [0-9]+|RESULT)' || true
grep -q '^RESULT' "$LOG" || { echo "crash test failed:"; tail -50 "$LOG"; exit 1; }
echo "== storage faults"
cargo nextest run --release -p sluice-engine --test reliability_storage --no-capture 2>&1 \
    | tee "$LOG" | grep -E '^(full |I/O error|loadgen:|RESULT)|PASS|FAIL' || true
grep -q 'FAIL' "$LOG" && { echo "storage tests failed:"; tail -50 "$LOG"; exit 1; }
echo "== remote faults: 2000-message storm"
RELIABILITY_REMOTE_MESSAGES=${RELIABILITY_REMOTE_MESSAGES:-2000} \
    cargo nextest run --release -p sluice-engine --test reliability_remote --no-capture 2>&1 \
    | tee "$LOG" | grep -E 'RESULT|storm|sockets|PASS|FAIL' || true
grep -q 'FAIL' "$LOG" && { echo "remote-fault tests failed:"; tail -50 "$LOG"; exit 1; }
echo "== load held"
cargo nextest run --release -p sluice-engine --test reliability_load --no-capture 2>&1 \
    | tee "$LOG" | grep -E 'RESULT|RSS|held|PASS|FAIL' || true
grep -q 'FAIL' "$LOG" && { echo "load tests failed:"; tail -50 "$LOG"; exit 1; }
echo "== hostile input: abuse matrix, corpus replay, 10000 property cases"
PROPTEST_CASES=${PROPTEST_CASES:-10000} \
    cargo nextest run --release -p sluice-engine --test abuse --test fuzz_replay --test server_props 2>&1 \
    | tee "$LOG" | grep -E 'PASS|FAIL' || true
grep -q 'FAIL' "$LOG" && { echo "hostile-input tests failed:"; tail -50 "$LOG"; exit 1; }
echo "== done"
