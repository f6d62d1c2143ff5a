#!/usr/bin/env bash
# Overload timeline (issue 18 item 5): many connections offering mail faster than the next hop
# takes it. Does the relay push back (a queue quota's 452 4.3.1, slower 250s) or let its queue,
# memory and latency grow without bound? Runs in one invocation, the same in all but one key:
#   no-quota  [queue.default] without a quota (the default)
#   quota     [queue.default] max_messages = Q (452 4.3.1 at RCPT, DATA or end of data beyond)
#   ready     no quota, [delivery] max_ready_messages = R (the heap bound on messages due now:
#             beyond it they wait in the spool as ids)
# Per run: a fresh sluice (fsync on, defaults otherwise, admin listener on loopback for
# /metrics) relays everything to one sluice-loadgen sink that waits --delay-data before each
# end-of-data reply, so delivery is bounded by the site's connections (destination.default
# max_connections, default 16) ÷ that delay, below what the source offers. The source is
# sluice-loadgen send with C connections (1 KiB, pipelined), run as back-to-back segments of
# SEG seconds so that each segment's p99 end of data → 250 and 452 count are its own (loadgen
# reports one histogram per run; the 256 connections are re-opened at each segment boundary).
# After LOAD seconds of offered load the source stops and the sampler watches DRAIN seconds more.
# A sampler reads every 0.5 s: queue depth (sum of sluice_queue_messages), messages accepted
# (sluice_messages_received_total), recipients at the sink, and sluice's RssAnon / RssFile.
#
# Usage: bench/overload.sh [--connections C] [--quota Q] [--ready R] [--delay-data D] [--load S]
#                          [--drain S]
#                          [--segment S] [--runs LIST] [--port-base P] [--workdir DIR]
#                          [--size BYTES] [--bin-dir DIR] [--samples-dir DIR]
#   --connections C  source connections (default 256)
#   --quota Q        max_messages of [queue.default] in the quota run (default 20000)
#   --ready R        delivery.max_ready_messages in the ready run (default 20000)
#   --delay-data D   the sink's delay before each end-of-data reply (default 20ms)
#   --load S         seconds of offered load (default 60)
#   --drain S        seconds sampled after the load (default 30); LOAD + DRAIN ≤ 120
#   --segment S      seconds per source segment (default 5)
#   --runs LIST      which runs, in order (default "no-quota,quota"; add ready)
#   --size BYTES     message size, headers included (default 1024)
#   --port-base P    first of 4 loopback ports (default 31100)
#   --workdir DIR    parent of the temp dir (default /var/tmp; a real disk, not tmpfs)
#   --bin-dir DIR    sluice and sluice-loadgen (default target/release; nothing is built)
#   --samples-dir D  keep the 0.5 s samples (TSV per run) and the segments' JSON here
# Prints a markdown section on stdout (it never edits BENCHMARKS.md); progress on stderr.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/overload.sh${*:+ $*}"
CONNS=256 QUOTA=20000 READY=20000 DELAY=20ms LOAD=60 DRAIN=30 SEG=5 RUNS="no-quota,quota" PORT_BASE=31100
WORK_PARENT=/var/tmp BIN_SRC="$REPO/target/release" SAMPLES_DIR=""
SIZE=1024

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "overload: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --connections) CONNS=${2:?}; posint "$1" "$CONNS"; shift ;;
        --quota) QUOTA=${2:?}; posint "$1" "$QUOTA"; shift ;;
        --ready) READY=${2:?}; posint "$1" "$READY"; shift ;;
        --delay-data) DELAY=${2:?}; [[ "$DELAY" =~ ^[0-9]+(ms|s)$ ]] || die "$1 wants e.g. 20ms"; shift ;;
        --load) LOAD=${2:?}; posint "$1" "$LOAD"; shift ;;
        --drain) DRAIN=${2:?}; [[ "$DRAIN" =~ ^[0-9]+$ ]] || die "$1 wants seconds"; shift ;;
        --segment) SEG=${2:?}; posint "$1" "$SEG"; shift ;;
        --runs) RUNS=${2:?}; shift ;;
        --size) SIZE=${2:?}; posint "$1" "$SIZE"; shift ;;
        --port-base) PORT_BASE=${2:?}; posint "$1" "$PORT_BASE"; shift ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        --bin-dir) BIN_SRC=${2:?}; shift ;;
        --samples-dir) SAMPLES_DIR=${2:?}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[ $((LOAD + DRAIN)) -le 120 ] || die "--load + --drain: at most 120 s per run"
