"""STARTTLS (unless --no-tls) + AUTH with smtplib, then one message.

usage: auth_client.py HOST PORT MECH USER PASSWORD RCPT [--no-tls] [--no-initial] [--auth-before-tls]
MECH is PLAIN or LOGIN. With --auth-before-tls, AUTH happens in clear text and
STARTTLS after it (which must make the server forget the authentication). Prints one JSON object with the reply to each step;
a failed step ends the session and is reported with its code.
"""
import json
import smtplib
import ssl
import sys

host, port, mech, user, password, rcpt = sys.argv[1:7]
flags = sys.argv[7:]
port = int(port)
result = {}
s = smtplib.SMTP(host, port, local_hostname="smtplib.test", timeout=10)
try:
    s.ehlo()
    result["features_before_tls"] = sorted(s.esmtp_features)

    def do_auth(key):
        s.user, s.password = user, password
        authobject = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login}[mech]
        try:
            code, msg = s.auth(mech, authobject, initial_response_ok="--no-initial" not in flags)
            result[key] = [code, msg.decode()]
        except smtplib.SMTPAuthenticationError as e:
            result[key] = [e.smtp_code, e.smtp_error.decode()]
            raise SystemExit
        except smtplib.SMTPNotSupportedError as e:
            result[key] = [0, str(e)]
            raise SystemExit

    if "--auth-before-tls" in flags:
        do_auth("auth_before_tls")
    if "--no-tls" not in flags:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        code, msg = s.starttls(context=ctx)
        result["starttls"] = [code, msg.decode()]
        s.ehlo()
        result["features_after_tls"] = sorted(s.esmtp_features)
        result["tls_version"] = s.sock.version()
    if "--auth-before-tls" not in flags:
        do_auth("auth")
    code, msg = s.mail("sender@example.test")
    result["mail"] = [code, msg.decode()]
    code, msg = s.rcpt(rcpt)
    result["rcpt"] = [code, msg.decode()]
    if code == 250:
        code, msg = s.data(b"Subject: authenticated\r\n\r\nsent after AUTH " + mech.encode() + b"\r\n")
        result["data"] = [code, msg.decode()]
    s.quit()
except SystemExit:
    try:
        s.quit()
    except Exception:
        pass
finally:
    print(json.dumps(result))
