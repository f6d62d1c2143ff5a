#!/usr/bin/env python3
"""Checks every DKIM-Signature of messages with dkimpy (python3-dkim), taking the
keys from the test's own DNS server instead of the machine's resolver.

Usage: dkim_verify.py DNS_PORT FILE...
Prints one JSON line per file: a list with one entry per signature, top down,
{"d": ..., "s": ..., "a": ..., "pass": true|false, "error": "..."}.
       dkim_verify.py DNS_PORT --txt NAME
Prints the TXT record at NAME as dkimpy reads it (strings joined).
"""
import json
import sys

import dkim
import dns.message
import dns.query
import dns.rdatatype


def dnsfunc_for(port):
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


def tags(value):
    out = {}
    for part in value.decode("ascii", "replace").split(";"):
        key, sep, val = part.partition("=")
        if sep:
            out[key.strip()] = "".join(val.split())
    return out


def main():
    dnsfunc = dnsfunc_for(int(sys.argv[1]))
    if sys.argv[2] == "--txt":
        record = dnsfunc(sys.argv[3])
        print(record.decode("ascii") if record is not None else "")
        return
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            message = f.read()
        checker = dkim.DKIM(message)
        signatures = [v for (k, v) in checker.headers if k.lower() == b"dkim-signature"]
        results = []
        for idx, value in enumerate(signatures):
            t = tags(value)
            entry = {"d": t.get("d"), "s": t.get("s"), "a": t.get("a"), "error": ""}
            try:
                entry["pass"] = bool(checker.verify(idx=idx, dnsfunc=dnsfunc))
            except dkim.DKIMException as e:
                entry["pass"] = False
                entry["error"] = str(e)
            results.append(entry)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
