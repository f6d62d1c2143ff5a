#!/usr/bin/env bash
# Long form of the crash-safety and storage-fault tests (issue 6 items 1 and 2).
#
# Runs tests/reliability_crash.rs with many SIGKILLs (default 25; CI runs 5) and
# tests/reliability_storage.rs (full tmpfs, full LMDB map, ext4 shut down under
# load), then prints their RESULT lines: kills, acked, lost, duplicates. Needs
# root (mounts, loop devices) like CI.
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
echo "== done"