[ "$SEG" -le "$LOAD" ] || die "--segment longer than --load"
IFS=, read -r -a RUN_LIST <<<"$RUNS"
for r in "${RUN_LIST[@]}"; do case "$r" in no-quota|quota|ready) ;; *) die "--runs: no-quota, quota or ready, not $r" ;; esac; done
for tool in curl jq timeout ss; do command -v "$tool" >/dev/null || die "missing $tool"; done
for b in sluice sluice-loadgen; do [ -x "$BIN_SRC/$b" ] || die "missing $BIN_SRC/$b"; done

RELAY_PORT=$PORT_BASE SINK_PORT=$((PORT_BASE + 1)) STATS_PORT=$((PORT_BASE + 2)) ADMIN_PORT=$((PORT_BASE + 3))
START_TIMEOUT_TICKS=600    # x 0.1 s, for a process to listen
STOP_TIMEOUT_TICKS=300     # x 0.1 s, after SIGTERM (sluice's shutdown_grace is 10 s)
SAMPLE_MS=500

# ---------------------------------------------------------------------------------------
# shellcheck source=bench/lib/procs.sh
source "$REPO/bench/lib/procs.sh"

# ---------------------------------------------------------------------------------------
[ -d "$WORK_PARENT" ] || die "no such directory: $WORK_PARENT"
fstype=$(stat -f -c %T "$WORK_PARENT")
case "$fstype" in tmpfs|ramfs) die "$WORK_PARENT is $fstype: fsync would be free" ;; esac
for p in "$RELAY_PORT" "$SINK_PORT" "$STATS_PORT" "$ADMIN_PORT"; do
    ! port_listening "$p" || die "port $p is in use; pick another --port-base"
done
WORK=$(mktemp -d "$WORK_PARENT/sluice-overload.XXXXXX")
BIN="$WORK/bin"
mkdir -p "$BIN"
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"
[ -z "$SAMPLES_DIR" ] || mkdir -p "$SAMPLES_DIR"

write_conf() { # RUN DIR
    local ready_line=""
    [ "$1" != ready ] || ready_line="max_ready_messages = $READY"
    cat >"$2/sluice.toml" <<EOF
# bench/overload.sh, run "$1": fsync on (default), everything relayed to the slow sink.
[server.listener.smtp]
bind = ["127.0.0.1:$RELAY_PORT"]
max_connections_per_ip = 4096

[spool]
path = "$2/spool"

[log]
level = "warn"

[dns]
servers = ["127.0.0.1:9"]

[admin]
# For GET /metrics (queue depth, messages received); loopback, no token for metrics.
listen = "127.0.0.1:$ADMIN_PORT"

[delivery]
enabled = true
tls = "none"
$ready_line

[route.default]
type = "relay"
host = "127.0.0.1"
port = $SINK_PORT
tls = "none"
EOF
    if [ "$1" = quota ]; then
        printf '\n[queue.default]\nmax_messages = %s\n' "$QUOTA" >>"$2/sluice.toml"
    fi
}

# One sample line: ms-since-start queue received sink_recipients anon_kib file_kib
sample() { # T0 RELAY_PID
    local m q r s a
    m=$(curl -s --max-time 0.4 "http://127.0.0.1:$ADMIN_PORT/metrics" || true)
    read -r q r < <(awk '/^sluice_queue_messages[{ ]/ { q += $NF } /^sluice_messages_received_total[{ ]/ { r += $NF }
        END { printf "%d %d\n", q, r }' <<<"$m")
    s=$(curl -s --max-time 0.4 "http://127.0.0.1:$STATS_PORT/stats" | jq -r '.recipients // empty' 2>/dev/null || true)
    a=$(awk '$1 == "RssAnon:" { a = $2 } $1 == "RssFile:" { f = $2 } END { printf "%d %d", a, f }' "/proc/$2/status" 2>/dev/null || echo "- -")
    printf '%d\t%s\t%s\t%s\t%s\n' $(($(now_ms) - $1)) "$q" "$r" "${s:--}" "${a// /$'\t'}"
}
# Samples every SAMPLE_MS on a fixed grid until STOPFILE exists (bounded by the run's length).
start_sampler() { # T0 RELAY_PID OUT STOPFILE
    (
        trap - EXIT INT TERM
        k=0 max=$(((LOAD + DRAIN + 30) * 1000 / SAMPLE_MS))
        while [ ! -e "$4" ] && [ $k -lt $max ]; do
            sample "$1" "$2" >>"$3"
            k=$((k + 1))
            wait_ms=$(($1 + k * SAMPLE_MS - $(now_ms)))
            [ $wait_ms -le 0 ] || sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))"
        done
    ) &
    SAMPLER_PID=$!; PIDS+=("$SAMPLER_PID")
}

