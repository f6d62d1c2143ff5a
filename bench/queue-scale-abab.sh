#!/usr/bin/env bash
# Queue scale, interleaved (issue 18 item 3): is fresh mail relayed as fast with N messages
# held in the spool as with an empty one? Measured as alternating runs in one invocation, so
# the drift of a shared box falls on both sides alike.
#
# Two sluice instances run side by side, the same configuration (fsync on, defaults otherwise)
# except ports and spool:
#   EMPTY  its queue stays empty (only the fresh traffic measured passes through it)
#   FULL   filled once with N messages to held.example, which sit in queue "held" (retry 1d,
#          message_rate 1/h, routed to a closed loopback port): they never leave
# Everything else goes to one sluice-loadgen sink. One "measurement" is M fresh messages
# (32 connections, to example.com) through one instance: delivered msg/s = M ÷ (source start →
# the sink's last message), plus the source's acceptance msg/s and p99 end of data → 250.
#
# Order: warm-up (M through each), C control pairs (both still empty: how much the two
# instances differ by themselves), the fill of FULL, then P pairs: EMPTY, FULL / FULL, EMPTY
# alternately (after a measurement the script waits until that instance has removed what it
# delivered, read from its metrics, so its spool writes do not fall into the next one)
# with FULL ÷ EMPTY per pair and the median; RssAnon / RssFile / VmHWM of both; then a restart
# of FULL (and of EMPTY, for comparison): exec → listening, and the "spool recovered" log line.
#
# Usage: bench/queue-scale-abab.sh [--messages N] [--measure M] [--pairs P] [--control-pairs C]
#                                  [--fill-procs F] [--fill-conns K] [--size BYTES]
#                                  [--port-base PORT] [--workdir DIR] [--bin-dir DIR]
#   --messages N      messages held in FULL (default 1000000)
#   --measure M       messages per measurement (default 20000)
#   --pairs P         EMPTY/FULL pairs after the fill (default 5; at least 3)
#   --control-pairs C pairs before the fill, both empty (default 2; 0 = none)
#   --fill-procs F    loadgen processes filling in parallel (default 2), each with
#   --fill-conns K    connections (default 64)
#   --size BYTES      message size, headers included (default 1024)
#   --port-base PORT  first of 7 loopback ports (default 31000)
#   --workdir DIR     parent of the temp dir (default /var/tmp; a real disk, not tmpfs)
#   --bin-dir DIR     sluice and sluice-loadgen (default target/release; nothing is built)
#   --swap            FULL takes the first ports and starts first (default: EMPTY does), to see
#                     whether an instance's slot, not its queue, makes a difference
# Prints a markdown section on stdout (it never edits BENCHMARKS.md); progress on stderr.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/queue-scale-abab.sh${*:+ $*}"
N=1000000 M=20000 PAIRS=5 CONTROL=2 FILL_PROCS=2 FILL_CONNS=64 SIZE=1024 PORT_BASE=31000
WORK_PARENT=/var/tmp BIN_SRC="$REPO/target/release" SWAP=0

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "queue-scale-abab: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --messages) N=${2:?}; posint "$1" "$N"; shift ;;
        --measure) M=${2:?}; posint "$1" "$M"; shift ;;
        --pairs) PAIRS=${2:?}; posint "$1" "$PAIRS"; shift ;;
        --control-pairs) CONTROL=${2:?}; [[ "$CONTROL" =~ ^[0-9]+$ ]] || die "$1 wants a number"; shift ;;
        --fill-procs) FILL_PROCS=${2:?}; posint "$1" "$FILL_PROCS"; shift ;;
        --fill-conns) FILL_CONNS=${2:?}; posint "$1" "$FILL_CONNS"; shift ;;
        --size) SIZE=${2:?}; posint "$1" "$SIZE"; shift ;;
        --port-base) PORT_BASE=${2:?}; posint "$1" "$PORT_BASE"; shift ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        --bin-dir) BIN_SRC=${2:?}; shift ;;
        --swap) SWAP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[ "$PAIRS" -ge 3 ] || die "--pairs: at least 3"
