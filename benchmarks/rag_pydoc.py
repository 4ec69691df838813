"""Retrieval and retrieval-augmented answers on Python's language reference (pydoc_data.topics, in CPython).

    lmforge import .../SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2        # once
    python benchmarks/rag_pydoc.py --model models/smollm2 --work /tmp/rag-bench --json benchmarks/results/rag_pydoc.json

The 79 topics are written as text files and indexed by `lmforge rag index` (128-word passages, 16
words of overlap; dense vectors: SmolLM2's mean-pooled final hidden states). The questions are
benchmarks/data/pydoc_qa.jsonl: 60 hand-written questions, each with a short answer and the
verbatim evidence sentence it comes from (benchmarks/data/check_pydoc_qa.py checks both).

- Retrieval: recall@1/5/20 (a top-k passage holds the evidence) for BM25, dense (HNSW) and hybrid
  (reciprocal rank fusion), with Wilson 95% intervals.
- Speed at the same quality: bm25s against rank-bm25 (BM25Okapi on the same terms: index build
  and per-query time, and recall@5 of each); HNSW against exact numpy search over the same vectors
  (per-query time and the share of the exact top 20 that HNSW returns).
- Answers: the model answers every question greedily with and without the top 4 passages in its
  prompt (`lmforge rag ask`'s prompt); an answer is right when it contains one of the accepted
  answers as a whole token (case-insensitive: "8" counts in "8 spaces", not in "18"). Accuracy with Wilson intervals; exact McNemar test on the pairs.

The embedding pass (the model over every passage) is the slow part on CPU (~8 minutes on the
2-core machine); the index in --work is reused when it exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
QA = ROOT / "data" / "pydoc_qa.jsonl"


def write_topics(folder: Path) -> None:
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in topics.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def recall(ranked_rows: list[list[int]], gold: list[set[int]], k: int) -> tuple[int, int]:
    hit = sum(1 for rows, g in zip(ranked_rows, gold, strict=True) if g & set(rows[:k]))
    return hit, len(gold)


def fmt_rate(hit: int, n: int) -> dict:
    from lmforge.eval.stats import wilson_interval

    lo, hi = wilson_interval(hit, n)
    return {"hits": hit, "n": n, "rate": round(hit / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the chat model (and embedding model), e.g. models/smollm2")
    ap.add_argument("--work", default="/tmp/rag-bench", help="where the topic files and the index go (reused)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--k", type=int, default=4, help="passages in the answer prompt")
    ap.add_argument("--answer-mode", default="bm25", help="search mode for the answer prompts")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--skip-answers", action="store_true")
    args = ap.parse_args()

    import torch

    from lmforge.eval.stats import mcnemar_exact
    from lmforge.rag.index import RagIndex, build_index, rrf
    from lmforge.rag.terms import terms

    torch.manual_seed(0)
    work = Path(args.work)
    docs, index_dir = work / "topics", work / "index"
    write_topics(docs)
    t0 = time.perf_counter()
    report = build_index([docs], index_dir, embed_model=args.model)
    build_s = time.perf_counter() - t0
    index = RagIndex.load(index_dir)
    qa = [json.loads(line) for line in QA.read_text(encoding="utf-8").splitlines() if line.strip()]
    gold = [{i for i, p in enumerate(index.passages) if q["evidence"] in p["text"]} for q in qa]
    missing = [q["id"] for q, g in zip(qa, gold, strict=True) if not g]
    if missing:
        sys.exit(f"evidence not found in any passage: {missing}")
    results = {"passages": len(index.passages), "questions": len(qa), "build": report, "build_s": round(build_s, 1)}

    depth = 50
    bm25_t, dense_t, exact_t = [], [], []
    ranked = {"bm25": [], "dense": [], "hybrid": [], "dense_exact": []}
    index.embedder()  # load it before timing
    for q in qa:
        t = time.perf_counter()
        b = index.rank_bm25(q["question"], depth)
        bm25_t.append(time.perf_counter() - t)
        qv = index.embedder()([q["question"]])  # timed apart: the model forward is not the index's cost
        t = time.perf_counter()
        graph = index.graph()
        graph.set_ef(2 * depth)
        labels, _ = graph.knn_query(qv, k=depth)
        dense_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        exact = np.argsort(-(index.vectors @ qv[0]), kind="stable")[:depth]
        exact_t.append(time.perf_counter() - t)
        d = [(int(i), 0.0) for i in labels[0]]
        ranked["bm25"].append([r for r, _ in b])
        ranked["dense"].append([r for r, _ in d])
        ranked["dense_exact"].append([int(i) for i in exact])
        ranked["hybrid"].append([r for r, _ in rrf([b, d])])
    table = {}
    for mode in ("bm25", "dense", "hybrid"):
        table[mode] = {f"recall@{k}": fmt_rate(*recall(ranked[mode], gold, k)) for k in (1, 5, 20)}
    results["retrieval"] = table
    overlap = np.mean([len(set(a[:20]) & set(b[:20])) / 20 for a, b in zip(ranked["dense"], ranked["dense_exact"],
                                                                           strict=True)])  # fmt: skip
    results["dense_search"] = {"hnsw_query_ms": round(1e3 * float(np.median(dense_t)), 3),
                               "numpy_exact_query_ms": round(1e3 * float(np.median(exact_t)), 3),
                               "hnsw_recall_of_exact_top20": round(float(overlap), 4)}  # fmt: skip

    # bm25s vs rank-bm25 on the same terms
    import bm25s
    from rank_bm25 import BM25Okapi

    corpus = [terms(f"{p['title']}\n{p['heading']}\n{p['text']}") for p in index.passages]
    t = time.perf_counter()
    ours = bm25s.BM25()
    ours.index(corpus, show_progress=False)
    bm25s_index_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = BM25Okapi(corpus)
    rank_index_s = time.perf_counter() - t
    rank_ranked, rank_t = [], []
    for q in qa:
        t = time.perf_counter()
        scores = theirs.get_scores(terms(q["question"]))
        rank_ranked.append([int(i) for i in np.argsort(-scores, kind="stable")[:depth]])
        rank_t.append(time.perf_counter() - t)
    results["bm25_speed"] = {
        "bm25s_index_ms": round(1e3 * bm25s_index_s, 2), "rank_bm25_index_ms": round(1e3 * rank_index_s, 2),
        "bm25s_query_ms": round(1e3 * float(np.median(bm25_t)), 3),
        "rank_bm25_query_ms": round(1e3 * float(np.median(rank_t)), 3),
        "bm25s_recall@5": fmt_rate(*recall(ranked["bm25"], gold, 5)),
        "rank_bm25_recall@5": fmt_rate(*recall(rank_ranked, gold, 5)),
    }  # fmt: skip
    print(json.dumps({k: results[k] for k in ("retrieval", "dense_search", "bm25_speed")}, indent=1), flush=True)

    if not args.skip_answers:
        from lmforge.rag.cli import Answerer

        with_rag = Answerer(args.model, index, args.k, args.answer_mode, "cpu", args.max_new_tokens)
        without = Answerer.__new__(Answerer)
        without.__dict__.update(with_rag.__dict__)
        without.index = None
        rows = []
        t = time.perf_counter()
        for q in qa:
            # an accepted answer as a whole token of the reply ("8" counts in "8 spaces", not in "18")
            accepted = [re.compile(rf"(?<!\w){re.escape(a)}(?!\w)", re.IGNORECASE) for a in q["answers"]]
            row = {"id": q["id"]}
            for name, answerer in (("rag", with_rag), ("closed_book", without)):
                out = answerer.answer(q["question"])
                row[name] = out["answer"]
                row[name + "_ok"] = any(a.search(out["answer"]) for a in accepted)
                if name == "rag":
                    row["cited"] = [h.rank for h in out["cited"]]
                    row["retrieved_evidence"] = any(q["evidence"] in h.text for h in out["sources"])
            rows.append(row)
            print(f"{q['id']}: rag={row['rag_ok']} closed={row['closed_book_ok']}", flush=True)
        n = len(rows)
        rag_ok = sum(r["rag_ok"] for r in rows)
        closed_ok = sum(r["closed_book_ok"] for r in rows)
        fixed = sum(r["rag_ok"] and not r["closed_book_ok"] for r in rows)
        broken = sum(r["closed_book_ok"] and not r["rag_ok"] for r in rows)
        results["answers"] = {
            "k": args.k, "mode": args.answer_mode, "max_new_tokens": args.max_new_tokens,
            "with_retrieval": fmt_rate(rag_ok, n), "closed_book": fmt_rate(closed_ok, n),
            "fixed_by_retrieval": fixed, "broken_by_retrieval": broken,
            "mcnemar_p": round(mcnemar_exact(fixed, broken), 6),
            "evidence_in_prompt": sum(r["retrieved_evidence"] for r in rows),
            "answers_citing_a_source": sum(bool(r["cited"]) for r in rows),
            "wall_s": round(time.perf_counter() - t, 1),
            "rows": rows,
        }  # fmt: skip
        print(json.dumps({k: v for k, v in results["answers"].items() if k != "rows"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
