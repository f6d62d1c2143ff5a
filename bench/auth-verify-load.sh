#!/usr/bin/env bash
# Acceptance throughput with inbound authentication on vs off, side by side.
#
# NSD on a loopback port serves example.org (the loadgen's MAIL FROM, From and HELO
# domain: SPF ip4:127.0.0.0/8, DMARC p=none), its parent org. (so the DMARC tree walk
# gets NXDOMAIN, as on the Internet) and 0.0.127.in-addr.arpa (iprev of 127.0.0.1).
# Each round starts a fresh sluice (delivery off, fsync on) with verification off,
# then one with every check on (iprev, SPF HELO+MAIL FROM, DKIM, ARC, DMARC), the
# order alternating per round; each gets a warm-up run (fills the DNS cache) and then
# sluice-loadgen send --messages N --connections C --size 1024. Prints msg/s per run,
# the on/off ratio per round and their median.
# With --dkim, every message (both modes) is one 1 KiB message signed once with
# dkimpy (RSA-2048 from dknewkey, key published as loadgen._domainkey.example.org),
# sent by sluice-loadgen --message under a per-message X-Loadgen-Token field (not
# signed): the "on" runs then verify a real DKIM signature per message.
#
# Usage: bench/auth-verify-load.sh [--rounds N] [--messages N] [--connections C] [--dkim] [--bin DIR]
# Needs nsd, jq, ss (and dknewkey, /usr/bin/python3 with dkim for --dkim).
# Machine and load: say them when you quote the figures.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=3 MESSAGES=5000 CONNS=32 BIN="$REPO/target/release" DKIM=0
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=${2:?}; shift ;;
        --messages) MESSAGES=${2:?}; shift ;;
        --connections) CONNS=${2:?}; shift ;;
        --bin) BIN=${2:?}; shift ;;
        --dkim) DKIM=1 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
NSD=$(command -v nsd || echo /usr/sbin/nsd)
for t in "$NSD" jq ss "$BIN/sluice" "$BIN/sluice-loadgen"; do
    command -v "$t" >/dev/null || [ -x "$t" ] || { echo "missing $t" >&2; exit 2; }