if [ "$CONTROL" -gt 20 ] || [ "$PAIRS" -gt 20 ]; then die "at most 20 pairs of either kind"; fi
for tool in curl jq timeout ss du; do command -v "$tool" >/dev/null || die "missing $tool"; done
for b in sluice sluice-loadgen; do [ -x "$BIN_SRC/$b" ] || die "missing $BIN_SRC/$b"; done

FIRST=empty SECOND=full
[ "$SWAP" = 0 ] || { FIRST=full SECOND=empty; }
declare -A RELAY_PORT=([$FIRST]=$PORT_BASE [$SECOND]=$((PORT_BASE + 1)))
declare -A ADMIN_PORT=([$FIRST]=$((PORT_BASE + 5)) [$SECOND]=$((PORT_BASE + 6)))
SINK_PORT=$((PORT_BASE + 2)) STATS_PORT=$((PORT_BASE + 3))
CLOSED_PORT=$((PORT_BASE + 4))   # nothing listens here: the held route
SEND_TIMEOUT=1800          # s, any one loadgen run (the fill included)
DELIVERY_TIMEOUT=600       # s, for the sink to get a measurement's messages
START_TIMEOUT_TICKS=6000   # x 0.1 s, for sluice to listen (recovery of a big spool included)
STOP_TIMEOUT_TICKS=600     # x 0.1 s, after SIGTERM
QUIET_TIMEOUT=120          # s, for an instance to remove the messages it delivered

# ---------------------------------------------------------------------------------------
# shellcheck source=bench/lib/procs.sh
source "$REPO/bench/lib/procs.sh"
anon_mib() { awk '$1 == "RssAnon:" { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
hwm_mib() { awk '$1 == "VmHWM:" { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
sink_stat() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/stats" | jq -r ".$1 // empty" 2>/dev/null || true; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "–" }'; }
# "median (range low–high)" of the arguments.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f (range %.2f–%.2f)", m, v[1], v[NR] }'
}

# ---------------------------------------------------------------------------------------
[ -d "$WORK_PARENT" ] || die "no such directory: $WORK_PARENT"
fstype=$(stat -f -c %T "$WORK_PARENT")
case "$fstype" in tmpfs|ramfs) die "$WORK_PARENT is $fstype: fsync would be free" ;; esac
for p in "${RELAY_PORT[empty]}" "${RELAY_PORT[full]}" "$SINK_PORT" "$STATS_PORT" "$CLOSED_PORT" \
    "${ADMIN_PORT[empty]}" "${ADMIN_PORT[full]}"; do
    ! port_listening "$p" || die "port $p is in use; pick another --port-base"
done
WORK=$(mktemp -d "$WORK_PARENT/sluice-queue-abab.XXXXXX")
BIN="$WORK/bin"
mkdir -p "$BIN"
# Copies, so that a rebuild by someone else during the run does not swap binaries under us.
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"

write_conf() { # NAME
    cat >"$WORK/$1.toml" <<EOF
# bench/queue-scale-abab.sh, instance "$1": fsync on (default), default route to the sink,
# held.example held.
[server.listener.smtp]
bind = ["127.0.0.1:${RELAY_PORT[$1]}"]
max_connections_per_ip = 4096

[spool]
path = "$WORK/spool-$1"

[log]
# warn, plus the runtime's info lines ("spool recovered")
level = "warn,sluice_engine::runtime=info"

[dns]
servers = ["127.0.0.1:9"]

[admin]
# GET /metrics: the script waits for the default queue to be empty between measurements.
listen = "127.0.0.1:${ADMIN_PORT[$1]}"

[delivery]
enabled = true
tls = "none"

[queue.held]
retry = ["1d"]
message_rate = ["1/h"]

[route.default]
type = "relay"
host = "127.0.0.1"
port = $SINK_PORT
tls = "none"

[route.held]
type = "relay"
host = "127.0.0.1"
port = $CLOSED_PORT
tls = "none"

[[rule]]
match.recipient_domain = ["held.example"]
queue = "held"
route = "held"
EOF
}

