"""Tokenizer training and extension, and the strict input readers.  Run: pytest tests/test_tokenizer.py"""

from __future__ import annotations

import json
import random
import re

import pytest
from tok_helpers import chinese_docs, write_english_corpus

from lmforge.data.readers import iter_texts
from lmforge.errors import LmforgeError
from lmforge.tokenizer.extend import extend_tokenizer
from lmforge.tokenizer.special import SPECIAL_TOKENS, load_tokenizer
from lmforge.tokenizer.train import new_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    corpus = write_english_corpus(root / "corpus")  # 20 docs, 200 KB of Shakespeare
    train_tokenizer([corpus], 512, root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture
def cli_main(monkeypatch):
    """`lmforge.cli.main` with only this stage's commands registered (the others may not exist yet).

    The error handling under test is the real one in `main`.
    """
    from lmforge import cli
    from lmforge.data import tokenize_cmd
    from lmforge.tokenizer import cli as tokenizer_cli

    monkeypatch.setattr(cli, "_command_modules", lambda: [tokenizer_cli, tokenize_cmd])
    return cli.main


ROUND_TRIP = [
    "To be, or not to be, that is the question.",
    "It's 2024-06-01; the price was $1,234.56 (or 1234.56 €).",
    "今天天气很好，我们去公园散步吧。语言模型可以回答问题。",
    "日本語のテキストとカタカナ、한국어 문장도 있습니다.",
    "emoji 🙂👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣",
    "mixed AI模型 with English, العربية, Ελληνικά, русский and हिन्दी",
    "  leading\n\n\n  trailing   \t\t tabs \r\n windows\r\n\r\n    ",
    " ",
    "\n",
    "",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "e\u0301 combining, ﬁ ligature, Ａ fullwidth",
    "a" * 5000,
    "<|endoftext|> between <|im_start|>user\nhi<|im_end|>",
    b"invalid \xff\xfe bytes \xc3( and \xe2\x82".decode("utf-8", errors="replace"),
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_random_unicode_round_trips(tok):
    rng = random.Random(0)
    # Any code point except the surrogate range, which is not valid Unicode text.
    points = [c for c in range(1, 0x30000) if not 0xD800 <= c <= 0xDFFF]
    for _ in range(50):
        text = "".join(chr(rng.choice(points)) for _ in range(rng.randint(1, 60)))
        assert tok.decode(tok.encode(text).ids) == text


def test_lone_surrogates_are_refused_not_garbled(tok):
    # "\udcff" (what errors="surrogateescape" makes of byte 0xff) cannot be UTF-8 encoded: tokenizers refuses
    # it outright. The readers decode strictly, so such strings never reach the tokenizer.
    with pytest.raises(TypeError):
        tok.encode("a\udcffb")


def test_every_byte_is_a_token_and_no_unk(tok):
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = tok.get_vocab()
    assert all(ch in vocab for ch in ByteLevel.alphabet())
    assert tok.model.unk_token is None


def test_special_tokens_first_and_single(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t).ids == [i]
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>\n").ids
    assert ids[0] == 2 and 3 in ids


def test_pretokenizer_splits_han_and_digits():
    pieces = [p for p, _ in new_tokenizer().pre_tokenizer.pre_tokenize_str("AI模型很好。 2024")]
    # pieces are in the byte-level alphabet: compare through the decoder
    from tokenizers.decoders import ByteLevel

    dec = ByteLevel()
    assert [dec.decode([p]) for p in pieces] == ["AI", "模型很好", "。", " ", "2", "0", "2", "4"]


def test_report_and_config(tok_dir):
    report = json.loads((tok_dir / "train_report.json").read_text())
    assert report["vocab_size"] == 512 and report["base_vocab_size"] is None
    assert report["heldout_docs"] == 1 and report["train_docs"] == 19  # every 20th of 20 documents
    assert 1.5 < report["heldout_bytes_per_token"] < 4
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"


def test_training_is_deterministic(tok_dir, tmp_path):
    corpus = write_english_corpus(tmp_path / "corpus")
    train_tokenizer([corpus], 512, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("cls_name", ["PreTrainedTokenizerFast", "AutoTokenizer"])
def test_transformers_loads_it_unchanged(tok_dir, tok, cls_name):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, cls_name).from_pretrained(str(tok_dir))
    for text in ROUND_TRIP[:8]:
        assert hf(text)["input_ids"] == tok.encode(text).ids
        assert hf.decode(hf(text)["input_ids"]) == text
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (0, 0, 1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    assert hf.apply_chat_template(messages, tokenize=False) == chatml
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        chatml + "<|im_start|>assistant\n"
    )
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(chatml + "<|im_start|>assistant\n").ids


def test_extend_keeps_old_ids_and_compresses_chinese(tok_dir, tok, tmp_path):
    zh = tmp_path / "zh.jsonl"
    zh.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in chinese_docs()))
    report = extend_tokenizer(tok_dir, [zh], 100, tmp_path / "tok-zh")
    ext = load_tokenizer(tmp_path / "tok-zh")
    base_vocab = tok.get_vocab()
    assert report["base_vocab_size"] == len(base_vocab) == 512
    assert report["added"] == 100 and ext.get_vocab_size() == 612
    ext_vocab = ext.get_vocab()
    assert all(ext_vocab[t] == i for t, i in base_vocab.items())
    assert sorted(i for t, i in ext_vocab.items() if t not in base_vocab) == list(range(512, 612))
    text = "今天天气很好，我们一起学习机器学习。晚上看电影。"
    assert len(ext.encode(text).ids) < 0.7 * len(tok.encode(text).ids)
    bpt = report["heldout_bytes_per_token"]
    assert bpt["extended"] > 1.3 * bpt["base"]
    for s in [text, *ROUND_TRIP]:
        assert ext.decode(ext.encode(s).ids, skip_special_tokens=False) == s
    assert json.loads((tmp_path / "tok-zh" / "train_report.json").read_text())["base_vocab_size"] == 512


