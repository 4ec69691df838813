"""`lmforge eval`: multiple-choice scoring, task file readers, built-in sets, perplexity.

python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.mc import Item, Request, prompts_for, read_items, score_items, score_request, summarize


@pytest.fixture(scope="module")
def model_and_tok(base_run):
    from lmforge.tokenizer.special import load_tokenizer
    from lmforge.train.checkpoint import load_for_inference

    torch.manual_seed(0)
    model, tok_dir, _ = load_for_inference(base_run)
    with torch.no_grad():  # a random model with peaked logits, so choices differ clearly
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model, load_tokenizer(tok_dir)


def _reference_ll(model, tok, prompt: str, cont: str) -> float:
    """log P(cont | prompt) by hand: one forward over the whole text, the continuation's tokens summed."""
    from lmforge.eval.mc import _split_tokens

    ((ctx, c),) = _split_tokens(tok, prompt, [cont])
    ids = torch.tensor([ctx + c])
    logp = torch.log_softmax(model(ids)[0][0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(c)))


def test_scoring_shares_the_prompt_and_equals_scoring_each_choice_in_full(model_and_tok):
    model, tok = model_and_tok
    item = Item("What is the capital of France?", ["Paris", "the city of London", "Rome", "a very long answer"], 0)
    for req in prompts_for([item], "cloze") + prompts_for([item], "letter"):
        shared = score_request(model, tok, req, share_prompt=True)
        full = score_request(model, tok, req, share_prompt=False)
        for (a, greedy_a), (b, greedy_b), cont in zip(shared, full, req.continuations, strict=True):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
            assert a == pytest.approx(_reference_ll(model, tok, req.prompt, cont), abs=1e-4)


@pytest.mark.parametrize("pos,way", [("rope", "flat"), ("learned", "flat"), ("rope", "rows"), ("learned", "rows"),
                                     ("alibi", "rows")])  # fmt: skip
@pytest.mark.parametrize("pack,split", [(256, 1024), (12, 12)])
def test_batched_groups_equal_scoring_each_pair_in_full(pos, way, pack, split, monkeypatch):
    """Many questions in one forward (each packed as context + its continuations; the rows way several to a row,
    rows of different lengths right-padded; the flat way all in one sequence; continuations of 1..7 tokens, several
    batches under a small budget; with split 12 a question's choices split over several pieces; continuations that
    do not fit max_seq_len after their context, left-truncated as score_pair does; with pack 12 the flat way's long
    pieces run the rows way) give score_pair's numbers."""
    from lmforge.eval import scoring
    from lmforge.eval.scoring import score_groups, score_pair
    from lmforge.model import cpu_kernels

    if way == "flat" and cpu_kernels.loaded() is None:
        pytest.skip("the flat way needs the C kernels (score_groups takes the rows way without them, and for ALiBi)")
    real, used = scoring._flat_decoder, []
    monkeypatch.setattr(scoring, "_flat_decoder", lambda m: used.append(way) or (real(m) if way == "flat" else None))
    monkeypatch.setattr(scoring, "PACK_TOKENS", pack)
    monkeypatch.setattr(scoring, "SPLIT_TOKENS", split)
    if pack == 12:  # the flat way sends pieces past FLAT_TOKENS the rows way: both in one call
        monkeypatch.setattr(scoring, "FLAT_TOKENS", 20)
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=40,
                                    pos_encoding=pos)).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, 97, (n,), generator=g).tolist()

    groups = [(ids(n), [ids(1 + (n + j) % 7) for j in range(1 + n % 4)]) for n in (1, 3, 9, 17, 4, 30, 9)]
    groups.append((ids(38), [ids(5), ids(2), ids(9)]))  # 38 + 5 - 1 > 40: those two truncated from the left, batched
    groups.append((ids(30), [ids(9), ids(8), ids(7)]))  # packed: 30 + 8 + 7 + 6 > 40 slots, positions all < 40
    got = score_groups(model, groups, budget=120)
    assert used == [way] and (way == "rows" or real(model) is not None)
    for (ctx, conts), scores in zip(groups, got, strict=True):
        for c, (ll, greedy) in zip(conts, scores, strict=True):
            ref_ll, ref_greedy = score_pair(model, ctx, c)
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_a_float64_model_scores_in_float64():
    """Shared-prompt scoring of a float64 model keeps float64 through the log-softmax (the parity runs against
    transformers in float64 rely on it): equal to a plain float64 forward to 1e-10."""
    from lmforge.eval.scoring import score_groups
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, max_seq_len=40)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    ctx, conts = list(range(5, 17)), [[3, 9, 40, 2], [7], [60, 61]]
    (got,) = score_groups(model, [(ctx, conts)])
    for c, (ll, _) in zip(conts, got, strict=True):
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + c[:-1]]))
        logp = torch.log_softmax(logits[0, len(ctx) - 1 :], -1)
        ref = float(sum(logp[i, t] for i, t in enumerate(c)))
        assert abs(ll - ref) < 1e-10, (ll, ref)


