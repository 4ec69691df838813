"""Self-Instruct: ROUGE-L, the filters (each counted), the loop with a scripted model, the command on a tiny model:
`python -m pytest -q tests/test_self_instruct.py`.
"""

from __future__ import annotations

import json

import pytest

from lmforge.chat.self_instruct import (
    Pool,
    parse_numbered,
    read_seeds,
    rouge_l,
    rule_rejection,
    self_instruct,
    tokens,
)
from lmforge.cli import main
from lmforge.errors import LmforgeError


def test_rouge_l():
    assert rouge_l(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert rouge_l(["a", "b"], ["c", "d"]) == 0.0
    # LCS of "the cat sat on the mat" and "the cat on the mat" is 5: P = 5/5, R = 5/6
    a, b = tokens("the cat sat on the mat"), tokens("The cat on the mat")
    assert rouge_l(a, b) == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert tokens("写一首诗 about rain") == ["写", "一", "首", "诗", "about", "rain"]
    assert rouge_l(tokens("写一首关于秋天的诗"), tokens("写一首关于春天的诗")) == pytest.approx(8 / 9)


def test_filters():
    assert rule_rejection("Hi there") == "too short (< 3 words)"
    assert rule_rejection("word " * 151) == "too long (> 150 words)"
    assert rule_rejection("Draw a picture of a cat.") == "about images, files or sound (blacklisted word)"
    assert rule_rejection("Summarize the mapping of keys to values.") is None  # "map" only as a whole word
    assert rule_rejection("- Write a story about a dog.") == "starts with punctuation or a digit"
    assert rule_rejection("3 ways to cook rice, explained.") == "starts with punctuation or a digit"
    assert rule_rejection("请写一首关于秋天的诗。") is None
    pool = Pool(["Write a haiku about autumn leaves."])
    assert pool.rejection("write a haiku about autumn leaves") == "duplicate"
    assert pool.rejection("Write a haiku about the autumn leaves.") == "too similar to the pool (ROUGE-L > 0.7)"
    assert pool.rejection("Explain how vaccines train the immune system.") is None
    assert parse_numbered("Sure!\n9. First task here.\n10) Second one\nTask 11: third\n\nnot numbered") == (
        ["First task here.", "Second one", "third"], 2)  # fmt: skip


def test_loop_counts_every_dropped_candidate():
    lists = iter([
        (
            "Here you go:\n9. Draw a map of your town.\n10. Write a haiku about autumn leaves.\n11. Hi\n"
            "12. Explain how vaccines train the immune system.\n13. Explain how vaccines train the immune system!\n"
            "14. Describe the water cycle for a child.\n15. List five fruits that are red."
        ),
        "9. Name three famous bridges and their cities.\n10. Write a limerick about a cat.",
    ])  # fmt: skip
    answers = {"Describe the water cycle for a child.": ("", True), "List five fruits that are red.": ("x" * 5, False)}

    def generate(prompt, max_new, sample):
        if sample:
            assert prompt.startswith("Here is a list of diverse tasks") and "\n1. " in prompt
            return next(lists), True
        return answers.get(prompt, (f"answer to {prompt}", True))

    seeds = ["Write a haiku about autumn leaves.", "Give three tips for studying.", "Translate hello into French."]
    records, report = self_instruct(generate, seeds, n=3, shots=3, per_round=8, max_rounds=5)
    assert [r["messages"][0]["content"] for r in records] == [
        "Explain how vaccines train the immune system.", "Name three famous bridges and their cities.",
        "Write a limerick about a cat.",
    ]  # fmt: skip
    assert records[0]["messages"][1] == {"role": "assistant", "content": "answer to Explain how vaccines train the "
                                                                        "immune system."}  # fmt: skip
    assert report["dropped"] == {"not a numbered line": 1, "about images, files or sound (blacklisted word)": 1,
                                 "duplicate": 2, "too short (< 3 words)": 1, "empty answer": 1,
                                 "answer cut at max_new_tokens": 1}  # fmt: skip
    assert report["candidates"] == 9 and report["kept"] == 3 and report["rounds"] == 2


def test_seeds_and_command(tmp_path, chat_model, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Rewrite in the passive voice.", "input": "We won."}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "Name a red fruit."}]}) + "\n")  # fmt: skip
    assert read_seeds(str(seeds)) == ["Rewrite in the passive voice.\nWe won.", "Name a red fruit."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"output": "no instruction"}\n')
    with pytest.raises(LmforgeError, match="bad.jsonl:2: a seed needs"):
        read_seeds(str(bad))
    bad.write_text('{"instruction": "only one"}\n')
    with pytest.raises(LmforgeError, match="at least 2 seed tasks"):
        read_seeds(str(bad))
    out = tmp_path / "gen.jsonl"
    assert main(["self-instruct", "--model", str(chat_model), "--seeds", str(seeds), "--n", "2", "--out", str(out),
                 "--max-rounds", "1", "--per-round", "2"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "gen.jsonl.report.json").read_text())
    assert report["rounds"] == 1 and out.exists()  # a random model writes nothing usable; every drop is counted
    assert report["kept"] + sum(v for k, v in report["dropped"].items() if k != "not a numbered line") == report[
        "candidates"]  # fmt: skip
    assert main(["self-instruct", "--model", str(chat_model), "--seeds", str(bad), "--out", str(out)]) == 2
    assert "at least 2 seed tasks" in capsys.readouterr().err
