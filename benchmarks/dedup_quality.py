"""Near-duplicate recall/precision of `minhash_dedup` on planted edits of real documents, and the throughput,
peak memory and sanity of `exact_dedup` and `minhash_dedup` on 100k documents.

    apt-get download debian-reference-zh-cn && dpkg-deb -x debian-reference-zh-cn_*.deb /tmp/debref
    python benchmarks/dedup_quality.py --zh-html /tmp/debref/usr/share/debian-reference
    python benchmarks/dedup_quality.py --zh-html ... --cli            # + `lmforge data clean` end to end, 2 workers
    python benchmarks/dedup_quality.py --scale-docs 20000 --json     # a quicker throughput part

Quality. The distinct documents are the corpus of benchmarks/clean_vs_datatrove.py (Shakespeare, Python's
documentation topics, the Chinese Debian Reference and chatterbot Q/A: real text). `--planted` of them, drawn
at random, get one edited copy each, the edit kinds taken in turn (`EDITS`): one line replaced by a line of
another document, one line deleted, one line inserted, 2% of the words (CJK: characters) replaced, a header
and a footer line added, the text rewrapped and upper-cased, the last 10% of the lines cut, two lines swapped.
`--hard-negatives` more documents are half of one document and half of another (true Jaccard ~1/3 with
each): distinct documents that share text, which must not be flagged. Everything is shuffled and fed to one
`minhash_dedup` checker (default options). A planted pair counts as found when the later of the two is
flagged as a duplicate of the earlier one; precision is the share of flagged documents flagged against their
own partner. A flag between two unplanted documents whose true shingle Jaccard (lmforge's own shingles,
exact sets) is at least the threshold is a duplicate that was already in the data, counted apart.

Throughput. `--scale-docs` documents (default 100,000) are generated from real text: each is 10-60 lines
(Chinese: 5-30) drawn at random from the corpus's non-blank lines of one language (90% English), so the text
and its statistics are real and the documents are distinct; then 10% more are planted near-duplicates of
earlier ones (one line replaced) and 2% exact duplicates up to case and spacing, each after its source. The
checkers run as the pipeline runs them: one process, documents in order (each checker is fed the whole
stream; the pipeline would feed minhash_dedup only exact_dedup's survivors). Times are wall and CPU seconds;
the peak memory is the process's ru_maxrss, and the RSS growth while each checker runs (its index). With
`--cli`, the same stream is written to JSONL and `lmforge data clean --steps exact_dedup,minhash_dedup
--workers 2` runs on it in a child process (reading, dedup, writing kept/rejected/report).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clean_vs_datatrove import corpus  # one corpus for both benchmarks

HEADER = {
    "en": "Posted on 3 March 2024 by admin in Uncategorized | 4 comments",
    "zh": "发布于 2024年3月3日 作者：管理员 分类：未分类 | 4 条评论",
}
FOOTER = {"en": "Share this: Facebook | Twitter | Email | Print", "zh": "分享到：微信 | 微博 | 邮件 | 打印"}


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _nonblank(lines: list[str]) -> list[int]:
    return [i for i, ln in enumerate(lines) if ln.strip()] or [0]


def edit_replace_line(text, lang, rng, pool):
    lines = _lines(text)
    lines[rng.choice(_nonblank(lines))] = rng.choice(pool[lang])
    return "\n".join(lines)


def edit_delete_line(text, lang, rng, pool):
    lines = _lines(text)
    del lines[rng.choice(_nonblank(lines))]
    return "\n".join(lines)


def edit_insert_line(text, lang, rng, pool):
    lines = _lines(text)
    lines.insert(rng.randint(0, len(lines)), rng.choice(pool[lang]))
    return "\n".join(lines)


def edit_words(text, lang, rng, pool, share=0.02):
    if lang == "zh":  # replace 2% of the CJK characters by other CJK characters of the corpus
        chars = list(text)
        idx = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"] or [0]
        for i in rng.sample(idx, max(1, round(share * len(idx)))):
            chars[i] = rng.choice(pool["zh_chars"])
        return "".join(chars)
    toks = text.split(" ")
    idx = [i for i, t in enumerate(toks) if t.strip()] or [0]
    for i in rng.sample(idx, max(1, round(share * len(idx)))):
        toks[i] = rng.choice(pool["en_words"])
    return " ".join(toks)


def edit_boilerplate(text, lang, rng, pool):
    return f"{HEADER[lang]}\n\n{text}\n\n{FOOTER[lang]}"


def edit_rewrap_upper(text, lang, rng, pool):
    words = text.split()
    out, line = [], []
    for w in words:
        line.append(w)
        if len(line) >= rng.randint(6, 14):
            out.append(" ".join(line))
            line = []
    return "\n".join([*out, " ".join(line)]).upper()


def edit_truncate(text, lang, rng, pool):
    lines = _lines(text)
    return "\n".join(lines[: max(1, round(0.9 * len(lines)))])


def edit_swap_lines(text, lang, rng, pool):
    lines = _lines(text)
    nb = _nonblank(lines)
    if len(nb) >= 2:
        a, b = rng.sample(nb, 2)
        lines[a], lines[b] = lines[b], lines[a]
    return "\n".join(lines)


EDITS = {
    "one line replaced": edit_replace_line,
    "one line deleted": edit_delete_line,
    "one line inserted": edit_insert_line,
    "2% words replaced": edit_words,
    "header+footer added": edit_boilerplate,
    "rewrapped+uppercased": edit_rewrap_upper,
    "last 10% cut": edit_truncate,
    "two lines swapped": edit_swap_lines,
}


def line_pool(docs: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    pool = {
        lang: [ln for lg, _, t in docs if lg == lang for ln in t.split("\n") if ln.strip()] for lang in ("en", "zh")
    }
    pool["en_words"] = [w for ln in pool["en"][:20000] for w in ln.split()]
    pool["zh_chars"] = [c for ln in pool["zh"] for c in ln if "\u4e00" <= c <= "\u9fff"]
    return pool


def jaccard(a: str, b: str, cfg) -> float:
    from lmforge.data.clean.steps.dedup import shingles

    x, y = shingles(a, cfg), shingles(b, cfg)
    return len(x & y) / max(len(x | y), 1)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def quality(docs, planted: int, hard_negatives: int, seed: int) -> dict:
    from lmforge.data.clean.steps import configure
    from lmforge.data.readers import Document

    rng = random.Random(seed)
    pool = line_pool(docs)
    step, cfg = configure("minhash_dedup")
    items = [(f"o{i}", lang, text) for i, (lang, _, text) in enumerate(docs)]
    partner, kind_of = {}, {}
    kinds = list(EDITS)
    for k, i in enumerate(rng.sample(range(len(docs)), planted)):
        lang, _, text = docs[i]
        kind = kinds[k % len(kinds)]
        cid = f"c{i}"
        items.append((cid, lang, EDITS[kind](text, lang, rng, pool)))
        partner[cid], partner[f"o{i}"], kind_of[cid] = f"o{i}", cid, kind
    for k in range(hard_negatives):
        (la, _, a), (_, _, b) = rng.sample(docs, 2)
        la_, lb_ = _lines(a), _lines(b)
        items.append((f"h{k}", la, "\n".join(la_[len(la_) // 2 :] + lb_[: len(lb_) // 2])))
    rng.shuffle(items)
    text_of = {i: t for i, _, t in items}
    lang_of = {i: lg for i, lg, _ in items}

    check = step.make(cfg)
    t0 = time.perf_counter()
    flagged = {}
    for doc_id, _, text in items:
        doc = Document(id=doc_id, text=text)
        if check(doc) is not None:
            flagged[doc_id] = (doc.metadata["duplicate_of"], doc.metadata["minhash_similarity"])
    seconds = time.perf_counter() - t0

    pos = {i: n for n, (i, _, _) in enumerate(items)}
    per_kind = collections.defaultdict(lambda: collections.Counter())
    true_j = collections.defaultdict(list)
    by_jaccard = []  # (true Jaccard of the pair, found)
    for cid, kind in kind_of.items():
        oid = partner[cid]
        first, later = sorted((cid, oid), key=pos.get)
        found = flagged.get(later, (None,))[0] == first
        key = (kind, lang_of[cid])
        per_kind[key]["pairs"] += 1
        per_kind[key]["found"] += found
        true_j[key].append(jaccard(text_of[cid], text_of[oid], cfg))
        by_jaccard.append((true_j[key][-1], found))
    tp = sum(1 for d, (of, _) in flagged.items() if partner.get(d) == of)
    in_data, false = [], []
    for d, (of, sim) in flagged.items():
        if partner.get(d) == of:
            continue
        j = jaccard(text_of[d], text_of[of], cfg)
        (in_data if j >= cfg.threshold else false).append(
            {"doc": d, "of": of, "estimated": sim, "jaccard": round(j, 3)}
        )
    pairs = sum(c["pairs"] for c in per_kind.values())
    found = sum(c["found"] for c in per_kind.values())
    rows = []
    for (kind, lang), c in sorted(per_kind.items(), key=lambda kv: (kinds.index(kv[0][0]), kv[0][1])):
        js = sorted(true_j[(kind, lang)])
        rows.append(
            {
                "edit": kind,
                "lang": lang,
                "pairs": c["pairs"],
                "found": c["found"],
                "recall": round(c["found"] / c["pairs"], 3),
                "jaccard_min": round(js[0], 3),
                "jaccard_median": round(js[len(js) // 2], 3),
            }
        )
    return {
        "distinct_documents": len(docs),
        "planted_pairs": pairs,
        "hard_negatives": hard_negatives,
        "stream": len(items),
        "flagged": len(flagged),
        "recall": round(found / pairs, 4),
        "precision": round(tp / max(len(flagged), 1), 4),
        "precision_counting_duplicates_in_data": round((tp + len(in_data)) / max(len(flagged), 1), 4),
        "recall_by_true_jaccard": {
            f"[{lo}, {hi})": {"pairs": len(sel), "recall": round(sum(sel) / max(len(sel), 1), 4)}
            for lo, hi in ((0.9, 1.01), (0.8, 0.9), (0.7, 0.8), (0.0, 0.7))
            for sel in [[f for j, f in by_jaccard if lo <= j < hi]]
        },
        "hard_negatives_flagged": sum(1 for d in flagged if d.startswith("h")),
        "duplicates_already_in_data": in_data,
        "false_flags": false,
        "per_edit": rows,
        "seconds": round(seconds, 2),
        "config": {"bands": cfg.bands, "rows": cfg.rows, "threshold": cfg.threshold, "shingle": cfg.shingle_size},
    }


def generate(docs, n: int, seed: int) -> tuple[list[tuple[str, str]], dict[str, str], dict[str, str]]:
    """[(id, text)] in stream order, {near-duplicate id: source id}, {exact-duplicate id: source id}."""
    rng = random.Random(seed)
    pool = line_pool(docs)
    originals = []
    for i in range(n):
        lang = "en" if rng.random() < 0.9 else "zh"
        k = rng.randint(10, 60) if lang == "en" else rng.randint(5, 30)
        originals.append((f"g{i}", lang, "\n".join(rng.choices(pool[lang], k=k))))
    copies = []
    for j in range(n // 10):  # near-duplicates: one line replaced
        src = rng.randrange(n)
        copies.append((f"n{j}", src, edit_replace_line(originals[src][2], originals[src][1], rng, pool)))
    for j in range(n // 50):  # exact duplicates up to case and spacing
        src = rng.randrange(n)
        copies.append((f"x{j}", src, "  " + originals[src][2].upper().replace("\n", " \n ") + "\n"))
    after = collections.defaultdict(list)  # each copy goes somewhere after its source
    for d, src, text in copies:
        after[rng.randint(src, n - 1)].append((d, text))
    stream = []
    for i, (d, _, text) in enumerate(originals):
        stream.append((d, text))
        stream.extend(after[i])
    near = {d: f"g{src}" for d, src, _ in copies if d.startswith("n")}
    exact = {d: f"g{src}" for d, src, _ in copies if d.startswith("x")}
    return stream, near, exact


def throughput(docs, n: int, seed: int, cli: bool = False, cli_workers: int = 2) -> dict:
    from lmforge.data.clean.steps import configure
    from lmforge.data.readers import Document

    stream, near, exact = generate(docs, n, seed)
    chars = sum(len(t) for _, t in stream)
    result = {"documents": len(stream), "characters": chars, "planted_near": len(near), "planted_exact": len(exact)}
    for name in ("exact_dedup", "minhash_dedup"):
        step, cfg = configure(name)
        gc.collect()
        rss0 = rss_mib()
        check = step.make(cfg)
        c0, t0 = time.process_time(), time.perf_counter()
        flagged = {}
        for doc_id, text in stream:
            doc = Document(id=doc_id, text=text)
            if check(doc) is not None:
                flagged[doc_id] = doc.metadata["duplicate_of"]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        planted = exact if name == "exact_dedup" else {**near, **exact}
        found = sum(1 for d, src in planted.items() if flagged.get(d) == src)
        caught_any = sum(1 for d in planted if d in flagged)
        result[name] = {
            "seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1),
            "docs_per_s": round(len(stream) / wall, 1),
            "flagged": len(flagged),
            "planted": len(planted),
            "planted_found_with_right_source": found,
            "planted_flagged": caught_any,
            "unplanted_flagged": sum(1 for d in flagged if d not in planted),
            "rss_growth_mib": round(rss_mib() - rss0, 1),
        }
        del check
    result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if cli:
        result["cli"] = run_cli(stream, cli_workers)
    return result


def run_cli(stream: list[tuple[str, str]], workers: int) -> dict:
    """`lmforge data clean --steps exact_dedup,minhash_dedup` end to end (JSONL in and out) in a child process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        src = Path(tmp) / "in" / "docs.jsonl"
        src.parent.mkdir()
        with open(src, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": d, "text": t}, ensure_ascii=False) + "\n" for d, t in stream)
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "data",
            "clean",
            "--input",
            str(src.parent),
            "--out",
            f"{tmp}/out",
            "--steps",
            "exact_dedup,minhash_dedup",
            "--workers",
            str(workers),
        ]
        t0 = time.perf_counter()
        # Through a small launcher: a child forked from this (large) process and exec'd would report this
        # process's RSS as its own ru_maxrss; the launcher's child starts clean, and the launcher reports it.
        launcher = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
            " print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
            " sys.exit(r.returncode)"
        )
        proc = subprocess.run([sys.executable, "-c", launcher, *cmd], check=False, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "command": " ".join(cmd)}
        report = json.loads((Path(tmp) / "out" / "report.json").read_text(encoding="utf-8"))
    return {
        "command": "lmforge data clean --steps exact_dedup,minhash_dedup --workers " + str(workers),
        "seconds": round(wall, 1),
        "docs_per_s": round(len(stream) / wall, 1),
        "counts": report["counts"],
        "per_reason": report["per_reason"],
        "child_max_rss_mib": round(int(proc.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0]) / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zh-html", help="folder of the debian-reference-zh-cn *.zh-cn.html chapters")
    p.add_argument("--planted", type=int, default=1200, help="distinct documents that get an edited copy")
    p.add_argument("--hard-negatives", type=int, default=400)
    p.add_argument("--scale-docs", type=int, default=100_000, help="0 skips the throughput part")
    p.add_argument("--cli", action="store_true", help="also time `lmforge data clean` on the same documents")
    p.add_argument("--workers", type=int, default=2, help="--workers of that `lmforge data clean` run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    docs = corpus(args.zh_html, args.seed)
    print(f"corpus: {len(docs):,} distinct documents; {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}")
    q = quality(docs, args.planted, args.hard_negatives, args.seed)
    print(
        f"\nminhash_dedup {q['config']}: {q['planted_pairs']:,} planted pairs, {q['hard_negatives']} hard negatives,"
        f" {q['stream']:,} documents in the stream, {q['flagged']} flagged ({q['seconds']} s)"
    )
    print(
        f"  recall {q['recall']:.4f}, precision {q['precision']:.4f} (counting duplicates already in the data as"
        f" right: {q['precision_counting_duplicates_in_data']:.4f}); hard negatives flagged:"
        f" {q['hard_negatives_flagged']}"
    )
    for bucket, r in q["recall_by_true_jaccard"].items():
        print(f"  pairs with true Jaccard in {bucket:11s}: {r['pairs']:5,}, recall {r['recall']:.4f}")
    for r in q["per_edit"]:
        print(
            f"  {r['edit']:22s} {r['lang']}  {r['found']:4d}/{r['pairs']:<4d} recall {r['recall']:.3f}"
            f"  true Jaccard min {r['jaccard_min']:.3f} median {r['jaccard_median']:.3f}"
        )
    for f in q["false_flags"][:10]:
        print(f"  false flag: {f}")
    for f in q["duplicates_already_in_data"][:10]:
        print(f"  duplicate already in the data: {f}")
    result = {"quality": q}
    if args.scale_docs:
        t = throughput(docs, args.scale_docs, args.seed, args.cli, args.workers)
        result["throughput"] = t
        print(f"\n{t['documents']:,} generated documents ({t['characters'] / 1e6:.0f} M characters), one process:")
        for name in ("exact_dedup", "minhash_dedup"):
            r = t[name]
            print(
                f"  {name:14s} {r['seconds']:7.1f} s wall ({r['cpu_seconds']} s CPU), {r['docs_per_s']:,.0f} docs/s;"
                f" planted {r['planted_found_with_right_source']:,}/{r['planted']:,} found with the right source"
                f" ({r['planted_flagged']:,} flagged), {r['unplanted_flagged']} unplanted flagged;"
                f" RSS +{r['rss_growth_mib']} MiB"
            )
        print(f"  peak RSS of the process (ru_maxrss): {t['max_rss_mib']} MiB")
        if "cli" in t:
            c = t["cli"]
            if "error" in c:
                print(f"  {c['command']}: failed: {c['error']}")
            else:
                print(
                    f"  {c['command']}: {c['seconds']} s, {c['docs_per_s']:,} docs/s end to end; {c['counts']};"
                    f" {c['per_reason']}; peak RSS {c['child_max_rss_mib']} MiB"
                )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
