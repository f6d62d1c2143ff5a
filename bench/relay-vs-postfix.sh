#!/usr/bin/env bash
# End-to-end relay benchmark: sluice beside Postfix and beside the machine's ceiling,
# in one run on this machine (design §9, issue 5 item 3).
#
# For every case (message size x concurrent connections) it measures three setups with the
# same source and the same sink, all on loopback:
#   ceiling   smtp-source -> sink
#   sluice    smtp-source -> sluice (defaults: fsync on; fresh spool) -> sink
#   postfix   smtp-source -> private Postfix instance (as shipped: queue files fsynced) -> sink
# plus sluice with server.cores=1 for some cases. Source (--source): Postfix's smtp-source
# (default, one new connection per message, as smtp-source does without -d) or
# sluice-loadgen send (persistent pipelined connections; reports p99 end of data -> 250 per
# setup). Sink: sluice-loadgen sink, whose counters say when every recipient has arrived.
# Cases: 1 KiB, 20 KiB, 100 KiB x 1 rcpt; 1 KiB x 5 rcpts over 5 domains (smtp-source: 5 rcpts
# in one domain, it cannot spread them); 32 and 256 connections; STARTTLS on (sluice
# listener tls="starttls", Postfix smtpd_tls_security_level=may, the sink for the ceiling, all
# with one self-signed cert from the openssl CLI) -- loadgen source only, smtp-source has no
# STARTTLS. Relay -> sink is plain, except in the TLS "verify" cases (issue 13; only with
# --case): inbound as for STARTTLS, and relay -> sink over STARTTLS with verification, the
# sink presenting a certificate for 127.0.0.1 (IP and DNS name "localhost") issued by a
# test CA made with the openssl CLI; sluice trusts it through delivery.tls_ca_file with
# route tls="verify", Postfix through smtp_tls_CAfile with smtp_tls_security_level=verify.
# DKIM signing setups (issue 12; only with --case): sluice-rsa / sluice-ed sign every message
# for example.org with an RSA-2048 / Ed25519 key; postfix-rsa / postfix-ed are the same Postfix
# with OpenDKIM 2.11 as an smtpd milter signing the same way (relaxed/relaxed, From
# over-signed). Their ratio column compares with the Postfix setup that signs alike. The sink
# reads the DKIM-Signature header as its "token", so an unsigned message shows in the notes.
#
# Delivery events setups (issue 15 item 5; only with --case, see bench/events-load.sh):
# sluice-evfile is sluice with [events] writing a JSON-lines file in the measurement's dir;
# sluice-evhook is sluice with [events] posting to tests/py/webhook_sink.py --count-only
# (/usr/bin/python3 http.server, answers 200) through the durable buffer. Their notes give
# delivered ÷ sluice (events off, same case) and the events the sink had by the end.
#
# Per measurement: acceptance msgs/s (source wall time), end-to-end delivered msgs/s (source
# start until the sink received the last message), relay CPU seconds per 1000 messages
# (/proc utime+stime; for Postfix the master and all its processes, reaped ones included via
# the master's cutime/cstime), peak memory (sluice: VmHWM; Postfix: peak of the summed PSS of
# its processes, sampled every 0.5 s; sluice also the peaks of RssAnon and RssFile, sampled every
# 0.5 s), and ratios against Postfix and the ceiling.
#
# Usage: bench/relay-vs-postfix.sh [--quick] [--messages N] [--port-base P] [--no-build]
#                                  [--append | --no-append] [--workdir DIR]
#                                  [--source smtp-source|loadgen] [--bin-dir DIR]
#   --quick       seconds-long smoke run (few messages, two cases); does not append by default
#   --messages N  messages per measurement (default 20000; --quick: 300)
#   --port-base P first loopback port (default 23100; each measurement uses P+4i .. P+4i+2)
#   --no-build    use target/release binaries as they are (default: cargo build --release)
#   --append      append the result section to BENCHMARKS.md (default unless --quick)
#   --no-append   only print it
#   --workdir DIR parent of the temp dir for spools and the Postfix instance (default
#                 /var/tmp; must be a real disk: fsync on tmpfs measures nothing)
#   --source S    smtp-source (default, comparable with earlier runs) or loadgen
#   --bin-dir DIR take sluice and sluice-loadgen from DIR (implies --no-build)
#   --case "SIZE CONNS RCPTS TLS SETUPS"  measure only this case (repeatable), e.g.
#                 --case "1024 32 1 off sluice,postfix" (TLS off|starttls|verify; setups from
#                 ceiling,sluice,sluice1,postfix, the DKIM setups sluice-rsa,sluice-ed,
#                 postfix-rsa,postfix-ed, the events setups sluice-evfile,sluice-evhook,
#                 the filter setups sluice-sieve,sluice-milter,sluice-hook, and the limits
#                 null-haproxy (HAProxy forwarding TCP: no SMTP work, no spool) and
#                 sluice-nosync (spool.sync = false: no fsync before the 250));
#                 bench/ab.sh uses it for A/B runs
# Needs root (Postfix runs its daemons as user postfix), smtp-source, postfix, curl, jq,
# openssl (STARTTLS and DKIM cases), opendkim (postfix-rsa / postfix-ed).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR="$REPO/bench"
INVOCATION="bench/relay-vs-postfix.sh${*:+ $*}"

QUICK=0
MESSAGES=""
PORT_BASE=23100
BUILD=1
APPEND=""
WORK_PARENT=/var/tmp
SOURCE=smtp-source
BIN_SRC=""
ONLY_CASES=()

usage() { sed -n '2,/^set -E/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "relay-vs-postfix: $*" >&2; exit 1; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --messages) MESSAGES=${2:?}; shift ;;
        --port-base) PORT_BASE=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --append) APPEND=1 ;;
        --no-append) APPEND=0 ;;
        --workdir) WORK_PARENT=${2:?}; shift ;;
        --source) SOURCE=${2:?}; shift ;;
        --bin-dir) BIN_SRC=${2:?}; BUILD=0; shift ;;
        --case) ONLY_CASES+=("${2:?}"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

case "$SOURCE" in smtp-source|loadgen) ;; *) die "--source wants smtp-source or loadgen" ;; esac
if [ "$QUICK" = 1 ]; then
    : "${MESSAGES:=300}"
    : "${APPEND:=0}"
    # size connections recipients tls(off|starttls) setups
    CASES=("1024 32 1 off ceiling,sluice,sluice1,postfix"
           "20480 32 1 off ceiling,sluice,postfix"
           "1024 32 5 starttls ceiling,sluice,postfix")
