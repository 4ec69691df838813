"""lm-evaluation-harness adapter (lmforge/eval/harness.py): parity with the harness's own HFLM on the same model
exported with `lmforge export`, on local task YAMLs of all three request types, and `lmforge eval --harness`.

python -m pytest -q tests/test_harness.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")


def _write_tasks(root) -> None:
    """Three local harness tasks over JSONL files: multiple choice, rolling log-likelihood, generation."""
    rows = [{"question": f"To be or not to be, line {i}: which word follows 'to'?",
             "choices": ["be", " thee", "morrow and tomorrow", "the king"], "answer": i % 4} for i in range(8)]  # fmt: skip
    texts = [{"text": "Now is the winter of our discontent made glorious summer by this sun of York. " * n}
             for n in (1, 5, 12)]  # fmt: skip
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_target: answer\ndoc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (root / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'text.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def peaked_run(base_run, tmp_path_factory):
    """The tiny base run with weights drawn wide, so that log-likelihoods differ clearly between choices."""
    import shutil

    from lmforge.train import checkpoint as ckpt

    torch.manual_seed(0)
    model, _, meta = ckpt.load_for_inference(base_run)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    run = tmp_path_factory.mktemp("peaked") / "run"
    shutil.copytree(base_run / "tokenizer", run / "tokenizer")
    ckpt.save_checkpoint(run, 1, ckpt.model_tensors(model.state_dict(), model.cfg.tie_embeddings), meta)
    return run


@pytest.fixture(scope="module")
def both(peaked_run, tmp_path_factory, monkeypatch_module):
    """The three tasks run by HFLM on the exported model and by LmforgeLM on the run: (ours, theirs, tasks dir)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM, task_manager
    from lmforge.hub.export_cmd import export_hf

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("harness")
    _write_tasks(root)
    export_hf(peaked_run, root / "hf", dtype="float32")
    manager = task_manager(list(TASKS), str(root))
    kw = {"tasks": list(TASKS), "task_manager": manager, "log_samples": True, "bootstrap_iters": 0}
    ours = lm_eval.simple_evaluate(model=LmforgeLM(str(peaked_run), device="cpu"), **kw)
    hf = HFLM(pretrained=str(root / "hf"), device="cpu", batch_size=1, dtype="float32")
    theirs = lm_eval.simple_evaluate(model=hf, **kw)
    return ours, theirs, root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_multiple_choice_loglikelihoods_equal_hflm(both):
    ours, theirs, _ = both
    a, b = ours["samples"]["tiny_mc"], theirs["samples"]["tiny_mc"]
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        for (ll_x, greedy_x), (ll_y, greedy_y) in zip([r[0] for r in x["resps"]], [r[0] for r in y["resps"]],
                                                      strict=True):  # fmt: skip
            assert abs(ll_x - ll_y) < 1e-4 and greedy_x == greedy_y
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    lls = [r[0][0] for r in a[0]["resps"]]
    assert max(lls) - min(lls) > 1.0  # the choices really differ: the comparison is not of equal numbers


def test_rolling_loglikelihood_equals_hflm(both):
    ours, theirs, root = both
    for x, y in zip(ours["samples"]["tiny_rolling"], theirs["samples"]["tiny_rolling"], strict=True):
        assert x["resps"][0][0] == pytest.approx(y["resps"][0][0], abs=1e-3)  # a sum over ~100-300 tokens
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_rolling"][metric] == pytest.approx(theirs["results"]["tiny_rolling"][metric],
                                                                         rel=1e-5)  # fmt: skip
    # the longest text is more than max_seq_len (128) tokens: several windows, each token predicted once
    from lmforge.tokenizer.special import load_tokenizer

    tok = load_tokenizer(root / "hf")
    assert max(len(tok.encode(s["doc"]["text"]).ids) for s in ours["samples"]["tiny_rolling"]) > 128 * 2


def test_generation_equals_hflm_greedy(both):
    ours, theirs, _ = both
    a = [s["resps"][0][0] for s in ours["samples"]["tiny_gen"]]
    b = [s["resps"][0][0] for s in theirs["samples"]["tiny_gen"]]
    assert a == b and any(a)
    assert all("\n" not in s and "." not in s for s in a)  # cut at the stop strings


