"""Word and line helpers shared by the steps, with Chinese/Japanese/Korean handled.

Whitespace splitting finds no words in Chinese, so a text's CJK runs are segmented: with jieba
when it is installed (dictionary words), else one word per CJK character. `word_backend()` says
which is in use. Punctuation-only pieces of a CJK run are dropped, the way whitespace splitting of
English keeps punctuation attached to a word and never counts it alone.
"""

from __future__ import annotations

import functools
import itertools
import re

# CJK Unified Ideographs (+ ext. A, compatibility), Hiragana, Katakana, Hangul.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
CJK_RUN = re.compile(f"[{_CJK}]+")
CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_SPLIT = re.compile(f"([{_CJK}]+)")
_ALNUM = re.compile(r"[^\W_]")  # exactly the characters str.isalnum() is true for, searched in C


def is_cjk_text(text: str, min_share: float = 0.3) -> bool:
    """True when at least `min_share` of the non-space characters are CJK."""
    if min_share > 0 and not CJK_CHAR.search(text):
        return False
    chars = sum(map(len, text.split()))  # str.split() splits on exactly the characters str.isspace() is true for
    return chars > 0 and sum(map(len, CJK_RUN.findall(text))) / chars >= min_share  # runs: fewer items than chars


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


_HAN = re.compile("[\u4e00-\u9fd5]+")  # jieba's Chinese characters: a run of them is one block to its cut()


@functools.cache
def _jieba_logp(jb) -> tuple[dict, dict, float]:
    """jieba's dictionary (word and prefix -> frequency), each entry's log probability, and that of an unknown
    character, computed once: what `jb.lcut(run, HMM=False)` recomputes with `math.log` at every position."""
    import math

    jb.initialize()
    freq, logtotal = jb.dt.FREQ, math.log(jb.dt.total)
    return freq, {w: math.log(f or 1) - logtotal for w, f in freq.items()}, math.log(1) - logtotal


def _jieba_cut(jb, run: str) -> list[str]:
    """`jb.lcut(run, HMM=False)` for a run of Chinese characters, the same words (checked against jieba on every
    run of the benchmark corpus and in tests/test_data_compat_words.py), ~2.4x faster. jieba's algorithm: every
    dictionary word starting at each position is an edge, and the path of the highest summed log probability
    (ties: the longer word) is the segmentation; this walks the positions right to left once, looking each
    candidate's log probability up (one lookup in `_jieba_table`) rather than computing it. Words added to jieba
    after the first call are not seen (the table is built once)."""
    table, unknown = _jieba_table(jb)
    n = len(run)
    best = [0.0] * (n + 1)
    end = [0] * n
    get = table.get
    for k in range(n - 1, -1, -1):
        bp, bx, i = get(run[k], _ABSENT), k, k + 1
        if bp is _ABSENT:  # no dictionary word starts with this character: it is a word of its own
            bp = None
            i = n
        elif bp is not None:  # the character is a word
            bp += best[i]
        while i < n:
            lp = get(run[k : i + 1], _ABSENT)
            if lp is _ABSENT:  # not even a prefix of a dictionary word: no longer word starts at k
                break
            if lp is not None:
                p = lp + best[i + 1]
                if bp is None or p >= bp:  # i grows: on a tie the longer word wins, as in jieba's max()
                    bp, bx = p, i
            i += 1
        best[k] = bp if bp is not None else unknown + best[k + 1]  # no word: the character alone, as jieba
        end[k] = bx
    out, x = [], 0
    while x < n:
        out.append(run[x : end[x] + 1])
        x = end[x] + 1
    return out


_ABSENT = object()


@functools.cache
def _jieba_table(jb) -> tuple[dict, float]:
    """`_jieba_cut`'s one lookup per candidate: each dictionary word -> its log probability, each prefix that is
    no word -> None; and the log probability of an unknown character."""
    freq, logp, unknown = _jieba_logp(jb)
    return {w: (logp[w] if f else None) for w, f in freq.items()}, unknown


