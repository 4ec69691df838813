"""`lmforge report`: one self-contained HTML page and its Markdown twin for a run or a whole recipe run.

    lmforge report runs/demo                                  # -> runs/demo/report.html, report.md
    lmforge report runs/demo runs/demo-zh --out reports/ --title "en vs zh"
    lmforge report runs/x/sft --eval evals/base/results.json --eval evals/sft/results.json

RUN_DIR is what `lmforge run` writes (OUT/stages.json, clean/, tokenizer/, shards/, a folder per training stage,
samples.txt, chat.txt, align.json, eval/<stage>/results.json) or a single training run folder (metrics.jsonl,
config.yaml). The page has, each where its inputs exist: a summary (time, tokens, final train loss, val loss and
bits per byte per stage), the cleaning funnel (documents and bytes kept and rejected by reason), the tokenizer
(vocabulary, bytes per token per language), training curves (loss, learning rate, tokens/s per stage), the
`lmforge eval` results (stages as rows, tasks as columns; --eval adds files, labelled by their folder's name, to
the first run's table), samples and chat transcripts, and every stage's resolved config. A file a section needs
that is missing or unreadable is named on the page; a RUN_DIR with no run in it is an error (exit 2).

Every plot is a PNG embedded in the HTML (no external file, script, font or URL), also saved under
OUT/report_files/ for report.md. Several RUN_DIRs make one section each, in the order given.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError
from lmforge.eval.report_plots import curves_png, funnel_png, render_html, render_md
from lmforge.eval.stats import wilson_interval

DATA_STAGES = ("clean", "tokenizer", "tokenize")
KNOWN_ORDER = ("pretrain", "sft", "task-sft", "reward", "dpo", "ppo", "grpo")  # base -> SFT -> aligned
MAX_TEXT = 40_000  # characters of a samples / chat file shown; the rest is cut with a note
MAX_BYTE_SCAN = 256 << 20  # count the text bytes of clean/kept and clean/rejected only up to this much JSONL
MARKERS = ("stages.json", "metrics.jsonl", "config.yaml", "clean/report.json", "tokenizer/train_report.json",
           "shards/index.json", "eval/results.json", "samples.txt", "chat.txt", "align.json")  # fmt: skip


@dataclass(frozen=True)
class ReportConfig:
    """`lmforge report`: each field's comment is its help text."""

    run_dir: list[str] = field(default_factory=list, metadata={"metavar": "RUN_DIR"})  # run folders (or positional)
    out: str = ""  # folder for report.html, report.md and report_files/ ("" = the first run folder)
    title: str = ""  # the page's title ("" = "lmforge report: " and the run names)
    # results.json files (or their folders) of `lmforge eval --out DIR`: rows of the first run's eval table, named DIR
    eval: list[str] = field(default_factory=list, metadata={"metavar": "RESULTS_JSON"})

    def validate(self) -> ReportConfig:
        require([(bool(self.run_dir), "report needs a run folder: lmforge report RUN_DIR")])
        return self


def register(subparsers) -> None:
    help = "one HTML + Markdown page for a run: data funnel, curves, evals, samples"
    add_config_command(subparsers, "report", help, ReportConfig, _report, description=__doc__, positional=("run_dir",))