def test_eval_command_runs_harness_tasks_and_resumes(peaked_run, both, tmp_path, capsys):
    from lmforge.cli import main

    _, _, root = both
    out = tmp_path / "out"
    argv = ["eval", str(peaked_run), "--harness", "tiny_mc,tiny_gen", "--harness-include", str(root),
            "--tasks", f"mc:{root / 'mc.jsonl'}", "--out", str(out), "--limit", "6"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    mc = report["tasks"]["harness:tiny_mc"]
    assert mc["n"] == 6 and 0 <= mc["acc"] <= 1 and "acc_norm" in mc
    assert report["tasks"][f"mc:{root / 'mc.jsonl'}"]["n"] == 6  # a built-in-style task beside the harness ones
    assert "harness:tiny_mc" in capsys.readouterr().out
    lines = (out / "items_harness_tiny_mc.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "resps" in json.loads(lines[0])
    # rerun: both tasks come from results.json, nothing is scored again
    assert main(argv) == 0
    assert "3 task(s) already scored" in capsys.readouterr().err
    # other settings into the same folder: refused, not overwritten
    assert main([*argv[:-1], "5"]) == 2
    assert "other settings (limit: 6, now 5)" in capsys.readouterr().err


def test_a_missing_include_folder_is_a_one_line_error(peaked_run, tmp_path, capsys):
    from lmforge.cli import main

    assert main(["eval", str(peaked_run), "--harness", "x", "--harness-include", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.slow  # indexes the harness's ~15,000 built-in tasks (15-30 s)
def test_an_unknown_harness_task_is_a_one_line_error(peaked_run, capsys):
    from lmforge.cli import main

    assert main(["eval", str(peaked_run), "--harness", "no_such_task_xyz"]) == 2
    assert "unknown harness task no_such_task_xyz" in capsys.readouterr().err


def test_interrupted_multiple_choice_task_continues_from_its_partial_items(peaked_run, tmp_path, monkeypatch):
    """Kill an eval after its first chunk of items; the rerun scores only the rest and gets the same numbers."""
    from lmforge.eval import eval_cmd
    from lmforge.eval.eval_cmd import EvalConfig, evaluate

    rows = [{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2), str(i)], "answer": 0} for i in range(20)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"mc:{tmp_path / 't.jsonl'}"
    whole = evaluate(EvalConfig(model=str(peaked_run), tasks=spec, out=str(tmp_path / "whole")))

    from lmforge.eval import mc

    real, calls = mc.score_items, []

    def dies_on_second_chunk(*a, **k):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mc, "score_items", dies_on_second_chunk)
    monkeypatch.setattr(eval_cmd, "_score_resumable", _chunked(eval_cmd._score_resumable, 8))
    cfg = EvalConfig(model=str(peaked_run), tasks=spec, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    name = next((tmp_path / "cut").glob("items_*.partial.jsonl"))
    assert len(name.read_text().splitlines()) == 8
    with open(name, "a") as f:
        f.write('{"where": "torn')  # the interruption tore the last line
    monkeypatch.setattr(mc, "score_items", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    calls.clear()
    again = evaluate(cfg)
    assert calls == [8, 4]  # only the 12 items left
    assert again["tasks"][spec]["acc"] == whole["tasks"][spec]["acc"]
    a = (tmp_path / "whole" / name.name.replace(".partial", "")).read_text()
    b = (tmp_path / "cut" / name.name.replace(".partial", "")).read_text()
    flat = [[ll for x in text.splitlines() for ll in json.loads(x)["loglikelihoods"]] for text in (a, b)]
    assert len(flat[0]) == 60 and flat[0] == pytest.approx(flat[1], abs=1e-5)
    assert not name.exists() and math.isfinite(again["tasks"][spec]["acc_norm"])


def _chunked(fn, size):
    return lambda *a, **k: fn(*a, **{**k, "chunk": size})
