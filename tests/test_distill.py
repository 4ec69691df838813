"""`lmforge distill`: the distillation losses by hand, logit and sequence-level runs, resume, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.model.transformer import ModelConfig, Transformer
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train import distill_losses as D
from lmforge.train.metrics import read_metrics

t = torch.tensor
ONE = torch.ones(1, 1, dtype=torch.bool)  # one position, in the loss


# ----------------------------------------------------------------------------- losses, by hand

# Teacher t = softmax([0, ln 3]) = [1/4, 3/4], student s = softmax([0, 0]) = [1/2, 1/2].
TEACHER, STUDENT = t([[[0.0, math.log(3.0)]]]), t([[[0.0, 0.0]]])
KL_TS = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.1308...
KL_ST = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438...


def test_forward_and_reverse_kl_by_hand():
    assert float(D.forward_kl(STUDENT, TEACHER, ONE)) == pytest.approx(KL_TS, abs=1e-7)
    assert float(D.reverse_kl(STUDENT, TEACHER, ONE)) == pytest.approx(KL_ST, abs=1e-7)
    # At T = 2 teacher logits [0, 2 ln 3] give the same [1/4, 3/4]; the loss is scaled by T^2 = 4.
    hot = t([[[0.0, 2 * math.log(3.0)]]])
    assert float(D.forward_kl(STUDENT, hot, ONE, temperature=2.0)) == pytest.approx(4 * KL_TS, abs=1e-6)
    assert float(D.reverse_kl(STUDENT, hot, ONE, temperature=2.0)) == pytest.approx(4 * KL_ST, abs=1e-6)


def test_jsd_by_hand_and_its_ends_are_forward_and_reverse_kl():
    m = [0.5 * 0.25 + 0.5 * 0.5, 0.5 * 0.75 + 0.5 * 0.5]  # the mixture beta t + (1 - beta) s at beta = 0.5
    kl_tm = 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    kl_sm = 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert float(D.jsd(STUDENT, TEACHER, ONE, beta=0.5)) == pytest.approx(0.5 * kl_tm + 0.5 * kl_sm, abs=1e-7)
    # beta = 0: forward KL(t || s); beta = 1: reverse KL(s || t) (TRL's convention), each the limit of the
    # normalized JSD_beta / beta and JSD_beta / (1 - beta).
    assert float(D.jsd(STUDENT, TEACHER, ONE, beta=0.0)) == pytest.approx(KL_TS, abs=1e-7)
    assert float(D.jsd(STUDENT, TEACHER, ONE, beta=1.0)) == pytest.approx(KL_ST, abs=1e-7)
    s64, t64 = STUDENT.double(), TEACHER.double()
    small = 1e-4
    assert float(D.jsd(s64, t64, ONE, beta=small)) / small == pytest.approx(KL_TS, rel=1e-3)
    assert float(D.jsd(s64, t64, ONE, beta=1 - small)) / small == pytest.approx(KL_ST, rel=1e-3)


def _trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd), transcribed: F.kl_div(input, target) is
    KL(target || input); mixture weights (1 - beta) on the student, beta on the teacher; no T^2 factor."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    te = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(s, te, reduction="none", log_target=True).sum(-1).mean()
    if beta == 1:
        return F.kl_div(te, s, reduction="none", log_target=True).sum(-1).mean()
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), te + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(m, te, reduction="none", log_target=True) + (1 - b) * F.kl_div(m, s, reduction="none",
                                                                                        log_target=True)  # fmt: skip
    return jsd.sum(-1).mean()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_times_t_squared(beta, temperature):
    g = torch.Generator().manual_seed(0)
    s, te = torch.randn(2, 2, 3, 11, generator=g, dtype=torch.float64).unbind(0)
    ours = D.jsd(s, te, torch.ones(2, 3, dtype=torch.bool), beta=beta, temperature=temperature)
    theirs = _trl_generalized_jsd(s, te, beta, temperature) * temperature**2
    assert float(ours) == pytest.approx(float(theirs), abs=1e-12)


def test_divergences_of_a_distribution_from_itself_are_zero_and_jsd_is_bounded():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 17, generator=g), 3 * torch.randn(3, 5, 17, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    for name, fn in D.DISTILL_LOSSES.items():
        assert float(fn(a, a, mask, temperature=1.7, beta=0.3)) == pytest.approx(0.0, abs=1e-6), name
        assert float(fn(a, b, mask, temperature=1.7, beta=0.3)) > 0.01, name
    for beta in (0.05, 0.3, 0.5, 0.8):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # JSD_beta <= H(beta)
        assert 0.0 < float(D.jsd(a, b, mask, beta=beta)) < h
        # Disjoint supports (exp(-1e4) is exactly 0 in float32) reach the bound.
        apart_t, apart_s = t([[[0.0, 0.0, -1e4, -1e4]]]), t([[[-1e4, -1e4, 0.0, 0.0]]])
        assert float(D.jsd(apart_s, apart_t, ONE, beta=beta)) == pytest.approx(h, abs=1e-6)


def test_t_squared_keeps_the_soft_gradient_scale_and_the_mask_picks_positions():
    # d/dz T^2 KL(t || softmax(z / T)) = T (s - t) per position (Hinton et al. 2015), averaged over positions.
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    te = torch.randn(1, 2, 5, generator=g, dtype=torch.float64)
    T = 3.0
    D.forward_kl(s, te, torch.ones(1, 2, dtype=torch.bool), temperature=T).backward()
    want = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(te / T, -1)) / 2
    torch.testing.assert_close(s.grad, want)
    # A masked position counts for nothing: the mean is over the one position left.
    pair_s, pair_t = torch.cat([STUDENT, STUDENT], 1), torch.cat([TEACHER, 5 * TEACHER], 1)
    for fn, want in ((D.forward_kl, KL_TS), (D.reverse_kl, KL_ST)):
        assert float(fn(pair_s, pair_t, t([[True, False]]))) == pytest.approx(want, abs=1e-7)
    assert set(D.DISTILL_LOSSES) == {"forward_kl", "reverse_kl", "jsd"}
    y = t([[1, -100]])
    assert float(D.hard_label_loss(pair_s, y)) == pytest.approx(math.log(2.0))  # -log 1/2 on the one real target


# ----------------------------------------------------------------------------- runs


def _save_run(path, cfg: ModelConfig, tok_dir, seed=0):
    """A random model saved as a run with a copy of `tok_dir` (as the other stage tests build their bases)."""
    torch.manual_seed(seed)
    shutil.copytree(tok_dir, path / "tokenizer")
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../tokenizer", "hash": tokenizer_hash(tok_dir)}}
    ckpt.save_checkpoint(path, 1, ckpt.model_tensors(Transformer(cfg).state_dict(), cfg.tie_embeddings), meta)
    return path


@pytest.fixture(scope="module")
def teacher(small_shards, tmp_path_factory):
    """A small teacher pretrained briefly on the shards (2 layers, d_model 64, vocab rows 512)."""
    from lmforge.config import parse_set
    from lmforge.train.pretrain import pretrain, resolve_train_config

    out = tmp_path_factory.mktemp("teacher") / "run"
    sets = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.max_seq_len=64", "warmup_steps=2",
            "eval_every=0", "lr=3e-3"]  # fmt: skip
    flags = {"data": str(small_shards), "out": str(out), "batch_size": 8, "seq_len": 64, "max_steps": 30}
    pretrain(resolve_train_config({}, flags, parse_set(sets)))
    return out


@pytest.fixture(scope="module")
def student(small_shards, tmp_path_factory):
    """A tinier random student with the same tokenizer, and 576 embedding rows (the teacher has 512)."""
    cfg = ModelConfig(vocab_size=576, n_layer=1, d_model=32, n_head=2, max_seq_len=64)
    return _save_run(tmp_path_factory.mktemp("student") / "run", cfg, small_shards.parent / "tok")


@pytest.fixture(scope="module")
def other(small_corpus, tmp_path_factory):
    """Another tokenizer, shards made with it, and a student that uses it."""
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("other")
    train_tokenizer([small_corpus], 300, root / "tok")
    tokenize_corpus([small_corpus], root / "tok", root / "shards", val_fraction=0.1, workers=1, progress=False)
    cfg = ModelConfig(vocab_size=320, n_layer=1, d_model=32, n_head=2, max_seq_len=64)
    return {"shards": root / "shards", "student": _save_run(root / "student", cfg, root / "tok")}


def _argv(teacher, student, data, out, steps, *extra):
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--seq-len", "64", "--set", "warmup_steps=2",
            "--set", "log_every=1", "--set", "eval_batches=2", "--set", "lr=1e-2", *extra]  # fmt: skip


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_distilled_student_loss_falls_and_resumes_exactly(teacher, student, small_shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(teacher, student, small_shards, a, 30, "--set", "eval_every=15")) == 0
    records = read_metrics(a)
    kd = [r["kd"] for r in records if "kd" in r]
    assert sum(kd[-5:]) / 5 < 0.6 * kd[0]  # the student moves towards the teacher
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 15, 30]
    assert vals[-1]["val_kd"] < vals[0]["val_kd"] and vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert vals[0]["teacher_val_loss"] < vals[0]["val_loss"]  # the teacher knows more than the fresh student
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(a))
    assert meta["stage"] == "distill" and meta["teacher"]["fingerprint"] == ckpt.file_fingerprint(
        ckpt.resolve_checkpoint(teacher) / "model.safetensors"
    )
    saved = ckpt.load_tensors(ckpt.resolve_checkpoint(a) / "model.safetensors")
    assert set(saved) == set(ckpt.load_tensors(ckpt.resolve_checkpoint(student) / "model.safetensors"))  # no teacher
    # Stopped after step 1 (the time budget), then the same command: the same losses to the last digit.
    assert main(_argv(teacher, student, small_shards, b, 30, "--set", "eval_every=15", "--max-seconds", "1e-9")) == 0
    assert ckpt.read_meta(ckpt.resolve_checkpoint(b))["step"] == 1
    assert main(_argv(teacher, student, small_shards, b, 30, "--set", "eval_every=15")) == 0
    assert _losses(a) == _losses(b)
    vals_a, vals_b = ({r["step"]: r["val_loss"] for r in read_metrics(x) if "val_loss" in r} for x in (a, b))
    assert vals_a == {k: v for k, v in vals_b.items() if k != 1}  # b also evaluated where it stopped


def test_a_resume_refuses_a_changed_teacher_or_loss(teacher, student, small_shards, tmp_path, capsys):
    from safetensors.torch import save_file

    mine = tmp_path / "teacher"
    shutil.copytree(teacher, mine)
    out = tmp_path / "r"
    assert main(_argv(mine, student, small_shards, out, 4, "--max-seconds", "1e-9")) == 0
    assert main(_argv(mine, student, small_shards, out, 4, "--set", "alpha=0.3")) == 2
    assert "cannot resume: alpha is 0.5 in the checkpoint but 0.3 now" in capsys.readouterr().err
    weights = ckpt.resolve_checkpoint(mine) / "model.safetensors"
    tensors = ckpt.load_tensors(weights)
    tensors["norm.weight"] += 1.0
    save_file(tensors, str(weights))
    assert main(_argv(mine, student, small_shards, out, 4)) == 2
    assert "cannot resume: teacher is" in capsys.readouterr().err
    assert ckpt.read_meta(ckpt.resolve_checkpoint(out))["step"] == 1


def test_a_preset_student_takes_the_teachers_vocabulary_and_alpha_0_needs_no_teacher(
    teacher, small_shards, tmp_path, monkeypatch
):
    from lmforge.train import distill as stage

    real = stage.load_teacher

    def never_run(path):
        tch = real(path)
        tch.model.forward = lambda *a, **k: pytest.fail("the teacher ran with alpha=0")
        return tch

    monkeypatch.setattr(stage, "load_teacher", never_run)  # alpha = 0: plain next-token training, no teacher
    out = tmp_path / "p"
    assert main(_argv(teacher, "tiny", small_shards, out, 2, "--set", "alpha=0")) == 0
    init = ckpt.load_model(out / "student_init")[0]
    assert init.cfg.vocab_size == 512 and init.cfg.n_layer == 4  # tiny's shape, the teacher's rows
    assert tokenizer_hash(out / "tokenizer") == tokenizer_hash(teacher / "tokenizer")
    assert all("kd" not in r for r in read_metrics(out)) and ckpt.read_meta(ckpt.resolve_checkpoint(out))["step"] == 2


def test_from_generations_writes_the_teachers_answers_and_fine_tunes_on_them(teacher, other, tmp_path, capsys):
    """Sequence-level: only text passes, so a student with another tokenizer is fine."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"say {i} twice"} for i in range(10)] + [{"prompt": [{"role": "user", "content": "hello"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "seq"
    stu = other["student"]
    argv = ["distill", "--teacher", str(teacher), "--student", str(stu), "--from-generations", str(prompts),
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--seq-len", "64", "--set", "max_new_tokens=8",
            "--set", "keep_unfinished=true", "--set", "gen_temperature=0.8", "--set", "samples=2",
            "--set", "val_fraction=0.2"]  # fmt: skip
    # Answers cut at max_new_tokens are dropped by default: none left is an error, and the folder (where nothing
    # was made) is free for the next try with other settings.
    assert main([*argv, "--set", "max_new_tokens=2", "--set", "keep_unfinished=false"]) == 2
    assert "finished none of the 11 answers" in capsys.readouterr().err
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    report = json.loads((out / "generations_report.json").read_text())
    assert len(records) == report["written"] == 11 - sum(report["dropped"].values())
    assert records[0]["messages"][0] == {"role": "user", "content": "say 0 twice"}
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    meta = ckpt.read_meta(ckpt.resolve_checkpoint(out))
    assert meta["stage"] == "sft" and meta["step"] == 3 and (out / "samples.txt").is_file()
    # Rerun with more steps: the answers are not generated again, SFT resumes.
    before = (out / "generations.jsonl").stat().st_mtime_ns
    assert main([*argv[:9], "--max-steps", "4", *argv[11:]]) == 0
    assert (out / "generations.jsonl").stat().st_mtime_ns == before
    assert ckpt.read_meta(ckpt.resolve_checkpoint(out))["step"] == 4
    # Other generation settings on the same folder: refused, not mixed.
    assert main([*argv, "--set", "gen_temperature=0.5"]) == 2


