#!/usr/bin/env bash
# Durable write rate of the cluster-mode candidates (issue 16 item 1), on loopback.
#
#   bench/cluster-engines.sh [--n1k N] [--n100k N] [--case-seconds S] [--only pg,nats,redis,etcd] [--out FILE]
#
# For each engine: start it alone (one at a time) as user nobody in a temp dir on
# free loopback ports, run the Python driver against it, stop it by pid. Each case
# writes a message record of 1 KiB or 100 KiB (random, incompressible bytes) with 1
# or 16 writers; every op is acknowledged by the engine before the next one of that
# writer starts. Reported: ops/s, p50/p99 latency of one op, and the CPU seconds of
# the engine's processes (utime+stime, children included, from /proc) per 1000 ops.
#
# Bounds: at most N ops per case (default 2000 at 1 KiB, 500 at 100 KiB), and a
# case stops at --case-seconds (default 40 s) whatever it reached (the row says so).
# Whole script: one engine at a time, each stopped on exit (trap) by pid.
#
# Needs: postgresql-15 (initdb, postgres, pg_basebackup), nats-server, redis-server,
# etcd (etcd-server), setpriv, python3 with psycopg, redis, nats-py (PyPI).
set -euo pipefail

N1K=2000
N100K=500
CASE_SECONDS=40
ONLY="pg,nats,redis,etcd"
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --n1k) N1K="$2"; shift 2 ;;
        --n100k) N100K="$2"; shift 2 ;;
        --case-seconds) CASE_SECONDS="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n 2,18p "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "missing $1 (Debian package $2)" >&2; exit 1; }; }
want pg && { [ -x "$PGBIN/postgres" ] || { echo "missing $PGBIN/postgres (postgresql-15)" >&2; exit 1; }; }
want nats && need nats-server nats-server
want redis && need redis-server redis-server
want etcd && need etcd etcd-server
need setpriv util-linux
python3 -c 'import psycopg, redis, nats' 2>/dev/null ||
    { echo "python3 needs psycopg[binary], redis, nats-py (pip)" >&2; exit 1; }

DIR=$(mktemp -d /tmp/cluster-engines.XXXXXX)
chmod 755 "$DIR"
RESULTS="$DIR/results.tsv"
: > "$RESULTS"
PIDS=()
START=$(date +%s)

stop_pid() {   # SIGTERM, wait up to 15 s, then SIGKILL; by pid only
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local p
    for p in "${PIDS[@]}"; do stop_pid "$p"; done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Engines run unprivileged (PostgreSQL refuses root anyway).
as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; }
# Background start: the job is setpriv itself, which execs the engine, so $! is the
# engine's pid (a backgrounded shell function would give a subshell's pid instead).
spawn_nobody() {
    setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@" &
    LASTPID=$!; PIDS+=("$LASTPID")
}
mkdir_nobody() { mkdir -p "$1"; chown nobody:nogroup "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {  # port, seconds
    local i
    for i in $(seq 1 $(( $2 * 10 ))); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open in $2 s" >&2; return 1
}

# ---------------------------------------------------------------- the driver
cat > "$DIR/driver.py" <<'PY'
import asyncio, base64, http.client, json, os, random, statistics, sys, threading, time

CLK = os.sysconf("SC_CLK_TCK")
ENGINE, RESULTS = sys.argv[1], sys.argv[2]
PIDS = [int(p) for p in sys.argv[3].split(",")]
PORT = int(sys.argv[4])
N1K, N100K, CASE_S = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
EXTRA = sys.argv[8] if len(sys.argv) > 8 else ""

def cpu_seconds():
    """utime+stime of the engine processes and all their descendants (live ones
    read directly, reaped ones through the parent's cutime+cstime)."""
    children, stat = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        pid, ppid = int(d), int(f[1])
        stat[pid] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, list(PIDS), set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += stat.get(p, 0)
        todo.extend(children.get(p, []))
    return total / CLK

