"""Conversation readers for SFT (lmforge/chat/datasets.py): formats, skip accounting, packaged corpora, splits."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest

from lmforge.chat.datasets import load_conversations, split_conversations, summarize
from lmforge.errors import LmforgeError

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path, records):
    """A JSONL file; a record that is bytes or str is written as the raw line."""
    lines = []
    for r in records:
        line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)).encode()
        lines.append(line + b"\n")
    path.write_bytes(b"".join(lines))
    return path


def roles(conv):
    return [m["role"] for m in conv]


# ---- the three file formats ----


def test_alpaca(tmp_path):
    f = write_lines(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add.", "input": None, "output": "4", "system": "You are terse."},
        ],
    )
    cs = load_conversations(str(f))
    assert cs.format == "alpaca" and cs.skipped == {} and cs.meta == [{}, {}, {}]
    assert cs.conversations[0] == [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert cs.conversations[1][0]["content"] == "Name a colour."
    assert cs.conversations[2] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add."},
        {"role": "assistant", "content": "4"},
    ]


def test_sharegpt_role_names(tmp_path):
    turns = [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "a"},
        {"from": "gpt", "value": "b"},
        {"from": "user", "value": "c"},
        {"from": "chatgpt", "value": "d"},
        {"from": "human", "value": "e"},
        {"from": "bing", "value": "f"},
        {"from": "human", "value": "g"},
        {"from": "bard", "value": "h"},
        {"from": "human", "value": "i"},
        {"from": "assistant", "value": "j"},
    ]
    cs = load_conversations(str(write_lines(tmp_path / "s.jsonl", [{"conversations": turns}])))
    assert cs.format == "sharegpt"
    (conv,) = cs.conversations
    assert roles(conv) == ["system"] + ["user", "assistant"] * 5
    assert [m["content"] for m in conv] == [t["value"] for t in turns]


def test_messages_with_text_parts(tmp_path):
    parts = [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]
    rec = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Ok", "weight": 1}]}
    cs = load_conversations(str(write_lines(tmp_path / "m.jsonl", [rec])))
    assert cs.format == "messages"
    assert cs.conversations == [
        [{"role": "user", "content": "Line one.\nLine two."}, {"role": "assistant", "content": "Ok"}]
    ]


def test_content_is_kept_exactly(tmp_path):
    text = "  leading and trailing spaces \n\n中文 ✓ "
    rec = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}
    cs = load_conversations(str(write_lines(tmp_path / "m.jsonl", [rec])))
    assert [m["content"] for m in cs.conversations[0]] == [text, text]


def test_auto_detect_mixed_file_and_forced_format(tmp_path):
    recs = [
        {"instruction": "q1", "output": "a1"},
        {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
        GOOD,
    ]
    f = write_lines(tmp_path / "mix.jsonl", recs)
    cs = load_conversations(str(f))
    assert len(cs.conversations) == 3 and cs.format == "alpaca+messages+sharegpt"
    assert [c[0]["content"] for c in cs.conversations] == ["q1", "q2", "Hi"]
    forced = load_conversations(str(f), "alpaca")
    assert forced.format == "alpaca" and len(forced.conversations) == 1
    assert forced.skipped == {"missing field 'instruction'": 2}


# ---- skipping: every reason counted, nothing silent ----

BAD_RECORDS = [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "function", "content": "a"}]}, "unknown role 'function'"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]},
        "a tool turn not after an assistant turn",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " \n\t"}]},
        "empty assistant turn",
    ),
    ({"instruction": "q", "output": ""}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, "empty user turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": []}, "no messages"),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "system message not first",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "user", "content": "q again"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "two user turns in a row",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "gpt", "value": "b"},
            ]
        },
        "two assistant turns in a row",
    ),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"output": "a"}, "missing field 'instruction'"),
    ({"instruction": "q", "output": 42}, "field 'output' is not a string"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
        "content is not a string",
    ),
    ({"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "a"}]}, "content is not a string"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "message missing 'value'"),
    ({"messages": [{"content": "q"}]}, "message missing 'role'"),
    ({"messages": ["q", "a"]}, "message is not an object"),
    ({"conversations": "q a"}, "field 'conversations' is not a list"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "non-text content part 'image_url'",
    ),
    ({"text": "a pretraining document"}, "unrecognized record format"),
    ([GOOD], "record is not a JSON object"),
    ('{"messages": [', "malformed JSON"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "not UTF-8"),
]


@pytest.mark.parametrize("bad,reason", BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_each_skip_reason_is_counted(tmp_path, bad, reason):
    f = write_lines(tmp_path / "d.jsonl", [GOOD, bad, GOOD])
    cs = load_conversations(str(f))
    assert len(cs.conversations) == 2
    assert cs.skipped == {reason: 1}
    assert cs.first_seen[reason].startswith(f"{f}:2")  # names the file and line


def test_skips_add_up_and_first_seen_names_the_line(tmp_path):
    records = [GOOD if i % 3 else bad for i, (bad, _) in enumerate(BAD_RECORDS * 2)]
    f = write_lines(tmp_path / "d.jsonl", [*records, "", "   "])  # blank lines are not records
    cs = load_conversations(str(f))
    assert len(cs.conversations) + sum(cs.skipped.values()) == len(records)
    assert all(where.startswith(f"{f}:") for where in cs.first_seen.values())
    bad_utf8 = write_lines(tmp_path / "u.jsonl", [GOOD, b'{"a": "\xff"}'])
    offset = bad_utf8.read_bytes().index(b"\xff")  # the same message as every reader's (lmforge/data/readers.py)
    seen = load_conversations(str(bad_utf8)).first_seen["not UTF-8"]
    assert seen.startswith(f"{bad_utf8}:2: not valid UTF-8 (byte 0xff at offset {offset})")


def test_summarize(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, "{", {"instruction": "q"}])
    text = summarize(load_conversations(str(f)))
    assert "2 conversations kept, 2 skipped" in text
    assert "assistant turns: 2" in text
    assert "skipped 1: malformed JSON" in text and "skipped 1: missing field 'output'" in text
    assert text.count("\n") == 3


def test_system_argument_fills_only_missing_system(tmp_path):
    recs = [GOOD, {"instruction": "q", "output": "a", "system": "Own system."}]
    cs = load_conversations(str(write_lines(tmp_path / "d.jsonl", recs)), system="Default.")
    assert cs.conversations[0][0] == {"role": "system", "content": "Default."}
    assert [m["content"] for m in cs.conversations[1] if m["role"] == "system"] == ["Own system."]


# ---- file kinds ----


def test_gzip_and_truncated_gzip(tmp_path):
    payload = "".join(json.dumps(GOOD) + "\n" for _ in range(2000)).encode()
    good = tmp_path / "d.jsonl.gz"
    good.write_bytes(gzip.compress(payload))
    assert len(load_conversations(str(good)).conversations) == 2000
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(payload)[:-200])
    cs = load_conversations(str(cut))
    assert cs.skipped == {"unreadable file": 1} and 0 < len(cs.conversations) < 2000


def test_zstd(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    f = tmp_path / "d.jsonl.zst"
    f.write_bytes(zstandard.ZstdCompressor().compress((json.dumps(GOOD) + "\n").encode() * 3))
    assert len(load_conversations(str(f)).conversations) == 3


def test_json_files(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([GOOD, {"instruction": "q"}, GOOD]))
    cs = load_conversations(str(tmp_path / "list.json"))
    assert len(cs.conversations) == 2 and cs.first_seen["missing field 'output'"] == f"{tmp_path / 'list.json'}[1]"
    # JSON Lines under a .json name, a BOM in front
    (tmp_path / "lines.json").write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2 + b"{oops\n")
    cs = load_conversations(str(tmp_path / "lines.json"))
    assert len(cs.conversations) == 2 and cs.skipped == {"malformed JSON": 1}
    (tmp_path / "obj.json").write_text(json.dumps(GOOD))
    with pytest.raises(LmforgeError, match="JSON file is not a list"):
        load_conversations(str(tmp_path / "obj.json"))


def test_folder_is_read_in_sorted_order_skipping_hidden_and_other_files(tmp_path):
    def one(text):
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]}

    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "b.jsonl", [one("b")])
    write_lines(tmp_path / "a.jsonl", [one("a")])
    (tmp_path / "sub" / "c.json").write_text(json.dumps([one("c")]))
    write_lines(tmp_path / ".hidden.jsonl", [one("hidden")])
    (tmp_path / "notes.txt").write_text("not data")
    cs = load_conversations(str(tmp_path))
    assert [c[0]["content"] for c in cs.conversations] == ["a", "b", "c"]


# ---- errors ----


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(LmforgeError, match="nope.jsonl: no such file or folder"):
        load_conversations(str(tmp_path / "nope.jsonl"))


def test_all_skipped_names_path_and_top_reasons(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", ["{", "{", {"instruction": "q"}, {"text": "x"}])
    with pytest.raises(LmforgeError) as e:
        load_conversations(str(f))
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    assert "all 4 records skipped (2 malformed JSON; 1 missing field 'output'; 1 unrecognized record format)" in msg


def test_other_errors(tmp_path):
    with pytest.raises(LmforgeError, match="unknown conversation format"):
        load_conversations(str(tmp_path), "chatml")
    with pytest.raises(LmforgeError, match="no conversation files"):
        load_conversations(str(tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LmforgeError, match="no conversations found"):
        load_conversations(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LmforgeError, match="unsupported file type"):
        load_conversations(str(tmp_path / "x.csv"))


# ---- split ----


def test_split_is_deterministic_disjoint_and_complete():
    items = [f"conv{i}" for i in range(101)]
    train, val = split_conversations(items, 0.1, seed=3)
    assert (train, val) == split_conversations(items, 0.1, seed=3)
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted(train + val) == sorted(items)
    assert train == [x for x in items if x in set(train)]  # input order kept
    assert split_conversations(items, 0.1, seed=4)[1] != val
    pairs = list(zip(items, range(101)))  # metadata travels with its conversation
    assert [c for c, _ in split_conversations(pairs, 0.1, seed=3)[1]] == val


def test_split_edge_cases():
    assert split_conversations(["a", "b"], 0.01, seed=0)[1] in (["a"], ["b"])  # at least one for validation
    assert len(split_conversations(["a", "b", "c"], 0.9, seed=0)[0]) == 1  # at least one for training
    assert split_conversations(["a"], 0.5, seed=0) == (["a"], [])
    assert split_conversations(["a", "b"], 0.0, seed=0) == (["a", "b"], [])
    with pytest.raises(LmforgeError, match="val_fraction"):
        split_conversations(["a", "b"], 1.0, seed=0)


# ---- chitchat ----


def _chitchat_msg(sender, text):
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


def test_chitchat_adapter_on_a_small_file(tmp_path):
    a, b, c = "alice", "bob", "carol"
    data = {
        "c1": {  # merged runs, a blank message, a trailing user turn
            "messages": [
                [_chitchat_msg(a, "Hi"), _chitchat_msg(a, "you there?")],
                [_chitchat_msg(b, "yes")],
                [_chitchat_msg(a, "  ")],
                [_chitchat_msg(b, "hello")],
                [_chitchat_msg(a, "bye")],
            ],
            "ratings": {"witty": 3, "upbeat": 7, "interesting": 5},
            "prompt": "Say hi",
        },
        "c2": {"messages": [[_chitchat_msg(a, "anyone?"), _chitchat_msg(a, "hello?")]], "prompt": "p"},
        "c3": {"messages": [[_chitchat_msg(a, "x")], [_chitchat_msg(b, "y")], [_chitchat_msg(c, "z")]]},
        "c4": {"messages": [[_chitchat_msg(b, "q")], [_chitchat_msg(a, "r")]]},
        "c5": {"messages": "broken"},
    }
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    cs = load_conversations(str(tmp_path / "dataset.json"), "chitchat")
    assert cs.format == "chitchat"
    assert cs.conversations[0] == [
        {"role": "user", "content": "Hi\nyou there?"},
        {"role": "assistant", "content": "yes\nhello"},
    ]
    assert cs.conversations[1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert cs.meta == [
        {"id": "c1", "ratings": {"witty": 3, "upbeat": 7, "interesting": 5}, "prompt": "Say hi"},
        {"id": "c4", "ratings": None, "prompt": None},
    ]
    assert cs.skipped == {"no assistant turn": 1, "more than two speakers": 1, "malformed chitchat conversation": 1}
    assert cs.trimmed == {"trailing user turn dropped": 1, "blank message removed": 1}


def test_chitchat_packaged():
    pytest.importorskip("chitchat_dataset")
    cs = load_conversations("chitchat")
    # Measured: 4,017 kept of 7,168; 3,151 skipped as "no assistant turn" (the partner never replied).
    assert len(cs.conversations) >= 4000 and len(cs.meta) == len(cs.conversations)
    assert len(cs.conversations) + sum(cs.skipped.values()) == 7168
    assert cs.skipped.get("no assistant turn", 0) >= 3000
    for conv in cs.conversations:
        assert conv[0]["role"] == "user" and conv[-1]["role"] == "assistant"
        assert all(m["role"] != n["role"] for m, n in itertools.pairwise(conv))
    assert sum(len(c) >= 10 for c in cs.conversations) >= 2000  # real multi-turn chats
    rated = [m for m in cs.meta if m["ratings"] is not None]
    assert len(rated) >= 3000 and set(rated[0]["ratings"]) == {"witty", "upbeat", "interesting"}


# ---- chatterbot ----


def test_chatterbot_adapter_on_small_files(tmp_path):
    (tmp_path / "english").mkdir()
    (tmp_path / "klingon").mkdir()
    (tmp_path / "english" / "a.yml").write_text(
        "categories:\n- test\n"
        "conversations:\n"
        "- - Is it on?\n  - yes\n"  # YAML 1.1 would make this True
        "- - Version?\n  - 1.10\n"  # ... and this 1.1
        "- - Count\n  - !!int 5\n"  # an explicit tag gives an int: spelled with str()
        "- - q\n  - a\n  - q2\n  - a2\n  - q3\n"  # multi-turn, trailing user turn dropped
        "- - alone\n"
        "- - q\n  - - nested\n    - list\n"
        "- - q\n  -\n"  # an empty answer
        "- just a string\n",
        encoding="utf-8",
    )
    (tmp_path / "english" / "b.yml").write_text("conversations:\n- - [unclosed\n", encoding="utf-8")
    (tmp_path / "english" / "c.yml").write_text("categories:\n- none\n", encoding="utf-8")
    (tmp_path / "klingon" / "k.yml").write_text("conversations:\n- - nuqneH\n  - nuqneH\n", encoding="utf-8")
    cs = load_conversations(str(tmp_path), "chatterbot", languages=("english",))
    assert [[m["content"] for m in c] for c in cs.conversations] == [
        ["Is it on?", "yes"],
        ["Version?", "1.10"],
        ["Count", "5"],
        ["q", "a", "q2", "a2"],
    ]
    assert roles(cs.conversations[3]) == ["user", "assistant", "user", "assistant"]
    assert cs.meta[0] == {"language": "english", "file": "a.yml"}
    assert cs.skipped == {
        "no assistant turn": 1,
        "non-string message": 1,
        "empty assistant turn": 1,
        "conversation is not a list": 1,
        "YAML parse error": 1,
        "YAML file has no conversations list": 1,
    }
    assert cs.trimmed == {"trailing user turn dropped": 1}
    both = load_conversations(str(tmp_path), "chatterbot", languages=("english", "klingon"))
    assert both.conversations[-1][0]["content"] == "nuqneH"
    with pytest.raises(LmforgeError, match="no language folder 'vulcan'"):
        load_conversations(str(tmp_path), "chatterbot", languages=("vulcan",))


def test_chatterbot_packaged():
    pytest.importorskip("chatterbot_corpus")
    en = load_conversations("chatterbot", languages=("english",))
    zh = load_conversations("chatterbot", languages=("chinese",))
    # Measured: english 2,025 kept, 1 skipped (trivia.yml has an entry that is a string, not a list);
    # chinese 467 kept, 0 skipped.
    assert len(en.conversations) >= 2000 and len(zh.conversations) >= 450
    assert sum(en.skipped.values()) <= 5 and sum(zh.skipped.values()) <= 5
    assert any(len(c) >= 4 for c in en.conversations)  # some are multi-turn
    assert any("\u4e00" <= ch <= "\u9fff" for c in zh.conversations[:20] for m in c for ch in m["content"])
    both = load_conversations("chatterbot")
    assert len(both.conversations) == len(en.conversations) + len(zh.conversations)
    assert {m["language"] for m in both.meta} == {"english", "chinese"}
    with pytest.raises(LmforgeError, match="packaged corpus"):
        load_conversations("chatterbot", "alpaca")
