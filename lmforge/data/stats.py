"""`lmforge data stats`: counts, tokens and length histograms of a `data clean` or `data mix` output.

    lmforge data stats runs/clean [--out runs/clean/stats] [--tokenizer runs/tok]
    lmforge data stats runs/mix

For a `lmforge data clean` folder (kept/, rejected/, report.json) it counts documents and tokens per
step, per rejection reason, per language (the `language` metadata the language step writes; `unknown`
without it) and per source (the record's `metadata.source`, else its input file), and the length
distribution before (kept + rejected) and after (kept) cleaning. Rejected records hold the text as it
was when a step rejected it (after the earlier steps' edits); unreadable records have no text and are
only counted. It checks the accounting identity of report.json (input == kept + rejected + unreadable)
and that kept/ and rejected/ hold as many records as the report says, and prints both.

For a `lmforge data mix` folder (mixed.jsonl, mix_report.json) it counts documents and tokens per
source and epoch, compares the shares with the report's targets, and checks the counts against it.

Tokens are counted with `--tokenizer` when given (its ids, no end-of-text), else as words:
whitespace-separated pieces, each CJK character one word (cheap, and comparable across languages
that do not put spaces between words); stats.json and the printout say which.

Writes PLOTS_DIR (default DIR/stats): PNG bar charts and histograms (matplotlib, Agg backend) and
stats.json; prints a compact table. Exit code 1 when the accounting does not add up.
"""

from __future__ import annotations

import argparse
import array
import collections
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.data import data_subparsers
from lmforge.data.clean.steps.text import CJK_CHAR
from lmforge.data.readers import Strict, read_records
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path, atomic_write_json

WORDS = "words: whitespace-separated pieces, each CJK character one word"
BATCH_DOCS = 512
HIST_BINS = 40
MAX_PLOTTED = 30  # bars of a chart, sources of the length histogram: the largest; the rest are counted as left out
LINE_RE = re.compile(r":(\d+|row\d+)$")
# CJK characters and CJK punctuation (ideographic comma, full stop, fullwidth ，！？：；): spaces, before splitting
CJK_SPACE = re.compile(f"{CJK_CHAR.pattern[:-1]}\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff5b-\uff65]")


def register(subparsers) -> None:
    p = data_subparsers(subparsers).add_parser("stats", help="counts, tokens and plots of a clean or mix output")
    p.add_argument("dir", metavar="DIR", help="output folder of `lmforge data clean` or `lmforge data mix`")
    p.add_argument("--out", default=None, help="folder for the PNGs and stats.json (default DIR/stats)")
    p.add_argument("--tokenizer", default=None, help="count tokens with this tokenizer folder (default: words)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    stats = data_stats(args.dir, args.out, tokenizer=args.tokenizer)
    print(format_table(stats))
    if not stats["accounting_holds"]:
        print(f"lmforge: accounting does not add up in {args.dir}: see above", file=sys.stderr)
        return 1
    return 0


# --- counting ---


class TokenCounter:
    """Token counts of texts, in batches: a tokenizer's ids, or words."""

    def __init__(self, tokenizer: str | Path | None):
        self.tok = None
        self.method = WORDS
        if tokenizer is not None:
            from lmforge.tokenizer.special import load_tokenizer

            self.tok = load_tokenizer(tokenizer)
            self.tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a text is text
            self.method = f"tokens: ids of the tokenizer {Path(tokenizer) / 'tokenizer.json'}"

    def __call__(self, texts: list[str]) -> list[int]:
        if self.tok is not None:
            return [len(e.ids) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(CJK_SPACE.sub(" ", t).split()) + len(CJK_CHAR.findall(t)) for t in texts]


def _records(files: list[Path]) -> Iterator[dict]:
    """Every record of `files` (a clean run's JSONL), read strictly by the registry (lmforge/data/readers.py); an
    empty file holds no record (a clean run writes rejected/ even when nothing was rejected)."""
    for path in files:
        for record, where, _ in read_records(path, Strict(allow=("empty file",))):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LmforgeError(f"{where}: record has no string 'text' field")
            yield record


def _counted(files: list[Path], counter: TokenCounter) -> Iterator[tuple[dict, int]]:
    """(record, tokens) for every record of `files`, counted in batches."""
    batch: list[dict] = []
    for record in _records(files):
        batch.append(record)
        if len(batch) >= BATCH_DOCS:
            yield from zip(batch, counter([r["text"] for r in batch]))
            batch = []
    if batch:
        yield from zip(batch, counter([r["text"] for r in batch]))


def _jsonl_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.jsonl*") if f.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")))


