"""The `url_filter`, `fineweb` and `toxicity` cleaning steps: each rule just below and just above its threshold,
in English and Chinese, their options and errors, and one `clean_corpus` run with all three."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.clean.pipeline import clean_corpus
from lmforge.data.clean.steps import DEFAULT_STEPS, STEPS, configure
from lmforge.data.clean.steps.text import words
from lmforge.data.clean.steps.toxicity import WORDLISTS
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

EN = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers who had lived in the valley for decades said that they had never seen anything like it. "
    "Some of them moved their animals to the hills with the help of neighbours, while others stayed "
    "behind to protect their houses and to wait for the water to fall again."
)
ZH = (
    "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。"
    "有些人在邻居的帮助下把牲畜赶到了山上，另一些人留在家里看守房子，等待河水退去。"
)
# Line ends: terminal punctuation (the Chinese ones cycle through the full-width forms) or a plain character.
ENDS = {"en": [".", "!", "?"], "zh": ["。", "！", "？", "…", "．", "｡"]}
PLAIN = {"en": "x", "zh": "字"}


def run(name: str, text: str = "", metadata: dict | None = None, **options):
    """(what the step returned, the document it was given)."""
    step, cfg = configure(name, options)
    doc = Document(id="d", text=text, metadata=dict(metadata or {}))
    return step.apply(doc, cfg), doc


def line(lang: str, i: int, n: int, punct: bool = True) -> str:
    """A distinct line of exactly `n` characters, ending in terminal punctuation or not."""
    end = ENDS[lang][i % len(ENDS[lang])] if punct else PLAIN[lang]
    body = (f"{i:03d} " + EN * 2 if lang == "en" else f"第{i:03d}段" + ZH * 2)[: n - 1]
    return body[:-1] + "y" + end if body.endswith(" ") else body + end


def test_registered_and_defaults():
    assert {"url_filter", "fineweb", "toxicity"} <= set(STEPS)
    assert DEFAULT_STEPS[0] == "url_filter" and "fineweb" not in DEFAULT_STEPS and "toxicity" not in DEFAULT_STEPS


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("fineweb", {"line_punct_thresh": 0.1}, "unknown option.*line_punct_thresh"),
        ("url_filter", {"blocked_domain": ["a.com"]}, "unknown option.*blocked_domain"),
        ("toxicity", {"max_count": 3}, "unknown option.*max_count"),
        ("url_filter", {"blocked_domains": "a.com"}, "blocked_domains must be a list of strings"),
        ("url_filter", {"domains_file": "/no/such/domains.txt"}, "no such domains file"),
        ("toxicity", {"words_file": "/no/such/words.txt"}, "no such words file"),
        ("toxicity", {"default_lists": ["fr"]}, r"no packaged word list 'fr' \(known: en, zh\)"),
    ],
)
def test_config_errors_are_one_line(name, options, match):
    with pytest.raises(LmforgeError, match=match) as e:
        configure(name, options)
    assert "\n" not in str(e.value)


# --- fineweb ---


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fineweb_keeps_prose(lang):
    out, doc = run("fineweb", EN if lang == "en" else ZH)
    assert out is doc and doc.metadata["fineweb"]["line_punct_ratio"] == 1.0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fineweb_line_punct_ratio(lang):
    # 12 of 100 lines end in terminal punctuation: 0.12 is not below 0.12; 11 of 100 is.
    text = "\n".join(line(lang, i, 40, punct=i < 12) for i in range(100))
    out, doc = run("fineweb", text)
    assert out is doc and doc.metadata["fineweb"]["line_punct_ratio"] == 0.12
    text = "\n".join(line(lang, i, 40, punct=i < 11) for i in range(100))
    assert run("fineweb", text)[0] == "line_punct_ratio"
    no_punct = "\n".join(line(lang, i, 40, punct=False) for i in range(10))
    assert run("fineweb", no_punct)[0] == "line_punct_ratio"
    assert isinstance(run("fineweb", no_punct, line_punct_exclude_zero=True)[0], Document)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fineweb_short_line_ratio(lang):
    # Lines of 30 characters are short, of 31 not: 67 short of 100 is not above 0.67; 68 is.
    text = "\n".join(line(lang, i, 30 if i < 67 else 31) for i in range(100))
    out, doc = run("fineweb", text)
    assert out is doc and doc.metadata["fineweb"]["short_line_ratio"] == 0.67
    text = "\n".join(line(lang, i, 30 if i < 68 else 31) for i in range(100))
    out, doc = run("fineweb", text)
    assert out == "short_line_ratio" and doc.metadata["fineweb"]["short_line_ratio"] == 0.68
    assert isinstance(run("fineweb", text, short_line_thr=0.7)[0], Document)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fineweb_char_dup_ratio(lang):
    # A 40-character line repeated once: 40 duplicated characters of 4001 (kept) or of 3999 (> 0.01, rejected).
    for last, kept in ((81, True), (79, False)):
        lines = [line(lang, 0, 40)] + [line(lang, i, 80) for i in range(1, 49)] + [line(lang, 49, last)]
        text = "\n".join(lines + [lines[0]])
        assert len(text.replace("\n", "")) == (4001 if kept else 3999)
        out, doc = run("fineweb", text)
        if kept:
            assert out is doc and doc.metadata["fineweb"]["char_dup_ratio"] == round(40 / 4001, 4)
        else:
            assert out == "char_dup_ratio"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_fineweb_list_ratio(lang):
    # Newlines per word: blank lines count as newlines (not as lines), so they set the ratio to the unit.
    lines = [line(lang, i, 40) for i in range(10)]
    n_words = len(words("\n".join(lines)))  # jieba words for Chinese, as the step counts them
    at_limit = 3 * n_words // 10  # newlines / words == 0.3 or just under
    for newlines, kept in ((at_limit, True), (at_limit + 1, False)):
        text = lines[0] + "\n" * (newlines - 8) + "\n".join(lines[1:])
        assert text.count("\n") == newlines and len(words(text)) == n_words
        out, doc = run("fineweb", text)
        assert (out is doc) if kept else out == "list_ratio"
        assert doc.metadata["fineweb"]["list_ratio"] == round(newlines / n_words, 4)


def test_fineweb_chinese_without_jieba(monkeypatch):
    from lmforge.data.clean.steps import text

    monkeypatch.setattr(text, "_jieba", lambda: None)  # one word per CJK character
    test_fineweb_list_ratio("zh")
    assert isinstance(run("fineweb", ZH)[0], Document)


# --- url_filter ---


@pytest.mark.parametrize(
    "url, reason, match",
    [
        ("https://www.pornhub.com/view?x=1", "blocked_domain", {"domain": "pornhub.com"}),
        ("HTTP://De.XVideos.COM:8080/", "blocked_domain", {"domain": "xvideos.com"}),
        ("xnxx.com/some/page", "blocked_domain", {"domain": "xnxx.com"}),  # no scheme
        ("https://example.com/free-porn/clip", "blocked_word", {"word": "porn"}),
        ("https://example.com/tag/NSFW_pics", "blocked_word", {"word": "nsfw"}),
        ("https://freepornvideos.net/", "blocked_subword", {"subword": "freeporn"}),
        ("https://example.com/articles/pornography-law-reform", None, None),  # not a whole token
        ("https://mypornhubfan.example/", "blocked_subword", {"subword": "pornhub"}),
        ("https://en.wikipedia.org/wiki/River", None, None),
    ],
)
def test_url_filter_defaults(url, reason, match):
    out, doc = run("url_filter", "text", {"url": url})
    if reason is None:
        assert out is doc and "url_filter" not in doc.metadata
    else:
        assert out == reason and doc.metadata["url_filter"] == match


def test_url_filter_domains_subdomains_allowlist_and_missing_url(tmp_path):
    opts = {"blocked_domains": ["example.org"], "blocked_words": [], "blocked_subwords": []}
    assert run("url_filter", "t", {"url": "https://a.b.example.org/x"}, **opts)[0] == "blocked_domain"
    assert isinstance(run("url_filter", "t", {"url": "https://myexample.org/x"}, **opts)[0], Document)
    assert isinstance(run("url_filter", "t", {"url": "https://example.org.cn/x"}, **opts)[0], Document)
    allow = {**opts, "allowed_domains": ["research.example.org"], "blocked_words": ["porn"]}
    out, doc = run("url_filter", "t", {"url": "https://research.example.org/porn-studies"}, **allow)
    assert out is doc  # the allowlist overrides the domain and the word
    assert run("url_filter", "t", {"url": "https://www.example.org/"}, **allow)[0] == "blocked_domain"
    for meta in ({}, {"url": None}, {"url": ""}, {"link": "https://pornhub.com/"}):
        out, doc = run("url_filter", "t", meta)
        assert out is doc and doc.metadata == meta  # no url: passes unchanged
    assert run("url_filter", "t", {"link": "https://pornhub.com/"}, url_field="link")[0] == "blocked_domain"


def test_url_filter_domains_file_and_chinese_words(tmp_path):
    f = tmp_path / "domains"
    f.write_text("# UT1-style list\n\nspam.example\n*.Casino.Example.\nads.example.net  # a comment\n")
    opts = {"domains_file": str(f), "blocked_domains": [], "blocked_words": ["色情"], "blocked_subwords": []}
    for url, reason in [
        ("http://spam.example/page", "blocked_domain"),
        ("http://www.casino.example/", "blocked_domain"),
        ("http://x.ads.example.net/", "blocked_domain"),
        ("http://example.net/", None),
        ("https://www.pornhub.com/", None),  # the default domains were replaced
        ("https://example.com/%E8%89%B2%E6%83%85/1.html", "blocked_word"),  # /色情/ percent-encoded
        ("https://example.com/色情/1.html", "blocked_word"),
        ("https://example.com/色情网站", None),  # one token: a word matches whole tokens only
    ]:
        out, doc = run("url_filter", "t", {"url": url}, **opts)
        assert (out is doc) if reason is None else out == reason, url
    f.write_text("casino.example\n")  # an edited file is read again
    assert isinstance(run("url_filter", "t", {"url": "http://spam.example/"}, **opts)[0], Document)


# --- toxicity ---


def test_packaged_word_lists_ship_with_the_package():
    for code in ("en", "zh"):
        terms = [t for t in (WORDLISTS / f"{code}.txt").read_text(encoding="utf-8").splitlines() if t and t[0] != "#"]
        assert 20 <= len(terms) <= 60
    # The build ships them: package-data in pyproject.toml (tomllib is 3.11+, the package supports 3.10).
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"data/clean/wordlists/*.txt"' in pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]


def test_toxicity_english_whole_words_and_count():
    long = " ".join([EN] * 3)  # 195 words: 3 matches stay under the ratio rule
    out, doc = run("toxicity", long + " Pornography law, PORNO. Porn!")
    assert out is doc and doc.metadata["toxicity"]["matches"] == 2  # not inside "pornography"
    assert doc.metadata["toxicity"]["terms"] == ["porno", "porn"]
    out, doc = run("toxicity", long + " Pornography law. porno, Porn! fucking")
    assert out == "toxic_words" and doc.metadata["toxicity"]["matches"] == 3
    assert isinstance(run("toxicity", long + " porno porn fucking", max_matches=3)[0], Document)
    assert isinstance(
        run("toxicity", long + " " + " ".join(["porn"] * 9), max_matches=None, max_ratio=None)[0], Document
    )
    assert run("toxicity", "they said oral   sex, twice")[1].metadata["toxicity"]["terms"] == ["oral   sex"]
    out, doc = run("toxicity", EN)
    assert out is doc and "toxicity" not in doc.metadata


def test_toxicity_ratio_per_word():
    # One match in 50 words is 0.02, not above max_ratio 0.02; in 49 words it is.
    for n, kept in ((49, True), (48, False)):
        text = " ".join(EN.split()[:n]) + " PORN"
        assert len(words(text)) == n + 1
        out, doc = run("toxicity", text)
        assert (out is doc) if kept else out == "toxic_word_ratio"
        assert doc.metadata["toxicity"]["ratio"] == round(1 / (n + 1), 4)


def test_toxicity_chinese_substrings():
    text = ZH + "有人在网上发布色情网站的链接。" + "出口交易额上升。"  # 出口交易 holds 口交, which is not listed
    out, doc = run("toxicity", text)
    assert out is doc and doc.metadata["toxicity"]["terms"] == ["色情"]
    ratio = 1 / len(words(text))
    assert isinstance(run("toxicity", text, max_ratio=ratio)[0], Document)
    assert run("toxicity", text, max_ratio=ratio * 0.99)[0] == "toxic_word_ratio"
    spam = ZH + "看porn视频，约炮，裸聊。"  # an English term between Chinese characters is a whole word
    out, doc = run("toxicity", spam)
    assert out == "toxic_words" and doc.metadata["toxicity"]["terms"] == ["porn", "约炮", "裸聊"]
    # The limit of substrings: a listed 口交 would hit 出口交易 (export trade), which is why the list leaves it out.
    assert run("toxicity", "出口交易额上升。", words=["口交"], default_lists=[])[1].metadata["toxicity"]["terms"] == [
        "口交"
    ]


def test_toxicity_words_file(tmp_path):
    f = tmp_path / "ldnoobw"
    f.write_text("# my list\nflibbertigibbet\nbad   phrase\n坏词\n\n", encoding="utf-8")
    opts = {"words_file": str(f), "default_lists": [], "max_matches": 1}
    assert isinstance(run("toxicity", EN + " porn porn porn", **opts)[0], Document)  # packaged lists off
    out, doc = run("toxicity", EN + " Flibbertigibbet! a bad phrase, 好坏词", **opts)
    assert out == "toxic_words" and doc.metadata["toxicity"]["terms"] == ["flibbertigibbet", "bad phrase", "坏词"]
    assert isinstance(run("toxicity", EN + " flibbertigibbets", **opts)[0], Document)
    assert run("toxicity", EN + " zonk zonk", words=["zonk"], default_lists=[], max_matches=1)[0] == "toxic_words"
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(LmforgeError, match="not UTF-8"):
        configure("toxicity", opts)


# --- all three in a run ---


def test_clean_corpus_with_the_filters(tmp_path):
    menu = "\n".join(f"Menu item number {i}" for i in range(20))
    records = [
        {"id": "ok", "text": EN, "url": "https://news.example.com/river"},
        {"id": "blocked", "text": EN, "url": "https://www.pornhub.com/view"},
        {"id": "nourl", "text": ZH},
        {"id": "menu", "text": menu, "url": "https://shop.example.com/"},
        {"id": "toxic", "text": EN + " Fuck, fuck, fuck.", "url": "https://blog.example.com/"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "{bad json\n")
    steps = [{"name": "url_filter"}, {"name": "fineweb"}, {"name": "toxicity"}]
    report = clean_corpus([src], tmp_path / "out", steps=steps, workers=1, progress=False)
    c = report["counts"]
    assert (c["input"], c["kept"], c["rejected"], c["unreadable"]) == (6, 2, 3, 1) and report["identity_holds"]
    assert report["identity"] == "input == kept + rejected + unreadable: 6 == 2 + 3 + 1"
    assert report["per_reason"] == {
        "fineweb/line_punct_ratio": 1,
        "toxicity/toxic_words": 1,
        "url_filter/blocked_domain": 1,
    }
    assert report["per_step"] == {
        "url_filter": {"in": 5, "rejected": 1},
        "fineweb": {"in": 4, "rejected": 1},
        "toxicity": {"in": 3, "rejected": 1},
    }
    out = tmp_path / "out"
    kept = [json.loads(x) for x in (out / "kept/part-00000.jsonl").read_text(encoding="utf-8").splitlines()]
    rejected = {
        r["id"]: r
        for r in map(json.loads, (out / "rejected/part-00000.jsonl").read_text(encoding="utf-8").splitlines())
    }
    assert [r["id"] for r in kept] == ["ok", "nourl"]
    assert (rejected["blocked"]["step"], rejected["blocked"]["reason"]) == ("url_filter", "blocked_domain")
    assert rejected["blocked"]["metadata"]["url_filter"] == {"domain": "pornhub.com"}
    assert (rejected["menu"]["step"], rejected["menu"]["reason"]) == ("fineweb", "line_punct_ratio")
    assert rejected["menu"]["metadata"]["fineweb"]["line_punct_ratio"] == 0.0
    assert (rejected["toxic"]["step"], rejected["toxic"]["reason"]) == ("toxicity", "toxic_words")
    assert rejected["toxic"]["metadata"]["toxicity"]["matches"] == 3
