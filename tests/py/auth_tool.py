#!/usr/bin/env python3
"""The reference implementations tests/auth_verify.rs compares sluice with,
asking the test's own DNS server (NSD on a loopback port), never the machine's.

  auth_tool.py spf DNS_PORT IP SENDER HELO
      pyspf's check_host result for SENDER (or HELO when SENDER is empty).
  auth_tool.py dkimsign FILE SELECTOR DOMAIN KEYFILE ALG
      FILE with a dkimpy DKIM-Signature on top (ALG rsa-sha256|ed25519-sha256).
  auth_tool.py arcsign FILE SELECTOR DOMAIN KEYFILE SRV_ID
      FILE with a dkimpy ARC set on top (FILE needs an A-R header by SRV_ID).
  auth_tool.py arcverify DNS_PORT FILE
      dkimpy's ARC chain validation: "pass", "fail" or "none", then the reason.
"""
import sys

import dns.message
import dns.query
import dns.rdatatype
import dns.resolver


def use_port(port):
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.lifetime = 5
    dns.resolver.default_resolver = r


def txt_func(port):
    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=port)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                for rdata in rrset:
                    return b"".join(rdata.strings)
        return None

    return dnsfunc


def main():
    cmd = sys.argv[1]
    if cmd == "spf":
        import spf

        use_port(int(sys.argv[2]))
        ip, sender, helo = sys.argv[3], sys.argv[4], sys.argv[5]
        result, _explanation = spf.check2(i=ip, s=sender, h=helo)
        print(result)
    elif cmd == "dkimsign":
        import dkim

        path, selector, domain, keyfile, alg = sys.argv[2:7]
        message = open(path, "rb").read()
        key = open(keyfile, "rb").read()
        sig = dkim.sign(
            message,
            selector.encode(),
            domain.encode(),
            key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=alg.encode(),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        sys.stdout.buffer.write(sig + message)
    elif cmd == "arcsign":
        import dkim

        path, selector, domain, keyfile, srv_id = sys.argv[2:7]
        message = open(path, "rb").read()
        key = open(keyfile, "rb").read()
        headers = dkim.arc_sign(
            message,
            selector.encode(),
            domain.encode(),
            key,
            srv_id.encode(),
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        )
        sys.stdout.buffer.write(b"".join(headers) + message)
    elif cmd == "arcverify":
        import dkim

        port, path = int(sys.argv[2]), sys.argv[3]
        message = open(path, "rb").read()
        cv, results, reason = dkim.arc_verify(message, dnsfunc=txt_func(port))
        print(cv.decode() if isinstance(cv, bytes) else cv)
        print(reason)
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
