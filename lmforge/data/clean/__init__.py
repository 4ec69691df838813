"""`lmforge data clean`: read raw corpora, run cleaning/filtering/dedup steps, write kept and rejected JSONL.

    lmforge data clean --input raw/ --out runs/clean [--config pipeline.yaml] [--steps normalize,gopher_quality]

Modules: `steps/` (one small unit per step, chosen by name from `steps.STEPS`), `pipeline.py` (runs them,
writes outputs and report.json), `cli.py`. Inputs are read by `lmforge/data/readers.py`, the registry every
command shares, with its forgiving policy (an unreadable record is counted, not an error).
"""
