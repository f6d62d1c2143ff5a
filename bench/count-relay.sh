#!/usr/bin/env bash
# What one relayed message costs, counted rather than timed (issue 18, "attribute"):
# syscalls by kind, io_uring requests, context switches, allocations (malloc/calloc/realloc
# through uprobes on libc), fdatasyncs and bytes written to storage, per message and per
# thread. Counts do not depend on how busy the machine is, so this runs on a shared box;
# CPU time is printed too but is only indicative there.
#
# sink (sluice-loadgen sink) <- sluice (fsync on, fresh spool) <- source, 1 KiB x 1 rcpt,
# for each source and core count:
#   loadgen      sluice-loadgen send, 32 connections reused and pipelined
#   smtp-source  Postfix's smtp-source -s 32, a new connection per message
#
# Usage: bench/count-relay.sh [--messages N] [--cores "1 2"] [--sources "loadgen smtp-source"]
#                             [--bin-dir DIR] [--port-base P]
# Needs root (uprobes, tracepoints), perf (linux-perf), smtp-source (postfix), curl, jq.
# LIBC=PATH names the libc to probe when --bin-dir holds a wrapper script rather than the binary.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=10000 CORES_LIST="1 2" SOURCES="loadgen smtp-source" BIN="$REPO/target/release" PORT_BASE=24800
die() { echo "count-relay: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) N=${2:?}; shift ;;
        --cores) CORES_LIST=${2:?}; shift ;;
        --sources) SOURCES=${2:?}; shift ;;
        --bin-dir) BIN=${2:?}; shift ;;
        --port-base) PORT_BASE=${2:?}; shift ;;
        -h|--help) sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "--messages wants a positive integer"
for t in perf curl jq ss /usr/sbin/smtp-source; do command -v "$t" >/dev/null || die "missing $t"; done
RELAY_PORT=$PORT_BASE SINK_PORT=$((PORT_BASE + 1)) STATS_PORT=$((PORT_BASE + 2))
LIBC=${LIBC:-$(ldd "$BIN/sluice" | awk '/libc\.so/ {print $3}')}
[ -f "$LIBC" ] || die "cannot find the libc sluice links"

