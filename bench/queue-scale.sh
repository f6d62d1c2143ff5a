#!/usr/bin/env bash
# Queue-scale benchmark (issue 5 item 4): does sluice stay fast with a huge queue?
#
# One sluice instance (fsync on, defaults otherwise) with two destinations:
#   held.example  -> queue "held" (retry 1d, message_rate 1/h: throttled to ~zero) routed to
#                    a closed loopback port: mail to it just sits in the spool
#   anything else -> route.default, a relay to sluice-loadgen sink
# In one run it measures, with an empty queue and again with N held messages:
#   - acceptance rate of M further messages (to held.example, so delivery does not compete)
#   - delivery rate of M fresh messages to the sink (source start -> the sink's last one)
#   - RSS (VmRSS) and peak RSS (VmHWM) of sluice
# plus the fill rate, spool size on disk (du), and a restart with N queued: wall time from
# exec to listening, and the "spool recovered" log line's elapsed_ms.
#
# Usage: bench/queue-scale.sh [--messages N] [--measure M] [--fill-procs P] [--fill-conns C]
#                             [--size BYTES] [--port-base P] [--workdir DIR] [--bin-dir DIR]
#                             [--append | --no-append]
#   --messages N   messages to fill the held queue with (default 1000000)
#   --measure M    messages per rate measurement (default 20000)
#   --fill-procs P loadgen processes filling in parallel (default 2), each with
#   --fill-conns C connections (default 64)
#   --size BYTES   message size, headers included (default 1024)
#   --port-base P  first of 4 loopback ports (default 24600)
#   --workdir DIR  parent of the temp dir (default /var/tmp; a real disk, not tmpfs)
#   --bin-dir DIR  sluice and sluice-loadgen (default target/release; nothing is built)
#   --append       append the result section to BENCHMARKS.md (default: only print it)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/queue-scale.sh${*:+ $*}"
N=1000000 M=20000 FILL_PROCS=2 FILL_CONNS=64 SIZE=1024 PORT_BASE=24600
WORK_PARENT=/var/tmp BIN_SRC="$REPO/target/release" APPEND=0

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "queue-scale: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --messages) N=${2:?}; posint "$1" "$N"; shift ;;
        --measure) M=${2:?}; posint "$1" "$M"; shift ;;
        --fill-procs) FILL_PROCS=${2:?}; posint "$1" "$FILL_PROCS"; shift ;;
        --fill-conns) FILL_CONNS=${2:?}; posint "$1" "$FILL_CONNS"; shift ;;
        --size) SIZE=${2:?}; posint "$1" "$SIZE"; shift ;;
        --port-base) PORT_BASE=${2:?}; posint "$1" "$PORT_BASE"; shift ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        --bin-dir) BIN_SRC=${2:?}; shift ;;
        --append) APPEND=1 ;;
        --no-append) APPEND=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
for tool in curl jq timeout ss du; do command -v "$tool" >/dev/null || die "missing $tool"; done
for b in sluice sluice-loadgen; do [ -x "$BIN_SRC/$b" ] || die "missing $BIN_SRC/$b"; done

RELAY_PORT=$PORT_BASE SINK_PORT=$((PORT_BASE + 1)) STATS_PORT=$((PORT_BASE + 2))
CLOSED_PORT=$((PORT_BASE + 3))   # nothing listens here: the held route
SEND_TIMEOUT=1800          # s, any one loadgen run (the fill included)
DELIVERY_TIMEOUT=600       # s, for the sink to get a measurement's messages
START_TIMEOUT_TICKS=6000   # x 0.1 s, for sluice to listen (recovery of a big spool included)
STOP_TIMEOUT_TICKS=600     # x 0.1 s, after SIGTERM

# ---------------------------------------------------------------------------------------
# shellcheck source=bench/lib/procs.sh
source "$REPO/bench/lib/procs.sh"
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
sink_stat() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/stats" | jq -r ".$1 // empty" 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------
[ -d "$WORK_PARENT" ] || die "no such directory: $WORK_PARENT"
fstype=$(stat -f -c %T "$WORK_PARENT")
case "$fstype" in tmpfs|ramfs) die "$WORK_PARENT is $fstype: fsync would be free" ;; esac
for p in "$RELAY_PORT" "$SINK_PORT" "$STATS_PORT" "$CLOSED_PORT"; do
    ! port_listening "$p" || die "port $p is in use; pick another --port-base"