@functools.lru_cache(maxsize=1 << 16)
def _segment_cjk_cached(jb, run: str) -> tuple[str, ...]:
    # Cached because runs recur, within a document and across documents (short ones like "的" most of all; the
    # steps' repeated passes over one document's tokens are served by `_TokenWords`); keyed on the backend too, so
    # a test that hides jieba does not get jieba's cached answers. jieba (without its HMM for unknown words: ~2x
    # slower, and a Gopher/C4 count needs no new-word discovery) is the cost of Chinese text in these steps;
    # `_jieba_cut` gives its answer for pure Chinese runs ~2.4x faster.
    # Counting each character as a word (the issue allows it) would be faster again, but it changes the rules
    # for Chinese: on the benchmark's Chinese documents 8% of the keep/drop decisions changed (character
    # 5-grams repeat where word 5-grams do not; 50 characters is not 50 words), so words stay jieba's.
    if jb is not None and _HAN.fullmatch(run):
        return tuple(_jieba_cut(jb, run))  # Chinese characters only: no punctuation-only piece to drop
    pieces = run if jb is None else jb.lcut(run, HMM=False)
    return tuple(filter(_ALNUM.search, pieces))


def _segment_cjk(run: str) -> tuple[str, ...]:
    """The words of a CJK run, punctuation-only pieces dropped."""
    return _segment_cjk_cached(_jieba(), run)


def _token_words(jb, token: str) -> tuple[str, ...]:
    """The words of one whitespace-separated token: itself, or with CJK runs inside it, the runs segmented and
    the pieces between them kept if they hold a letter or digit."""
    if not CJK_CHAR.search(token):
        return (token,)
    parts = _CJK_SPLIT.split(token)  # [piece, run, piece, run, ..., piece]: the runs at the odd places
    alnum = _ALNUM.search
    out = [parts[0]] if alnum(parts[0]) else []
    for run, rest in zip(parts[1::2], parts[2::2]):
        out += _segment_cjk_cached(jb, run)
        if rest and alnum(rest):
            out.append(rest)
    return tuple(out)


class _TokenWords(dict):
    """token -> `_token_words(jb, token)`, filled on a miss: `words` maps a text's tokens through it in C, so
    the second and later passes over a document's tokens (gopher_quality after gopher_repetition, c4 line by
    line) cost a dict lookup each. Emptied when the tokens it holds reach `_MAX_TOKEN_CHARS` characters (a few
    tens of MB of words: the bound is on characters because one token can be a whole line of Chinese)."""

    def __init__(self, jb):
        super().__init__()
        self.jb = jb
        self.chars = 0

    def __missing__(self, token: str) -> tuple[str, ...]:
        if self.chars >= _MAX_TOKEN_CHARS:
            self.clear()
            self.chars = 0
        out = self[token] = _token_words(self.jb, token)
        self.chars += len(token)
        return out


_MAX_TOKEN_CHARS = 1 << 20


@functools.cache
def _token_words_cache(jb) -> _TokenWords:
    return _TokenWords(jb)  # one per backend, so a test that hides jieba does not get jieba's cached answers


def clear_caches() -> None:
    """Forget every segmented CJK run and token (benchmarks/clean_vs_datatrove.py times each pass from cold)."""
    _segment_cjk_cached.cache_clear()
    _token_words_cache.cache_clear()


def words(text: str) -> list[str]:
    """The words of `text`: whitespace-separated tokens, with CJK runs inside them segmented."""
    if not CJK_CHAR.search(text):
        return text.split()
    return list(itertools.chain.from_iterable(map(_token_words_cache(_jieba()).__getitem__, text.split())))


# --- datatrove-compatible words and sentences (the `compat: datatrove` option of gopher_quality and c4) ---