def _lengths(values, edges: np.ndarray) -> dict:
    a = np.asarray(values, dtype=np.int64)
    if not len(a):
        return {"docs": 0, "tokens": 0}
    hist, _ = np.histogram(np.clip(a, edges[0], edges[-1]), bins=edges)
    q = np.percentile(a, [10, 50, 90])
    return {"docs": len(a), "tokens": int(a.sum()), "mean": round(float(a.mean()), 1),
            "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": int(a.max()),
            "histogram": hist.tolist()}  # fmt: skip


def _edges(values) -> np.ndarray:
    """Log-spaced bin edges from 1 to the longest document (lengths 0 fall in the first bin)."""
    top = max(values, default=1)
    return np.unique(np.geomspace(1, max(top, 2) + 1, HIST_BINS + 1).round()).astype(np.int64)


def _docs(row: dict) -> int:
    """Documents in a table row: `docs` (mix), or kept + rejected (clean)."""
    return row.get("docs", 0) + row.get("kept_docs", 0) + row.get("rejected_docs", 0)


def _table_dict(counts: dict) -> dict:
    """Rows with the most documents first (then by name)."""
    return {k: dict(v) for k, v in sorted(counts.items(), key=lambda kv: (-_docs(kv[1]), kv[0]))}


# --- the two kinds of folder ---


def _load_report(path: Path, keys: list[str]) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in keys if not isinstance(report, dict) or k not in report]
    if missing:
        raise LmforgeError(f"{path}: not a report this version writes (no {', '.join(missing)})")
    return report


def clean_stats(folder: Path, counter: TokenCounter) -> dict:
    report = _load_report(folder / "report.json", ["counts", "per_step", "unreadable"])
    c = report["counts"]
    if not isinstance(c, dict) or not {"input", "kept", "rejected", "unreadable"} <= set(c):
        raise LmforgeError(f"{folder / 'report.json'}: `counts` lacks input/kept/rejected/unreadable")
    per = {k: collections.defaultdict(collections.Counter) for k in ("step", "reason", "language", "source")}
    before, after = array.array("q"), array.array("q")  # one length per document: 8 bytes each
    files_count = {}
    for kind in ("kept", "rejected"):
        n = 0
        for rec, tokens in _counted(_jsonl_files(folder / kind), counter):
            n += 1
            meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
            source = (
                meta.get("source") if isinstance(meta.get("source"), str) else LINE_RE.sub("", rec.get("source", ""))
            )
            keys = {"language": meta.get("language", "unknown"), "source": source or "unknown"}
            if kind == "rejected":
                keys["step"], keys["reason"] = rec.get("step", "?"), f"{rec.get('step', '?')}/{rec.get('reason', '?')}"
            for what, key in keys.items():
                per[what][key][f"{kind}_docs"] += 1
                per[what][key][f"{kind}_tokens"] += tokens
            before.append(tokens)
            if kind == "kept":
                after.append(tokens)
        files_count[kind] = n
    steps = {step: collections.Counter(in_=sc.get("in", 0)) for step, sc in report.get("per_step", {}).items()}
    for step, counts in per["step"].items():  # in the pipeline's order; `input`/`output` (empty texts) last
        steps.setdefault(step, collections.Counter()).update(counts)
    per_step = {k: {"in": v.pop("in_", 0), "rejected_docs": v["rejected_docs"], "rejected_tokens": v["rejected_tokens"]}
                for k, v in steps.items()}  # fmt: skip
    identity_holds = c["input"] == c["kept"] + c["rejected"] + c["unreadable"] and report.get("identity_holds", True)
    files_match = files_count == {"kept": c["kept"], "rejected": c["rejected"]} and c["unreadable"] == len(
        report.get("unreadable", [])
    )
    edges = _edges(before)
    return {
        "kind": "clean",
        "counts": c,
        "identity": f"input == kept + rejected + unreadable: {c['input']} {'==' if identity_holds else '!='} "
        f"{c['kept']} + {c['rejected']} + {c['unreadable']}",
        "files_check": f"kept/ holds {files_count['kept']} records (report {c['kept']}), rejected/ "
        f"{files_count['rejected']} (report {c['rejected']}), unreadable listed {len(report.get('unreadable', []))}"
        f" (report {c['unreadable']})",
        "accounting_holds": bool(identity_holds and files_match),
        "per_step": per_step,
        "per_reason": _table_dict(per["reason"]),
        "per_language": _table_dict(per["language"]),
        "per_source": _table_dict(per["source"]),
        "lengths": {"bin_edges": edges.tolist(), "before": _lengths(before, edges), "after": _lengths(after, edges)},
        "_series": {"before (kept + rejected)": before, "after (kept)": after},
    }


