#!/usr/bin/env bash
# Logging cost at log.level=info: two sluice binaries (e.g. before and after a change
# to the log writer) relay the same load, alternately, REPS times each.
#
#   sluice-loadgen send (1 KiB, 1 rcpt, --connections C) -> sluice -> sluice-loadgen sink
#
# sluice runs with delivery on, log.level=info (two lines per message: the transaction
# and the delivery attempt), stderr to a file (as under journald or a log file), fsync
# on, fresh spool per run. Reported per run: acceptance msgs/s (loadgen), end-to-end
# msgs/s (loadgen start until the sink counted every message), relay CPU s per 1000
# messages (/proc utime+stime), log lines written.
#
# Usage: bench/log-writer.sh BIN_A BIN_B [--messages N] [--connections C] [--reps R]
#                                        [--cores K] [--workdir DIR]
#   BIN_A, BIN_B  sluice binaries to compare (labelled A and B in the output)
#   defaults: 20000 messages, 32 connections, 3 reps, server.cores=0, /var/tmp
# Needs curl and jq; target/release/sluice-loadgen (cargo build --release).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOADGEN="$REPO/target/release/sluice-loadgen"
A=${1:?BIN_A}; B=${2:?BIN_B}; shift 2
MESSAGES=20000 CONNS=32 REPS=3 CORES=0 WORK_PARENT=/var/tmp
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) MESSAGES=${2:?}; shift ;;
        --connections) CONNS=${2:?}; shift ;;
        --reps) REPS=${2:?}; shift ;;
        --cores) CORES=${2:?}; shift ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        *) echo "log-writer: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

WORK=$(mktemp -d "$WORK_PARENT/sluice-logbench.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # PORT PID
    for _ in $(seq 1 200); do
        kill -0 "$2" 2>/dev/null || { echo "log-writer: process $2 exited" >&2; exit 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "log-writer: port $1 not listening" >&2; exit 1
}
cpu_s() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

run_one() { # LABEL BIN REP
    local dir="$WORK/$1-$3" sink sstats relay sink_pid relay_pid
    mkdir -p "$dir/spool"
    sink=$(free_port); sstats=$(free_port); relay=$(free_port)
    "$LOADGEN" sink --listen "127.0.0.1:$sink" --stats-listen "127.0.0.1:$sstats" --no-tokens \
        >"$dir/sink.json" 2>"$dir/sink.err" &
    sink_pid=$!; PIDS+=("$sink_pid")
    wait_port "$sstats" "$sink_pid"; wait_port "$sink" "$sink_pid"
    "$2" run --set delivery.enabled=true \
        --set "route.default={type=\"relay\",host=\"127.0.0.1\",port=$sink,tls=\"none\"}" \
        --set 'dns.servers=["127.0.0.1:9"]' --set log.level=info --set 'admin.listen=""' \
        --set "server.listener.smtp.bind=[\"127.0.0.1:$relay\"]" \
        --set server.listener.smtp.max_connections_per_ip=1024 \
        --set "server.cores=$CORES" --set "spool.path=\"$dir/spool\"" \
        >/dev/null 2>"$dir/sluice.log" &
    relay_pid=$!; PIDS+=("$relay_pid")
    wait_port "$relay" "$relay_pid"
    local cpu0 t0 t1 acc got
    cpu0=$(cpu_s "$relay_pid"); t0=$(date +%s.%N)
    "$LOADGEN" send --target "127.0.0.1:$relay" --connections "$CONNS" --messages "$MESSAGES" \
        --size 1024 --json >"$dir/send.json" 2>"$dir/send.err"
    acc=$(jq -r .msgs_per_sec "$dir/send.json")
    got=0
    for _ in $(seq 1 1200); do
        got=$(curl -s --max-time 2 "http://127.0.0.1:$sstats/stats" | jq -r '.messages // 0')
        [ "$got" -ge "$MESSAGES" ] && break
        sleep 0.1
    done
    t1=$(date +%s.%N)
    local cpu1; cpu1=$(cpu_s "$relay_pid")
    kill -TERM "$relay_pid"; wait "$relay_pid" || true
    kill "$sink_pid"; wait "$sink_pid" 2>/dev/null || true
    printf '%s %d  accept %8.0f msg/s  end-to-end %8.0f msg/s  cpu %.3f s/1000 msgs  log lines %d  delivered %d\n' \
        "$1" "$3" "$acc" "$(echo "$got / ($t1 - $t0)" | bc -l)" \
        "$(echo "($cpu1 - $cpu0) * 1000 / $MESSAGES" | bc -l)" "$(wc -l <"$dir/sluice.log")" "$got"
    rm -rf "$dir"
}

echo "# A=$A"
echo "# B=$B"
echo "# $MESSAGES msgs x 1 KiB, $CONNS connections, server.cores=$CORES, log.level=info, stderr to a file; $(nproc) CPUs"
for rep in $(seq 1 "$REPS"); do
    run_one A "$A" "$rep"
    run_one B "$B" "$rep"
done