# datatrove (HF's pipeline) counts Gopher's words with spaCy's blank tokenizer, where punctuation marks are words
# of their own, and C4's sentences with spaCy's sentencizer. `datatrove_words` follows the spaCy English
# tokenizer's algorithm on each whitespace-separated chunk, with its rules cut down to the ones that move those
# counts (agreement with spaCy measured in benchmarks/clean_vs_datatrove.py): exceptions (a letter and a
# period, "Mr.", "e.g.", "cannot", "don't"), then prefixes split off the front and suffixes off the end, one at
# a time, then infixes (a hyphen or dash between letters, a comma between letters, "..."). A chunk ending in a
# mark that is no suffix ("lord,--") keeps its inner marks, as in spaCy. Plain words (most chunks) take a fast
# path. Not reproduced: the rest of spaCy's exception list, URLs' and emoticons' special cases, units.
_MARKS = "§%=—–+,:;!?¿¡()\\[\\]{}<>_#*&'\"”“`‘´’‚„»«「」『』（）【】《》$£€¥"
_PREFIX = re.compile(rf"\.\.+|…|[{_MARKS}]")
_SUFFIX = re.compile(
    rf"(?:\.\.+|…|['’][sS]|[{_MARKS}]|(?<=[a-z0-9)\]}}\"'%’”])\.|(?<=[A-Z][A-Z])\.|(?<=[0-9])[+$£€¥])$"
)
_INFIX = re.compile(
    r"\.\.+|…|(?<=[^\W\d_])(?:-+|[–—~])(?=[^\W\d_])|(?<=[0-9])[-+*^](?=[0-9-])|(?<=[^\W\d_]),(?=[^\W\d_])"
    r"|(?<=[^\W_])[:<>=/](?=[^\W\d_])|(?<=[a-z])\.(?=[A-Z])"
)
_EXCEPTION = re.compile(
    r"[A-Za-z]\.|(?:[^\W\d_]\.){2,}|(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|Inc|Ltd|Co|Jan|Feb|Aug|Sept|Oct|Nov|Dec)\.",
)
_CONTRACTION = re.compile(r"(?i)(\w+?)(n['’]t)|(i|you|he|she|it|we|they|that|there|who|what)(['’](?:ll|re|ve|m|d))")
_URL = re.compile(r"(?:https?://|www\.)\S+")


def _special(chunk: str) -> list[str] | None:
    """spaCy's tokenizer exceptions that matter here: the chunk's tokens, or None if it is no exception."""
    if _EXCEPTION.fullmatch(chunk) or _URL.fullmatch(chunk):
        return [chunk]
    if chunk.lower() == "cannot":
        return [chunk[:3], chunk[3:]]
    m = _CONTRACTION.fullmatch(chunk)
    if m:
        return [g for g in m.groups() if g]
    return None


def _spacy_chunk(chunk: str) -> list[str]:
    special = _special(chunk)
    if special is not None:
        return special
    front: list[str] = []
    back: list[str] = []
    while chunk:
        m = _PREFIX.match(chunk)
        if m and m.end() < len(chunk) or m and len(chunk) == 1:
            front.append(m.group())
            chunk = chunk[m.end() :]
            if (special := _special(chunk)) is not None:
                return front + special + back[::-1]
            continue
        m = _SUFFIX.search(chunk)
        if m and m.start() > 0:
            back.append(m.group())
            chunk = chunk[: m.start()]
            if (special := _special(chunk)) is not None:
                return front + special + back[::-1]
            continue
        break
    if chunk:
        pos = 0
        for m in _INFIX.finditer(chunk):
            if m.start() > pos:
                front.append(chunk[pos : m.start()])
            front.append(m.group())
            pos = m.end()
        if pos < len(chunk):
            front.append(chunk[pos:])
    return front + back[::-1]


def datatrove_words(text: str) -> list[str]:
    """`text`'s words as datatrove's `split_into_words` finds them (spaCy tokens; see above): punctuation marks
    are words. CJK runs are segmented as in `words` (datatrove's spaCy+jieba segments with jieba too)."""
    out: list[str] = []
    for chunk in text.split():
        if chunk.isalpha() and not CJK_CHAR.search(chunk) and chunk.lower() != "cannot":
            out.append(chunk)
        elif not CJK_CHAR.search(chunk):
            out += _spacy_chunk(chunk)
        else:
            pos = 0
            for m in CJK_RUN.finditer(chunk):
                if m.start() > pos:
                    out += _spacy_chunk(chunk[pos : m.start()])
                out.extend(_segment_cjk(m.group()))
                pos = m.end()
            if pos < len(chunk):
                out += _spacy_chunk(chunk[pos:])
    return out


_SENTENCE_MARKS = frozenset(".!?。！？")


def datatrove_sentences(line: str) -> int:
    """The number of sentences spaCy's sentencizer finds in `line` (as datatrove's C4 filter counts them): a new
    sentence starts at the first word after a token that is a sentence mark (. ! ? and their CJK forms)."""
    n, seen_mark = 1, False
    for tok in datatrove_words(line):
        if tok in _SENTENCE_MARKS:
            seen_mark = True
        elif seen_mark and any(c.isalnum() for c in tok):
            n, seen_mark = n + 1, False
    return n
