"""Each `lmforge data clean` step on hand-made English and Chinese documents."""

from __future__ import annotations

import pytest

from lmforge.data.clean.steps import STEPS, configure
from lmforge.data.clean.steps.text import is_cjk_text, words
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

EN = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers who had lived in the valley for decades said that they had never seen anything like it. "
    "Some of them moved their animals to the hills with the help of neighbours, while others stayed "
    "behind to protect their houses and to wait for the water to fall again. By the end of the week "
    "the river had returned to its usual course, leaving mud and broken fences across the valley."
)
ZH = (
    "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。"
    "有些人在邻居的帮助下把牲畜赶到了山上，另一些人留在家里看守房子，等待河水退去。到了周末，河水终于回到了原来的河道，"
    "但是山谷里到处都是淤泥和倒下的篱笆。村里的老人说，这是他们记忆中最大的一次洪水，也是大家最需要互相帮助的时候。"
)


def run(name: str, text: str, **options):
    step, cfg = configure(name, options)
    return step.apply(Document(id="d", text=text), cfg)


def test_registry_and_unknown_options():
    assert {"normalize", "language", "gopher_quality", "gopher_repetition", "c4", "pii"} <= set(STEPS)
    with pytest.raises(LmforgeError, match="unknown option.*min_wordz"):
        configure("gopher_quality", {"min_wordz": 3})
    with pytest.raises(LmforgeError, match="unknown cleaning step 'nope'"):
        configure("nope")


def test_chinese_words_are_counted_without_spaces():
    assert is_cjk_text(ZH) and not is_cjk_text(EN)
    assert len(ZH.split()) == 1 and len(words(ZH)) > 50
    ws = words("他说 hello, world 你好。")
    assert ws[:4] == ["他", "说", "hello,", "world"] and "".join(ws[4:]) == "你好"  # 。 alone is no word


def test_normalize():
    doc = run("normalize", "\x1b[31mRed\x1b[0m  text\t\there\x07\r\n\n\n\nCafe\u0301 Ã©")
    assert doc.text == "Red text here\n\nCafé é"
    zh = "他说：“你好，世界！”（测试）l’été"
    assert run("normalize", zh).text == zh  # correct text is left alone


def test_language_records_and_filters():
    doc = run("language", EN, languages=["en", "zh"])
    assert doc.metadata["language"] == "en" and doc.metadata["language_score"] > 0.9
    doc = run("language", ZH, languages=["en", "zh"])
    assert doc.metadata["language"] == "zh"
    assert run("language", ZH, languages=["en"]) == "language_not_kept"


def test_gopher_quality_keeps_prose_in_both_languages():
    assert isinstance(run("gopher_quality", EN), Document)
    assert isinstance(run("gopher_quality", ZH), Document)  # no spaces, still > 50 words


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Click here to subscribe now.", "too_few_words"),
        (" ".join(["#tag #news #sale ### more"] * 20), "symbol_word_ratio"),
        ("\n".join(f"- item number {i} in the list of the best and the good" for i in range(30)), "bullet_lines"),
        (" ".join(["1234 5678 9012 +++ 3456"] * 20) + " the and of", "alpha_words_ratio"),
        (" ".join(["lorem ipsum dolor sit amet consectetur adipiscing elit sed"] * 8), "too_few_stop_words"),
        ("x " * 80, "mean_word_length"),
        ("分享 点赞 收藏 " * 5, "too_few_words"),
    ],
)
def test_gopher_quality_rejects_junk(text, reason):
    assert run("gopher_quality", text) == reason


def test_gopher_repetition():
    assert isinstance(run("gopher_repetition", EN), Document)
    assert isinstance(run("gopher_repetition", ZH), Document)
    assert run("gopher_repetition", "\n".join(["Buy cheap shoes today!"] * 10 + [EN])).startswith("duplicate_line")
    assert run("gopher_repetition", "best price " * 60 + EN) == "top_2gram"
    assert run("gopher_repetition", ZH + ZH[:120] * 2).startswith("duplicate_")


