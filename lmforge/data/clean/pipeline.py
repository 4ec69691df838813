"""Run cleaning steps over a corpus; write kept and rejected JSONL and `report.json`.

    lmforge data clean --input raw/ --out runs/clean --config pipeline.yaml --workers 2

    from lmforge.data.clean.pipeline import clean_corpus
    report = clean_corpus(["raw/"], "runs/clean", steps=[{"name": "normalize"}, {"name": "exact_dedup"}])

Order: the per-document steps run first, in the configured order, over chunks of documents (in this
process, or in a pool of `workers` forked processes: results come back in input order, so the output
does not depend on `workers`); then the whole-corpus steps (dedup) run in the configured order over
the survivors, streamed from a temporary file, in this process. A per-document step listed after a
dedup step still runs before it.

Outputs: `OUT/kept/part-00000.jsonl` and `OUT/rejected/part-00000.jsonl` (records `{"id", "text",
"source", "metadata"}`, rejected ones with `step` and `reason`), each written atomically, and
`OUT/report.json` last: counts per step, per reason, per language, per input file, the unreadable
records (file, line, why), and the accounting identity `input == kept + rejected + unreadable`,
where `input` counts every record met: documents read plus unreadable records and files.

Config file (YAML): `steps: [{name: normalize}, {name: gopher_quality, min_words: 50}, ...]`, and
optionally `text_field`, `id_field`, `workers`. Unknown keys or step options are an `LmforgeError`.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.clean.document import Document, Unreadable, list_inputs, read_file
from lmforge.data.clean.steps import DEFAULT_STEPS, configure
from lmforge.data.clean.steps.text import word_backend
from lmforge.data.parallel import ordered_map
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path, atomic_write_json

CHUNK_DOCS = 256  # documents per task sent to a worker
CONFIG_KEYS = {"steps", "text_field", "id_field", "workers"}


def load_config(path: str | Path) -> dict:
    """The YAML pipeline config at `path`, with its top-level keys checked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such config file")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{path}: expected a mapping with a `steps` list")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise LmforgeError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(CONFIG_KEYS))})")
    steps = cfg.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) and "name" in s for s in steps):
        raise LmforgeError(f"{path}: `steps` must be a list of mappings, each with a `name`")
    return cfg


def configure_spec(spec: dict):
    """The (step, options) of a spec `{name, **options}`."""
    return configure(spec["name"], {k: v for k, v in spec.items() if k != "name"})


def resolve_steps(
    specs: list[dict] | None, names: list[str] | None = None, languages: list[str] | None = None
) -> list[dict]:
    """Step specs `[{name, **options}]`: `names` picks steps (options from `specs` where given), `languages`
    sets the language step's `languages`; every spec is checked (unknown name or option -> LmforgeError)."""
    specs = [dict(s) for s in (specs or [{"name": n} for n in DEFAULT_STEPS])]
    if names:
        by_name = {s["name"]: s for s in specs}
        specs = [dict(by_name.get(n, {"name": n})) for n in names]
    for s in specs:
        if languages is not None and s["name"] == "language":
            s["languages"] = list(languages)
        configure_spec(s)
    if not specs:
        raise LmforgeError("no cleaning steps given")
    if languages is not None and not any(s["name"] == "language" for s in specs):
        raise LmforgeError("--languages needs the `language` step among the steps")
    return specs


# --- per-document steps (in this process or in pool workers) ---

_doc_steps: list = []  # [(name, apply, cfg)] of this process


def _init_steps(specs: list[dict]) -> None:
    global _doc_steps
    built = [(s["name"], configure_spec(s)) for s in specs]
    _doc_steps = [(name, step.apply, cfg) for name, (step, cfg) in built if not step.corpus]


def run_document(doc: Document) -> tuple[Document, str | None, str | None]:
    """(document, step, reason): step and reason are None when every per-document step kept it."""
    if not doc.text.strip() and "html" not in doc.metadata:
        return doc, "input", "empty_text"
    for name, apply, cfg in _doc_steps:
        out = apply(doc, cfg)
        if isinstance(out, str):
            return doc, name, out
        doc = out
    if not doc.text.strip():  # the steps left nothing
        return doc, "output", "empty_text"
    return doc, None, None


def _run_chunk(chunk: list[Document]) -> list[tuple[Document, str | None, str | None]]:
    return [run_document(doc) for doc in chunk]


def _results(chunks: Iterator[list[Document]], specs: list[dict], workers: int):
    """`_run_chunk` results in input order, here or across a pool of `workers` forked processes."""
    _init_steps(specs)
    names = {s["name"] for s in specs}
    if "language" in names:  # load the model before forking so workers share it
        from lmforge.data.clean.steps.language import identifier

        identifier()
    if workers == 1:
        yield from map(_run_chunk, chunks)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=_init_steps, initargs=(specs,)) as pool:
        yield from ordered_map(pool, _run_chunk, chunks, ahead=2 * workers)


