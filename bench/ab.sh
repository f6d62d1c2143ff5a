#!/usr/bin/env bash
# Interleaved A/B of two sluice builds on one case of bench/relay-vs-postfix.sh.
#
# One before/after pair of runs says little on a noisy 2-vCPU box: the machine drifts
# between them. This runs ROUNDS rounds; each round measures A then B, the next B then
# A (so a steady drift favours neither), each with the same source, sink and case, and
# prints per round B ÷ A for delivered msg/s and relay CPU per 1000 messages, then the
# median of each. Postfix is not measured (it is the same in A and B); the ceiling is,
# once per round, to show how the machine drifted.
#
# Usage: bench/ab.sh --a DIR --b DIR [--rounds N] [--messages N] [--source smtp-source|loadgen]
#                    [--case "SIZE CONNS RCPTS off|starttls"] [--cores N]
#   --a DIR / --b DIR  directories holding sluice and sluice-loadgen (e.g. two release builds)
#   --rounds N         rounds (default 4)
#   --messages N       messages per measurement (default 5000)
#   --case             as relay-vs-postfix.sh --case, without the setups (default "1024 32 1 off")
#   --cores N          server.cores for both (default: all; 1 = the "sluice1" setup)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A="" B="" ROUNDS=4 MESSAGES=5000 SOURCE=smtp-source CASE="1024 32 1 off" CORES=""
usage() { sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "ab: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A=${2:?}; shift ;;
        --b) B=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --messages) MESSAGES=${2:?}; shift ;;
        --source) SOURCE=${2:?}; shift ;;
        --case) CASE=${2:?}; shift ;;
        --cores) CORES=${2:?}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[ -n "$A" ] && [ -n "$B" ] || die "--a and --b are required"
for d in "$A" "$B"; do [ -x "$d/sluice" ] && [ -x "$d/sluice-loadgen" ] || die "$d has no sluice and sluice-loadgen"; done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer"
setup=sluice
[ "$CORES" = 1 ] && setup=sluice1
[ -z "$CORES" ] || [ "$CORES" = 1 ] || die "--cores takes 1 or nothing (all cores)"

# One measurement: prints "delivered cpu ceiling" from the run's result table.
measure() { # BIN_DIR SETUPS
    local out
    out=$("$REPO/bench/relay-vs-postfix.sh" --bin-dir "$1" --no-append --source "$SOURCE" \
        --messages "$MESSAGES" --case "$CASE $2" 2>/dev/null) || die "relay-vs-postfix.sh failed for $1"
    # Table rows: | case | setup | accepted | delivered | p99 | cpu | ...
    awk -F' *\\| *' -v want="$setup" '
        $3 ~ /^ceiling/ { ceiling = $5 }
        (want == "sluice" && $3 ~ /^sluice \(cores=[0-9]+\)/ && $3 !~ /cores=1\)/) || (want == "sluice1" && $3 ~ /cores=1\)/) { d = $5; c = $7 }
        END { if (d == "") exit 1; printf "%s %s %s\n", d, c, (ceiling == "" ? "-" : ceiling) }' <<<"$out" \
        || die "no $setup row in the result for $1"
}

echo "A = $A (binaries as given; build each from the tree you want to compare)"
echo "B = $B"
echo "case: $CASE, setup $setup, source $SOURCE, $MESSAGES messages, $ROUNDS rounds, $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc)"
echo
echo "| round | order | A delivered msg/s | B delivered msg/s | B ÷ A delivered | A CPU s/1000 | B CPU s/1000 | B ÷ A CPU | ceiling msg/s |"
echo "|--:|---|--:|--:|--:|--:|--:|--:|--:|"
ratios=() cpu_ratios=()
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="A,B"; first=$A; second=$B; else order="B,A"; first=$B; second=$A; fi
    read -r d1 c1 ceil < <(measure "$first" "ceiling,$setup")
    read -r d2 c2 _ < <(measure "$second" "$setup")
    if [ "$order" = "A,B" ]; then da=$d1 ca=$c1 db=$d2 cb=$c2; else da=$d2 ca=$c2 db=$d1 cb=$c1; fi
    rd=$(awk -v a="$da" -v b="$db" 'BEGIN { printf "%.2f", b / a }')
    rc=$(awk -v a="$ca" -v b="$cb" 'BEGIN { printf "%.2f", b / a }')
    ratios+=("$rd") cpu_ratios+=("$rc")
    echo "| $r | $order | $da | $db | $rd | $ca | $cb | $rc | $ceil |"
done
# "median (range low–high)" of the arguments.
summary() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f (range %.2f–%.2f)", m, v[1], v[NR] }'
}
echo
echo "median B ÷ A: delivered $(summary "${ratios[@]}"), relay CPU $(summary "${cpu_ratios[@]}")"