def _report(cfg: ReportConfig) -> Path:
    t0 = time.perf_counter()
    html_path, md_path = write_report(cfg.run_dir, cfg.out or None, cfg.title or None, cfg.eval)
    print(html_path)  # stdout holds the path alone, for scripts; the rest goes to stderr
    print(f"lmforge report: {md_path} and {md_path.parent / 'report_files'}/ too, in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)  # fmt: skip
    return html_path


def write_report(run_dirs, out_dir=None, title: str | None = None, evals=()) -> tuple[Path, Path]:
    """Write OUT/report.html (self-contained) and OUT/report.md (+ OUT/report_files/*.png) for `run_dirs`;
    `out_dir` None = the first run folder. Returns (html path, md path)."""
    from lmforge.fileio import atomic_write_bytes, atomic_write_text

    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise LmforgeError("report needs a run folder: lmforge report RUN_DIR")
    for run in runs:
        if not run.is_dir():
            raise LmforgeError(f"{run}: run folder not found")
        if not _is_run(run):
            raise LmforgeError(f"{run}: no lmforge run here (none of {', '.join(MARKERS)}, nor a stage folder)")
    extra = [_explicit_eval(Path(e)) for e in evals]
    out = Path(out_dir) if out_dir else runs[0]
    title = title or "lmforge report: " + ", ".join(r.resolve().name for r in runs)
    blocks: list[tuple] = [
        ("h", 1, title, "top"),
        ("p", f"generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
    ]
    for i, run in enumerate(runs):
        blocks += _run_blocks(run, f"r{i}", extra if i == 0 else [])
    for _, name, png, _ in (b for b in blocks if b[0] == "img"):
        atomic_write_bytes(out / "report_files" / name, png)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(title, blocks))
    atomic_write_text(md_path, render_md(blocks))
    return html_path, md_path


# ---- reading what a run holds: every reader returns (value, problem), problem None or "not found"/"unreadable: ..."


def _is_run(run: Path) -> bool:
    return (any((run / m).exists() for m in MARKERS) or any(run.glob("eval/*/results.json"))
            or any((d / "metrics.jsonl").is_file() for d in run.glob("*/") if d.is_dir()))  # fmt: skip


def _dict(value, key=None) -> dict:
    """`value[key]` (or `value`) when it is a mapping, else {}: a report of an older or damaged run still renders."""
    value = value.get(key) if key is not None and isinstance(value, dict) else value
    return value if isinstance(value, dict) else {}


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _read_json(path: Path, kind=dict):
    if not path.is_file():
        return None, "not found"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"unreadable: {_one_line(e)}"
    if not isinstance(value, kind):
        return None, f"unreadable: expected a JSON {'object' if kind is dict else kind.__name__}"
    return value, None


def _read_text(path: Path):
    try:
        return path.read_text(encoding="utf-8", errors="replace"), None
    except OSError as e:
        return None, f"unreadable: {_one_line(e)}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(train records, eval records, problems) of a metrics.jsonl: one record per step, sorted by step (a resumed
    run logs some steps twice: the later wins), eval records of a step merged (val loss and bpb may be apart)."""
    train: dict = {}
    evals: dict = {}
    bad = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                bad.append(f"line {n}: {_one_line(e)}")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                bad.append(f"line {n}: not a record with a step")
                continue
            if "loss" in rec:
                train[rec["step"]] = rec
            if any(k.startswith("val_") for k in rec):
                evals.setdefault(rec["step"], {}).update(rec)
    problems = [f"metrics.jsonl: {len(bad)} unreadable line(s), skipped: {'; '.join(bad[:3])}"] if bad else []
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], problems


def _explicit_eval(path: Path) -> tuple[str, dict]:
    """A --eval file: a results.json (or the folder holding one); a missing or bad one is an error."""
    path = path / "results.json" if path.is_dir() else path
    data, problem = _read_json(path)
    if problem is None and not isinstance(data.get("tasks"), dict):
        problem = "no `tasks` mapping (not from `lmforge eval --out`)"
    if problem:
        raise LmforgeError(f"--eval {path}: {problem}")
    return path.resolve().parent.name, data


@dataclass
class Stage:
    name: str
    folder: Path
    record: dict  # its stages.json entry ({} when none)
    train: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def _training_stages(run: Path, stages: dict) -> list[Stage]:
    """The training stages of a run, in the order they ran: a folder with metrics.jsonl or config.yaml, or one
    stages.json lists with a training config. A run folder that is itself a training run is its one stage."""
    if (run / "metrics.jsonl").is_file() or (run / "config.yaml").is_file():
        found = {run.resolve().name: run}
    else:
        found = {d.name: d for d in sorted(run.iterdir()) if d.is_dir() and not d.name.startswith(".")
                 and ((d / "metrics.jsonl").is_file() or (d / "config.yaml").is_file())}  # fmt: skip
    for name, rec in stages.items():
        if name not in DATA_STAGES and isinstance(rec, dict) and isinstance(rec.get("config"), dict):
            found.setdefault(name, run / name)
    order = list(stages)

    def rank(name: str):
        return (order.index(name) if name in order else len(order),
                KNOWN_ORDER.index(name) if name in KNOWN_ORDER else len(KNOWN_ORDER), name)  # fmt: skip

    out = []
    for name in sorted(found, key=rank):
        st = Stage(name, found[name], stages.get(name) if isinstance(stages.get(name), dict) else {})
        metrics = st.folder / "metrics.jsonl"
        if not st.folder.is_dir():
            st.problems.append(f"{st.folder}: not found")
        elif metrics.is_file():
            try:
                st.train, st.evals, st.problems = read_metrics(metrics)
            except OSError as e:
                st.problems.append(f"metrics.jsonl: unreadable: {_one_line(e)}")
        else:
            st.problems.append("metrics.jsonl: not found")
        out.append(st)
    return out


def _fmt(x, spec: str = ".4f") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    return format(round(x) if spec.endswith("d") else x, spec)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _train_seconds(train: list[dict]) -> float | None:
    """Σ tokens of each logged interval / the logged tokens/s: the time spent in steps (evaluation and saving
    excluded), an estimate since tokens/s is measured on the interval's last step."""
    total, prev, any_ = 0.0, 0, False
    for r in train:
        tok, tps = r.get("tokens"), r.get("tokens_per_s")
        if isinstance(tok, (int, float)) and isinstance(tps, (int, float)) and tps > 0 and tok >= prev:
            total, prev, any_ = total + (tok - prev) / tps, tok, True
    return total if any_ else None