SECTIONS=""
run_one() { # RUN
    local run=$1 dir="$WORK/$1" t0 seg=0 segs=$((LOAD / SEG)) out sink_pid relay_pid rows="" s
    mkdir -p "$dir"
    write_conf "$run" "$dir"
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$SINK_PORT" --stats-listen "127.0.0.1:$STATS_PORT" \
        --no-tokens --delay-data "$DELAY" >"$dir/sink.json" 2>"$dir/sink.err" &
    sink_pid=$!; PIDS+=("$sink_pid")
    wait_listening "$STATS_PORT" "$sink_pid" sink
    wait_listening "$SINK_PORT" "$sink_pid" sink
    "$BIN/sluice" run -c "$dir/sluice.toml" >"$dir/sluice.out" 2>"$dir/sluice.err" &
    relay_pid=$!; PIDS+=("$relay_pid")
    wait_listening "$RELAY_PORT" "$relay_pid" sluice
    wait_listening "$ADMIN_PORT" "$relay_pid" "sluice admin"
    log "run $run: $segs segments of $SEG s with $CONNS connections, then $DRAIN s of drain"

    t0=$(now_ms)
    start_sampler "$t0" "$relay_pid" "$dir/samples.tsv" "$dir/sampler.stop"
    # Segment K covers [start_ms, end_ms) relative to t0; its JSON has p99 and the 452 count.
    : >"$dir/segments.tsv"
    while [ $seg -lt "$segs" ]; do
        out="$dir/seg-$seg.json"
        s=$(($(now_ms) - t0))
        timeout $((SEG + 60)) "$BIN/sluice-loadgen" send --target "127.0.0.1:$RELAY_PORT" \
            --connections "$CONNS" --duration "${SEG}s" --size "$SIZE" --domain example.com \
            --timeout 30s --json >"$out" 2>"$out.err" || log "segment $seg: loadgen exit $? ($(tail -n 1 "$out.err"))"
        printf '%d\t%d\t%s\n' "$s" $(($(now_ms) - t0)) "$out" >>"$dir/segments.tsv"
        pid_alive "$relay_pid" || die "sluice died in run $run"
        seg=$((seg + 1))
    done
    local load_end=$(($(now_ms) - t0))
    log "run $run: load over at $((load_end / 1000)) s; draining"
    while [ $(($(now_ms) - t0)) -lt $((load_end + DRAIN * 1000)) ]; do
        pid_alive "$relay_pid" || die "sluice died in run $run"
        sleep 0.5
    done
    # The sampler sees the stop file within one period; TERM only if it does not.
    touch "$dir/sampler.stop"
    local w=0
    while pid_alive "$SAMPLER_PID" && ! is_zombie "$SAMPLER_PID" && [ $w -lt 30 ]; do sleep 0.1; w=$((w + 1)); done
    stop_pid "$SAMPLER_PID"
    local hwm; hwm=$(awk '$1 == "VmHWM:" { printf "%.0f", $2 / 1024 }' "/proc/$relay_pid/status")
    stop_pid "$relay_pid"; stop_pid "$sink_pid"
    [ -z "$SAMPLES_DIR" ] || cp "$dir/samples.tsv" "$SAMPLES_DIR/$run-samples.tsv"
    [ -z "$SAMPLES_DIR" ] || cp "$dir/segments.tsv" "$SAMPLES_DIR/$run-segments.tsv"
    [ -z "$SAMPLES_DIR" ] || { mkdir -p "$SAMPLES_DIR/$run"; cp "$dir"/seg-*.json "$SAMPLES_DIR/$run/"; }

    # One row per segment (and per SEG seconds of drain): from the 0.5 s samples, the values at
    # the interval's end and the rates over it; from the segment's loadgen JSON, p99 and 452s.
    local iv=0 lo hi json p99 n452 acc offered
    while read -r lo hi json; do
        p99=$(jq -r '.eod_to_250_ms.p99 // "–"' "$json" 2>/dev/null || echo "–")
        n452=$(jq -r '[.errors_by_code | to_entries[] | select(.key | startswith("452")) | .value] | add // 0' "$json" 2>/dev/null || echo "?")
        acc=$(jq -r '.accepted // 0' "$json" 2>/dev/null || echo 0)
        offered=$(jq -r '(.accepted // 0) + (.rejected // 0)' "$json" 2>/dev/null || echo "?")
        rows+="$(interval_row "$dir/samples.tsv" "$lo" "$hi" "load $((iv + 1))" "$p99" "$n452" "$acc" "$offered")"$'\n'
        iv=$((iv + 1))
    done <"$dir/segments.tsv"
    lo=$load_end
    while [ "$lo" -lt $((load_end + DRAIN * 1000 - 250)) ]; do
        hi=$((lo + SEG * 1000))
        rows+="$(interval_row "$dir/samples.tsv" "$lo" "$hi" "drain" "–" "–" "–" "–")"$'\n'
        lo=$hi
    done
    local title="no queue quota"
    [ "$run" != quota ] || title="[queue.default] max_messages = $QUOTA"
    [ "$run" != ready ] || title="no queue quota, [delivery] max_ready_messages = $READY"
    local totals
    totals=$(jq -s '{acc: (map(.accepted) | add), rej: (map(.rejected) | add),
        n452: (map(.errors_by_code | to_entries[] | select(.key | startswith("452")) | .value) | add // 0)}' "$dir"/seg-*.json)
    SECTIONS+="
### Run \"$run\": $title

| interval | t s (end) | queue depth at end | max queue | accepted msg/s (relay) | delivered msg/s (sink) | RssAnon MiB at end (max) | RssFile MiB at end | p99 end of data → 250 ms (segment) | 452s (segment) | source accepted / attempted (segment) |
|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|
${rows%$'\n'}

- Totals over the load: accepted $(jq -r .acc <<<"$totals"), refused $(jq -r .rej <<<"$totals") (452: $(jq -r .n452 <<<"$totals")); sluice VmHWM $hwm MiB; samples: $(wc -l <"$dir/samples.tsv") over $(((load_end + DRAIN * 1000) / 1000)) s
"
    log "run $run done"
}

# A markdown row for samples with LO ≤ t < HI (the last sample before HI is "at end").
interval_row() { # SAMPLES LO HI LABEL P99 N452 ACC OFFERED
    awk -F'\t' -v lo="$2" -v hi="$3" -v label="$4" -v p99="$5" -v n452="$6" -v acc="$7" -v off="$8" '
        function num(x) { return x ~ /^[0-9]+$/ }
        $1 < lo && num($3) && num($4) { r0 = $3; s0 = $4; t0 = $1 }
        $1 >= lo && $1 < hi {
            if (t0 == "" && num($3) && num($4)) { r0 = $3; s0 = $4; t0 = $1 }
            if (num($2)) { q = $2; if ($2 > qmax) qmax = $2 }
            if (num($3) && num($4)) { r1 = $3; s1 = $4; t1 = $1 }
            if (num($5)) { a = $5; if ($5 > amax) amax = $5 }
            if (num($6)) f = $6
        }
        END {
            dt = (t1 - t0) / 1000
            printf "| %s | %.1f | %s | %s | %s | %s | %.1f (%.1f) | %.0f | %s | %s | %s / %s |", label, t1 / 1000, q, qmax,
                (dt > 0 ? sprintf("%.0f", (r1 - r0) / dt) : "–"), (dt > 0 ? sprintf("%.0f", (s1 - s0) / dt) : "–"),
                a / 1024, amax / 1024, f / 1024, p99, n452, acc, off
        }' "$1"
}

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
BIN_INFO=$(for b in sluice sluice-loadgen; do
    printf '%s built %s sha256 %s; ' "$b" "$(date -u -r "$BIN/$b" '+%F %T UTC')" \
        "$(sha256sum "$BIN/$b" | cut -c1-12)"; done)
BIN_INFO=${BIN_INFO%; }
START_S=$(date +%s)
for r in "${RUN_LIST[@]}"; do run_one "$r"; done
ELAPSED=$(($(date +%s) - START_S))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

cat <<EOF

## Overload: $CONNS connections against a slower next hop ($RUNS) — $DATE

- Command: \`$INVOCATION\` (tree \`$GIT_REV\`; $BIN_INFO; run took ${ELAPSED} s)
- Machine: nproc $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); \`free -g\`: $(free -g | awk '/^Mem:/ { print "total " $2 " GiB, available " $7 }'); kernel $(uname -r); spool on $fstype
- Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER
- sluice (fresh spool per run): fsync on, defaults (destination.default max_connections 16, max_messages_per_connection 100), route.default → the sink; the quota run adds \`[queue.default] max_messages = $QUOTA\`, the ready run \`[delivery] max_ready_messages = $READY\`
- Sink: \`sluice-loadgen sink --no-tokens --delay-data $DELAY\` (each end-of-data reply $DELAY late: delivery ≤ 16 ÷ $DELAY per second)
- Source: $((LOAD / SEG)) back-to-back segments of \`sluice-loadgen send --connections $CONNS --duration ${SEG}s --size $SIZE --domain example.com --timeout 30s --json\`; p99 and 452s per segment from its JSON; then ${DRAIN} s with no load
- Every 0.5 s: queue depth = Σ \`sluice_queue_messages\`, accepted = Δ Σ \`sluice_messages_received_total\`, delivered = Δ the sink's recipients, RssAnon/RssFile from /proc/PID/status; a row gives the values at the interval's end, the max over it, and rates over it
$SECTIONS
EOF
