"""`lmforge data mix`: combine corpora by weight into one shuffled JSONL, reproducibly, with a report.

    lmforge data mix --config mix.yaml --out runs/mix [--total-tokens 2000000000] [--seed 0]
    lmforge data mix --source web=runs/clean/kept:weight=3 --source wiki=wiki/:weight=1:epochs=4 --out runs/mix

The config file (YAML) is the main way; paths are relative to the current folder:

    sources:
      - {name: web, path: runs/clean/kept, weight: 0.7}
      - {name: wiki, path: data/wiki, weight: 0.2, max_epochs: 4}    # small and good: up to 4 passes
      - {name: code, path: code.jsonl.zst, weight: 0.1, max_docs: 100000}
    total_tokens: 2000000000    # or total_docs; neither: the largest output that meets every weight
    seed: 0

`--source NAME=PATH[:weight=W][:epochs=E][:max_docs=N]` adds a source on the command line (weight 1 by
default); flags override the config's `seed`, `total_docs`, `total_tokens`, `text_field`. A PATH is
what `lmforge data tokenize` reads: `.txt`, `.jsonl(.gz/.zst)` or `.parquet` files, or folders of them.

Shares. A source's share of the output is its weight over the sum of weights, measured in approximate
tokens (`approx_tokens = UTF-8 bytes / 4`: no tokenizer needed, and the same for every source), or in
documents when the total is given as `--total-docs`. A source supplies at most `max_epochs` passes over
its documents (default 1; each repeat counted) and at most `max_docs` documents, repeats included.
Without a total, the output is the largest one that meets every weight within those limits. With a
total that asks a source for more than it may give, the source gives all it may, the other sources
fill the rest in proportion to their weights, and the shortfall is said on stderr and in the report's
`warnings` (the output is smaller than the total only when every source runs out).

Selection. A source used for k of its n documents gives every document k // n times (epochs 0, 1, ...)
and a random k % n of them once more, so every document is seen once before any is seen twice; a
capped source (k < n) gives a random k. All chosen copies then go in one random order (the loader
reads shards as one stream, so sources must be spread through the file, not in blocks). Same seed,
same inputs: byte-identical output.

Memory stays bounded: pass 1 streams every source to count documents and bytes; pass 2 streams them
again and writes each chosen copy, tagged with its output position, to one of several temporary
bucket files (about 128 MB of text each); each bucket is then sorted in memory and appended to the
output. Beyond one bucket, it holds 8 bytes per output document (the permutation).

Output: `OUT/mixed.jsonl`, one record per line, `{"id", "text", "source": NAME, "epoch", "origin":
FILE:LINE, ...the record's other fields}` (the text always under `text`, so `lmforge data tokenize
--input OUT` reads it as is), written atomically, then `OUT/mix_report.json`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.data import data_subparsers
from lmforge.data.readers import iter_file, list_files
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path, atomic_write_json

BYTES_PER_TOKEN = 4
TOKEN_ESTIMATE = "approx_tokens = UTF-8 bytes of the text / 4"
BUCKET_BYTES = 128 * 2**20  # text per temporary bucket: the memory the final sort needs
MAX_BUCKETS = 256  # open files at once; beyond 32 GB of output the buckets grow instead
OUTPUT = "mixed.jsonl"
REPORT = "mix_report.json"
CONFIG_KEYS = {"sources", "seed", "total_docs", "total_tokens", "text_field"}
SOURCE_KEYS = {"name", "path", "weight", "max_epochs", "max_docs"}
SPEC_KEYS = {"weight": "weight", "epochs": "max_epochs", "max_epochs": "max_epochs", "max_docs": "max_docs"}
SPEC_SYNTAX = "NAME=PATH[:weight=W][:epochs=E][:max_docs=N]"
NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")
OPTION_RE = re.compile(r"[A-Za-z_]+=.*")


@dataclass
class Source:
    name: str
    path: str
    weight: float = 1.0
    max_epochs: float = 1.0
    max_docs: int | None = None


def register(subparsers) -> None:
    p = data_subparsers(subparsers).add_parser("mix", help="combine corpora by weight into one shuffled JSONL")
    p.add_argument("--config", help="YAML: sources: [{name, path, weight, max_epochs, max_docs}], seed, total_*")
    p.add_argument("--source", action="append", default=[], metavar=SPEC_SYNTAX,
                   help="a source (repeat the flag for several); weight 1, epochs 1 by default")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder: mixed.jsonl and mix_report.json")
    p.add_argument("--total-docs", type=int, default=None, help="output size in documents (shares in documents)")
    p.add_argument("--total-tokens", type=int, default=None, help="output size in approx tokens (UTF-8 bytes / 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed for selection and order (default 0)")
    p.add_argument("--text-field", default=None, help="JSONL/Parquet field holding the text (default text)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else {}
    sources = [dict(s) for s in cfg.get("sources", [])] + [parse_source_spec(s) for s in args.source]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else cfg.get(k) for k in CONFIG_KEYS - {"sources"}}
    if args.total_docs is not None or args.total_tokens is not None:  # a flag replaces the config's total
        pick["total_docs"], pick["total_tokens"] = args.total_docs, args.total_tokens
    report = mix_sources(
        sources,
        args.out,
        total_docs=pick["total_docs"],
        total_tokens=pick["total_tokens"],
        seed=0 if pick["seed"] is None else pick["seed"],
        text_field=pick["text_field"] or "text",
    )
    print(format_summary(report))
    return 0


# --- sources: config file, command-line specs, checks ---


def load_config(path: str | Path) -> dict:
    """The YAML mix config at `path`, its top-level keys checked (sources are checked by `check_source`)."""
    from lmforge.config import load_config_file

    path = Path(path)
    cfg = load_config_file(path, CONFIG_KEYS, "a `sources` list")
    if not isinstance(cfg.get("sources", []), list) or not all(isinstance(s, dict) for s in cfg.get("sources", [])):
        raise LmforgeError(f"{path}: `sources` must be a list of mappings {{name, path, weight, ...}}")
    return cfg


def parse_source_spec(spec: str) -> dict:
    """`NAME=PATH[:weight=W][:epochs=E][:max_docs=N]` as a source dict; options are read from the right,
    so a PATH may itself contain colons."""
    name, sep, rest = spec.partition("=")
    if not sep or not NAME_RE.fullmatch(name) or not rest:
        raise LmforgeError(f"--source {spec!r}: expected {SPEC_SYNTAX}")
    out: dict = {"name": name}
    while True:
        head, colon, tail = rest.rpartition(":")
        if not colon or not OPTION_RE.fullmatch(tail):
            break
        key, _, value = tail.partition("=")
        if key not in SPEC_KEYS:
            raise LmforgeError(f"--source {spec!r}: unknown option {key!r} (known: weight, epochs, max_docs)")
        if SPEC_KEYS[key] in out:
            raise LmforgeError(f"--source {spec!r}: {key} given twice")
        try:
            out[SPEC_KEYS[key]] = int(value) if key == "max_docs" else float(value)
        except ValueError:
            raise LmforgeError(f"--source {spec!r}: {key}={value!r} is not a number") from None
        rest = head
    if not rest:
        raise LmforgeError(f"--source {spec!r}: no PATH (expected {SPEC_SYNTAX})")
    out["path"] = rest
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_source(s: dict) -> Source:
    """A checked `Source` from a dict `{name, path, weight?, max_epochs?, max_docs?}`."""
    name = s.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LmforgeError(f"source {name!r}: a name is letters, digits and _.+- (got {s})")
    unknown = sorted(set(s) - SOURCE_KEYS)
    if unknown:
        raise LmforgeError(
            f"source {name!r}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SOURCE_KEYS))})"
        )
    if not isinstance(s.get("path"), str) or not s["path"]:
        raise LmforgeError(f"source {name!r}: needs a `path` (a file or folder)")
    src = Source(name, s["path"], s.get("weight", 1.0), s.get("max_epochs", 1.0), s.get("max_docs"))
    if not _is_number(src.weight) or src.weight <= 0:
        raise LmforgeError(f"source {name!r}: weight must be a number > 0, got {src.weight!r}")
    if not _is_number(src.max_epochs) or src.max_epochs <= 0:
        raise LmforgeError(f"source {name!r}: max_epochs must be a number > 0, got {src.max_epochs!r}")
    if src.max_docs is not None and (not isinstance(src.max_docs, int) or src.max_docs < 1):
        raise LmforgeError(f"source {name!r}: max_docs must be a whole number >= 1, got {src.max_docs!r}")
    return src


# --- reading: whole records, strict like `lmforge.data.readers` ---


def iter_records(files: list, text_field: str) -> Iterator[tuple[dict, str, str]]:
    """(record, text, where) for every non-empty document of `files` (strict, every format of
    `lmforge.data.readers`): a record's fields but the text (`{}` for a `.txt` document, a page's URL and date
    for a WARC record); `where` is the reader's source (`FILE:LINE`, `FILE:rowN`, ...)."""
    for path in files:
        for doc in iter_file(path, text_field, id_field="", metadata=True):
            yield doc.metadata, doc.text, doc.source