def _approx(text: str) -> str:
    return text if text == "—" else f"≈ {text}"


def _wall(folder: Path) -> float | None:
    """From config.yaml's write (the stage's start, or its last resume) to metrics.jsonl's last."""
    try:
        return (folder / "metrics.jsonl").stat().st_mtime - (folder / "config.yaml").stat().st_mtime
    except OSError:
        return None


def _status(rec: dict) -> str:
    if not rec:
        return "—"
    if rec.get("stopped"):
        return f"stopped ({rec['stopped']})"
    return "done" if rec.get("done") else "unfinished"


# ---- the sections: each a list of blocks, rendered to HTML and Markdown alike


def _run_blocks(run: Path, rid: str, extra_evals: list) -> list[tuple]:
    stages, problem = _read_json(run / "stages.json") if (run / "stages.json").exists() else ({}, None)
    stages = {k: v for k, v in _dict(stages).items() if isinstance(v, dict)}
    training = _training_stages(run, stages)
    name = run.resolve().name
    blocks = [("h", 2, f"Run {name}", rid), ("p", str(run.resolve()))]
    if problem:
        blocks.append(("note", f"stages.json: {problem}"))
    for section in (_summary, _funnel, _tokenizer, _curves, _evals, _samples, _configs):
        blocks += section(run, rid, stages, training, extra_evals)
    return blocks


def _summary(run, rid, stages, training, _extra) -> list[tuple]:
    rows = []
    clean, _ = _read_json(run / "clean" / "report.json")
    tok, _ = _read_json(run / "tokenizer" / "train_report.json")
    index, _ = _read_json(run / "shards" / "index.json")
    data_rows = {
        "clean": (clean, lambda c: ("", f"{_fmt(_dict(c, 'counts').get('kept'), ',d')} docs kept", c.get("seconds"))),
        "tokenizer": (tok, lambda t: ("", f"vocab {_fmt(t.get('vocab_size'), 'd')}", t.get("train_seconds"))),
        "tokenize": (index, lambda i: ("", f"{_shard_tokens(i):,} tokens", None)),
    }
    for name in [s for s in DATA_STAGES if s in stages or data_rows[s][0]]:
        value, fn = data_rows[name]
        steps, tokens, secs = fn(value) if value else ("", "—", None)
        rows.append([name, _status(stages.get(name, {})), steps, tokens, _duration(secs), "—", "—", "—", "—", "—"])
    for st in training:
        last = st.train[-1] if st.train else {}
        val = st.evals[-1] if st.evals else {}
        step = st.record.get("step", last.get("step"))
        rows.append([st.name, _status(st.record), _fmt(step, "d") if isinstance(step, int) else "—",
                     f"{last['tokens']:,} tokens" if _int(last.get("tokens")) else "—",
                     _approx(_duration(_train_seconds(st.train))), _duration(_wall(st.folder)), _fmt(last.get("loss")),
                     _fmt(val.get("val_loss")), _fmt(val.get("val_bpb")), _fmt(val.get("val_accuracy"), ".3f")])  # fmt: skip
    if not rows:
        return []
    head = ["stage", "status", "steps", "output", "time", "wall", "train loss", "val loss", "val bits/byte", "val acc"]
    note = ("time: a data stage's own timing; a training stage's logged tokens / tokens per second (steps only). "
            "wall: from the stage's config.yaml to its last metrics line (the last start, if it resumed). "
            "Losses and validation figures are the last logged.")  # fmt: skip
    return [("h", 3, "Summary", f"{rid}-summary"), ("table", head, rows), ("note", note)]


