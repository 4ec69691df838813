"""`lmforge eval`: score a model on multiple-choice tasks and text perplexity, with 95% intervals.

    lmforge eval runs/demo/sft                                   # the built-in en/zh multiple-choice sets
    lmforge eval models/smollm2 --tasks mc:data/mmlu/test/ --form letter --shots 5 --limit 200
    lmforge eval runs/demo/pretrain --tasks ppl:valid.txt,shakespeare-next --out runs/demo/eval

MODEL is any lmforge run, checkpoint or imported model (LoRA runs merged). `--tasks` is a comma-separated
list of built-in sets (`shakespeare-next`, `chatterbot-en`, `chatterbot-zh`; lmforge/eval/tasks.py),
`mc:FILE_OR_DIR` (MMLU, C-Eval, CMMLU CSV files, or JSONL: plain, ARC, HellaSwag; lmforge/eval/mc.py) and
`ppl:FILE_OR_DIR` (loss, perplexity and bits per byte of text in any format lmforge reads) and `task:NAME`
(a verifiable task of stage 3, lmforge/align/tasks.py: greedy exact match on held-out prompts, and pass@k
with `--samples N`, the unbiased estimator of Chen et al. 2021). Multiple choice
reports `acc` and `acc_norm` (per character of the choice) with 95% Wilson intervals, chance level, and per
subject where a task has several. With `--out`, results.json holds the table and items_<task>.jsonl the
log-likelihood of every choice of every item (for paired comparisons between models).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.cli_config import add_config_command
from lmforge.config import require

DEFAULT_TASKS = "shakespeare-next,chatterbot-en,chatterbot-zh"


@dataclass(frozen=True)
class EvalConfig:
    """`lmforge eval`: each field's comment is its help text."""

    model: str = ""  # run, checkpoint or imported model folder (also the first positional argument)
    # comma-separated: built-in sets (shakespeare-next, chatterbot-en, chatterbot-zh), mc:FILE_OR_DIR, ppl:FILE_OR_DIR,
    # task:NAME (add, mul, sort, reverse, convert)
    tasks: str = DEFAULT_TASKS
    form: str = "cloze"  # multiple choice: cloze (score each choice's text) or letter (score A/B/C/D)
    shots: int = 0  # solved examples before each question (drawn from the same subject, by seed)
    limit: int = 0  # items per task, the first N (0 = all)
    ppl_tokens: int = 0  # ppl tasks: score at most this many tokens (0 = all)
    out: str = ""  # folder for results.json and items_<task>.jsonl ("" = print the table only)
    seed: int = 0  # picks few-shot examples and seeds sampling
    # task:NAME: the held-out prompts of make_split with this seed (1337: those grpo and ppo evaluate on with their
    # default seed, never trained on); their number is --limit (default 200)
    task_seed: int = 1337
    samples: int = 0  # task:NAME: answers sampled per prompt for pass@k (0 or 1: greedy exact match only)
    temperature: float = 0.8  # task:NAME: sampling temperature for pass@k
    max_new_tokens: int = 32  # task:NAME: longest answer
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, mps

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def validate(self) -> EvalConfig:
        require([
            (bool(self.model), "eval needs a model: lmforge eval RUN_OR_CHECKPOINT"),
            (bool(self.task_list), "needs --tasks"),
            (self.form in ("cloze", "letter"), f"form must be cloze or letter, got {self.form!r}"),
            (self.shots >= 0 and self.limit >= 0 and self.ppl_tokens >= 0, "shots, limit and ppl_tokens must be >= 0"),
            (self.samples >= 0 and self.temperature > 0 and self.max_new_tokens >= 1,
             "samples >= 0, temperature > 0 and max_new_tokens >= 1"),
        ])  # fmt: skip
        return self


def register(subparsers) -> None:
    help = "score a model: multiple choice (acc, acc_norm, intervals), perplexity, bits/byte"
    add_config_command(subparsers, "eval", help, EvalConfig, evaluate, description=__doc__, positional=("model",))