else
    : "${MESSAGES:=20000}"
    : "${APPEND:=1}"
    CASES=("1024 32 1 off ceiling,sluice,sluice1,postfix"
           "20480 32 1 off ceiling,sluice,sluice1,postfix"
           "1024 32 5 off ceiling,sluice,postfix"
           "102400 32 1 off ceiling,sluice,postfix"
           "1024 256 1 off ceiling,sluice,postfix"
           "1024 32 1 starttls ceiling,sluice,postfix")
fi
if [ "${#ONLY_CASES[@]}" -gt 0 ]; then
    for c in "${ONLY_CASES[@]}"; do
        [[ "$c" =~ ^[1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*\ (off|starttls|verify)\ [a-z0-9,-]+$ ]] \
            || die "--case wants \"SIZE CONNS RCPTS off|starttls|verify SETUPS\", got \"$c\""
    done
    CASES=("${ONLY_CASES[@]}")
fi
if [ "$SOURCE" = smtp-source ]; then   # smtp-source speaks no STARTTLS: drop those cases
    kept=()
    for c in "${CASES[@]}"; do
        read -r _ _ _ t _ <<<"$c"
        if [ "$t" = off ]; then kept+=("$c"); else log "skipping STARTTLS case ($c): needs --source loadgen"; fi
    done
    CASES=("${kept[@]}")
fi
[[ "$MESSAGES" =~ ^[1-9][0-9]*$ ]] || die "--messages wants a positive integer"
if ! [[ "$PORT_BASE" =~ ^[0-9]+$ ]] || [ "$PORT_BASE" -lt 1024 ] || [ "$PORT_BASE" -gt 60000 ]; then
    die "--port-base wants 1024..60000"
fi

SMTP_SOURCE=/usr/sbin/smtp-source
POSTFIX=/usr/sbin/postfix
for tool in "$SMTP_SOURCE" "$POSTFIX" /usr/sbin/postconf curl jq timeout openssl; do
    command -v "$tool" >/dev/null || die "missing $tool"
done
[ "$(id -u)" = 0 ] || die "run as root (a private Postfix instance needs it)"
CLK_TCK=$(getconf CLK_TCK)

# Timeouts (every loop in this script is bounded by one of these).
SOURCE_TIMEOUT=900        # s, one smtp-source run
DELIVERY_TIMEOUT=300      # s, after the source finished, for the sink to get everything
START_TIMEOUT_TICKS=200   # x 0.1 s, for a listener to appear
STOP_TIMEOUT_TICKS=300    # x 0.1 s, for a process to exit after SIGTERM / postfix stop

# ---------------------------------------------------------------------------------------
# Process bookkeeping: every process we start is stopped by pid on exit.
PIDS=()
POSTFIX_CONF=""           # config dir of a running private Postfix instance, if any
WORK=""

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# stop_pid PID: SIGTERM, wait (bounded), then SIGKILL.
stop_pid() {
    local pid=$1 i=0
    pid_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    while pid_alive "$pid" && [ $i -lt $STOP_TIMEOUT_TICKS ]; do
        # a zombie child of ours counts as alive until reaped; reap if it is one
        if [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then break; fi
        sleep 0.1; i=$((i + 1))
    done
    if [ $i -ge $STOP_TIMEOUT_TICKS ] && pid_alive "$pid" && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
        log "pid $pid did not exit after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Pids of the private Postfix instance: its master and the master's children.
postfix_master_pid() {
    local f="$1/pid/master.pid" pid
    [ -r "$f" ] || return 0
    pid=$(tr -d ' \n' <"$f")
    if pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = master ]; then echo "$pid"; fi
}
postfix_pids() { # MASTER_PID -> master and children, one per line
    cat /proc/[0-9]*/stat 2>/dev/null |
        awk -v m="$1" '{ pid = $1; sub(/^[0-9]+ \(.*\) /, ""); if (pid == m || $2 == m) print pid }'
}

stop_postfix() {
    local conf=$1 queue=$2 master i=0 p
    master=$(postfix_master_pid "$queue")
    "$POSTFIX" -c "$conf" stop >/dev/null 2>&1 || true
    while [ -n "$master" ] && pid_alive "$master" && [ $i -lt $STOP_TIMEOUT_TICKS ]; do
        sleep 0.1; i=$((i + 1))
    done
    if [ -n "$master" ] && pid_alive "$master"; then
        log "Postfix master $master still running; killing it and its children by pid"
        for p in $(postfix_pids "$master"); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    POSTFIX_CONF=""
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    if [ -n "$POSTFIX_CONF" ]; then stop_postfix "$POSTFIX_CONF" "$POSTFIX_QUEUE"; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$rc" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK for inspection"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
port_listening() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }
wait_listening() { # PORT PID WHAT [STDERR_FILE]
    local i=0
    while ! port_listening "$1"; do
        if ! pid_alive "$2"; then
            # Show why here: CI keeps the script's output, not the work directory.
            [ -z "${4:-}" ] || [ ! -s "$4" ] || { log "$3 said:"; tail -n 20 "$4" >&2; }
            die "$3 exited before listening on :$1 (see $WORK)"
        fi
        [ $i -lt $START_TIMEOUT_TICKS ] || die "$3 not listening on :$1 after $((START_TIMEOUT_TICKS / 10)) s"
        sleep 0.1; i=$((i + 1))
    done
}
port_free() { ! port_listening "$1"; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# CPU ticks (utime+stime+cutime+cstime) of one pid, or of a Postfix instance (master and
# its children; children already reaped are in the master's cutime/cstime).
cpu_ticks_pids() {
    local f=() p
    for p in "$@"; do f+=("/proc/$p/stat"); done
    cat "${f[@]}" 2>/dev/null |
        awk '{ sub(/^[0-9]+ \(.*\) /, ""); t += $12 + $13 + $14 + $15 } END { printf "%d\n", t }'
}
vmhwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
pss_sum_kib() {
    local f=() p
    for p in "$@"; do f+=("/proc/$p/smaps_rollup"); done
    cat "${f[@]}" 2>/dev/null | awk '/^Pss:/ { s += $2 } END { printf "%d\n", s }'
}

# Background sampler of the Postfix instance's summed PSS (bounded; stops on a stop file).
start_pss_sampler() { # MASTER_PID OUTFILE STOPFILE [EXTRA_PID]
    (
        peak=0 i=0
        while [ ! -e "$3" ] && [ $i -lt $((2 * (SOURCE_TIMEOUT + DELIVERY_TIMEOUT + 60))) ]; do
            # shellcheck disable=SC2046 # word splitting of the pid list is intended
            v=$(pss_sum_kib $(postfix_pids "$1") ${4:-})
            [ "$v" -gt "$peak" ] && peak=$v
            echo "$peak" >"$2"
            sleep 0.5; i=$((i + 1))
        done
    ) &
    PIDS+=($!)
    SAMPLER_PID=$!
}

# Background sampler of one process's peak RssAnon and peak RssFile (KiB, "ANON FILE" in
# OUTFILE), every 0.5 s; bounded; stops on a stop file. VmHWM alone cannot tell the heap from
# LMDB's file-backed map pages.
start_rss_sampler() { # PID OUTFILE STOPFILE
    (
        pa=0 pf=0 i=0
        while [ ! -e "$3" ] && [ $i -lt $((2 * (SOURCE_TIMEOUT + DELIVERY_TIMEOUT + 60))) ]; do
            read -r a f < <(awk '$1 == "RssAnon:" { a = $2 } $1 == "RssFile:" { f = $2 } END { print a + 0, f + 0 }' \
                "/proc/$1/status" 2>/dev/null || echo "0 0")
            [ "$a" -gt "$pa" ] && pa=$a
            [ "$f" -gt "$pf" ] && pf=$f
            echo "$pa $pf" >"$2"
            sleep 0.5; i=$((i + 1))
        done
    ) &
    PIDS+=($!)
    RSS_SAMPLER_PID=$!
}

# ---------------------------------------------------------------------------------------
start_sink() { # PORT STATS_PORT DIR [TLS: off|starttls|sink-verify] [DKIM_ALG]
    local tls_args=() token_args=()
    case "${4:-off}" in
        off) ;;
        sink-verify) tls_args=(--tls-cert "$SINK_CERT" --tls-key "$SINK_KEY") ;;
        *) tls_args=(--tls-cert "$CERT" --tls-key "$KEY") ;;
    esac
    [ -z "${5:-}" ] || token_args=(--token-header DKIM-Signature)
    "$BIN/sluice-loadgen" sink --listen "127.0.0.1:$1" --stats-listen "127.0.0.1:$2" \
        --no-tokens "${tls_args[@]}" "${token_args[@]}" >"$3/sink.json" 2>"$3/sink.err" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    wait_listening "$2" "$SINK_PID" "sink" "$3/sink.err"
    wait_listening "$1" "$SINK_PID" "sink" "$3/sink.err"
}

