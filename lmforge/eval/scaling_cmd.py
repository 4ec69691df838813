"""`lmforge scaling sweep` and `lmforge scaling fit`: train a grid of small models, fit scaling laws to them.

    lmforge scaling sweep --data shards/ --out runs/sweep --sizes 1x64 2x96 2x128 3x128 --tokens 250000 500000 1000000
    lmforge scaling sweep ...                       # the same command again: finished runs are skipped, an
                                                    # interrupted one resumes from its checkpoint
    lmforge scaling fit runs/sweep --budget 1e15 1e17 --check runs/big

`sweep` runs `lmforge pretrain` in-process once per (size, tokens) point, in OUT/{layers}x{width}_t{tokens}: the
same data, tokenizer, batch, peak LR and schedule family for every run (linear warmup over a fixed share of the
run, then cosine to 1/10 of the peak at the run's own end, as Chinchilla), `max_steps` = tokens / (batch_size x
seq_len), and one evaluation at the end on the same validation tokens for all runs. A size is LAYERSxWIDTH
(n_layer x d_model, n_head = d_model / --head-dim); the preset gives the other model fields.

`fit` reads finished pretrain runs (any, not only a sweep's: a run folder or a folder of them), counts each
model's parameters with and without embeddings (lmforge/params.py's parts), and fits (lmforge/eval/scaling.py):
Kaplan's L(N) and L(D) (non-embedding N, as Kaplan et al. 2020; also all N) and Chinchilla's
L(N, D) = E + A/N^alpha + B/D^beta (all N, as Hoffmann et al. 2022; also non-embedding N), with bootstrap
intervals (runs resampled with replacement), the compute-optimal N and D for each --budget (C = 6 N D, and
C = the models' own training FLOPs per token x D), and the predicted loss of held-out --check runs. It writes
scaling.json, scaling.md and scaling.png to --out (default: the sweep folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError, warn
from lmforge.fileio import atomic_path, atomic_write_json, atomic_write_text

# What a finished run must share with the sweep's plan to be skipped rather than rerun (resolved TrainConfig fields).
PLAN_FIELDS = ("seq_len", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "beta1",
               "beta2", "grad_clip", "seed", "eval_batches")  # fmt: skip


@dataclass(frozen=True)
class SweepConfig:
    """`lmforge scaling sweep`: each field's comment is its help text."""

    data: str = ""  # folder of token shards (`lmforge data tokenize`): every run trains and validates on it
    out: str = ""  # sweep folder: one pretrain run per (size, tokens) point and sweep.json
    # model shapes LAYERSxWIDTH (n_layer x d_model), e.g. 1x64 2x96 2x128 4x128
    sizes: list[str] = field(default_factory=list, metadata={"metavar": "LxD"})
    tokens: list[int] = field(default_factory=list)  # training tokens per run, e.g. 250000 1000000
    head_dim: int = 32  # width of an attention head: n_head = d_model / head_dim
    preset: str = "tiny"  # the model fields a size does not set (norm, MLP, positions, tied embeddings) come from it
    batch_size: int = 16  # sequences per step (the same for every run)
    seq_len: int = 128  # tokens per sequence (also model.max_seq_len)
    lr: float = 3e-3  # peak learning rate, the same for every run
    warmup_fraction: float = 0.05  # linear warmup over this share of each run's steps, then cosine to its own end
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak (Chinchilla: a 10x cosine decay)
    weight_decay: float = 0.1  # AdamW decay on matrices
    eval_tokens: int = 65536  # validation tokens of each run's final loss (the same batches for every run)
    ckpt_every: int = 200  # steps between checkpoints (an interrupted run resumes from the last)
    seed: int = 1337  # model init and data order: the same for every run
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, mps
    # more pretrain fields for every run, KEY=VALUE as pretrain's --set (e.g. model.mlp=gelu)
    pretrain_set: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})

    def validate(self) -> SweepConfig:
        require([
            (bool(self.data), "scaling sweep needs --data (a folder made by `lmforge data tokenize`)"),
            (bool(self.out), "scaling sweep needs --out (the sweep folder; rerun the same command to resume)"),
            (bool(self.sizes), "scaling sweep needs --sizes (model shapes LAYERSxWIDTH, e.g. 1x64 2x128)"),
            (bool(self.tokens) and min(self.tokens) > 0, "scaling sweep needs --tokens (positive token budgets)"),
            (self.head_dim >= 1 and self.batch_size >= 1 and self.seq_len >= 1,
             "head_dim, batch_size and seq_len must be >= 1"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (self.eval_tokens >= 1, "eval_tokens must be >= 1"),
        ])  # fmt: skip
        for size in self.sizes:
            parse_size(size, self.head_dim)
        return self


@dataclass(frozen=True)
class FitConfig:
    """`lmforge scaling fit`: each field's comment is its help text."""

    # finished pretrain runs, or folders of them (a sweep's --out): the points of the fit (also positional)
    runs: list[str] = field(default_factory=list, metadata={"metavar": "RUN"})
    check: list[str] = field(default_factory=list, metadata={"metavar": "RUN"})  # held-out runs: predicted, not fitted
    budget: list[float] = field(default_factory=list, metadata={"metavar": "FLOPS"})  # compute budgets, e.g. 1e15 1e17
    out: str = ""  # folder for scaling.json, scaling.md, scaling.png (default: the first RUNS, a folder of runs)
    resamples: int = 200  # bootstrap refits on runs resampled with replacement (0 = no intervals)
    level: float = 0.95  # coverage of the bootstrap intervals
    seed: int = 0  # seeds the bootstrap draws

    def validate(self) -> FitConfig:
        require([
            (bool(self.runs), "scaling fit needs runs: lmforge scaling fit SWEEP_OR_RUN..."),
            (self.resamples >= 0, "resamples must be >= 0"),
            (0 < self.level < 1, "level must be in (0, 1)"),
            (all(b > 0 for b in self.budget), "budget must be positive FLOPs"),
        ])  # fmt: skip
        return self


def register(subparsers) -> None:
    help = "scaling laws: train a grid of small models, fit L(N), L(D), L(N, D), predict compute-optimal sizes"
    parser = subparsers.add_parser("scaling", help=help)
    sub = parser.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
    from lmforge.train.common import stop_exit_code

    add_config_command(sub, "sweep", "train a grid of small models (resumes: rerun the same command)", SweepConfig,
                       sweep, description=__doc__, exit_code=stop_exit_code)  # fmt: skip
    p = add_config_command(sub, "fit", "fit L(N), L(D), L(N, D) to finished runs; report, plot, predict", FitConfig,
                           fit, description=__doc__)  # fmt: skip
    p.add_argument("runs_positional", nargs="*", metavar="RUN", default=None, help="the same as --runs")


# ----------------------------------------------------------------------------- sweep


def parse_size(size: str, head_dim: int) -> tuple[int, int, int]:
    """'2x128' -> (n_layer 2, d_model 128, n_head 128 / head_dim), or a one-line error naming the size."""
    layers, sep, width = size.lower().partition("x")
    if not (sep and layers.isdigit() and width.isdigit() and int(layers) >= 1 and int(width) >= 1):
        raise LmforgeError(f"sizes: {size!r} is not LAYERSxWIDTH (e.g. 2x128)")
    if int(width) % head_dim:
        raise LmforgeError(f"sizes: {size}: width {width} is not a multiple of head_dim {head_dim}")
    return int(layers), int(width), int(width) // head_dim


def run_name(size: str, tokens: int) -> str:
    return f"{size.lower()}_t{tokens}"


def run_config(cfg: SweepConfig, size: str, tokens: int):
    """The pretrain config of one grid point: the sweep's shared recipe, this size, steps for this many tokens."""
    from lmforge.config import parse_set
    from lmforge.train.pretrain import resolve_train_config

    n_layer, d_model, n_head = parse_size(size, cfg.head_dim)
    per_step = cfg.batch_size * cfg.seq_len
    steps = max(1, round(tokens / per_step))
    flags = {
        "data": cfg.data, "out": str(Path(cfg.out) / run_name(size, tokens)), "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len, "max_steps": steps, "lr": cfg.lr, "schedule": "cosine",
        "warmup_steps": round(cfg.warmup_fraction * steps), "min_lr_ratio": cfg.min_lr_ratio,
        "weight_decay": cfg.weight_decay, "seed": cfg.seed, "device": cfg.device,
        # One evaluation, at the last step (the loop always evaluates there), on a fixed number of val batches.
        "eval_every": 0, "eval_batches": max(1, cfg.eval_tokens // per_step),
        "ckpt_every": cfg.ckpt_every, "keep_last": 1, "log_every": max(1, steps // 20),
    }  # fmt: skip
    model = {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "max_seq_len": cfg.seq_len}
    sets = parse_set(cfg.pretrain_set)
    sets["model"] = {**model, **sets.get("model", {})}
    return resolve_train_config({"preset": cfg.preset}, flags, sets)


def final_val_loss(run_dir: Path, max_steps: int) -> float | None:
    """The val loss logged at step `max_steps` in run_dir/metrics.jsonl, or None (not finished, or never evaluated)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill mid-write
        if "val_loss" in rec and rec.get("step") == max_steps:
            found = float(rec["val_loss"])
    return found


def _check_plan(run_dir: Path, want) -> None:
    """A finished run is skipped only if it ran the plan the sweep asks for now; else a one-line error."""
    import yaml

    from lmforge.config import to_dict

    have = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    want_d = to_dict(want)
    diffs = [f"{k}={have.get(k)!r} (now {want_d[k]!r})" for k in PLAN_FIELDS if have.get(k) != want_d[k]]
    diffs += [f"model.{k}={have['model'].get(k)!r} (now {v!r})" for k, v in want_d["model"].items()
              if k != "vocab_size" and have["model"].get(k) != v]  # fmt: skip
    if have.get("batch_size", 0) * have.get("grad_accum", 1) != want.batch_size * want.grad_accum:
        diffs.append(f"batch {have.get('batch_size')} x {have.get('grad_accum')} (now {want.batch_size})")
    if diffs:
        raise LmforgeError(f"{run_dir}: finished with {', '.join(diffs[:3])}; use a new --out for a different plan")


def sweep(cfg: SweepConfig) -> dict:
    """Train every (size, tokens) point not finished yet; returns the last run's result (`stopped` if cut short)."""
    from lmforge.data.shards import load_index
    from lmforge.train.pretrain import pretrain

    out = Path(cfg.out)
    index = load_index(cfg.data)
    train_tokens = sum(s["num_tokens"] for s in index["splits"].get("train", []))
    if max(cfg.tokens) > train_tokens:
        warn(f"--tokens {max(cfg.tokens)} is more than the {train_tokens} training tokens of {cfg.data}: runs "
             "repeat data, which bends the law (Muennighoff et al. 2023)")  # fmt: skip
    grid = [(size, tokens) for size in cfg.sizes for tokens in sorted(cfg.tokens)]
    record = {"config": dataclasses.asdict(cfg), "runs": {}}
    if (out / "sweep.json").is_file():
        record["runs"] = json.loads((out / "sweep.json").read_text(encoding="utf-8")).get("runs", {})
    result = {"stopped": None}
    for i, (size, tokens) in enumerate(grid, 1):
        run_cfg = run_config(cfg, size, tokens)
        run_dir, name = Path(run_cfg.out), run_name(size, tokens)
        head = f"lmforge scaling sweep: [{i}/{len(grid)}] {name}"
        loss = final_val_loss(run_dir, run_cfg.max_steps)
        if loss is not None:
            _check_plan(run_dir, run_cfg)
            record["runs"].setdefault(name, {"size": size, "tokens": tokens, "val_loss": loss, "seconds": None})
            print(f"{head}: done before (val_loss {loss:.4f}), skipped", file=sys.stderr, flush=True)
            continue
        resumed = " (resuming)" if any(run_dir.glob("checkpoints/step_*")) else ""
        print(f"{head}: {run_cfg.max_steps} steps{resumed}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        result = pretrain(run_cfg)
        if result.get("stopped"):  # Ctrl-C, SIGTERM: the run is checkpointed; the sweep stops with it
            return result
        loss = final_val_loss(run_dir, run_cfg.max_steps)
        seconds = time.perf_counter() - began
        record["runs"][name] = {"size": size, "tokens": tokens, "val_loss": loss, "seconds": seconds}
        atomic_write_json(out / "sweep.json", record)
        print(f"{head}: val_loss {loss:.4f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    atomic_write_json(out / "sweep.json", record)
    print(f"lmforge scaling sweep: {len(grid)} runs in {out}; next: lmforge scaling fit {out}")
    return result


# ----------------------------------------------------------------------------- reading runs


def model_sizes(model_cfg, seq_len: int) -> dict:
    """Parameters with and without embeddings, and training FLOPs per token, of a model config.

    Non-embedding, as Kaplan et al. 2020: all parameters but the token and position embeddings and an untied
    output head (the unembedding); the norms are kept. Chinchilla counts every parameter.
    """
    import torch

    from lmforge.model.sizes import count_params, flops_per_token
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):  # shapes only: no memory, no time
        parts = count_params(Transformer(model_cfg))
    return {"n_total": parts["total"], "n_nonemb": parts["total"] - parts["embedding"] - parts["head"],
            "flops_per_token": flops_per_token(model_cfg, seq_len)}  # fmt: skip


def read_run(path: Path) -> dict:
    """One finished pretrain run as a fit point, or a one-line error naming the run."""
    import yaml

    from lmforge.model.transformer import ModelConfig
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.train import checkpoint as ckpt

    if not (path / "config.yaml").is_file():
        raise LmforgeError(f"{path}: not a pretrain run (no config.yaml)")
    cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    steps = cfg["max_steps"]
    loss = final_val_loss(path, steps)
    if loss is None:
        raise LmforgeError(f"{path}: no finished val loss (no val_loss at its last step {steps} in metrics.jsonl; "
                           "rerun its sweep or pretrain command to finish it, or leave it out)")  # fmt: skip
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip().startswith("{")]  # fmt: skip
    tokens = next((r["tokens"] for r in records if r.get("step") == steps and "tokens" in r),
                  steps * cfg["batch_size"] * cfg["seq_len"] * cfg.get("grad_accum", 1))  # fmt: skip
    found = ckpt.list_checkpoints(path)
    tok_hash = ckpt.read_meta(found[-1]).get("tokenizer", {}).get("hash") if found else None
    if tok_hash is None and (path / "tokenizer" / "tokenizer.json").is_file():
        tok_hash = tokenizer_hash(path / "tokenizer")
    if tok_hash is None:
        raise LmforgeError(f"{path}: no tokenizer recorded (no checkpoint meta, no tokenizer/ copy)")
    model = ModelConfig.from_dict(cfg["model"])
    return {"run": str(path), "n_layer": model.n_layer, "d_model": model.d_model, "tokens": int(tokens),
            "val_loss": loss, "tokenizer_hash": tok_hash, "data": cfg.get("data", ""),
            "eval_tokens": cfg.get("eval_batches", 0) * cfg["batch_size"] * cfg["seq_len"],
            **model_sizes(model, cfg["seq_len"])}  # fmt: skip


def expand_runs(paths: list[str]) -> list[Path]:
    """Run folders as given; a folder without config.yaml stands for the runs in it (a sweep's --out)."""
    out = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            out.append(p)
            continue
        inner = sorted(c for c in p.iterdir() if (c / "config.yaml").is_file()) if p.is_dir() else []
        if not inner:
            raise LmforgeError(f"{p}: neither a pretrain run (config.yaml) nor a folder of runs")
        out += inner
    return out


def check_same_tokenizer(runs: list[dict]) -> None:
    first = runs[0]
    for r in runs[1:]:
        if r["tokenizer_hash"] != first["tokenizer_hash"]:
            raise LmforgeError(
                f"{r['run']}: trained with tokenizer {r['tokenizer_hash']}, but {first['run']} with "
                f"{first['tokenizer_hash']}: losses on different tokenizers are not one scaling law"
            )
    if len({(r["data"], r["eval_tokens"]) for r in runs}) > 1:
        warn("the runs validated on different data or numbers of val tokens: their losses may not compare")


# ----------------------------------------------------------------------------- fitting and reporting

CHINCHILLA_FIELDS = ("E", "A", "B", "alpha", "beta")
# The two ways to count N, each the convention of one paper; both are fitted and reported, by these names.
N_COUNTS = {"n_total": "all parameters (Chinchilla's N)", "n_nonemb": "non-embedding parameters (Kaplan's N)"}


def _too_few(runs: list[dict]) -> None:
    """A one-line error naming the runs when they cannot determine L(N, D) (lmforge.eval.scaling.identifiable)."""
    from lmforge.eval.scaling import identifiable

    names = ", ".join(Path(r["run"]).name for r in runs)
    problem = identifiable([r["n_total"] for r in runs], [r["tokens"] for r in runs])
    if problem:
        where = runs[-1]["run"] if runs else "scaling fit"
        raise LmforgeError(f"{where}: {len(runs)} finished runs ({names}): {problem}; add sizes or token budgets")


def fit_runs(runs: list[dict], checks: list[dict], budgets: list[float], *, resamples: int = 200,
             level: float = 0.95, seed: int = 0) -> dict:  # fmt: skip
    """Every fit of the report, as plain data: Chinchilla and Kaplan for both N counts, held-out predictions,
    compute-optimal sizes, each with bootstrap intervals."""
    from lmforge.eval import scaling as S

    _too_few(runs)
    d = np.array([r["tokens"] for r in runs], dtype=float)
    loss = np.array([r["val_loss"] for r in runs])
    out = {"level": level, "resamples": resamples, "chinchilla": {}, "kaplan": {}, "checks": [], "compute_optimal": []}
    long_idx = S.longest_per_size([r["n_total"] for r in runs], d)
    for key, label in N_COUNTS.items():
        n = np.array([r[key] for r in runs], dtype=float)
        fit = S.fit_chinchilla(n, d, loss)
        boots = S.bootstrap_chinchilla(n, d, loss, fit, resamples=resamples, seed=seed) if resamples else []
        pred = fit.loss(n, d)
        out["chinchilla"][key] = {
            "n": label, **S.summarize(fit, boots, CHINCHILLA_FIELDS, level), "objective": fit.objective,
            "bootstrap_fits": len(boots), "max_abs_rel_error": float(np.max(np.abs(pred / loss - 1))),
        }  # fmt: skip
        km = S.fit_power_law(n[long_idx], loss[long_idx])
        km_boots = S.bootstrap_power_law(n[long_idx], loss[long_idx], resamples=resamples, seed=seed)
        out["kaplan"][f"L(N) {key}"] = {
            "n": label, "points": [runs[i]["run"] for i in long_idx],
            **S.summarize(km, km_boots, ("alpha", "x_c"), level), "rms_log_residual": km.rms_log_residual,
        }  # fmt: skip
        # FLOPs per parameter per token of these models (6 plus the attention scores and, for N without
        # embeddings, the output head): C = k N D with the models' own k, next to Chinchilla's 6.
        k_own = float(np.median([r["flops_per_token"] / r[key] for r in runs]))
        for budget in budgets:
            for rule, k in (("6ND", 6.0), ("flops_per_token", k_own)):
                n_opt, d_opt = S.compute_optimal(fit, budget, k)
                n_bs = [S.compute_optimal(b, budget, k)[0] for b in boots]
                lo, hi = S.interval(n_bs, level)
                out["compute_optimal"].append({
                    "budget": budget, "n": key, "rule": rule, "k": k, "n_opt": float(n_opt), "n_lo": lo,
                    "n_hi": hi, "d_opt": float(d_opt), "tokens_per_param": float(d_opt / n_opt),
                    "loss": float(fit.loss(n_opt, d_opt)),
                })  # fmt: skip
        for c in checks:
            lo, hi = S.interval([b.loss(c[key], c["tokens"]) for b in boots], level)
            predicted = float(fit.loss(c[key], c["tokens"]))
            out["checks"].append({"run": c["run"], "fit": f"L(N, D) {key}", "n": c[key], "tokens": c["tokens"],
                                  "actual": c["val_loss"], "predicted": predicted, "lo": lo, "hi": hi,
                                  "rel_error": predicted / c["val_loss"] - 1})  # fmt: skip
            if key == "n_nonemb":  # Kaplan's L(N): only for a run trained on the longest budget, as its points
                km_pred = float(km.loss(c[key]))
                out["checks"].append({"run": c["run"], "fit": f"KM L(N) {key}", "n": c[key], "tokens": c["tokens"],
                                      "actual": c["val_loss"], "predicted": km_pred, "lo": math.nan, "hi": math.nan,
                                      "rel_error": km_pred / c["val_loss"] - 1})  # fmt: skip
        out["chinchilla"][key]["_fit"] = fit
        out["kaplan"][f"L(N) {key}"]["_fit"] = km
    largest = S.runs_of_largest([r["n_total"] for r in runs])
    if len({runs[i]["tokens"] for i in largest}) >= 2:
        km_d = S.fit_power_law(d[largest], loss[largest])
        boots = S.bootstrap_power_law(d[largest], loss[largest], resamples=resamples, seed=seed)
        out["kaplan"]["L(D)"] = {"n": "the largest model's runs", "points": [runs[i]["run"] for i in largest],
                                 **S.summarize(km_d, boots, ("alpha", "x_c"), level),
                                 "rms_log_residual": km_d.rms_log_residual, "_fit": km_d}  # fmt: skip
    return out


def _public(obj):
    """The report without the fit objects kept for plotting (keys starting with _), NaN as null."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _ci(entry: dict, fmt: str = "{:.4g}") -> str:
    value, lo, hi = entry["value"], entry["lo"], entry["hi"]
    if lo is None or not math.isfinite(lo):
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(runs: list[dict], report: dict) -> str:
    pct = f"{report['level']:.0%}"
    lines = [f"# Scaling fit: {len(runs)} runs", "",
             f"Intervals: {pct} bootstrap ({report['resamples']} resamples of the runs, with replacement).", "",
             "| run | shape | N all | N non-emb | D tokens | val loss | L(N,D) all N | L(N,D) non-emb N |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    fits = {k: v["_fit"] for k, v in report["chinchilla"].items()}
    for r in runs:
        preds = [f"{fits[k].loss(r[k], r['tokens']):.4f}" for k in N_COUNTS]
        lines.append(f"| {Path(r['run']).name} | {r['n_layer']}x{r['d_model']} | {r['n_total']:,} | "
                     f"{r['n_nonemb']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {' | '.join(preds)} |")  # fmt: skip
    lines += ["", "## Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)", "",
              "| N counts | E | A | B | alpha | beta | worst fit error |", "|---|---|---|---|---|---|---:|"]  # fmt: skip
    for c in report["chinchilla"].values():
        cells = " | ".join(_ci(c[f]) for f in CHINCHILLA_FIELDS)
        lines.append(f"| {c['n']} | {cells} | {c['max_abs_rel_error']:.2%} |")
    lines += ["", "## Kaplan: L(N) = (N_c / N)^alpha_N, L(D) = (D_c / D)^alpha_D (Kaplan et al. 2020)", "",
              "L(N): each size's longest run; L(D): the largest size's runs.", "",
              "| law | x counts | alpha | x_c | rms log residual |", "|---|---|---|---|---:|"]  # fmt: skip
    for name, k in report["kaplan"].items():
        lines.append(f"| {name.split()[0]} | {k['n']} | {_ci(k['alpha'])} | {_ci(k['x_c'], '{:.3g}')} | "
                     f"{k['rms_log_residual']:.4f} |")  # fmt: skip
    if report["checks"]:
        lines += ["", "## Held-out runs (not fitted)", "",
                  "| run | fit | N | D | actual | predicted | error |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for c in report["checks"]:
            band = f" [{c['lo']:.4g}, {c['hi']:.4g}]" if c["lo"] is not None and math.isfinite(c["lo"]) else ""
            lines.append(f"| {Path(c['run']).name} | {c['fit']} | {c['n']:,} | {c['tokens']:,} | {c['actual']:.4f} | "
                         f"{c['predicted']:.4f}{band} | {c['rel_error']:+.2%} |")  # fmt: skip
    if report["compute_optimal"]:
        lines += ["", "## Compute-optimal size: the minimum of the fitted L(N, D) under C = k N D", "",
                  "k = 6 (Chinchilla's C = 6ND) or the models' own training FLOPs per token / N (median over runs).",
                  "", "| C (FLOPs) | N counts | k | N_opt | D_opt | D/N | loss |",
                  "|---:|---|---:|---|---:|---:|---:|"]  # fmt: skip
        for c in report["compute_optimal"]:
            n_opt = _ci({"value": c["n_opt"], "lo": c["n_lo"], "hi": c["n_hi"]}, "{:.3g}")
            lines.append(f"| {c['budget']:.3g} | {N_COUNTS[c['n']].split(' (')[0]} | {c['k']:.2f} | {n_opt} | "
                         f"{c['d_opt']:.3g} | {c['tokens_per_param']:.1f} | {c['loss']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], checks: list[dict], report: dict, path: Path) -> None:
    """scaling.png: the data and the fits, L against N at each D, against D at each N, and Kaplan's laws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    fit = report["chinchilla"]["n_total"]["_fit"]
    cmap = plt.get_cmap("viridis")
    n_all = np.array([r["n_total"] for r in runs + checks], dtype=float)
    d_all = np.array([r["tokens"] for r in runs + checks], dtype=float)
    n_grid = np.geomspace(n_all.min() / 1.5, n_all.max() * 1.5, 100)
    d_grid = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
    for panel, (x_key, series_key, grid, xlabel) in enumerate(
        (("n_total", "tokens", n_grid, "N, all parameters"), ("tokens", "n_total", d_grid, "D, training tokens"))
    ):
        ax = axes[0, panel]
        values = sorted({r[series_key] for r in runs})
        for j, v in enumerate(values):
            color = cmap(j / max(1, len(values) - 1))
            pts = [r for r in runs if r[series_key] == v]
            ax.scatter([r[x_key] for r in pts], [r["val_loss"] for r in pts], color=color, zorder=3)
            curve = fit.loss(grid, v) if x_key == "n_total" else fit.loss(v, grid)
            ax.plot(grid, curve, color=color, lw=1, label=f"{'D' if series_key == 'tokens' else 'N'} = {v:.3g}")
        for j, c in enumerate(checks):  # one legend entry for all held-out runs
            ax.scatter([c[x_key]], [c["val_loss"]], marker="*", s=160, color="red", zorder=4,
                       label="held out" if j == 0 else None)  # fmt: skip
            ax.scatter([c[x_key]], [fit.loss(c["n_total"], c["tokens"])], marker="x", s=80, color="red", zorder=4,
                       label="its prediction" if j == 0 else None)  # fmt: skip
        ax.set(xscale="log", xlabel=xlabel, ylabel="val loss (nats/token)", title="L(N, D) = E + A/N^α + B/D^β")
        ax.legend(fontsize="x-small")
    for panel, name in enumerate(("L(N) n_nonemb", "L(D)")):
        ax, k = axes[1, panel], report["kaplan"].get(name)
        if k is None:
            ax.set_axis_off()
            continue
        by_run = {r["run"]: r for r in runs}
        x_key = "n_nonemb" if name.startswith("L(N)") else "tokens"
        xs = np.array([by_run[p][x_key] for p in k["points"]], dtype=float)
        ax.scatter(xs, [by_run[p]["val_loss"] for p in k["points"]], zorder=3)
        grid = np.geomspace(xs.min() / 1.5, xs.max() * (6 if x_key == "n_nonemb" and checks else 1.5), 100)
        ax.plot(grid, k["_fit"].loss(grid), lw=1, label=f"α = {k['_fit'].alpha:.3f}")
        if x_key == "n_nonemb":
            for c in checks:
                ax.scatter([c["n_nonemb"]], [c["val_loss"]], marker="*", s=160, color="red", zorder=4)
        label = "N, non-embedding parameters" if x_key == "n_nonemb" else "D, tokens (largest model)"
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="val loss", title=f"Kaplan {name.split()[0]}")
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def fit(cfg: FitConfig) -> dict:
    """Read the runs, fit, write scaling.json, scaling.md and scaling.png; print the Markdown report."""
    paths = expand_runs(cfg.runs)
    check_paths = expand_runs(cfg.check) if cfg.check else []
    held = {p.resolve() for p in check_paths}
    runs = [read_run(p) for p in paths if p.resolve() not in held]
    checks = [read_run(p) for p in check_paths]
    check_same_tokenizer(runs + checks)
    if cfg.out:
        out = Path(cfg.out)
    elif not (Path(cfg.runs[0]) / "config.yaml").is_file():
        out = Path(cfg.runs[0])  # a folder of runs (a sweep): the report goes next to them
    else:
        raise LmforgeError("scaling fit: RUNS are run folders, not a sweep folder: say where the report goes (--out)")
    report = fit_runs(runs, checks, cfg.budget, resamples=cfg.resamples, level=cfg.level, seed=cfg.seed)
    report = {"runs": runs, "checks_runs": checks, **report}
    text = markdown(runs, report)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, checks, report, out / "scaling.png")
    atomic_write_json(out / "scaling.json", _public(report))
    atomic_write_text(out / "scaling.md", text)
    print(text)
    print(f"lmforge scaling fit: wrote {out / 'scaling.md'}, scaling.json, scaling.png", file=sys.stderr)
    return _public(report)
