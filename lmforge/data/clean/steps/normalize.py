"""`normalize`: repair mojibake (ftfy, when installed; its width/quote/ligature changes are off), Unicode
NFC, drop ANSI escapes and control characters, collapse runs of spaces and blank lines. Never rejects."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from lmforge.data.readers import Document

ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines
BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    ftfy: bool = True  # fix mojibake with ftfy.fix_text when the package is installed
    form: str = "NFC"  # Unicode normalization form
    collapse_whitespace: bool = True  # runs of spaces/tabs -> one space, 3+ newlines -> 2, lines stripped


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return text
    # Encoding repair only: ftfy's defaults also turn full-width Chinese punctuation (，！) into ASCII and
    # uncurl quotes, which changes correct text. Unicode normalization is ours, next, with the configured form.
    cfg = ftfy.TextFixerConfig(
        fix_character_width=False, uncurl_quotes=False, fix_latin_ligatures=False, normalization=None, explain=False
    )
    return ftfy.fix_text(text, cfg)


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    if cfg.ftfy:
        text = _fix_text(text)
    text = unicodedata.normalize(cfg.form, text)
    text = ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    if cfg.collapse_whitespace:
        text = "\n".join(SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = BLANK_LINES.sub("\n\n", text).strip()
    return text


def normalize(doc: Document, cfg: NormalizeConfig) -> Document:
    doc.text = normalize_text(doc.text, cfg)
    return doc
