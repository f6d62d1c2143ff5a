"""STARTTLS sessions for the reload tests (tests/signals.rs).

usage:
  tls_session.py certfp FILE          SHA-256 of a PEM certificate's DER bytes
  tls_session.py peerfp HOST PORT     STARTTLS, print the server certificate's
                                      SHA-256, QUIT
  tls_session.py hold HOST PORT       STARTTLS, print "fp <SHA-256>", then wait
                                      for a line on stdin, send one message in
                                      the same session, print "sent" and QUIT

Certificates are not verified (the tests make self-signed ones); the point is
which one the server presents.
"""
import hashlib
import smtplib
import ssl
import sys


def context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def open_tls(host, port):
    s = smtplib.SMTP(host, int(port), timeout=20)
    s.ehlo("tls.test")
    code, reply = s.starttls(context=context())
    if code != 220:
        raise SystemExit(f"STARTTLS answered {code} {reply!r}")
    s.ehlo("tls.test")
    return s, hashlib.sha256(s.sock.getpeercert(binary_form=True)).hexdigest()


mode = sys.argv[1]
if mode == "certfp":
    with open(sys.argv[2]) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    print(hashlib.sha256(der).hexdigest())
elif mode == "peerfp":
    s, fp = open_tls(sys.argv[2], sys.argv[3])
    s.quit()
    print(fp)
elif mode == "hold":
    s, fp = open_tls(sys.argv[2], sys.argv[3])
    print("fp " + fp, flush=True)
    sys.stdin.readline()
    refused = s.sendmail(
        "held@client.test",
        ["rcpt@example.com"],
        b"Subject: held across a reload\r\n\r\nsame TLS session\r\n",
    )
    print("sent" if not refused else f"refused {refused}", flush=True)
    s.quit()
else:
    raise SystemExit(f"unknown mode {mode}")
