#!/usr/bin/env bash
# The inputs of the scaling model (BENCHMARKS.md "Scaling beyond this box", issue 18 item 7):
# for server.cores = 1 and 2, with the spool's fsync on and off, relays N × 1 KiB messages
# from sluice-loadgen (persistent pipelined connections) to a sluice-loadgen sink and reports,
# per cell:
#   - delivered msg/s (source start → the sink's last message);
#   - CPU per message of the relay, of the source and of the sink (utime+stime from /proc);
#   - group commits: count, mean latency and operations per commit (the relay's
#     sluice_spool_commit_seconds and sluice_spool_commit_batch_size, scraped from /metrics;
#     a relayed message is two operations, its store and its removal);
#   - the model's two bounds for the cell: CPU (nproc ÷ the three CPUs per message, the box
#     being shared by all three) and latency (connections ÷ the time one connection's message
#     takes: 1.5 mean commits, the rest of the commit in progress when it arrives plus its
#     own, plus the rest of its round trip, taken from the fsync-off cell of the same cores),
#     and the model's prediction, the lower of the two.
#
# Usage: bench/scaling.sh [--bin-dir DIR] [--messages N] [--conns "32 128"] [--rounds N]
#   --bin-dir DIR   holds sluice and sluice-loadgen (default target/release)
#   --messages N    per cell (default 10000)
#   --conns LIST    connection counts (default "32 128")
#   --rounds N      repeat the whole grid N times, cells interleaved (default 1)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$REPO/target/release" MESSAGES=10000 CONNS="32 128" ROUNDS=1
log() { echo "scaling: $*" >&2; }
die() { log "$*"; exit 1; }
START_TIMEOUT_TICKS=200 STOP_TIMEOUT_TICKS=100
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN=${2:?}; shift ;;
        --messages) MESSAGES=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[[ "$MESSAGES" =~ ^[1-9][0-9]*$ ]] || die "--messages wants a positive integer"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer"
for tool in curl jq awk; do command -v "$tool" >/dev/null || die "needs $tool"; done
[ -x "$BIN/sluice" ] && [ -x "$BIN/sluice-loadgen" ] || die "no sluice/sluice-loadgen in $BIN"

# shellcheck source=bench/lib/procs.sh
. "$REPO/bench/lib/procs.sh"
WORK=$(mktemp -d /var/tmp/sluice-scaling.XXXXXX)
HZ=$(getconf CLK_TCK)
NPROC=$(nproc)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
metric() { # PORT NAME: the sum over the metric's series
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%.6f\n", s }'
}