SINK_PID=""
declare -A RELAY_PID START_WALL_MS RECOVERED_MS RECOVERED_N
start_sink() {
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$SINK_PORT" --stats-listen "127.0.0.1:$STATS_PORT" \
        --no-tokens >"$WORK/sink.json" 2>"$WORK/sink.err" &
    SINK_PID=$!; PIDS+=("$SINK_PID")
    wait_listening "$STATS_PORT" "$SINK_PID" sink
    wait_listening "$SINK_PORT" "$SINK_PID" sink
}
start_sluice() { # NAME LOGNAME
    local name=$1 t0 i=0 line pid
    t0=$(now_ms)
    "$BIN/sluice" run -c "$WORK/$name.toml" >"$WORK/$2.out" 2>"$WORK/$2.err" &
    pid=$!; PIDS+=("$pid"); RELAY_PID[$name]=$pid
    wait_listening "${RELAY_PORT[$name]}" "$pid" "sluice $name"
    START_WALL_MS[$name]=$(($(now_ms) - t0))
    line=""
    while [ -z "$line" ] && [ $i -lt 50 ]; do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$2.err" | grep 'sluice_engine::runtime: spool recovered' || true)
        [ -n "$line" ] || { sleep 0.1; i=$((i + 1)); }
    done
    RECOVERED_MS[$name]=$(sed -n 's/.*elapsed_ms=\([0-9]*\(\.[0-9]\{0,1\}\)\{0,1\}\).*/\1/p' <<<"$line" | head -n1)
    RECOVERED_N[$name]=$(sed -n 's/.* messages=\([0-9]*\).*/\1/p' <<<"$line" | head -n1)
}

send() { # OUT PORT DOMAIN MESSAGES CONNS [extra...] -> JSON in OUT
    local out=$1 port=$2 dom=$3 n=$4 c=$5; shift 5
    timeout "$SEND_TIMEOUT" "$BIN/sluice-loadgen" send --target "127.0.0.1:$port" \
        --connections "$c" --messages "$n" --size "$SIZE" --domain "$dom" --json "$@" \
        >"$out" 2>"$out.err" || die "loadgen failed ($(tail -n 2 "$out.err"))"
    local acc; acc=$(jq -r .accepted "$out")
    [ "$acc" = "$n" ] || die "loadgen: accepted $acc of $n ($(jq -c .errors_by_code "$out"))"
}

# Messages of queue "default" still in NAME's spool (delivered ones are removed after the sink's
# 250, in later commits), or empty when the metrics cannot be read.
default_queue() { # NAME
    curl -s --max-time 2 "http://127.0.0.1:${ADMIN_PORT[$1]}/metrics" |
        awk '/^sluice_queue_messages\{queue="default"\}/ { print $NF; exit }' || true
}
# Waits (bounded) until NAME has removed every delivered message: the removals of one
# measurement must not run during the next one, which would bias against the second of a pair.
wait_quiet() { # NAME
    local i=0 q
    while [ $i -lt $((QUIET_TIMEOUT * 10)) ]; do
        q=$(default_queue "$1")
        [ "$q" != 0 ] || return 0
        sleep 0.1; i=$((i + 1))
    done
    die "sluice $1 still holds ${q:-?} messages of queue default after ${QUIET_TIMEOUT} s"
}

# "COMMITS COMMIT_SECONDS" of NAME now: its spool commit histogram's count and sum, to see
# whether a difference between EMPTY and FULL is in the commits (a deeper LMDB tree copies
# more pages per write). (/proc/PID/io write_bytes is no use here: the journal thread does
# the writeback that fdatasync starts, and it often counts nothing for sluice.)
io_snapshot() { # NAME
    curl -s --max-time 2 "http://127.0.0.1:${ADMIN_PORT[$1]}/metrics" | awk '
        /^sluice_spool_commit_seconds_count/ { c = $NF } /^sluice_spool_commit_seconds_sum/ { s = $NF }
        END { printf "%d %.6f\n", c, s }' || echo "0 0"
}

