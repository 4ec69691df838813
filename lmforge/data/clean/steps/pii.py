"""`pii`: replace email addresses, IPv4 addresses and phone numbers with `<EMAIL>`, `<IP>`, `<PHONE>`;
the counts replaced go to `metadata["pii"]`. Never rejects. Regular expressions, so they miss some
and can hit number strings shaped like phone numbers; IPs are replaced before phones so a dotted
address is never read as a phone number."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.data.readers import Document

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}"  # international: +44 20 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]?\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|1[3-9]\d{9}"  # mainland China mobile: 13812345678
    r")(?!\w)"
)


@dataclass
class PiiConfig:
    email: str = "<EMAIL>"  # placeholder for email addresses ("" leaves them)
    ip: str = "<IP>"
    phone: str = "<PHONE>"


def redact(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    counts = {}
    for name, pattern, placeholder in (("ip", IPV4, cfg.ip), ("email", EMAIL, cfg.email), ("phone", PHONE, cfg.phone)):
        if placeholder:
            text, n = pattern.subn(placeholder, text)
            if n:
                counts[name] = n
    return text, counts


def pii(doc: Document, cfg: PiiConfig) -> Document:
    doc.text, counts = redact(doc.text, cfg)
    if counts:
        doc.metadata["pii"] = counts
    return doc
