"""The quality classifier (`lmforge data train-quality`) on a real-text task: train time, scoring speed, accuracy.

    python benchmarks/quality_model.py                       # all 42 plays, word 1- and 2-grams
    python benchmarks/quality_model.py --plays 3 --ngrams 1  # unigrams cannot see word order: compare

The task (`shakespeare_task`, also used by tests/test_data_quality.py): Shakespeare's plays (the
`shakespeare` package) cut into documents of `lines` non-blank lines. Even-numbered documents are
`good` as they are. Odd-numbered ones become `bad`, alternately:
  - "shuffled": the same kind of Shakespeare text with its words permuted across the document (the line
    lengths kept), i.e. word salad with exactly the vocabulary and word frequencies of real text; only
    word order (bigrams) tells it apart;
  - "spam": generated web junk, lines from boilerplate/spam templates (navigation bars, cookie notices,
    "buy now" offers, hashtags) whose slots are filled with words drawn from that same Shakespeare
    document, so the vocabulary overlaps with the good side.
The held-out split (10%) is a seeded shuffle of each class; the good and bad documents come from
disjoint stretches of text. Scoring speed is over the held-out documents in this process (one
core), featurization included, from a cold word-hash cache: batched (`predict_proba`) and one document
at a time (`score`, what the `quality_model` cleaning step calls).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SPAM = [
    "Home | About | {w} | Contact | Login",
    "Best {w} deals of 2024! Buy {w} online now, free shipping on all {w} orders!!!",
    "This site uses cookies to improve your {w} experience. Accept all cookies.",
    "Click here to subscribe to our {w} newsletter and win a free {w}!",
    "#{w} #{w} #{w} #sale #deal #follow",
    "Cheap {w} {w} for sale - only $19.99 - limited offer, order today",
    "Copyright 2024 {w} Inc. All rights reserved. Privacy policy | Terms of use",
    "Top 10 {w} tips you won't believe! Read more >>",
    "Related: {w} | {w} | {w} | {w}",
    "Share on Facebook | Tweet | Pin it | Email this {w}",
]


def _fill(template: str, vocab: list[str], rng: np.random.Generator) -> str:
    out = template
    while "{w}" in out:
        out = out.replace("{w}", vocab[rng.integers(len(vocab))].strip(".,;:!?'\"[]()").lower() or "deal", 1)
    return out


def shakespeare_task(
    plays: int | None = None, lines: int = 12, seed: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """(good texts, bad texts, kind of each bad text: "shuffled" or "spam"); see the module docstring."""
    from lmforge.run import shakespeare_files

    rng = np.random.default_rng(seed)
    good, bad, kinds = [], [], []
    for path in shakespeare_files()[:plays]:
        text_lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i in range(0, len(text_lines) - lines + 1, lines):
            chunk = text_lines[i : i + lines]
            if (i // lines) % 2 == 0:
                good.append("\n".join(chunk))
                continue
            ws = [ln.split() for ln in chunk]
            flat = [w for line in ws for w in line]
            if len(bad) % 2 == 0:
                perm = list(rng.permutation(len(flat)))
                out, pos = [], 0
                for line in ws:
                    out.append(" ".join(flat[j] for j in perm[pos : pos + len(line)]))
                    pos += len(line)
                bad.append("\n".join(out))
                kinds.append("shuffled")
            else:
                bad.append("\n".join(_fill(SPAM[rng.integers(len(SPAM))], flat, rng) for _ in range(lines)))
                kinds.append("spam")
    return good, bad, kinds


def main() -> None:
    from lmforge.data import quality

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plays", type=int, default=None, help="first N plays (default all 42)")
    ap.add_argument("--lines", type=int, default=12, help="non-blank lines per document")
    ap.add_argument("--ngrams", default="1,2")
    ap.add_argument("--epochs", type=int, default=quality.TrainConfig.epochs)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    good, bad, kinds = shakespeare_task(args.plays, args.lines)
    texts, labels = good + bad, np.array([1] * len(good) + [0] * len(bad))
    fcfg = quality.FeatureConfig(ngrams=tuple(int(n) for n in args.ngrams.split(",")))
    tcfg = quality.TrainConfig(epochs=args.epochs)
    t0 = time.perf_counter()
    feats = [quality.featurize(t, fcfg) for t in texts]
    t_feat = time.perf_counter() - t0
    tr, va = quality.split(labels, 0.1, tcfg.seed)
    t0 = time.perf_counter()
    w, b, history = quality.train(quality.stack([feats[i] for i in tr]), labels[tr], fcfg.buckets, tcfg)
    t_train = time.perf_counter() - t0
    model = quality.QualityModel(w, b, fcfg)
    quality._word_hash.cache_clear()  # time scoring from a cold word-hash cache, as a fresh process would
    val_texts = [texts[i] for i in va]
    t0 = time.perf_counter()
    p = quality.predict_proba(model, val_texts)
    t_score = time.perf_counter() - t0
    quality._word_hash.cache_clear()
    t0 = time.perf_counter()
    for t in val_texts:  # one document at a time, as the `quality_model` cleaning step scores
        quality.score(model, t)
    t_step = time.perf_counter() - t0
    m = quality.metrics(labels[va], p)
    bad_kind = np.array([""] * len(good) + kinds)[va]
    per_kind = {k: round(float((p[bad_kind == k] < 0.5).mean()), 4) for k in ("shuffled", "spam")}
    mb = sum(len(t.encode()) for t in texts) / 1e6
    result = {
        "docs": {"good": len(good), "bad": len(bad), "train": len(tr), "held_out": len(va), "mb": round(mb, 2)},
        "ngrams": list(fcfg.ngrams),
        "buckets": fcfg.buckets,
        "epochs": tcfg.epochs,
        "featurize_s": round(t_feat, 3),
        "train_s": round(t_train, 3),
        "train_loss": history,
        "score_docs_per_s": round(len(val_texts) / t_score, 1),
        "score_one_by_one_docs_per_s": round(len(val_texts) / t_step, 1),
        "held_out": m,
        "held_out_bad_caught": per_kind,
    }
    print(
        f"{len(texts):,} docs ({mb:.1f} MB; {len(good):,} good, {len(bad):,} bad), n-grams {args.ngrams}:"
        f" featurize {t_feat:.2f}s, train {tcfg.epochs} epochs {t_train:.2f}s,"
        f" score {result['score_docs_per_s']:,.0f} docs/s batched,"
        f" {result['score_one_by_one_docs_per_s']:,.0f} docs/s one by one\n"
        f"held out ({len(va)}): accuracy {m['accuracy']:.4f}  precision {m['precision']:.4f}"
        f"  recall {m['recall']:.4f}  F1 {m['f1']:.4f}  AUC {m['auc']:.4f};"
        f" bad caught: shuffled {per_kind['shuffled']:.3f}, spam {per_kind['spam']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
