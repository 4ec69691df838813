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

Scoring shares the prompt across the choices of one question: the prompt and every choice are packed into
one row, the prompt run once, each choice attending to the prompt and to itself (a test holds it equal to
scoring each prompt + choice in full). Items come from a file reader by layout; a row with a missing column, an answer outside
the choices, or no choices is a one-line error naming the file and row.
"""

from __future__ import annotations

import bisect
import csv
import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.data.readers import JSONL_SUFFIXES
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson_interval
from lmforge.model import cpu_kernels

LETTERS = "ABCDEFGHIJ"
PACK_TOKENS = 256  # score_groups fills rows with groups up to this (attention runs over whole rows: keep them short)
SPLIT_TOKENS = 1024  # a group longer than this is split over rows (many choices), unless one continuation needs more
HEAD_ROWS = 1024  # scored positions per output-head product: the (rows x vocabulary) log-probabilities at once
# Tokens (rows x longest row) of one scoring forward. On a CPU the activations of 2,048 tokens stay in cache between the
# norms, RoPE, SwiGLU and attention: 600 demo-model items scored 1.30x faster than with 8,192, SmolLM2's 1.15x
# (benchmarks/score_batch.py, BENCHMARKS.md); an accelerator wants the larger batches.
CPU_BATCH_TOKENS = 2048
BATCH_TOKENS = 8192


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


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 for the log-softmax (bf16/fp16 models), a float64 model's kept in float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@torch.no_grad()
def score_pair(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """(log P(cont | ctx), whether cont is the greedy continuation), from one forward pass over the last
    max_seq_len tokens of ctx + cont (the harness's truncation: the oldest context goes first)."""
    device = next(model.parameters()).device
    ids = (ctx + cont)[-(model.cfg.max_seq_len + 1) :][:-1]
    logits, _ = model(torch.tensor([ids], device=device))
    return _sum_logp(torch.log_softmax(_at_least_fp32(logits[0, -len(cont) :]), -1), cont)


def _sum_logp(logp: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(sum of log P of `cont`'s tokens, whether each is the argmax) from their rows of log-probabilities."""
    target = torch.tensor(cont, device=logp.device)
    ll = float(logp.gather(1, target[:, None]).double().sum())  # a float32 sum of ~1,000 nats is off by 1e-4
    return ll, bool((cpu_kernels.greedy(logp) == target).all())


@torch.no_grad()
def score_groups(model, groups: list[tuple[list[int], list[list[int]]]], budget: int | None = None,
                 done=None) -> list[list[tuple[float, bool]]]:  # fmt: skip
    """score_pair for every continuation of every (context, continuations) group, batched: each context runs
    once for all its continuations, and many groups run in one forward.

    A group is packed as its context followed by every continuation but its last token, with an attention mask
    that lets each continuation see its context and itself and nothing else (_score_packed). Groups are packed
    into rows of PACK_TOKENS (best fit, longest first; a longer group has a row of its own), so rows carry
    little padding, and rows are batched while rows x longest row stays under `budget` tokens (None: CPU_BATCH_TOKENS on
    a CPU, BATCH_TOKENS elsewhere). A group with
    many choices is split over pieces of at most SPLIT_TOKENS, each with its own copy of the context. A group
    whose context + continuation do not fit max_seq_len is scored pair by pair with score_pair's truncation,
    as the harness does. `done(n)` is called with the number of continuations scored.
    """
    max_len = model.cfg.max_seq_len
    budget = budget or (CPU_BATCH_TOKENS if next(model.parameters()).device.type == "cpu" else BATCH_TOKENS)
    out: list[list] = [[None] * len(conts) for _, conts in groups]
    pieces: list[tuple[int, int, list[int]]] = []  # (tokens, group, the continuations packed with its context)
    for g, (ctx, conts) in enumerate(groups):
        if not ctx or len(ctx) + max(len(c) for c in conts) - 1 > max_len:
            out[g] = [score_pair(model, ctx, c) for c in conts]
            if done is not None:
                done(len(conts))
            continue
        piece, length = [], len(ctx)
        for k, c in enumerate(conts):
            if piece and length + len(c) - 1 > SPLIT_TOKENS:
                pieces.append((length, g, piece))
                piece, length = [], len(ctx)
            piece.append(k)
            length += len(c) - 1
        pieces.append((length, g, piece))
    rows = pack_rows(pieces, PACK_TOKENS)
    i = 0
    while i < len(rows):
        j = i + 1  # rows sorted by length: the last of a batch is its longest
        while j < len(rows) and (j + 1 - i) * sum(p[0] for p in rows[j]) <= budget:
            j += 1
        batch = [[(groups[g][0], [groups[g][1][k] for k in ks]) for _, g, ks in row] for row in rows[i:j]]
        for row, row_scores in zip(rows[i:j], _score_packed(model, batch), strict=True):
            for (_, g, ks), scores in zip(row, row_scores, strict=True):
                for k, score in zip(ks, scores, strict=True):
                    out[g][k] = score
        if done is not None:
            done(sum(len(ks) for row in rows[i:j] for _, _, ks in row))
        i = j
    return out


def pack_rows(pieces: list[tuple], capacity: int) -> list[list[tuple]]:
    """Pieces (length, ...) packed into rows of at most `capacity` tokens, best fit (the fullest row it fits),
    longest first; a piece longer than capacity gets a row of its own. Rows come sorted by their length."""
    rows: list[list[tuple]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for piece in sorted(pieces, key=lambda p: -p[0]):
        at = bisect.bisect_left(free, (piece[0], -1))
        if at < len(free):
            room, r = free.pop(at)
            rows[r].append(piece)
            bisect.insort(free, (room - piece[0], r))
        else:
            rows.append([piece])
            if piece[0] < capacity:
                bisect.insort(free, (capacity - piece[0], len(rows) - 1))
    return sorted(rows, key=lambda row: sum(p[0] for p in row))


def score_pairs(model, pairs: list[tuple[list[int], list[int]]], budget: int | None = None,
                done=None) -> list[tuple[float, bool]]:  # fmt: skip
    """score_pair for each (context, continuation), through score_groups: pairs with the same context tokens
    (the choices of one question) share one run of it. `done(n)`: pairs finished, for a progress bar."""
    by_ctx: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        by_ctx.setdefault(tuple(ctx), []).append(i)
    groups = [(list(ctx), [pairs[i][1] for i in idx]) for ctx, idx in by_ctx.items()]
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    for idx, scores in zip(by_ctx.values(), score_groups(model, groups, budget, done), strict=True):
        for i, score in zip(idx, scores, strict=True):
            out[i] = score
    return out


def _score_packed(model, rows) -> list[list[list[tuple[float, bool]]]]:
    """score_groups' forward over one batch: each row a list of (context, continuations) groups, each group laid
    out as [context | c1[:-1] | c2[:-1] | ...], rows right-padded.

    Each continuation's tokens sit at the positions that follow its context (as if it were the only one) and
    attend to that context and to their own earlier tokens only, so every hidden state is the one of context +
    that continuation run alone. The context's last token predicts each continuation's first token; a
    continuation's token i predicts its token i + 1 (its last token predicts nothing, so it is not run). Only
    those scored positions go through the output head, in blocks of HEAD_ROWS.
    """
    device = next(model.parameters()).device
    T = max(sum(len(ctx) + sum(len(c) - 1 for c in conts) for ctx, conts in row) for row in rows)
    # per row and slot: token, position, segment (a context or one continuation) and the segment of its context
    tokens, positions, segment, context = [], [], [], []
    at, slots, targets, owners = [], [], [], []  # per scored token: its row and slot, what it scores, whose it is
    n_conts = 0
    for r, row in enumerate(rows):
        tok, pos, seg, ctx_seg = [], [], [], []
        for ctx, conts in row:
            P, s0, start = len(ctx), len(seg), len(tok)
            tok += ctx
            pos += range(P)
            seg += [s0] * P
            ctx_seg += [s0] * P
            for k, c in enumerate(conts, 1):
                n = len(c) - 1
                at += [r] * (n + 1)
                slots += [start + P - 1] + list(range(len(tok), len(tok) + n))
                targets += c
                owners += [n_conts] * (n + 1)
                n_conts += 1
                tok += c[:-1]
                pos += range(P, P + n)
                seg += [s0 + k] * n
                ctx_seg += [s0] * n
        pad = T - len(tok)  # padding comes after every real token and sees only padding
        tokens.append(tok + [0] * pad)
        positions.append(pos + [0] * pad)
        segment.append(seg + [-1] * pad)
        context.append(ctx_seg + [-1] * pad)
    seg_t, ctx_t = torch.tensor(segment, device=device), torch.tensor(context, device=device)
    slot = torch.arange(T, device=device)
    mask = (slot[None, None, :] <= slot[None, :, None]) & (
        (seg_t[:, None, :] == seg_t[:, :, None]) | (seg_t[:, None, :] == ctx_t[:, :, None])
    )  # (rows, query, key)
    idx, pos_t = torch.tensor(tokens, device=device), torch.tensor(positions, device=device)
    hidden, _ = model(idx, positions=pos_t, attn_mask=mask, return_hidden=True)
    hidden = hidden[torch.tensor(at, device=device), torch.tensor(slots, device=device)]
    target = torch.tensor(targets, device=device)
    token_ll, token_greedy = [], []
    for s in range(0, len(target), HEAD_ROWS):
        logp = torch.log_softmax(_at_least_fp32(model.lm_head(hidden[s : s + HEAD_ROWS])), -1)
        token_ll.append(logp.gather(1, target[s : s + HEAD_ROWS, None])[:, 0].double())
        token_greedy.append(cpu_kernels.greedy(logp) == target[s : s + HEAD_ROWS])
    owner = torch.tensor(owners, device=device)
    # a float32 sum of ~1,000 nats is off by 1e-4: sum in float64
    ll = torch.zeros(n_conts, dtype=torch.float64, device=device).index_add_(0, owner, torch.cat(token_ll))
    misses = torch.zeros(n_conts, dtype=torch.long, device=device).index_add_(
        0, owner, (~torch.cat(token_greedy)).long()
    )
    ll, misses = ll.tolist(), misses.tolist()
    out, n = [], 0
    for row in rows:
        out.append([])
        for _, conts in row:
            out[-1].append([(ll[n + k], misses[n + k] == 0) for k in range(len(conts))])
            n += len(conts)
    return out


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