def body(size):
    return os.urandom(size)

def emit(setting, what, size, writers, done, wall, lats, cpu, note=""):
    ops = done / wall if wall > 0 else 0.0
    lats = sorted(lats)
    p50 = lats[len(lats) // 2] * 1e3 if lats else float("nan")
    p99 = lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e3 if lats else float("nan")
    cpu_k = cpu / done * 1000 if done else float("nan")
    row = [ENGINE, setting, what, str(size), str(writers), str(done), f"{ops:.0f}",
           f"{p50:.2f}", f"{p99:.2f}", f"{cpu_k:.3f}", note]
    with open(RESULTS, "a") as f:
        f.write("\t".join(row) + "\n")
    print("  " + " | ".join(row), flush=True)

def run_threads(setting, what, size, writers, n, connect, op, note=""):
    """writers threads, each with its own client from connect(); n ops in all."""
    clients = [connect() for _ in range(writers)]
    per = [n // writers + (1 if i < n % writers else 0) for i in range(writers)]
    lats = [[] for _ in range(writers)]
    barrier = threading.Barrier(writers + 1)
    deadline = [0.0]
    errors = []
    def work(i):
        c, mine = clients[i], lats[i]
        payload = body(size)
        barrier.wait()
        try:
            for k in range(per[i]):
                if time.monotonic() > deadline[0]:
                    break
                t = time.perf_counter()
                op(c, i, k, payload)
                mine.append(time.perf_counter() - t)
        except Exception as e:  # reported in the row, not hidden
            errors.append(repr(e)[:120])
    ts = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in ts:
        t.start()
    c0 = cpu_seconds()
    deadline[0] = time.monotonic() + CASE_S
    t0 = time.perf_counter()
    barrier.wait()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    c1 = cpu_seconds()
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
    done = sum(len(l) for l in lats)
    if done < n:
        note = (note + f" stopped at {done}/{n}").strip()
    if errors:
        note = (note + " error: " + errors[0]).strip()
    emit(setting, what, size, writers, done, wall, [x for l in lats for x in l], c1 - c0, note)

SIZES = [(1024, N1K), (102400, N100K)]

# ------------------------------------------------------------- PostgreSQL 15
def pg():
    import psycopg
    hosts = EXTRA.split(",") if EXTRA else []
    setting = os.environ.get("PG_SETTING", "fsync=on synchronous_commit=on")
    def connect(autocommit=True):
        return psycopg.connect(host="127.0.0.1", port=PORT, user="nobody", dbname="postgres",
                               autocommit=autocommit)
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS queue")
        c.execute("""CREATE TABLE queue (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            node int NOT NULL, epoch bigint NOT NULL, due timestamptz NOT NULL DEFAULT now(),
            envelope bytea NOT NULL, body bytea NOT NULL)""")
        c.execute("ALTER TABLE queue ALTER COLUMN body SET STORAGE EXTERNAL")  # no TOAST compression
    env = os.urandom(200)
    def insert(c, i, k, payload):
        c.execute("INSERT INTO queue (node, epoch, envelope, body) VALUES (%s, 1, %s, %s)", (i, env, payload))
    for size, n in SIZES:
        for w in (1, 16):
            run_threads(setting, "INSERT, one commit per message", size, w, n, connect, insert)
    if os.environ.get("PG_ONLY_INSERT"):
        return
    # One writer that batches 32 messages per transaction (what a management
    # thread doing its own group commit would do).
    def connect_tx():
        return connect(autocommit=False)
    def insert_batch(c, i, k, payload):
        with c.cursor() as cur:
            cur.executemany("INSERT INTO queue (node, epoch, envelope, body) VALUES (%s, 1, %s, %s)",
                            [(i, env, payload)] * 32)
        c.commit()
    for size, n in SIZES:
        run_threads(setting, "INSERT, 32 messages per commit (ops = commits)", size, 1, max(1, n // 32),
                    connect_tx, insert_batch, "msg/s = ops/s x 32")
    # Claim path: oldest row, skip rows locked by other claimers, delete it, commit.
    def claim(c, i, k, payload):
        with c.transaction():
            row = c.execute("SELECT id FROM queue ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
            if row is None:
                raise RuntimeError("queue empty")
            c.execute("DELETE FROM queue WHERE id = %s", row)
    for w in (1, 16):
        run_threads(setting, "claim: SELECT FOR UPDATE SKIP LOCKED + DELETE", 0, w, N1K, connect, claim)
    # Throttle on PostgreSQL: GCRA as one upsert on an UNLOGGED table, commit not waited for.
    with connect() as c:
        c.execute("CREATE UNLOGGED TABLE IF NOT EXISTS throttle (key text PRIMARY KEY, tat bigint NOT NULL)")
    def connect_thr():
        c = connect()
        c.execute("SET synchronous_commit = off")
        return c
    gcra_sql = """
        INSERT INTO throttle AS t (key, tat)
        VALUES (%(k)s, (extract(epoch FROM clock_timestamp()) * 1e6)::bigint + %(T)s)
        ON CONFLICT (key) DO UPDATE
           SET tat = greatest(t.tat, excluded.tat - %(T)s) + %(T)s
         WHERE greatest(t.tat, excluded.tat - %(T)s) - (excluded.tat - %(T)s) <= %(tau)s
        RETURNING tat"""
    def gcra(c, i, k, payload):
        c.execute(gcra_sql, {"k": f"site{random.randrange(100)}", "T": 100, "tau": 10_000_000})
    for w in (1, 16):
        run_threads("UNLOGGED table, synchronous_commit=off", "throttle: GCRA upsert", 0, w, N1K, connect_thr, gcra)

# ------------------------------------------------------------ NATS JetStream
def nats_js():
    import nats
    from nats.js.api import StreamConfig, RetentionPolicy, StorageType
    setting = os.environ.get("NATS_SETTING", "file storage, R1")
    async def main():
        nc = await nats.connect(f"nats://127.0.0.1:{PORT}")
        js = nc.jetstream()
        replicas = int(os.environ.get("NATS_REPLICAS", "1"))
        for attempt in range(60):  # a fresh cluster needs a JetStream meta leader first
            try:
                await js.add_stream(StreamConfig(name="MSG", subjects=["msg.>"], retention=RetentionPolicy.WORK_QUEUE,
                                                 storage=StorageType.FILE, num_replicas=replicas))
                break
            except Exception:
                if attempt == 59:
                    raise
                await asyncio.sleep(0.5)
        async def case(what, size, writers, n, op, note=""):
            per = [n // writers + (1 if i < n % writers else 0) for i in range(writers)]
            lats, errors = [], []
            deadline = time.monotonic() + CASE_S
            async def work(i):
                payload = body(size)
                try:
                    for k in range(per[i]):
                        if time.monotonic() > deadline:
                            break
                        t = time.perf_counter()
                        await op(i, payload)
                        lats.append(time.perf_counter() - t)
                except Exception as e:
                    errors.append(repr(e)[:120])
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            await asyncio.gather(*(work(i) for i in range(writers)))
            wall = time.perf_counter() - t0
            c1 = cpu_seconds()
            done = len(lats)
            if done < n:
                note = (note + f" stopped at {done}/{n}").strip()
            if errors:
                note = (note + " error: " + errors[0]).strip()
            emit(setting, what, size, writers, done, wall, lats, c1 - c0, note)
        async def publish(i, payload):
            await js.publish(f"msg.n{i}", payload, timeout=10)
        for size, n in SIZES:
            for w in (1, 16):
                await case("publish, wait for PubAck (16 writers share one connection)", size, w, n, publish)
        # One pull subscription per worker on the same durable consumer: concurrent
        # fetches on one nats-py subscription share its inbox and time out.
        subs = [await js.pull_subscribe("msg.>", durable="claim") for _ in range(16)]
        async def take(i, payload):
            msgs = await subs[i].fetch(1, timeout=5)
            await msgs[0].ack_sync(timeout=5)
        for w in (1, 16):
            await case("claim: pull fetch(1) + ack_sync", 0, w, N1K, take)
        await nc.close()
    asyncio.run(main())

# ------------------------------------------------------------------- Redis 7
GCRA_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local T, tau = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tau then return tat - now - tau end
redis.call('SET', KEYS[1], tat + T, 'PX', math.floor((tat + T - now) / 1000) + 1)
return 0
"""
def redis_():
    import redis
    def connect():
        return redis.Redis(host="127.0.0.1", port=PORT)
    admin = connect()
    for fs in ("always", "everysec"):
        admin.config_set("appendfsync", fs)
        setting = f"appendonly yes, appendfsync {fs}"
        def set_(c, i, k, payload):
            c.set(f"msg:{i}:{k}:{fs}", payload)
        def xadd(c, i, k, payload):
            c.xadd("queue:" + fs, {"b": payload})
        for size, n in SIZES:
            for w in (1, 16):
                run_threads(setting, "SET msg:ID record", size, w, n, connect, set_)
                run_threads(setting, "XADD queue record", size, w, n, connect, xadd)
    sha = admin.script_load(GCRA_LUA)
    def gcra(c, i, k, payload):
        c.evalsha(sha, 1, f"thr:site{random.randrange(100)}", 100, 10_000_000)
    def incr(c, i, k, payload):
        p = c.pipeline(transaction=True)
        key = f"cnt:site{random.randrange(100)}:{int(time.time())}"
        p.incr(key)
        p.pexpire(key, 2000)
        p.execute()
    setting = "appendonly yes, appendfsync everysec"
    for w in (1, 16):
        run_threads(setting, "throttle: GCRA Lua (EVALSHA)", 0, w, N1K, connect, gcra)
        run_threads(setting, "throttle: MULTI INCR+PEXPIRE", 0, w, N1K, connect, incr)
    admin.close()

# ---------------------------------------------------------------- etcd 3.4
def etcd():
    class Client:
        def __init__(self):
            self.h = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        def put(self, key, value):
            doc = json.dumps({"key": base64.b64encode(key).decode(), "value": base64.b64encode(value).decode()})
            self.h.request("POST", "/v3/kv/put", doc, {"Content-Type": "application/json"})
            r = self.h.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"etcd {r.status}: {data[:100]!r}")
        def close(self):
            self.h.close()
    def put(c, i, k, payload):
        c.put(f"/sluice/msg/{i}/{k}".encode(), payload)
    for size, n in SIZES:
        for w in (1, 16):
            run_threads("single member, WAL fsync per batch", "put via v3 JSON gateway", size, w, n, Client, put)

{"pg": pg, "nats": nats_js, "redis": redis_, "etcd": etcd}[ENGINE]()
PY

driver() {  # engine pids port [extra]
    local p
    for p in ${2//,/ }; do echo "   engine pid $p: $(cat /proc/$p/comm)"; done
    timeout 300 python3 "$DIR/driver.py" "$1" "$RESULTS" "$2" "$3" "$N1K" "$N100K" "$CASE_SECONDS" "${4:-}" ||
        echo "driver for $1 failed (rc $?); its remaining rows are missing" >&2
}

# ------------------------------------------------------------- PostgreSQL 15
if want pg; then
    echo "== PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')"
    mkdir_nobody "$DIR/pg"
    as_nobody "$PGBIN/initdb" -D "$DIR/pg/data" -A trust -U nobody --no-sync >/dev/null
    PGPORT=$(free_port)
    # Durability as shipped: fsync=on, synchronous_commit=on, full_page_writes=on,
    # wal_sync_method=fdatasync (Linux default).
    spawn_nobody "$PGBIN/postgres" -D "$DIR/pg/data" -p "$PGPORT" -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories="$DIR/pg" -c fsync=on -c synchronous_commit=on \
        -c max_connections=60 > "$DIR/pg/log" 2>&1
    PGPID=$LASTPID
    wait_port "$PGPORT" 30
    driver pg "$PGPID" "$PGPORT"

    # Same primary, now with a synchronous streaming-replication standby on this box:
    # with synchronous_commit=on and synchronous_standby_names='*', a commit returns
    # only once the standby has also flushed the WAL to its own disk.
    echo "== PostgreSQL with a synchronous standby"
    SBPORT=$(free_port)
    mkdir_nobody "$DIR/pgsb"
    if as_nobody "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PGPORT" -U nobody -D "$DIR/pgsb/data" -R -X stream \
        >"$DIR/pgsb/basebackup.log" 2>&1; then
        spawn_nobody "$PGBIN/postgres" -D "$DIR/pgsb/data" -p "$SBPORT" -c listen_addresses=127.0.0.1 \
            -c unix_socket_directories="$DIR/pgsb" -c hot_standby=on > "$DIR/pgsb/log" 2>&1
        SBPID=$LASTPID
        wait_port "$SBPORT" 30
        python3 - "$PGPORT" <<'PY'
import psycopg, sys, time
c = psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="nobody", dbname="postgres", autocommit=True)
c.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
c.execute("SELECT pg_reload_conf()")
for _ in range(300):
    r = c.execute("SELECT sync_state FROM pg_stat_replication").fetchall()
    if r and r[0][0] == "sync":
        break
    time.sleep(0.1)
else:
    sys.exit("standby never became sync: %r" % (r,))
PY
        PG_SETTING="fsync=on synchronous_commit=on + sync standby (local)" PG_ONLY_INSERT=1 \
            driver pg "$PGPID,$SBPID" "$PGPORT"
        stop_pid "$SBPID"
    else
        echo "pg_basebackup failed; no standby rows: $(tail -2 "$DIR/pgsb/basebackup.log")" >&2
    fi
    stop_pid "$PGPID"
fi

# ------------------------------------------------------------ NATS JetStream
if want nats; then
    NV=$(nats-server --version | awk '{print $2}')
    echo "== NATS $NV JetStream"
    mkdir_nobody "$DIR/nats"
    NPORT=$(free_port)
    # nats-server 2.9 has no setting for fsync per message: the file store syncs on
    # its own interval and on block rollover (sync_interval / "always" came later).
    # The script checks whether this server accepts `sync_interval: always`.
    printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s" }\n' "$NPORT" "$DIR/nats/js" > "$DIR/nats/conf"
    printf 'listen: 127.0.0.1:%s\njetstream { store_dir: "%s", sync_interval: always }\n' "$NPORT" "$DIR/nats/js" > "$DIR/nats/conf-always"
    if nats-server -c "$DIR/nats/conf-always" -t >"$DIR/nats/check" 2>&1; then
        echo "nats-server $NV accepts sync_interval: always; measuring that setting" >&2
        NCONF="$DIR/nats/conf-always"; NSET="file storage, R1, sync_interval always"
    else
        echo "nats-server $NV rejects sync_interval: $(tr '\n' ' ' < "$DIR/nats/check" | cut -c1-160)" >&2
        NCONF="$DIR/nats/conf"; NSET="file storage, R1, default sync (not per message)"
    fi
    chown nobody "$NCONF"
    spawn_nobody nats-server -c "$NCONF" > "$DIR/nats/log" 2>&1
    NPID=$LASTPID
    wait_port "$NPORT" 30
    NATS_SETTING="$NSET" driver nats "$NPID" "$NPORT"
    stop_pid "$NPID"

    # Three servers in one JetStream cluster on loopback, stream with 3 replicas:
    # the PubAck comes once a quorum (2 of 3) has the message (in memory; the file
    # store's sync is as above). All three run on these 2 cores.
    echo "== NATS $NV JetStream, 3-server cluster, R3"
    CP=($(free_port) $(free_port) $(free_port)); CL=($(free_port) $(free_port) $(free_port))
    ROUTES="nats-route://127.0.0.1:${CP[0]}, nats-route://127.0.0.1:${CP[1]}, nats-route://127.0.0.1:${CP[2]}"
    R3PIDS=()
    for i in 0 1 2; do
        mkdir_nobody "$DIR/nats$i"
        printf 'server_name: n%s\nlisten: 127.0.0.1:%s\njetstream { store_dir: "%s" }\ncluster { name: bench, listen: 127.0.0.1:%s, routes: [%s] }\n' \
            "$i" "${CL[$i]}" "$DIR/nats$i/js" "${CP[$i]}" "$ROUTES" > "$DIR/nats$i/conf"
        spawn_nobody nats-server -c "$DIR/nats$i/conf" > "$DIR/nats$i/log" 2>&1
        R3PIDS+=("$LASTPID")
    done
    for i in 0 1 2; do wait_port "${CL[$i]}" 30; done
    NATS_REPLICAS=3 NATS_SETTING="${NSET/R1/R3 (3 servers on this box)}" \
        driver nats "$(IFS=,; echo "${R3PIDS[*]}")" "${CL[0]}"
    for p in "${R3PIDS[@]}"; do stop_pid "$p"; done
fi

# ------------------------------------------------------------------- Redis 7
if want redis; then
    echo "== $(redis-server --version | awk '{print $1, $3}')"
    mkdir_nobody "$DIR/redis"
    RPORT=$(free_port)
    spawn_nobody redis-server --port "$RPORT" --bind 127.0.0.1 --dir "$DIR/redis" --save '' \
        --appendonly yes --appendfsync always --daemonize no --logfile "$DIR/redis/log"
    RPID=$LASTPID
    wait_port "$RPORT" 30
    driver redis "$RPID" "$RPORT"
    stop_pid "$RPID"
fi

# ------------------------------------------------------------------ etcd 3.4
if want etcd; then
    echo "== etcd $(etcd --version | awk '/etcd Version/ {print $3}')"
    mkdir_nobody "$DIR/etcd"
    EPORT=$(free_port); EPEER=$(free_port)
    # Default --max-request-bytes is 1.5 MiB, so a 100 KiB value (137 KB as base64
    # JSON) is accepted; the 2 GiB default backend quota is what rules out bodies.
    spawn_nobody etcd --name n1 --data-dir "$DIR/etcd/data" \
        --listen-client-urls "http://127.0.0.1:$EPORT" --advertise-client-urls "http://127.0.0.1:$EPORT" \
        --listen-peer-urls "http://127.0.0.1:$EPEER" --initial-advertise-peer-urls "http://127.0.0.1:$EPEER" \
        --initial-cluster "n1=http://127.0.0.1:$EPEER" > "$DIR/etcd/log" 2>&1
    EPID=$LASTPID
    wait_port "$EPORT" 30
    sleep 1  # leader election of the single member
    driver etcd "$EPID" "$EPORT"
    stop_pid "$EPID"
fi

# ------------------------------------------------------------------- table
TABLE=$(python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| engine | setting | operation | size | writers | ops | ops/s | p50 ms | p99 ms | engine CPU s / 1000 ops | notes |")
print("|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
for r in rows:
    r[3] = {"0": "–", "1024": "1 KiB", "102400": "100 KiB"}.get(r[3], r[3])
    print("| " + " | ".join(r) + " |")
PY
)
echo
echo "Run took $(( $(date +%s) - START )) s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$TABLE"
[ -n "$OUT" ] && echo "$TABLE" > "$OUT"
exit 0