def mix_stats(folder: Path, counter: TokenCounter) -> dict:
    from lmforge.data.mix import OUTPUT, REPORT

    report = _load_report(folder / REPORT, ["sources", "total", "unit"])
    per = collections.defaultdict(collections.Counter)
    per_epoch = collections.defaultdict(collections.Counter)
    lengths: dict[str, array.array] = collections.defaultdict(lambda: array.array("q"))
    for rec, tokens in _counted([folder / OUTPUT], counter):
        name = rec.get("source", "unknown")
        per[name]["docs"] += 1
        per[name]["tokens"] += tokens
        per_epoch[name][str(rec.get("epoch", 0))] += 1
        lengths[name].append(tokens)
    docs, tokens = sum(v["docs"] for v in per.values()), sum(v["tokens"] for v in per.values())
    per_source = {}
    for s in report["sources"]:
        got = per.get(s["name"], collections.Counter())
        per_source[s["name"]] = {
            "docs": got["docs"], "tokens": got["tokens"], "report_docs": s["output"]["docs"],
            "target_share": s["target_share"], "share": s["share"], "share_docs": round(got["docs"] / max(docs, 1), 6),
            "share_tokens": round(got["tokens"] / max(tokens, 1), 6), "epochs": s["epochs"],
            "docs_per_epoch": dict(sorted(per_epoch[s["name"]].items(), key=lambda kv: int(kv[0]))), "ran_out": s["ran_out"],
        }  # fmt: skip
    unknown = sorted(set(per) - set(per_source))
    holds = not unknown and all(v["docs"] == v["report_docs"] for v in per_source.values())
    holds = holds and docs == report["total"]["docs"]
    every = array.array("q", (n for v in lengths.values() for n in v))
    edges = _edges(every)
    return {
        "kind": "mix",
        "share_unit": report["unit"],
        "identity": f"mixed.jsonl holds {docs} records == sum over sources in mix_report.json "
        f"{report['total']['docs']}{'' if holds else ' (DOES NOT HOLD)'}"
        + (f"; records of unknown sources: {', '.join(unknown)}" if unknown else ""),
        "accounting_holds": bool(holds),
        "total": {"docs": docs, "tokens": tokens},
        "per_source": per_source,
        "warnings": report.get("warnings", []),
        "lengths": {
            "bin_edges": edges.tolist(),
            "all": _lengths(every, edges),
            "per_source": {name: _lengths(v, edges) for name, v in sorted(lengths.items())},
        },
        "_series": dict(sorted(lengths.items())),
    }


# --- plots ---


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plotted(table: dict) -> list[str]:
    """The rows a plot shows: the MAX_PLOTTED with the most documents, in the table's order."""
    if len(table) <= MAX_PLOTTED:
        return list(table)
    largest = set(sorted(table, key=lambda k: -_docs(table[k]))[:MAX_PLOTTED])
    return [k for k in table if k in largest]


def _label(name: str) -> str:
    """A row name short enough for a plot's axis (long paths keep their end, as in the printed table)."""
    return name if len(name) <= 48 else "..." + name[-45:]


def _left_out_note(shown: int, total: int, what: str) -> str:
    return f" ({total - shown} {what} of {total} left out: the smallest)" if shown < total else ""


