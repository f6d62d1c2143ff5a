"""A deliberately lenient SMTP receiver: the next hop SMTP smuggling feeds on.

usage: lenient_sink.py HOST PORT OUTDIR [max]

It ends a line at CRLF, at a bare LF and at a bare CR, so a "<LF>.<LF>" or
"<CR>.<CR>" inside message data ends the message here, and whatever follows is
read as commands. Every transaction it completes is written to OUTDIR/tx-N.json
({"from", "rcpts", "lines"}), and each connection's raw bytes to
OUTDIR/conn-N.raw as they arrive. A relay passing a smuggled message on raw
would show up here as an extra transaction.

With "max" it is every lenient receiver at once (issue 17): a data line ends the
message when it is "." as it is, cut at its first NUL, with whitespace and
control bytes trimmed from both ends, or with every byte that is not printable
ASCII deleted. Dropping NULs before framing adds nothing to that: it only
joins CR NUL LF into one line end. So if no message splits here, it splits at
none of those receivers, alone or combined.
"""
import json
import os
import socket
import sys
import threading

host, port, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
maximal = len(sys.argv) > 4 and sys.argv[4] == "max"
lock = threading.Lock()
counter = {"tx": 0, "conn": 0}


def next_id(kind):
    with lock:
        counter[kind] += 1
        return counter[kind]


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def lines_of(buf):
    """Split off complete lines (CRLF, LF or bare CR); return (lines, rest)."""
    out = []
    i = 0
    start = 0
    while i < len(buf):
        c = buf[i]
        if c == 0x0A:
            out.append(buf[start:i])
            start = i + 1
        elif c == 0x0D:
            if i + 1 == len(buf):
                break  # CR at the end: wait to see whether LF follows
            out.append(buf[start:i])
            start = i + 2 if buf[i + 1] == 0x0A else i + 1
            i = start - 1
        i += 1
    return out, buf[start:]


def graphic(c):
    return 0x21 <= c <= 0x7E


def ends_data(line):
    """Whether this receiver takes the data line for the end of the message."""
    if line == b".":
        return True
    if not maximal:
        return False
    cut = line.split(b"\x00", 1)[0]
    kept = bytes(c for c in line if graphic(c))
    pos = [i for i, c in enumerate(line) if graphic(c)]
    trimmed = line[pos[0]:pos[-1] + 1] if pos else b""
    return b"." in (cut, kept, trimmed)


def serve(conn):
    cid = next_id("conn")
    # Raw bytes are appended as they arrive (the relay may keep the connection
    # open for its next message).
    raw = open(os.path.join(outdir, "conn-%d.raw" % cid), "ab")
    buf = b""
    tx = None
    in_data = False
    try:
        conn.sendall(b"220 lenient ESMTP\r\n")
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            raw.write(chunk)
            raw.flush()
            lines, buf = lines_of(buf + chunk)
            replies = []
            for line in lines:
                if in_data:
                    if ends_data(line):
                        in_data = False
                        n = next_id("tx")
                        write_atomic(
                            os.path.join(outdir, "tx-%d.json" % n),
                            json.dumps(tx).encode(),
                        )
                        tx = None
                        replies.append(b"250 2.0.0 Ok")
                    else:
                        if line.startswith(b".."):
                            line = line[1:]
                        tx["lines"].append(line.decode("latin-1"))
                    continue
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    replies.append(b"250-lenient\r\n250-PIPELINING\r\n250 8BITMIME")
                elif verb == b"MAIL":
                    tx = {"from": line[10:].decode("latin-1"), "rcpts": [], "lines": []}
                    replies.append(b"250 2.1.0 Ok")
                elif verb == b"RCPT" and tx is not None:
                    tx["rcpts"].append(line[8:].decode("latin-1"))
                    replies.append(b"250 2.1.5 Ok")
                elif verb == b"DATA" and tx is not None:
                    in_data = True
                    replies.append(b"354 go ahead")
                elif verb == b"RSET":
                    tx = None
                    replies.append(b"250 2.0.0 Ok")
                elif verb == b"NOOP":
                    replies.append(b"250 2.0.0 Ok")
                elif verb == b"QUIT":
                    conn.sendall(b"".join(r + b"\r\n" for r in replies) + b"221 2.0.0 Bye\r\n")
                    return
                else:
                    replies.append(b"502 5.5.1 what")
            if replies:
                conn.sendall(b"".join(r + b"\r\n" for r in replies))
    except OSError:
        pass
    finally:
        raw.close()
        conn.close()


def main():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
