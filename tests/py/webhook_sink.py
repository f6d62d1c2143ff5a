"""An HTTP webhook receiver for delivery events (tests/events.rs,
bench/events-load.sh).

usage: webhook_sink.py --listen IP:PORT --out FILE [--fail-file PATH]

Each POST body must be a JSON array of event objects. While PATH exists
(--fail-file) every POST is answered 500 and nothing is kept; otherwise the
batch is appended to FILE as one line ({"n": events, "events": [...]}) and
answered 200. With --count-only the events are counted, not kept (a line
{"n": N} per batch), for load runs. A line "ready" goes to stdout once
listening.
"""
import argparse
import http.server
import json
import os
import sys
import threading

parser = argparse.ArgumentParser()
parser.add_argument("--listen", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--fail-file", default=None)
parser.add_argument("--count-only", action="store_true")
args = parser.parse_args()
host, port = args.listen.rsplit(":", 1)
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if args.fail_file and os.path.exists(args.fail_file):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            events = json.loads(body)
            assert isinstance(events, list)
        except Exception:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        line = {"n": len(events)}
        if not args.count_only:
            line["events"] = events
        with lock:
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
print("ready", flush=True)
sys.stdout.flush()
server.serve_forever()
