"""The terms BM25 ranks by: lowercased words, English stopwords out, Chinese cut into words by jieba.

    from lmforge.rag.terms import terms
    terms("How does the WITH statement work?")   # ['how', 'does', 'with', 'statement', 'work']
    terms("上下文管理器怎么用")                    # jieba's search-mode words, e.g. ['上下', '上下文', '管理', '管理器', ...]

Words are runs of letters, digits and `_` (so `__exit__` and `os_path` stay whole), then split
at `_` as well when that yields more (both forms kept: "__exit__" and "exit"), since users ask
about "exit" when the docs say "__exit__()". Chinese has no spaces: a run of CJK characters is cut
by jieba in search mode (words and their sub-words), the common practice for Chinese BM25;
without jieba, by overlapping character bigrams. No stemming: BM25 over unstemmed words is the
baseline the retrieval figures in BENCHMARKS.md report.
"""

from __future__ import annotations

import functools
import re

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
# Lucene's (and bm25s's) English stopwords, less "with": a Python keyword people search for.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
    ]
)


@functools.cache
def _jieba():
    try:
        import jieba
    except ImportError:
        return None
    jieba.setLogLevel(60)  # no "Building prefix dict" chatter
    return jieba


def _chinese(run: str) -> list[str]:
    jieba = _jieba()
    if jieba is None:
        return [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
    return [w for w in jieba.lcut_for_search(run, HMM=False) if w.strip()]


def terms(text: str) -> list[str]:
    """BM25 terms of `text`, in order (repeats kept: term frequency counts)."""
    text = text.lower()
    out: list[str] = []
    pos = 0
    for m in _CJK_RUN.finditer(text):
        out.extend(_words(text[pos : m.start()]))
        out.extend(_chinese(m.group()))
        pos = m.end()
    out.extend(_words(text[pos:]))
    return out


def _words(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text):
        if w in STOPWORDS:
            continue
        parts = [p for p in w.split("_") if p]
        out.append(w)
        if len(parts) > 1 or (parts and parts[0] != w):
            out.extend(p for p in parts if p not in STOPWORDS)
    return out
