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
        "align": {"task": "add", "warmup_examples": 40,
                  "warmup": {"batch_size": 4, "seq_len": 48, "max_steps": 2, "eval_every": 0, "samples": 0},
                  "grpo": {"batch_size": 2, "group_size": 2, "max_new_tokens": 6, "max_steps": 2, "eval_prompts": 4,
                           "train_prompts": 20}},
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
    # Stage 3: a task warm-up from the SFT model, then GRPO, scored on held-out prompts before and after.
    assert yaml.safe_load((out / "task-sft" / "config.yaml").read_text())["base"] == str(out / "sft")
    evals = [r for r in map(json.loads, (out / "grpo" / "metrics.jsonl").open()) if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    align = json.loads((out / "align.json").read_text())
    assert align["before"]["val_prompts"] == 4 and align["after"]["step"] == 2 and align["kl_max"] >= 0
    # Paired on the same prompts: the per-prompt results of both evaluations are saved and agree with the accuracies.
    per = [json.loads((out / "grpo" / "eval" / f"step_{s:08d}.json").read_text())["correct"] for s in (0, 2)]
    fixed = sum(1 for x, y in zip(*per) if not x and y)
    broken = sum(1 for x, y in zip(*per) if x and not y)
    assert (align["paired"]["fixed"], align["paired"]["broken"]) == (fixed, broken)
    assert sum(per[1]) / 4 == align["after"]["val_accuracy"] and "McNemar p" in align["summary"]
    # A rerun finds every stage done (pretraining is already at max_steps) and only samples again.
    capsys.readouterr()
    assert main(["run", "--recipe", str(path), "--out", str(out), "--set", "sample.max_new_tokens=4"]) == 0
    rerun = capsys.readouterr()
    assert "KING:" in rerun.out and "held-out add accuracy" in rerun.err


def test_recipe_align_needs_sft_and_known_fields(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("align: {task: sort}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "align section needs an sft section" in capsys.readouterr().err
    path.write_text("sft: {data: chatterbot}\nalign: {tsk: sort}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "unknown align field(s) tsk" in capsys.readouterr().err
    path.write_text("sft: {data: chatterbot}\nalign: {warmup_examples: lots}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "align.warmup_examples must be a positive integer, got 'lots'" in capsys.readouterr().err


def test_recipe_unknown_section_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("pretrian: {max_steps: 3}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "pretrian" in capsys.readouterr().err