def _shard_tokens(index: dict) -> int:
    shards = [s for v in _dict(index, "splits").values() if isinstance(v, list) for s in v]
    return sum(_int(_dict(s).get("num_tokens")) for s in shards)


def _text_bytes(folder: Path, key=None) -> tuple[dict, str | None]:
    """{group: UTF-8 bytes of text} over the JSONL of `folder`, grouped by `key(record)` (None: one group "")."""
    out: dict = {}
    try:
        files = sorted(folder.glob("*.jsonl"))
        if sum(f.stat().st_size for f in files) > MAX_BYTE_SCAN:
            return {}, f"{folder.name}/ is over {MAX_BYTE_SCAN >> 20} MB: bytes not counted"
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        n = len(rec["text"].encode("utf-8"))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue
                    g = key(rec) if key else ""
                    out[g] = out.get(g, 0) + n
    except OSError as e:
        return {}, f"{folder.name}/: unreadable: {_one_line(e)}"
    return out, None


def _funnel(run, rid, stages, _training, _extra) -> list[tuple]:
    if not (run / "clean").is_dir() and "clean" not in stages:
        return []
    blocks: list[tuple] = [("h", 3, "Data funnel", f"{rid}-funnel")]
    rep, problem = _read_json(run / "clean" / "report.json")
    if problem:
        return blocks + [("note", f"clean/report.json: {problem}")]
    c = _dict(rep, "counts")
    blocks.append(("p", f"{c.get('input', '?')} documents in: {c.get('kept', '?')} kept, {c.get('rejected', '?')} "
                        f"rejected, {c.get('unreadable', '?')} unreadable records"
                        + ("" if rep.get("identity_holds", True) else f" (does not add up: {rep.get('identity')})")))  # fmt: skip
    kept_b, note_k = _text_bytes(run / "clean" / "kept")
    rej_b, note_r = _text_bytes(run / "clean" / "rejected", lambda r: f"{r.get('step')}/{r.get('reason')}")
    scanned = note_k is None and note_r is None and (run / "clean" / "kept").is_dir()
    kept = (_int(c.get("kept")), kept_b.get("", 0) if scanned else None)
    rejected = [(r, _int(n), rej_b.get(r, 0) if scanned else None) for r, n in _dict(rep, "per_reason").items()]
    rows = [["kept", f"{kept[0]:,}", _fmt(kept[1], ",d")]] + [[r, f"{n:,}", _fmt(b, ",d")] for r, n, b in rejected]
    blocks += [("table", ["", "documents", "bytes of text"], rows)]
    blocks += [("note", n) for n in (note_k, note_r) if n]
    if "kept" in c:
        blocks.append(("img", f"{rid}-funnel.png", funnel_png(kept, rejected), "documents kept and rejected by reason"))
    per_step = _dict(rep, "per_step")
    if per_step:
        blocks.append(("table", ["step", "documents in", "rejected"],
                       [[s, _fmt(_dict(v).get("in"), ",d"), _fmt(_dict(v).get("rejected"), ",d")]
                        for s, v in per_step.items()]))  # fmt: skip
    per_lang = _dict(rep, "per_language")
    if per_lang:
        blocks.append(("table", ["language", "kept", "rejected"],
                       [[lang, _fmt(_dict(v).get("kept", 0), ",d"), _fmt(_dict(v).get("rejected", 0), ",d")]
                        for lang, v in per_lang.items()]))  # fmt: skip
    return blocks


