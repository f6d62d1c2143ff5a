"""An HTTPS server for the MTA-STS tests (tests/delivery_mta_sts.rs): Python's
http.server with TLS by its ssl module (OpenSSL), one certificate per server
name (SNI).

usage: mta_sts_server.py --listen IP:PORT --root DIR --log FILE
                         --cert NAME=CERT_PEM:KEY_PEM [--cert ...]

For a request with Host NAME it serves DIR/NAME.txt as text/plain, or acts as
DIR/NAME.mode says (re-read on each request, so the test can change it):
  redirect  301 to the same path on another host
  huge      a 70 KiB text/plain body (over the 64 KiB limit)
  slow      waits 30 s before answering
Every request is appended to FILE as one JSON line {"host", "path"}, flushed
at once; {"event": "ready"} is written first.
"""
import argparse
import http.server
import json
import os
import ssl
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--listen", required=True)
parser.add_argument("--root", required=True)
parser.add_argument("--log", required=True)
parser.add_argument("--cert", action="append", default=[])
args = parser.parse_args()

lock = threading.Lock()


def record(event):
    with lock, open(args.log, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()


contexts = {}
default = None
for spec in args.cert:
    name, files = spec.split("=", 1)
    cert, key = files.split(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    contexts[name] = ctx
    default = default or ctx


def choose(sock, server_name, _ctx):
    if server_name in contexts:
        sock.context = contexts[server_name]


default.sni_callback = choose


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0]
        record({"host": host, "path": self.path})
        mode_file = os.path.join(args.root, host + ".mode")
        mode = ""
        if os.path.exists(mode_file):
            with open(mode_file) as f:
                mode = f.read().strip()
        if mode == "redirect":
            self.send_response(301)
            self.send_header("Location", "https://elsewhere.invalid" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "slow":
            time.sleep(30)
        if mode == "huge":
            body = (b"version: STSv1\nmode: enforce\nmax_age: 86400\n"
                    + b"mx: x.example\n" * 5000)
        else:
            path = os.path.join(args.root, host + ".txt")
            if self.path != "/.well-known/mta-sts.txt" or not os.path.exists(path):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(path, "rb") as f:
                body = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


host, port = args.listen.rsplit(":", 1)
server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
server.daemon_threads = True
server.socket = default.wrap_socket(server.socket, server_side=True)
record({"event": "ready"})
server.serve_forever()
