"""The encoder family on one CPU budget: BERT with NSP vs SOP, ALBERT vs BERT, and a real labelled task.

    python benchmarks/encoders.py --out /tmp/encoders [--steps 600] [--json benchmarks/results/encoders.json]

Corpus: Shakespeare (English) and the People's Daily 1998 (Chinese), cut into ~2 KB documents, 3 MB of each,
shuffled together (so every stretch of the token stream mixes both languages). One WordPiece tokenizer (vocab
8000) for the encoders, one byte-level BPE (vocab 8000) for the decoder; 5% of documents held out.

Pretraining, every run `--steps` steps of 32 x 128 tokens, lr 1e-3 (AdamW, 60 warmup steps, cosine), seed 1337:
- bert-nsp: bert-mini's shape (L=4, H=256, A=4) with BERT's next-sentence head;
- bert-sop: the same with ALBERT's sentence-order head;
- albert-sop: ALBERT at the same H and L (E=128, one shared block) with SOP;
- decoder: lmforge's `tiny` decoder (L=4, d=256, SwiGLU; about the encoders' parameters), next-token loss.
Each encoder's sentence head is scored on held-out pairs of both tasks (the ALBERT paper's Table 5 question:
does a model trained on one task solve the other?), with 95% Wilson intervals.

Fine-tuning (`lmforge finetune-cls`): chatterbot-corpus questions labelled with their topic file (English 21
topics, Chinese 17; duplicate questions removed; 20% of each topic held out), 300 steps of 32 at lr 2e-4 for
each pretrained model and for bert-mini from random weights (`--from-scratch`). Accuracy with its 95% interval.
Fixed step counts: the figures do not depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

CHATTERBOT = (("english", "en"), ("chinese", "zh"))


def _corpus(out: Path, per_language: int = 3_000_000, doc_chars: int = 2000) -> Path:
    from lmforge.data.corpora import corpus_files, shakespeare_files

    path = out / "corpus.jsonl"
    if path.is_file():
        return path
    en = "".join(p.read_text(encoding="utf-8") for p in shakespeare_files())[:per_language]
    zh_file = corpus_files(["people-daily-1998"], into=out / "raw")[0]
    zh = zh_file.read_text(encoding="utf-8")[: per_language // 3]  # ~3 bytes a character
    docs = [en[i : i + doc_chars] for i in range(0, len(en), doc_chars)]
    docs += [zh[i : i + doc_chars // 3] for i in range(0, len(zh), doc_chars // 3)]
    random.Random(0).shuffle(docs)
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _topics(out: Path, language: str) -> Path:
    """chatterbot-corpus questions labelled with their topic (file name), duplicates dropped."""
    import yaml

    from lmforge.data.corpora import _package

    path = out / f"topics-{dict(CHATTERBOT)[language]}.jsonl"
    seen, rows = set(), []
    for f in sorted((_package("chatterbot_corpus", "chatterbot-corpus") / "data" / language).glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            q = str(conv[0]).strip()
            if q and q not in seen:
                seen.add(q)
                rows.append({"text": q, "topic": f.stem})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _sentence_accuracy(run: Path, shards: Path, task: str, batches: int = 40) -> dict:
    """The run's sentence head on `batches` x 32 held-out pairs built for `task` (label 1: B is not A's
    continuation in place: random for NSP, swapped for SOP)."""
    import torch

    from lmforge.data.loader import TokenLoader
    from lmforge.eval.stats import wilson_interval
    from lmforge.tokenizer.special import load_tokenizer
    from lmforge.train.checkpoint import load_model
    from lmforge.train.mlm import MlmBatches, MlmVocab

    model, _, _ = load_model(run, encoder_ok=True)
    model.eval()
    vocab = MlmVocab(load_tokenizer(run / "tokenizer"), run)
    loader = TokenLoader(shards, "val", 32, 125, device="cpu")
    source = MlmBatches(loader, vocab, masking="static", sentence_task=task, seed=7)
    right = n = 0
    with torch.no_grad():
        for _ in range(batches):
            b = source.next_batch()
            logits, _ = model(b["idx"], token_types=b["token_types"], head="cls")
            right += int((logits.argmax(-1) == b["labels"]).sum())
            n += len(b["labels"])
    lo, hi = wilson_interval(right, n)
    return {"accuracy": round(right / n, 4), "lo": round(lo, 4), "hi": round(hi, 4), "pairs": n}


def main() -> int:
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.classify import ClassifyConfig, finetune_cls
    from lmforge.train.pretrain import pretrain, resolve_train_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--cls-steps", type=int, default=300)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(a.out)
    data = {}
    for kind in ("wordpiece", "bpe"):
        tok, shards = a.out / f"tok-{kind}", a.out / f"shards-{kind}"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer([corpus], 8000, tok, model=kind)
        if not (shards / "index.json").is_file():
            tokenize_corpus([corpus], tok, shards, val_fraction=0.05, progress=False)
        data[kind] = shards
    common = {"batch_size": 32, "seq_len": 128, "max_steps": a.steps, "lr": 1e-3, "warmup_steps": 60,
              "eval_every": max(1, a.steps // 4), "eval_batches": 10, "ckpt_every": 0}  # fmt: skip
    runs = {
        "bert-nsp": ({"preset": "bert-mini", "sentence_task": "nsp"}, "wordpiece"),
        "bert-sop": ({"preset": "bert-mini", "sentence_task": "sop"}, "wordpiece"),
        "albert-sop": (
            {"preset": "bert-mini", "sentence_task": "sop", "model": {"embedding_size": 128, "share_layers": True}},
            "wordpiece",
        ),
        "decoder": ({"preset": "tiny"}, "bpe"),
    }
    result = {"steps": a.steps, "tokens_per_run": a.steps * 32 * 128, "pretrain": {}, "sentence": {}, "topics": {}}
    for name, (recipe, kind) in runs.items():
        run = a.out / name
        last = pretrain(resolve_train_config({**common, **recipe}, {"data": str(data[kind]), "out": str(run)}, {}))
        records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        val = [r for r in records if "val_loss" in r]
        from lmforge.train.checkpoint import load_model

        params = sum(p.numel() for p in load_model(run, encoder_ok=True)[0].parameters())
        result["pretrain"][name] = {"params": params, "last_loss": last.get("loss"), "val": val[-1],
                                    "val_curve": [(r["step"], round(r["val_loss"], 4)) for r in val]}  # fmt: skip
        print(f"{name}: {params / 1e6:.2f}M params, final val {val[-1]}", file=sys.stderr)
    for name in ("bert-nsp", "bert-sop", "albert-sop"):
        result["sentence"][name] = {t: _sentence_accuracy(a.out / name, data["wordpiece"], t) for t in ("nsp", "sop")}
    for language, lang in CHATTERBOT:
        topics = _topics(a.out, language)
        for name, base, scratch in (("bert-sop", "bert-sop", False), ("bert-sop from scratch", "bert-sop", True),
                                    ("albert-sop", "albert-sop", False), ("decoder", "decoder", False)):  # fmt: skip
            out = a.out / f"cls-{lang}-{name.replace(' ', '-')}"
            cfg = ClassifyConfig(base=str(a.out / base), data=[str(topics)], label_field="topic", out=str(out),
                                 max_steps=a.cls_steps, lr=2e-4, warmup_steps=30, val_fraction=0.2, eval_every=0,
                                 from_scratch=scratch, seq_len=64).validate()  # fmt: skip
            ev = finetune_cls(cfg)["eval"]
            result["topics"].setdefault(lang, {})[name] = {k: round(v, 4) if isinstance(v, float) else v
                                                           for k, v in ev.items() if k != "per_class"}  # fmt: skip
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