def _tokenizer(run, rid, stages, _training, _extra) -> list[tuple]:
    if not any((run / d).is_dir() for d in ("tokenizer", "shards")) and not {"tokenizer", "tokenize"} & set(stages):
        return []
    blocks: list[tuple] = [("h", 3, "Tokenizer", f"{rid}-tokenizer")]
    rep, problem = _read_json(run / "tokenizer" / "train_report.json")
    if problem:
        blocks.append(("note", f"tokenizer/train_report.json: {problem}"))
    else:
        text = (f"vocabulary {rep.get('vocab_size', '?')} (asked for {rep.get('requested_vocab_size', '?')}), trained "
                f"on {_fmt(rep.get('train_docs'), ',d')} documents, {_fmt(rep.get('train_bytes'), ',d')} bytes in "
                f"{_duration(rep.get('train_seconds'))}")  # fmt: skip
        blocks.append(("p", text))
        rows = [[lang, _fmt(v.get("docs"), ",d"), _fmt(v.get("bytes"), ",d"), _fmt(v.get("bytes_per_token"), ".3f")]
                for lang, v in _dict(rep, "heldout_by_language").items() if isinstance(v, dict)]  # fmt: skip
        rows.append(["all", _fmt(rep.get("heldout_docs"), ",d"), _fmt(rep.get("heldout_bytes"), ",d"),
                     _fmt(rep.get("heldout_bytes_per_token"), ".3f")])  # fmt: skip
        blocks.append(("table", ["held-out text", "documents", "bytes", "bytes per token"], rows))
        scripts = _dict(rep, "vocab_scripts")
        if scripts:
            blocks.append(
                ("table", ["vocabulary by script", "tokens"], [[k, _fmt(v, ",d")] for k, v in scripts.items()])
            )
    if (run / "shards").is_dir() or "tokenize" in stages:
        index, problem = _read_json(run / "shards" / "index.json")
        if problem:
            blocks.append(("note", f"shards/index.json: {problem}"))
        else:
            rows = []
            for split, shards in _dict(index, "splits").items():
                shards = [_dict(s) for s in shards] if isinstance(shards, list) else []
                t, d, b = (sum(_int(s.get(k)) for s in shards) for k in ("num_tokens", "num_docs", "num_bytes"))
                rows.append([split, f"{len(shards)}", f"{t:,}", f"{d:,}", f"{b:,}", _fmt(b / t if t else None, ".3f")])
            blocks.append(("table", ["shards", "files", "tokens", "documents", "bytes", "bytes per token"], rows))
    return blocks


def _curves(run, rid, _stages, training, _extra) -> list[tuple]:
    if not training:
        return []
    blocks: list[tuple] = [("h", 3, "Training curves", f"{rid}-curves")]
    for st in training:
        blocks.append(("h", 4, st.name, f"{rid}-curves-{_slug(st.name)}"))
        blocks += [("note", p) for p in st.problems]
        png = curves_png(st.name, st.train, st.evals)
        if png:
            blocks.append(("img", f"{rid}-curves-{_slug(st.name)}.png", png, f"{st.name}: loss, lr, tokens/s"))
        elif not st.problems:
            blocks.append(("note", "metrics.jsonl: no records to plot"))
    return blocks


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "_"


EVAL_KINDS = {  # (the key that says which kind a task is, its column header, its cell)
    "mc": ("acc_norm", "acc_norm [95%]", lambda r: f"{_fmt(r.get('acc_norm'), '.3f')} "
                                                   f"[{_fmt(r.get('acc_norm_lo'), '.3f')}, {_fmt(r.get('acc_norm_hi'), '.3f')}]"),
    "gen": ("exact_match", "exact match [95%]", lambda r: f"{_fmt(r.get('exact_match'), '.3f')} "
                                                          f"[{_fmt(r.get('exact_match_lo'), '.3f')}, {_fmt(r.get('exact_match_hi'), '.3f')}]"),
    "ppl": ("bpb", "bits/byte", lambda r: _fmt(r.get("bpb"), ".4f")),
}  # fmt: skip


def _eval_kind(result) -> str | None:
    return next((k for k, (key, _, _) in EVAL_KINDS.items() if isinstance(result, dict) and key in result), None)