# One measurement: M fresh messages through instance NAME to the sink.
# Sets MEAS to "delivered_msg_s accepted_msg_s p99_ms" (no subshell: a failure stops the script).
MEAS="" IOM=""
measure() { # NAME TAG
    local name=$1 out="$WORK/m-$2.json" base t0 got="" i=0 want last
    base=$(sink_stat recipients); base=${base:-0}
    want=$((base + M))
    local io0 io1
    io0=$(io_snapshot "$name")
    t0=$(now_ms)
    send "$out" "${RELAY_PORT[$name]}" example.com "$M" 32
    while [ $i -lt $((DELIVERY_TIMEOUT * 4)) ]; do
        got=$(sink_stat recipients)
        if [ -n "$got" ] && [ "$got" -ge "$want" ]; then break; fi
        pid_alive "${RELAY_PID[$name]}" || die "sluice $name died"
        sleep 0.25; i=$((i + 1))
    done
    [ "${got:-0}" -ge "$want" ] || die "sink got $((${got:-0} - base)) of $M in time"
    last=$(sink_stat last_message_unix_ms)
    wait_quiet "$name"
    io1=$(io_snapshot "$name")
    # Over the whole life of the M messages (stored, delivered, removed): commits per
    # message and the mean commit time in ms.
    IOM=$(awk -v m="$M" -v a="$io0" -v b="$io1" 'BEGIN { split(a, x, " "); split(b, y, " ");
        c = y[1] - x[1]; printf "%.2f %.2f\n", c / m, (c > 0 ? (y[2] - x[2]) * 1000 / c : 0) }')
    MEAS=$(awk -v n="$M" -v ms=$((last - t0)) -v acc="$(jq -r '.msgs_per_sec' "$out")" \
        -v p99="$(jq -r '.eod_to_250_ms.p99' "$out")" \
        'BEGIN { printf "%.0f %.0f %.1f\n", n * 1000 / ms, acc, p99 }')
}

# Pairs: EMPTY then FULL in odd pairs, FULL then EMPTY in even ones (so any effect of going
# second shows, and falls on both); KIND rows appended to ROWS, FULL ÷ EMPTY ratios to the named arrays.
ROWS="" CONTROL_RATIOS=() FULL_RATIOS=() FULL_P99_RATIOS=() FULL_COMMIT_RATIOS=()
run_pairs() { # KIND COUNT
    local kind=$1 k de ae pe df af pf r order ce me cf mf
    for ((k = 1; k <= $2; k++)); do
        if [ $((k % 2)) = 1 ]; then
            order="EMPTY, FULL"
            measure empty "$kind-$k-empty"; read -r de ae pe <<<"$MEAS"; read -r ce me <<<"$IOM"
            measure full "$kind-$k-full"; read -r df af pf <<<"$MEAS"; read -r cf mf <<<"$IOM"
        else
            order="FULL, EMPTY"
            measure full "$kind-$k-full"; read -r df af pf <<<"$MEAS"; read -r cf mf <<<"$IOM"
            measure empty "$kind-$k-empty"; read -r de ae pe <<<"$MEAS"; read -r ce me <<<"$IOM"
        fi
        r=$(ratio "$df" "$de")
        if [ "$kind" = control ]; then CONTROL_RATIOS+=("$r"); else
            FULL_RATIOS+=("$r"); FULL_P99_RATIOS+=("$(ratio "$pf" "$pe")")
            FULL_COMMIT_RATIOS+=("$(ratio "$mf" "$me")"); fi
        ROWS+="| $kind $k | $order | $de | $df | **$r** | $ae | $af | $pe | $pf | $ce / $cf | $me / $mf |"$'\n'
        log "$kind pair $k: delivered empty $de/s, full $df/s (× $r); accepted $ae / $af; p99 $pe / $pf ms"
    done
}

# ---------------------------------------------------------------------------------------
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
BIN_INFO=$(for b in sluice sluice-loadgen; do
    printf '%s built %s sha256 %s; ' "$b" "$(date -u -r "$BIN/$b" '+%F %T UTC')" \
        "$(sha256sum "$BIN/$b" | cut -c1-12)"; done)
