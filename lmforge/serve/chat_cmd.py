"""`lmforge chat`: talk to a chat model in the terminal, replies streamed as they are generated.

    lmforge chat runs/demo-sft
    lmforge chat models/smollm2 --system "You are terse." --temperature 0
    printf 'Hello\nWhat is the capital of France?\n/exit\n' | lmforge chat models/smollm2   # scripted
    lmforge chat --url http://127.0.0.1:8000                 # a running `lmforge serve` (or any OpenAI API)
    lmforge chat models/smollm2 --rag runs/docs-index        # each turn answered from the index's top passages

Each line you type is a user turn; the model's reply is the assistant turn, and the
whole history goes back to the model each time, rendered with its own chat template.
`/reset` forgets the history (the system prompt stays), `/exit` (or end of input) quits.
When stdin is not a terminal, lines are read as they come and each reply is printed
on its own line after `assistant: `, so the chat can be scripted and its transcript saved.
When the history no longer fits the model's context, the oldest turns are dropped
(said on stderr); a reply cut by --max-new-tokens is flagged on stderr too.
With `--url`, the model is the server's (or RUN_OR_MODEL names one of its models): the history goes
to its /v1/chat/completions with stream on, and `--api-key` (or LMFORGE_API_KEY) is sent as a Bearer
token; a history the server finds too long is shortened the same way, from the oldest exchange.
"""

from __future__ import annotations

import sys

from lmforge.errors import LmforgeError


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (stdin lines when piped)")
    p.add_argument(
        "model",
        metavar="RUN_OR_MODEL",
        nargs="?",
        default=None,
        help="a run, checkpoint or imported model folder (with --url: the server's model name, optional)",
    )
    p.add_argument("--url", default=None, help="talk to a running server (lmforge serve, or any OpenAI-compatible API)")
    p.add_argument("--api-key", default=None, help="with --url: the server's key (default: LMFORGE_API_KEY)")
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="most tokens per reply (default: 256, or half the model's context if that is less; with --url "
        "the server's default: what is left of the context)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="0 = off (default 50)")
    p.add_argument("--top-p", type=float, default=0.9, help="1 = off (default 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (default 1.1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--rag",
        default=None,
        metavar="INDEX",
        help="answer from a retrieval index (lmforge rag index): each turn gets its top passages, cited",
    )
    p.add_argument("--rag-k", type=int, default=4, help="passages per turn with --rag (default 4)")
    p.set_defaults(func=run)


class ChatSession:
    """History + template + generation: `reply(text, stream)` appends a user turn and returns the answer."""

    def __init__(self, model, fmt, system: str | None = None, rag=None, rag_k: int = 4, **sampling):
        """`rag`: a RagIndex; each user turn is sent with its top `rag_k` passages (the history keeps the plain
        turn) and the passages used are printed on stderr after the reply."""
        self.model, self.fmt, self.system, self.sampling = model, fmt, system, sampling
        self.rag, self.rag_k = rag, rag_k
        self.max_new = sampling.pop("max_new_tokens", None) or min(256, model.cfg.max_seq_len // 2)
        if self.max_new >= model.cfg.max_seq_len:
            raise LmforgeError(
                f"--max-new-tokens ({self.max_new}) must be below the model's context ({model.cfg.max_seq_len})"
            )
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self, hits=()) -> tuple[list[int], list]:
        """(the rendered history, the passages in it); the oldest exchanges go first when it does not fit with room
        for a reply, then the lowest-ranked passages."""
        from lmforge.rag.prompt import fit_sources, with_sources

        budget = self.model.cfg.max_seq_len - self.max_new
        first = 1 if self.system else 0
        while True:
            history, question = self.messages[:-1], self.messages[-1]["content"]
            turn = with_sources(question, hits) if hits else question
            ids = self.fmt.encode([*history, {"role": "user", "content": turn}], add_generation_prompt=True)
            if len(ids) <= budget:
                return ids, list(hits)
            if len(self.messages) - first <= 1:
                break
            del self.messages[first : first + 2]  # one user turn and its reply
            print("lmforge chat: history too long for the context; dropped the oldest exchange", file=sys.stderr)
        try:
            messages, used = fit_sources(self.fmt, history, question, hits, budget)
            return self.fmt.encode(messages, add_generation_prompt=True), used
        except LmforgeError:  # the turn alone is too long: its end is what the model sees
            return ids[-budget:], []

    def reply(self, text: str, stream=None) -> tuple[str, bool]:
        """(answer, ended at the turn-end token)."""
        from lmforge.serve.generate import generate

        self.messages.append({"role": "user", "content": text})
        hits = self.rag.search(text, self.rag_k) if self.rag is not None else []
        prompt, used = self._prompt(hits)
        out = generate(self.model, [prompt], self.max_new, stop_ids=self.fmt.stop_ids, stream=stream,
                       **self.sampling)[0]  # fmt: skip
        if used:
            sources = "; ".join(f"[{i}] {h.source}" for i, h in enumerate(used, 1))
            print(f"\nlmforge chat: sources {sources}", file=sys.stderr)
        ended = len(out) < self.max_new  # generation stopped at a turn-end token (which it leaves out)
        answer = self.fmt.tokenizer.decode(out)
        self.messages.append({"role": "assistant", "content": answer})
        return answer, ended


def _lines(interactive: bool):
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


def run(args) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LmforgeError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.url and args.rag:
        raise LmforgeError("--rag is for a local model; for a server, start it with lmforge serve MODEL --rag INDEX")
    if args.url:
        from lmforge.serve.chat_client import RemoteSession

        session = RemoteSession(args.url, args.model, args.api_key, args.system, max_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)  # fmt: skip
        return _converse(session, session.printer)
    from lmforge.chat.template import ChatFormat
    from lmforge.serve.generate_cmd import StreamPrinter
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    if args.model is None:
        raise LmforgeError("chat needs a model: lmforge chat RUN_OR_MODEL (or --url of a server)")
    if args.rag_k < 1:
        raise LmforgeError("--rag-k must be at least 1")
    index = None
    if args.rag:
        from lmforge.rag.index import RagIndex

        index = RagIndex.load(args.rag)
    device = pick_device(args.device)
    model, tok_dir, _ = load_for_inference(args.model, device=device)
    fmt = ChatFormat(tok_dir)
    session = ChatSession(model, fmt, args.system, rag=index, rag_k=args.rag_k, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature,
                          top_k=args.top_k or None, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)  # fmt: skip
    return _converse(session, lambda: StreamPrinter(fmt.tokenizer))


def _converse(session, new_printer) -> int:
    """The read-reply loop shared by a local model and a server: /reset, /exit, one streamed reply per line."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("lmforge chat: /reset clears the history, /exit quits", file=sys.stderr)
    for line in _lines(interactive):
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        sys.stdout.write("" if interactive else "assistant: ")
        _, ended = session.reply(line, stream=new_printer())
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not ended:
            print(f"lmforge chat: reply cut at --max-new-tokens={session.max_new}", file=sys.stderr)
    return 0
