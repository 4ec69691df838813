"""`lmforge generate`: continue prompts with a trained model, streaming the text as it comes.

    lmforge generate runs/demo --prompt "To be, or not" --max-new-tokens 100 --temperature 0.8 --seed 0
    lmforge generate runs/demo/ckpt --prompt "First" --prompt "Second" --temperature 0   # one batch, greedy
    lmforge generate runs/demo-sft --prompt "What is the capital of France?" --chat       # as a user turn

One prompt streams to stdout token by token; several run as one batch and print in order
when done. Generation stops at `<|endoftext|>` (and `<|im_end|>` if the tokenizer has it).
`--chat` renders each prompt with the model's chat template as a user message followed by
the assistant's turn (as `lmforge chat` does) and stops at the template's turn-end tokens.
Speed (new tokens per second, prefill included) and why generation stopped (an end token,
named, or --max-new-tokens) go to stderr; an instruction-tuned model given a bare prompt
often ends its turn at once, and the line then suggests --chat.
"""

from __future__ import annotations

import sys
import time

from lmforge.errors import LmforgeError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue prompts with a trained model (KV-cache sampling)")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CKPT", help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=100, help="most new tokens per prompt (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass; 1 = off (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL/HF penalty; 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--no-fused", action="store_true", help="decode with the model's own forward, not the fused step")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt in the model's chat template as a user message (instruction-tuned models)",
    )
    p.set_defaults(func=run)


class StreamPrinter:
    """Decode one row incrementally: print only text whose UTF-8 bytes are complete (no half characters)."""

    def __init__(self, tok, out=None):
        # sys.stdout looked up now, not at import: it may have been replaced since (pytest capture, redirects).
        self.tok, self.out, self.ids, self.printed = tok, out or sys.stdout, [], 0

    def __call__(self, row: int, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def run(args) -> int:
    from lmforge.chat.template import ChatFormat
    from lmforge.serve.generate import generate
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    if args.temperature < 0:
        raise LmforgeError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise LmforgeError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty <= 0:
        raise LmforgeError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    device = pick_device(args.device)
    model, tok_dir = load_for_inference(args.checkpoint, device=device)[:2]
    tok = load_tokenizer(tok_dir)
    stop_ids = [i for i in (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")) if i is not None]
    bos = stop_ids[0] if stop_ids else 0
    if args.chat:  # a user turn, then the opening of the assistant's: what an instruction-tuned model answers
        fmt = ChatFormat(tok_dir)
        prompts = [fmt.encode([{"role": "user", "content": text}], add_generation_prompt=True) for text in args.prompt]
        stop_ids = fmt.stop_ids
    else:
        prompts = [tok.encode(text).ids or [bos] for text in args.prompt]
    shown = [text + "\n" if args.chat else text for text in args.prompt]  # a reply starts on its own line

    single = len(prompts) == 1
    if single:
        sys.stdout.write(shown[0])
        sys.stdout.flush()
    printer = StreamPrinter(tok)

    def stream(row: int, token_id: int) -> None:
        if token_id not in stop_ids:
            printer(row, token_id)

    t0 = time.perf_counter()
    # The stop token is kept in the output (not printed) so the summary can name the one that ended each row.
    outs = generate(
        model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_ids=stop_ids, include_stop=True,
        seed=args.seed, pad_id=bos, stream=stream if single else None, fused=not args.no_fused,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    ended = [o[-1] if o and o[-1] in stop_ids else None for o in outs]
    outs = [o[:-1] if e is not None else o for o, e in zip(outs, ended)]
    if single:
        sys.stdout.write("\n")
    else:
        for i, (text, ids) in enumerate(zip(shown, outs)):
            sys.stdout.write(f"--- prompt {i + 1}\n{text}{tok.decode(ids)}\n")
    sys.stdout.flush()
    n = sum(len(o) for o in outs)
    print(f"{n} tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tok/s, {device}); "
          f"{stop_summary(tok, tok_dir, outs, ended, args)}", file=sys.stderr)  # fmt: skip
    return 0


def stop_summary(tok, tok_dir, outs: list[list[int]], ended: list[int | None], args) -> str:
    """Why generation stopped, for the summary line: the end token (named) or --max-new-tokens, per prompt.

    A chat model given a bare prompt often ends its turn at once (0 tokens, nothing printed); then say so and
    suggest --chat, when the model has a chat template to wrap the prompt in.
    """
    reasons = [
        f"stopped at the end token {tok.id_to_token(e)} after {len(o)} tokens" if e is not None
        else f"stopped at --max-new-tokens={args.max_new_tokens}"
        for o, e in zip(outs, ended)
    ]  # fmt: skip
    text = reasons[0] if len(reasons) == 1 else "; ".join(f"prompt {i + 1} {r}" for i, r in enumerate(reasons))
    at_once = any(e is not None and not o for o, e in zip(outs, ended))
    if at_once and not args.chat and _has_chat_template(tok_dir):
        text += "; this looks like a chat model: try --chat"
    return text


def _has_chat_template(tok_dir) -> bool:
    from lmforge.chat.template import ChatFormat

    try:
        ChatFormat(tok_dir)
    except LmforgeError:
        return False
    return True
