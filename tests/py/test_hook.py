#!/usr/bin/python3
"""An HTTP hook for tests/hooks.rs (Python's http.server, one thread per request).

Usage: test_hook.py PORT LOG

Every request document is appended to LOG as one JSON line (with the path).
POST /slow waits 5 s before answering accept. POST /broken answers HTTP 200
with a body that is not JSON. Otherwise (docs/hooks.md):
  rcpt: a recipient blocked@... is rejected 550 5.7.1;
  data: the Subject decides: "hook-reject" rejects 554 5.7.1, "hook-discard"
  discards, "hook-quarantine" quarantines, "hook-edit" accepts with every
  modification; anything else is accepted unchanged.
  delivery: the Subject decides: "stage-reject" rejects 550 5.7.1,
  "stage-tempfail" tempfails 451 4.7.1, "stage-discard" discards,
  "stage-quarantine" quarantines; anything else is accepted.
"""
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
LOG = sys.argv[2]
LOCK = threading.Lock()


def subject_of(doc):
    """The Subject of the message in the document ("" without one)."""
    content = (doc.get("message") or {}).get("content", "")
    m = re.search(r"^Subject: (.*?)\r?$", content, re.M)
    return m.group(1) if m else ""


def decide(doc):
    if doc["stage"] == "rcpt" and (doc.get("argument") or "").startswith("blocked@"):
        return {"action": "reject",
                "reply": {"code": 550, "enhanced": "5.7.1", "text": "Recipient blocked by hook"}}
    if doc["stage"] == "delivery":
        return decide_delivery(doc)
    if doc["stage"] != "data":
        return {"action": "accept"}
    subject = subject_of(doc)
    if "hook-reject" in subject:
        return {"action": "reject",
                "reply": {"code": 554, "enhanced": "5.7.1", "text": "Content refused by hook"}}
    if "hook-discard" in subject:
        return {"action": "discard"}
    if "hook-quarantine" in subject:
        return {"action": "quarantine", "reason": "hook says hold"}
    if "hook-edit" in subject:
        return {"action": "accept", "modifications": [
            {"type": "add_header", "name": "X-Hook",
             "value": "checked %s" % doc["client"]["ip"]},
            {"type": "change_header", "name": "Subject", "value": "[hook] " + subject},
            {"type": "remove_header", "name": "X-Remove-Me"},
            {"type": "add_recipient", "address": "copy@far.test"},
            {"type": "remove_recipient", "address": "removed@far.test"},
            {"type": "change_sender", "address": "hooked@snd.test"},
            {"type": "replace_body", "body": "replaced by hook\n"},
        ]}
    return {}


def decide_delivery(doc):
    """Before delivery (tests/delivery_stage.rs): the Subject decides."""
    subject = subject_of(doc)
    if "stage-reject" in subject:
        return {"action": "reject",
                "reply": {"code": 550, "enhanced": "5.7.1", "text": "Held back by delivery hook"}}
    if "stage-tempfail" in subject:
        return {"action": "tempfail",
                "reply": {"code": 451, "enhanced": "4.7.1", "text": "Not now, says the delivery hook"}}
    if "stage-discard" in subject:
        return {"action": "discard"}
    if "stage-quarantine" in subject:
        return {"action": "quarantine", "reason": "delivery hook says hold"}
    return {"action": "accept"}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        doc = json.loads(self.rfile.read(length))
        with LOCK, open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "doc": doc}) + "\n")
        if self.path == "/slow":
            time.sleep(5)
            body = b"{}"
        elif self.path == "/broken":
            body = b"<html>not json</html>"
        else:
            body = json.dumps(decide(doc)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
