"""Word and line helpers shared by the steps, with Chinese/Japanese/Korean handled.

Whitespace splitting finds no words in Chinese, so a text's CJK runs are segmented: with jieba
when it is installed (dictionary words), else one word per CJK character. `word_backend()` says
which is in use. Punctuation-only pieces of a CJK run are dropped, the way whitespace splitting of
English keeps punctuation attached to a word and never counts it alone.
"""

from __future__ import annotations

import functools
import re

# CJK Unified Ideographs (+ ext. A, compatibility), Hiragana, Katakana, Hangul.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
CJK_RUN = re.compile(f"[{_CJK}]+")
CJK_CHAR = re.compile(f"[{_CJK}]")


def is_cjk_text(text: str, min_share: float = 0.3) -> bool:
    """True when at least `min_share` of the non-space characters are CJK."""
    if min_share > 0 and not CJK_CHAR.search(text):
        return False
    chars = sum(map(len, text.split()))  # str.split() splits on exactly the characters str.isspace() is true for
    return chars > 0 and len(CJK_CHAR.findall(text)) / chars >= min_share


@functools.cache
def _jieba():
    try:
        import logging

        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(logging.WARNING)  # it announces its dictionary load on stderr otherwise
    return jieba


def word_backend() -> str:
    return "jieba" if _jieba() is not None else "cjk-characters"


@functools.lru_cache(maxsize=1 << 16)
def _segment_cjk_cached(jb, run: str) -> tuple[str, ...]:
    # Cached because the steps segment the same runs again (gopher_repetition, gopher_quality, then c4 line by
    # line); keyed on the backend too, so a test that hides jieba does not get jieba's cached answers.
    pieces = jb.lcut(run, HMM=False) if jb is not None else run
    return tuple(w for w in pieces if any(c.isalnum() for c in w))


def _segment_cjk(run: str) -> tuple[str, ...]:
    """The words of a CJK run, punctuation-only pieces dropped."""
    return _segment_cjk_cached(_jieba(), run)


def words(text: str) -> list[str]:
    """The words of `text`: whitespace-separated tokens, with CJK runs inside them segmented."""
    if not CJK_CHAR.search(text):
        return text.split()
    out: list[str] = []
    for token in text.split():
        if not CJK_CHAR.search(token):
            out.append(token)
            continue
        pos = 0
        for m in CJK_RUN.finditer(token):
            rest = token[pos : m.start()]
            if any(c.isalnum() for c in rest):
                out.append(rest)
            out.extend(_segment_cjk(m.group()))
            pos = m.end()
        rest = token[pos:]
        if any(c.isalnum() for c in rest):
            out.append(rest)
    return out