def evaluate(cfg: EvalConfig) -> dict:
    """Run every task of `cfg` on its model; returns {"model", "tasks": {spec: result}} (also written to --out)."""
    from lmforge.align.tasks import get_task
    from lmforge.eval.mc import prompts_for, score_items, summarize
    from lmforge.eval.tasks import generative_result, task_items, task_name
    from lmforge.fileio import atomic_write_json, atomic_write_text
    from lmforge.tokenizer.special import EOT, load_tokenizer
    from lmforge.train.checkpoint import load_for_inference
    from lmforge.train.common import pick_device

    # Every task is read and checked before the model runs: a bad file fails in a second, not after an hour.
    loaded = {
        spec: None if spec.startswith(("ppl:", "task:")) else task_items(spec, cfg.seed) for spec in cfg.task_list
    }
    for spec in cfg.task_list:
        if spec.startswith("task:"):
            get_task(spec[5:])  # an unknown task name fails before the model loads
    model, tok_dir, _ = load_for_inference(cfg.model, pick_device(cfg.device))
    tokenizer = load_tokenizer(tok_dir)
    results, out = {}, Path(cfg.out) if cfg.out else None
    for spec, items in loaded.items():
        t0 = time.perf_counter()
        if spec.startswith("task:"):
            results[spec] = generative_result(model, tok_dir, spec[5:], cfg.limit or 200, cfg.task_seed, cfg.samples,
                                              cfg.temperature, cfg.max_new_tokens)  # fmt: skip
        elif items is None:
            results[spec] = _perplexity(model, tokenizer, spec[4:], tokenizer.token_to_id(EOT), cfg.ppl_tokens)
        else:
            items = items[: cfg.limit] if cfg.limit else items
            requests = prompts_for(items, cfg.form, cfg.shots, seed=cfg.seed)
            scored = score_items(model, tokenizer, requests, progress=sys.stderr.isatty())
            results[spec] = {**summarize(scored, [len(it.choices) for it in items]), "form": cfg.form,
                             "shots": cfg.shots}  # fmt: skip
            if out is not None:
                lines = "".join(_json_line(r) for r in scored)
                atomic_write_text(out / f"items_{task_name(spec)}.jsonl", lines)
        results[spec]["seconds"] = round(time.perf_counter() - t0, 2)
    report = {"model": str(cfg.model), "config": asdict(cfg), "tasks": results}
    if out is not None:
        atomic_write_json(out / "results.json", report)
    print(format_table(report))
    return report


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _perplexity(model, tokenizer, path: str, eot_id, max_tokens: int) -> dict:
    from lmforge.data.readers import iter_texts
    from lmforge.errors import LmforgeError
    from lmforge.eval.loss import text_loss

    try:
        return text_loss(model, tokenizer, (t for t, _ in iter_texts([path])), eot_id, max_tokens)
    except ValueError as e:
        raise LmforgeError(f"ppl:{path}: {e}") from None


def format_table(report: dict) -> str:
    """The results as a plain-text table (what `lmforge eval` prints)."""
    lines = [f"lmforge eval: {report['model']}"]
    for spec, r in report["tasks"].items():
        if "acc" in r:
            lines.append(f"  {spec:<24} n={r['n']:<5} acc {r['acc']:.3f} [{r['acc_lo']:.3f}, {r['acc_hi']:.3f}]  "
                         f"acc_norm {r['acc_norm']:.3f} [{r['acc_norm_lo']:.3f}, {r['acc_norm_hi']:.3f}]  "
                         f"chance {r['chance']:.3f}  ({r['form']}, {r['shots']}-shot)")  # fmt: skip
            for subject, s in r.get("subjects", {}).items():
                lines.append(
                    f"    {subject:<22} n={s['n']:<5} acc {s['acc']:.3f} [{s['acc_lo']:.3f}, {s['acc_hi']:.3f}]"
                )
        elif "exact_match" in r:
            passes = "  ".join(f"pass@{k} {v:.3f}" for k, v in r.get("pass_at_k", {}).items())
            lines.append(f"  {spec:<24} n={r['n']:<5} exact match {r['exact_match']:.3f} "
                         f"[{r['exact_match_lo']:.3f}, {r['exact_match_hi']:.3f}]  {passes}".rstrip())  # fmt: skip
        else:
            lines.append(f"  {spec:<24} loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bits/byte {r['bpb']:.4f}  "
                         f"({r['tokens']:,} tokens, {r['bytes']:,} bytes)")  # fmt: skip
    return "\n".join(lines)