def test_prompts_letter_cloze_chinese_and_few_shot():
    en = Item("2 + 2 =", ["3", "4"], 1, "math")
    zh = Item("中国的首都是哪里？", ["北京", "上海"], 0, "geo", "zh")
    (letter,) = prompts_for([en], "letter")
    assert letter.prompt == "2 + 2 =\nA. 3\nB. 4\nAnswer:" and letter.continuations == [" A", " B"]
    (cloze,) = prompts_for([en], "cloze")
    assert cloze.prompt == "Question: 2 + 2 =\nAnswer:" and cloze.continuations == [" 3", " 4"]
    (zl,) = prompts_for([zh], "letter")
    assert zl.prompt.endswith("B. 上海\n答案：") and zl.continuations == ["A", "B"]
    pool = [Item(f"{i} + 1 =", [str(i), str(i + 1)], 1, "math") for i in range(5)]
    (shot,) = prompts_for([en], "letter", shots=2, pool=pool, seed=3)
    assert shot.prompt.count("Answer: B") == 2 and shot.prompt.endswith(letter.prompt)
    assert prompts_for([en], "letter", shots=2, pool=pool, seed=3)[0].prompt == shot.prompt  # seeded
    with pytest.raises(LmforgeError, match="6-shot needs 6 other items of subject 'math', the pool has 5"):
        prompts_for([en], "letter", shots=6, pool=pool)


def test_readers_for_the_layouts_users_have(tmp_path):
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "astronomy_test.csv").write_text('"Which is a planet?",Mars,Sirius,Vega,Rigel,A\n')
    ceval = "id,question,A,B,C,D,answer,explanation\n0,中国的首都是哪里？,上海,北京,广州,深圳,Ｂ,因为\n"
    (tmp_path / "law_val.csv").write_text(ceval, encoding="utf-8")
    (tmp_path / "cmmlu.csv").write_text(",Question,A,B,C,D,Answer\n0,一加一,1,2,3,4,B\n", encoding="utf-8")
    arc = {"question": {"stem": "Sky?", "choices": [{"label": "1", "text": "blue"}, {"label": "2", "text": "red"}]},
           "answerKey": "1"}  # fmt: skip
    hella = {"ctx": "He opens the door and", "endings": ["walks in.", "eats it.", "flies.", "sings."], "label": "0"}
    plain = {"question": "1+1?", "choices": ["2", "3"], "answer": 0}
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (arc, hella, plain)))
    mmlu = read_items(tmp_path / "mmlu")
    assert (mmlu[0].subject, mmlu[0].choices, mmlu[0].answer) == ("astronomy", ["Mars", "Sirius", "Vega", "Rigel"], 0)
    ce = read_items(tmp_path / "law_val.csv")[0]
    assert (ce.subject, ce.answer, ce.lang, ce.choices[1]) == ("law", 1, "zh", "北京")  # full-width Ｂ read as B
    assert read_items(tmp_path / "cmmlu.csv")[0].answer == 1
    a, h, p = read_items(tmp_path / "x.jsonl")
    assert (a.choices, a.answer) == (["blue", "red"], 0) and h.context_only and h.answer == 0 and p.answer == 0


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "q,A,B,C,D,E\n", "a.csv:1: answer 'E' is not one of the 4 choices"),
        ("b.csv", "id,question,A,B,C,D,answer\n0,q,a,b\n", "b.csv:2: 4 columns, the header has 7"),
        ("c.jsonl", '{"question": "q", "choices": [], "answer": 0}\n', "c.jsonl:1: answer 0 is not one of the 0"),
        ("d.jsonl", '{"question": "q", "choices": ["a", ""], "answer": 0}\n', "d.jsonl:1: an empty choice"),
        ("e.jsonl", '{"prompt": "q"}\n', "e.jsonl:1: a record needs question and choices"),
        ("f.jsonl", "{oops\n", "f.jsonl:1: not valid JSON"),
    ],
)
def test_a_bad_task_file_is_a_one_line_error_naming_the_row(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(LmforgeError) as e:
        read_items(tmp_path / name)
    assert str(e.value).startswith(f"{tmp_path}/{message}") and "\n" not in str(e.value)


def test_summary_counts_acc_and_acc_norm_with_intervals():
    rows = [{"subject": s, "correct": c, "correct_norm": n} for s, c, n in
            [("a", True, True), ("a", False, True), ("b", True, False), ("b", True, True)]]  # fmt: skip
    out = summarize(rows, [4, 4, 2, 2])
    assert (out["n"], out["acc"], out["acc_norm"], out["chance"]) == (4, 0.75, 0.75, 0.375)
    assert out["acc_lo"] < 0.75 < out["acc_hi"] and out["subjects"]["a"]["acc"] == 0.5


def test_acc_norm_divides_by_the_choice_length(model_and_tok, monkeypatch):
    from lmforge.eval import mc

    item = Item("q", ["x", "a much longer choice"], 1)
    req = Request(item, "q", [" x", " a much longer choice"], [1, 20])
    monkeypatch.setattr(mc, "score_request", lambda *a, **k: [(-2.0, False), (-10.0, False)])
    (r,) = score_items(model_and_tok[0], model_and_tok[1], [req])
    assert (r["pick"], r["pick_norm"], r["correct"], r["correct_norm"]) == (0, 1, False, True)


def test_builtin_sets_are_fixed_and_real():
    from lmforge.eval.tasks import task_items

    for name in ("shakespeare-next", "chatterbot-en", "chatterbot-zh"):
        items = task_items(name)
        assert items == task_items(name) and len(items) >= 300, name  # the same items for every model
        assert all(len(it.choices) == 4 and len(set(it.choices)) == 4 for it in items)
        share = sum(it.answer == 0 for it in items) / len(items)
        assert 0.15 < share < 0.35  # the right answer's slot is random
    zh = task_items("chatterbot-zh")
    assert all(it.lang == "zh" for it in zh) and any("\u4e00" <= ch <= "\u9fff" for ch in zh[0].question)


def test_text_loss_scores_every_token_but_the_first(model_and_tok):
    from lmforge.eval.loss import text_loss

    model, tok = model_and_tok
    text = "To be, or not to be, that is the question. " * 8
    r = text_loss(model, tok, [text])
    ids = tok.encode(text).ids
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode())
    x = torch.tensor([ids])
    with torch.no_grad():  # one window when it fits: the plain model loss
        _, ref = model(x[:, :-1], x[:, 1:]) if len(ids) <= model.cfg.max_seq_len + 1 else (None, None)
    if ref is not None:
        assert r["loss"] == pytest.approx(float(ref), rel=1e-5)


