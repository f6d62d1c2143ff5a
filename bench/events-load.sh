#!/usr/bin/env bash
# Delivery events under load (issue 15 item 5): sluice with events off, to a JSON-lines file
# and to a webhook, beside Postfix, in one run of bench/relay-vs-postfix.sh (same source,
# same sink, fresh spool each). The table's notes give each events setup's throughput
# divided by sluice with events off (the target: within 10%, i.e. >= 0.90).
#
# Usage: bench/events-load.sh [--quick] [--messages N] [--size BYTES] [--conns N] [--no-postfix]
#                             [any further relay-vs-postfix.sh option, e.g. --no-build]
#   --quick        a smoke run: 300 messages (machine may be busy; figures mean nothing)
#   --messages N   messages per measurement (default 20000)
#   --size BYTES   message size (default 1024)
#   --conns N      concurrent source connections (default 32)
#   --no-postfix   leave Postfix out (it needs root)
# The source is sluice-loadgen send (persistent pipelined connections). Results are printed,
# not appended to BENCHMARKS.md unless --append is passed. Run it on a quiet machine.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=1024 CONNS=32 SETUPS="sluice,sluice-evfile,sluice-evhook,postfix" MESSAGES="" APPEND=--no-append
rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MESSAGES=${MESSAGES:-300} ;;
        --messages) MESSAGES=${2:?}; shift ;;
        --size) SIZE=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --no-postfix) SETUPS="sluice,sluice-evfile,sluice-evhook" ;;
        --append) APPEND=--append ;;
        -h|--help) sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) rest+=("$1") ;;
    esac
    shift
done
exec "$REPO/bench/relay-vs-postfix.sh" --source loadgen "$APPEND" --messages "${MESSAGES:-20000}" \
    --case "$SIZE $CONNS 1 off $SETUPS" "${rest[@]}"
