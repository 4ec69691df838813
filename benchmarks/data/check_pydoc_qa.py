"""Validate benchmarks/data/pydoc_qa.jsonl, the hand-made QA set over `pydoc_data.topics`.

Run from the repository root:

    python benchmarks/data/check_pydoc_qa.py [path/to/pydoc_qa.jsonl]

Each line must be {"id", "topic", "question", "answers", "evidence"} where `topic` is a key of
`pydoc_data.topics.topics`, `answers` is a non-empty list of short strings (the first, canonical,
one has 1-4 words and occurs case-insensitively in `evidence`), and `evidence` (8-40 words) is a
verbatim substring of one passage of `split_passages(topics[topic], max_words=128, overlap=16)`.
Ids must be unique. Prints the number of items and topics; exits 1 on any failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from pydoc_data.topics import topics

from lmforge.rag.passages import split_passages

DEFAULT = Path(__file__).with_name("pydoc_qa.jsonl")
FIELDS = {"id", "topic", "question", "answers", "evidence"}


def check(path: Path) -> list[str]:
    errors: list[str] = []
    seen: set[str] = set()
    used_topics: set[str] = set()
    passages: dict[str, list[str]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: bad JSON ({e})")
            continue
        where = f"line {n} ({item.get('id', '?') if isinstance(item, dict) else '?'})"
        if not isinstance(item, dict) or set(item) != FIELDS:
            errors.append(f"{where}: fields must be exactly {sorted(FIELDS)}")
            continue
        iid, topic, question, answers, evidence = (item[k] for k in ("id", "topic", "question", "answers", "evidence"))
        if not isinstance(iid, str) or not iid:
            errors.append(f"{where}: id must be a non-empty string")
        elif iid in seen:
            errors.append(f"{where}: duplicate id {iid}")
        seen.add(iid)
        if not isinstance(question, str) or not question.strip():
            errors.append(f"{where}: question must be a non-empty string")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
            errors.append(f"{where}: answers must be a non-empty list of non-empty strings")
            continue
        if not 1 <= len(answers[0].split()) <= 4:
            errors.append(f"{where}: first answer {answers[0]!r} must have 1-4 words")
        if topic not in topics:
            errors.append(f"{where}: unknown topic {topic!r}")
            continue
        used_topics.add(topic)
        if not isinstance(evidence, str) or not 8 <= len(evidence.split()) <= 40:
            errors.append(f"{where}: evidence must be a string of 8-40 words")
            continue
        if evidence not in topics[topic]:
            errors.append(f"{where}: evidence is not a verbatim substring of topics[{topic!r}]")
        if topic not in passages:
            passages[topic] = [p.text for p in split_passages(topics[topic], max_words=128, overlap=16)]
        if not any(evidence in p for p in passages[topic]):
            errors.append(f"{where}: evidence does not lie inside a single passage")
        if answers[0].lower() not in evidence.lower():
            errors.append(f"{where}: first answer {answers[0]!r} not found in evidence")
    print(f"{len(lines)} items, {len(used_topics)} topics")
    return errors


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    errors = check(path)
    for e in errors:
        print("FAIL", e)
    print("OK" if not errors else f"{len(errors)} failure(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