sluice_args() { # PORT SINK_PORT SPOOL CORES [TLS]
    local out_tls=none
    [ "${5:-off}" != verify ] || out_tls=verify
    local a=(run --set delivery.enabled=true
        --set "route.default={type=\"relay\",host=\"127.0.0.1\",port=$2,tls=\"$out_tls\"}"
        --set 'dns.servers=["127.0.0.1:9"]' --set log.level=warn --set 'admin.listen=""'
        --set "server.listener.smtp.bind=[\"127.0.0.1:$1\"]"
        --set "server.listener.smtp.max_connections_per_ip=1024"
        --set "spool.path=$3")
    [ "$4" = 0 ] || a+=(--set "server.cores=$4")
    [ "${5:-off}" = off ] || a+=(--set 'server.listener.smtp.tls="starttls"'
        --set "server.listener.smtp.tls_cert=\"$CERT\"" --set "server.listener.smtp.tls_key=\"$KEY\"")
    [ "${5:-off}" != verify ] || a+=(--set "delivery.tls_ca_file=\"$CA_CERT\"")
    printf '%s\0' "${a[@]}"
}

# The signing algorithm a DKIM setup name asks for (rsa|ed), or nothing.
dkim_alg() { case "$1" in *-rsa) echo rsa ;; *-ed) echo ed ;; esac; }
is_postfix() { [[ "$1" == postfix* ]]; }

sluice_dkim_args() { # ALG -> --set arguments: one signer for example.org, one rule signing all
    local algorithm=rsa-sha256
    case "$1" in ed) algorithm=ed25519-sha256 ;; ALG) algorithm=ALGORITHM ;; esac
    local a=(--set "dkim.signer.bench={domain=\"example.org\",selector=\"bench\",algorithm=\"$algorithm\",key=\"${DKIM_DIR:-DIR}/$1.pem\"}"
        --set 'dkim.rule=[{match={sender_domain=["example.org"]},sign=["bench"]}]')
    printf '%s\0' "${a[@]}"
}

start_sluice() { # PORT SINK_PORT DIR CORES TLS [DKIM_ALG]
    local args=() dkim=()
    mkdir -p "$3/spool"
    mapfile -d '' args < <(sluice_args "$1" "$2" "$3/spool" "$4" "$5")
    [ -z "${6:-}" ] || { mapfile -d '' dkim < <(sluice_dkim_args "$6"); args+=("${dkim[@]}"); }
    "$BIN/sluice" "${args[@]}" "${EVENT_ARGS[@]}" >"$3/sluice.out" 2>"$3/sluice.err" &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_listening "$1" "$RELAY_PID" "sluice" "$3/sluice.err"
}

# The "null relay": HAProxy in TCP mode, one sink connection per source connection, no
# SMTP work and no spool: the floor of what one more hop costs on this machine.
start_haproxy() { # PORT SINK_PORT DIR
    command -v haproxy >/dev/null || die "null-haproxy needs haproxy (apt-get install haproxy)"
    cat >"$3/haproxy.cfg" <<CFG
global
    nbthread $(nproc)
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend smtp
    bind 127.0.0.1:$1
    default_backend sink
backend sink
    server sink 127.0.0.1:$2
CFG
    haproxy -f "$3/haproxy.cfg" -db >"$3/haproxy.out" 2>&1 &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_listening "$1" "$RELAY_PID" "haproxy" "$3/haproxy.out"
}