# --- the stage ---


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def clean_corpus(
    inputs: list[str | Path],
    out: str | Path,
    *,
    steps: list[dict] | None = None,
    workers: int | None = None,
    text_field: str = "text",
    id_field: str = "id",
    progress: bool = True,
) -> dict:
    """Clean the documents under `inputs` into `out` (see the module docstring); return the report."""
    t0 = time.perf_counter()
    specs = resolve_steps(steps)
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise LmforgeError(f"--workers must be at least 1, got {workers}")
    files = list_inputs(inputs)  # a missing input fails before `out` is touched
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)  # the folder is unfinished until the new report lands

    bad: list[Unreadable] = []
    per_file = {str(f): collections.Counter() for f in files}
    per_step = {s["name"]: collections.Counter() for s in specs}
    per_reason: collections.Counter = collections.Counter()
    per_language: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts = collections.Counter()

    def chunks() -> Iterator[list[Document]]:
        chunk: list[Document] = []
        for f in files:
            before = len(bad)
            for doc in read_file(f, bad, text_field, id_field):
                per_file[str(f)]["input"] += 1
                chunk.append(doc)
                if len(chunk) >= CHUNK_DOCS:
                    yield chunk
                    chunk = []
            per_file[str(f)]["unreadable"] += len(bad) - before
            per_file[str(f)]["input"] += len(bad) - before
        if chunk:
            yield chunk

    def reject(rej, doc: Document, step: str, reason: str) -> None:
        file = doc.file
        rej.write(_line({**doc.to_record(), "step": step, "reason": reason}))
        counts["rejected"] += 1
        per_file[file]["rejected"] += 1
        per_reason[f"{step}/{reason}"] += 1
        if step in per_step:
            per_step[step]["rejected"] += 1
        per_language[doc.metadata.get("language", "unknown")]["rejected"] += 1

    from tqdm import tqdm

    bar = tqdm(desc="clean", unit="doc", disable=None if progress else True)
    doc_steps = [s["name"] for s in specs if not configure_spec(s)[0].corpus]
    with (
        atomic_path(out / "rejected" / "part-00000.jsonl") as rej_path,
        tempfile.TemporaryDirectory(dir=out, prefix=".clean-") as tmp,
        open(rej_path, "w", encoding="utf-8") as rej,
    ):
        surv_path = Path(tmp) / "survivors.jsonl"
        with open(surv_path, "w", encoding="utf-8") as surv:
            for results in _results(chunks(), specs, workers):
                for doc, step, reason in results:
                    counts["read"] += 1
                    ran = doc_steps[: doc_steps.index(step) + 1] if step in doc_steps else doc_steps
                    for name in [] if step == "input" else ran:
                        per_step[name]["in"] += 1
                    if step is None:
                        surv.write(_line({**doc.to_record(), "file": doc.file}))
                    else:
                        reject(rej, doc, step, reason)
                bar.update(len(results))
        bar.close()
        checkers = [(s["name"], step.make(cfg)) for s in specs for step, cfg in [configure_spec(s)] if step.corpus]
        with (
            atomic_path(out / "kept" / "part-00000.jsonl") as kept_path,
            open(kept_path, "w", encoding="utf-8") as kept,
            open(surv_path, encoding="utf-8") as surv,
        ):
            for line in tqdm(surv, desc="dedup", unit="doc", disable=None if progress and checkers else True):
                doc = Document(**json.loads(line))
                reason = None
                for name, check in checkers:
                    per_step[name]["in"] += 1
                    reason = check(doc)
                    if reason is not None:
                        reject(rej, doc, name, reason)
                        break
                if reason is None:
                    kept.write(_line(doc.to_record()))
                    counts["kept"] += 1
                    per_file[doc.file]["kept"] += 1
                    per_language[doc.metadata.get("language", "unknown")]["kept"] += 1

    n_input = counts["read"] + len(bad)
    kept_n, rej_n, bad_n = counts["kept"], counts["rejected"], len(bad)
    holds = n_input == kept_n + rej_n + bad_n and all(
        c["input"] == c["kept"] + c["rejected"] + c["unreadable"] for c in per_file.values()
    )
    seconds = time.perf_counter() - t0
    report = {
        "inputs": [str(p) for p in inputs],
        "out": str(out),
        "steps": specs,
        "workers": workers,
        "word_counting": word_backend(),
        "counts": {"input": n_input, "kept": kept_n, "rejected": rej_n, "unreadable": bad_n},
        "identity": (
            f"input == kept + rejected + unreadable: {n_input} {'==' if holds else '!='} {kept_n} + {rej_n} + {bad_n}"
        ),
        "identity_holds": holds,
        "per_step": {name: {"in": c["in"], "rejected": c["rejected"]} for name, c in per_step.items()},
        "per_reason": dict(sorted(per_reason.items())),
        "per_language": {lang: dict(c) for lang, c in sorted(per_language.items())},
        "per_file": {f: {k: c[k] for k in ("input", "kept", "rejected", "unreadable")} for f, c in per_file.items()},
        "unreadable": [b.to_record() for b in bad],
        "seconds": round(seconds, 3),
        "docs_per_second": round(counts["read"] / max(seconds, 1e-9), 1),
    }
    atomic_write_json(out / "report.json", report)
    if not holds:  # a bug in this module, not in the input: say so loudly
        raise LmforgeError(f"{out / 'report.json'}: accounting does not add up ({report['identity']})")
    return report


def format_summary(report: dict) -> str:
    c = report["counts"]
    lines = [
        (
            f"clean: {report['out']}: {c['kept']:,} kept, {c['rejected']:,} rejected, {c['unreadable']:,} unreadable"
            f" of {c['input']:,} input records ({report['docs_per_second']:,} docs/s)"
        ),
        f"  {report['identity']}",
    ]
    lines += [f"  rejected {reason}: {n:,}" for reason, n in report["per_reason"].items()]
    lines += [f"  unreadable {u['file']}:{u['line'] or '-'}: {u['why']}" for u in report["unreadable"][:10]]
    if len(report["unreadable"]) > 10:
        lines.append(f"  ... {len(report['unreadable']) - 10} more unreadable in report.json")
    return "\n".join(lines)
