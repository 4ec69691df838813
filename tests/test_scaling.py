"""Scaling laws: the fits recover known laws, the compute-optimal closed form matches a brute-force search, bootstrap
intervals cover the truth, bad sweeps are one-line errors naming the run, and a tiny sweep runs, resumes and fits."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval import scaling as S
from lmforge.eval.scaling_cmd import FitConfig, fit, parse_size
from lmforge.model.transformer import ModelConfig
from lmforge.train.checkpoint import FORMAT

# A law in the range of the sweeps here (N ~ 1e4..1e7, D ~ 1e5..1e7), and a grid of runs on it.
TRUE = {"E": 1.6, "A": 60.0, "B": 180.0, "alpha": 0.35, "beta": 0.30}
N_GRID = np.geomspace(3e4, 3e6, 5)
D_GRID = np.geomspace(2e5, 4e6, 4)


def law(n, d, p=TRUE):
    return p["E"] + p["A"] / np.asarray(n, dtype=float) ** p["alpha"] + p["B"] / np.asarray(d, dtype=float) ** p["beta"]


def grid_points(noise: float = 0.0, seed: int = 0):
    n, d = (a.ravel() for a in np.meshgrid(N_GRID, D_GRID, indexing="ij"))
    loss = law(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(n)))
    return n, d, loss


# ----------------------------------------------------------------------------- the math


def test_huber_by_hand():
    value, grad = S.huber(np.array([0.0, 5e-4, -5e-4, 3e-3, -2e-3]), delta=1e-3)
    assert value == pytest.approx([0.0, 1.25e-7, 1.25e-7, 1e-3 * (3e-3 - 5e-4), 1e-3 * (2e-3 - 5e-4)], abs=1e-18)
    assert grad == pytest.approx([0.0, 5e-4, -5e-4, 1e-3, -1e-3])


def test_objective_value_and_gradient():
    n, d, loss = grid_points(noise=0.01)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta = np.array([4.0, 5.0, 0.4, 0.3, 0.35])
    value, grad = S.chinchilla_objective(theta, log_n, log_d, log_l)
    pred = np.log(np.exp(theta[0]) / n ** theta[3] + np.exp(theta[1]) / d ** theta[4] + np.exp(theta[2]))
    assert value == pytest.approx(S.huber(pred - log_l)[0].sum(), rel=1e-12)
    for i in range(5):  # central differences
        step = np.zeros(5)
        step[i] = 1e-6
        numeric = (S.chinchilla_objective(theta + step, log_n, log_d, log_l)[0]
                   - S.chinchilla_objective(theta - step, log_n, log_d, log_l)[0]) / 2e-6  # fmt: skip
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-10)
    assert S.init_grid().shape == (4500, 5)


def test_chinchilla_fit_recovers_a_known_law():
    n, d, loss = grid_points(noise=0.002)
    got = S.fit_chinchilla(n, d, loss)
    assert got.alpha == pytest.approx(TRUE["alpha"], abs=0.03)
    assert got.beta == pytest.approx(TRUE["beta"], abs=0.03)
    assert got.E == pytest.approx(TRUE["E"], rel=0.03)
    # And the law itself, where it matters: at and beyond the runs.
    assert got.loss(1e7, 4e6) == pytest.approx(law(1e7, 4e6), rel=0.01)
    exact = S.fit_chinchilla(*grid_points(noise=0.0))
    for k, v in TRUE.items():
        assert getattr(exact, k) == pytest.approx(v, rel=1e-3), k


def test_kaplan_power_law_is_exact_on_a_power_law():
    x = np.geomspace(1e5, 1e8, 6)
    got = S.fit_power_law(x, (8.8e13 / x) ** 0.076)  # Kaplan et al. 2020's L(N)
    assert got.alpha == pytest.approx(0.076, rel=1e-10)
    assert got.x_c == pytest.approx(8.8e13, rel=1e-6)
    assert got.rms_log_residual < 1e-12
    with pytest.raises(ValueError):
        S.fit_power_law([1e5, 1e5], [3.0, 3.1])


def test_compute_optimal_matches_brute_force():
    fit = S.ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0)
    for budget in (1e15, 5.76e23):  # 5.76e23: Chinchilla's own budget (70B params, 1.4T tokens)
        n_opt, d_opt = S.compute_optimal(fit, budget)
        assert n_opt * d_opt * 6 == pytest.approx(budget, rel=1e-12)
        n = np.geomspace(n_opt / 100, n_opt * 100, 200_001)
        brute = n[np.argmin(fit.loss(n, budget / (6 * n)))]
        assert n_opt == pytest.approx(brute, rel=1e-3)
    # Chinchilla's paper reports ~40B params for 5.76e23 FLOPs from these fitted values (approach 3: 63B for the
    # Gopher budget); the order of magnitude is the check here.
    assert 1e10 < S.compute_optimal(fit, 5.76e23)[0] < 1e11
    # C = k N D with another k is the same law with C / k.
    assert S.compute_optimal(fit, 8e15, 8.0)[0] == pytest.approx(S.compute_optimal(fit, 6e15)[0])


def test_bootstrap_intervals_cover_the_truth():
    n, d, loss = grid_points(noise=0.005, seed=3)
    got = S.fit_chinchilla(n, d, loss)
    boots = S.bootstrap_chinchilla(n, d, loss, got, resamples=30, seed=1, n_starts=1)
    assert len(boots) == 30
    summary = S.summarize(got, boots, ("alpha", "beta", "E"))
    for name in ("alpha", "beta", "E"):
        s = summary[name]
        assert s["lo"] <= TRUE[name] <= s["hi"], (name, s)
        assert s["hi"] - s["lo"] < TRUE[name], (name, s)  # an interval, not everything
    km = S.bootstrap_power_law(N_GRID, (1e9 / N_GRID) ** 0.1 * np.exp([0.01, -0.01, 0.0, 0.01, -0.01]), resamples=50)
    lo, hi = S.interval([k.alpha for k in km])
    assert lo <= 0.1 <= hi
    assert math.isnan(S.interval([])[0])


def test_kaplan_point_selection():
    n = np.array([1, 1, 2, 2, 3, 3])
    d = np.array([10, 20, 20, 10, 10, 20])
    assert S.longest_per_size(n, d).tolist() == [1, 2, 5]
    assert S.runs_of_largest(n).tolist() == [4, 5]


# ----------------------------------------------------------------------------- reading runs, bad input


def fake_run(path: Path, n_layer: int, d_model: int, steps: int, loss: float | None, tok: str = "aaaa") -> Path:
    """A finished pretrain run as the fit reads it (config.yaml, metrics.jsonl, a checkpoint's meta), no training."""
    model = ModelConfig(vocab_size=128, n_layer=n_layer, d_model=d_model, n_head=d_model // 16, max_seq_len=32)
    cfg = {"data": "shards", "max_steps": steps, "batch_size": 4, "seq_len": 32, "grad_accum": 1, "eval_batches": 2,
           "model": model.to_dict()}  # fmt: skip
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"step": steps, "loss": 3.0, "tokens": steps * 128}]
    if loss is not None:
        records.append({"step": steps, "val_loss": loss})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ckpt = path / "checkpoints" / f"step_{steps:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"format": FORMAT, "step": steps, "tokenizer": {"hash": tok}}))
    return path