def test_vocab_size_too_small(tmp_path):
    corpus = write_english_corpus(tmp_path / "corpus", works=1, docs_per_work=1, chars=1000)
    with pytest.raises(LmforgeError, match="--vocab-size 200"):
        train_tokenizer([corpus], 200, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_reader_errors_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 ok")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    (tmp_path / "notes.md").write_text("x")
    cases = {
        "empty.txt": "empty.txt: empty file",
        "latin1.txt": r"latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)",
        "bad.jsonl": "bad.jsonl:2: not valid JSON",
        "nofield.jsonl": "nofield.jsonl:3: record has no 'text' field",
        "notes.md": "notes.md: unsupported file type",
        "missing.txt": "missing.txt: no such file or folder",
    }
    for name, message in cases.items():
        with pytest.raises(LmforgeError, match=message):
            list(iter_texts([tmp_path / name]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(LmforgeError, match="sub: no readable files"):
        list(iter_texts([tmp_path / "sub"]))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "a.txt: empty file"), (b"hello \xff world", r"a.txt: not valid UTF-8 \(byte 0xff at offset 6\)")],
)
def test_cli_bad_input_exit_2_one_line_no_output(cli_main, tmp_path, capsys, content, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(content)
    (corpus / "b.txt").write_text("fine text " * 100)
    out = tmp_path / "tok"
    rc = cli_main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    assert re.search(message, err)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no temp folder left


def test_cli_train_and_extend(cli_main, tok_dir, tmp_path, capsys):
    corpus = write_english_corpus(tmp_path / "corpus", works=2, docs_per_work=2)
    rc = cli_main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "t"),
                   "--doc-bytes", "2000"])  # 4 files of 10 kB: 4 documents each at most 2 kB  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "bytes/token" in out and "from 4 file(s)" in out and "vocabulary by script: Latin" in out
    assert json.loads((tmp_path / "t" / "train_report.json").read_text())["text_split"]["doc_bytes"] == 2000
    zh = tmp_path / "zh"
    zh.mkdir()
    for i, d in enumerate(chinese_docs(40)):
        (zh / f"{i:03d}.txt").write_text(d)
    rc = cli_main(["tokenizer", "extend", "--base", str(tmp_path / "t"), "--input", str(zh), "--add", "50",
                   "--out", str(tmp_path / "t-zh")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "400 -> 450" in out and "extended" in out