BIN_INFO=${BIN_INFO%; }
START_S=$(date +%s)
log "work dir $WORK ($fstype); N=$N, M=$M, $CONTROL control + $PAIRS pairs"

write_conf empty; write_conf full
start_sink
start_sluice "$FIRST" "$FIRST-run1"
start_sluice "$SECOND" "$SECOND-run1"
log "warm-up: $M messages through each"
measure empty warmup-empty
measure full warmup-full
[ "$CONTROL" = 0 ] || { log "control pairs (both empty)"; run_pairs control "$CONTROL"; }
RSS_E0=$(rss_split "${RELAY_PID[empty]}"); RSS_F0=$(rss_split "${RELAY_PID[full]}")
ANON_F0=$(anon_mib "${RELAY_PID[full]}")

log "filling FULL: $N messages to held.example with $FILL_PROCS loadgen processes x $FILL_CONNS connections"
FILL_T0=$(now_ms)
FILL_PIDS=()
per=$((N / FILL_PROCS))
for ((k = 0; k < FILL_PROCS; k++)); do
    n=$per
    [ $k -lt $((FILL_PROCS - 1)) ] || n=$((N - per * (FILL_PROCS - 1)))
    ( trap - EXIT INT TERM; send "$WORK/fill-$k.json" "${RELAY_PORT[full]}" held.example "$n" "$FILL_CONNS" --run-id "fill$k" ) &
    FILL_PIDS+=($!); PIDS+=($!)
done
fill_rc=0
for p in "${FILL_PIDS[@]}"; do wait "$p" || fill_rc=1; done
[ "$fill_rc" = 0 ] || die "fill failed (see $WORK/fill-*.json.err)"
FILL_MS=$(($(now_ms) - FILL_T0))
FILL_RATE=$(awk -v n="$N" -v ms="$FILL_MS" 'BEGIN { printf "%.0f", n * 1000 / ms }')
log "filled in $((FILL_MS / 1000)) s ($FILL_RATE msg/s)"
sleep 2   # let the last group commits and the scheduler's intake of the fill finish
RSS_E1=$(rss_split "${RELAY_PID[empty]}"); RSS_F1=$(rss_split "${RELAY_PID[full]}")
ANON_F1=$(anon_mib "${RELAY_PID[full]}")

run_pairs full "$PAIRS"
RSS_E2=$(rss_split "${RELAY_PID[empty]}"); RSS_F2=$(rss_split "${RELAY_PID[full]}")
HWM_E=$(hwm_mib "${RELAY_PID[empty]}"); HWM_F=$(hwm_mib "${RELAY_PID[full]}")
SINK_TOTAL=$(sink_stat recipients)
SINK_WANT=$(((2 + 2 * CONTROL + 2 * PAIRS) * M))
SPOOL_DU=$(du -sk "$WORK/spool-full" | cut -f1)

