#!/bin/sh
# Fuzz one target for a while: fuzz/run.sh TARGET [SECONDS] [extra libFuzzer flags]
# New inputs go to fuzz/corpus/TARGET (start points: that corpus and fuzz/seeds/TARGET);
# crashes to fuzz/artifacts/TARGET. The final "stat::" lines give executions and time.
# Safe Rust only, so no sanitizer (-s none) but with debug assertions (-a: overflow checks).
set -eu
cd "$(dirname "$0")"
target=$1
secs=${2:-600}
shift; [ $# -gt 0 ] && shift
mkdir -p "corpus/$target"
exec cargo +nightly fuzz run -O -a -s none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -print_final_stats=1 "$@"
