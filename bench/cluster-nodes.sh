#!/usr/bin/env bash
# Cluster mode figures (issue 16 item 4), on this box, in one invocation:
#
#   1. relayed throughput with cluster mode off (one node), then on with 1, 2 and 3
#      nodes (server.cores = 1 each) on one PostgreSQL started here, sluice-loadgen
#      sending to every node (its share of --messages each) into one sink:
#      msg/s (first send to the sink's last message), relay CPU per message (sum of
#      the nodes' utime+stime from /proc/PID/stat), PostgreSQL CPU per message (the
#      postmaster, its reaped children and its live backends) and engine transactions
#      per message (pg_stat_database.xact_commit delta; the nodes are stopped before
#      the second reading, so their backends have flushed their counts);
#   2. failover: three nodes, the middle one routes everything to a closed port (it
#      holds its mail, as for a site that defers), --failover-messages sent to it, then
#      SIGKILL; the time from the kill to the sink's first message of it (delivered by
#      a survivor after the takeover), and to its last. Once with the default lease
#      (15 s, sweep 5 s) and once with lease 3 s, sweep 1 s.
#
# Usage: bench/cluster-nodes.sh [--messages N] [--conns C] [--size BYTES]
#                               [--failover-messages F] [--port-base P]
#                               [--workdir DIR] [--bin-dir DIR] [--skip-failover]
#   --messages N           messages per throughput phase, over all nodes (default 6000)
#   --conns C              loadgen connections per node (default 8)
#   --size BYTES           message size, headers included (default 1024)
#   --failover-messages F  messages held by the node that is killed (default 300)
#   --port-base P          first of 12 loopback ports (default 25600)
#   --workdir DIR          parent of the temp dir (default /var/tmp; a real disk)
#   --bin-dir DIR          sluice and sluice-loadgen (default target/release; copied)
#
# Everything it starts (PostgreSQL as user nobody, sink, nodes, loadgen) is stopped
# by pid on exit. Bounds: each send 600 s, each wait for the sink 600 s.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INVOCATION="bench/cluster-nodes.sh${*:+ $*}"
M=6000 CONNS=8 SIZE=1024 F=300 PORT_BASE=25600 WORK_PARENT=/var/tmp
BIN_SRC="$REPO/target/release" FAILOVER=1

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "cluster-nodes: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --messages) posint "$1" "${2:-}"; M=$2; shift 2 ;;
        --conns) posint "$1" "${2:-}"; CONNS=$2; shift 2 ;;
        --size) posint "$1" "${2:-}"; SIZE=$2; shift 2 ;;
        --failover-messages) posint "$1" "${2:-}"; F=$2; shift 2 ;;
        --port-base) posint "$1" "${2:-}"; PORT_BASE=$2; shift 2 ;;
        --workdir) WORK_PARENT=$2; shift 2 ;;
        --bin-dir) BIN_SRC=$2; shift 2 ;;
        --skip-failover) FAILOVER=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
[ -x "$PGBIN/postgres" ] || die "PostgreSQL server not found (Debian package postgresql)"
for t in jq curl psql setpriv ss; do command -v "$t" >/dev/null || die "missing $t"; done

PG_PORT=$PORT_BASE SINK_PORT=$((PORT_BASE + 1)) STATS_PORT=$((PORT_BASE + 2))
CLOSED_PORT=$((PORT_BASE + 3))   # nothing listens: the held route
node_port() { echo $((PORT_BASE + 4 + $1)); }
SEND_TIMEOUT=600 DELIVERY_TIMEOUT=600
START_TIMEOUT_TICKS=600 STOP_TIMEOUT_TICKS=300
TICK=$(getconf CLK_TCK)

# shellcheck source=bench/lib/procs.sh
source "$REPO/bench/lib/procs.sh"

for p in $(seq "$PORT_BASE" $((PORT_BASE + 11))); do
    ! port_listening "$p" || die "port $p is in use; pick another --port-base"
done
WORK=$(mktemp -d "$WORK_PARENT/sluice-cluster-nodes.XXXXXX")
chmod 755 "$WORK"
BIN="$WORK/bin"
mkdir -p "$BIN"
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"

# --- PostgreSQL, unprivileged, fsync and synchronous_commit on (its defaults) -----------
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; }
mkdir -p "$WORK/pg" && chown nobody:nogroup "$WORK/pg"
as_nobody "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U sluice -E UTF8 >/dev/null
setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$PGBIN/postgres" -D "$WORK/pg/data" \
    -p "$PG_PORT" -k "$WORK/pg" -c listen_addresses=127.0.0.1 -c max_connections=60 \
    -c shared_buffers=128MB >"$WORK/pg.log" 2>&1 &
