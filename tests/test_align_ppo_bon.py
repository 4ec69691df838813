"""Stage 3: PPO (`lmforge ppo`) and best-of-N (`lmforge best-of-n`) on a tiny random model; PPO's reward math by hand."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from lmforge.align import losses as L
from lmforge.cli import main
from lmforge.train import checkpoint as ckpt

t = torch.tensor


# ----------------------------------------------------------------------------- the math, by hand


def test_kl_shaped_rewards_by_hand():
    kl = t([[9.0, 0.5, 0.25, 9.0], [9.0, 9.0, 1.0, 9.0]])
    mask = t([[0, 1, 1, 0], [0, 0, 1, 0]])
    r = L.kl_shaped_rewards(t([1.0, -2.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(r, t([[0.0, -0.05, 1.0 - 0.025, 0.0], [0.0, 0.0, -2.0 - 0.1, 0.0]]))


def test_whiten_and_explained_variance():
    mask = t([[1, 1, 1, 0]])
    w = L.whiten(t([[1.0, 2.0, 3.0, 100.0]]), mask)
    torch.testing.assert_close(w, t([[-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0]]))
    returns = t([[1.0, 2.0, 3.0, 7.0]])
    assert float(L.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(L.explained_variance(t([[5.0, 5.0, 5.0, 0.0]]), returns, mask)) == pytest.approx(0.0)
    assert float(L.explained_variance(t([[3.0, 2.0, 1.0, 0.0]]), returns, mask)) == pytest.approx(-3.0)


# ----------------------------------------------------------------------------- PPO runs


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ppo_cfg(base_run, out, task, **over):
    from lmforge.align.ppo import PpoConfig
    from lmforge.config import resolve

    sets = {"max_steps": 4, "batch_size": 8, "max_new_tokens": 8, "eval_prompts": 6, "train_prompts": 40,
            "eval_every": 0, "log_every": 1, "lr": 3e-3, "warmup_steps": 1, "vf_coef": 0.5, **over}  # fmt: skip
    return resolve(PpoConfig, {}, {"base": str(base_run), "task": task, "out": str(out)}, sets)


def test_ppo_on_a_task_logs_metrics_and_resumes_mid_rollout(base_run, tmp_path, toy_task):
    from lmforge.align.ppo import ppo

    result = ppo(_ppo_cfg(base_run, tmp_path / "a", toy_task))
    steps = [r for r in _metrics(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    keys = ("reward", "accuracy", "kl", "entropy", "length", "ended", "pg_loss", "value_loss", "clipfrac",
            "approx_kl", "explained_variance")  # fmt: skip
    for key in keys:
        assert all(math.isfinite(r[key]) for r in steps), key
    # Steps 1-2 are the two passes over rollout 1, steps 3-4 over rollout 2.
    assert steps[0]["reward"] == steps[1]["reward"] and steps[0]["kl"] == steps[1]["kl"] == 0.0
    assert steps[0]["clipfrac"] == 0.0 and steps[0]["approx_kl"] == pytest.approx(0.0, abs=1e-5)  # ratio 1 at first
    assert steps[2]["kl"] != 0.0 and steps[1]["approx_kl"] != 0.0  # the policy moved
    assert 0 < sum(r["accuracy"] for r in steps) < len(steps)
    assert result["before"]["val_prompts"] == 6 and "after" in result
    assert (ckpt.resolve_checkpoint(tmp_path / "a") / "head.safetensors").is_file()  # the value head
    # Interrupted after step 1, the middle of a rollout, and resumed: the same losses as the straight run.
    ppo(_ppo_cfg(base_run, tmp_path / "b", toy_task, max_seconds=1e-9, keep_last=1))
    assert [p.name for p in (tmp_path / "b" / "rollouts").iterdir()] == ["step_00000001.rank0.safetensors"]
    ppo(_ppo_cfg(base_run, tmp_path / "b", toy_task, keep_last=1))
    assert [r["loss"] for r in _metrics(tmp_path / "b") if "loss" in r] == [r["loss"] for r in steps]
    assert not list((tmp_path / "b" / "rollouts").iterdir())  # its checkpoint is gone: so is the rollout


def test_ppo_value_loss_falls_on_a_fixed_rollout(base_run, tmp_path, toy_task):
    from lmforge.align.ppo import ppo

    # LoRA keeps the shared trunk nearly still; value_clip is opened so the critic may move as far as it learns.
    ppo(_ppo_cfg(base_run, tmp_path / "v", toy_task, max_steps=6, ppo_epochs=6, eval_prompts=0, vf_coef=1.0,
                 lora=True, value_clip=100.0, warmup_steps=0, lr=1e-2))  # fmt: skip
    steps = [r for r in _metrics(tmp_path / "v") if "loss" in r]
    assert len({r["reward"] for r in steps}) == 1  # one rollout, six passes
    losses = [r["value_loss"] for r in steps]
    assert losses[-1] < 0.5 * losses[0], losses


def test_ppo_stops_when_the_rollout_kl_exceeds_max_kl(base_run, tmp_path, toy_task):
    from lmforge.align.ppo import ppo
    from lmforge.errors import LmforgeError

    cfg = _ppo_cfg(base_run, tmp_path / "k", toy_task, ppo_epochs=1, max_kl=1e-6, lr=5e-2, eval_prompts=0,
                   ckpt_every=1, warmup_steps=0)  # fmt: skip
    with pytest.raises(LmforgeError, match="KL to the reference .* at step 2.* last good checkpoint"):
        ppo(cfg)  # rollout 1 is the reference's own (KL 0); rollout 2 comes from the moved policy
    assert [c.name for c in ckpt.list_checkpoints(tmp_path / "k")] == ["step_00000001"]


@pytest.fixture(scope="module")
def reward_run(base_run, style_pairs, tmp_path_factory):
    """A reward model trained for 2 steps: enough to be a reward model, scores differ by answer."""
    from lmforge.align.reward import RewardConfig, train_reward
    from lmforge.config import resolve

    out = tmp_path_factory.mktemp("rm") / "rm"
    sets = {"max_steps": 2, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_batches": 1, "log_every": 1}
    train_reward(resolve(RewardConfig, {}, {"base": str(base_run), "data": str(style_pairs), "out": str(out)}, sets))
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """Text prompts and messages prompts, and two bad lines (counted, skipped)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"question number {i}"}) for i in range(12)]
    lines += [json.dumps({"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"q{i}"}]})
              for i in range(8)]  # fmt: skip
    path.write_text("\n".join([*lines, "{not json", json.dumps({"text": "no prompt"})]) + "\n")
    return path


def test_ppo_with_a_reward_model_under_lora(base_run, reward_run, prompts_file, tmp_path):
    from lmforge.align.rollout import load_prompts

    prompts, skipped = load_prompts(prompts_file)
    assert len(prompts) == 20 and sum(skipped.values()) == 2 and prompts[-1][0]["role"] == "system"
    out = tmp_path / "p"
    rc = main(["ppo", "--model", str(base_run), "--reward-model", str(reward_run), "--prompts", str(prompts_file),
               "--out", str(out), "--lora", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2",
               "--set", "eval_prompts=4", "--set", "max_new_tokens=6", "--set", "log_every=1",
               "--set", "eval_every=0", "--set", "warmup_steps=0"])  # fmt: skip
    assert rc == 0
    records = _metrics(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and "accuracy" not in steps[0]
    for key in ("reward", "kl", "entropy", "value_loss", "pg_loss", "clipfrac", "explained_variance"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["kl"] == 0.0  # the adapter starts at zero: policy = reference
    evals = [r for r in records if "val_reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["val_prompts"] == 4 for r in evals)
    assert (ckpt.resolve_checkpoint(out) / "adapter.safetensors").is_file()


def test_reward_model_with_another_tokenizer_is_one_line_error(base_run, reward_run, prompts_file, tmp_path, capsys):
    other = tmp_path / "rm-other"
    shutil.copytree(reward_run, other)
    tok = other / "tokenizer" / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=1))  # the same vocabulary, other bytes
    rc = main(["ppo", "--model", str(base_run), "--reward-model", str(other), "--prompts", str(prompts_file),
               "--out", str(tmp_path / "x"), "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "tokenizer" in err and err.count("(") >= 2  # names both hashes
    from lmforge.tokenizer.special import tokenizer_hash

    assert tokenizer_hash(other / "tokenizer") in err and tokenizer_hash(base_run / "tokenizer") in err
    assert not (tmp_path / "x").exists()  # nothing written before the reward model was checked
    assert main(["ppo", "--model", str(base_run), "--task", "add", "--reward-model", str(reward_run),
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "exactly one of --task or --reward-model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- best-of-N


@pytest.fixture(scope="module")
def stopping_run(base_run, tmp_path_factory):
    """The tiny base with its turn-end token made likely (about 1 in 4 per step), so some answers end."""
    from lmforge.chat.template import ChatFormat

    model, _, meta = ckpt.load_model(base_run)
    stop = ChatFormat(base_run / "tokenizer").stop_ids[0]
    with torch.no_grad():
        hidden, _ = model(torch.randint(0, model.cfg.vocab_size, (8, 32)), return_hidden=True)
        direction = hidden.mean((0, 1))
        model.embed_tokens.weight[stop] = direction * (6.0 / float(direction @ direction))
    run = tmp_path_factory.mktemp("stop") / "run"
    shutil.copytree(base_run / "tokenizer", run / "tokenizer")
    ckpt.save_checkpoint(run, 1, ckpt.model_tensors(model.state_dict(), True),
                         {"model_config": meta["model_config"], "tokenizer": meta["tokenizer"]})  # fmt: skip
    return run


def test_best_of_n_with_a_verifier(base_run, stopping_run, tmp_path, toy_task):
    from lmforge.align.tasks import get_task
    from lmforge.chat.datasets import load_conversations

    sft, report = tmp_path / "rs.jsonl", tmp_path / "report"
    rc = main(["best-of-n", "--model", str(stopping_run), "--task", toy_task, "--n", "8", "--eval-prompts", "12",
               "--max-new-tokens", "8", "--curve", "1,2,4,8", "--out-sft", str(sft), "--report", str(report)])  # fmt: skip
    assert rc == 0
    rep = json.loads((report / "report.json").read_text())
    acc = [p["accuracy"] for p in rep["curve"]]
    assert [p["k"] for p in rep["curve"]] == [1, 2, 4, 8] and acc == sorted(acc)  # monotone by construction
    assert acc[-1] > acc[0] and all(p["lo"] <= p["accuracy"] <= p["hi"] for p in rep["curve"])
    tokens = [p["tokens_generated"] for p in rep["curve"]]
    assert tokens == sorted(tokens) and tokens[-1] == rep["tokens_generated"]
    assert 0 < rep["ended"] < 1 and 0 <= rep["no_turn_end"] < rep["prompts"] == 12
    assert (report / "curve.png").read_bytes()[:4] == b"\x89PNG" and "| 8 |" in (report / "report.md").read_text()
    records = [json.loads(line) for line in sft.read_text().splitlines()]
    assert records and len(records) == rep["sft"]["written"] <= 12
    task = get_task(toy_task)
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert task.reward(r["messages"][-1]["content"], "even") == 1.0  # only correct answers
    assert load_conversations(str(sft)).conversations == [r["messages"] for r in records]
    # The random base never stops within 4 tokens: every prompt is counted, and no cut answer becomes SFT data.
    from lmforge.align.best_of_n import BestOfNConfig, best_of_n

    rep = best_of_n(BestOfNConfig(model=str(base_run), task=toy_task, n=2, eval_prompts=3, max_new_tokens=4,
                                  out_sft=str(tmp_path / "none.jsonl")).validate())  # fmt: skip
    assert rep["no_turn_end"] == 3 and rep["sft"]["written"] == 0 and "3 prompts with no turn end" in rep["table"]


def test_best_of_n_writes_on_policy_pairs_from_training_prompts(stopping_run, tmp_path, toy_task):
    from lmforge.align.best_of_n import BestOfNConfig, best_of_n
    from lmforge.align.prefs import load_pairs
    from lmforge.align.tasks import get_task, make_split

    pairs = tmp_path / "pairs.jsonl"
    cfg = BestOfNConfig(model=str(stopping_run), task=toy_task, n=8, eval_prompts=12, max_new_tokens=8,
                        split="train", out_pairs=str(pairs))  # fmt: skip
    rep = best_of_n(cfg.validate())
    task, held = get_task(toy_task), {q for q, _ in make_split(get_task(toy_task), 200, cfg.seed, "eval")}
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert records and len(records) == rep["pairs"]["written"]
    assert rep["pairs"]["written"] + sum(rep["pairs"]["skipped"].values()) == rep["prompts"] == 12  # all counted
    for r in records:  # both sides are the model's own ended answers: the right one chosen, a wrong one rejected
        assert r["prompt"][0]["content"] not in held
        assert task.reward(r["chosen"], "even") == 1.0 and task.reward(r["rejected"], "even") == 0.0
    assert load_pairs(pairs).pairs and "--out-pairs" in rep["table"]
    with pytest.raises(Exception, match="--split"):
        BestOfNConfig(model="m", task="add", split="test").validate()


def test_best_of_n_with_a_reward_model(stopping_run, reward_run, prompts_file, tmp_path):
    from lmforge.align.best_of_n import BestOfNConfig, best_of_n
    from lmforge.align.rollout import load_prompts, split_prompts

    cfg = BestOfNConfig(model=str(stopping_run), reward_model=str(reward_run), prompts=str(prompts_file), n=4,
                        eval_prompts=5, max_new_tokens=6, out_sft=str(tmp_path / "rs.jsonl"), min_reward=-1e9)  # fmt: skip
    rep = best_of_n(cfg.validate())
    rewards = [p["mean_reward"] for p in rep["curve"]]
    assert [p["k"] for p in rep["curve"]] == [1, 2, 4] and rewards == sorted(rewards)
    # The held-out prompts are the ones `lmforge ppo` holds out with the same seed.
    held = split_prompts(load_prompts(prompts_file)[0], 5, cfg.seed)[1]
    written = [json.loads(line)["messages"][:-1] for line in (tmp_path / "rs.jsonl").read_text().splitlines()]
    assert rep["prompts"] == 5 and all(w in held for w in written)
    with pytest.raises(Exception, match="--curve values"):
        BestOfNConfig(model="m", task="add", n=4, curve="1,8").validate()
