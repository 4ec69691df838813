"""Stage 3: the alignment math against hand-computed values, tasks, preference data, and the reward/dpo/grpo runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align import losses as L
from lmforge.align.prefs import check_pair, chitchat_pairs, load_pairs, split_pairs, task_pairs
from lmforge.align.tasks import TASKS, get_task, make_split
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson_interval
from lmforge.train import checkpoint as ckpt

t = torch.tensor


# ----------------------------------------------------------------------------- losses, by hand


def test_reward_ranking_loss():
    assert float(L.reward_ranking_loss(t([1.0]), t([0.0]))) == pytest.approx(math.log(1 + math.exp(-1)))


def test_dpo_ipo_simpo_by_hand():
    loss, c, r = L.dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5)
    assert (float(c), float(r)) == (0.25, -0.25)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))
    loss, _, _ = L.ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=0.5)  # h = 1 = 1/(2 beta)
    assert float(loss) == pytest.approx(0.0)
    # per answer token (Azar et al., TRL; lmforge dpo's default): sums divided by lengths 2 and 4 first
    loss, c, r = L.ipo_loss(t([-2.0]), t([-8.0]), t([-3.0]), t([-8.0]), beta=0.5, len_c=t([2.0]), len_r=t([4.0]))
    assert (float(c), float(r)) == (0.25, 0.0) and float(loss) == pytest.approx((0.5 - 1.0) ** 2)
    loss, _, _ = L.ipo_loss(t([-2.0]), t([-8.0]), t([-3.0]), t([-8.0]), beta=0.5, len_c=t([2.0]), len_r=t([4.0]),
                            per_token=False)  # fmt: skip
    assert float(loss) == pytest.approx((1.0 - 1.0) ** 2)
    loss, c, r = L.simpo_loss(t([-2.0]), t([-6.0]), beta=2.0, gamma=0.5, len_c=t([4.0]), len_r=t([3.0]))
    assert (float(c), float(r)) == (-1.0, -4.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.5)))
    assert set(L.PREFERENCE_LOSSES) == {"dpo", "ipo", "simpo"}
    assert float(L.chosen_nll(t([-6.0, -2.0]), t([3.0, 0.0]))) == pytest.approx((2.0 + 2.0) / 2)  # length 0 -> 1


def test_grpo_advantages_standardize_within_groups():
    adv = L.grpo_advantages(t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]), group_size=4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-3)
    assert adv[4:].tolist() == [0.0] * 4  # all equal: nothing to learn


def test_gae_by_hand():
    r, v = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]])
    adv, ret = L.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    adv, _ = L.gae(r, v, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert adv.tolist() == [[0.125, 0.25, 0.5]]
    # The answer occupies positions 1..2 only: the episode ends after position 2.
    adv, ret = L.gae(t([[9.0, 0.0, 1.0, 9.0]]), t([[0.5] * 4]), t([[0, 1, 1, 0]]), gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.0, 0.5, 0.5, 0.0]] and ret.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_clipped_policy_and_value_losses_by_hand():
    mask = torch.ones(1, 1)
    old = t([[0.0]])
    up = t([[math.log(1.5)]])
    assert float(L.policy_gradient_loss(old, old, t([2.0]), mask)) == pytest.approx(-2.0)  # ratio 1
    assert float(L.policy_gradient_loss(up, old, t([1.0]), mask, clip=0.2)) == pytest.approx(-1.2)  # clipped
    assert float(L.policy_gradient_loss(up, old, t([-1.0]), mask, clip=0.2)) == pytest.approx(1.5)  # pessimistic
    assert float(L.value_loss(t([[1.0]]), t([[0.0]]), t([[2.0]]), mask, clip=0.2)) == pytest.approx(0.5 * 1.8**2)


def test_kl_estimators_and_masked_mean():
    assert float(L.kl_per_token(t([0.0]), t([0.0]))) == 0.0
    assert float(L.kl_per_token(t([0.0]), t([-1.0]))) == pytest.approx(math.exp(-1))
    assert float(L.kl_per_token(t([0.0]), t([-1.0]), kind="k1")) == 1.0
    assert float(L.masked_mean(t([1.0, 3.0, 100.0]), t([1, 1, 0]))) == 2.0


@pytest.mark.parametrize("tied", [True, False])
def test_answer_logprobs_equal_the_full_logits_path(tied):
    """The head on answer positions only (DPO, GRPO, PPO) gives the log-probs, entropies and gradients of the full
    (B, T, vocab) logits, through a real model, with and without a tied head."""
    from lmforge.align.rollout import answer_logprobs
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, max_seq_len=16, tie_embeddings=tied)
    model = Transformer(cfg).double()
    idx = torch.randint(0, 97, (3, 12))
    targets = torch.randint(0, 97, (3, 12))
    targets[:, :4] = -100  # the prompt
    targets[1, 9:] = -100  # padding
    mask = targets != -100
    logits, _ = model(idx)
    full = torch.log_softmax(logits, dim=-1)  # in fp64, as the model
    want = full.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    want_entropy = -(full.exp() * full).sum(-1).detach() * mask
    logp, got_mask, entropy = answer_logprobs(model, {"idx": idx, "targets": targets})
    assert torch.equal(got_mask, mask)
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(entropy, want_entropy)
    scale = torch.randn(3, 12, dtype=torch.float64)
    params = [p for p in model.parameters()]
    g_want = torch.autograd.grad((want * scale).sum(), params)
    g_got = torch.autograd.grad((logp * scale).sum(), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pos,checkpointing", [("rope", False), ("rope", True), ("learned", False),
                                              ("sinusoidal", True)])  # fmt: skip
def test_shared_prompts_give_the_full_rows_log_probs_and_gradients(pos, checkpointing):
    """GRPO's group and DPO's pair run each prompt once (collate_shared + model(prefix=)): prompts of different
    lengths, answers of different lengths, an answer of one token, GQA; the same per-answer log-probs and gradients
    as the full rows, with activation checkpointing too."""
    from lmforge.align.batching import collate, collate_shared
    from lmforge.align.rollout import answer_logprobs
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=24, pos_encoding=pos)
    model = Transformer(cfg).double()
    model.checkpointing = checkpointing
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (5, 9, 2)]
    answer_lens = [3, 1, 7, 4, 11, 2]  # two answers per prompt
    owner = [0, 1, 2, 0, 1, 2]  # DPO's order (chosen rows, then rejected); GRPO's is [0, 0, 1, 1, 2, 2]
    sides = []
    for o, n in zip(owner, answer_lens, strict=True):
        answer = torch.randint(0, 61, (n,), generator=g).tolist()
        sides.append((prompts[o] + answer, [False] * len(prompts[o]) + [True] * n))
    full, shared = collate(sides, 0), collate_shared(sides, owner, 0)
    assert "prefix" in shared and shared["idx"].shape[1] < full["idx"].shape[1]
    assert shared["num_tokens"] == full["num_tokens"]
    params = list(model.parameters())
    results = []
    for batch in (full, shared):
        logp, mask, entropy = answer_logprobs(model, batch)
        per_answer = logp.sum(-1)
        assert mask.sum(-1).tolist() == answer_lens
        results.append(
            (per_answer, entropy.sum(-1), torch.autograd.grad((per_answer * torch.arange(1.0, 7)).sum(), params))
        )
    (want, want_h, g_want), (got, got_h, g_got) = results
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_packed_sides_give_the_padded_rows_log_probs_and_gradients(pos):
    """DPO's padding-free rows (collate_packed): per-side sums of log-probs, answer lengths and their gradients
    equal those of one padded row per side."""
    from lmforge.align.batching import collate, collate_packed, side_sums
    from lmforge.align.rollout import answer_logprobs
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, max_seq_len=24,
                                    pos_encoding=pos)).double()  # fmt: skip
    g = torch.Generator().manual_seed(2)
    sides = []
    for n_prompt, n_answer in [(5, 3), (2, 1), (9, 11), (3, 4), (6, 2), (4, 13)]:
        ids = torch.randint(0, 61, (n_prompt + n_answer,), generator=g).tolist()
        sides.append((ids, [False] * n_prompt + [True] * n_answer))
    padded, packed = collate(sides, 0), collate_packed(sides, 0)
    assert len(packed["idx"]) < len(sides) and packed["num_tokens"] == padded["num_tokens"]
    params = list(model.parameters())
    results = []
    for batch in (padded, packed):
        logp, mask, _ = answer_logprobs(model, batch)
        sums, lengths = side_sums(logp, batch), side_sums(mask.double(), batch)
        results.append((sums, lengths, torch.autograd.grad((sums * torch.arange(1.0, 7)).sum(), params)))
    (want, want_n, g_want), (got, got_n, g_got) = results
    assert got_n.tolist() == want_n.tolist() == [3, 1, 11, 4, 2, 13]
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_rollouts_sample_without_dropout_and_keep_the_training_mode():
    from lmforge.align.rollout import sample
    from lmforge.model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, max_seq_len=24, dropout=0.5))
    prompts = [[1, 2, 3], [4, 5]]
    want, _ = sample(model.eval(), prompts, 2, 8, temperature=0.0)
    got, _ = sample(model.train(), prompts, 2, 8, temperature=0.0)
    assert got == want and model.training


def test_collate_shared_falls_back_to_full_rows_when_prompts_differ():
    from lmforge.align.batching import collate, collate_shared

    sides = [([1, 2, 3, 4], [False, False, True, True]), ([7, 2, 3, 5], [False, False, True, True])]
    got, want = collate_shared(sides, [0, 0], 0), collate(sides, 0)
    assert "prefix" not in got and torch.equal(got["idx"], want["idx"]) and torch.equal(got["targets"], want["targets"])


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def test_mcnemar_exact_by_hand():
    from lmforge.eval.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 2**10)  # all 10 discordant prompts went one way
    assert mcnemar_exact(0, 10) == mcnemar_exact(10, 0)
    assert mcnemar_exact(6, 4) == pytest.approx(2 * 386 / 1024)  # 2 * P(X <= 4 | n=10, p=1/2)
    assert mcnemar_exact(5, 5) == 1.0  # 2 * P(X <= 5) = 1.25, capped
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)  # (C(10,0) + C(10,1)) / 2^10, two-sided


# ----------------------------------------------------------------------------- tasks and pairs


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_reward_their_answer_and_keep_eval_held_out(name):
    task = get_task(name)
    train, held = make_split(task, 300, seed=0, split="train"), make_split(task, 50, seed=0, split="eval")
    assert not {q for q, _ in train} & {q for q, _ in held}
    assert make_split(task, 50, seed=0, split="eval") == held  # deterministic
    _, a = held[0]
    assert task.reward(f"Let me think. The answer is {a}.", a) == 1.0
    assert task.reward("I do not know.", a) == 0.0
    assert task.reward("The answer is [9, 9, 9, 9, 9, 9]." if a.startswith("[") else "The answer is -12345.", a) == 0.0


def test_task_reward_reads_the_last_answer():
    add = get_task("add")
    assert add.reward("3 + 4 is 7, so 7", "7") == 1.0
    assert add.reward("7? no, 8", "7") == 0.0
    assert add.reward("1,234", "1234") == 1.0
    with pytest.raises(LmforgeError, match="unknown task"):
        get_task("chess")


def test_check_pair_counts_bad_records(tmp_path):
    good = {"prompt": "hi", "chosen": "hello!", "rejected": "go away"}
    assert check_pair(good)[0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert check_pair({**good, "rejected": "hello!"})[1] == "identical chosen and rejected"
    assert check_pair({**good, "prompt": "  "})[1] == "empty or malformed prompt"
    assert check_pair({**good, "chosen": ""})[1] == "empty chosen or rejected"
    assert check_pair({"prompt": "x", "chosen": "y"})[1] == "missing field 'rejected'"
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "rejected": "hello!"}) + "\n")
    ps = load_pairs(path)
    assert len(ps.pairs) == 1 and ps.skipped == {"malformed JSON": 1, "identical chosen and rejected": 1}
    path.write_text("{not json\n")
    with pytest.raises(LmforgeError, match="no usable preference pair"):
        load_pairs(path)


def test_split_pairs_by_prompt():
    pairs = [{"prompt": [{"role": "user", "content": f"q{i % 7}"}], "chosen": "a", "rejected": "b"} for i in range(70)]
    train, val = split_pairs(pairs, 0.3, seed=0)
    assert len(train) + len(val) == 70 and val
    assert not {p["prompt"][0]["content"] for p in train} & {p["prompt"][0]["content"] for p in val}


def test_builders_make_honest_pairs():
    pairs = task_pairs("add", 50)
    assert len(pairs) == 50 and all(p["chosen"] != p["rejected"] for p in pairs)
    task = get_task("add")
    for p in pairs[:10]:
        q = p["prompt"][0]["content"]
        a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" + "))
        assert task.reward(p["chosen"], str(a + b)) == 1.0 and task.reward(p["rejected"], str(a + b)) == 0.0
    pytest.importorskip("chitchat_dataset")
    chat = chitchat_pairs(min_gap=9)
    assert len(chat) > 300 and all(hi - lo >= 9 for hi, lo in (p["ratings"] for p in chat))


# ----------------------------------------------------------------------------- runs on a tiny model


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_learns_a_preference_and_reloads(base_run, style_pairs, tmp_path):
    from lmforge.align.reward import RewardConfig, load_reward_model, train_reward
    from lmforge.config import resolve

    out = tmp_path / "rm"
    cfg = resolve(RewardConfig, {}, {"base": str(base_run), "data": str(style_pairs), "out": str(out)},
                  {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10, "log_every": 5})  # fmt: skip
    result = train_reward(cfg)
    assert result["after"]["val_accuracy"] == 1.0 > result["before"]["val_accuracy"] - 1.0
    assert result["after"]["val_accuracy_lo"] > 0.5  # clearly above chance, with its interval
    _, head, _, meta = load_reward_model(out)
    assert (
        isinstance(head, torch.nn.Linear)
        and meta["stage"] == "reward"
        and (ckpt.resolve_checkpoint(out) / "head.safetensors").is_file()
    )
    with pytest.raises(LmforgeError, match="not a reward model"):
        load_reward_model(base_run)


def test_dpo_raises_held_out_preference_and_margin(base_run, style_pairs, tmp_path, capsys):
    out = tmp_path / "dpo"
    rc = main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(out), "--max-steps", "15",
               "--batch-size", "8", "--lr", "3e-3", "--set", "beta=0.5", "--set", "eval_every=15"])  # fmt: skip
    assert rc == 0
    evals = [r for r in _metrics(out) if "val_pref_accuracy" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["val_reward_margin"] == 0.0
    assert after["val_reward_accuracy"] == 1.0 and after["val_reward_margin"] > 1.0
    assert after["val_logratio_margin"] > before["val_logratio_margin"] + 5.0  # log pi(c) - log pi(r) rose
    steps = [r for r in _metrics(out) if "reward_margin" in r]
    assert steps and steps[-1]["reward_accuracy"] == 1.0
    # IPO and SimPO run through the same command; LoRA uses the adapter-free model as its reference.
    assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(tmp_path / "ipo"),
                 "--max-steps", "2", "--lora", "--set", "loss=ipo"]) == 0  # fmt: skip
    assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(tmp_path / "simpo"),
                 "--max-steps", "2", "--set", "loss=simpo", "--set", "beta=2.0"]) == 0  # fmt: skip
    assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(tmp_path / "rpo"),
                 "--max-steps", "2", "--set", "sft_coef=1.0"]) == 0  # fmt: skip
    assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(tmp_path / "x"),
                 "--set", "loss=kto"]) == 2  # fmt: skip
    assert "loss must be one of dpo, ipo, simpo" in capsys.readouterr().err


def test_dpo_packed_matches_padded_rows(base_run, style_pairs, tmp_path, monkeypatch):
    from lmforge.align import batching

    made = []
    real = batching.collate_packed
    monkeypatch.setattr(batching, "collate_packed", lambda *a: made.append(real(*a)) or made[-1])
    losses = {}
    for packing in ("true", "false"):
        out = tmp_path / packing
        assert main(["dpo", "--model", str(base_run), "--data", str(style_pairs), "--out", str(out), "--max-steps", "3",
                     "--batch-size", "4", "--lr", "1e-3", "--set", "log_every=1", "--set", f"packing={packing}",
                     "--set", "eval_every=3"]) == 0  # fmt: skip
        losses[packing] = [(r.get("loss"), r.get("val_logratio_margin")) for r in _metrics(out)]
    got, want = ([x for r in losses[k] for x in r if x is not None] for k in ("true", "false"))
    assert len(got) == len(want) >= 5 and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert made and all(b["sides"] == 8 for b in made)  # the packed layout was the one trained on


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_bad_pairs_leave_no_run_folder(base_run, tmp_path, capsys, stage):
    out = tmp_path / "run"
    assert main([stage, "--model", str(base_run), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("lmforge: error:") == 1
    assert not out.exists()  # no config.yaml or tokenizer/ written before the data was read


def test_grpo_runs_logs_rl_metrics_and_resumes(base_run, tmp_path, toy_task):
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.config import resolve

    def cfg(out, **over):
        sets = {"max_steps": 4, "batch_size": 2, "group_size": 4, "max_new_tokens": 8, "eval_prompts": 8,
                "train_prompts": 50, "eval_every": 0, "log_every": 1, "lr": 1e-3, "warmup_steps": 1, **over}  # fmt: skip
        return resolve(GrpoConfig, {}, {"base": str(base_run), "task": toy_task, "out": str(out)}, sets)

    result = grpo(cfg(tmp_path / "a"))
    steps = [r for r in _metrics(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "kl", "entropy", "length", "ended"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and all(r["kl"] >= 0 for r in steps)
    assert steps[-1]["kl"] > 0 and 0 < sum(r["accuracy"] for r in steps) < len(steps)  # rewards varied; it moved
    assert result["before"]["val_prompts"] == 8 and "after" in result
    # Interrupted after step 1 and resumed: the same rollouts and losses as the straight run.
    grpo(cfg(tmp_path / "b", max_seconds=1e-9))
    grpo(cfg(tmp_path / "b"))
    assert [r["loss"] for r in _metrics(tmp_path / "b") if "loss" in r] == [r["loss"] for r in steps]
    # Full rows (each prompt run with every answer, as TRL does): the same losses as the shared prompts.
    grpo(cfg(tmp_path / "c", share_prompts=False))
    full = [r["loss"] for r in _metrics(tmp_path / "c") if "loss" in r]
    assert full == pytest.approx([r["loss"] for r in steps], rel=1e-4, abs=1e-6)


def test_grpo_without_kl_skips_the_reference(base_run, tmp_path, toy_task, monkeypatch):
    """kl_coef=0: one forward per step (the policy's), no KL logged, the loss is the policy-gradient loss."""
    from lmforge.align import grpo as grpo_module
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.config import resolve

    calls = []
    real = grpo_module.answer_logprobs
    monkeypatch.setattr(grpo_module, "answer_logprobs", lambda *a: calls.append(1) or real(*a))
    sets = {"max_steps": 2, "batch_size": 2, "group_size": 4, "max_new_tokens": 8, "eval_prompts": 0, "kl_coef": 0.0,
            "train_prompts": 50, "log_every": 1, "lr": 1e-3, "warmup_steps": 1}  # fmt: skip
    grpo(resolve(GrpoConfig, {}, {"base": str(base_run), "task": toy_task, "out": str(tmp_path / "g")}, sets))
    steps = [r for r in _metrics(tmp_path / "g") if "loss" in r]
    assert len(calls) == 2 and len(steps) == 2 and all("kl" not in r for r in steps)
    assert all(r["loss"] == pytest.approx(r["pg_loss"], abs=1e-6) for r in steps)


def test_grpo_stops_when_kl_explodes_keeping_the_last_checkpoint(base_run, tmp_path, toy_task):
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.config import resolve

    sets = {"max_steps": 6, "batch_size": 2, "group_size": 4, "max_new_tokens": 8, "eval_prompts": 0, "lr": 5e-2,
            "train_prompts": 50, "ckpt_every": 1, "max_kl": 1e-6, "warmup_steps": 0}  # fmt: skip
    with pytest.raises(LmforgeError, match="KL to the reference .* last good checkpoint"):
        grpo(resolve(GrpoConfig, {}, {"base": str(base_run), "task": toy_task, "out": str(tmp_path / "g")}, sets))
    assert ckpt.list_checkpoints(tmp_path / "g")