done

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    if [ -f "$WORK/nsd.pid" ]; then
        local n; n=$(cat "$WORK/nsd.pid")
        kill "$n" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$n" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$WORK" || true
}
trap cleanup EXIT

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        [ -z "$(ss -Hltnu "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return; }
    done
}
wait_listening() { # PORT
    local i=0
    while [ -z "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; do
        i=$((i + 1)); [ $i -lt 150 ] || { echo "nothing on :$1" >&2; exit 1; }
        sleep 0.1
    done
}

DNS_PORT=$(free_port)
cat >"$WORK/example.org.zone" <<Z
\$ORIGIN example.org.
\$TTL 3600
@ SOA ns hostmaster 1 3600 600 86400 3600
@ NS ns
ns A 127.0.0.1
@ TXT "v=spf1 include:_spf.example.org -all"
_spf TXT "v=spf1 ip4:127.0.0.0/8 -all"
loadgen TXT "v=spf1 ip4:127.0.0.0/8 -all"
loadgen A 127.0.0.1
_dmarc TXT "v=DMARC1; p=none"
Z
MESSAGE_ARGS=()
if [ "$DKIM" = 1 ]; then
    command -v dknewkey >/dev/null || { echo "missing dknewkey (python3-dkim)" >&2; exit 2; }
    (cd "$WORK" && dknewkey loadgen >/dev/null 2>&1)
    # dknewkey's record as one zone-file TXT of <=200-byte strings.
    record=$(tr -d '\n' <"$WORK/loadgen.dns")
    printf 'loadgen._domainkey TXT %s\n' "$(printf '%s' "$record" | fold -w 200 | sed 's/.*/"&"/' | tr '\n' ' ')" >>"$WORK/example.org.zone"
    /usr/bin/python3 - "$WORK/loadgen.key" "$WORK/signed.eml" <<'PY'
import sys, dkim
key = open(sys.argv[1], "rb").read()
head = (b"From: <loadgen@example.org>\r\nTo: <rcpt@example.com>\r\nSubject: signed load\r\n"
        b"Date: Sun, 06 Dec 2026 00:00:00 +0000\r\nMessage-ID: <signed@loadgen>\r\n\r\n")
line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!!\r\n"
msg = head
while len(msg) + len(line) <= 1024:
    msg += line
sig = dkim.sign(msg, b"loadgen", b"example.org", key,
                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
open(sys.argv[2], "wb").write(sig + msg)
PY
    MESSAGE_ARGS=(--message "$WORK/signed.eml")
fi
cat >"$WORK/org.zone" <<Z
\$ORIGIN org.
\$TTL 3600
@ SOA ns.example.org. hostmaster 1 3600 600 86400 3600
@ NS ns.example.org.
Z
cat >"$WORK/rev.zone" <<Z
\$ORIGIN 0.0.127.in-addr.arpa.
\$TTL 3600
@ SOA ns.example.org. hostmaster 1 3600 600 86400 3600
@ NS ns.example.org.
1 PTR loadgen.example.org.
Z
cat >"$WORK/nsd.conf" <<C
server:
  ip-address: 127.0.0.1@$DNS_PORT
  port: $DNS_PORT
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  pidfile: "$WORK/nsd.pid"
  database: ""
  xfrdfile: "$WORK/xfrd.state"
  zonelistfile: "$WORK/zone.list"
  logfile: "$WORK/nsd.log"
  server-count: 1
remote-control:
  control-enable: no
zone:
  name: example.org
  zonefile: example.org.zone
zone:
  name: org
  zonefile: org.zone
zone:
  name: 0.0.127.in-addr.arpa
  zonefile: rev.zone
C
"$NSD" -c "$WORK/nsd.conf"
sleep 0.5

run_one() { # on|off -> msg/s
    local mode=$1 port dir args
    port=$(free_port)
    dir="$WORK/$mode-$RANDOM"
    mkdir -p "$dir"
    args=(run --set delivery.enabled=false --set "dns.servers=[\"127.0.0.1:$DNS_PORT\"]"
        --set log.level=warn --set 'admin.listen=""'
        --set "server.listener.smtp.bind=[\"127.0.0.1:$port\"]"
        --set "server.listener.smtp.max_connections_per_ip=1024"
        --set 'relay.local_domains=["example.com"]'
        --set "spool.path=$dir/spool")
    if [ "$mode" = on ]; then
        args+=(--set 'server.listener.smtp.verify.iprev=true')
    fi
    "$BIN/sluice" "${args[@]}" >"$dir/out" 2>"$dir/err" &
    local pid=$!
    PIDS+=("$pid")
    wait_listening "$port"
    "$BIN/sluice-loadgen" send --target "127.0.0.1:$port" --connections "$CONNS" \
        --messages 500 --size 1024 "${MESSAGE_ARGS[@]}" --json >"$dir/warm.json"
    "$BIN/sluice-loadgen" send --target "127.0.0.1:$port" --connections "$CONNS" \
        --messages "$MESSAGES" --size 1024 "${MESSAGE_ARGS[@]}" --json >"$dir/run.json"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local acc
    acc=$(jq -r '.accepted' "$dir/run.json")
    [ "$acc" = "$MESSAGES" ] || { echo "$mode: accepted $acc of $MESSAGES: $(jq -c . "$dir/run.json")" >&2; exit 1; }
    if [ "$mode" = on ] && [ "$DKIM" = 1 ]; then
        # The "on" runs must really have verified the signature: every stored message
        # (warm-up and run) carries our Authentication-Results with dkim=pass.
        local passed
        passed=$(grep -a -o -r "dkim=pass" "$dir/spool" | wc -l)
        [ "$passed" -ge "$MESSAGES" ] || { echo "on: only $passed stored messages say dkim=pass" >&2; exit 1; }
    fi
    jq -r '.msgs_per_sec | round' "$dir/run.json"
}

echo "rounds=$ROUNDS messages=$MESSAGES connections=$CONNS size=1024 dkim=$DKIM load=$(cut -d' ' -f1-3 /proc/loadavg)"
RATIOS=()
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then off=$(run_one off); on=$(run_one on); else on=$(run_one on); off=$(run_one off); fi
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')
    RATIOS+=("$ratio")
    echo "round $r: off $off msg/s, on $on msg/s, on/off $ratio"
done
median=$(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
echo "median on/off: $median   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
