"""An HTTPS server that accepts POSTs (TLS reports, RFC 8460 §5.2) and
saves each one, for tests/tls_rpt.rs.

usage: https_sink.py --listen IP:PORT --cert PEM --key PEM --dir DIR

Each POST is written to DIR/post-N.body (the raw body) and DIR/post-N.json
({"path", "content_type", "length"}), the .json last, and answered 200.
A line "ready" goes to stdout once listening.
"""
import argparse
import http.server
import json
import os
import ssl
import threading

parser = argparse.ArgumentParser()
parser.add_argument("--listen", required=True)
parser.add_argument("--cert", required=True)
parser.add_argument("--key", required=True)
parser.add_argument("--dir", required=True)
args = parser.parse_args()
host, port = args.listen.rsplit(":", 1)
lock = threading.Lock()
count = [0]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        if length > 1 << 20:
            self.send_response(413)
            self.end_headers()
            return
        body = self.rfile.read(length)
        with lock:
            count[0] += 1
            n = count[0]
        base = os.path.join(args.dir, "post-%d" % n)
        with open(base + ".body", "wb") as f:
            f.write(body)
        meta = {
            "path": self.path,
            "content_type": self.headers.get("Content-Type"),
            "length": length,
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(meta, f)
        os.rename(base + ".json.tmp", base + ".json")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(args.cert, args.key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
