"""`url_filter`: reject documents whose source URL (`metadata[url_field]`, default "url") is on a block list.

    steps: [{name: url_filter, domains_file: ut1/adult/domains, allowed_domains: [example.edu]}, ...]

Rules, in order (the idea of datatrove's `URLFilter`, made smaller):
  1. `allowed_domains`: a URL on an allowed domain (or a subdomain of one) passes, whatever follows.
  2. `blocked_domains` + the lines of `domains_file` -> "blocked_domain": the host is a listed domain or a
     subdomain of one (`example.com` blocks `www.example.com` and `a.b.example.com`, not `myexample.com`).
  3. `blocked_words` -> "blocked_word": a whole token of the URL, split at non-alphanumerics after
     percent-decoding and lower-casing (`porn` blocks `/free-porn/`, not `/pornography-law/`).
  4. `blocked_subwords` -> "blocked_subword": a substring of the URL with its non-alphanumerics removed,
     for words glued into a name (`freeporn` blocks `freepornvideos.net`, `pornhub` a mirror's domain; a
     short one like `porn` would also block `/pornography-law/` and Polish `sporne`: keep them specific).
The match that rejected a document goes to `metadata["url_filter"]`. A document without a URL passes.

The defaults are a handful of obvious adult domains and adult/spam words, enough to show the step working. A real
deployment passes its own lists, e.g. the UT1 blocklist (Université Toulouse Capitole; FineWeb and
RefinedWeb use its `adult` category): `domains_file: blacklists/adult/domains` (one domain per line;
blank lines and `#` comments skipped). The file is read once per process.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

NON_ALNUM = re.compile(r"[\W_]+")  # Unicode-aware: a percent-decoded Chinese path stays one token per run


@dataclass
class UrlFilterConfig:
    url_field: str = "url"  # the metadata key holding the URL
    blocked_domains: list[str] = field(
        default_factory=lambda: ["pornhub.com", "xvideos.com", "xnxx.com", "xhamster.com", "redtube.com",
                                 "youporn.com", "spankbang.com", "chaturbate.com"]
    )  # fmt: skip
    domains_file: str = ""  # more blocked domains, one per line (e.g. UT1's adult/domains)
    blocked_words: list[str] = field(
        default_factory=lambda: ["porn", "porno", "xxx", "hentai", "nsfw", "milf", "viagra", "cialis"]
    )
    blocked_subwords: list[str] = field(
        default_factory=lambda: ["pornhub", "xvideos", "xhamster", "xnxx", "freeporn", "hentai"]
    )
    allowed_domains: list[str] = field(default_factory=list)  # never blocked (overrides every rule)

    def __post_init__(self):
        # Checked and built once, when the step is configured (a bad file fails before any output is written).
        for name in ("blocked_domains", "blocked_words", "blocked_subwords", "allowed_domains"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LmforgeError(f"step 'url_filter': {name} must be a list of strings, got {value!r}")
        domains = {_domain(d) for d in self.blocked_domains}
        if self.domains_file:
            domains |= _read_domains(self.domains_file)
        self._blocked = frozenset(domains - {""})
        self._allowed = frozenset({_domain(d) for d in self.allowed_domains} - {""})
        self._words = frozenset(w.lower() for w in self.blocked_words if w)
        self._subwords = tuple(
            s for s in dict.fromkeys(NON_ALNUM.sub("", w.lower()) for w in self.blocked_subwords) if s
        )


def _domain(entry: str) -> str:
    """`*.Example.COM.` -> `example.com` (list entries may carry a wildcard or a trailing dot)."""
    return entry.strip().lower().removeprefix("*.").strip(".")


def _read_domains(path: str) -> frozenset[str]:
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{path}: no such domains file (step 'url_filter', option domains_file)")
    st = p.stat()
    return _read_domains_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.cache
def _read_domains_cached(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    # Keyed on mtime and size too, so an edited file is read again; lists like UT1's run to millions of lines.
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return frozenset(d for line in f if (d := _domain(line.split("#", 1)[0])))
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read domains file ({e.strerror})") from None


def host(url: str) -> str:
    """The lower-case host name of `url` ("" when there is none); a URL without a scheme is read as `//url`."""
    try:
        return (urlsplit(url if "//" in url else "//" + url).hostname or "").strip(".")
    except ValueError:  # e.g. an unbalanced [ in an IPv6 literal
        return ""


def _on(hostname: str, domains: frozenset[str]) -> str | None:
    """The entry of `domains` that `hostname` is, or is a subdomain of."""
    parts = hostname.split(".")
    return next((d for i in range(len(parts)) if (d := ".".join(parts[i:])) in domains), None)


def url_filter(doc: Document, cfg: UrlFilterConfig) -> Document | str:
    url = doc.metadata.get(cfg.url_field)
    if not isinstance(url, str) or not url.strip():
        return doc
    hostname = host(url.strip())
    if hostname and _on(hostname, cfg._allowed):
        return doc
    if hostname and (d := _on(hostname, cfg._blocked)):
        doc.metadata["url_filter"] = {"domain": d}
        return "blocked_domain"
    text = unquote(url).lower()
    if w := next((t for t in NON_ALNUM.split(text) if t in cfg._words), None):
        doc.metadata["url_filter"] = {"word": w}
        return "blocked_word"
    squashed = NON_ALNUM.sub("", text)
    if s := next((s for s in cfg._subwords if s in squashed), None):
        doc.metadata["url_filter"] = {"subword": s}
        return "blocked_subword"
    return doc