def _bars(plt, path: Path, title: str, table: dict, columns: list[tuple[str, list[str]]], unit: str, what: str) -> int:
    """Horizontal bars, one panel per (label, keys) column: keys stacked (e.g. kept_docs, rejected_docs).

    Shows the MAX_PLOTTED largest rows; the title says how many were left out, and so does the return value."""
    names = _plotted(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 1.5 + 0.35 * len(names)), squeeze=False)
    for ax, (label, keys) in zip(axes[0], columns):
        left = np.zeros(len(names))
        for key in keys:
            vals = np.array([table[n].get(key, 0) for n in names], dtype=float)
            ax.barh([_label(n) for n in names], vals, left=left, label=key.split("_")[0])
            left += vals
        ax.set_xlabel(unit if label == "tokens" else label)
        ax.invert_yaxis()
        if len(keys) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(title + _left_out_note(len(names), len(table), what))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return len(table) - len(names)


def _histogram(plt, path: Path, title: str, series: dict, edges: list[int], unit: str) -> None:
    # The legend goes beside the axes, in as many columns as keep it as tall as the axes: inside them, a legend
    # of many sources outgrew the figure and tight_layout gave up with a warning.
    per_column = 15
    columns = max(1, -(-len(series) // per_column))
    fig, ax = plt.subplots(figsize=(8 + 2.5 * columns, 4.5))
    for k, (label, values) in enumerate(series.items()):
        if values:  # the first series filled, the others as outlines, so none hides another
            style = {"histtype": "stepfilled", "alpha": 0.35} if k == 0 else {"histtype": "step", "linewidth": 1.5}
            ax.hist(np.clip(values, edges[0], edges[-1]), bins=edges, label=_label(label), **style)
    ax.set_xscale("log")
    ax.set_xlabel(f"document length ({unit})")
    ax.set_ylabel("documents")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # (no documents at all: nothing to label)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plots(stats: dict, out: Path, unit: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made, left_out = [], {}

    def bars(name, title, table, columns, what):
        if table:
            left = _bars(plt, out / name, title, table, columns, unit, what)
            made.append(name)
            if left:
                left_out[name] = f"{left} {what} of {len(table)}"

    if stats["kind"] == "clean":
        both = [("docs", ["kept_docs", "rejected_docs"]), ("tokens", ["kept_tokens", "rejected_tokens"])]
        bars("per_step.png", "rejected per step", stats["per_step"],
             [("docs", ["rejected_docs"]), ("tokens", ["rejected_tokens"])], "steps")  # fmt: skip
        bars("per_reason.png", "rejected per reason", stats["per_reason"],
             [("docs", ["rejected_docs"]), ("tokens", ["rejected_tokens"])], "reasons")  # fmt: skip
        bars("per_language.png", "per language", stats["per_language"], both, "languages")
        bars("per_source.png", "per source", stats["per_source"], both, "sources")
        title = "document lengths before (kept + rejected) and after (kept) cleaning"
        series = stats["_series"]
    else:
        table = stats["per_source"]
        bars("per_source.png", "per source", table, [("docs", ["docs"]), ("tokens", ["tokens"])], "sources")
        names = _plotted(table)
        note = _left_out_note(len(names), len(table), "sources")
        shares = {n: {"target": table[n]["target_share"], f"achieved ({stats['share_unit']})": table[n]["share"]}
                  for n in names}  # fmt: skip
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(shares)))
        y = np.arange(len(shares))
        for k, key in enumerate(next(iter(shares.values()))):
            ax.barh(y + 0.4 * k, [v[key] for v in shares.values()], height=0.4, label=key)
        ax.set_yticks(y + 0.2, [_label(n) for n in shares])
        ax.invert_yaxis()
        ax.set_xlabel("share of the output")
        ax.set_title("target and achieved shares" + note)
        ax.legend(fontsize="small")
        fig.tight_layout()
        _save(fig, out / "shares.png")
        plt.close(fig)
        made.append("shares.png")
        title = "document lengths per source" + note
        series = {n: stats["_series"][n] for n in sorted(stats["_series"]) if n in set(names)}
        if note:
            left_out["shares.png"] = left_out["lengths.png"] = f"{len(table) - len(names)} sources of {len(table)}"
    _histogram(plt, out / "lengths.png", title, series, stats["lengths"]["bin_edges"], unit)
    made.append("lengths.png")
    return made, left_out


# --- the stage ---