done
WORK=$(mktemp -d "$WORK_PARENT/sluice-queue-scale.XXXXXX")
BIN="$WORK/bin"
mkdir -p "$BIN"
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"
SPOOL="$WORK/spool"
CONF="$WORK/sluice.toml"
cat >"$CONF" <<EOF
# bench/queue-scale.sh: fsync on (default), default route to the sink, held.example held.
[server.listener.smtp]
bind = ["127.0.0.1:$RELAY_PORT"]
max_connections_per_ip = 4096

[spool]
path = "$SPOOL"

[log]
# warn, plus the runtime's info lines ("spool recovered")
level = "warn,sluice_engine::runtime=info"

[dns]
servers = ["127.0.0.1:9"]

[admin]
# Benchmarks need no operations listener (and must not collide with one).
listen = ""

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

SINK_PID="" RELAY_PID="" START_WALL_MS="" RECOVERED_MS="" RECOVERED_N=""
start_sink() {
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$SINK_PORT" --stats-listen "127.0.0.1:$STATS_PORT" \
        --no-tokens >"$WORK/sink.json" 2>"$WORK/sink.err" &
    SINK_PID=$!; PIDS+=("$SINK_PID")
    wait_listening "$STATS_PORT" "$SINK_PID" sink
    wait_listening "$SINK_PORT" "$SINK_PID" sink
}
start_sluice() { # LOGNAME
    local t0 i=0 line
    t0=$(now_ms)
    "$BIN/sluice" run -c "$CONF" >"$WORK/$1.out" 2>"$WORK/$1.err" &
    RELAY_PID=$!; PIDS+=("$RELAY_PID")
    wait_listening "$RELAY_PORT" "$RELAY_PID" sluice
    START_WALL_MS=$(($(now_ms) - t0))
    line=""
    while [ -z "$line" ] && [ $i -lt 50 ]; do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$1.err" | grep 'sluice_engine::runtime: spool recovered' || true)
        [ -n "$line" ] || { sleep 0.1; i=$((i + 1)); }
    done
    RECOVERED_MS=$(sed -n 's/.*elapsed_ms=\([0-9.]*\).*/\1/p' <<<"$line" | head -n1)
    RECOVERED_N=$(sed -n 's/.* messages=\([0-9]*\).*/\1/p' <<<"$line" | head -n1)
}

send() { # OUT DOMAIN MESSAGES CONNS [extra...] -> JSON in OUT
    local out=$1 dom=$2 n=$3 c=$4; shift 4
    timeout "$SEND_TIMEOUT" "$BIN/sluice-loadgen" send --target "127.0.0.1:$RELAY_PORT" \
        --connections "$c" --messages "$n" --size "$SIZE" --domain "$dom" --json "$@" \
        >"$out" 2>"$out.err" || die "loadgen failed ($(tail -n 2 "$out.err"))"
    local acc; acc=$(jq -r .accepted "$out")
    [ "$acc" = "$n" ] || die "loadgen: accepted $acc of $n ($(jq -c .errors_by_code "$out"))"
}

# Acceptance: M messages to the held domain, 32 connections. Prints msgs/s and p99 EOD->250.
accept_rate() { # TAG
    send "$WORK/accept-$1.json" held.example "$M" 32
    jq -r '"\(.msgs_per_sec | round) \(.eod_to_250_ms.p99)"' "$WORK/accept-$1.json"
}
# Delivery: M fresh messages to the sink's domain; source start -> the sink's last message.
delivery_rate() { # TAG
    local base t0 got i=0 want last
    base=$(sink_stat recipients); base=${base:-0}
    want=$((base + M))
    t0=$(now_ms)
    send "$WORK/deliver-$1.json" example.com "$M" 32
    while [ $i -lt $((DELIVERY_TIMEOUT * 4)) ]; do
        got=$(sink_stat recipients)
        if [ -n "$got" ] && [ "$got" -ge "$want" ]; then break; fi
        pid_alive "$RELAY_PID" || die "sluice died"
        sleep 0.25; i=$((i + 1))
    done
    [ "${got:-0}" -ge "$want" ] || die "sink got $((got - base)) of $M in time"
    last=$(sink_stat last_message_unix_ms)
    awk -v n="$M" -v ms=$((last - t0)) 'BEGIN { printf "%.0f\n", n * 1000 / ms }'
}

