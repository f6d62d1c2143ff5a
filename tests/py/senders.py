"""Concurrent smtplib senders.

usage: senders.py HOST PORT CLIENTS PER_CLIENT [--summary] [--lockstep]
Each client thread opens one connection and sends PER_CLIENT messages on it. With
--lockstep, the clients move in rounds: each gets its 354 to DATA, then all send
their message and the final dot together (so the relay sees CLIENTS messages
complete at once, whatever Python's own speed). For
every 250 to DATA it prints "ACK <queued id> <marker>" (flushed at once, so a
watcher can act on it). A client whose connection fails prints "ERR <client>
<error>" and stops. With --summary, only a final JSON summary is printed.
"""
import json
import re
import smtplib
import sys
import threading

host, port, clients, per_client = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
summary = "--summary" in sys.argv[5:]
lockstep = "--lockstep" in sys.argv[5:]
round_barrier = threading.Barrier(clients)
lock = threading.Lock()
acked = []
errors = []
start = threading.Barrier(clients)


def out(line):
    if summary:
        return
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def client(n):
    try:
        s = smtplib.SMTP(host, port, local_hostname="sender%d.test" % n, timeout=15)
    except Exception as e:
        with lock:
            errors.append("client %d connect: %r" % (n, e))
        out("ERR %d %r" % (n, e))
        try:
            start.abort()
        except Exception:
            pass
        return
    try:
        try:
            start.wait(timeout=15)
        except threading.BrokenBarrierError:
            pass
        s.ehlo()
        for i in range(per_client):
            marker = "c%d-m%d" % (n, i)
            code, msg = s.mail("sender%d@example.test" % n)
            if code != 250:
                raise RuntimeError("MAIL %d %r" % (code, msg))
            code, msg = s.rcpt("rcpt%d@example.test" % i)
            if code != 250:
                raise RuntimeError("RCPT %d %r" % (code, msg))
            body = ("Subject: %s\r\nX-Test-Marker: %s\r\n\r\nmessage %s\r\n" % (marker, marker, marker)).encode()
            if lockstep:
                code, msg = s.docmd("DATA")
                if code != 354:
                    raise RuntimeError("DATA %d %r" % (code, msg))
                round_barrier.wait(timeout=30)
                s.send(body + b".\r\n")
                code, msg = s.getreply()
            else:
                code, msg = s.data(body)
            if code != 250:
                raise RuntimeError("DATA %d %r" % (code, msg))
            m = re.search(rb"queued as ([0-9A-Fa-f]{16})", msg)
            if not m:
                raise RuntimeError("no id in %r" % msg)
            with lock:
                acked.append((m.group(1).decode(), marker))
            out("ACK %s %s" % (m.group(1).decode(), marker))
        s.quit()
    except Exception as e:
        with lock:
            errors.append("client %d: %r" % (n, e))
        out("ERR %d %r" % (n, e))
        round_barrier.abort()
        try:
            s.close()
        except Exception:
            pass


threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if summary:
    print(json.dumps({"acked": [a for a, _ in acked], "errors": errors}))
else:
    out("DONE %d" % len(acked))
