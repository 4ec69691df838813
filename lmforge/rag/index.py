"""The retrieval index: passages, BM25 (bm25s), optional dense vectors (hnswlib), hybrid ranking by RRF.

    from lmforge.rag.index import build_index, RagIndex
    report = build_index(["docs/"], "runs/idx", embed_model="models/smollm2")   # or update an existing one
    index = RagIndex.load("runs/idx")
    for hit in index.search("what does __exit__ return", k=5):                  # mode: auto|bm25|dense|hybrid
        hit.source, hit.heading, hit.text

Folder layout (every file rewritten together: the folder is built next to the old one and swapped
in, so a killed run leaves the previous index whole):
- `index.json`: format, split settings, the dense model (path and weights fingerprint), one entry
  per document (its content hash, display name, passage count), the last build's report;
- `passages.jsonl`: one passage per line, in index order (row i of BM25 and of the vectors);
- `bm25/`: bm25s's arrays and vocabulary (numpy, JSON; nothing pickled);
- `vectors.npy` (N, d) float32 unit rows and `vectors.hnsw` (hnswlib's graph, inner product).

Incremental: rerunning `build_index` on an existing index reads the inputs again; a document whose
text hash is unchanged keeps its passages and vectors (the model is not run on it again), a changed
one is re-split and re-embedded, a new one is added, and documents not among the inputs stay
(`prune=True` drops them). BM25 statistics and the HNSW graph are rebuilt from all passages
(seconds for ~100k passages; the model forward, the slow part, is what is saved).

Inputs: `.txt`, `.md`, `.markdown`, `.rst` are one document per file (headings split them into
passages, see passages.py); every format lmforge's readers take (JSONL/JSON/Parquet records with a
`text` field, HTML pages with their main text extracted, WARC) gives one document per record.
An empty, binary (NUL bytes), non-UTF-8 or unreadable input is skipped and counted by reason in
the report, never silently dropped; an index with no passages at all is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.rag.passages import split_passages
from lmforge.rag.terms import terms

FORMAT = 1
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
MAX_TEXT_BYTES = 64 << 20
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)
MODES = ("auto", "bm25", "dense", "hybrid")


@dataclass
class Hit:
    rank: int
    score: float
    row: int
    source: str  # FILE:LINE (or the record's source) where the passage starts
    heading: str
    text: str


@dataclass
class _Doc:
    key: str  # what identifies it across builds: the resolved file (plus the record id)
    display: str  # what citations show
    title: str
    text: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _walk(paths) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise LmforgeError(f"{p}: no such file or folder")
        if p.is_dir():
            files += sorted(f for f in p.rglob("*")
                            if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts))  # fmt: skip
        else:
            files.append(p)
    return files


def read_sources(paths, skipped: Counter, examples: list[str]):
    """Every document under `paths` as a _Doc; what cannot be indexed is counted in `skipped` by reason."""
    from lmforge.data.readers import SUFFIXES, extracted_page, kind_of, read_file

    def skip(where, why):
        skipped[why] += 1
        if len(examples) < 20:
            examples.append(f"{where}: {why}")

    for f in _walk(paths):
        name = f.name.lower()
        if name.endswith(TEXT_SUFFIXES):
            if f.stat().st_size > MAX_TEXT_BYTES:
                skip(f, f"larger than {MAX_TEXT_BYTES >> 20} MiB")
                continue
            raw = f.read_bytes()
            if b"\x00" in raw:
                skip(f, "binary (NUL bytes)")
                continue
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                skip(f, "not UTF-8")
                continue
            if not text.strip():
                skip(f, "empty")
                continue
            yield _Doc(str(f.resolve()), str(f), f.stem, text)
            continue
        if kind_of(f) is None:
            skip(f, f"unsupported file type (expected {', '.join(TEXT_SUFFIXES + SUFFIXES)})")
            continue
        bad = []
        for doc in read_file(f, bad):
            if "html" in doc.metadata:
                doc = extracted_page(doc)
            if not doc.text.strip():
                skip(doc.source or f, "empty")
                continue
            title = str(doc.metadata.get("title") or f.stem)
            yield _Doc(f"{f.resolve()}::{doc.id}", doc.source or str(f), title, doc.text)
        for u in bad:
            skip(f"{u.file}:{u.line}" if u.line else u.file, u.reason or u.why)


def _passage_rows(doc: _Doc, max_words: int, overlap: int) -> list[dict]:
    line_based = "::" not in doc.key  # a whole file: cite FILE:LINE; a record: its own source
    rows = []
    for p in split_passages(doc.text, max_words, overlap):
        source = f"{doc.display}:{p.line}" if line_based else doc.display
        rows.append({"doc": doc.key, "source": source, "title": doc.title, "heading": p.heading, "text": p.text})
    return rows


def _index_text(row: dict) -> str:
    return f"{row['title']}\n{row['heading']}\n{row['text']}"


def build_index(inputs, out, *, max_words: int = 128, overlap: int = 16, embed_model: str | None = None,
                prune: bool = False, device: str = "cpu", progress: bool = True) -> dict:  # fmt: skip
    """Build `out` from `inputs`, or update it (see the module docstring); returns the build report."""
    out = Path(out)
    old = RagIndex.load(out) if (out / "index.json").exists() else None
    if old is not None:
        split = old.meta["split"]
        if split != {"max_words": max_words, "overlap": overlap}:
            raise LmforgeError(f"{out}: built with max_words={split['max_words']} overlap={split['overlap']}; "
                               "update it with the same settings, or write a new --out")  # fmt: skip
        old_model = (old.meta.get("dense") or {}).get("model")
        if embed_model is None and old_model:
            embed_model = old_model  # an update keeps the index's embedding model
        elif old_model != (str(Path(embed_model).resolve()) if embed_model else None):
            raise LmforgeError(f"{out}: built with embedding model {old_model}; update it with the same "
                               "--embed-model, or write a new --out")  # fmt: skip
    embedder = None
    if embed_model:
        from lmforge.rag.embed import Embedder

        embedder = Embedder(embed_model, device=device)
        if old is not None and old.meta["dense"]["fingerprint"] != embedder.fingerprint:
            raise LmforgeError(f"{out}: the weights of {embed_model} changed since the index was built; "
                               "rebuild it in a new --out")  # fmt: skip

    skipped, examples = Counter(), []
    old_docs = old.meta["docs"] if old else {}
    by_doc: dict[str, list[int]] = {}
    if old is not None:
        for i, row in enumerate(old.passages):
            by_doc.setdefault(row["doc"], []).append(i)
    docs, rows, vectors_from = {}, [], []  # vectors_from: per row, the old row index or -1 (to embed)
    counts = Counter()
    seen = set()
    for doc in read_sources(inputs, skipped, examples):
        if doc.key in seen:
            skipped["read twice (listed twice in the inputs)"] += 1
            continue
        seen.add(doc.key)
        sha = _sha(doc.text)
        if doc.key in old_docs and old_docs[doc.key]["sha"] == sha:
            counts["unchanged"] += 1
            for i in by_doc.get(doc.key, []):
                rows.append(old.passages[i])
                vectors_from.append(i)
        else:
            counts["changed" if doc.key in old_docs else "new"] += 1
            new_rows = _passage_rows(doc, max_words, overlap)
            rows += new_rows
            vectors_from += [-1] * len(new_rows)
        docs[doc.key] = {"sha": sha, "display": doc.display}
    for key, info in old_docs.items():
        if key in docs:
            continue
        if prune:
            counts["pruned"] += 1
            continue
        counts["kept (not among the inputs)"] += 1
        docs[key] = info
        for i in by_doc.get(key, []):
            rows.append(old.passages[i])
            vectors_from.append(i)
    if not rows:
        detail = "; ".join(f"{n} {why}" for why, n in skipped.most_common()) or "no inputs"
        raise LmforgeError(f"nothing to index: no passages in {', '.join(map(str, inputs))} ({detail})")
    for info in docs.values():
        info["passages"] = 0
    for row in rows:
        docs[row["doc"]]["passages"] += 1

    vectors = None
    to_embed = [i for i, src in enumerate(vectors_from) if src < 0]
    if embedder is not None:
        vectors = np.zeros((len(rows), embedder.dim), dtype=np.float32)
        for i, src in enumerate(vectors_from):
            if src >= 0:
                vectors[i] = old.vectors[src]
        new_vecs = _embed_all(embedder, [_index_text(rows[i]) for i in to_embed], progress)
        if to_embed:
            vectors[to_embed] = new_vecs

    report = {
        "documents": dict(counts),
        "passages": len(rows),
        "passages_embedded": len(to_embed) if embedder else 0,
        "skipped": dict(skipped),
        "skipped_examples": examples,
    }
    meta = {
        "format": FORMAT,
        "split": {"max_words": max_words, "overlap": overlap},
        "dense": None if embedder is None else {
            "model": str(Path(embed_model).resolve()), "fingerprint": embedder.fingerprint, "dim": embedder.dim,
            "max_tokens": embedder.max_tokens,
        },
        "docs": docs,
        "report": report,
    }  # fmt: skip
    _write(out, meta, rows, vectors)
    return report


def _embed_all(embedder, texts: list[str], progress: bool) -> np.ndarray:
    from tqdm import tqdm

    chunk = 256
    parts = []
    with tqdm(
        total=len(texts), desc="embed passages", unit="passage", disable=not progress or len(texts) < chunk
    ) as bar:
        for i in range(0, len(texts), chunk):
            parts.append(embedder(texts[i : i + chunk]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def _write(out: Path, meta: dict, rows: list[dict], vectors: np.ndarray | None) -> None:
    import bm25s

    with atomic_dir(out) as tmp:
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        bm25 = bm25s.BM25()
        bm25.index([terms(_index_text(r)) for r in rows], show_progress=False)
        bm25.save(str(tmp / "bm25"), show_progress=False)
        if vectors is not None:
            np.save(tmp / "vectors.npy", vectors, allow_pickle=False)
            _hnsw(vectors).save_index(str(tmp / "vectors.hnsw"))
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _hnsw(vectors: np.ndarray, path: Path | None = None):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=vectors.shape[1])  # unit vectors: inner product = cosine
    if path is not None:
        index.load_index(str(path), max_elements=len(vectors))
    else:
        index.init_index(max_elements=len(vectors), ef_construction=200, M=16, random_seed=0)
        index.add_items(vectors, np.arange(len(vectors)), num_threads=1)  # one thread: the same graph every build
    return index


class RagIndex:
    """A built index folder, loaded for search (see the module docstring)."""

    def __init__(self, path: Path, meta: dict, passages: list[dict], vectors: np.ndarray | None):
        self.path, self.meta, self.passages, self.vectors = path, meta, passages, vectors
        self._bm25 = self._graph = self._embedder = None

    @classmethod
    def load(cls, path) -> RagIndex:
        path = Path(path)
        try:
            meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmforgeError(
                f"{path}: not a retrieval index (no index.json; build one with lmforge rag index)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{path}/index.json: unreadable ({e})") from None
        if meta.get("format") != FORMAT:
            raise LmforgeError(f"{path}: index format {meta.get('format')!r}, this lmforge reads {FORMAT}")
        with open(path / "passages.jsonl", encoding="utf-8") as f:
            passages = [json.loads(line) for line in f]
        vectors = None
        if meta.get("dense"):
            vectors = np.load(path / "vectors.npy", allow_pickle=False)
            if vectors.shape != (len(passages), meta["dense"]["dim"]):
                raise LmforgeError(f"{path}/vectors.npy: shape {vectors.shape} does not match "
                                   f"{len(passages)} passages of dim {meta['dense']['dim']}")  # fmt: skip
        return cls(path, meta, passages, vectors)

    @property
    def has_dense(self) -> bool:
        return self.vectors is not None

    def bm25(self):
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25.load(str(self.path / "bm25"), show_progress=False)
        return self._bm25

    def graph(self):
        if self._graph is None:
            self._graph = _hnsw(self.vectors, self.path / "vectors.hnsw")
        return self._graph

    def embedder(self, device: str = "cpu"):
        """The model that embedded the passages, checked to be the same weights."""
        if self._embedder is None:
            from lmforge.rag.embed import Embedder

            dense = self.meta["dense"]
            if not Path(dense["model"]).exists():
                raise LmforgeError(f"{self.path}: its embedding model {dense['model']} is gone; search with "
                                   "--mode bm25, or rebuild the index")  # fmt: skip
            emb = Embedder(dense["model"], device=device, max_tokens=dense["max_tokens"])
            if emb.fingerprint != dense["fingerprint"]:
                raise LmforgeError(f"{self.path}: the weights of {dense['model']} changed since the index was "
                                   "built; rebuild it, or search with --mode bm25")  # fmt: skip
            self._embedder = emb
        return self._embedder

    def rank_bm25(self, query: str, depth: int) -> list[tuple[int, float]]:
        q = terms(query)
        if not q:
            return []
        docs, scores = self.bm25().retrieve([q], k=min(depth, len(self.passages)), show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def rank_dense(self, query: str, depth: int, exact: bool = False) -> list[tuple[int, float]]:
        if not self.has_dense:
            raise LmforgeError(f"{self.path}: no dense vectors (build the index with --embed-model)")
        q = self.embedder()([query])
        depth = min(depth, len(self.passages))
        if exact:  # brute force over every vector (the benchmark's reference for HNSW)
            scores = self.vectors @ q[0]
            top = np.argsort(-scores, kind="stable")[:depth]
            return [(int(i), float(scores[i])) for i in top]
        graph = self.graph()
        graph.set_ef(max(64, 2 * depth))
        labels, dists = graph.knn_query(q, k=depth)
        return [(int(i), 1.0 - float(d)) for i, d in zip(labels[0], dists[0], strict=True)]

    def search(self, query: str, k: int = 5, mode: str = "auto") -> list[Hit]:
        """The top `k` passages for `query`; mode auto = hybrid when the index has vectors, else BM25."""
        if mode not in MODES:
            raise LmforgeError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k < 1:
            raise LmforgeError(f"k must be at least 1, got {k}")
        if mode == "auto":
            mode = "hybrid" if self.has_dense else "bm25"
        depth = max(4 * k, 50)
        if mode == "bm25":
            ranked = self.rank_bm25(query, k)
        elif mode == "dense":
            ranked = self.rank_dense(query, k)
        else:
            ranked = rrf([self.rank_bm25(query, depth), self.rank_dense(query, depth)])[:k]
        hits = []
        for rank, (row, score) in enumerate(ranked[:k], start=1):
            p = self.passages[row]
            hits.append(Hit(rank, score, row, p["source"], p["heading"], p["text"]))
        return hits


def rrf(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (k + rank of d); ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (row, _) in enumerate(ranking, start=1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda x: -x[1])


def describe(report: dict) -> str:
    """One line for the build report."""
    docs = ", ".join(f"{n} {what}" for what, n in report["documents"].items()) or "no documents"
    skipped = sum(report["skipped"].values())
    line = f"{report['passages']} passages ({docs}; {report['passages_embedded']} passages embedded)"
    if skipped:
        line += f"; skipped {skipped}: " + ", ".join(f"{n} {why}" for why, n in report["skipped"].items())
    return line
