"""`lmforge data clean`: clean, filter and deduplicate a raw corpus (the work is in `pipeline.py`).

lmforge data clean --input raw/ --out runs/clean [--config pipeline.yaml] [--steps normalize,language]
                   [--languages en,zh] [--workers 2] [--executor ray] [--restart]

Rerunning the same command after a crash resumes it: finished shards are kept in OUT/.work/ (see pipeline.py).
"""

from __future__ import annotations

import argparse

from lmforge.data import data_subparsers


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subparsers) -> None:
    from lmforge.data.clean.pipeline import CHUNK_DOCS
    from lmforge.data.clean.steps import DEFAULT_STEPS, STEPS
    from lmforge.data.readers import MAX_RECORD_BYTES, add_split_args

    p = data_subparsers(subparsers).add_parser("clean", help="clean, filter and deduplicate a raw corpus")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".jsonl(.gz/.zst), .txt or .html files, or folders of them")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder: kept/, rejected/, report.json")
    p.add_argument("--config", help="pipeline YAML: steps: [{name: gopher_quality, min_words: 50}, ...]")
    p.add_argument("--steps", type=_csv, metavar="NAME,NAME",
                   help=f"steps to run, in order (known: {', '.join(STEPS)}; default: config's, "
                   f"else {','.join(DEFAULT_STEPS)})")  # fmt: skip
    p.add_argument("--languages", type=_csv, metavar="CODE,CODE", help="languages the `language` step keeps")
    p.add_argument("--workers", type=int, default=None, help="processes for per-document steps (default: cpu count)")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="where per-document steps run: local processes (default) or Ray tasks "
                   "(a local Ray instance of --workers CPUs, or the cluster at RAY_ADDRESS); dedup runs here")  # fmt: skip
    p.add_argument("--shard-docs", type=int, default=None, metavar="N",
                   help=f"documents per shard, the unit of work and of resume (default {CHUNK_DOCS})")  # fmt: skip
    p.add_argument("--restart", action="store_true",
                   help="discard the finished shards of an interrupted run in OUT/.work instead of resuming")  # fmt: skip
    p.add_argument("--text-field", default=None, help="JSONL field holding the text (default text)")
    p.add_argument("--id-field", default=None, help="JSONL field holding the id (default id, else file:line)")
    p.add_argument("--max-record-bytes", type=int, default=None, metavar="N",
                   help=f"larger records (a JSONL line, a text/HTML file, a WARC payload) are skipped and counted "
                   f"unreadable (default {MAX_RECORD_BYTES:,})")  # fmt: skip
    add_split_args(p, defaults=False)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lmforge.data.clean.pipeline import clean_corpus, format_summary, load_config, resolve_steps
    from lmforge.data.readers import split_from_args

    cfg = load_config(args.config) if args.config else {}
    specs = resolve_steps(cfg.get("steps"), args.steps, args.languages)
    report = clean_corpus(
        args.input,
        args.out,
        steps=specs,
        workers=args.workers or cfg.get("workers"),
        text_field=args.text_field or cfg.get("text_field", "text"),
        id_field=args.id_field or cfg.get("id_field", "id"),
        max_record_bytes=args.max_record_bytes or cfg.get("max_record_bytes"),
        executor=args.executor or cfg.get("executor", "local"),
        shard_docs=args.shard_docs if args.shard_docs is not None else cfg.get("shard_docs"),
        restart=args.restart,
        split=split_from_args(args, cfg),
    )
    print(format_summary(report))
    return 0