# ---------------------------------------------------------------------------------------
DATE=$(date -u)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
GIT_REV=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
BIN_INFO=$(for b in sluice sluice-loadgen; do
    printf '%s built %s sha256 %s; ' "$b" "$(date -u -r "$BIN/$b" '+%F %T UTC')" \
        "$(sha256sum "$BIN/$b" | cut -c1-12)"; done)
BIN_INFO=${BIN_INFO%; }
START_S=$(date +%s)
log "work dir $WORK ($fstype); N=$N, M=$M; sluice $GIT_REV"

start_sink
start_sluice run1
sleep 1
log "warm-up: $M messages delivered to the sink"
delivery_rate warmup >/dev/null
RSS_EMPTY=$(status_kib "$RELAY_PID" VmRSS); RSSX_EMPTY=$(rss_split "$RELAY_PID")
log "empty: RSS $(mib "$RSS_EMPTY") MiB; measuring acceptance and delivery"
read -r ACC_EMPTY P99_EMPTY < <(accept_rate empty)
DEL_EMPTY=$(delivery_rate empty)
RSS_EMPTY_AFTER=$(status_kib "$RELAY_PID" VmRSS); RSSX_EMPTY_AFTER=$(rss_split "$RELAY_PID")
HWM_EMPTY=$(status_kib "$RELAY_PID" VmHWM)
log "empty: accept $ACC_EMPTY/s (p99 $P99_EMPTY ms), deliver $DEL_EMPTY/s, RSS $(mib "$RSS_EMPTY_AFTER") MiB, HWM $(mib "$HWM_EMPTY") MiB"

log "filling: $N messages to held.example with $FILL_PROCS loadgen processes x $FILL_CONNS connections"
FILL_T0=$(now_ms)
FILL_PIDS=()
per=$((N / FILL_PROCS))
for ((k = 0; k < FILL_PROCS; k++)); do
    n=$per
    [ $k -lt $((FILL_PROCS - 1)) ] || n=$((N - per * (FILL_PROCS - 1)))
    ( trap - EXIT INT TERM; send "$WORK/fill-$k.json" held.example "$n" "$FILL_CONNS" --run-id "fill$k" ) &
    FILL_PIDS+=($!); PIDS+=($!)
done
fill_rc=0
for p in "${FILL_PIDS[@]}"; do wait "$p" || fill_rc=1; done
[ "$fill_rc" = 0 ] || die "fill failed (see $WORK/fill-*.json.err)"
FILL_MS=$(($(now_ms) - FILL_T0))
FILL_RATE=$(awk -v n="$N" -v ms="$FILL_MS" 'BEGIN { printf "%.0f", n * 1000 / ms }')
log "filled in $((FILL_MS / 1000)) s ($FILL_RATE msg/s)"
sleep 2
RSS_FULL=$(status_kib "$RELAY_PID" VmRSS); RSSX_FULL=$(rss_split "$RELAY_PID")
read -r ACC_FULL P99_FULL < <(accept_rate full)
DEL_FULL=$(delivery_rate full)
RSS_FULL_AFTER=$(status_kib "$RELAY_PID" VmRSS); RSSX_FULL_AFTER=$(rss_split "$RELAY_PID")
SINK_TOTAL=$(sink_stat recipients)   # must be exactly 3 M (warm-up + 2 delivery runs): nothing held leaked
HWM_FULL_AFTER=$(status_kib "$RELAY_PID" VmHWM)
QUEUED=$((N + 2 * M))   # held: the fill and both acceptance measurements
log "full: accept $ACC_FULL/s (p99 $P99_FULL ms), deliver $DEL_FULL/s, RSS $(mib "$RSS_FULL_AFTER") MiB, HWM $(mib "$HWM_FULL_AFTER") MiB"
SPOOL_DU=$(du -sk "$SPOOL" | cut -f1)
SPOOL_APPARENT=$(du -sk --apparent-size "$SPOOL" | cut -f1)

