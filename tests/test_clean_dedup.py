"""Exact and MinHash near-duplicate detection (`exact_dedup`, `minhash_dedup`) on real text."""

from __future__ import annotations

from lmforge.data.clean.steps import configure
from lmforge.data.readers import Document


def _docs(n: int = 12, lines: int = 40) -> list[str]:
    """Distinct ~40-line passages of Shakespeare."""
    from lmforge.run import shakespeare_files

    text = [ln for ln in shakespeare_files()[0].read_text(encoding="utf-8").splitlines() if len(ln.split()) >= 4]
    return ["\n".join(text[i * lines + 200 : (i + 1) * lines + 200]) for i in range(n)]


def _check(name: str, texts: list[str], **options) -> list[str | None]:
    step, cfg = configure(name, options)
    check = step.make(cfg)
    return [check(Document(id=f"d{i}", text=t)) for i, t in enumerate(texts)]


def test_exact_dedup_ignores_case_and_spacing():
    texts = _docs(4)
    out = _check("exact_dedup", texts + ["  " + texts[1].upper().replace("\n", " \n ") + "\n"])
    assert out == [None] * 4 + ["exact_duplicate"]


def test_minhash_finds_copy_with_one_line_changed():
    texts = _docs()
    lines = texts[3].split("\n")
    lines[10] = "And here a single line is rewritten by some later hand."
    step, cfg = configure("minhash_dedup", {})
    check = step.make(cfg)
    docs = [Document(id=f"d{i}", text=t) for i, t in enumerate(texts + ["\n".join(lines)])]
    out = [check(d) for d in docs]
    assert out == [None] * len(texts) + ["near_duplicate"]
    assert docs[-1].metadata["duplicate_of"] == "d3" and docs[-1].metadata["minhash_similarity"] >= 0.7


def test_minhash_keeps_distinct_documents_and_handles_chinese():
    assert _check("minhash_dedup", _docs()) == [None] * 12
    zh = (
        "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。"
        * 2
    )
    other = "春天来了，公园里的花都开了，孩子们在草地上放风筝，老人们坐在长椅上聊天，空气里都是花香和笑声。" * 2
    assert _check("minhash_dedup", [zh, other, zh.replace("早上", "中午")]) == [None, None, "near_duplicate"]
