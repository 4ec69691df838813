"""`substring_dedup` (Lee et al. 2022 ExactSubstr): repeated spans go but their first occurrence, whole characters
only, short leftovers are rejected; through the pipeline the report adds up and --workers changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.clean.pipeline import clean_corpus
from lmforge.data.clean.steps import DEFAULT_STEPS, configure
from lmforge.data.clean.steps.substring import removed_mask
from lmforge.data.readers import Document
from lmforge.errors import LmforgeError

BOILER = "Subscribe to our newsletter for the latest updates. All rights reserved, Example Media 2024.\n"
ZH_BOILER = "本网站所有内容均受版权保护，未经许可不得转载。欢迎关注我们的公众号获取最新消息。\n"  # 40 chars, 120 bytes
ZH = [
    "这条河在夜里慢慢上涨，到了早上，低处的田地已经被水淹没了。在山谷里生活了几十年的农民说，他们从来没有见过这样的情况。",
    "春天来了，公园里的花都开了，孩子们在草地上放风筝，老人们坐在长椅上聊天，空气里都是花香和笑声。",
    "图书馆今天延长了开放时间，很多学生在安静的阅览室里复习功课，准备下个月的期末考试。",
]


def _passages(n: int, lines: int = 12) -> list[str]:
    from lmforge.run import shakespeare_files

    text = [ln for ln in shakespeare_files()[5].read_text(encoding="utf-8").splitlines() if len(ln.split()) >= 4]
    return ["\n".join(text[i * lines : (i + 1) * lines]) + "\n" for i in range(n)]


def _rewrite(texts: list[str], **options) -> list[tuple[Document, str | None]]:
    step, cfg = configure("substring_dedup", options)
    return list(step.make(cfg).rewrite(Document(id=f"d{i}", text=t) for i, t in enumerate(texts)))


def test_planted_boilerplate_goes_but_its_first_occurrence():
    p = _passages(5)
    # Planted inside a word of p[4], so the repeat cannot run on into the bytes around it (a match is maximal).
    cut = next(i for i in range(200, len(p[4])) if p[4][i - 1].isalpha() and p[4][i].isalpha() and p[4][i] != p[3][0])
    texts = [p[0], p[1] + BOILER, p[2], BOILER + p[3], p[4][:cut] + BOILER + p[4][cut:]]
    out = _rewrite(texts)
    assert [r for _, r in out] == [None] * 5
    got = [d.text for d, _ in out]
    assert got == [p[0], p[1] + BOILER, p[2], p[3], p[4]]  # exactly the later copies are cut, nothing else
    n = len(BOILER.encode())
    assert [d.metadata.get("substring_dedup") for d, _ in out] == [
        None,
        None,
        None,
        *[{"removed_bytes": n, "spans": 1}] * 2,
    ]


def test_chinese_survives_and_is_never_cut_inside_a_character():
    # 中 = E4 B8 AD, 丰 = E4 B8 B0, 席 = E5 B8 AD: a byte-level repeat runs into the first bytes of 丰 and starts
    # in the middle of 席; only whole characters may go.
    texts = [ZH[0] + "中" + ZH_BOILER + "中", "席" + ZH_BOILER + "丰" + ZH[1], ZH_BOILER + ZH[2]]
    out = _rewrite(texts, min_doc_bytes=10)
    got = [d.text for d, _ in out]
    assert got[0] == texts[0] and got[2] == ZH[2]
    assert got[1] == "席丰" + ZH[1]  # the repeat without its partial characters
    data = np.frombuffer(bytearray(b"\xff".join(t.encode() for t in texts) + b"\xff"), dtype=np.uint8)
    for part in data[~removed_mask(data, 50)].tobytes().split(b"\xff"):
        part.decode("utf-8")  # strict: a cut inside a character would raise


def test_repeats_within_a_document_and_short_leftovers():
    p = _passages(3)
    out = _rewrite([p[0] + p[1] + p[0], BOILER + "ok", p[2], p[1] + "\n\n"], min_doc_bytes=20)
    assert out[0][0].text == p[0] + p[1] and out[0][1] is None  # the repeat inside one document goes too
    assert out[1][1] is None and out[2][1] is None  # BOILER's first occurrence
    doc, reason = out[3]
    assert reason == "too_short_after_removal" and doc.text == p[1] + "\n\n"  # the record keeps its text
    assert doc.metadata["substring_dedup"]["removed_bytes"] == len(p[1].encode())
    short = _rewrite([BOILER, BOILER + "x" * 30], min_bytes=len(BOILER.encode()) + 1)  # spans under min_bytes stay
    assert [d.text for d, _ in short] == [BOILER, BOILER + "x" * 30]


def test_max_bytes_shards_and_options(capsys):
    p = _passages(4)
    texts = [p[0] + BOILER, BOILER + p[1], p[2] + BOILER, p[3]]
    cap = len(texts[0].encode()) + len(texts[1].encode()) + 2  # the first two documents fill a shard
    out = _rewrite(texts, max_bytes=cap)
    assert [d.text for d, _ in out] == [p[0] + BOILER, p[1], p[2] + BOILER, p[3]]  # the third is in shard 2
    assert "independent shards" in capsys.readouterr().err
    for bad in ({"min_bytes": 0}, {"max_bytes": "1G"}, {"min_doc_bytes": -1}, {"window": 3}):
        with pytest.raises(LmforgeError, match="substring_dedup"):
            configure("substring_dedup", bad)
    assert "substring_dedup" not in DEFAULT_STEPS


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pipeline_report_and_workers(tmp_path):
    p = _passages(30)
    docs = [{"id": f"en{i}", "text": t + (BOILER if i % 3 == 1 else "")} for i, t in enumerate(p)]
    docs += [{"id": "zh0", "text": ZH[0] + ZH_BOILER}, *[{"id": f"zh{i}", "text": ZH_BOILER + ZH[i]} for i in (1, 2)]]
    docs += [{"id": "short", "text": "Read this first.\n" + BOILER}, {"id": "copy", "text": p[5]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    steps = [{"name": "pii"}, {"name": "exact_dedup"}, {"name": "substring_dedup", "min_doc_bytes": 40},
             {"name": "minhash_dedup"}]  # fmt: skip
    r1 = clean_corpus([src], tmp_path / "w1", steps=steps, workers=1, progress=False, shard_docs=4)
    r2 = clean_corpus([src], tmp_path / "w2", steps=steps, workers=2, progress=False, shard_docs=4)
    for part in ("kept/part-00000.jsonl", "rejected/part-00000.jsonl"):
        assert (tmp_path / "w1" / part).read_bytes() == (tmp_path / "w2" / part).read_bytes()
    c = r1["counts"]
    assert r1["identity_holds"] and c == r2["counts"] and c["input"] == c["kept"] + c["rejected"] + c["unreadable"]
    assert r1["per_reason"] == {"exact_dedup/exact_duplicate": 1, "substring_dedup/too_short_after_removal": 1}
    assert r1["per_step"]["substring_dedup"] == {"in": len(docs) - 1, "rejected": 1}
    assert r1["per_step"]["minhash_dedup"]["in"] == len(docs) - 2
    kept = {r["id"]: r for r in _read(tmp_path / "w1/kept/part-00000.jsonl")}
    assert kept["en1"]["text"].endswith(BOILER) and "substring_dedup" not in kept["en1"]["metadata"]
    assert all(BOILER not in kept[f"en{i}"]["text"] for i in range(4, 30, 3))
    assert kept["zh0"]["text"] == ZH[0] + ZH_BOILER and [kept[f"zh{i}"]["text"] for i in (1, 2)] == ZH[1:]
    assert kept["zh1"]["metadata"]["substring_dedup"] == {"removed_bytes": len(ZH_BOILER.encode()), "spans": 1}
    rejected = {r["id"]: r for r in _read(tmp_path / "w1/rejected/part-00000.jsonl")}
    assert (rejected["short"]["step"], rejected["short"]["reason"]) == ("substring_dedup", "too_short_after_removal")
    assert rejected["copy"]["step"] == "exact_dedup"  # the steps before it run first, in order
