"""Run cleaning steps over a corpus; write kept and rejected JSONL and `report.json`; resume after a crash.

    lmforge data clean --input raw/ --out runs/clean --config pipeline.yaml --workers 2
    lmforge data clean --input raw/ --out runs/clean --executor ray --workers 8     # per-document stage on Ray

    from lmforge.data.clean.pipeline import clean_corpus
    report = clean_corpus(["raw/"], "runs/clean", steps=[{"name": "normalize"}, {"name": "exact_dedup"}])

Order: the per-document steps run first, in the configured order, over shards of documents; then the
whole-corpus steps (dedup) run in the configured order over the survivors, shard after shard, in this
process. A per-document step listed after a dedup step still runs before it. A whole-corpus step checks one
survivor at a time, or rewrites (`substring_dedup`): it reads all the survivors of the steps before it,
then passes each on, its text possibly cut, or rejects it (`corpus_stage`).

Shards: the input files are read in order (`list_inputs`) as one stream of documents, cut into shards
of `shard_docs` documents (default `CHUNK_DOCS`), a shard closing early once it holds `CHUNK_BYTES`
characters of text or HTML. Shard `k` is the same documents whatever the executor or the number of
workers, so it can be computed anywhere and committed once; a file's unreadable records belong to the
shard being filled when they are met (a corpus with no documents at all is one empty shard). Cutting
the one stream, not each file, keeps a corpus of many small `.txt`/`.html` files to few shards. Each
shard is one task (`process_shard`) for the executor (`executors.py`: this process, forked processes,
or Ray tasks); the tasks only run the per-document steps. Dedup stays in this process, executor or not:
the first of a set of duplicates is the earliest in input order, and the exact hashes and the MinHash
LSH buckets are one in-memory index (see `steps/dedup.py`).

Work folder and resume: `OUT/.work/` (hidden, so no reader of `OUT` meets it) holds `manifest.json`
(the config and the inputs' paths, sizes and mtimes, and their fingerprint) and, per finished shard,
`shards/NNNNNN/` with `survivors.jsonl`, `rejected.jsonl` and `counts.json`, written under a
temporary name and renamed, so a shard folder is whole or absent. Rerunning the same command after a
crash (even `kill -9`, in either stage; with any executor or number of workers) reads the inputs again
(parsing only), skips the per-document work of every committed shard, runs the rest, then the whole
dedup stage again over all shards: kept/ and rejected/ are byte-identical to an uninterrupted run's,
and so is report.json but for the values of `RUN_KEYS` (timing, workers, executor, shards reused).
Rerunning with another config or changed inputs (path, size or mtime) while an unfinished work folder
is there is an error naming what differs; `--restart` discards it. Not seen: an input rewritten with
its size and mtime kept, a new version of a step's library, a Hub dataset's new revision (`hf:NAME` is
fingerprinted by name). Once report.json is written the work folder is removed.

Outputs: `OUT/kept/part-00000.jsonl` and `OUT/rejected/part-00000.jsonl` (records `{"id", "text",
"source", "metadata"}`, rejected ones with `step` and `reason`: the per-document rejections in input
order, then the dedup ones), each written atomically, and `OUT/report.json` last (removed at the start,
so a folder without it is unfinished): counts per step, per reason, per language, per input file, the
unreadable records (file, line, why), and the accounting identity `input == kept + rejected +
unreadable`, where `input` counts every record met: documents read plus unreadable records and files.

Config file (YAML): `steps: [{name: normalize}, {name: gopher_quality, min_words: 50}, ...]`, and
optionally `text_field`, `id_field`, `max_record_bytes` (a larger record is skipped and counted unreadable:
see `lmforge/data/readers.py`), `workers`, `executor`, `shard_docs`. Unknown keys or step options
are an `LmforgeError`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.clean.executors import check_executor, map_shards
from lmforge.data.clean.steps import DEFAULT_STEPS, configure
from lmforge.data.clean.steps.text import word_backend
from lmforge.data.readers import MAX_RECORD_BYTES, Document, Unreadable, list_inputs, read_file
from lmforge.data.textsplit import TextSplit
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, atomic_path, atomic_write_json

CHUNK_DOCS = 256  # documents per shard (the default `shard_docs`): one task for a worker, one commit
CHUNK_BYTES = 1 << 20  # characters of text (or HTML) at which a shard closes early: long documents
CONFIG_KEYS = {
    "steps",
    "text_field",
    "id_field",
    "max_record_bytes",
    "workers",
    "executor",
    "shard_docs",
    "doc_sep",
    "doc_bytes",
    "max_doc_bytes",
}
WORK = ".work"  # under OUT
WORK_VERSION = 1  # of the work folder's layout; part of the fingerprint
RUN_KEYS = ("workers", "executor", "shards", "seconds", "docs_per_second")  # report keys that describe the run


def load_config(path: str | Path) -> dict:
    """The YAML pipeline config at `path`, with its top-level keys checked."""
    from lmforge.config import load_config_file

    path = Path(path)
    cfg = load_config_file(path, CONFIG_KEYS, "a `steps` list")
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


# --- per-document steps: one shard, in this process, a pool worker or a Ray worker ---

_doc_steps: list = []  # [(name, apply, cfg)] of this process
_doc_steps_key: str | None = None  # the specs they were built from


def _init_steps(specs: list[dict]) -> None:
    global _doc_steps, _doc_steps_key
    key = json.dumps(specs, sort_keys=True)
    if key == _doc_steps_key:  # a worker builds its steps once, not per shard
        return
    built = [(s["name"], configure_spec(s)) for s in specs]
    _doc_steps = [(name, step.apply, cfg) for name, (step, cfg) in built if not step.corpus]
    _doc_steps_key = key


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


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def process_shard(task: tuple[list[dict], list[Document]]) -> dict:
    """Run the per-document steps of `specs` over one shard's documents: the survivors' and the rejected
    JSONL lines, and the counts they add (per step, reason, language, file). A pure function of `task`."""
    specs, docs = task
    _init_steps(specs)
    names = [name for name, _, _ in _doc_steps]
    survivors, rejected = [], []
    per_step = {name: {"in": 0, "rejected": 0} for name in names}
    per_reason: collections.Counter = collections.Counter()
    per_language: collections.Counter = collections.Counter()  # rejected, by language
    per_file: collections.Counter = collections.Counter()  # rejected, by input file
    for doc in docs:
        doc, step, reason = run_document(doc)
        ran = names[: names.index(step) + 1] if step in names else names
        for name in [] if step == "input" else ran:
            per_step[name]["in"] += 1
        if step is None:
            survivors.append(_line({**doc.to_record(), "file": doc.file}))
            continue
        rejected.append(_line({**doc.to_record(), "step": step, "reason": reason}))
        per_file[doc.file] += 1
        per_reason[f"{step}/{reason}"] += 1
        if step in per_step:
            per_step[step]["rejected"] += 1
        per_language[doc.metadata.get("language", "unknown")] += 1
    counts = {
        "docs": len(docs),
        "survivors": len(survivors),
        "rejected": len(rejected),
        "per_step": per_step,
        "per_reason": dict(per_reason),
        "per_language_rejected": dict(per_language),
        "per_file_rejected": dict(per_file),
    }
    return {"survivors": "".join(survivors), "rejected": "".join(rejected), "counts": counts}


# --- shards and the work folder ---


def _read_shards(
    files: list, text_field: str, id_field: str, shard_docs: int, max_record_bytes: int, split: TextSplit
) -> Iterator[tuple]:
    """(k, documents, unreadable records met while filling it) for each shard `k` of the input stream."""
    bad: list[Unreadable] = []
    docs: list[Document] = []
    k = size = seen = 0
    for f in files:
        for doc in read_file(f, bad, text_field, id_field, max_record_bytes, split):
            docs.append(doc)
            size += len(doc.text) + len(doc.metadata.get("html", ""))
            if len(docs) >= shard_docs or size >= CHUNK_BYTES:
                yield k, docs, bad[seen:]
                k, docs, size, seen = k + 1, [], 0, len(bad)
    if docs or len(bad) > seen or k == 0:
        yield k, docs, bad[seen:]


def input_stat(f) -> dict:
    """What identifies the contents of input `f` without reading it: path, size, mtime (of each file of a
    local dataset folder). A Hub dataset (`hf:NAME`) is known by its name only."""
    if not isinstance(f, Path):
        local = Path(getattr(f, "name", str(f))).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return {"path": str(f), "files": [[str(p.relative_to(local)), *_size_mtime(p)] for p in files]}
    return {"path": str(f), "realpath": os.path.realpath(f), "size_mtime": _size_mtime(f)}


def _size_mtime(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _manifest(
    files: list,
    specs: list[dict],
    text_field: str,
    id_field: str,
    shard_docs: int,
    max_record_bytes: int,
    split: TextSplit,
) -> dict:
    from lmforge import __version__

    what = {
        "version": WORK_VERSION,
        "lmforge": __version__,
        "steps": specs,
        "fields": {"text": text_field, "id": id_field, "max_record_bytes": max_record_bytes},
        "text_split": split.to_dict(),
        "shards": {"docs": shard_docs, "chars": CHUNK_BYTES},
        "inputs": [input_stat(f) for f in files],
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return {"fingerprint": digest, **what}


def _open_work(work: Path, manifest: dict, restart: bool) -> set[int]:
    """Prepare `work` for this run; the shards already committed there. An unfinished work folder of another
    config or other inputs is an error, unless `restart` (then it is discarded)."""
    path = work / "manifest.json"
    if restart or (work.exists() and not path.is_file()):  # killed before the manifest landed: nothing to keep
        shutil.rmtree(work, ignore_errors=True)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") != manifest["fingerprint"]:
            differ = [k for k in manifest if k != "fingerprint" and old.get(k) != manifest[k]] or ["the manifest"]
            raise LmforgeError(
                f"{work}: unfinished shards of a run with other {', '.join(differ)}; rerun with --restart "
                "to discard them, or use a new --out"
            )
    else:
        atomic_write_json(path, manifest)
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for p in shards.iterdir():
        if p.name.startswith("."):  # a shard killed before its rename
            shutil.rmtree(p, ignore_errors=True)
    return {int(p.name) for p in shards.iterdir() if p.name.isdigit() and (p / "counts.json").is_file()}


def _shard_dir(work: Path, k: int) -> Path:
    return work / "shards" / f"{k:06d}"


def _commit_shard(work: Path, k: int, result: dict, read: dict) -> None:
    """Write shard `k`'s results and counts (`read`: what reading it met) as one folder, atomically."""
    with atomic_dir(_shard_dir(work, k)) as tmp:
        (tmp / "survivors.jsonl").write_text(result["survivors"], encoding="utf-8")
        (tmp / "rejected.jsonl").write_text(result["rejected"], encoding="utf-8")
        (tmp / "counts.json").write_text(json.dumps({"shard": k, **result["counts"], **read}) + "\n")