EVENT_ARGS=()
WEBHOOK_PID=""
start_webhook() { # PORT DIR: the events webhook (counts events, answers 200)
    /usr/bin/python3 "$REPO/tests/py/webhook_sink.py" --listen "127.0.0.1:$1" --out "$2/webhook.jsonl" \
        --count-only >"$2/webhook.out" 2>&1 &
    WEBHOOK_PID=$!
    PIDS+=("$WEBHOOK_PID")
    wait_listening "$1" "$WEBHOOK_PID" "webhook_sink.py"
}
# Filter setups (issue 14): one Sieve script at rcpt and one at data; the test milter
# (pymilter, tests/py/test_milter.py: it edits headers, recipients and body at end of
# message); the test HTTP hook (tests/py/test_hook.py) asked at rcpt and data. Only the
# relay's own CPU is counted, not the Python filter's.
write_bench_sieve() { # DIR: scripts that run on every message but change nothing for it
    printf '%s\n' 'require ["envelope", "reject"];' \
        'if envelope :domain "to" "blocked.invalid" { reject "blocked"; }' >"$1/rcpt.sieve"
    printf '%s\n' 'require ["editheader", "reject"];' \
        'if header :contains "subject" "bench-spam-marker" { reject "spam"; }' >"$1/data.sieve"
}
start_py_filter() { # PORT DIR SCRIPT ARGS...: a Python milter or hook from tests/py
    local port=$1 dir=$2 script=$3
    shift 3
    /usr/bin/python3 "$REPO/tests/py/$script" "$@" >"$dir/$script.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_listening "$port" "$pid" "$script"
}
events_seen() { # SETUP DIR -> events the sink of that setup had (file lines or webhook count)
    case "$1" in
        sluice-evfile) wc -l <"$2/events.jsonl" 2>/dev/null | tr -d ' ' || echo 0 ;;
        sluice-evhook) jq -s 'map(.n) | add // 0' "$2/webhook.jsonl" 2>/dev/null || echo 0 ;;
    esac
}

OPENDKIM_PID=""
start_opendkim() { # PORT DIR ALG: OpenDKIM as a signing milter for example.org
    local algorithm=rsa-sha256
    [ "$3" = rsa ] || algorithm=ed25519-sha256
    mkdir -p "$2/opendkim"
    cat >"$2/opendkim/opendkim.conf" <<EOF
Syslog no
Background no
Mode s
Domain example.org
Selector bench
KeyFile $DKIM_DIR/$3.pem
SignatureAlgorithm $algorithm
Canonicalization relaxed/relaxed
OversignHeaders From
InternalHosts 127.0.0.1
RequireSafeKeys no
UserID opendkim
Socket inet:$1@127.0.0.1
EOF
    opendkim -f -x "$2/opendkim/opendkim.conf" >"$2/opendkim/out.log" 2>&1 &
    OPENDKIM_PID=$!
    PIDS+=("$OPENDKIM_PID")
    wait_listening "$1" "$OPENDKIM_PID" "opendkim"
}

POSTFIX_QUEUE=""
start_postfix() { # PORT SINK_PORT DIR TLS [MILTER_PORT]
    local base="$3/postfix" i=0 level=none milters="" out_level=none cafile=""
    [ "$4" = off ] || level=may
    [ "$4" != verify ] || { out_level=verify; cafile=$CA_CERT; }
    [ -z "${5:-}" ] || milters="inet:127.0.0.1:$5"
    mkdir -p "$base/conf" "$base/queue" "$base/data"
    sed -e "s|@CONFIG_DIR@|$base/conf|g; s|@QUEUE_DIR@|$base/queue|g" \
        -e "s|@SMTPD_TLS_LEVEL@|$level|g; s|@TLS_CERT@|$CERT|g; s|@TLS_KEY@|$KEY|g" \
        -e "s|@DATA_DIR@|$base/data|g; s|@BASE_DIR@|$base|g; s|@SINK_PORT@|$2|g" \
        -e "s|@MILTERS@|$milters|g; s|@SMTP_TLS_LEVEL@|$out_level|g; s|@SMTP_TLS_CAFILE@|$cafile|g" \
        "$BENCH_DIR/postfix/main.cf.in" >"$base/conf/main.cf"
    sed -e "s|@SMTPD_ADDR@|127.0.0.1:$1|g" "$BENCH_DIR/postfix/master.cf.in" >"$base/conf/master.cf"
    chown postfix "$base/data"
    "$POSTFIX" -c "$base/conf" check >"$base/check.log" 2>&1 || { cat "$base/check.log" >&2; die "postfix check failed"; }
    POSTFIX_CONF="$base/conf"
    POSTFIX_QUEUE="$base/queue"
    "$POSTFIX" -c "$base/conf" start >"$base/start.log" 2>&1 || { cat "$base/start.log" >&2; die "postfix start failed"; }
    RELAY_PID=""
    while [ -z "$RELAY_PID" ] && [ $i -lt $START_TIMEOUT_TICKS ]; do
        RELAY_PID=$(postfix_master_pid "$base/queue")
        [ -n "$RELAY_PID" ] || { sleep 0.1; i=$((i + 1)); }
    done
    [ -n "$RELAY_PID" ] || die "Postfix master did not start (see $base)"
    wait_listening "$1" "$RELAY_PID" "postfix"
    sleep 1   # let qmgr and friends come up before the clock starts
}

