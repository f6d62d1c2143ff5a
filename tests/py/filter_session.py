"""One SMTP transaction with smtplib, every reply reported (for filter tests).

usage: filter_session.py HOST PORT HELO FROM TO[,TO...] SUBJECT
Prints JSON: {"ehlo": [code, text], "mail": [...], "rcpt": {TO: [...]},
"data": [...]}; a step is missing when an earlier refusal ended the
transaction. Never raises on SMTP refusals.
"""
import json
import smtplib
import sys

host, port, helo, sender, rcpts, subject = sys.argv[1:7]
rcpts = rcpts.split(",")
out = {"rcpt": {}}
msg = (
    f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: {subject}\r\n"
    "X-Internal: secret\r\n\r\nhello from smtplib\r\n"
)
with smtplib.SMTP(host, int(port), local_hostname=helo, timeout=15) as s:
    code, text = s.ehlo()
    out["ehlo"] = [code, text.decode("utf-8", "replace").splitlines()[0]]
    if code == 250:
        code, text = s.mail(sender)
        out["mail"] = [code, text.decode("utf-8", "replace")]
        if code == 250:
            accepted = 0
            for r in rcpts:
                code, text = s.rcpt(r)
                out["rcpt"][r] = [code, text.decode("utf-8", "replace")]
                accepted += code == 250
            if accepted:
                code, text = s.data(msg.encode())
                out["data"] = [code, text.decode("utf-8", "replace")]
print(json.dumps(out))