def test_prompts_may_be_conversations_cut_before_the_first_answer(tmp_path):
    from lmforge.train.distill import read_prompts

    path = tmp_path / "chats.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."}]  # fmt: skip
    path.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"instruction": "Add 2 and 2", "output": "4"}))
    prompts, _ = read_prompts(str(path))
    assert prompts == [conv[:2], [{"role": "user", "content": "Add 2 and 2"}]]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other_student", "is not the teacher's"),
        ("other_shards", "shards were made with tokenizer"),
        ("loss", "loss must be one of forward_kl, reverse_kl, jsd, got 'kl'"),
        ("temperature", "temperature must be > 0"),
        ("beta", "beta must be in [0, 1]"),
        ("out", "holds another run"),
        ("preset", "neither a preset"),
        ("seq_len", "exceeds the models' max_seq_len"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(teacher, student, other, small_shards, tmp_path, capsys, case, message):
    out, data, stu, extra = tmp_path / "x", small_shards, student, []
    if case == "other_student":
        stu = other["student"]
    elif case == "other_shards":
        data = other["shards"]
    elif case == "loss":
        extra = ["--loss", "kl"]
    elif case == "temperature":
        extra = ["--temperature", "0"]
    elif case == "beta":
        extra = ["--beta", "1.5"]
    elif case == "out":
        out = teacher  # a pretraining run
    elif case == "preset":
        stu = "tinyy"
    elif case == "seq_len":
        stu = "tiny"
        extra = ["--seq-len", "128"]  # tiny allows 256, the teacher 64
    before = sorted(p.name for p in teacher.rglob("*"))
    rc = main([*_argv(teacher, stu, data, out, 1), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("lmforge: error:") == 1 and message in err.splitlines()[-1], err
    assert not (tmp_path / "x").exists()  # nothing written before the inputs were checked
    assert sorted(p.name for p in teacher.rglob("*")) == before