sink_stat() { # STATS_PORT FIELD -> value (empty on failure)
    curl -s --max-time 2 "http://127.0.0.1:$1/stats" | jq -r ".$2 // empty" 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------
declare -A ACC E2E CPU MEM MEMSPLIT SINKCONN NOTE P99
SAMPLER_PID="" RSS_SAMPLER_PID="" SINK_PID="" RELAY_PID=""

measure() { # CASE_INDEX SETUP SIZE CONNS MEAS_INDEX RCPTS TLS
    local ci=$1 setup=$2 size=$3 conns=$4 mi=$5 rcpts=$6 tls=$7
    local key="$ci/$setup" dir="$WORK/m$mi-$setup-$size-$conns-$rcpts-$tls" want=$((MESSAGES * rcpts))
    local p=$((PORT_BASE + 4 * mi))
    local sink_port=$p stats_port=$((p + 1)) relay_port=$((p + 2)) milter_port=$((p + 3)) target
    local t0 t1 src_rc cpu0="" cpu1="" got="" last="" i=0 mem="" note="" q alg
    alg=$(dkim_alg "$setup")
    mkdir -p "$dir"
    for q in "$sink_port" "$stats_port" "$relay_port" "$milter_port"; do
        port_free "$q" || die "port $q is in use; pick another --port-base"
    done
    log "case $((ci + 1)): $setup, $size B x $rcpts rcpt, $conns connections, TLS $tls, $MESSAGES messages ($SOURCE)"
    local sink_tls=off
    if [ "$setup" = ceiling ]; then sink_tls=$tls; elif [ "$tls" = verify ]; then sink_tls=sink-verify; fi
    start_sink "$sink_port" "$stats_port" "$dir" "$sink_tls" "$alg"
    RELAY_PID="" OPENDKIM_PID=""
    case "$setup" in
        ceiling) target=$sink_port ;;
        sluice|sluice-rsa|sluice-ed) start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls" "$alg"; target=$relay_port ;;
        sluice1) start_sluice "$relay_port" "$sink_port" "$dir" 1 "$tls"; target=$relay_port ;;
        sluice-nosync)
            EVENT_ARGS=(--set spool.sync=false)
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        null-haproxy) start_haproxy "$relay_port" "$sink_port" "$dir"; target=$relay_port ;;
        sluice-evfile)
            EVENT_ARGS=(--set events.enabled=true --set "events.file=\"$dir/events.jsonl\"")
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        sluice-evhook)
            start_webhook "$milter_port" "$dir"
            EVENT_ARGS=(--set events.enabled=true --set "events.webhook_url=\"http://127.0.0.1:$milter_port/events\"")
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        sluice-sieve)
            write_bench_sieve "$dir"
            EVENT_ARGS=(--set "server.listener.smtp.sieve={rcpt=\"$dir/rcpt.sieve\",data=\"$dir/data.sieve\"}")
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        sluice-milter)
            start_py_filter "$milter_port" "$dir" test_milter.py "inet:$milter_port@127.0.0.1"
            EVENT_ARGS=(--set "server.listener.smtp.milter=[{name=\"bench\",socket=\"inet:127.0.0.1:$milter_port\"}]")
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        sluice-hook)
            start_py_filter "$milter_port" "$dir" test_hook.py "$milter_port" /dev/null
            EVENT_ARGS=(--set "server.listener.smtp.hook=[{name=\"bench\",url=\"http://127.0.0.1:$milter_port/smtp\",stages=[\"rcpt\",\"data\"]}]")
            start_sluice "$relay_port" "$sink_port" "$dir" 0 "$tls"; EVENT_ARGS=(); target=$relay_port ;;
        postfix) start_postfix "$relay_port" "$sink_port" "$dir" "$tls"; target=$relay_port ;;
        postfix-rsa|postfix-ed)
            start_opendkim "$milter_port" "$dir" "$alg"
            start_postfix "$relay_port" "$sink_port" "$dir" "$tls" "$milter_port"; target=$relay_port ;;
        *) die "unknown setup $setup" ;;
    esac

    SAMPLER_PID="" RSS_SAMPLER_PID=""
    if [ -n "$RELAY_PID" ] && ! is_postfix "$setup"; then
        start_rss_sampler "$RELAY_PID" "$dir/rss.peak" "$dir/rss.stop"
    fi
    if is_postfix "$setup"; then
        start_pss_sampler "$RELAY_PID" "$dir/pss.peak" "$dir/pss.stop" "$OPENDKIM_PID"
        # shellcheck disable=SC2046
        cpu0=$(cpu_ticks_pids $(postfix_pids "$RELAY_PID") $OPENDKIM_PID)
    elif [ -n "$RELAY_PID" ]; then
        cpu0=$(cpu_ticks_pids "$RELAY_PID")
    fi

    t0=$(now_ms)
    src_rc=0
    if [ "$SOURCE" = loadgen ]; then
        local lg=(send --target "127.0.0.1:$target" --connections "$conns" --messages "$MESSAGES"
            --size "$size" --recipients "$rcpts" --json)
        [ "$rcpts" = 1 ] || lg+=(--domains "$rcpts" --domain-dist uniform)
        [ "$tls" = off ] || lg+=(--starttls)
        timeout "$SOURCE_TIMEOUT" "$BIN/sluice-loadgen" "${lg[@]}" >"$dir/source.json" 2>"$dir/source.log" || src_rc=$?
    else
        local rc_args=()
        [ "$rcpts" = 1 ] || rc_args=(-r "$rcpts")
        timeout "$SOURCE_TIMEOUT" "$SMTP_SOURCE" -s "$conns" -m "$MESSAGES" -l "$size" "${rc_args[@]}" -M bench.example \
            -f from@example.org -t to@example.com "127.0.0.1:$target" >"$dir/source.log" 2>&1 || src_rc=$?
    fi
    t1=$(now_ms)
    [ "$src_rc" = 0 ] || note="$SOURCE exit $src_rc ($(tail -n 1 "$dir/source.log" | tr '|' '/'))"
    P99[$key]=""
    if [ "$SOURCE" = loadgen ]; then
        P99[$key]=$(jq -r '.eod_to_250_ms.p99 // empty | . * 100 | round / 100' "$dir/source.json" 2>/dev/null || true)
        local lacc
        lacc=$(jq -r '.accepted // 0' "$dir/source.json" 2>/dev/null || echo 0)
        [ "$lacc" = "$MESSAGES" ] || note="${note:+$note; }loadgen accepted $lacc of $MESSAGES ($(jq -c '.errors_by_code' "$dir/source.json" 2>/dev/null))"
    fi

    # Wait for the sink to count every recipient (bounded). A relay may split a message per
    # domain, so recipients, not messages, say when everything has arrived.
    while [ $i -lt $((DELIVERY_TIMEOUT * 4)) ]; do
        got=$(sink_stat "$stats_port" recipients)
        if [ -n "$got" ] && [ "$got" -ge "$want" ]; then break; fi
        if [ -n "$RELAY_PID" ] && ! pid_alive "$RELAY_PID"; then note="${note:+$note; }relay died"; break; fi
        sleep 0.25; i=$((i + 1))
    done

    if is_postfix "$setup"; then
        # shellcheck disable=SC2046
        cpu1=$(cpu_ticks_pids $(postfix_pids "$RELAY_PID") $OPENDKIM_PID)
        touch "$dir/pss.stop"
        stop_pid "$SAMPLER_PID"
        mem=$(cat "$dir/pss.peak" 2>/dev/null || echo "")
    elif [ -n "$RELAY_PID" ] && pid_alive "$RELAY_PID"; then
        cpu1=$(cpu_ticks_pids "$RELAY_PID")
        mem=$(vmhwm_kib "$RELAY_PID")
    fi
    MEMSPLIT[$key]=""
    if [ -n "$RSS_SAMPLER_PID" ]; then
        touch "$dir/rss.stop"
        stop_pid "$RSS_SAMPLER_PID"
        MEMSPLIT[$key]=$(awk '{ printf "%.0f / %.0f", $1 / 1024, $2 / 1024 }' "$dir/rss.peak" 2>/dev/null || true)
    fi
    last=$(sink_stat "$stats_port" last_message_unix_ms)
    SINKCONN[$key]=$(sink_stat "$stats_port" connections)
    got=${got:-0}
    if [ "$got" -lt "$want" ]; then note="${note:+$note; }sink got only $got of $want recipients"; fi
    if [ "$got" -gt "$want" ]; then note="${note:+$note; }sink got $got of $want recipients (duplicates)"; fi
    if [ -n "$alg" ]; then   # the sink's "token" is the DKIM-Signature header
        q=$(sink_stat "$stats_port" messages_without_token)
        [ "$q" = 0 ] || note="${note:+$note; }${q:-?} messages arrived without DKIM-Signature"
    fi

    ACC[$key]=$(awk -v n="$MESSAGES" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f", (ms > 0 ? n * 1000 / ms : 0) }')
    if [ "$got" -ge "$want" ] && [ -n "$last" ]; then
        E2E[$key]=$(awk -v n="$MESSAGES" -v ms=$((last - t0)) 'BEGIN { printf "%.0f", (ms > 0 ? n * 1000 / ms : 0) }')
    else
        E2E[$key]=""
    fi
    if [ -n "$cpu0" ] && [ -n "$cpu1" ]; then
        CPU[$key]=$(awk -v d=$((cpu1 - cpu0)) -v hz="$CLK_TCK" -v n="$MESSAGES" \
            'BEGIN { printf "%.3f", d / hz / n * 1000 }')
    else
        CPU[$key]=""
    fi
    if [ -n "$mem" ]; then MEM[$key]=$(awk -v k="$mem" 'BEGIN { printf "%.0f", k / 1024 }'); else MEM[$key]=""; fi
    NOTE[$key]=$note

    if [[ "$setup" == sluice-ev* ]]; then   # events made so far: 2 per message (reception, delivery)
        NOTE[$key]="${NOTE[$key]:+${NOTE[$key]}; }events at the sink when the last message arrived: $(events_seen "$setup" "$dir") of $((MESSAGES * (1 + rcpts)))"
    fi
    case "$setup" in
        postfix*) stop_postfix "$dir/postfix/conf" "$dir/postfix/queue"; [ -z "$OPENDKIM_PID" ] || stop_pid "$OPENDKIM_PID" ;;
        sluice*) stop_pid "$RELAY_PID" ;;
    esac
    if [ -n "$WEBHOOK_PID" ]; then stop_pid "$WEBHOOK_PID"; WEBHOOK_PID=""; fi
    stop_pid "$SINK_PID"
    rm -rf "$dir/spool" "$dir/postfix/queue"   # bodies can be GiBs; keep logs only
    log "  accept ${ACC[$key]}/s, delivered ${E2E[$key]:-?}/s, p99 ${P99[$key]:-–} ms, CPU ${CPU[$key]:-–} s/1000, mem ${MEM[$key]:-–} MiB${note:+, $note}"
}

