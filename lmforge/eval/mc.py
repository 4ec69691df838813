"""Multiple-choice evaluation by log-likelihood: items, the task files users have, prompts, scoring, metrics.

    from lmforge.eval.mc import read_items, prompts_for, score_items, summarize
    items = read_items("mmlu/test/")                 # MMLU / C-Eval / CMMLU CSV, or JSONL (ARC, HellaSwag, plain)
    requests = prompts_for(items, form="letter", shots=5, pool=dev_items, seed=0)
    results = score_items(model, tokenizer, requests)  # log P(choice | prompt) per choice
    print(summarize(items, results))                  # acc, acc_norm with 95% intervals, per subject

Each choice is scored as the continuation of the item's prompt: the sum of its tokens' log-probabilities
given the prompt (lm-evaluation-harness's `loglikelihood`, with its tokenization: the prompt's trailing
whitespace moves to the continuation, and the continuation is `encode(prompt + choice)` after
`encode(prompt)`). `acc` picks the most likely choice; `acc_norm` the most likely per character of the
choice text (the harness's length normalization), which matters when choices differ in length.

Two prompt forms:
- letter (MMLU's): the question, the choices as `A. ...`, then `Answer:` (C-Eval and CMMLU: `答案：`);
  the choices scored are the letters. Models under ~1B sit at chance on this form.
- cloze: the question, then `Answer:` (`答案：`), and each choice's own text is scored, which small
  models can do.

Scoring shares the prompt across the choices of one question: the prompt runs once, each choice attending to
the prompt and to itself (lmforge/eval/scoring.py; a test holds it equal to scoring each prompt + choice in full).
Items come from a file reader by layout; a row with a missing column, an answer outside the choices, or no choices
is a one-line error naming the file and row.
"""

from __future__ import annotations

import csv
import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.data.readers import JSONL_SUFFIXES
from lmforge.errors import LmforgeError
from lmforge.eval.scoring import score_groups, score_pair, score_pairs
from lmforge.eval.stats import wilson_interval

LETTERS = "ABCDEFGHIJ"


@dataclass
class Item:
    """One multiple-choice question: its choices' texts and the index of the right one."""

    question: str
    choices: list[str]
    answer: int
    subject: str = ""
    lang: str = "en"  # "zh" picks the Chinese prompt words
    where: str = ""  # FILE:ROW, for errors and per-item results
    context_only: bool = False  # the question is a passage to continue (HellaSwag, next line), not a question


@dataclass
class Request:
    """What is scored for one item: the prompt, and one continuation per choice."""

    item: Item
    prompt: str
    continuations: list[str]
    lengths: list[int] = field(default_factory=list)  # characters of each choice's text (acc_norm)


def _has_cjk(text: str) -> bool:
    return sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) * 0.1


def _letter_index(value, n: int, where: str) -> int:
    text = unicodedata.normalize("NFKC", str(value)).strip()  # a full-width `Ａ` is an A
    if len(text) == 1 and text.upper() in LETTERS[:n]:
        return LETTERS.index(text.upper())
    if text.isdigit() and 0 <= int(text) < n:
        return int(text)
    raise LmforgeError(f"{where}: answer {value!r} is not one of the {n} choices ({LETTERS[:n]} or 0-{n - 1})")


def _check(item: Item) -> Item:
    if len(item.choices) < 2:
        raise LmforgeError(f"{item.where}: needs at least 2 choices, got {len(item.choices)}")
    if any(not isinstance(c, str) or not c.strip() for c in item.choices):
        raise LmforgeError(f"{item.where}: an empty choice")
    if not isinstance(item.question, str):
        raise LmforgeError(f"{item.where}: the question is not text")
    return item


# --- readers: the layouts users have on disk ---