def _output_record(record: dict, text: str, where: str, name: str, epoch: int, text_field: str) -> dict:
    rest = {k: v for k, v in record.items() if k not in ("id", "text", text_field, "source", "epoch", "origin")}
    doc_id = record.get("id")
    return {"id": where if doc_id is None else doc_id, "text": text, "source": name, "epoch": epoch,
            "origin": where, **rest}  # fmt: skip


# --- planning: how many documents from each source ---


def plan(avail: list[dict], sources: list[Source], unit: str, total: float | None) -> tuple[list[int], list[str]]:
    """Documents to take from each source, and the warnings for sources that cannot meet their weight.

    `avail[i]` has the source's `docs` and `approx_tokens`; `unit` is "docs" or "tokens"; `total` is in
    that unit (None: the largest output that meets every weight). Shortfalls are water-filled: a source
    that runs out gives all it may and the others share what is left in proportion to their weights.
    """
    wsum = sum(s.weight for s in sources)
    p = [s.weight / wsum for s in sources]
    per_doc = [1.0 if unit == "docs" else a["approx_tokens"] / a["docs"] for a in avail]
    doc_supply = [min(math.floor(a["docs"] * s.max_epochs), s.max_docs or math.inf) for a, s in zip(avail, sources)]
    supply = [d * m for d, m in zip(doc_supply, per_doc)]
    if total is None:
        total = min(sup / pi for sup, pi in zip(supply, p))
    alloc = [0.0] * len(sources)
    active, left = list(range(len(sources))), float(total)
    while active:
        psum = sum(p[i] for i in active)
        want = {i: left * p[i] / psum for i in active}
        short = [i for i in active if want[i] > supply[i] * (1 + 1e-9)]
        if not short:
            for i in active:
                alloc[i] = min(want[i], supply[i])
            break
        for i in short:
            alloc[i] = supply[i]
            left -= supply[i]
            active.remove(i)
    if unit == "docs":  # largest remainder: the counts add up to the rounded total
        counts = [math.floor(a + 1e-9) for a in alloc]
        extra = round(sum(alloc)) - sum(counts)
        for i in sorted(range(len(alloc)), key=lambda i: counts[i] - alloc[i]):
            if extra > 0 and counts[i] < doc_supply[i]:
                counts[i] += 1
                extra -= 1
    else:
        counts = [min(doc_supply[i], round(alloc[i] / per_doc[i])) for i in range(len(alloc))]

    warnings = []
    got = sum(alloc)
    for i, s in enumerate(sources):
        if alloc[i] < p[i] * total * (1 - 1e-9):
            cap = f"{avail[i]['docs']:,} docs x max_epochs {s.max_epochs:g}"
            if s.max_docs is not None and s.max_docs < avail[i]["docs"] * s.max_epochs:
                cap = f"max_docs {s.max_docs:,}"
            warnings.append(
                f"source {s.name!r}: weight {s.weight:g} asks for {p[i] * total:,.0f} {unit} ({p[i]:.1%}) but it "
                f"runs out at {supply[i]:,.0f} ({cap}): it gets {alloc[i] / max(got, 1e-9):.1%} of the output"
            )
    if got < total * (1 - 1e-9):
        warnings.append(f"the sources run out at {got:,.0f} {unit}, short of the requested total {total:,.0f}")
    return counts, warnings