def data_stats(folder: str | Path, out: str | Path | None = None, *, tokenizer: str | Path | None = None) -> dict:
    """Count, check and plot the clean or mix output in `folder`; write PNGs and stats.json to `out`
    (default `folder/stats`) and return the stats."""
    from lmforge.data.mix import OUTPUT, REPORT

    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"{folder}: no such folder")
    if (folder / "report.json").is_file() and (folder / "kept").is_dir():
        kind = "clean"
    elif (folder / REPORT).is_file() and (folder / OUTPUT).is_file():
        kind = "mix"
    else:
        raise LmforgeError(
            f"{folder}: not an output of `lmforge data clean` (kept/ and report.json) "
            f"or `lmforge data mix` ({OUTPUT} and {REPORT})"
        )
    counter = TokenCounter(tokenizer)
    stats = clean_stats(folder, counter) if kind == "clean" else mix_stats(folder, counter)
    out = Path(out) if out is not None else folder / "stats"
    out.mkdir(parents=True, exist_ok=True)
    unit = "tokens" if counter.tok is not None else "words"
    plots, left_out = _plots(stats, out, unit)
    stats = {"dir": str(folder), "token_counting": counter.method, "unit": unit, **stats, "plots": plots,
             "plots_left_out": left_out}  # fmt: skip
    del stats["_series"]
    atomic_write_json(out / "stats.json", stats)
    stats["out"] = str(out)
    return stats


def _fmt_table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [[f"{v:,}" if isinstance(v, int) else f"{v:.1%}" if isinstance(v, float) else str(v) for v in r]
             for r in rows]  # fmt: skip
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [line(headers), *map(line, cells)]


def format_table(stats: dict) -> str:
    u = stats["unit"]
    lines = [f"stats: {stats['dir']} ({stats['kind']} output; lengths in {stats['token_counting']})"]
    lines.append(f"  {stats['identity']}" + ("" if stats["accounting_holds"] else "  <-- DOES NOT HOLD"))
    if stats["kind"] == "clean":
        lines.append(f"  {stats['files_check']}")
        lines.append("")
        rows = [[k, v.get("in", 0), v.get("rejected_docs", 0), v.get("rejected_tokens", 0)]
                for k, v in stats["per_step"].items()]  # fmt: skip
        lines += _fmt_table(["step", "in", "rejected", f"rejected {u}"], rows)
        for what in ("reason", "language", "source"):
            table = stats[f"per_{what}"]
            if not table:
                continue
            lines.append("")
            cols = ["rejected_docs", "rejected_tokens"] if what == "reason" else [
                "kept_docs", "kept_tokens", "rejected_docs", "rejected_tokens"]  # fmt: skip
            rows = [[k if len(k) <= 48 else "..." + k[-45:], *(v.get(c, 0) for c in cols)] for k, v in table.items()]
            lines += _fmt_table([what, *(c.replace("_", " ").replace("tokens", u) for c in cols)], rows)
        lengths = {k: stats["lengths"][k] for k in ("before", "after")}
    else:
        lines.append("")
        rows = [[k, v["docs"], v["tokens"], v["target_share"], v["share"], v["share_docs"], v["share_tokens"],
                 ", ".join(f"{e}:{n}" for e, n in v["docs_per_epoch"].items())]
                for k, v in stats["per_source"].items()]  # fmt: skip
        su = "approx tokens" if stats["share_unit"] == "tokens" else "docs"
        heads = ["source", "docs", u, "target", f"share ({su})", "share docs", f"share {u}", "docs per epoch"]
        lines += _fmt_table(heads, rows)
        lines += [f"  warning: {w}" for w in stats["warnings"]]
        lengths = {"all": stats["lengths"]["all"], **stats["lengths"]["per_source"]}
    lines.append("")
    rows = [[k, v["docs"], v["tokens"], f"{v.get('mean', 0):.1f}", f"{v.get('median', 0):g}",
             f"{v.get('p90', 0):g}", v.get("max", 0)] for k, v in lengths.items()]  # fmt: skip
    lines += _fmt_table([f"length ({u})", "docs", u, "mean", "median", "p90", "max"], rows)
    lines.append(f"  plots and stats.json: {stats['out']}/ ({', '.join(stats['plots'])})")
    by_rows: dict[str, list[str]] = {}
    for png, left in stats["plots_left_out"].items():
        by_rows.setdefault(left, []).append(png)
    for left, pngs in by_rows.items():
        lines.append(f"  {', '.join(pngs)}: only the {MAX_PLOTTED} largest plotted, {left} left out (all are above)")
    return "\n".join(lines)
