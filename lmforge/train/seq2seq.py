"""Seq2seq fine-tuning of an encoder-decoder (T5): `lmforge sft` when --model is a T5 run.

    lmforge sft --model runs/t5 --data pairs.jsonl --out runs/t5-sft --max-steps 300

The conversations `lmforge sft` reads (JSONL Alpaca/ShareGPT/messages, or a packaged set) become input ->
target pairs: each assistant turn is a target, the turns before it the input (a single user turn as it is,
longer histories as `role: text` lines). The encoder reads the input once, the decoder learns the target behind
the start (padding) id, and the loss is the target's tokens and its end-of-text token. Inputs longer than
seq_len are cut (counted in data_report.json); a target longer than target_len is a one-line error naming the
conversation, since a cut target would teach the model to stop mid-answer. At the end, samples.txt holds
greedy outputs for held-out inputs and the exact-match count.
"""

from __future__ import annotations

import math
import sys

import torch

from lmforge.errors import LmforgeError
from lmforge.eval.loss import evaluate_loss
from lmforge.fileio import atomic_write_text
from lmforge.model.losses import IGNORE_INDEX
from lmforge.train.loop import next_token_step, train_loop


def pairs_of(conv: list[dict]) -> list[tuple[str, str]]:
    """(input, target) for each assistant turn of a conversation."""
    out = []
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        before = [x for x in conv[:i] if x["role"] != "system" or i == 0]
        user_only = len(before) == 1 and before[0]["role"] == "user"
        text = before[0]["content"] if user_only else "\n".join(f"{x['role']}: {x['content']}" for x in before)
        out.append((text, m["content"]))
    return out


def encode_pairs(pairs, tok, eos: int, src_len: int, tgt_len: int, where: str) -> tuple[list, int]:
    """[(input ids, target ids + eos)] and how many inputs were cut to src_len."""
    out, cut = [], 0
    for n, (text, target) in enumerate(pairs):
        src = tok.encode(text, add_special_tokens=False).ids + [eos]
        tgt = tok.encode(target, add_special_tokens=False).ids + [eos]
        if len(tgt) > tgt_len:
            raise LmforgeError(f"{where}: pair {n + 1}: the target is {len(tgt)} tokens, more than target_len="
                               f"{tgt_len} (raise --target-len; a cut target would teach stopping mid-answer)")  # fmt: skip
        if len(src) > src_len:
            src, cut = src[: src_len - 1] + [eos], cut + 1
        out.append((src, tgt))
    return out, cut


def collate_pairs(rows, pad: int, start: int, device) -> dict:
    S, T = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    src = torch.full((len(rows), S), pad, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (s, t) in enumerate(rows):
        src[i, : len(s)], targets[i, : len(t)] = torch.tensor(s), torch.tensor(t)
    tgt_in = torch.cat([torch.full((len(rows), 1), start), targets[:, :-1].clamp(min=0)], 1)
    batch = {"src": src, "tgt_in": tgt_in, "targets": targets, "src_mask": src != pad}
    n = int(sum(len(s) + len(t) for s, t in rows))
    return {**{k: v.to(device) for k, v in batch.items()}, "num_tokens": n}


def seq2seq(cfg, run, dd) -> dict:
    """The sft stage for an encoder-decoder `run.model` (cfg: SftConfig)."""
    from lmforge.chat.datasets import load_conversations, split_conversations
    from lmforge.tokenizer.special import document_end_id, load_tokenizer, pad_id
    from lmforge.train.classify import RecordLoader

    tok = load_tokenizer(run.tokenizer_dir)
    eos = document_end_id(tok)
    pad = pad_id(tok)
    cs = load_conversations(cfg.data, cfg.data_format, system=cfg.system or None)
    train_convs, val_convs = split_conversations(cs.conversations, cfg.val_fraction, cfg.seed)
    tgt_len = cfg.target_len or cfg.seq_len
    train, train_cut = encode_pairs([p for c in train_convs for p in pairs_of(c)], tok, eos, cfg.seq_len, tgt_len,
                                    cfg.data)  # fmt: skip
    val_pairs = [p for c in val_convs for p in pairs_of(c)]
    val, val_cut = encode_pairs(val_pairs, tok, eos, cfg.seq_len, tgt_len, cfg.data)
    trainable, total = run.make_trainable()
    report = {"source": cs.source, "format": cs.format, "skipped": cs.skipped, "train_pairs": len(train),
              "val_pairs": len(val), "inputs_cut": train_cut + val_cut, "seq_len": cfg.seq_len, "target_len": tgt_len}  # fmt: skip
    if dd.main:
        run.write_run_files({"data_report.json": report})
        run.say(f"seq2seq: {len(train)} train / {len(val)} held-out pairs ({train_cut + val_cut} inputs cut to "
                f"{cfg.seq_len}); training {trainable:,} of {total:,} parameters")  # fmt: skip

    def collate(rows):
        return collate_pairs(rows, pad, pad, run.device)

    loader = RecordLoader(train, cfg.batch_size, collate, cfg.seed, dd.rank, dd.world_size)
    if run.meta is not None:
        loader.load_state_dict(run.meta["loader"])
    val_batches = [collate(val[i : i + cfg.batch_size]) for i in range(0, len(val), cfg.batch_size)]
    val_batches = val_batches[: cfg.eval_batches]
    model, optimizer = run.model, run.optimizer()

    def evaluate(step: int) -> dict | None:
        if not val_batches:
            return None
        loss = evaluate_loss(model, val_batches, run.autocast())
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    hooks = run.hooks(optimizer, loader, evaluate, dd)
    last = train_loop(cfg, model, optimizer, next_token_step(run.autocast), loader, hooks, **run.progress(),
                      desc="sft")  # fmt: skip
    result = {"trainable_params": trainable, "total_params": total, **last}
    if dd.main and val and last["stopped"] not in ("SIGINT", "SIGTERM"):
        result.update(exact_match(model, tok, val_pairs, val, pad, eos, run.run_dir / "samples.txt", run.device))
    return result


@torch.no_grad()
def exact_match(model, tok, pairs, encoded, pad: int, eos: int, path, device, batch: int = 32) -> dict:
    """Greedy outputs for the held-out inputs -> `path`; returns {"exact_match", "exact_match_n"}."""
    model.eval()
    right, lines = 0, []
    for i in range(0, len(encoded), batch):
        rows = encoded[i : i + batch]
        b = collate_pairs(rows, pad, pad, device)
        out = model.generate(b["src"], max(len(t) for _, t in rows) + 4, src_mask=b["src_mask"], start_id=pad,
                             eos_id=eos)  # fmt: skip
        for (text, target), ids in zip(pairs[i : i + batch], out.tolist(), strict=True):
            ids = ids[: ids.index(eos)] if eos in ids else ids
            got = tok.decode(ids)
            ok = got.strip() == tok.decode(tok.encode(target, add_special_tokens=False).ids).strip()
            right += ok
            lines.append(f"### input: {text}\n### output{'' if ok else ' (wrong)'}: {got}\n")
    lines.append(f"exact match: {right}/{len(encoded)}\n")
    atomic_write_text(path, "\n".join(lines))
    print(f"lmforge sft: held-out exact match {right}/{len(encoded)} -> {path}", file=sys.stderr)
    return {"exact_match": right / max(1, len(encoded)), "exact_match_n": len(encoded)}
