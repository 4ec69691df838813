"""Incremental detokenization and stop strings for the server: `python -m pytest -q tests/test_serve_text.py`."""

from __future__ import annotations

import pytest

from lmforge.serve.text_stream import TextStream, token_bytes
from lmforge.tokenizer import load_tokenizer

TEXT = "Hello, world! 你好，世界。Emoji 🙂 ok.\n\nSecond paragraph: naïve café."


@pytest.fixture(scope="module")
def tok(small_shards):
    return load_tokenizer(small_shards.parent / "tok")  # byte-level BPE trained on English: Chinese is bytes


def stream_all(tok, ids, stop=()):
    s = TextStream(tok, stop)
    pieces, stopped = [], False
    for t in ids:
        delta, stopped = s.push(t)
        pieces.append(delta)
        if stopped:
            break
    pieces.append(s.flush())
    return pieces, stopped


def test_pieces_join_to_the_decoded_text_and_never_hold_half_a_character(tok):
    ids = tok.encode(TEXT).ids
    pieces, stopped = stream_all(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT and not stopped
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # it streamed, not one lump at the end


@pytest.mark.parametrize("stop", ["world", "你好", "🙂", "\n\n", "ok.\n", "café."])
def test_stop_strings_are_cut_wherever_the_tokens_split_them(tok, stop):
    ids = tok.encode(TEXT).ids
    pieces, stopped = stream_all(tok, ids, [stop, "never there"])
    assert stopped and "".join(pieces) == TEXT[: TEXT.index(stop)]


def test_text_that_may_start_a_stop_string_is_held_until_it_does_not(tok):
    s = TextStream(tok, ["END!"])
    out = []
    for t in tok.encode("a b EN").ids:
        out.append(s.push(t)[0])
    assert "".join(out) == "a b "  # "EN" could be the start of "END!"
    for t in tok.encode("D? c").ids:
        out.append(s.push(t)[0])
    out.append(s.flush())
    assert "".join(out) == "a b END? c"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, stopped = stream_all(tok, tok.encode("one two three").ids, ["three", "two"])
    assert stopped and "".join(pieces) == "one "


def test_token_bytes_are_exact_for_byte_level_tokens(tok):
    ids = tok.encode("你好🙂").ids
    assert b"".join(token_bytes(tok, t) for t in ids) == "你好🙂".encode()