# ---------------------------------------------------------------------------------------
cd "$REPO"
if [ "$BUILD" = 1 ]; then
    log "cargo build --release --workspace"
    cargo build --release --workspace >&2 || die "build failed"
fi
BIN_SRC=${BIN_SRC:-$REPO/target/release}
for b in sluice sluice-loadgen; do [ -x "$BIN_SRC/$b" ] || die "missing $BIN_SRC/$b (build first)"; done

[ -d "$WORK_PARENT" ] || die "no such directory: $WORK_PARENT"
fstype=$(stat -f -c %T "$WORK_PARENT")
case "$fstype" in tmpfs|ramfs) die "$WORK_PARENT is $fstype: fsync would be free; use --workdir on a disk" ;; esac
WORK=$(mktemp -d "$WORK_PARENT/sluice-bench.XXXXXX")
chmod 755 "$WORK"
# Copies, so that a rebuild by someone else during the run does not swap binaries under us.
BIN="$WORK/bin"
mkdir -p "$BIN"
cp -p "$BIN_SRC/sluice" "$BIN_SRC/sluice-loadgen" "$BIN/"
CERT="" KEY=""
if printf '%s\n' "${CASES[@]}" | awk '$4 != "off" { f = 1 } END { exit !f }'; then
    CERT="$WORK/tls/cert.pem" KEY="$WORK/tls/key.pem"
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench.localdomain \
        -keyout "$KEY" -out "$CERT" >"$WORK/tls/openssl.log" 2>&1 || die "openssl req failed"
    chmod 644 "$CERT" "$KEY"
fi
CA_CERT="" SINK_CERT="" SINK_KEY=""
if printf '%s\n' "${CASES[@]}" | awk '$4 == "verify" { f = 1 } END { exit !f }'; then
    # A test CA and the sink's certificate for 127.0.0.1 / localhost, issued by it.
    CA_CERT="$WORK/tls/ca.pem" SINK_CERT="$WORK/tls/sink.pem" SINK_KEY="$WORK/tls/sink.key"
    {
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
            -keyout "$WORK/tls/ca.key" -out "$CA_CERT" &&
        openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
            -keyout "$SINK_KEY" -out "$WORK/tls/sink.csr" &&
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/tls/sink.ext" &&
        openssl x509 -req -in "$WORK/tls/sink.csr" -CA "$CA_CERT" -CAkey "$WORK/tls/ca.key" \
            -CAcreateserial -days 2 -extfile "$WORK/tls/sink.ext" -out "$SINK_CERT"
    } >>"$WORK/tls/openssl.log" 2>&1 || die "making the verify case's CA and sink certificate failed"
    chmod 644 "$CA_CERT" "$SINK_CERT" "$SINK_KEY"
