"""smtplib.sendmail() of a small message; prints what happened as JSON.

usage: rcpt_probe.py HOST PORT FROM TO
{"accepted": true} or {"refused": [code, "text"]} (RCPT refused).
"""
import json
import smtplib
import sys

host, port, sender, rcpt = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
msg = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: probe\r\n\r\nprobe\r\n"
with smtplib.SMTP(host, port, local_hostname="smtplib.test", timeout=10) as s:
    try:
        s.sendmail(sender, [rcpt], msg)
        print(json.dumps({"accepted": True}))
    except smtplib.SMTPRecipientsRefused as e:
        code, text = e.recipients[rcpt]
        print(json.dumps({"refused": [code, text.decode("utf-8", "replace")]}))
