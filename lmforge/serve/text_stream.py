"""Token ids in, text out, one token at a time: incremental detokenization and stop strings.

    stream = TextStream(tokenizer, stop=["\\n\\n"])
    for t in ids:
        delta, stopped = stream.push(t)   # text safe to send now; True once a stop string appeared
    rest = stream.flush()                 # at the end: text held back as a possible stop-string start

Used by the server (lmforge/serve/api.py) for every request. Decoding token by token needs care:
a byte-level BPE token may hold half of a multi-byte character (Chinese, emoji), so text is released
only once it no longer ends in U+FFFD; and some decoders (SentencePiece's leading space) change how a
token reads depending on its neighbours, so each step decodes a short window of earlier tokens and
keeps the difference (the "prefix offset" method of Hugging Face's text-generation-inference).
The OpenAI API's `stop` strings are cut out of the text, and text that might be the start of one is
held back until it is known not to be.

    python -m pytest -q tests/test_serve_text.py
"""

from __future__ import annotations

import functools

from lmforge.tokenizer.special import bytes_to_unicode


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the window already turned into text
        self.text = ""  # all text so far (after a stop: up to the stop string)
        self.sent = 0  # how much of self.text was handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; (new text to send, whether a stop string has now appeared)."""
        if self.stopped:
            return "", True
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        hit = -1
        for s in self.stop:  # the earliest stop string that starts in text not yet sent
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self.text, self.stopped = self.text[:hit], True
            return self._take(hit), True
        hold = 0  # the longest end of the text that is a proper start of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return self._take(len(self.text) - hold), False

    def _take(self, end: int) -> str:
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        """The text still held back (a partial stop string, an unfinished character), at the end of generation."""
        if not self.stopped:
            tail = self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
            self.text += tail  # an unfinished character at the very end reads as U+FFFD, as decode() gives it
            self.prefix = self.read = len(self.ids)
        return self._take(len(self.text))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    return {ch: b for b, ch in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (the OpenAI API's logprobs `bytes`): exact for byte-level BPE, where a token
    may be part of a character; for other tokenizers, the UTF-8 of its decoded text."""
    piece = tokenizer.id_to_token(token_id)
    table = _byte_decoder()
    if piece is not None and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