def _csv_items(path: Path) -> list[Item]:
    """MMLU (no header: question, A, B, C, D, answer), C-Eval (id, question, A-D, answer[, explanation]) and
    CMMLU (an index column, Question, A-D, Answer) CSV files; the subject is the file name without its split."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise LmforgeError(f"{path}: empty file")
    head = [c.strip().lower() for c in rows[0]]
    subject = path.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
    items = []
    if "question" in head and "answer" in head and all(x in head for x in ("a", "b")):
        cols = {name: head.index(name) for name in head}
        letters = [x for x in "abcdefghij" if x in cols]
        for i, row in enumerate(rows[1:], start=2):
            where = f"{path}:{i}"
            if len(row) < len(head):
                raise LmforgeError(f"{where}: {len(row)} columns, the header has {len(head)}")
            choices = [row[cols[x]] for x in letters]
            items.append(Item(row[cols["question"]], choices, _letter_index(row[cols["answer"]], len(choices), where),
                              subject, "zh" if _has_cjk(row[cols["question"]]) else "en", where))  # fmt: skip
    else:  # MMLU: no header
        for i, row in enumerate(rows, start=1):
            where = f"{path}:{i}"
            if len(row) < 4:
                raise LmforgeError(f"{where}: expected question, choices..., answer; got {len(row)} columns")
            choices = row[1:-1]
            items.append(Item(row[0], choices, _letter_index(row[-1], len(choices), where), subject,
                              "zh" if _has_cjk(row[0]) else "en", where))  # fmt: skip
    return [_check(it) for it in items]


def _json_item(rec: dict, where: str, subject: str) -> Item:
    """One JSONL record: plain ({question, choices, answer}), ARC ({question: {stem, choices: [{label, text}]},
    answerKey}) or HellaSwag ({ctx, endings, label})."""
    if "endings" in rec and "ctx" in rec:  # HellaSwag: continue the context
        return Item(rec["ctx"], list(rec["endings"]), _letter_index(rec.get("label"), len(rec["endings"]), where),
                    rec.get("activity_label", subject), "en", where, context_only=True)  # fmt: skip
    q = rec.get("question", rec.get("query"))
    if isinstance(q, dict) and "stem" in q:  # ARC
        labels = [c["label"] for c in q["choices"]]
        key = str(rec.get("answerKey", "")).strip()
        if key not in labels:
            raise LmforgeError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        return Item(q["stem"], [c["text"] for c in q["choices"]], labels.index(key), subject, "en", where)
    if q is None or "choices" not in rec:
        raise LmforgeError(f"{where}: a record needs question and choices (or ARC's or HellaSwag's fields)")
    choices = rec["choices"]
    if isinstance(choices, dict) and "text" in choices:  # the Hugging Face ARC layout
        labels = list(choices.get("label", LETTERS[: len(choices["text"])]))
        choices = list(choices["text"])
        answer = rec.get("answerKey", rec.get("answer"))
        answer = labels.index(answer) if answer in labels else _letter_index(answer, len(choices), where)
    else:
        answer = _letter_index(rec.get("answer", rec.get("label", rec.get("gold"))), len(choices), where)
    return Item(str(q), list(choices), answer, rec.get("subject", subject), "zh" if _has_cjk(str(q)) else "en", where)


def _jsonl_items(path: Path) -> list[Item]:
    """The items of a JSONL file (also .jsonl.gz/.zst), read by the registry every command shares, strictly."""
    from lmforge.data.readers import Strict, read_records

    items = []
    for rec, where, _ in read_records(path, Strict()):
        if not isinstance(rec, dict):
            raise LmforgeError(f"{where}: a record must be a JSON object")
        items.append(_check(_json_item(rec, where, path.name.split(".")[0])))
    return items


def read_items(path: str | Path) -> list[Item]:
    """The items of a task file (`.csv`, `.jsonl`) or of every such file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith((".csv", *JSONL_SUFFIXES)))
        if not files:
            raise LmforgeError(f"{path}: no .csv or .jsonl task files")
    elif path.is_file():
        files = [path]
    else:
        raise LmforgeError(f"{path}: no such task file or folder")
    items = []
    for f in files:
        if f.suffix == ".csv":
            items += _csv_items(f)
        elif f.name.endswith(JSONL_SUFFIXES):
            items += _jsonl_items(f)
        else:
            raise LmforgeError(f"{f}: unsupported task file (expected .csv, .jsonl, .jsonl.gz or .jsonl.zst)")
    if not items:
        raise LmforgeError(f"{path}: no items")
    return items