# One cell: prints "msgs_per_s relay_us source_us sink_us commits commit_ms ops_per_commit".
cell() { # CORES SYNC CONNS
    local dir="$WORK/c$1-$2-$3-$RANDOM" sink_port stats_port port admin sink relay t0 t1 src
    mkdir -p "$dir"
    sink_port=$(free_port) stats_port=$(free_port) port=$(free_port) admin=$(free_port)
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$sink_port" --stats-listen "127.0.0.1:$stats_port" \
        --no-tokens >"$dir/sink.log" 2>&1 &
    sink=$!; PIDS+=("$sink")
    wait_listening "$stats_port" "$sink" sink
    "$BIN/sluice" run --set delivery.enabled=true \
        --set "route.default={type=\"relay\",host=\"127.0.0.1\",port=$sink_port,tls=\"none\"}" \
        --set 'dns.servers=["127.0.0.1:9"]' --set log.level=warn --set "admin.listen=\"127.0.0.1:$admin\"" \
        --set "server.listener.smtp.bind=[\"127.0.0.1:$port\"]" \
        --set server.listener.smtp.max_connections_per_ip=1024 \
        --set "spool.path=\"$dir/spool\"" --set "server.cores=$1" --set "spool.sync=$2" \
        >"$dir/sluice.log" 2>&1 &
    relay=$!; PIDS+=("$relay")
    wait_listening "$port" "$relay" sluice
    wait_listening "$admin" "$relay" "sluice admin"
    local r0 k0 c0 s0 b0
    r0=$(ticks "$relay") k0=$(ticks "$sink")
    c0=$(metric "$admin" sluice_spool_commit_seconds_count) s0=$(metric "$admin" sluice_spool_commit_seconds_sum)
    b0=$(metric "$admin" sluice_spool_commit_batch_size_sum)
    t0=$(now_ms)
    /usr/bin/time -f "%U %S" -o "$dir/source.time" "$BIN/sluice-loadgen" send --target "127.0.0.1:$port" \
        --connections "$3" --messages "$MESSAGES" --size 1024 --json >"$dir/source.json" 2>"$dir/source.log" \
        || die "loadgen failed (see $dir)"
    local i=0 got
    while :; do
        got=$(curl -s --max-time 2 "http://127.0.0.1:$stats_port/stats" | jq -r '.recipients // 0')
        [ "${got:-0}" -ge "$MESSAGES" ] && break
        [ $i -lt 1200 ] || die "sink got $got of $MESSAGES in 120 s (see $dir)"
        sleep 0.1; i=$((i + 1))
    done
    t1=$(now_ms)
    local r1 k1 c1 s1 b1
    r1=$(ticks "$relay") k1=$(ticks "$sink")
    c1=$(metric "$admin" sluice_spool_commit_seconds_count) s1=$(metric "$admin" sluice_spool_commit_seconds_sum)
    b1=$(metric "$admin" sluice_spool_commit_batch_size_sum)
    src=$(awk '{ print $1 + $2 }' "$dir/source.time")
    stop_pid "$relay"; stop_pid "$sink"
    awk -v n="$MESSAGES" -v ms=$((t1 - t0)) -v hz="$HZ" -v r=$((r1 - r0)) -v k=$((k1 - k0)) -v src="$src" \
        -v c="$c0" -v c1="$c1" -v s="$s0" -v s1="$s1" -v b="$b0" -v b1="$b1" 'BEGIN {
        commits = c1 - c
        printf "%.0f %.1f %.1f %.1f %d %.2f %.1f\n", n * 1000 / ms, r / hz * 1e6 / n, src * 1e6 / n, k / hz * 1e6 / n,
            commits, (commits > 0 ? (s1 - s) * 1000 / commits : 0), (commits > 0 ? (b1 - b) / commits : 0) }'
    rm -rf "$dir/spool"
}

echo "sluice scaling inputs: $MESSAGES × 1 KiB per cell, sluice-loadgen pipelined, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine: nproc $NPROC ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), binaries $BIN"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| round | cores | fsync | conns | delivered msg/s | relay µs/msg | source µs/msg | sink µs/msg | commits | mean commit ms | operations/commit | CPU bound msg/s | latency bound msg/s | model msg/s | measured ÷ model |"
echo "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
declare -A RATE
for round in $(seq 1 "$ROUNDS"); do
    for conns in $CONNS; do
        for cores in 1 2; do
            # fsync off first: its "rest of a message's time" feeds the fsync-on cell's bound.
            for sync in false true; do
                # Not in a subshell: the pids it starts must reach this shell's PIDS,
                # so the exit trap stops them if the cell fails.
                cell "$cores" "$sync" "$conns" >"$WORK/cell.out"
                read -r rate relay_us src_us sink_us commits commit_ms per_commit <"$WORK/cell.out"
                RATE[$cores-$sync-$conns]=$rate
                cpu_bound=$(awk -v p="$NPROC" -v a="$relay_us" -v b="$src_us" -v c="$sink_us" 'BEGIN { printf "%.0f", p * 1e6 / (a + b + c) }')
                if [ "$sync" = true ]; then
                    # One connection's message takes the commit plus what it takes without one.
                    lat_bound=$(awk -v n="$conns" -v cm="$commit_ms" -v off="${RATE[$cores-false-$conns]}" \
                        'BEGIN { rest = n / off; printf "%.0f", n / (1.5 * cm / 1000 + rest) }')
                    fs=on
                else
                    lat_bound="–"; fs=off
                fi
                model=$(awk -v a="$cpu_bound" -v b="$lat_bound" 'BEGIN { if (b == "–" || a + 0 < b + 0) print a; else print b }')
                ratio=$(awk -v m="$rate" -v p="$model" 'BEGIN { printf "%.2f", m / p }')
                echo "| $round | $cores | $fs | $conns | $rate | $relay_us | $src_us | $sink_us | $commits | $commit_ms | $per_commit | $cpu_bound | $lat_bound | $model | $ratio |"
            done
        done
    done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
