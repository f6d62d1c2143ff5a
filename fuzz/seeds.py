#!/usr/bin/env python3
"""Writes hand-made seed inputs for the fuzz targets into fuzz/seeds/<target>/.

The fuzzers start from these (plus fuzz/corpus/<target>/); the input layouts are
documented on each target function in engine/src/fuzzing/. Run from anywhere:
    python3 fuzz/seeds.py
"""

import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
TURN = b"\xff"


def write(target, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- smtp_server: flags, chunk seed, turns separated by 0xff -----------------
ENV = b"EHLO client.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n"
server = [
    (0x00, ENV + b"DATA\r\n", b"Subject: hi\r\n\r\n..dot\r\nend\r\n.\r\nQUIT\r\n"),
    (0x01, b"EHLO x\r\nSTARTTLS\r\n", b"EHLO x\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 5 LAST\r\nhello", b"QUIT\r\n"),
    (0x07, b"EHLO x\r\nSTARTTLS\r\n", b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde", b"RSET\r\nQUIT\r\n"),
    (0x06, b"EHLO x\r\nAUTH LOGIN\r\n", b"YWxpY2U=\r\n", b"c2VjcmV0\r\n", b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n", b"x\r\n.\r\n"),
    (0x06, b"EHLO x\r\nAUTH PLAIN\r\n", b"AGFsaWNlAHdyb25n\r\n", b"AUTH LOGIN YWxpY2U=\r\n", b"*\r\n"),
    (0x08, b"LHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@local.test>\r\nRCPT TO:<postmaster>\r\nDATA\r\n", b"x\r\n.\r\n"),
    (0x00, ENV + b"DATA\r\nbody sent too early\r\n.\r\n",),
    (0x20, b"EHLO x\r\nMAIL FROM:<a@local.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=e+2B1 HOLDFOR=60 BY=120;R MT-PRIORITY=3 SMTPUTF8\r\nRCPT TO:<b@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@remote.test\r\nDATA\r\n", b"a\r\n.\r\n"),
    (0x00, b"EHLO x\nMAIL FROM:<a@local.test>\r\n"),
    (0x00, b"EHLO x\r\n" + b"NOOP " + b"A" * 600 + b"\r\nNOOP\r\n"),
    (0x10, ENV + b"DATA\r\n", b"a\n.\nMAIL FROM:<evil@x>\r\n.\r\n"),
    (0x00, ENV + b"DATA\r\n", b"a\r\n.\rX\r\n.\r\n"),
    (0x00, b"HELO x\r\nHELP\r\nVRFY a\r\nEXPN b\r\nETRN c\r\nNOOP\r\nRSET\r\nFOO\r\n\r\nQUIT\r\n"),
    (0x00, b"MAIL FROM:<a@local.test>\r\nEHLO x\r\nRCPT TO:<b@local.test>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<c@d>\r\n"),
    (0x00, ENV + b"RCPT TO:<c%d@local.test>\r\nRCPT TO:<@a,@b:c@d.test>\r\nRCPT TO:<\"x@y\"@local.test>\r\nRCPT TO:<u@[127.0.0.1]>\r\nRCPT TO:<v@LOCAL.TEST.>\r\n"),
    (0x80, ENV + b"BDAT 2 LAST\r\nab", ENV + b"BDAT 1 LAST\r\nc", ENV + b"DATA\r\n", b".\r\n"),
    (0x40 | 0x04, b"EHLO x\r\nAUTH PLAIN AHgAeQ==\r\nAUTH PLAIN AHgAeQ==\r\nAUTH PLAIN AHgAeQ==\r\n"),
    (0x00, ENV + b"BDAT 99999999999 LAST\r\nabc"),
    (0x00, b"EHLO x\r\nMAIL FROM:<a@local.test> HOLDUNTIL=1790000100 BY=-5;N\r\nRCPT TO:<b@local.test>\r\nBDAT 0 LAST\r\n"),
    # Issue 17: NUL in commands and data, invalid UTF-8 and unflagged non-ASCII addresses.
    (0x00, b"EHLO a\x00b\r\nEHLO x\r\nMAIL FROM:<a\x00@local.test>\r\nMAIL FROM:<j\xff\xferg@local.test> SMTPUTF8\r\n"),
    (0x00, b"EHLO x\r\nMAIL FROM:<j\xc3\xb6rg@local.test>\r\nMAIL FROM:<a@local.test> ENVID=a+FF\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<j\xc3\xb6rg@local.test>\r\nRCPT TO:<j\xed\xa0\x80@local.test>\r\nRCPT TO:<b@local.test> ORCPT=rfc822;b+FF@x\r\n"),
    (0x00, ENV + b"DATA\r\n", b"a\r\n\x00.\x00\r\nMAIL FROM:<evil@x>\r\n.\r\n"),
    (0x10, ENV + b"DATA\r\n", b"a\n\x00.\nMAIL FROM:<evil@x>\r\nb\x00\r\n.\r\n", ENV + b"BDAT 4 LAST\r\n\x00.\x00\n"),
    (0x00, ENV + b"DATA\r\n", b"x" * 101 + b"\r\n.\r\n"),
]
for i, (flags, *turns) in enumerate(server):
    write("smtp_server", bytes([flags, i % 4]) + TURN.join(turns))

# --- smtp_data: flags (limit, bare mode), chunk seed, body -------------------
bodies = [
    b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n",
    b".\r\n",
    b"..leading\r\n...\r\n.x\r\n.\r\n",
    b"a\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
    b"a\r\n.\nX\r\n.\r\n",
    b"a\n.\r\nX\r\n.\r\n",
    b"a\r.\r\nX\r\n.\r\n",
    b"a\r\n.\r\rX\r\n.\r\n",
    b"a\r\r\n.\r\n",
    b"x" * 100 + b"\r\n.\r\n",
    b"no end\r\n.",
    b"\r",
    b"",
]
for i, body in enumerate(bodies):
    write("smtp_data", bytes([i % 4 | (0x10 if i % 2 else 0), i]) + body)

# NUL, whitespace and line-end variants around a dot (issue 17): what a lenient
# next hop could take for the end of data.
JUNK = [b"", b"\x00", b" ", b"\t", b"\x0b\x0c", b"\x00 \x00", b"\xc2\xa0"]
ENDS = [b"\r\n", b"\n", b"\r", b"\r\x00\n", b"\r\r\n"]
dot_variants = []
for pre in ENDS:
    for post in ENDS:
        for before in JUNK:
            for after in JUNK:
                if before and after and before != after:
                    continue
                dot_variants.append(b"Subject: x\r\n\r\nhello" + pre + before + b"." + after + post
                                    + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@local.test>\r\nDATA\r\n")
for i, body in enumerate(dot_variants):
    if i % 7 == 0:
        write("smtp_data", bytes([i % 4 | (0x10 if i % 2 else 0), i % 256]) + body + b"\r\n.\r\n")

# --- smtp_client: flags, chunk seed, server bytes ----------------------------
EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
client = [
    (0x12, b"220 mx.test ESMTP\r\n" + EHLO + b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n250 2.0.0 queued\r\n221 bye\r\n"),
    (0x00, b"220 mx.test\r\n250-mx.test\r\n250 SIZE\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n451 4.3.0 later\r\n250 ok\r\n"),
    (0x02, b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 2.0.0 go\r\n250-mx.test\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n"),
    (0x0a, b"220 mx.test\r\n250-mx.test\r\n250 STARTTLS\r\n220 go\r\n250-mx.test\r\n250 AUTH LOGIN\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 ok\r\n"),
    (0x0c, b"220 mx.test\r\n250-mx.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n220 go\r\n250-mx.test\r\n250 AUTH PLAIN\r\n535 5.7.8 no\r\n"),
    (0x04, b"220 mx.test\r\n250 mx.test\r\n"),
    (0x21, b"220 lmtp.test LMTP\r\n250-lmtp.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 a\r\n452 4.2.2 full\r\n"),
    (0x00, b"554 5.7.1 go away\r\n"),
    (0x00, b"220-first\n220-second\r\n220 third\r\n250 x\r\n"),
    (0x00, b"220 x\r\n250-a\r\n251 b\r\n"),
    (0x00, b"220 x\r\nxyz\r\n"),
    (0x80, b"220 x\r\n" + EHLO.replace(b"250-SMTPUTF8\r\n", b"") + b"221 bye\r\n"),
]
for i, (flags, stream) in enumerate(client):
    write("smtp_client", bytes([flags, i % 4]) + stream)


# --- dns_answer: selector, wire response -------------------------------------
def name(n):
    out = b""
    for label in n.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


TYPES = {"MX": 15, "A": 1, "AAAA": 28, "TXT": 16, "PTR": 12, "TLSA": 52, "CNAME": 5, "SOA": 6}
SEL_TYPE = {"MX": 0, "A": 1, "AAAA": 2, "TXT": 3, "PTR": 4, "TLSA": 5}
NAMES = ["example.com", "mx.example.net", "_25._tcp.mx.example.com", "2.0.192.in-addr.arpa"]


def rr(owner, rtype, ttl, rdata):
    return name(owner) + struct.pack(">HHIH", TYPES[rtype], 1, ttl, len(rdata)) + rdata


def msg(qname, qtype, answers=(), authority=(), rcode=0, flags=0x8180, qid=0x1234, question=True):
    flags = (flags & ~0xF) | rcode
    q = name(qname) + struct.pack(">HH", TYPES[qtype], 1) if question else b""
    head = struct.pack(">HHHHHH", qid, flags, 1 if question else 0, len(answers), len(authority), 0)
    return head + q + b"".join(answers) + b"".join(authority)


def soa(zone, ttl, minimum):
    rdata = name("ns1." + zone) + name("host." + zone) + struct.pack(">IIIII", 1, 3600, 600, 86400, minimum)
    return rr(zone, "SOA", ttl, rdata)


dns = [
    (0, "MX", msg("example.com", "MX", [
        rr("example.com", "MX", 3600, struct.pack(">H", 10) + name("mx1.example.com")),
        rr("example.com", "MX", 300, struct.pack(">H", 20) + name("MX2.example.net")),
        rr("evil.example", "MX", 9, struct.pack(">H", 0) + name("attacker.example")),
    ])),
    (0, "MX", msg("example.com", "MX", [rr("example.com", "MX", 60, struct.pack(">H", 0) + b"\x00")])),
    (0, "MX", msg("example.com", "MX", [], [soa("example.com", 900, 300)], rcode=3)),
    (0, "MX", msg("example.com", "MX", [], [soa("com", 900, 300)])),
    (1, "A", msg("mx.example.net", "A", [
        rr("mx.example.net", "CNAME", 100, name("a.example.net")),
        rr("a.example.net", "CNAME", 100, name("b.example.net")),
        rr("b.example.net", "A", 50, bytes([192, 0, 2, 1])),
    ])),
    (1, "A", msg("mx.example.net", "A", [
        rr("mx.example.net", "CNAME", 100, name("a.example.net")),
        rr("a.example.net", "CNAME", 100, name("mx.example.net")),
    ])),
    (1, "AAAA", msg("mx.example.net", "AAAA", [rr("mx.example.net", "AAAA", 0x80000000, bytes(15) + b"\x01")])),
    (2, "TLSA", msg("_25._tcp.mx.example.com", "TLSA", [rr("_25._tcp.mx.example.com", "TLSA", 300, bytes([3, 1, 1]) + bytes(range(32)))], flags=0x81A0)),
    (0, "TXT", msg("example.com", "TXT", [rr("example.com", "TXT", 300, b"\x0bv=spf1 -all\x03abc")])),
    (3, "PTR", msg("2.0.192.in-addr.arpa", "PTR", [rr("2.0.192.in-addr.arpa", "PTR", 300, name("host.example"))])),
    (0, "MX", msg("example.com", "MX", flags=0x8380)),
    (0, "MX", msg("example.com", "MX", rcode=2, question=False)),
    (0, "MX", msg("example.com", "MX", rcode=2)),
    (0, "MX", msg("example.com", "MX", flags=0x0100)),
]
for qidx, qtype, wire in dns:
    write("dns_answer", bytes([qidx | SEL_TYPE[qtype] << 2]) + wire)
# A compression pointer loop and a truncated message.
write("dns_answer", b"\x00" + struct.pack(">HHHHHH", 0x1234, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack(">HH", 15, 1))
write("dns_answer", b"\x00" + msg("example.com", "MX")[:20])

# --- config_load: text, then NUL-separated --set arguments -------------------
with open(os.path.join(HERE, "..", "sluice.toml"), "rb") as f:
    write("config_load", f.read())
configs = [
    b"",
    b"[server]\ncores = 2\n[server.listener.smtp]\nbind = [\"127.0.0.1:2525\"]\nmax_line_length = 100\n",
    b"[relay]\nlocal_domains = [\"a.test\"]\nrelay_networks = [\"10.0.0.0/8\", \"bad\"]\n",
    b"[spool]\nmap_size = \"1KiB\"\n",
    b"[dns]\nservers = [\"127.0.0.1:53\"]\ntimeout = \"0s\"\n",
    b"[route.smart]\nkind = \"relay\"\nfallback = \"smart\"\n",
    b"[queue.bulk]\nretry = []\n",
    b"[server.listener.sub]\nbind = [\"127.0.0.1:587\"]\ntls = \"starttls\"\n",
    b"key = \n[[rule]]\n",
    b"\x00server.cores=3\x00spool.path=/var/spool/x\x00relay.local_domains=[\"x.test\"]",
    b"[log]\nlevel = \"info\"\n\x00log.level=debug[\x00server=1",
    b"[source_ip.\"127.0.0.2\"]\n\x00dns.attempts=0",
]
for c in configs:
    write("config_load", c)

# --- relay_output: a stored body as it may sit in a spool --------------------
for body in dot_variants + bodies:
    write("relay_output", body)
