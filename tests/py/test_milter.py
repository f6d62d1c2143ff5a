#!/usr/bin/python3
"""A test milter on pymilter (Debian python3-milter) for tests/milter.rs.

Usage: test_milter.py SOCKET   (e.g. inet:12345@127.0.0.1 or unix:/tmp/x.sock)

Envelope: MAIL FROM reject@... gets 550 5.7.1; RCPT TO tempfail@... gets
451 4.7.1; RCPT TO refused@... gets 550 5.1.1; RCPT TO discard@... discards
the message. Each ABORT is counted (X-Macros shows aborts=N). At end of message it adds,
inserts, changes and deletes header fields, adds and removes recipients,
changes the sender and replaces the body; a Subject containing "quarantine"
quarantines. X-Macros echoes macros it saw; X-Body-Len the body length it got.
Headers are declared no-reply (SMFIP_NR_HDR) to exercise that flag.
"""
import sys

import Milter


class TestMilter(Milter.Base):
    def __init__(self):
        self.macros = {}
        self.subject = ""
        self.body_len = 0
        self.headers = 0
        self.aborts = 0

    def _keep(self, *names):
        for n in names:
            v = self.getsymval(n)
            if v is not None:
                self.macros[n] = v

    def connect(self, hostname, family, hostaddr):
        self._keep("j", "{daemon_name}", "_", "{if_addr}")
        self.macros["client"] = "%s:%s" % (hostaddr[0], hostaddr[1]) if hostaddr else "-"
        return Milter.CONTINUE

    def hello(self, heloname):
        self.macros["helo"] = heloname
        self._keep("{tls_version}")
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.body_len = 0
        self.headers = 0
        self._keep("i", "{auth_authen}", "{auth_type}", "{mail_addr}")
        if mailfrom.lower().startswith("<reject@"):
            self.setreply("550", "5.7.1", "Sender refused by test milter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        self._keep("{rcpt_addr}")
        if to.lower().startswith("<tempfail@"):
            self.setreply("451", "4.7.1", "Recipient deferred by test milter")
            return Milter.TEMPFAIL
        if to.lower().startswith("<refused@"):
            self.setreply("550", "5.1.1", "Recipient refused by test milter")
            return Milter.REJECT
        if to.lower().startswith("<discard@"):
            return Milter.DISCARD
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.headers += 1
        if name.lower() == "subject":
            self.subject = value
        return Milter.CONTINUE

    def body(self, chunk):
        self.body_len += len(chunk)
        return Milter.CONTINUE

    def abort(self):
        self.aborts += 1
        return Milter.CONTINUE

    def eom(self):
        self._keep("i")
        if self.aborts:
            self.macros["aborts"] = str(self.aborts)
        seen = " ".join("%s=%s" % (k, v) for k, v in sorted(self.macros.items()))
        self.addheader("X-Macros", seen)
        self.addheader("X-Body-Len", "%d headers=%d" % (self.body_len, self.headers))
        self.addheader("X-First", "inserted", 0)
        self.chgheader("Subject", 1, "[milter] " + self.subject)
        self.chgheader("X-Remove-Me", 1, "")
        self.addrcpt("<added@example.com>")
        self.delrcpt("<removed@example.com>")
        self.chgfrom("<changed@example.org>")
        self.replacebody(b"replaced body\r\n")
        self.replacebody(b"second chunk\r\n")
        if "quarantine" in self.subject:
            self.quarantine("test milter quarantine")
        return Milter.ACCEPT


def main():
    socket = sys.argv[1]
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT
                     | Milter.CHGFROM | Milter.CHGBODY | Milter.QUARANTINE)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    Milter.runmilter("sluice-test", socket, 30)


if __name__ == "__main__":
    main()