def test_eval_command_writes_results_and_items(base_run, tmp_path, capsys):
    from lmforge.cli import main

    rows = [{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2), str(i)], "answer": 0} for i in range(12)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "text.txt").write_text("Some text to score. " * 30)
    argv = ["eval", str(base_run), "--tasks", f"mc:{tmp_path / 't.jsonl'},ppl:{tmp_path / 'text.txt'}",
            "--out", str(tmp_path / "out"), "--limit", "10"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    mc = report["tasks"][f"mc:{tmp_path / 't.jsonl'}"]
    assert mc["n"] == 10 and 0 <= mc["acc"] <= 1 and mc["chance"] == pytest.approx(1 / 3)
    items = (tmp_path / "out").glob("items_*.jsonl")
    assert sum(len(f.read_text().splitlines()) for f in items) == 10
    assert "acc_norm" in printed and "bits/byte" in printed
    assert main(["eval", str(base_run), "--tasks", "mmlu"]) == 2  # an unknown task: one line, before any work
    assert "unknown task 'mmlu'" in capsys.readouterr().err


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    from lmforge.eval.tasks import pass_at_k

    for n, c, k in [(10, 3, 1), (10, 3, 4), (8, 0, 2), (8, 8, 8), (5, 4, 2), (200, 7, 16)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of right samples
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_generative_task_exact_match_and_pass_at_k(base_run, tmp_path, toy_task, capsys):
    from lmforge.cli import main

    out = tmp_path / "gen"
    argv = ["eval", str(base_run), "--tasks", f"task:{toy_task}", "--limit", "6", "--samples", "4",
            "--max-new-tokens", "5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())["tasks"][f"task:{toy_task}"]
    assert r["n"] == 6 and 0 <= r["exact_match"] <= 1 and set(r["pass_at_k"]) == {"1", "2", "4"}
    p = [r["pass_at_k"][k] for k in ("1", "2", "4")]
    assert p == sorted(p) and "pass@4" in capsys.readouterr().out  # pass@k never falls as k grows
    assert main(["eval", str(base_run), "--tasks", "task:nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_text_the_tokenizer_cannot_encode_is_a_one_line_error_naming_the_item():
    """A tokenizer without byte fallback gives its unknown token for text it lacks: that item is an error."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    from lmforge.eval.mc import _checked_pairs

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz :?")}}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    ok = Request(Item("what is a", ["b", "c"], 0, where="t.jsonl:1"), "what is a?", [" b", " c"], [1, 1])
    assert len(_checked_pairs(tok, ok, 64)) == 2
    bad = Request(Item("什么", ["b", "c"], 0, where="t.jsonl:2"), "什么?", [" b", " c"], [1, 1])
    with pytest.raises(LmforgeError, match=r"t.jsonl:2: the model's tokenizer cannot encode"):
        _checked_pairs(tok, bad, 64)


def test_pack_rows_fills_rows_best_fit_and_keeps_every_piece():
    from lmforge.eval.scoring import pack_rows

    pieces = [(n, i) for i, n in enumerate([90, 10, 60, 40, 300, 30, 70, 5, 100, 95])]
    rows = pack_rows(pieces, 100)
    assert sorted(p for row in rows for p in row) == sorted(pieces)
    lengths = [sum(n for n, _ in row) for row in rows]
    assert lengths == sorted(lengths) and all(n <= 100 or len(row) == 1 for n, row in zip(lengths, rows, strict=True))
    assert len(rows) == 6  # 300 | 100 | 95 + 5 | 90 + 10 | 70 + 30 | 60 + 40: every row full
    assert pack_rows([], 100) == []