def fake_sweep(root: Path, sizes=((1, 32), (1, 64), (2, 128)), steps=(100, 200, 400), **kw) -> Path:
    """Runs whose losses follow TRUE (N counted as the fit counts it), with 0.2% noise: real runs are never exact."""
    from lmforge.eval.scaling_cmd import model_sizes

    noise = iter(np.random.default_rng(0).normal(0.0, 0.002, len(sizes) * len(steps)))
    for layers, width in sizes:
        for s in steps:
            n = model_sizes(ModelConfig(vocab_size=128, n_layer=layers, d_model=width, n_head=width // 16,
                                        max_seq_len=32), 32)["n_total"]  # fmt: skip
            loss = float(law(n, s * 128) * math.exp(next(noise)))
            fake_run(root / f"{layers}x{width}_t{s}", layers, width, s, loss, **kw)
    return root


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_fit_on_runs_writes_the_report_and_predicts_a_held_out_run(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    big = fake_run(tmp_path / "big" / "4x256_t400", 4, 256, 400, 0.0)  # loss filled in below
    from lmforge.eval.scaling_cmd import model_sizes

    n_big = model_sizes(ModelConfig(vocab_size=128, n_layer=4, d_model=256, n_head=16, max_seq_len=32), 32)
    (big / "metrics.jsonl").write_text(json.dumps({"step": 400, "val_loss": float(law(n_big["n_total"], 51200))}))
    report = fit(FitConfig(runs=[str(sweep)], check=[str(big)], budget=[1e13], resamples=5).validate())
    assert {p.name for p in sweep.iterdir()} >= {"scaling.json", "scaling.md", "scaling.png"}
    total = report["chinchilla"]["n_total"]
    # 9 runs with 0.2% noise pin the exponents to a few hundredths, and the held-out loss much better.
    assert total["alpha"]["value"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert total["beta"]["value"] == pytest.approx(TRUE["beta"], abs=0.05)
    check = next(c for c in report["checks"] if c["fit"] == "L(N, D) n_total")
    assert abs(check["rel_error"]) < 0.01
    assert {c["rule"] for c in report["compute_optimal"]} == {"6ND", "flops_per_token"}
    assert set(report["kaplan"]) == {"L(N) n_total", "L(N) n_nonemb", "L(D)"}
    md = (sweep / "scaling.md").read_text()
    assert "non-embedding parameters (Kaplan's N)" in md and "all parameters (Chinchilla's N)" in md
    assert json.loads((sweep / "scaling.json").read_text())["runs"][0]["n_nonemb"] > 0


def test_bad_sweeps_are_one_line_errors_naming_the_run(tmp_path, capsys):
    odd = fake_sweep(tmp_path / "tok")
    bad = odd / "2x128_t400"
    meta = bad / "checkpoints" / "step_00000400" / "meta.json"
    meta.write_text(json.dumps({"format": FORMAT, "step": 400, "tokenizer": {"hash": "bbbb"}}))
    with pytest.raises(LmforgeError, match=f"{bad}: trained with tokenizer bbbb"):
        fit(FitConfig(runs=[str(odd)]).validate())

    unfinished = fake_sweep(tmp_path / "unfinished")
    (unfinished / "1x64_t100" / "metrics.jsonl").write_text(json.dumps({"step": 50, "val_loss": 4.0}) + "\n")
    rc, err = run_cli(capsys, "scaling", "fit", unfinished)
    assert rc == 2 and err.count("\n") == 1 and f"{unfinished / '1x64_t100'}: no finished val loss" in err

    few = fake_sweep(tmp_path / "few", sizes=((1, 32), (2, 64)), steps=(100, 400))
    rc, err = run_cli(capsys, "scaling", "fit", few)
    assert rc == 2 and f"{few / '2x64_t400'}: 4 finished runs (1x32_t100, " in err and "5 parameters" in err
    two_d = fake_sweep(tmp_path / "twod", steps=(100, 400), sizes=((1, 32), (1, 64), (2, 64), (2, 128)))
    with pytest.raises(LmforgeError, match=r"2x64_t400: 8 finished runs .*at least 3 distinct token counts D"):
        fit(FitConfig(runs=[str(two_d)]).validate())
    rc, err = run_cli(capsys, "scaling", "fit", tmp_path / "nowhere")
    assert rc == 2 and "neither a pretrain run" in err
    with pytest.raises(LmforgeError, match="not a multiple of head_dim"):
        parse_size("2x100", 32)
    with pytest.raises(LmforgeError, match="not LAYERSxWIDTH"):
        parse_size("big", 32)


# ----------------------------------------------------------------------------- a real (tiny) sweep


def test_every_run_of_a_sweep_follows_one_recipe():
    from lmforge.eval.scaling_cmd import SweepConfig, run_config

    cfg = SweepConfig(data="shards", out="sweep", sizes=["1x64", "4x128"], tokens=[250_000, 1_000_000]).validate()
    small, big = run_config(cfg, "1x64", 250_000), run_config(cfg, "4x128", 1_000_000)
    assert (small.model.n_layer, small.model.d_model, small.model.n_head) == (1, 64, 2)
    assert (big.model.n_layer, big.model.d_model, big.model.n_head, big.model.d_ff) == (4, 128, 4, 384)
    assert (small.max_steps, big.max_steps) == (122, 488)  # tokens / (16 x 128)
    assert (small.warmup_steps, big.warmup_steps) == (6, 24)  # 5% of each run, then cosine to its own end
    assert small.eval_batches == big.eval_batches == 32 and small.eval_every == big.eval_every == 0
    assert small.out == str(Path("sweep") / "1x64_t250000") and small.lr == big.lr
    custom = dataclasses.replace(cfg, pretrain_set=["model.mlp=gelu", "beta2=0.99"])
    assert run_config(custom, "1x64", 250_000).model.mlp == "gelu" and run_config(custom, "1x64", 1).beta2 == 0.99


@pytest.fixture
def one_thread():
    """Micro models train ~10x faster on one thread than on two busy cores (oneDNN's threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_sweep_resumes_skips_and_fits(small_shards, tmp_path, capsys, one_thread):
    out = tmp_path / "sweep"
    sweep = ["scaling", "sweep", "--data", small_shards, "--out", out, "--sizes", "1x16", "1x32", "2x32",
             "--tokens", 2048, 4096, 8192, "--batch-size", 4, "--seq-len", 32, "--eval-tokens", 512, "--head-dim", 16,
             "--lr", "1e-2"]  # fmt: skip
    # Interrupted: the first run stops after one step (its time budget), checkpointed; the sweep stops with it.
    rc, err = run_cli(capsys, *sweep, "--pretrain-set", "max_seconds=1e-9")
    first = out / "1x16_t2048"
    assert rc == 0 and "stopped at the time budget" in err
    assert [p.name for p in (first / "checkpoints").iterdir()] == ["step_00000001"]
    assert not (out / "1x16_t4096").exists()
    rc, err = run_cli(capsys, *sweep)
    assert rc == 0 and "[1/9] 1x16_t2048: 16 steps (resuming)" in err and "steps 1->16" in err
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [1, 16]  # where it stopped, and the end
    sweep_json = json.loads((out / "sweep.json").read_text())
    assert len(sweep_json["runs"]) == 9 and all(r["val_loss"] > 0 for r in sweep_json["runs"].values())
    # Rerun: every run is done, none trains again.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    rc, err = run_cli(capsys, *sweep)
    assert rc == 0 and err.count("done before") == 9 and "lmforge pretrain" not in err
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    # A finished run is not taken for a different plan.
    rc, err = run_cli(capsys, *sweep[:-2], "--lr", "2e-2")
    assert rc == 2 and "lr=0.01 (now 0.02)" in err
    rc, _ = run_cli(capsys, "scaling", "fit", out, "--budget", "1e12", "--resamples", 0)  # intervals: tested above
    assert rc == 0
    report = json.loads((out / "scaling.json").read_text())
    assert len(report["runs"]) == 9 and report["runs"][0]["tokenizer_hash"]
    assert (out / "scaling.png").stat().st_size > 10_000 and "Chinchilla" in (out / "scaling.md").read_text()