# --- prompts ---


def _render(item: Item, form: str, with_answer: bool) -> tuple[str, list[str]]:
    """(prompt text, continuations) of an item; with_answer appends the right continuation (a few-shot example)."""
    zh = item.lang == "zh"
    answer_word = "答案：" if zh else "Answer:"
    sep = "" if zh else " "
    if item.context_only:  # continue the text: the choices are endings
        prompt, conts = (
            item.question,
            [(sep if not item.question.endswith(("\n", " ")) else "") + c for c in item.choices],
        )
    elif form == "letter":
        lines = [item.question.strip(), *(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(item.choices))]
        prompt, conts = "\n".join(lines) + f"\n{answer_word}", [f"{sep}{LETTERS[i]}" for i in range(len(item.choices))]
    else:
        question_word = "问题：" if zh else "Question: "
        prompt, conts = (
            f"{question_word}{item.question.strip()}\n{answer_word}",
            [f"{sep}{c.strip()}" for c in item.choices],
        )
    if with_answer:
        return prompt + conts[item.answer], conts
    return prompt, conts


def prompts_for(items: list[Item], form: str = "cloze", shots: int = 0, pool: list[Item] | None = None,
                seed: int = 0) -> list[Request]:  # fmt: skip
    """A scoring request per item: `shots` solved examples (drawn with `seed` from `pool`, else from the other
    items of the same subject) before the item's prompt, in the given form (`letter` or `cloze`)."""
    if form not in ("letter", "cloze"):
        raise LmforgeError(f"form must be letter or cloze, got {form!r}")
    by_subject = defaultdict(list)
    for it in pool if pool is not None else items:
        by_subject[it.subject].append(it)
    requests = []
    for n, item in enumerate(items):
        examples = ""
        if shots:
            candidates = [c for c in (by_subject.get(item.subject) or (pool or items)) if c is not item]
            if len(candidates) < shots:
                raise LmforgeError(f"{item.where}: {shots}-shot needs {shots} other items of subject "
                                   f"{item.subject!r}, the pool has {len(candidates)}")  # fmt: skip
            picked = random.Random(f"{seed}:{n}").sample(candidates, shots)
            examples = "".join(_render(ex, form, True)[0] + "\n\n" for ex in picked)
        prompt, conts = _render(item, form, False)
        requests.append(Request(item, examples + prompt, conts, [max(1, len(c.strip())) for c in item.choices]))
    return requests


# --- scoring ---