PG_PID=$!; PIDS+=("$PG_PID")
wait_listening "$PG_PORT" "$PG_PID" postgres
DSN="host=127.0.0.1 port=$PG_PORT user=sluice dbname=postgres"
sql() { psql "$DSN" -X -A -t -v ON_ERROR_STOP=1 -c "$1"; }
xacts() { sql "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"; }

# CPU ticks of one process (utime+stime; with its reaped children when $2 = all).
ticks() { awk -v all="${2:-}" '{ sub(/^.*\) /, ""); t = $12 + $13; if (all == "all") t += $14 + $15; print t }' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_ticks() {
    local t c
    t=$(ticks "$PG_PID" all)
    for c in $(ps -o pid= --ppid "$PG_PID"); do t=$((t + $(ticks "$c"))); done
    echo "$t"
}

# --- sink ---------------------------------------------------------------------------------
"$BIN/sluice-loadgen" sink --cores 1 --listen "127.0.0.1:$SINK_PORT" \
    --stats-listen "127.0.0.1:$STATS_PORT" --no-tokens >"$WORK/sink.json" 2>"$WORK/sink.err" &
SINK_PID=$!; PIDS+=("$SINK_PID")
wait_listening "$STATS_PORT" "$SINK_PID" sink
wait_listening "$SINK_PORT" "$SINK_PID" sink
sink_stat() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/stats" | jq -r ".$1 // empty" 2>/dev/null || true; }
wait_sink() { # TOTAL -> waits until the sink has TOTAL recipients
    local i=0 got
    while [ $i -lt $((DELIVERY_TIMEOUT * 10)) ]; do
        got=$(sink_stat recipients)
        [ -n "$got" ] && [ "$got" -ge "$1" ] && return 0
        sleep 0.1; i=$((i + 1))
    done
    die "sink has ${got:-?} of $1 recipients after ${DELIVERY_TIMEOUT}s"
}

# --- nodes --------------------------------------------------------------------------------
declare -A NODE_PID
# NAME IDX CLUSTER(0|1) ROUTE_PORT LEASE SWEEP [ENGINE_TIMEOUT]
write_conf() {
    local name=$1 idx=$2 cluster=$3 route=$4 lease=$5 sweep=$6 timeout=${7:-5s} spool="$WORK/spool-$1"
    rm -rf "$spool"
    cat >"$WORK/$name.toml" <<EOF
[server]
cores = 1
[server.listener.smtp]
bind = ["127.0.0.1:$(node_port "$idx")"]
max_connections_per_ip = 4096
[spool]
path = "$spool"
[log]
level = "warn"
[dns]
servers = ["127.0.0.1:9"]
[admin]
listen = ""
[delivery]
enabled = true
tls = "none"
[queue.default]
retry = ["1s"]
[route.default]
type = "relay"
host = "127.0.0.1"
port = $route
tls = "none"
EOF
    if [ "$cluster" = 1 ]; then
        cat >>"$WORK/$name.toml" <<EOF
[cluster]
enabled = true
node_id = "$name"
engine = ["$DSN"]
lease = "$lease"
sweep_interval = "$sweep"
engine_timeout = "$timeout"
EOF
    fi
}
start_node() { # NAME IDX
    "$BIN/sluice" run -c "$WORK/$1.toml" >"$WORK/$1.out" 2>>"$WORK/$1.err" &
    NODE_PID[$1]=$!; PIDS+=("${NODE_PID[$1]}")
    wait_listening "$(node_port "$2")" "${NODE_PID[$1]}" "node $1"
}
stop_node() { stop_pid "${NODE_PID[$1]}"; }

send() { # OUT NODE_IDX MESSAGES CONNS
    timeout "$SEND_TIMEOUT" "$BIN/sluice-loadgen" send --target "127.0.0.1:$(node_port "$2")" \
        --connections "$4" --cores 1 --messages "$3" --size "$SIZE" --domain example.com \
        --json >"$1" 2>"$1.err" || die "loadgen failed ($(tail -n 2 "$1.err"))"
    local acc; acc=$(jq -r .accepted "$1")
    [ "$acc" = "$3" ] || die "loadgen: accepted $acc of $3 ($(jq -c .errors_by_code "$1"))"
}

# --- 1. throughput phases --------------------------------------------------------------------
ROWS=()
phase() { # LABEL NODES CLUSTER(0|1)
    local label=$1 k=$2 cluster=$3 i base t0 last x0 x1 pg0 pg1 relay0=0 relay1=0 share pids=()
    log "phase: $label"
    for i in $(seq 1 "$k"); do write_conf "n$i" "$i" "$cluster" "$SINK_PORT" 15s 5s; start_node "n$i" "$i"; done
    base=$(sink_stat recipients); base=${base:-0}
    x0=$(xacts); pg0=$(pg_ticks)
    for i in $(seq 1 "$k"); do relay0=$((relay0 + $(ticks "${NODE_PID[n$i]}"))); done
    share=$((M / k))
    t0=$(now_ms)
    for i in $(seq 1 "$k"); do send "$WORK/$label-n$i.json" "$i" "$share" "$CONNS" & pids+=($!); done
    for i in "${pids[@]}"; do wait "$i" || die "a loadgen of $label failed"; done
    wait_sink $((base + share * k))
    last=$(sink_stat last_message_unix_ms)
    for i in $(seq 1 "$k"); do relay1=$((relay1 + $(ticks "${NODE_PID[n$i]}"))); done
    for i in $(seq 1 "$k"); do stop_node "n$i"; done
    x1=$(xacts); pg1=$(pg_ticks)
    local n=$((share * k))
    ROWS+=("$(awk -v l="$label" -v n="$n" -v ms=$((last - t0)) -v r=$((relay1 - relay0)) \
        -v p=$((pg1 - pg0)) -v x=$((x1 - x0)) -v hz="$TICK" -v c="$cluster" 'BEGIN {
        printf "| %s | %d | %.0f | %.3f | %s | %s |", l, n, n * 1000 / ms, r / hz * 1000 / n,
            (c ? sprintf("%.3f", p / hz * 1000 / n) : "-"), (c ? sprintf("%.3f", x / n) : "-") }')")
    log "${ROWS[-1]}"
}

DATE=$(date -u)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
GIT_REV=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
log "work dir $WORK; M=$M, $CONNS connections per node, $SIZE B; sluice $GIT_REV; load $LOAD_BEFORE"

phase "off, 1 node" 1 0
phase "on, 1 node" 1 1
phase "on, 2 nodes" 2 1
phase "on, 3 nodes" 3 1
phase "off, 1 node (again)" 1 0

# --- 2. failover -----------------------------------------------------------------------------
FROWS=()
failover() { # LEASE SWEEP ENGINE_TIMEOUT
    local lease=$1 sweep=$2 timeout=$3 base kill first="" all="" i=0 got
    log "failover: lease $lease, sweep $sweep"
    write_conf n1 1 1 "$SINK_PORT" "$lease" "$sweep" "$timeout"
    write_conf n2 2 1 "$CLOSED_PORT" "$lease" "$sweep" "$timeout"
    write_conf n3 3 1 "$SINK_PORT" "$lease" "$sweep" "$timeout"
    for i in 1 2 3; do start_node "n$i" "$i"; done
    base=$(sink_stat recipients); base=${base:-0}
    send "$WORK/failover-$lease.json" 2 "$F" 8
    # Held: n2 routes to a closed port, nothing of it reaches the sink.
    got=$(sink_stat recipients)
    [ "$got" = "$base" ] || die "n2's mail reached the sink before the kill"
    kill -KILL "${NODE_PID[n2]}"
    kill=$(now_ms)
    wait "${NODE_PID[n2]}" 2>/dev/null || true
    i=0
    while [ $i -lt $((DELIVERY_TIMEOUT * 20)) ]; do
        got=$(sink_stat recipients)
        if [ -z "$first" ] && [ "${got:-0}" -gt "$base" ]; then first=$(($(now_ms) - kill)); fi
        if [ "${got:-0}" -ge $((base + F)) ]; then all=$(($(sink_stat last_message_unix_ms) - kill)); break; fi
        sleep 0.05; i=$((i + 1))
    done
    [ -n "$all" ] || die "failover: sink has $((got - base)) of $F"
    stop_node n1; stop_node n3
    FROWS+=("| $lease | $sweep | $F | $first | $all |")
    log "${FROWS[-1]}"
}
if [ "$FAILOVER" = 1 ]; then
    failover 15s 5s 5s
    failover 3s 1s 2s
fi

# --- report ------------------------------------------------------------------------------------
cat <<EOF

## Cluster nodes ($DATE)

\`$INVOCATION\`, sluice $GIT_REV, PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')
(fsync and synchronous_commit on, no standby), all on this box ($(nproc) CPUs): every node
(server.cores = 1), PostgreSQL, the sink and loadgen share them. Load average before: $LOAD_BEFORE.
Each phase starts fresh spools; $CONNS loadgen connections per node, $SIZE B messages.

| phase | messages | msg/s relayed | relay CPU ms/msg (all nodes) | PostgreSQL CPU ms/msg | engine commits/msg |
|---|--:|--:|--:|--:|--:|
$(printf '%s\n' "${ROWS[@]}")
EOF
if [ "$FAILOVER" = 1 ]; then
    cat <<EOF

Failover: n2 holds $F messages (its route is a closed port), SIGKILL, survivors n1 and n3.
Times from the kill (polled every 50 ms).

| lease | sweep | messages | kill → first at sink, ms | kill → last at sink, ms |
|---|---|--:|--:|--:|
$(printf '%s\n' "${FROWS[@]}")
EOF
fi