log "restarting both (FULL holds $N)"
t=$(now_ms); stop_pid "${RELAY_PID[full]}"; STOP_FULL_MS=$(($(now_ms) - t))
start_sluice full full-run2
sleep 2
RSS_F3=$(rss_split "${RELAY_PID[full]}"); ANON_F3=$(anon_mib "${RELAY_PID[full]}")
stop_pid "${RELAY_PID[full]}"
stop_pid "${RELAY_PID[empty]}"
start_sluice empty empty-run2
RSS_E3=$(rss_split "${RELAY_PID[empty]}")
stop_pid "${RELAY_PID[empty]}"
WARN_LINES=$(cat "$WORK"/*-run*.err | sed 's/\x1b\[[0-9;]*m//g' | grep -c ' WARN ' || true)
ELAPSED=$(($(date +%s) - START_S))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

cat <<EOF

## Queue scale, interleaved: empty queue vs $N held, $PAIRS pairs — $DATE

- Command: \`$INVOCATION\` (tree \`$GIT_REV\`; $BIN_INFO; run took ${ELAPSED} s)
- Machine: nproc $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); \`free -g\`: $(free -g | awk '/^Mem:/ { print "total " $2 " GiB, available " $7 }'); kernel $(uname -r); spools on $fstype
- Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER
- Two sluice instances side by side, same configuration (fsync on, spool defaults) except ports and spool: EMPTY and FULL ($FIRST on the first ports and started first); held.example → queue "held" (retry 1d, message_rate 1/h) → a closed loopback port; everything else → one \`sluice-loadgen sink\`
- Measurement: \`sluice-loadgen send --connections 32 --messages $M --size $SIZE --domain example.com --json\` at one instance; delivered = $M ÷ (source start → the sink's last message); accepted msg/s and p99 end of data → 250 from the source's JSON. Warm-up: $M through each (not counted)
- Per measurement, over the M messages' whole life (stored, delivered, removed: until the wait above ends): spool commits per message and their mean time (\`sluice_spool_commit_seconds\` sum ÷ count)
- Control pairs: before the fill, both empty (the two instances' own difference). Fill: $FILL_PROCS × \`sluice-loadgen send --connections $FILL_CONNS --messages N/$FILL_PROCS --size $SIZE --domain held.example\` into FULL, then pairs alternating EMPTY, FULL / FULL, EMPTY; before each next measurement the script waits until the instance just measured has removed what it delivered (\`sluice_queue_messages{queue="default"}\` = 0 at its admin listener)

| pair | order | EMPTY delivered msg/s | FULL delivered msg/s | FULL ÷ EMPTY | EMPTY accepted msg/s | FULL accepted msg/s | EMPTY p99 ms | FULL p99 ms | commits per msg, EMPTY / FULL | mean commit ms, EMPTY / FULL |
|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|
${ROWS%$'\n'}

- **FULL ÷ EMPTY delivered, median of $PAIRS pairs with $N held: $(median "${FULL_RATIOS[@]}")**; p99 FULL ÷ EMPTY: $(median "${FULL_P99_RATIOS[@]}"); mean commit time FULL ÷ EMPTY: $(median "${FULL_COMMIT_RATIOS[@]}")
$([ "$CONTROL" = 0 ] || echo "- control (both empty), median of $CONTROL: $(median "${CONTROL_RATIOS[@]}")")

| memory, MiB: VmRSS (RssAnon + RssFile) | EMPTY | FULL |
|---|--:|--:|
| after warm-up and control pairs (both empty) | $RSS_E0 | $RSS_F0 |
| after the fill of FULL | $RSS_E1 | $RSS_F1 |
| after the pairs | $RSS_E2 | $RSS_F2 |
| VmHWM (peak) | $HWM_E | $HWM_F |
| after restart (FULL: 2 s after listening) | $RSS_E3 | $RSS_F3 |

| figure | value |
|---|--:|
| fill: $N messages into FULL | $((FILL_MS / 1000)) s = $FILL_RATE msg/s |
| FULL's spool on disk (\`du -sk\`) | $(mib "$SPOOL_DU") MiB |
| FULL's RssAnon: after the fill − before it | $(awk -v f="$ANON_F1" -v e="$ANON_F0" 'BEGIN { printf "%.1f MiB = %.0f B per held message", f - e, (f - e) * 1048576 / '"$N"' }') |
| FULL stop (SIGTERM → exit) | $STOP_FULL_MS ms |
| FULL restart: exec → listening (wall) | ${START_WALL_MS[full]} ms |
| FULL restart: "spool recovered" elapsed_ms (messages) | ${RECOVERED_MS[full]:-?} (${RECOVERED_N[full]:-?}) |
| FULL RssAnon 2 s after restart | $ANON_F3 MiB |
| EMPTY restart: exec → listening; "spool recovered" elapsed_ms (messages) | ${START_WALL_MS[empty]} ms; ${RECOVERED_MS[empty]:-?} (${RECOVERED_N[empty]:-?}) |
| sink total (must be $SINK_WANT: nothing held leaked) | ${SINK_TOTAL:-?} |
| WARN lines in sluice's logs | $WARN_LINES |
EOF
