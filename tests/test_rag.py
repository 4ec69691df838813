"""Retrieval-augmented generation: passages, terms, the index (build, update, search), prompts, and the
commands that use it (`rag index/search/ask`, `chat --rag`, `serve --rag`): `python -m pytest -q tests/test_rag.py`.
"""

from __future__ import annotations

import itertools
import json
import urllib.request

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.rag.index import Hit, RagIndex, build_index, rrf
from lmforge.rag.passages import count_words, split_passages
from lmforge.rag.prompt import cited, fit_sources, with_sources
from lmforge.rag.terms import terms

GUIDE = """# Guide

Intro paragraph about the tool.

## Install

Run the installer with the flag --prefix to choose a folder.

## Usage

The frobnicate command takes a widget and returns a gadget.

Usage
=====

An underlined heading (reStructuredText) starts a section too.
"""


def test_passages_follow_headings_and_keep_lines():
    ps = split_passages(GUIDE, max_words=64, overlap=0)
    assert [(p.heading, p.line) for p in ps] == [
        ("Guide", 3), ("Guide > Install", 7), ("Guide > Usage", 11), ("Guide > Usage > Usage", 16),
    ]  # fmt: skip
    lines = GUIDE.splitlines()
    for p in ps:  # each passage is an exact slice starting at its line
        assert lines[p.line - 1].startswith(p.text.splitlines()[0])
    pydoc = 'The "with" statement\n********************\n\nBody text.\n\nSub\n===\n\nMore.\n'
    assert [(p.heading, p.text) for p in split_passages(pydoc)] == [
        ('The "with" statement', "Body text."), ('The "with" statement > Sub', "More."),
    ]  # fmt: skip


def test_passages_respect_budget_and_overlap():
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(10)) + "." for i in range(12)]
    text = "\n\n".join(paragraphs)
    ps = split_passages(text, max_words=30, overlap=10)
    assert all(count_words(p.text) <= 30 for p in ps)
    # consecutive passages share exactly one whole 10-word paragraph; every paragraph is somewhere
    for a, b in itertools.pairwise(ps):
        assert a.text.split("\n\n")[-1] == b.text.split("\n\n")[0]
    assert all(any(par in p.text for p in ps) for par in paragraphs)
    no_overlap = split_passages(text, max_words=30, overlap=0)
    assert len(no_overlap) == 4 and "\n\n".join(p.text for p in no_overlap) == text


def test_long_paragraphs_cut_at_sentences_then_words_and_chinese_counts_characters():
    sentence = "word " * 9 + "end."
    ps = split_passages(" ".join([sentence] * 10), max_words=25, overlap=0)
    assert all(count_words(p.text) <= 25 for p in ps) and all(p.text.endswith("end.") for p in ps)
    one_line = " ".join(f"w{i}" for i in range(100))  # no sentence end at all
    assert [count_words(p.text) for p in split_passages(one_line, max_words=40, overlap=0)] == [40, 40, 20]
    zh = "上下文管理器定义了运行时上下文。" * 10
    assert count_words("上下文管理器") == 6 and count_words("with 语句") == 3
    ps = split_passages(zh, max_words=32, overlap=0)
    assert all(count_words(p.text) <= 32 for p in ps) and "".join(p.text for p in ps) == zh
    with pytest.raises(ValueError):
        split_passages("x", max_words=4)


def test_terms():
    assert terms("How does the WITH statement call __exit__()?") == [
        "how", "does", "with", "statement", "call", "__exit__", "exit",
    ]  # fmt: skip
    zh = terms("上下文管理器")
    assert "上下文" in zh and "管理器" in zh
    assert terms("the and of") == []