def _split_tokens(tokenizer, prompt: str, conts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids) of each continuation, as the harness makes them: trailing spaces of the
    prompt go to the continuation; the continuation is what encoding the whole adds after the prompt's own
    encoding. The prompt is encoded once for all its choices."""
    n = len(prompt) - len(prompt.rstrip(" "))
    head, spaces = prompt[: len(prompt) - n], prompt[len(prompt) - n :]
    ctx = tokenizer.encode(head).ids
    pairs = []
    for whole in tokenizer.encode_batch([head + spaces + c for c in conts]):
        ids = whole.ids
        # The prompt's last token merged across the boundary: score from the token before it.
        own = ctx if ids[: len(ctx)] == ctx or len(ctx) < 2 else ids[: len(ctx) - 1]
        pairs.append((own, ids[len(own) :]))
    return pairs


def unknown_token_id(tokenizer) -> int | None:
    """The id a tokenizer without byte fallback gives text it cannot encode (None for a byte-level BPE, such as
    lmforge's own, which encodes everything): a score over it would be meaningless."""
    unk = getattr(tokenizer.model, "unk_token", None)
    return tokenizer.token_to_id(unk) if unk else None


def _checked_pairs(tokenizer, req: Request, max_len: int) -> list[tuple[list[int], list[int]]]:
    pairs = _split_tokens(tokenizer, req.prompt, req.continuations)
    if any(not cont for _, cont in pairs):
        raise LmforgeError(f"{req.item.where}: a choice encodes to no tokens")
    unk = unknown_token_id(tokenizer)
    if unk is not None and any(unk in ctx or unk in cont for ctx, cont in pairs):
        raise LmforgeError(f"{req.item.where}: the model's tokenizer cannot encode this item's text (it gives the "
                           "unknown token)")  # fmt: skip
    longest = max(len(c) for _, c in pairs)
    if longest >= max_len:
        raise LmforgeError(f"{req.item.where}: a choice of {longest} tokens does not fit the model's max_seq_len "
                           f"{max_len} (leave the item out with --limit, or use a model with a longer context)")  # fmt: skip
    return pairs


@torch.no_grad()
def score_request(model, tokenizer, req: Request, share_prompt: bool = True) -> list[tuple[float, bool]]:
    """[(log P(continuation | prompt), whether it is the greedy continuation)] for each choice of `req`.

    share_prompt: run the prompt once for all choices (score_groups); else run every prompt + continuation
    in full (the reference the test compares with).
    """
    pairs = _checked_pairs(tokenizer, req, model.cfg.max_seq_len)
    if share_prompt and len({tuple(ctx) for ctx, _ in pairs}) == 1:
        return score_groups(model, [(pairs[0][0], [c for _, c in pairs])])[0]
    return [score_pair(model, ctx, cont) for ctx, cont in pairs]


def score_items(model, tokenizer, requests: list[Request], progress: bool = False) -> list[dict]:
    """Per item: the log-likelihood of each choice, the picks of acc and acc_norm, and whether each is right."""
    from tqdm import tqdm

    was = model.training
    model.eval()
    max_len = model.cfg.max_seq_len
    pairs = [_checked_pairs(tokenizer, req, max_len) for req in requests]
    flat = [pair for item_pairs in pairs for pair in item_pairs]
    with tqdm(total=len(flat), desc="eval", disable=not progress, mininterval=1.0) as bar:
        scored = iter(score_pairs(model, flat, done=bar.update))
    # A prompt whose last token merged with a choice's first (_split_tokens) gives that choice its own context.
    lls = [[next(scored)[0] for _ in item_pairs] for item_pairs in pairs]
    results = []
    for req, ll in zip(requests, lls, strict=True):
        pick = max(range(len(ll)), key=ll.__getitem__)
        pick_norm = max(range(len(ll)), key=lambda i: ll[i] / req.lengths[i])
        results.append({"where": req.item.where, "subject": req.item.subject, "answer": req.item.answer,
                        "loglikelihoods": ll, "pick": pick, "pick_norm": pick_norm,
                        "correct": pick == req.item.answer, "correct_norm": pick_norm == req.item.answer})  # fmt: skip
    model.train(was)
    return results


def summarize(results: list[dict], n_choices: list[int]) -> dict:
    """acc and acc_norm with 95% Wilson intervals, chance level, and the same per subject."""

    def block(rows, chances) -> dict:
        n = len(rows)
        right, right_norm = sum(r["correct"] for r in rows), sum(r["correct_norm"] for r in rows)
        lo, hi = wilson_interval(right, n)
        lo_n, hi_n = wilson_interval(right_norm, n)
        return {"n": n, "acc": right / n, "acc_lo": lo, "acc_hi": hi, "acc_norm": right_norm / n,
                "acc_norm_lo": lo_n, "acc_norm_hi": hi_n, "chance": sum(1 / c for c in chances) / n}  # fmt: skip

    out = block(results, n_choices)
    subjects = defaultdict(list)
    for r, c in zip(results, n_choices, strict=True):
        subjects[r["subject"]].append((r, c))
    if len(subjects) > 1:
        out["subjects"] = {s: block([r for r, _ in rc], [c for _, c in rc]) for s, rc in sorted(subjects.items())}
    return out