fi
# DKIM keys, one pair per run, readable by OpenDKIM (which drops to user opendkim).
DKIM_DIR=""
if printf '%s\n' "${CASES[@]}" | awk '$5 ~ /-(rsa|ed)(,|$)/ { f = 1 } END { exit !f }'; then
    DKIM_DIR="$WORK/dkim"
    mkdir -p "$DKIM_DIR"
    openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:2048 -out "$DKIM_DIR/rsa.pem" 2>"$DKIM_DIR/openssl.log" \
        || die "openssl genpkey rsa failed"
    openssl genpkey -algorithm ed25519 -out "$DKIM_DIR/ed.pem" 2>>"$DKIM_DIR/openssl.log" \
        || die "openssl genpkey ed25519 failed"
    chmod 644 "$DKIM_DIR"/*.pem
fi

GIT_REV=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
BIN_INFO=$(for b in sluice sluice-loadgen; do
    printf '%s built %s sha256 %s; ' "$b" "$(date -u -r "$BIN/$b" '+%F %T UTC')" \
        "$(sha256sum "$BIN/$b" | cut -c1-12)"; done)
BIN_INFO=${BIN_INFO%; }
PF_VERSION=$(/usr/sbin/postconf -h -d mail_version)
OD_VERSION=$(opendkim -V 2>/dev/null | awk '/OpenDKIM Filter/ { sub(/^v/, "", $NF); print $NF; exit }')
if [ -n "$DKIM_DIR" ] && printf '%s\n' "${CASES[@]}" | awk '$5 ~ /postfix-(rsa|ed)/ { f = 1 } END { exit !f }'; then
    [ -n "$OD_VERSION" ] || die "missing opendkim (apt-get install opendkim) for the postfix-rsa/postfix-ed setups"
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
DATE=$(date -u)
START_S=$(date +%s)
log "work dir $WORK (fs $fstype); sluice $GIT_REV; Postfix $PF_VERSION; load $LOAD_BEFORE"

mi=0
for ci in "${!CASES[@]}"; do
    read -r size conns rcpts tls setups <<<"${CASES[$ci]}"
    IFS=, read -r -a list <<<"$setups"
    for setup in "${list[@]}"; do
        measure "$ci" "$setup" "$size" "$conns" "$mi" "$rcpts" "$tls"
        mi=$((mi + 1))
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
ELAPSED=$(($(date +%s) - START_S))

# ---------------------------------------------------------------------------------------
ratio() { # A B -> A/B with two decimals, or – when either is missing
    if [ -n "$1" ] && [ -n "$2" ] && [ "$2" != 0 ]; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "–"
    fi
}
human_size() { awk -v s="$1" 'BEGIN { if (s % 1024 == 0) printf "%d KiB", s / 1024; else printf "%d B", s }'; }
label() {
    case "$1" in
        ceiling) echo "ceiling (source → sink)" ;;
        sluice) echo "sluice (cores=$(nproc))" ;;
        sluice1) echo "sluice (cores=1)" ;;
        sluice-nosync) echo "sluice (cores=$(nproc)), spool.sync = false" ;;
        null-haproxy) echo "null relay: HAProxy $(haproxy -v 2>/dev/null | awk 'NR==1 {print $3}') TCP mode" ;;
        postfix) echo "Postfix $PF_VERSION" ;;
        sluice-rsa) echo "sluice (cores=$(nproc)), DKIM RSA-2048" ;;
        sluice-ed) echo "sluice (cores=$(nproc)), DKIM Ed25519" ;;
        postfix-rsa) echo "Postfix $PF_VERSION + OpenDKIM $OD_VERSION milter, RSA-2048" ;;
        postfix-ed) echo "Postfix $PF_VERSION + OpenDKIM $OD_VERSION milter, Ed25519" ;;
        sluice-evfile) echo "sluice (cores=$(nproc)), events → file" ;;
        sluice-evhook) echo "sluice (cores=$(nproc)), events → webhook" ;;
        sluice-sieve) echo "sluice (cores=$(nproc)), Sieve at rcpt and data" ;;
        sluice-milter) echo "sluice (cores=$(nproc)), pymilter test milter" ;;
        sluice-hook) echo "sluice (cores=$(nproc)), HTTP hook at rcpt and data" ;;
    esac
}

table() {
    echo "| case | setup | accepted msg/s | delivered msg/s | p99 end of data → 250 ms | relay CPU s/1000 msg | relay peak MiB | relay RssAnon / RssFile peak MiB | sink conns | accepted ÷ Postfix | delivered ÷ Postfix | delivered ÷ ceiling | notes |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    local ci size conns rcpts tls setups list setup key pf ce desc
    for ci in "${!CASES[@]}"; do
        read -r size conns rcpts tls setups <<<"${CASES[$ci]}"
        desc="$(human_size "$size") × $rcpts rcpt"
        if [ "$rcpts" != 1 ]; then
            if [ "$SOURCE" = loadgen ]; then desc+=" over $rcpts domains"; else desc+=" (1 domain)"; fi
        fi
        desc+=", $conns conn"
        case "$tls" in starttls) desc+=", STARTTLS" ;; verify) desc+=", STARTTLS in, verified STARTTLS out" ;; esac
        IFS=, read -r -a list <<<"$setups"
        ce="$ci/ceiling"
        for setup in "${list[@]}"; do
            key="$ci/$setup"
            pf="$ci/postfix"   # a signing setup compares with the Postfix that signs alike
            case "$setup" in *-rsa) pf="$ci/postfix-rsa" ;; *-ed) pf="$ci/postfix-ed" ;; esac
            local note=${NOTE[$key]:-}
            if [[ "$setup" == sluice-ev* ]]; then
                note="delivered ÷ sluice events off: $(ratio "${E2E[$key]:-}" "${E2E[$ci/sluice]:-}"); accepted ÷ off: $(ratio "${ACC[$key]:-}" "${ACC[$ci/sluice]:-}")${note:+; $note}"
            fi
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$desc" "$(label "$setup")" \
                "${ACC[$key]:-–}" "${E2E[$key]:-–}" "${P99[$key]:-–}" "${CPU[$key]:-–}" "${MEM[$key]:-–}" "${MEMSPLIT[$key]:-–}" "${SINKCONN[$key]:-–}" \
                "$(ratio "${ACC[$key]:-}" "${ACC[$pf]:-}")" "$(ratio "${E2E[$key]:-}" "${E2E[$pf]:-}")" \
                "$(ratio "${E2E[$key]:-}" "${E2E[$ce]:-}")" "$note"
        done
    done
}

shquote() { # ARGS... -> one shell-quoted line
    local a out=""
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=-]+$ ]]; then out+="$a "; else out+="'$a' "; fi   # (no arg here contains a quote)
    done
    echo "${out% }"
}
mapfile -d '' SLUICE_ARGS < <(sluice_args RELAYPORT SINKPORT SPOOLDIR 0)
SLUICE_CMD="sluice $(shquote "${SLUICE_ARGS[@]}") [--set server.cores=1] [STARTTLS cases: --set 'server.listener.smtp.tls=\"starttls\"' --set server.listener.smtp.tls_cert=CERT --set server.listener.smtp.tls_key=KEY] [verify cases: route.default tls=\"verify\" --set delivery.tls_ca_file=CA]"
dkim_desc() {
    [ -n "$DKIM_DIR" ] || return 0
    local a=()
    mapfile -d '' a < <(DKIM_DIR=DIR sluice_dkim_args ALG)
    echo "- DKIM setups: one key pair per run (\`openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:2048\` and \`-algorithm ed25519\`), signing d=example.org s=bench, relaxed/relaxed, From over-signed; sluice-rsa/sluice-ed add \`$(shquote "${a[@]}")\` (ALG = rsa or ed, ALGORITHM = rsa-sha256 or ed25519-sha256); postfix-rsa/postfix-ed run \`opendkim -f -x CONF\` (Mode s, Domain example.org, Selector bench, KeyFile, SignatureAlgorithm rsa-sha256 or ed25519-sha256, Canonicalization relaxed/relaxed, OversignHeaders From, InternalHosts 127.0.0.1, Socket inet:PORT@127.0.0.1) and Postfix with \`smtpd_milters = inet:127.0.0.1:PORT\`, \`milter_default_action = tempfail\`; OpenDKIM's CPU and PSS count with Postfix's. The sink counts messages without a DKIM-Signature header (notes say if any)"
}
events_desc() {
    printf '%s\n' "${CASES[@]}" | awk '$5 ~ /sluice-ev/ { f = 1 } END { exit !f }' || return 0
    echo "- Events setups: sluice-evfile adds \`--set events.enabled=true --set events.file=\"DIR/events.jsonl\"\`; sluice-evhook adds \`--set events.enabled=true --set events.webhook_url=\"http://127.0.0.1:PORT/events\"\` (defaults: batches of 100, 1 s max delay, LMDB buffer in the spool directory, fsync on) with \`/usr/bin/python3 tests/py/webhook_sink.py --count-only\` answering 200; the notes compare each with sluice (events off) in the same case"
}
section() {
    cat <<EOF

## End-to-end relay: sluice vs Postfix vs ceiling — $DATE

- Command: \`$INVOCATION\` (tree \`$GIT_REV\`; $BIN_INFO; Postfix $PF_VERSION, Debian package; $MESSAGES messages per measurement; run took ${ELAPSED} s)
- Machine: nproc $(nproc) ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); \`free -g\`: $(free -g | awk '/^Mem:/ { print "total " $2 " GiB, used " $3 ", available " $7 }'); kernel $(uname -r); spool and queue on $fstype
- Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER
- Source (same for all): $SOURCE_DESC
- Sink (same for all, fresh per measurement): \`sluice-loadgen sink --listen 127.0.0.1:SINKPORT --stats-listen 127.0.0.1:STATSPORT --no-tokens\` (cores: all; for the STARTTLS ceiling also \`--tls-cert CERT --tls-key KEY\`; CERT/KEY: \`openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench.localdomain\`)
- sluice (fresh spool per measurement, fsync on as by default): \`$SLUICE_CMD\`
- Postfix: a private instance (own config, queue and data directories under the temp dir; \`postfix -c DIR start\`) from \`bench/postfix/main.cf.in\` and \`master.cf.in\`: Debian's shipped services and durability (queue files fsynced), no chroot, relayhost=[127.0.0.1]:SINKPORT, smtpd STARTTLS (smtpd_tls_security_level=may, same cert) only in the STARTTLS and verify cases, no TLS to the sink except in the verify cases (smtp_tls_security_level=verify, smtp_tls_CAfile=CA, smtp_tls_verify_cert_match=hostname, localhost; the sink then presents a certificate for IP 127.0.0.1 and DNS localhost issued by CA, a test CA from the openssl CLI), default_destination_concurrency_limit=50, default_process_limit=300, logging to a file through postlogd; fresh queue per measurement
$(dkim_desc)
$(events_desc)
- accepted = messages ÷ source wall time; delivered = messages ÷ (source start → the sink's last message); relay CPU = utime+stime (Postfix: master and all its processes, reaped ones included); relay peak = sluice VmHWM, Postfix peak of the summed PSS of its processes sampled every 0.5 s; relay RssAnon / RssFile = the peaks of each, sampled every 0.5 s (anonymous: heap, session and delivery buffers; file: LMDB's mapped spool pages, page cache); sink conns = connections the sink saw (the relay's connection reuse)

$(table)
EOF
}

if [ "$SOURCE" = loadgen ]; then
    SOURCE_DESC="\`sluice-loadgen send --target 127.0.0.1:PORT --connections CONNS --messages $MESSAGES --size SIZE --recipients R [--domains R --domain-dist uniform] [--starttls] --json\` (persistent pipelined connections, cores: all; SIZE includes headers; p99 = its end of data → 250 histogram)"
else
    SOURCE_DESC="\`smtp-source -s CONNS -m $MESSAGES -l SIZE [-r R] -M bench.example -f from@example.org -t to@example.com 127.0.0.1:PORT\` (a new connection per message; SIZE is the body, smtp-source adds ~140 B of headers; R recipients all in one domain; no STARTTLS, so those cases are skipped; no latencies, so no p99)"
fi
OUT=$(section)
echo "$OUT"
if [ "$APPEND" = 1 ]; then
    [ -f "$REPO/BENCHMARKS.md" ] || printf '# Benchmarks\n' >"$REPO/BENCHMARKS.md"
    echo "$OUT" >>"$REPO/BENCHMARKS.md"
    log "appended to BENCHMARKS.md"
fi
