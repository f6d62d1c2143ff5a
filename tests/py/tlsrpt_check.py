"""Reads a TLS report (RFC 8460) and validates it against a JSON Schema
written from the RFC's description of the format (§4.3, §4.4), for
tests/tls_rpt.rs. Needs /usr/bin/python3 with python3-jsonschema.

usage: tlsrpt_check.py mail FILE   # a mail dump (smtp-sink): the report part
       tlsrpt_check.py gzip FILE   # a gzipped report (an HTTPS POST body)

Prints one JSON object: {"report": ..., "mail": {headers and parts} | null}.
Exits 1 with the validation error when the report does not validate.
"""
import email
import gzip
import json
import sys
from email import policy

import jsonschema

RESULT_TYPES = [
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
]
DATETIME = {"type": "string", "format": "date-time",
            "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"}
COUNT = {"type": "integer", "minimum": 0}
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object",
            "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": DATETIME, "end-datetime": DATETIME},
        },
        "contact-info": {"type": "string", "minLength": 1},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["policy", "summary"],
                "properties": {
                    "policy": {
                        "type": "object",
                        "required": ["policy-type", "policy-domain"],
                        "properties": {
                            "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                            "policy-string": {"type": "array", "items": {"type": "string"}},
                            "policy-domain": {"type": "string", "minLength": 1},
                            "mx-host": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "summary": {
                        "type": "object",
                        "required": ["total-successful-session-count",
                                     "total-failure-session-count"],
                        "properties": {
                            "total-successful-session-count": COUNT,
                            "total-failure-session-count": COUNT,
                        },
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["result-type", "failed-session-count"],
                            "properties": {
                                "result-type": {"enum": RESULT_TYPES},
                                "sending-mta-ip": {"type": "string"},
                                "receiving-mx-hostname": {"type": "string"},
                                "receiving-mx-helo": {"type": "string"},
                                "receiving-ip": {"type": "string"},
                                "failed-session-count": COUNT,
                                "additional-information": {"type": "string"},
                                "failure-reason-code": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}

kind, path = sys.argv[1], sys.argv[2]
raw = open(path, "rb").read()
mail = None
if kind == "mail":
    # smtp-sink puts its own X- headers and a Received: first; the message follows.
    m = email.message_from_bytes(raw, policy=policy.default)
    report = None
    parts = []
    for part in m.walk():
        parts.append(part.get_content_type())
        if part.get_content_type() == "application/tlsrpt+gzip":
            report = part.get_payload(decode=True)
            filename = part.get_filename()
    mail = {
        "subject": str(m["Subject"]),
        "from": str(m["From"]),
        "tls_report_domain": str(m["TLS-Report-Domain"]),
        "tls_report_submitter": str(m["TLS-Report-Submitter"]),
        "content_type": m.get_content_type(),
        "report_type": m.get_param("report-type"),
        "parts": parts,
        "filename": filename if report is not None else None,
        "dkim_signature": m["DKIM-Signature"] is not None,
    }
    if report is None:
        print("no application/tlsrpt+gzip part", file=sys.stderr)
        sys.exit(1)
    raw = report
doc = json.loads(gzip.decompress(raw))
try:
    jsonschema.validate(doc, SCHEMA, format_checker=jsonschema.FormatChecker())
except jsonschema.ValidationError as e:
    print("report does not validate: %s" % e.message, file=sys.stderr)
    sys.exit(1)
print(json.dumps({"report": doc, "mail": mail}))
