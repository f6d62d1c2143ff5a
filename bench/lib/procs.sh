# shellcheck shell=bash
# Process and port helpers shared by bench/queue-scale.sh, bench/queue-scale-abab.sh and
# bench/overload.sh (sourced, not run). The script defines log(), die(),
# START_TIMEOUT_TICKS and STOP_TIMEOUT_TICKS (x 0.1 s); it appends the pids it starts to
# PIDS and sets WORK to its temp dir. On exit every pid in PIDS is stopped (TERM, then KILL
# after STOP_TIMEOUT_TICKS) and WORK is removed on success, kept on failure.

PIDS=() WORK=""
pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
is_zombie() { [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]; }
stop_pid() {
    local pid=$1 i=0
    pid_alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    pkill -TERM -P "$pid" 2>/dev/null || true   # a subshell's children (timeout + loadgen)
    kill -TERM "$pid" 2>/dev/null || true
    while pid_alive "$pid" && ! is_zombie "$pid" && [ $i -lt "$STOP_TIMEOUT_TICKS" ]; do
        sleep 0.1; i=$((i + 1))
    done
    if pid_alive "$pid" && ! is_zombie "$pid"; then
        log "pid $pid did not exit after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$rc" = 0 ]; then rm -rf "$WORK"; else log "kept $WORK for inspection"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_listening() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }
wait_listening() { # PORT PID WHAT
    local i=0
    while ! port_listening "$1"; do
        pid_alive "$2" || die "$3 exited before listening on :$1 (see $WORK)"
        [ $i -lt "$START_TIMEOUT_TICKS" ] || die "$3 not listening on :$1 in time"
        sleep 0.1; i=$((i + 1))
    done
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# "RSS MiB (anon + file)": VmRSS with its anonymous part (the heap) and its file-backed part
# (mostly LMDB's memory map: page cache the kernel can drop).
rss_split() { awk '$1 == "VmRSS:" { r = $2 } $1 == "RssAnon:" { a = $2 } $1 == "RssFile:" { f = $2 }
    END { printf "%.0f (%.0f + %.0f)", r / 1024, a / 1024, f / 1024 }' "/proc/$1/status"; }