def test_rrf_fuses_ranks():
    fused = rrf([[(1, 9.0), (2, 5.0), (3, 1.0)], [(3, 0.9), (1, 0.8)]], k=60)
    assert [row for row, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def _docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir(parents=True)
    (docs / "guide.md").write_text(GUIDE)
    (docs / "tea.txt").write_text("Green tea is steamed.\n\nBlack tea is oxidized before drying.\n")
    (docs / "zh.txt").write_text("上下文管理器定义了进入和退出运行时上下文的方法。\n")
    (docs / "faq.jsonl").write_text(json.dumps({"id": "q1", "text": "The capital of Freedonia is Fredville."}) + "\n"
                                    + "{not json\n")  # fmt: skip
    (docs / "page.html").write_text("<html><body><article><h1>Ports</h1><p>" + "The harbour master opens the "
                                    "north gate at dawn every single day of the year. " * 3 + "</p></article></body></html>")  # fmt: skip
    (docs / "empty.txt").write_text("  \n\n")
    (docs / "blob.txt").write_bytes(b"\x00\x01binary")
    (docs / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "image.png").write_bytes(b"\x89PNG")
    return docs


def test_index_reads_every_format_and_counts_what_it_skips(tmp_path):
    tmp_path = tmp_path / ".under-a-hidden-folder"  # only hidden names inside the input folder are skipped
    docs = _docs(tmp_path)
    (docs / ".git").mkdir()
    (docs / ".git" / "notes.txt").write_text("hidden: not indexed")
    report = build_index([docs], tmp_path / "idx", max_words=32, overlap=0, progress=False)
    assert report["documents"] == {"new": 5}
    skipped = {why.split(" (expected")[0]: n for why, n in report["skipped"].items()}
    assert skipped == {"empty": 1, "binary (NUL bytes)": 1, "not UTF-8": 1, "malformed JSON": 1,
                       "unsupported file type": 1}  # fmt: skip
    index = RagIndex.load(tmp_path / "idx")
    top = index.search("which command returns a gadget", k=1)[0]
    assert top.source.endswith("guide.md:11") and top.heading == "Guide > Usage"
    assert index.search("Freedonia capital", k=1)[0].source.endswith("faq.jsonl:1")
    assert "harbour" in index.search("when does the north gate open", k=1)[0].text
    assert index.search("上下文管理器", k=1)[0].source.endswith("zh.txt:1")
    assert index.search("the of and", k=3) == []  # only stopwords: nothing to rank by
    assert index.search("zyzzyva", k=3) == []
    with pytest.raises(LmforgeError, match="no dense vectors"):
        index.search("tea", mode="dense")
    with pytest.raises(LmforgeError, match="mode"):
        index.search("tea", mode="fuzzy")


def test_index_updates_incrementally_and_swaps_atomically(tmp_path, base_run, monkeypatch):
    docs = _docs(tmp_path)
    out = tmp_path / "idx"
    first = build_index([docs], out, max_words=32, overlap=0, embed_model=str(base_run), progress=False)
    n = first["passages"]
    assert first["passages_embedded"] == n
    before = RagIndex.load(out)
    (docs / "tea.txt").write_text("Green tea is steamed.\n\nWhite tea is withered and dried.\n")  # changed
    (docs / "new.md").write_text("# Coffee\n\nEspresso is brewed under pressure.\n")  # new
    report = build_index([docs], out, max_words=32, overlap=0, progress=False)  # keeps the embedding model
    assert report["documents"] == {"unchanged": 4, "changed": 1, "new": 1}
    assert report["passages_embedded"] == 2  # only the changed and the new documents ran through the model
    after = RagIndex.load(out)
    assert after.meta["dense"] == before.meta["dense"]
    old_rows = {p["text"]: i for i, p in enumerate(before.passages)}
    for i, p in enumerate(after.passages):  # unchanged passages keep their vectors exactly
        if p["text"] in old_rows:
            assert np.array_equal(after.vectors[i], before.vectors[old_rows[p["text"]]])
    emb = after.embedder()
    fresh = emb([f"{p['title']}\n{p['heading']}\n{p['text']}" for p in after.passages])
    assert np.allclose(fresh, after.vectors, atol=1e-5)  # and equal what a full rebuild would compute
    for mode in ("dense", "hybrid"):
        hits = after.search("Espresso pressure", k=3, mode=mode)
        assert len(hits) == 3 and len({h.row for h in hits}) == 3
    assert after.search("Espresso pressure", k=1, mode="bm25")[0].source.endswith("new.md:3")
    # a document not among the inputs stays, unless pruned
    report = build_index([docs / "new.md"], out, max_words=32, overlap=0, progress=False)
    assert report["documents"] == {"unchanged": 1, "kept (not among the inputs)": 5}
    report = build_index([docs / "new.md"], out, max_words=32, overlap=0, prune=True, progress=False)
    assert report["documents"] == {"unchanged": 1, "pruned": 5} and report["passages"] == 1
    with pytest.raises(LmforgeError, match="max_words=32"):
        build_index([docs], out, max_words=64, overlap=0, progress=False)
    # a failure while writing leaves the previous index whole
    import bm25s

    monkeypatch.setattr(bm25s.BM25, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        build_index([docs], out, max_words=32, overlap=0, progress=False)
    assert len(RagIndex.load(out).passages) == 1 and not list(tmp_path.glob(".idx.*"))


def test_prompt_numbers_sources_and_drops_the_lowest_to_fit(base_run):
    from lmforge.chat.template import ChatFormat

    fmt = ChatFormat(base_run / "tokenizer")
    hits = [Hit(i + 1, 1.0, i, f"doc.txt:{i}", "H", f"passage number {i} " * 6) for i in range(4)]
    turn = with_sources("Why?", hits[:2])
    assert turn.index("[1] doc.txt:0 (H)") < turn.index("[2] doc.txt:1") < turn.index("Question: Why?")
    full = len(fmt.encode([{"role": "user", "content": with_sources("Why?", hits)}], add_generation_prompt=True))
    messages, used = fit_sources(fmt, [], "Why?", hits, budget=full - 1)
    assert used == hits[:3] and "[4]" not in messages[-1]["content"]
    messages, used = fit_sources(fmt, [], "Why?", hits, budget=full)
    assert used == hits
    with pytest.raises(LmforgeError, match="question is too long"):
        fit_sources(fmt, [], "why " * 200, hits, budget=50)
    assert cited("As [2] says, and [1], [2], [9].", hits[:2]) == [hits[1], hits[0]]


def test_rag_cli_index_search_ask(tmp_path, chat_model, capsys):
    base_run = chat_model
    docs = _docs(tmp_path)
    out = tmp_path / "idx"
    assert main(["rag", "index", str(docs), "--out", str(out), "--max-words", "16", "--overlap", "0"]) == 0
    assert "skipped 5" in capsys.readouterr().err
    assert main(["rag", "search", str(out), "north gate", "--k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and "harbour" in hits[0]["text"] and hits[0]["rank"] == 1
    # positionals after flags, as users type them
    assert main(["rag", "ask", str(out), "--model", str(base_run), "When is the north gate opened?", "--k", "2",
                 "--max-new-tokens", "4", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert [s["rank"] for s in result["sources"]] == [1, 2] and isinstance(result["answer"], str)
    assert main(["rag", "ask", str(out), "--model", str(base_run), "When?", "--k", "0", "--max-new-tokens", "4"]) == 0
    assert "Sources:" not in capsys.readouterr().out
    # bad input: one line, exit 2
    assert main(["rag", "ask", str(out), "--model", str(base_run), "why " * 900, "--max-new-tokens", "4"]) == 2
    assert "question is too long" in capsys.readouterr().err
    assert main(["rag", "search", str(tmp_path), "x"]) == 2
    assert "not a retrieval index" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "e.txt").write_text("")
    assert main(["rag", "index", str(tmp_path / "nothing"), "--out", str(tmp_path / "i2")]) == 2
    err = capsys.readouterr().err
    assert "nothing to index" in err and "1 empty" in err and not (tmp_path / "i2").exists()


def test_chat_session_with_rag_keeps_history_plain(tmp_path, chat_model):
    base_run = chat_model
    from lmforge.chat.template import ChatFormat
    from lmforge.serve.chat_cmd import ChatSession
    from lmforge.train.checkpoint import load_for_inference

    build_index([_docs(tmp_path)], tmp_path / "idx", max_words=16, overlap=0, progress=False)
    model, tok_dir, _ = load_for_inference(base_run)
    session = ChatSession(model, ChatFormat(tok_dir), rag=RagIndex.load(tmp_path / "idx"), rag_k=2,
                          max_new_tokens=4, temperature=0.0)  # fmt: skip
    session.messages.append({"role": "user", "content": "north gate"})
    prompt, used = session._prompt(session.rag.search("north gate", 2))
    assert len(used) == 2 and "Question: north gate" in session.fmt.tokenizer.decode(prompt)
    session.reset()
    session.reply("north gate")
    assert session.messages[0] == {"role": "user", "content": "north gate"}  # the history holds the plain turn


def test_serve_rag_returns_sources(tmp_path, chat_model, capsys):
    base_run = chat_model
    from lmforge.serve.api import create_app, load_served
    from tests.serve_helpers import ServerThread

    build_index([_docs(tmp_path)], tmp_path / "idx", max_words=16, overlap=0, progress=False)
    served = load_served(str(base_run), name="tiny", device="cpu", max_batch=2, max_context=None, prefill_chunk=16,
                         max_queue=8, api_key=None, max_body=1 << 20, rag=str(tmp_path / "idx"), rag_k=2)  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "north gate"}], "max_tokens": 3}
    with ServerThread(create_app(served)) as url:

        def post(payload):
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(payload).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read().decode()

        whole = json.loads(post(body))
        assert [s["index"] for s in whole["sources"]] == [1, 2] and "harbour" in whole["sources"][0]["text"]
        events = [json.loads(line[6:]) for line in post({**body, "stream": True}).splitlines()
                  if line.startswith("data: {")]  # fmt: skip
        assert events[0]["sources"] == whole["sources"] and all("sources" not in e for e in events[1:])
        assert whole["usage"]["prompt_tokens"] > 40  # the passages are in the prompt
        from lmforge.serve.chat_client import RemoteSession  # `lmforge chat --url` prints them

        capsys.readouterr()
        remote = RemoteSession(url, "tiny", None, None, max_tokens=3, temperature=0, top_k=0, top_p=1,
                               repetition_penalty=1, seed=0)  # fmt: skip
        remote.reply("north gate")
        assert "lmforge chat: sources [1] " in capsys.readouterr().err
    with pytest.raises(LmforgeError, match="not a retrieval index"):
        load_served(str(base_run), name="t", device="cpu", max_batch=1, max_context=None, prefill_chunk=16,
                    max_queue=1, api_key=None, max_body=1 << 20, rag=str(tmp_path))  # fmt: skip


def test_embedder_pools_only_real_tokens(chat_model):
    """A text's vector is the same alone or batched with a longer one (padding never enters the mean)."""
    from lmforge.rag.embed import Embedder

    emb = Embedder(str(chat_model))
    alone = emb(["short text"])
    batched = emb(["a much longer text that makes the batch pad the short one", "short text"])
    assert np.allclose(alone[0], batched[1], atol=1e-5) and np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    assert emb([]).shape == (0, emb.dim)