def _read_counts(docs: list[Document], bad: list[Unreadable]) -> dict:
    per_file: dict[str, dict[str, int]] = {}
    for file, unreadable in [(d.file, 0) for d in docs] + [(b.file, 1) for b in bad]:
        c = per_file.setdefault(file, {"input": 0, "unreadable": 0})
        c["input"] += 1
        c["unreadable"] += unreadable
    return {"per_file_read": per_file, "unreadable": [b.to_record() for b in bad]}


def _remove_temps(out: Path) -> None:
    """Temporary files of a run killed while writing kept/ or rejected/."""
    for sub in ("kept", "rejected"):
        for p in (out / sub).glob(".part-*.tmp"):
            p.unlink(missing_ok=True)


def corpus_stage(name: str, check, docs: Iterator[Document], counts, reject) -> Iterator[Document]:
    """The documents whole-corpus step `name` keeps, in input order; `reject(doc, name, reason)` gets the others.

    `check` is what the step's `make(cfg)` built: a checker `(doc) -> reason | None`, fed one document at a
    time, or a rewriting step (an object with `rewrite`, e.g. `substring_dedup`): `rewrite(docs)` takes the
    stream of the survivors of the steps before it and yields `(doc, reason)` once per document, in input
    order, with the text possibly changed; it may read every document before it yields the first."""
    rewrite = getattr(check, "rewrite", None)
    for doc, reason in rewrite(docs) if rewrite else ((doc, check(doc)) for doc in docs):
        counts["in"] += 1
        if reason is None:
            yield doc
        else:
            reject(doc, name, reason)


