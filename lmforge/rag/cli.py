"""`lmforge rag`: index documents, search them, answer questions from them with cited sources.

    lmforge rag index docs/ notes.md --out runs/idx                       # BM25 only
    lmforge rag index docs/ --out runs/idx --embed-model models/smollm2   # + dense vectors, hybrid search
    lmforge rag index more-docs/ --out runs/idx                           # update: only new/changed docs embedded
    lmforge rag search runs/idx "how does the with statement work" --k 5 --mode bm25
    lmforge rag ask runs/idx --model models/smollm2 "What does __exit__ return to suppress an exception?"
    lmforge rag ask runs/idx --model models/smollm2 --k 0 "..."          # the same question without retrieval

`index` splits each document into passages (headings, paragraphs, --max-words with --overlap),
indexes them with BM25 and, with --embed-model, mean-pooled vectors in an HNSW graph; what could
not be read is skipped and counted (index.json's report). `search` prints the ranked passages
(or JSON with --json). `ask` retrieves the top --k passages, puts them into the model's chat
prompt numbered [1]..[k], generates an answer (greedy by default) and lists the sources, marking
those the answer cites. `lmforge chat MODEL --rag IDX` and `lmforge serve MODEL --rag IDX` do
the same for every user turn. A question that does not fit the model's context exits 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from lmforge.cli_config import add_config_command
from lmforge.config import require


@dataclass(frozen=True)
class RagIndexConfig:
    """`lmforge rag index`: build or update a retrieval index."""

    # files or folders: .txt/.md/.rst (one document each) and every format lmforge reads (JSONL, HTML, ...)
    input: list[str] = field(default_factory=list, metadata={"metavar": "FILE_OR_DIR"})
    out: str = ""  # the index folder (created, or updated when it exists)
    max_words: int = 128  # passage budget in words (a CJK character counts as one)
    overlap: int = 16  # words of whole sentences or paragraphs that consecutive passages share
    embed_model: str = ""  # a run or model folder whose mean-pooled hidden states give dense vectors ("" = BM25 only)
    prune: bool = False  # drop documents that are in the index but not among the inputs
    device: str = "cpu"  # where the embedding model runs

    def validate(self) -> RagIndexConfig:
        require([(bool(self.input), "needs documents: lmforge rag index FILE_OR_DIR... --out INDEX"),
                 (bool(self.out), "needs --out (the index folder)"),
                 (self.max_words >= 8, "max_words must be at least 8"),
                 (0 <= self.overlap < self.max_words // 2, "overlap must be in [0, max_words / 2)")])  # fmt: skip
        return self


@dataclass(frozen=True)
class RagSearchConfig:
    """`lmforge rag search`: the top passages for a query."""

    index: str = ""  # the index folder
    query: str = ""  # what to search for
    k: int = 5  # passages to return
    mode: str = "auto"  # auto (hybrid with vectors, else bm25), bm25, dense or hybrid (reciprocal rank fusion)
    json: bool = False  # print JSON instead of text

    def validate(self) -> RagSearchConfig:
        require([(bool(self.index), "needs the index: lmforge rag search INDEX QUERY"),
                 (bool(self.query.strip()), "needs a query"), (self.k >= 1, "k must be at least 1")])  # fmt: skip
        return self


@dataclass(frozen=True)
class RagAskConfig:
    """`lmforge rag ask`: answer a question from the index's passages."""

    index: str = ""  # the index folder
    question: str = ""  # the question
    model: str = ""  # the chat model that answers (a run, checkpoint or imported folder)
    k: int = 4  # passages put into the prompt (0 = answer without retrieval, for comparison)
    mode: str = "auto"  # search mode (see lmforge rag search)
    max_new_tokens: int = 128  # most tokens in the answer
    temperature: float = 0.0  # 0 = greedy
    system: str = ""  # an optional system prompt
    json: bool = False  # print JSON (answer, sources, cited) instead of text
    device: str = "auto"

    def validate(self) -> RagAskConfig:
        require([(bool(self.index), "needs the index: lmforge rag ask INDEX --model MODEL QUESTION"),
                 (bool(self.model), "needs --model (the chat model that answers)"),
                 (bool(self.question.strip()), "needs a question"), (self.k >= 0, "k must be >= 0"),
                 (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
                 (self.temperature >= 0, "temperature must be >= 0")])  # fmt: skip
        return self


def register(subparsers) -> None:
    help_ = "retrieval-augmented generation: index documents, search them, answer with sources"
    parser = subparsers.add_parser("rag", help=help_)
    sub = parser.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    add_config_command(sub, "index", "split documents into passages and index them (BM25, optional dense vectors)",
                       RagIndexConfig, index, description=__doc__, positional=("input",))  # fmt: skip
    add_config_command(sub, "search", "the top passages for a query", RagSearchConfig, search, description=__doc__,
                       positional=("index", "query"))  # fmt: skip
    add_config_command(sub, "ask", "answer a question from the index, citing its sources", RagAskConfig, ask,
                       description=__doc__, positional=("index", "question"))  # fmt: skip


def index(cfg: RagIndexConfig) -> dict:
    from lmforge.rag.index import build_index, describe

    report = build_index(cfg.input, cfg.out, max_words=cfg.max_words, overlap=cfg.overlap,
                         embed_model=cfg.embed_model or None, prune=cfg.prune, device=cfg.device)  # fmt: skip
    print(f"lmforge rag index: {cfg.out}: {describe(report)}", file=sys.stderr)
    for example in report["skipped_examples"][:5]:
        print(f"  skipped {example}", file=sys.stderr)
    return report


def _hit_dict(h) -> dict:
    return {"rank": h.rank, "score": round(h.score, 6), "source": h.source, "heading": h.heading, "text": h.text}


def search(cfg: RagSearchConfig) -> list:
    from lmforge.rag.index import RagIndex

    hits = RagIndex.load(cfg.index).search(cfg.query, cfg.k, cfg.mode)
    if cfg.json:
        print(json.dumps([_hit_dict(h) for h in hits], ensure_ascii=False, indent=1))
    else:
        for h in hits:
            heading = f" ({h.heading})" if h.heading else ""
            print(f"[{h.rank}] {h.source}{heading}  score {h.score:.4f}\n{h.text.strip()}\n")
        if not hits:
            print("(no passage matches)", file=sys.stderr)
    return hits


class Answerer:
    """A chat model answering from an index: `answer(question)` -> {"answer", "sources", "cited"}."""

    def __init__(self, model_path: str, index=None, k: int = 4, mode: str = "auto", device: str = "auto",
                 max_new_tokens: int = 128, system: str = "", temperature: float = 0.0):  # fmt: skip
        from lmforge.chat.template import ChatFormat
        from lmforge.train.checkpoint import load_for_inference
        from lmforge.train.common import pick_device

        self.model, tok_dir, _ = load_for_inference(model_path, device=pick_device(device))
        self.fmt = ChatFormat(tok_dir)
        self.index, self.k, self.mode, self.system = index, k, mode, system
        self.max_new, self.temperature = max_new_tokens, temperature
        if self.max_new >= self.model.cfg.max_seq_len:
            from lmforge.errors import LmforgeError

            raise LmforgeError(f"max_new_tokens ({self.max_new}) must be below the model's context "
                               f"({self.model.cfg.max_seq_len})")  # fmt: skip

    def answer(self, question: str) -> dict:
        from lmforge.rag.prompt import cited, fit_sources
        from lmforge.serve.generate import generate

        hits = self.index.search(question, self.k, self.mode) if self.index is not None and self.k else []
        history = [{"role": "system", "content": self.system}] if self.system else []
        messages, used = fit_sources(self.fmt, history, question, hits, self.model.cfg.max_seq_len - self.max_new)
        prompt = self.fmt.encode(messages, add_generation_prompt=True)
        out = generate(self.model, [prompt], self.max_new, stop_ids=self.fmt.stop_ids, temperature=self.temperature)
        text = self.fmt.tokenizer.decode(out[0]).strip()
        return {"answer": text, "sources": used, "cited": cited(text, used), "dropped": len(hits) - len(used)}


def ask(cfg: RagAskConfig) -> dict:
    from lmforge.rag.index import RagIndex

    idx = RagIndex.load(cfg.index)
    answerer = Answerer(cfg.model, idx, cfg.k, cfg.mode, cfg.device, cfg.max_new_tokens, cfg.system, cfg.temperature)
    result = answerer.answer(cfg.question)
    if result["dropped"]:
        print(f"lmforge rag ask: {result['dropped']} passage(s) left out to fit the context", file=sys.stderr)
    if cfg.json:
        print(json.dumps({"answer": result["answer"], "sources": [_hit_dict(h) for h in result["sources"]],
                          "cited": [h.rank for h in result["cited"]]}, ensure_ascii=False, indent=1))  # fmt: skip
        return result
    print(result["answer"])
    if result["sources"]:
        print("\nSources:")
        for i, h in enumerate(result["sources"], start=1):
            mark = "*" if h in result["cited"] else " "
            heading = f" ({h.heading})" if h.heading else ""
            print(f"{mark}[{i}] {h.source}{heading}")
    return result
