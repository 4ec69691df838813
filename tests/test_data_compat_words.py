"""The `compat: datatrove` mode of gopher_quality and c4 (spaCy-like words and sentences), and the fast
path that segments Chinese runs exactly as jieba does."""

from __future__ import annotations

import pytest

from lmforge.data.clean.steps import configure
from lmforge.data.clean.steps import text as T
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

# A line of Shakespeare-like text, and spaCy 3.8's blank English tokens for it (from spacy.blank("en")).
LINE = "Don't go, he's here. I'll o'er 'tis th' end--now well-known 1,000 3.5 e.g. this Mr. Smith... lord,-- cannot"
SPACY = ["Do", "n't", "go", ",", "he", "'s", "here", ".", "I", "'ll", "o'er", "'", "tis", "th", "'", "end", "--",
         "now", "well", "-", "known", "1,000", "3.5", "e.g.", "this", "Mr.", "Smith", "...", "lord,--", "can", "not"]  # fmt: skip


def test_datatrove_words_match_spacy_on_a_line():
    assert T.datatrove_words(LINE) == SPACY


def test_datatrove_sentences_count_as_spacys_sentencizer():
    assert T.datatrove_sentences("HAMLET. To be, or not to be: that is. Ham. Sir, I lack advancement.") == 4
    assert T.datatrove_sentences('He said "Go." Then?! left... (maybe) Mr. Smith came.') == 3
    assert T.datatrove_sentences("one sentence only") == 1


def test_alpha_rule_differs_between_modes():
    # Punctuation-heavy verse: whitespace words all hold a letter; spaCy-like tokens are 30% punctuation.
    text = "\n".join(["O, the king, the queen, and that one -- with a crown, to be; have of it!"] * 6)
    paper_step, paper = configure("gopher_quality", {})
    dt_step, dt = configure("gopher_quality", {"compat": "datatrove"})
    assert not isinstance(paper_step.apply(Document("d", text), paper), str)
    assert dt_step.apply(Document("d", text), dt) == "alpha_words_ratio"


def test_c4_compat_drops_ellipsis_lines_and_counts_sentences():
    step, cfg = configure("c4", {"compat": "datatrove", "min_words_per_line": 3, "min_sentences": 5})
    doc = Document("d", "One two three. Four five six.\nThis line trails off...\nSeven eight nine. Ten eleven twelve!")
    assert step.apply(doc, cfg) == "too_few_sentences"  # 4 sentences on the kept lines
    doc = Document(
        "d", "One two three. Four five six. Go on now.\nThis line trails off...\nSeven eight nine. Ten is it!"
    )
    out = step.apply(doc, cfg)
    assert not isinstance(out, str) and "trails" not in out.text


def test_unknown_compat_is_an_error():
    with pytest.raises(LmforgeError, match="compat"):
        configure("c4", {"compat": "spacy"})


def test_jieba_fast_path_equals_jieba():
    jieba = pytest.importorskip("jieba")
    runs = [
        "我们在北京天安门广场看升旗仪式",
        "这是一个测试",
        "的",
        "中华人民共和国成立了",
        "他来到了网易杭研大厦",
        "研究生命的起源",
    ]
    jb = T._jieba()
    assert [T._jieba_cut(jb, r) for r in runs] == [jieba.lcut(r, HMM=False) for r in runs]


def test_jieba_fast_path_equals_jieba_on_fragments():
    # Runs glued from dictionary words and their prefixes (entries jieba keeps with frequency 0), where the
    # fast path's one-lookup table must still take a character alone exactly when jieba does.
    import random

    jieba = pytest.importorskip("jieba")
    jb = T._jieba()
    rng = random.Random(0)
    vocab = sorted(w for w in T._jieba_logp(jb)[0] if 2 <= len(w) <= 5 and T._HAN.fullmatch(w))
    picks = rng.sample(vocab, 400)
    runs = ["".join(w[: rng.randint(1, len(w))] for w in rng.sample(picks, rng.randint(1, 6))) for _ in range(500)]
    assert [T._jieba_cut(jb, r) for r in runs] == [jieba.lcut(r, HMM=False) for r in runs]


def test_words_from_cached_tokens_equal_a_cold_split():
    text = "Debian 是一个自由的操作系统（OS），提供 apt-get 等工具。\n它的软件包，ひらがな と 한국어 也能 分词…… 10%"
    T.clear_caches()
    cold = T.words(text)
    assert T.words(text) == cold  # from the token cache
    assert [w for line in text.split("\n") for w in T.words(line)] == cold
    assert "是" in cold and "apt-get" in cold and "（OS），" in cold and "……" not in cold  # marks between runs: dropped
