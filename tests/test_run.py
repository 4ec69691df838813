"""`lmforge run`: the recipe runs end to end (clean -> tokenizer -> tokenize -> pretrain -> samples) and reruns skip done stages."""

import json

import yaml

from lmforge.cli import main


def test_recipe_end_to_end_and_rerun(small_corpus, tmp_path, capsys):
    recipe = {
        "corpus": [str(small_corpus)],
        "clean": {"steps": [{"name": "normalize"}, {"name": "exact_dedup"}]},
        "tokenizer": {"vocab_size": 300},
        "tokenize": {"val_fraction": 0.1},
        "pretrain": {"batch_size": 2, "seq_len": 32, "max_steps": 3, "warmup_steps": 1, "eval_every": 3,
                     "eval_batches": 1, "model": {"n_layer": 1, "d_model": 32, "max_seq_len": 64}},
        "sample": {"prompts": ["KING:"], "max_new_tokens": 8},
        "sft": {"data": "chatterbot", "batch_size": 2, "seq_len": 32, "max_steps": 2, "warmup_steps": 1,
                "eval_batches": 1, "samples": 2},
        "chat": {"questions": ["Hello", "Who are you?"], "max_new_tokens": 4},
        "dpo": {"pairs": "task:add", "batch_size": 2, "seq_len": 64, "max_steps": 2, "eval_batches": 1},
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["run", "--recipe", str(path), "--out", str(out)]) == 0
    report = json.loads((out / "clean" / "report.json").read_text())
    assert report["identity_holds"] and report["counts"]["kept"] > 0
    assert "--- prompt: 'KING:'\nKING:" in (out / "samples.txt").read_text()
    assert [r["step"] for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").open()) if "val_loss" in r] == [3]
    # Stage 2: SFT continues from the pretrained run (validation before and after) and a scripted chat follows.
    assert [r["step"] for r in map(json.loads, (out / "sft" / "metrics.jsonl").open()) if "val_loss" in r] == [0, 2]
    chat = (out / "chat.txt").read_text()
    assert "you> Hello\nassistant> " in chat and "you> Who are you?" in chat
    # Stage 3: DPO from the SFT model on task pairs, evaluated on held-out pairs before and after.
    evals = [r for r in map(json.loads, (out / "dpo" / "metrics.jsonl").open()) if "val_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # A rerun finds every stage done (pretraining is already at max_steps) and only samples again.
    capsys.readouterr()
    assert main(["run", "--recipe", str(path), "--out", str(out), "--set", "sample.max_new_tokens=4"]) == 0
    assert "KING:" in capsys.readouterr().out


def test_recipe_unknown_section_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("pretrian: {max_steps: 3}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "pretrian" in capsys.readouterr().err