def _count(s: Source, files: list[Path], text_field: str, bar: dict) -> dict:
    """Pass 1: the documents, bytes and approx tokens of one source."""
    from tqdm import tqdm

    n, nbytes = 0, 0
    for _, text, _ in tqdm(iter_records(files, text_field), desc=f"count {s.name}", **bar):
        n += 1
        nbytes += len(text.encode("utf-8"))
    if n == 0:
        raise LmforgeError(f"{s.path}: source {s.name!r} has no documents (all texts are empty)")
    return {"docs": n, "bytes": nbytes, "approx_tokens": nbytes // BYTES_PER_TOKEN}


def _scatter(s: Source, files, text_field, n: int, k: int, subset: np.ndarray, positions: np.ndarray, put, bar) -> dict:
    """Pass 2 over one source: copy j of the source's k (epoch-major: pass 0 over all n docs, pass 1, ...,
    then the sorted `subset` of the last pass) goes to output position `positions[j]` through `put`."""
    from tqdm import tqdm

    full, at, doc = k // n, 0, -1
    written = {"docs": 0, "bytes": 0, "per_epoch": collections.Counter()}
    for doc, (record, text, where) in enumerate(tqdm(iter_records(files, text_field), desc=f"mix {s.name}",
                                                     total=n, **bar)):  # fmt: skip
        copies = [(e, e * n + doc) for e in range(full)]
        if at < len(subset) and subset[at] == doc:
            copies.append((full, full * n + at))
            at += 1
        for epoch, j in copies:
            put(int(positions[j]), json.dumps(_output_record(record, text, where, s.name, epoch, text_field),
                                              ensure_ascii=False))  # fmt: skip
            written["docs"] += 1
            written["bytes"] += len(text.encode("utf-8"))
            written["per_epoch"][epoch] += 1
    if doc + 1 != n:
        raise LmforgeError(f"{s.path}: source {s.name!r} changed while mixing ({n} docs, then {doc + 1})")
    return written


# --- the stage ---


def mix_sources(
    sources: list[dict],
    out: str | Path,
    *,
    total_docs: int | None = None,
    total_tokens: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Mix `sources` (dicts `{name, path, weight, max_epochs, max_docs}`) into `out` (see the module
    docstring); return the report, also written to `out/mix_report.json`."""
    t0 = time.perf_counter()
    srcs = [check_source(s) for s in sources]
    if not srcs:
        raise LmforgeError(f"no sources given (use --config with a `sources` list, or --source {SPEC_SYNTAX})")
    dup = sorted({s.name for s in srcs if [t.name for t in srcs].count(s.name) > 1})
    if dup:
        raise LmforgeError(f"source name(s) given twice: {', '.join(dup)}")
    if total_docs is not None and total_tokens is not None:
        raise LmforgeError("give --total-docs or --total-tokens, not both")
    for flag, v in (("--total-docs", total_docs), ("--total-tokens", total_tokens)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LmforgeError(f"{flag} must be a whole number >= 1, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise LmforgeError(f"--seed must be a whole number >= 0, got {seed!r}")
    files = [list_files([s.path]) for s in srcs]  # a missing path fails before `out` is touched
    out = Path(out)
    target = (out / OUTPUT).resolve()
    for s, fs in zip(srcs, files):
        if any(f.resolve() == target for f in fs):
            raise LmforgeError(f"{out / OUTPUT}: is an input of source {s.name!r}; write the mix elsewhere")
    bar = {"unit": "doc", "disable": None if progress else True}
    avail = [_count(s, fs, text_field, bar) for s, fs in zip(srcs, files)]  # pass 1
    unit = "docs" if total_docs is not None else "tokens"
    counts, warnings = plan(avail, srcs, unit, total_docs if total_docs is not None else total_tokens)
    for w in warnings:
        print(f"lmforge: warning: {w}", file=sys.stderr)
    n_out = sum(counts)
    if n_out == 0:
        raise LmforgeError("the weights and total leave no documents to write (a total too small?)")

    # Which copies: per source, full passes plus a random subset; then one permutation of all copies.
    seeds = np.random.SeedSequence(seed).spawn(len(srcs) + 1)
    subsets = [
        np.sort(np.random.default_rng(seeds[i]).choice(a["docs"], k % a["docs"], replace=False))
        for i, (a, k) in enumerate(zip(avail, counts))
    ]
    perm = np.random.default_rng(seeds[-1]).permutation(n_out)
    offsets = np.cumsum([0] + counts)
    est_bytes = sum(k * a["bytes"] / a["docs"] for k, a in zip(counts, avail)) * 1.1 + 200 * n_out
    n_buckets = int(min(MAX_BUCKETS, max(1, math.ceil(est_bytes / BUCKET_BYTES))))

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # the folder is unfinished until the new report lands
    written = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".mix-") as tmp:
        paths = [Path(tmp) / f"bucket-{b:05d}" for b in range(n_buckets)]
        with contextlib.ExitStack() as stack:  # pass 2: every chosen copy to the bucket of its position
            buckets = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in paths]

            def put(pos: int, line: str) -> None:
                buckets[pos * n_buckets // n_out].write(f"{pos}\t{line}\n")

            for i, (s, fs) in enumerate(zip(srcs, files)):
                written.append(_scatter(s, fs, text_field, avail[i]["docs"], counts[i], subsets[i],
                                        perm[offsets[i] : offsets[i + 1]], put, bar))  # fmt: skip
        with atomic_path(out / OUTPUT) as tmp_out, open(tmp_out, "w", encoding="utf-8") as dst:
            for path in paths:  # the buckets hold consecutive position ranges: sort each, append in order
                with open(path, encoding="utf-8") as f:
                    lines = [(int(ln[: ln.index("\t")]), ln[ln.index("\t") + 1 :]) for ln in f]
                lines.sort(key=lambda x: x[0])
                dst.writelines(line for _, line in lines)
                del lines

    tot_docs = sum(w["docs"] for w in written)
    tot_bytes = sum(w["bytes"] for w in written)
    wsum = sum(s.weight for s in srcs)
    report_sources = []
    for s, fs, a, w, k in zip(srcs, files, avail, written, counts):
        share_docs, share_tokens = w["docs"] / tot_docs, w["bytes"] / max(tot_bytes, 1)
        report_sources.append({
            **asdict(s),
            "files": len(fs),
            "available": a,
            "target_share": round(s.weight / wsum, 6),
            "output": {"docs": w["docs"], "bytes": w["bytes"], "approx_tokens": w["bytes"] // BYTES_PER_TOKEN},
            "share": round(share_tokens if unit == "tokens" else share_docs, 6),
            "share_docs": round(share_docs, 6),
            "share_tokens": round(share_tokens, 6),
            "epochs": round(k / a["docs"], 4),
            "docs_per_epoch": {str(e): c for e, c in sorted(w["per_epoch"].items())},
            "repeated_docs": max(0, k - a["docs"]),
            "dropped_by_cap": max(0, a["docs"] - k),
            "ran_out": any(msg.startswith(f"source {s.name!r}:") for msg in warnings),
        })  # fmt: skip
    report = {
        "out": str(out),
        "output": OUTPUT,
        "seed": seed,
        "unit": unit,
        "token_estimate": TOKEN_ESTIMATE,
        "total_requested": {"docs": total_docs, "tokens": total_tokens},
        "total": {"docs": tot_docs, "bytes": tot_bytes, "approx_tokens": tot_bytes // BYTES_PER_TOKEN},
        "sources": report_sources,
        "warnings": warnings,
        "text_field": text_field,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / REPORT, report)
    return report


def format_summary(report: dict) -> str:
    t = report["total"]
    lines = [
        (
            f"mix: {Path(report['out']) / report['output']}: {t['docs']:,} docs, {t['approx_tokens']:,} approx "
            f"tokens (shares in {report['unit']}; {report['token_estimate']}; seed {report['seed']})"
        ),
        f"  {'source':<16}{'available':>12}{'used':>12}{'epochs':>8}{'target':>9}{'share':>9}{'dropped':>10}",
    ]
    for s in report["sources"]:
        lines.append(
            f"  {s['name']:<16}{s['available']['docs']:>12,}{s['output']['docs']:>12,}{s['epochs']:>8.2f}"
            f"{s['target_share']:>9.1%}{s['share']:>9.1%}{s['dropped_by_cap']:>10,}"
            + ("  RAN OUT" if s["ran_out"] else "")
        )
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)