def _run_evals(run: Path, training: list[Stage]) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(label, results)], problems): RUN/eval/results.json, RUN/eval/<stage>/results.json in stage order and
    RUN/<stage>/eval/results.json."""
    order = [st.name for st in training]
    found = [(run.resolve().name, run / "eval" / "results.json")]
    subs = [d for d in (run / "eval").glob("*/") if d.is_dir()] if (run / "eval").is_dir() else []
    subs.sort(key=lambda d: (order.index(d.name) if d.name in order else len(order), d.name))
    found += [(d.name, d / "results.json") for d in subs]
    found += [(st.name, st.folder / "eval" / "results.json") for st in training]
    out, problems, seen = [], [], set()
    for label, path in found:
        if not path.exists() or path.resolve() in seen:  # a single run folder's eval/ is also its stage's
            continue
        seen.add(path.resolve())
        data, problem = _read_json(path)
        if problem is None and not isinstance(data.get("tasks"), dict):
            problem = "unreadable: no `tasks` mapping"
        if problem:
            problems.append(f"{path.relative_to(run)}: {problem}")
        else:
            out.append((label, data))
    return out, problems


def _evals(run, rid, _stages, training, extra) -> list[tuple]:
    results, problems = _run_evals(run, training)
    results += extra
    blocks: list[tuple] = [("note", p) for p in problems]
    if results:
        tasks: dict = {}
        for _, data in results:
            for task, r in data["tasks"].items():  # the tasks in the order they first appear
                if _eval_kind(r) and task not in tasks:
                    tasks[task] = (_eval_kind(r), r.get("chance"))
        head = ["stage"] + [f"{t} {EVAL_KINDS[k][1]}" + (f" (chance {_fmt(c, '.2f')})" if c else "")
                            for t, (k, c) in tasks.items()]  # fmt: skip
        rows = [[label] + [EVAL_KINDS[k][2](data["tasks"][t]) if _eval_kind(data["tasks"].get(t)) == k else "—"
                           for t, (k, _) in tasks.items()] for label, data in results]  # fmt: skip
        note = ("multiple choice: acc_norm (accuracy by per-character log-likelihood) with its 95% Wilson interval; "
                "generative tasks: greedy exact match; text: bits per byte (lower is better)")  # fmt: skip
        blocks += [("table", head, rows), ("note", note)]
    for st in training:  # held-out task accuracy before and after alignment (grpo/eval/step_*.json)
        rows = []
        for f in sorted((st.folder / "eval").glob("step_*.json")) if (st.folder / "eval").is_dir() else []:
            data, problem = _read_json(f)
            correct = data.get("correct") if data else None
            if problem or not isinstance(correct, list) or not correct:
                rows.append([f.name, "—", problem or "unreadable: no `correct` list"])
                continue
            k, n = sum(1 for c in correct if c), len(correct)
            lo, hi = wilson_interval(k, n)
            rows.append([_fmt(data.get("step"), "d") if isinstance(data.get("step"), int) else f.name, f"{n}",
                         f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"])  # fmt: skip
        if rows:
            blocks += [("p", f"{st.name}: held-out task accuracy during training ({st.name}/eval/step_*.json)"),
                       ("table", ["step", "prompts", "exact match [95%]"], rows)]  # fmt: skip
    if (run / "align.json").exists():
        align, problem = _read_json(run / "align.json")
        summary = align.get("summary") if align else None
        blocks.append(
            ("p", f"alignment: {summary}")
            if isinstance(summary, str)
            else ("note", f"align.json: {problem or 'no summary'}")
        )
    return [("h", 3, "Evaluations", f"{rid}-evals")] + blocks if blocks else []


def _samples(run, rid, _stages, training, _extra) -> list[tuple]:
    files = [run / "samples.txt", run / "chat.txt"] + [st.folder / "samples.txt" for st in training if st.folder != run]
    blocks = []
    for f in (f for f in files if f.exists()):
        text, problem = _read_text(f)
        if text is not None and len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + f"\n[... cut: {len(text) - MAX_TEXT:,} more characters in the file]"
        where = str(f.relative_to(run)) if f.is_relative_to(run) else str(f)
        blocks.append(("pre", where, text) if problem is None else ("note", f"{where}: {problem}"))
    return [("h", 3, "Samples", f"{rid}-samples")] + blocks if blocks else []


def _configs(run, rid, stages, training, _extra) -> list[tuple]:
    blocks = []
    with_yaml = {st.name for st in training if (st.folder / "config.yaml").is_file()}
    for name, rec in stages.items():  # the stages without a config.yaml: what stages.json recorded
        if name not in with_yaml and isinstance(rec, dict) and isinstance(rec.get("config"), dict):
            text = json.dumps(rec["config"], indent=2, ensure_ascii=False)
            blocks.append(("details", f"{name} (stages.json)", text))
    for st in training:
        if st.name in with_yaml:
            text, problem = _read_text(st.folder / "config.yaml")
            blocks.append(("details", f"{st.name}/config.yaml", text) if text is not None else ("note", problem))
    return [("h", 3, "Configs", f"{rid}-configs")] + blocks if blocks else []
