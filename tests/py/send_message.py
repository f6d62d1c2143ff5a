"""smtplib's high-level send_message() against the relay.

usage: send_message.py HOST PORT
Prints one JSON object: the EHLO features seen and the refused recipients.
"""
import json
import smtplib
import sys
from email.message import EmailMessage

host, port = sys.argv[1], int(sys.argv[2])
msg = EmailMessage()
msg["From"] = "Alice <alice@example.test>"
msg["To"] = "bob@example.test, carol@example.test"
msg["Subject"] = "smtplib send_message"
msg.set_content("Hello from smtplib.\n.leading dot line\nBye.\n")
with smtplib.SMTP(host, port, local_hostname="smtplib.test", timeout=10) as s:
    s.ehlo()
    features = sorted(s.esmtp_features)
    refused = s.send_message(msg)
print(json.dumps({"features": features, "refused": {k: list(v) for k, v in refused.items()}}))