# --- the stage ---


def clean_corpus(
    inputs: list[str | Path],
    out: str | Path,
    *,
    steps: list[dict] | None = None,
    workers: int | None = None,
    text_field: str = "text",
    id_field: str = "id",
    max_record_bytes: int | None = None,
    progress: bool = True,
    executor: str = "local",
    shard_docs: int | None = None,
    restart: bool = False,
    split: TextSplit | None = None,
) -> dict:
    """Clean the documents under `inputs` into `out`, resuming an interrupted run of the same config there
    (see the module docstring); return the report."""
    t0 = time.perf_counter()
    specs = resolve_steps(steps)
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise LmforgeError(f"--workers must be at least 1, got {workers}")
    shard_docs = CHUNK_DOCS if shard_docs is None else shard_docs
    if shard_docs < 1:
        raise LmforgeError(f"--shard-docs must be at least 1, got {shard_docs}")
    check_executor(executor)
    max_record_bytes = MAX_RECORD_BYTES if max_record_bytes is None else max_record_bytes
    if max_record_bytes < 1:
        raise LmforgeError(f"max_record_bytes must be at least 1, got {max_record_bytes}")
    split = split or TextSplit()
    files = list_inputs(inputs)  # a missing input fails before `out` is touched
    out = Path(out)
    work = out / WORK
    manifest = _manifest(files, specs, text_field, id_field, shard_docs, max_record_bytes, split)
    done = _open_work(work, manifest, restart)
    (out / "report.json").unlink(missing_ok=True)  # the folder is unfinished until the new report lands
    _remove_temps(out)

    from tqdm import tqdm

    bar = tqdm(desc="clean", unit="doc", disable=None if progress else True)
    n_shards = 0
    reading: dict[int, dict] = {}  # what reading met, per shard in flight

    def tasks():
        nonlocal n_shards
        prepared = executor != "local"
        for k, docs, bad in _read_shards(files, text_field, id_field, shard_docs, max_record_bytes, split):
            n_shards = k + 1
            if k in done:
                bar.update(len(docs))
                continue
            if not prepared:  # before the pool forks, so its workers share them: the steps and the language
                _init_steps(specs)  # model, loaded only when a shard is left to run
                if any(s["name"] == "language" for s in specs):
                    from lmforge.data.clean.steps.language import identifier

                    identifier()
                prepared = True
            reading[k] = _read_counts(docs, bad)
            yield k, (specs, docs)

    for k, result in map_shards(executor, workers, process_shard, tasks()):
        _commit_shard(work, k, result, reading.pop(k))
        bar.update(result["counts"]["docs"])
    bar.close()

    # Merge every shard's counts in shard order (committed now or by an earlier run: the same path).
    per_file = {str(f): collections.Counter() for f in files}
    per_step = {s["name"]: collections.Counter() for s in specs}
    per_reason: collections.Counter = collections.Counter()
    per_language: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    counts = collections.Counter()
    unreadable: list[dict] = []
    for k in range(n_shards):
        c = json.loads((_shard_dir(work, k) / "counts.json").read_text(encoding="utf-8"))
        counts["read"] += c["docs"]
        counts["rejected"] += c["rejected"]
        for name, sc in c["per_step"].items():
            per_step[name].update(sc)
        per_reason.update(c["per_reason"])
        for lang, n in c["per_language_rejected"].items():
            per_language[lang]["rejected"] += n
        for file, fc in c["per_file_read"].items():
            per_file[file].update(fc)
        for file, n in c["per_file_rejected"].items():
            per_file[file]["rejected"] += n
        unreadable.extend(c["unreadable"])

    def survivors() -> Iterator[Document]:
        for k in range(n_shards):
            with open(_shard_dir(work, k) / "survivors.jsonl", encoding="utf-8") as f:
                for line in f:
                    yield Document(**json.loads(line))

    checkers = [(s["name"], step.make(cfg)) for s in specs for step, cfg in [configure_spec(s)] if step.corpus]
    with (
        atomic_path(out / "rejected" / "part-00000.jsonl") as rej_path,
        open(rej_path, "w", encoding="utf-8") as rej,
        atomic_path(out / "kept" / "part-00000.jsonl") as kept_path,
        open(kept_path, "w", encoding="utf-8") as kept,
    ):
        for k in range(n_shards):  # the per-document rejections first, in input order
            with open(_shard_dir(work, k) / "rejected.jsonl", encoding="utf-8") as f:
                shutil.copyfileobj(f, rej)
        n_survivors = counts["read"] - counts["rejected"]
        disable = None if progress and checkers else True

        def reject(doc: Document, name: str, reason: str) -> None:
            rej.write(_line({**doc.to_record(), "step": name, "reason": reason}))
            counts["rejected"] += 1
            per_file[doc.file]["rejected"] += 1
            per_reason[f"{name}/{reason}"] += 1
            per_step[name]["rejected"] += 1
            per_language[doc.metadata.get("language", "unknown")]["rejected"] += 1

        stream = tqdm(survivors(), desc="dedup", unit="doc", total=n_survivors, disable=disable)
        for name, check in checkers:  # chained: each document passes every checker before the next is read
            stream = corpus_stage(name, check, stream, per_step[name], reject)
        for doc in stream:
            kept.write(_line(doc.to_record()))
            counts["kept"] += 1
            per_file[doc.file]["kept"] += 1
            per_language[doc.metadata.get("language", "unknown")]["kept"] += 1

    n_input = counts["read"] + len(unreadable)
    kept_n, rej_n, bad_n = counts["kept"], counts["rejected"], len(unreadable)
    holds = n_input == kept_n + rej_n + bad_n and all(
        c["input"] == c["kept"] + c["rejected"] + c["unreadable"] for c in per_file.values()
    )
    seconds = time.perf_counter() - t0
    report = {
        "inputs": [str(p) for p in inputs],
        "out": str(out),
        "steps": specs,
        "workers": workers,
        "executor": executor,
        "shards": {"total": n_shards, "reused": len(done & set(range(n_shards))), "docs_per_shard": shard_docs},
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
        "unreadable": unreadable,
        "seconds": round(seconds, 3),
        "docs_per_second": round(counts["read"] / max(seconds, 1e-9), 1),
    }
    atomic_write_json(out / "report.json", report)
    shutil.rmtree(work)  # the outputs are whole: the shards are no longer needed
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
    shards = report.get("shards", {})
    if shards.get("reused"):
        lines.append(f"  resumed: {shards['reused']:,} of {shards['total']:,} shards reused from the interrupted run")
    lines += [f"  rejected {reason}: {n:,}" for reason, n in report["per_reason"].items()]
    lines += [f"  unreadable {u['file']}:{u['line'] or '-'}: {u['why']}" for u in report["unreadable"][:10]]
    if len(report["unreadable"]) > 10:
        lines.append(f"  ... {len(report['unreadable']) - 10} more unreadable in report.json")
    return "\n".join(lines)