t=$(now_ms); stop_pid "$RELAY_PID"; STOP_MS=$(($(now_ms) - t))
log "stopped in $STOP_MS ms; restarting with $QUEUED queued"
start_sluice run2
RESTART_WALL_MS=$START_WALL_MS
RESTART_RECOVERED_MS=$RECOVERED_MS RESTART_RECOVERED_N=$RECOVERED_N
sleep 2
RSSX_RESTART=$(rss_split "$RELAY_PID")
read -r ACC_RESTART P99_RESTART < <(accept_rate restart)
RSSX_RESTART_AFTER=$(rss_split "$RELAY_PID")
WARN_LINES=$(cat "$WORK"/run*.err | sed 's/\x1b\[[0-9;]*m//g' | grep -c ' WARN ' || true)
log "restart: listening after $RESTART_WALL_MS ms, recovered $RESTART_RECOVERED_N in $RESTART_RECOVERED_MS ms; accept $ACC_RESTART/s"
stop_pid "$RELAY_PID"
ELAPSED=$(($(date +%s) - START_S))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
OUT=$(cat <<EOF

## Queue scale: $N messages held in the spool — $DATE

- Command: \`$INVOCATION\` (tree \`$GIT_REV\`; $BIN_INFO; run took ${ELAPSED} s)
- Machine: nproc $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); \`free -g\`: $(free -g | awk '/^Mem:/ { print "total " $2 " GiB, available " $7 }'); kernel $(uname -r); spool on $fstype
- Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER
- sluice: \`sluice run -c CONF\`, CONF as written by the script: fsync on, spool defaults (2 LMDB shards, map_size 4GiB each), held.example → queue "held" (retry 1d, message_rate 1/h) → relay to a closed loopback port; everything else → relay to \`sluice-loadgen sink\`
- Warm-up before the empty-queue figures: $M messages through to the sink (not counted)
- Fill: $FILL_PROCS × \`sluice-loadgen send --connections $FILL_CONNS --messages N/$FILL_PROCS --size $SIZE --domain held.example\` in parallel
- Acceptance: \`sluice-loadgen send --connections 32 --messages $M --size $SIZE --domain held.example\` (msg/s and p99 end of data → 250 from its JSON); delivery: the same with \`--domain example.com\`, $M messages ÷ (source start → the sink's last message)

| figure | empty queue | $N held | full ÷ empty |
|---|--:|--:|--:|
| acceptance, msg/s ($M msgs, 32 conn) | $ACC_EMPTY | $ACC_FULL | $(ratio "$ACC_FULL" "$ACC_EMPTY") |
| p99 end of data → 250, ms | $P99_EMPTY | $P99_FULL | $(ratio "$P99_FULL" "$P99_EMPTY") |
| delivery to the sink, msg/s ($M fresh msgs) | $DEL_EMPTY | $DEL_FULL | $(ratio "$DEL_FULL" "$DEL_EMPTY") |
| VmRSS (RssAnon + RssFile) before the measurements, MiB | $RSSX_EMPTY | $RSSX_FULL | $(ratio "$RSS_FULL" "$RSS_EMPTY") |
| VmRSS (RssAnon + RssFile) after the measurements, MiB | $RSSX_EMPTY_AFTER | $RSSX_FULL_AFTER | $(ratio "$RSS_FULL_AFTER" "$RSS_EMPTY_AFTER") |
| VmHWM (peak so far), MiB | $(mib "$HWM_EMPTY") | $(mib "$HWM_FULL_AFTER") | – |

| with $QUEUED queued (fill + both acceptance runs) | figure |
|---|--:|
| fill: $N messages | $((FILL_MS / 1000)) s = $FILL_RATE msg/s |
| spool on disk (\`du -sk\`; apparent size) | $(mib "$SPOOL_DU") MiB ($(mib "$SPOOL_APPARENT") MiB apparent) |
| stop (SIGTERM → exit) | $STOP_MS ms |
| restart: exec → listening (wall) | $RESTART_WALL_MS ms |
| restart: "spool recovered" elapsed_ms (messages) | ${RESTART_RECOVERED_MS:-?} (${RESTART_RECOVERED_N:-?}) |
| after restart: VmRSS (anon + file) 2 s after listening / after $M more accepted, MiB | $RSSX_RESTART / $RSSX_RESTART_AFTER |
| sink total (must be $((3 * M)): warm-up + 2 delivery runs; nothing held leaked) | ${SINK_TOTAL:-?} |
| WARN lines in sluice's logs (both runs) | $WARN_LINES |
| after restart: acceptance msg/s (p99 ms) | $ACC_RESTART ($P99_RESTART) |
EOF
)
echo "$OUT"
if [ "$APPEND" = 1 ]; then echo "$OUT" >>"$REPO/BENCHMARKS.md"; log "appended to BENCHMARKS.md"; fi
