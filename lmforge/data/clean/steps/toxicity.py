"""`toxicity`: reject documents dense in listed toxic or sexually explicit terms (a word-list filter).

    steps: [{name: toxicity}, ...]   or   {name: toxicity, default_lists: [en], words_file: ldnoobw/en, max_matches: 5}

The terms are the packaged lists named in `default_lists` (`lmforge/data/clean/wordlists/<code>.txt`: `en`,
`zh`, a few dozen clinical entries each), plus `words` and the lines of `words_file` (one term per line;
blank lines and `#` comments skipped), e.g. the LDNOOBW lists ("List of Dirty, Naughty, Obscene, and
Otherwise Bad Words"). A term with Chinese/Japanese/Korean characters matches as a substring (no spaces
mark word edges); any other term matches as a whole word or phrase, case-insensitively, so `porn` does
not match `pornography` and each inflection to catch must be listed. Matches do not overlap; the longest
term wins. The step rejects with "toxic_words" when more than `max_matches` terms occur, and with
"toxic_word_ratio" when they are more than `max_ratio` of the words (`text.words`); null turns a rule off.
What it found goes to `metadata["toxicity"]` (`matches`, `ratio`, up to 5 of the `terms`).

Limits, honestly: a word list sees words, not meaning. It rejects health, sex-education, legal and news
text that names what it reports (C4's single-bad-word rule removed such pages and much text in African
American English and about LGBTQ+ people: Dodge et al. 2021, "Documenting Large Webtext Corpora"), keeps
toxic text written in words not on the list (misspellings, euphemisms, insults made of ordinary words),
and substring matching in Chinese can hit across word edges (why 口交, inside 出口交易, is not listed).
The counting thresholds soften the first problem; a trained classifier is the better tool for the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.clean.steps.text import _CJK, CJK_CHAR, words
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

WORDLISTS = Path(__file__).resolve().parent.parent / "wordlists"
_EDGE = f"[^\\W_{_CJK}]"  # a letter or digit other than CJK: what a whole-word match may not touch


@dataclass
class ToxicityConfig:
    default_lists: list[str] = field(default_factory=lambda: ["en", "zh"])  # packaged lists; [] for none
    words: list[str] = field(default_factory=list)  # more terms
    words_file: str = ""  # more terms, one per line (e.g. an LDNOOBW list)
    max_matches: int | None = 2  # reject when more terms than this occur (null: no count rule)
    max_ratio: float | None = 0.02  # reject when terms per word exceed this (null: no ratio rule)

    def __post_init__(self):
        # Read and compiled once, when the step is configured (a bad list fails before any output is written).
        for name in ("default_lists", "words"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise LmforgeError(f"step 'toxicity': {name} must be a list of strings, got {value!r}")
        terms = list(self.words)
        for code in self.default_lists:
            path = WORDLISTS / f"{code}.txt"
            if not path.is_file():
                known = ", ".join(sorted(p.stem for p in WORDLISTS.glob("*.txt")))
                raise LmforgeError(f"step 'toxicity': no packaged word list {code!r} (known: {known})")
            terms += _read_terms(path)
        if self.words_file:
            terms += _read_terms(Path(self.words_file))
        self._pattern = _compile(terms)


def _read_terms(path: Path) -> list[str]:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such words file (step 'toxicity', option words_file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LmforgeError(f"{path}: words file is not UTF-8 text") from None
    return [t for line in lines if (t := line.strip()) and not t.startswith("#")]


def _compile(terms: list[str]) -> re.Pattern | None:
    """One pattern for all terms: CJK ones as substrings, the others as whole words; longest first."""
    terms = sorted(dict.fromkeys(t.lower() for t in terms), key=lambda t: (-len(t), t))
    cjk = [re.escape(t) for t in terms if CJK_CHAR.search(t)]
    whole = [r"\s+".join(map(re.escape, t.split())) for t in terms if not CJK_CHAR.search(t)]
    alts = [f"(?<!{_EDGE})(?:{'|'.join(whole)})(?!{_EDGE})"] if whole else []
    alts += [f"(?:{'|'.join(cjk)})"] if cjk else []
    return re.compile("|".join(alts), re.IGNORECASE) if alts else None


def toxicity(doc: Document, cfg: ToxicityConfig) -> Document | str:
    found = [m.group().lower() for m in cfg._pattern.finditer(doc.text)] if cfg._pattern else []
    if not found:
        return doc
    ratio = len(found) / max(len(words(doc.text)), 1)
    doc.metadata["toxicity"] = {
        "matches": len(found),
        "ratio": round(ratio, 4),
        "terms": list(dict.fromkeys(found))[:5],
    }
    if cfg.max_matches is not None and len(found) > cfg.max_matches:
        return "toxic_words"
    if cfg.max_ratio is not None and ratio > cfg.max_ratio:
        return "toxic_word_ratio"
    return doc
