#!/usr/bin/env bash
# Where the time goes: profile sluice during a 1 KiB relay run (issue 5, "profile").
#
# sluice-loadgen send (1 KiB x 1 rcpt, 32 connections) -> sluice (fsync on, defaults) ->
# sluice-loadgen sink, three passes over a fresh spool each:
#   1. perf stat (software counters: this VM exposes no hardware PMU)
#   2. perf record -e cpu-clock (flat, self time per symbol) -> top symbols
#   3. strace -c -f (syscall counts and time; strace slows sluice, so only the shares count)
#
# Usage: bench/profile-relay.sh [--messages N] [--port-base P] [--bin-dir DIR] [--workdir DIR]
#                               [--top K]
# Needs perf (apt-get install linux-perf), strace, curl, jq.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=100000 PORT_BASE=24700 BIN_SRC="$REPO/target/release" WORK_PARENT=/var/tmp TOP=25
die() { echo "profile-relay: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) N=${2:?}; shift ;;
        --port-base) PORT_BASE=${2:?}; shift ;;
        --bin-dir) BIN_SRC=${2:?}; shift ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        --top) TOP=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "--messages wants a positive integer"
for t in perf strace curl jq ss timeout; do command -v "$t" >/dev/null || die "missing $t"; done
RELAY_PORT=$PORT_BASE SINK_PORT=$((PORT_BASE + 1)) STATS_PORT=$((PORT_BASE + 2))

PIDS=() WORK=""
pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
stop_pid() { # PID [SIGNAL]
    local pid=$1 i=0
    pid_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    while pid_alive "$pid" && [ $i -lt 300 ]; do
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
        sleep 0.1; i=$((i + 1))
    done
    if pid_alive "$pid" && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    if [ -n "$WORK" ] && [ "$rc" = 0 ]; then rm -rf "$WORK"; elif [ -n "$WORK" ]; then log "kept $WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
port_listening() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }
wait_listening() {
    local i=0
    while ! port_listening "$1"; do
        pid_alive "$2" || die "$3 exited"; [ $i -lt 200 ] || die "$3 not listening"
        sleep 0.1; i=$((i + 1))
    done
}
sink_stat() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/stats" | jq -r ".$1 // empty" 2>/dev/null || true; }

WORK=$(mktemp -d "$WORK_PARENT/sluice-profile.XXXXXX")
BIN="$WORK/bin"; mkdir -p "$BIN"
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"

# pass NAME WRAPPER...: one relay run with sluice under observation by WRAPPER (attached by pid)
pass() {
    local name=$1; shift
    local dir="$WORK/$name" sink relay obs i=0 got
    mkdir -p "$dir/spool"
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$SINK_PORT" --stats-listen "127.0.0.1:$STATS_PORT" \
        --no-tokens >"$dir/sink.json" 2>"$dir/sink.err" &
    sink=$!; PIDS+=("$sink")
    wait_listening "$STATS_PORT" "$sink" sink
    "$BIN/sluice" run --set delivery.enabled=true \
        --set "route.default={type=\"relay\",host=\"127.0.0.1\",port=$SINK_PORT,tls=\"none\"}" \
        --set 'dns.servers=["127.0.0.1:9"]' --set log.level=warn --set 'admin.listen=""' \
        --set "server.listener.smtp.bind=[\"127.0.0.1:$RELAY_PORT\"]" \
        --set server.listener.smtp.max_connections_per_ip=1024 --set "spool.path=$dir/spool" \
        >"$dir/sluice.out" 2>"$dir/sluice.err" &
    relay=$!; PIDS+=("$relay")
    wait_listening "$RELAY_PORT" "$relay" sluice
    "$@" -p "$relay" >"$dir/obs.out" 2>"$dir/obs.err" &
    obs=$!; PIDS+=("$obs")
    sleep 1
    timeout 900 "$BIN/sluice-loadgen" send --target "127.0.0.1:$RELAY_PORT" --connections 32 \
        --messages "$N" --size 1024 --json >"$dir/send.json" 2>"$dir/send.err" || die "loadgen failed"
    while [ $i -lt 1200 ]; do
        got=$(sink_stat recipients)
        if [ -n "$got" ] && [ "$got" -ge "$N" ]; then break; fi
        sleep 0.25; i=$((i + 1))
    done
    stop_pid "$obs" INT
    log "$name: accepted $(jq -r '.msgs_per_sec | round' "$dir/send.json")/s, sink got ${got:-0}"
    stop_pid "$relay"; stop_pid "$sink"
}

log "work dir $WORK; $N messages per pass"
pass stat perf stat -e task-clock,context-switches,cpu-migrations,page-faults
pass record perf record -e cpu-clock -F 2999 -o "$WORK/record/perf.data"
pass strace strace -c -f -o "$WORK/strace/summary.txt"

# Report (each pipe ends in `|| true`: head closing early must not fail the script).
report() { perf report -i "$WORK/record/perf.data" --no-children --stdio "$@" 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed 's/ \+$//' | cut -c1-160 || true; }
echo "### perf stat (sluice, whole run of $N messages)"
echo
sed -n '/Performance counter stats/,$p' "$WORK/stat/obs.err" | sed 's/^/    /'
echo
echo "### perf record -e cpu-clock: share by thread and by DSO (sluice, all threads)"
echo
report --sort comm | head -n 10 | sed 's/^/    /' || true
echo
report --sort dso | head -n 8 | sed 's/^/    /' || true
echo
echo "### perf record: top $TOP symbols by self time, all DSOs"
echo
report --sort dso,symbol | head -n "$TOP" | sed 's/^/    /' || true
echo
echo "### perf record: top $TOP symbols inside the sluice binary"
echo
report --dsos sluice --sort symbol | head -n "$TOP" | sed 's/^/    /' || true
echo
echo "### strace -c -f (syscalls; strace overhead included)"
echo
head -n 25 "$WORK/strace/summary.txt" | sed 's/^/    /' || true