PIDS=() WORK=$(mktemp -d /var/tmp/sluice-count.XXXXXX)
stop_pid() { # PID [SIGNAL]
    local pid=$1 i=0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill "-${2:-TERM}" "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    perf probe -q -d 'probe_sluice_count:*' 2>/dev/null || true
    if [ "$rc" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
wait_listening() { # PORT PID NAME
    local i=0
    until [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; do
        kill -0 "$2" 2>/dev/null || die "$3 exited"; [ $i -lt 200 ] || die "$3 not listening"
        sleep 0.1; i=$((i + 1))
    done
}
sink_count() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/stats" | jq -r '.recipients // 0' 2>/dev/null || echo 0; }

perf probe -q -d 'probe_sluice_count:*' 2>/dev/null || true
for f in malloc calloc realloc; do
    perf probe -q -x "$LIBC" --add "probe_sluice_count:$f=$f" || die "perf probe $f failed (root? uprobes?)"
done
EVENTS=(task-clock context-switches raw_syscalls:sys_enter
    syscalls:sys_enter_io_uring_enter syscalls:sys_enter_recvfrom syscalls:sys_enter_sendto
    syscalls:sys_enter_read syscalls:sys_enter_write syscalls:sys_enter_pwrite64
    syscalls:sys_enter_pwritev syscalls:sys_enter_fdatasync syscalls:sys_enter_futex
    syscalls:sys_enter_membarrier io_uring:io_uring_submit_req
    probe_sluice_count:malloc probe_sluice_count:calloc probe_sluice_count:realloc)
EVLIST=$(IFS=,; echo "${EVENTS[*]}")

# run SOURCE CORES -> $WORK/SOURCE-CORES/{stat.csv,io}
run() {
    local src=$1 cores=$2 dir="$WORK/$1-$2" sink relay obs i=0 got=0 wb0 wb1
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
        --set "server.cores=$cores" >"$dir/sluice.out" 2>"$dir/sluice.err" &
    relay=$!; PIDS+=("$relay")
    wait_listening "$RELAY_PORT" "$relay" sluice
    wb0=$(awk '/^write_bytes/ {print $2}' "/proc/$relay/io")
    perf stat --per-thread -x, -e "$EVLIST" -p "$relay" -o "$dir/stat.csv" &
    obs=$!; PIDS+=("$obs")
    sleep 0.5   # perf attaches to every thread before the first message
    case "$src" in
        loadgen) timeout 900 "$BIN/sluice-loadgen" send --target "127.0.0.1:$RELAY_PORT" \
            --connections 32 --messages "$N" --size 1024 --json >"$dir/send.json" 2>"$dir/send.err" ;;
        smtp-source) timeout 900 /usr/sbin/smtp-source -s 32 -m "$N" -l 1024 -M bench.example \
            -f from@example.org -t to@example.com "127.0.0.1:$RELAY_PORT" >"$dir/send.err" 2>&1 ;;
    esac || die "$src failed: $(tail -n 3 "$dir/send.err")"
    while [ $i -lt 1200 ]; do
        got=$(sink_count); [ "$got" -ge "$N" ] && break
        sleep 0.1; i=$((i + 1))
    done
    [ "$got" -ge "$N" ] || die "$src cores=$cores: sink got $got of $N"
    # The last removals ride the next group commit: give the writer a moment, then stop.
    sleep 0.5
    stop_pid "$obs" INT
    wb1=$(awk '/^write_bytes/ {print $2}' "/proc/$relay/io")
    echo "$((wb1 - wb0))" >"$dir/io"
    stop_pid "$relay"; stop_pid "$sink"
    log "$src cores=$cores: $got delivered"
}

for cores in $CORES_LIST; do
    for src in $SOURCES; do run "$src" "$cores"; done
done

# Report: per message, all threads, then per thread role (core executors, spool writers, rest).
echo "### Counts per relayed message ($N x 1 KiB x 1 rcpt; $(nproc) vCPU; $(date -u '+%F %H:%M UTC'))"
echo
printf '| event |'; for cores in $CORES_LIST; do for src in $SOURCES; do printf ' %s c=%s |' "$src" "$cores"; done; done; echo
printf '|---|'; for cores in $CORES_LIST; do for src in $SOURCES; do printf -- '--:|'; done; done; echo
for ev in "${EVENTS[@]}"; do
    printf '| %s |' "${ev#*:}"
    for cores in $CORES_LIST; do for src in $SOURCES; do
        awk -F, -v ev="$ev" -v n="$N" '$4 == ev && $2 ~ /^[0-9.]+$/ {s += $2}
            END { if (ev == "task-clock") printf " %.1f µs |", s * 1000 / n; else printf " %.2f |", s / n }' \
            "$WORK/$src-$cores/stat.csv"
    done; done
    echo
done
printf '| storage bytes written |'
for cores in $CORES_LIST; do for src in $SOURCES; do
    printf ' %s |' "$(( $(cat "$WORK/$src-$cores/io") / N ))"
done; done
echo
echo
echo "### By thread role, per message (executors 'sluice-core-*', spool writers 'spool-writer-*')"
echo
for cores in $CORES_LIST; do for src in $SOURCES; do
    echo "$src, cores=$cores:"
    echo
    awk -F, -v n="$N" '$2 ~ /^[0-9.]+$/ {
            role = $1; sub(/-[0-9]+$/, "", role)
            if (role ~ /^sluice-core/) role = "executors"; else if (role ~ /^spool-writer/) role = "spool writers"; else role = "other"
            v[role, $4] += $2; roles[role] = 1; evs[$4] = 1 }
        END { for (r in roles) {
                printf "    %-13s", r
                printf " cpu %.1f µs", v[r, "task-clock"] * 1000 / n
                printf "  syscalls %.2f", v[r, "raw_syscalls:sys_enter"] / n
                printf "  switches %.2f", v[r, "context-switches"] / n
                printf "  allocs %.1f", (v[r, "probe_sluice_count:malloc"] + v[r, "probe_sluice_count:calloc"] + v[r, "probe_sluice_count:realloc"]) / n
                printf "  uring reqs %.2f\n", v[r, "io_uring:io_uring_submit_req"] / n } }' \
        "$WORK/$src-$cores/stat.csv" | sort
    echo
done; done
