"""An SMTP receiver with TLS done by Python's ssl module (OpenSSL), for the
outbound TLS policy tests (tests/delivery_tls_policy.rs).

usage: tls_receiver.py --listen IP:PORT --events FILE [--cert PEM --key PEM]
                       [--client-ca PEM]

With --cert/--key it offers STARTTLS and presents that certificate; without,
it never offers STARTTLS. With --client-ca it requires a client certificate
issued by that CA (the handshake fails without one). Every event is appended
to FILE as one JSON line, flushed at once:
  {"event": "starttls", "ok": true|false, "error": ..., "client_cn": ...}
  {"event": "message", "tls": bool, "from": ..., "rcpts": [...], "client_cn": ...}
  {"event": "quit", "tls": bool}
A "message" with "tls": false is mail that crossed in clear text.
"""
import argparse
import json
import socket
import socketserver
import ssl
import threading

parser = argparse.ArgumentParser()
parser.add_argument("--listen", required=True)
parser.add_argument("--events", required=True)
parser.add_argument("--cert")
parser.add_argument("--key")
parser.add_argument("--client-ca")
args = parser.parse_args()

host, port = args.listen.rsplit(":", 1)
lock = threading.Lock()

context = None
if args.cert:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    if args.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args.client_ca)


def record(event):
    with lock, open(args.events, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()


def client_cn(sock):
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class Session(socketserver.BaseRequestHandler):
    def setup(self):
        self.sock = self.request
        self.sock.settimeout(30)
        self.buf = b""
        self.tls = False

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")

    def line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def handle(self):
        try:
            self.session()
        except (OSError, ssl.SSLError):
            pass

    def session(self):
        self.send("220 tls-receiver ESMTP")
        sender, rcpts = None, []
        while True:
            line = self.line()
            if line is None:
                return
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                caps = ["250-tls-receiver", "250-8BITMIME"]
                if context is not None and not self.tls:
                    caps.append("250-STARTTLS")
                caps.append("250 SIZE 10485760")
                self.sock.sendall(("\r\n".join(caps) + "\r\n").encode())
            elif verb == "STARTTLS":
                if context is None or self.tls:
                    self.send("502 5.5.1 no STARTTLS here")
                    continue
                self.send("220 2.0.0 go ahead")
                self.buf = b""
                try:
                    self.sock = context.wrap_socket(self.sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    record({"event": "starttls", "ok": False, "error": str(e)})
                    return
                self.tls = True
                record({"event": "starttls", "ok": True, "client_cn": client_cn(self.sock)})
            elif verb == "MAIL":
                sender, rcpts = line[10:].strip().strip("<>").split(">")[0], []
                self.send("250 2.1.0 ok")
            elif verb == "RCPT":
                rcpts.append(line[8:].strip().strip("<>").split(">")[0])
                self.send("250 2.1.5 ok")
            elif verb == "DATA":
                self.send("354 go on")
                while True:
                    data_line = self.line()
                    if data_line is None:
                        return
                    if data_line == ".":
                        break
                record(
                    {
                        "event": "message",
                        "tls": self.tls,
                        "from": sender,
                        "rcpts": rcpts,
                        "client_cn": client_cn(self.sock),
                    }
                )
                self.send("250 2.0.0 queued")
                sender, rcpts = None, []
            elif verb == "RSET":
                sender, rcpts = None, []
                self.send("250 2.0.0 ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 ok")
            elif verb == "QUIT":
                record({"event": "quit", "tls": self.tls})
                self.send("221 2.0.0 bye")
                return
            else:
                self.send("502 5.5.2 unknown command")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


server = Server((host, int(port)), Session)
record({"event": "ready"})
server.serve_forever()