def test_gopher_ngram_measures_match_a_direct_count():
    # The step counts n-grams level by level from the repeated positions only; check it against the rules
    # counted directly over every n-gram, on text with repeats of many lengths.
    import itertools
    import random
    from collections import Counter

    from lmforge.data.clean.steps.gopher import _dup_ngram_chars, _ngram_levels, _top_ngram_chars

    rng = random.Random(0)
    for _ in range(40):
        vocab = ["a", "b", "c", "dd", "the", "of", "的", "我们"][: rng.randint(1, 8)]  # few words: many repeats
        ws = [rng.choice(vocab) for _ in range(rng.randint(0, 80))]
        lens = [0, *itertools.accumulate(map(len, ws))]
        levels = {n: rest for n, *rest in _ngram_levels(ws, 2)}
        for n in range(2, 11):
            grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
            gram, count = Counter(grams).most_common(1)[0] if grams else ((), 0)
            top = count * sum(map(len, gram)) if count > 1 else 0
            later = {i for i, g in enumerate(grams) if g in grams[:i]}  # starts of n-grams seen earlier
            dup = sum(len(ws[j]) for j in {j for i in later for j in range(i, i + n)})
            got = (0, 0)  # no level n: no n-gram repeats (or fits)
            if n in levels:
                got = (_top_ngram_chars(levels[n][0], levels[n][2]), _dup_ngram_chars(*levels[n][:2], n, lens))
            assert got == (top, dup)


def test_c4_drops_lines_and_rejects_pages():
    page = "Home | About | Contact\nPlease enable JavaScript to view this page properly today.\n" + EN.replace(
        ". ", ".\n"
    )
    doc = run("c4", page + "\nThis site uses cookies to improve your experience, as described.")
    assert isinstance(doc, Document) and doc.text.startswith("The river rose")
    assert "JavaScript" not in doc.text and "cookies" not in doc.text and doc.metadata["c4_lines_dropped"] == 3
    assert isinstance(run("c4", ZH), Document)  # full-width 。 ends sentences and lines
    assert run("c4", EN + " function f() { return 1; }") == "curly_bracket"
    assert run("c4", EN + " Lorem ipsum dolor sit amet.") == "lorem_ipsum"
    assert run("c4", "Short line one.\nAnother short line here, fine?") == "too_few_sentences"


def test_pii_placeholders():
    doc = run(
        "pii",
        "Write to jane.doe@example.org or call +1 415-555-0132 or 13812345678 (手机). "
        "Server at 192.168.0.17 since 2021, version 3.14.",
    )
    assert doc.text == "Write to <EMAIL> or call <PHONE> or <PHONE> (手机). Server at <IP> since 2021, version 3.14."
    assert doc.metadata["pii"] == {"ip": 1, "email": 1, "phone": 2}


def test_chinese_without_jieba_counts_characters(monkeypatch):
    from lmforge.data.clean.steps import text

    monkeypatch.setattr(text, "_jieba", lambda: None)
    assert text.word_backend() == "cjk-characters"
    assert words("他说 hello 你好。") == ["他", "说", "hello", "你", "好"]
    assert isinstance(run("gopher_quality", ZH), Document)
    assert isinstance(run("gopher_repetition", ZH), Document)


def _page(body: str) -> str:
    nav = "<nav><a href='/'>Home</a> | <a href='/about'>About us</a></nav>"
    foot = "<footer>Copyright 2024 Example Inc. Privacy policy</footer>"
    return (
        f"<html><head><script>var tracking = 1;</script></head><body>{nav}<article>{body}</article>{foot}</body></html>"
    )


def test_extract_html_keeps_article_drops_boilerplate():
    step, cfg = configure("extract_html")
    for text in (EN, ZH):
        doc = step.apply(Document(id="p", text="", metadata={"html": _page(f"<p>{text}</p>")}), cfg)
        assert doc.text.strip() == text and "html" not in doc.metadata
    plain = Document(id="t", text="plain text")
    assert step.apply(plain, cfg) is plain  # documents without html pass through
    assert step.apply(Document(id="e", text="", metadata={"html": "<html></html>"}), cfg) == "no_main_text"
