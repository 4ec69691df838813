"""Rendering conversations with a tokenizer's chat template, and which tokens the answer is.

    from lmforge.chat.template import ChatFormat
    fmt = ChatFormat("runs/demo/tokenizer")
    ids = fmt.encode([{"role": "user", "content": "Hi"}], add_generation_prompt=True)   # a prompt to generate from
    ids, trained = fmt.encode_with_mask(conversation)   # SFT: trained[i] is True on assistant tokens

The template is the Jinja `chat_template` stored in `tokenizer_config.json` (ChatML for
lmforge's own tokenizers; whatever the model ships for imported ones), rendered in the
same sandboxed Jinja environment transformers uses, then tokenized without added
special tokens, so the ids equal `AutoTokenizer.apply_chat_template(...)` exactly.

Which tokens are "the answer" is found without knowing the template's syntax: for the
assistant message i, the text rendered for messages[:i] with a generation prompt is the
prompt, the text rendered for messages[:i+1] ends with the answer, and the difference
(trailing whitespace dropped) is the answer's content plus its turn-end token. A token
is trained when its text starts inside such a span, so the model learns to emit the
turn-end token and stop. The newline a template puts after the turn-end token (ChatML's
`<|im_end|>\n`) is not trained: it is the template's, never sampled (generation stops at
the turn-end token); TRL's `assistant_only_loss` trains it too. Templates whose rendering
of a prefix is not a prefix of the whole rendering cannot be masked this way and are
refused with a one-line error.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.tokenizer.special import load_tokenizer

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment options as transformers, so templates render identically there and here.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LmforgeError(f"chat_template does not parse: {e}") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatFormat:
    """A tokenizer folder's chat template: render, encode, mask answers, and the ids that end a turn."""

    def __init__(self, tokenizer_dir: str | Path):
        self.dir = Path(tokenizer_dir)
        self.tokenizer = load_tokenizer(self.dir)
        cfg_path = self.dir / "tokenizer_config.json"
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LmforgeError(f"{cfg_path}: unreadable tokenizer config ({e})") from None
        self.template = config.get("chat_template")
        if isinstance(self.template, list):  # some models store named templates; the default one is used
            named = {t.get("name"): t.get("template") for t in self.template if isinstance(t, dict)}
            self.template = named.get("default")
        if not isinstance(self.template, str) or not self.template:
            raise LmforgeError(f"{cfg_path}: no chat_template (a chat model's tokenizer needs one)")
        self._compiled = _compile(self.template)
        self.special = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if _token_text(config.get(name)) is not None
        }
        self.stop_ids = self._find_stop_ids()

    def _find_stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn: the template's turn end (ChatML `<|im_end|>`) and the eos."""
        ids = []
        for text in ("<|im_end|>", "<|eot_id|>", "<|end|>", self.special.get("eos_token")):
            tid = self.tokenizer.token_to_id(text) if text else None
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """`tools`: function schemas for a template that renders them itself (Qwen2.5's `tools` variable)."""
        import jinja2

        extra = {"tools": tools} if tools else {}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special, **extra)  # fmt: skip
        except jinja2.exceptions.TemplateError as e:
            raise LmforgeError(f"chat template failed on this conversation: {e}") from None

    def encode(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
               ) -> list[int]:  # fmt: skip
        """Token ids of the rendered conversation (what `apply_chat_template(tokenize=True)` returns)."""
        text = self.render(messages, add_generation_prompt, tools)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def answer_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of each assistant answer (content + turn end)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise LmforgeError(
                    "the chat template renders a conversation's prefix differently from the whole conversation "
                    "(e.g. it rewrites earlier turns); lmforge cannot tell which tokens are the answer"
                )
            end = len(upto.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return full, spans

    def encode_with_mask(self, messages: list[dict], last_only: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, trained): trained[i] is True where token i belongs to an assistant answer or its turn end.

        last_only: only the final assistant answer (preference pairs and rollouts score one response).
        """
        text, spans = self.answer_spans(messages)
        if last_only:
            spans = spans[-1:]
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        trained = [False] * len(enc.ids)
        j = 0
        # Offsets are increasing, spans are sorted: one merge-like pass.
        for i, (start, _) in enumerate(enc.offsets):
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            if j == len(spans):
                break
            trained[i] = spans[j][0] <= start < spans[j][1]
        return enc.ids, trained
