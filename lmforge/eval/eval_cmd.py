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

`--harness T1,T2` runs lm-evaluation-harness tasks on lmforge's engine (lmforge/eval/harness.py; needs
`pip install "lmforge[eval]"`), `--harness-include DIR` adds a folder of local task YAMLs; their metrics
join the same table (as `harness:TASK`) and items_harness_<task>.jsonl holds each request and response.

An interrupted eval resumes: run the same command again (same --out and settings) and the tasks already in
results.json are kept, and a multiple-choice task continues from the items in items_<task>.partial.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError

DEFAULT_TASKS = "shakespeare-next,chatterbot-en,chatterbot-zh"


@dataclass(frozen=True)
class EvalConfig:
    """`lmforge eval`: each field's comment is its help text."""

    model: str = ""  # run, checkpoint or imported model folder (also the first positional argument)
    # comma-separated: built-in sets (shakespeare-next, chatterbot-en, chatterbot-zh), mc:FILE_OR_DIR, ppl:FILE_OR_DIR,
    # task:NAME (add, mul, sort, reverse, convert); default: the three built-in sets, unless --harness is given
    tasks: str = ""
    # comma-separated lm-evaluation-harness tasks, run on lmforge's engine (pip install "lmforge[eval]"); --shots and
    # --limit apply to them too
    harness: str = ""
    harness_include: str = ""  # a folder of local harness task YAML files (for --harness)
    batch_size: int = 8  # --harness: generation rows per batch (loglikelihood requests sharing a context run together)
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
        tasks = self.tasks or ("" if self.harness else DEFAULT_TASKS)
        return [t.strip() for t in tasks.split(",") if t.strip()]

    @property
    def harness_list(self) -> list[str]:
        return [t.strip() for t in self.harness.split(",") if t.strip()]

    def validate(self) -> EvalConfig:
        require([
            (bool(self.model), "eval needs a model: lmforge eval RUN_OR_CHECKPOINT"),
            (bool(self.task_list or self.harness_list), "needs --tasks or --harness"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
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
    from lmforge.eval.mc import prompts_for, summarize
    from lmforge.eval.tasks import generative_result, task_items, task_name
    from lmforge.fileio import atomic_write_text
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
    if cfg.harness_list:
        _require_lm_eval()
    out = Path(cfg.out) if cfg.out else None
    results = _resumed(out, cfg)
    model = tok_dir = None
    if loaded.keys() - results.keys():
        model, tok_dir, _ = load_for_inference(cfg.model, pick_device(cfg.device))
        tokenizer = load_tokenizer(tok_dir)
    for spec, items in loaded.items():
        if spec in results:
            continue
        t0 = time.perf_counter()
        if spec.startswith("task:"):
            results[spec] = generative_result(model, tok_dir, spec[5:], cfg.limit or 200, cfg.task_seed, cfg.samples,
                                              cfg.temperature, cfg.max_new_tokens)  # fmt: skip
        elif items is None:
            results[spec] = _perplexity(model, tokenizer, spec[4:], tokenizer.token_to_id(EOT), cfg.ppl_tokens)
        else:
            items = items[: cfg.limit] if cfg.limit else items
            requests = prompts_for(items, cfg.form, cfg.shots, seed=cfg.seed)
            partial = out / f"items_{task_name(spec)}.partial.jsonl" if out is not None else None
            scored = _score_resumable(model, tokenizer, requests, partial)
            results[spec] = {**summarize(scored, [len(it.choices) for it in items]), "form": cfg.form,
                             "shots": cfg.shots}  # fmt: skip
            if out is not None:
                atomic_write_text(out / f"items_{task_name(spec)}.jsonl", "".join(_json_line(r) for r in scored))
                partial.unlink(missing_ok=True)
        results[spec]["seconds"] = round(time.perf_counter() - t0, 2)
        _save(out, cfg, results)
    left = [t for t in cfg.harness_list if f"harness:{t}" not in results]
    if left:
        from lmforge.eval.harness import LmforgeLM, run_harness, task_manager

        manager = task_manager(left, cfg.harness_include)
        lm = LmforgeLM(cfg.model, device=cfg.device, batch_size=cfg.batch_size, seed=cfg.seed,
                       loaded=(model, tok_dir) if model is not None else None)  # fmt: skip
        for task in left:
            t0 = time.perf_counter()
            res = run_harness(lm, [task], manager, cfg.shots, cfg.limit, cfg.seed)
            results[f"harness:{task}"] = {**res["results"][task], "seconds": round(time.perf_counter() - t0, 2)}
            if out is not None:
                atomic_write_text(out / f"items_harness_{task}.jsonl",
                                  "".join(_json_line(_sample_record(r)) for r in res["samples"][task]))  # fmt: skip
            _save(out, cfg, results)
    report = {"model": str(cfg.model), "config": asdict(cfg), "tasks": results}
    print(format_table(report))
    return report


# Settings that may differ between an interrupted eval and its resumption (the task lists may grow).
_RESUME_FREE = ("out", "tasks", "harness", "harness_include", "device", "batch_size")


def _resumed(out: Path | None, cfg: EvalConfig) -> dict:
    """The task results already in OUT/results.json from an earlier run of the same eval ({} if none)."""
    path = out / "results.json" if out is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        old, tasks = saved["config"], saved["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmforgeError(f"{path}: unreadable ({e}); delete it or use another --out") from None
    now = asdict(cfg)
    changed = [k for k in now if k not in _RESUME_FREE and old.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise LmforgeError(f"{path} holds an eval with other settings ({k}: {old.get(k)!r}, now {now[k]!r}); "
                           "use another --out or delete it")  # fmt: skip
    wanted = set(cfg.task_list) | {f"harness:{t}" for t in cfg.harness_list}
    kept = {spec: r for spec, r in tasks.items() if spec in wanted}
    if kept:
        print(f"resuming {path}: {len(kept)} task(s) already scored ({', '.join(kept)})", file=sys.stderr)
    return kept


def _save(out: Path | None, cfg: EvalConfig, results: dict) -> None:
    """results.json after every task, so that an interrupted eval keeps what it finished."""
    if out is not None:
        from lmforge.fileio import atomic_write_json

        atomic_write_json(out / "results.json", {"model": str(cfg.model), "config": asdict(cfg), "tasks": results})


def _score_resumable(model, tokenizer, requests: list, partial: Path | None, chunk: int = 64) -> list[dict]:
    """score_items, appending each chunk of scored items to `partial` (when given) and starting after the items
    it already holds: an interrupted multiple-choice task continues where it stopped."""
    from lmforge.eval.mc import score_items

    done = []
    if partial is not None and partial.is_file():
        for line, req in zip(partial.read_text(encoding="utf-8").splitlines(), requests, strict=False):
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line torn by the interruption: score that item again
            if record.get("where") != req.item.where:
                break
            done.append(record)
        partial.write_text("".join(_json_line(r) for r in done), encoding="utf-8")  # drop a torn tail
        if done:
            print(f"resuming {partial}: {len(done)} of {len(requests)} items already scored", file=sys.stderr)
    elif partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    with tqdm(total=len(requests), initial=len(done), desc="eval", disable=not sys.stderr.isatty(),
              mininterval=1.0) as bar:  # fmt: skip
        for start in range(len(done), len(requests), chunk):
            scored = score_items(model, tokenizer, requests[start : start + chunk])
            done += scored
            if partial is not None:
                with partial.open("a", encoding="utf-8") as f:
                    f.write("".join(_json_line(r) for r in scored))
            bar.update(len(scored))
    return done


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmforgeError('--harness needs lm-evaluation-harness: pip install "lmforge[eval]"') from None


def _sample_record(sample: dict) -> dict:
    """What items_harness_<task>.jsonl keeps of a harness sample: the request, our response, the metrics."""
    keep = ("doc_id", "target", "arguments", "resps", "filtered_resps", "filter", "metrics")
    record = {k: sample[k] for k in keep if k in sample}
    for metric in sample.get("metrics", []):
        if metric in sample:
            record[metric] = sample[metric]
    return json.loads(json.dumps(record, ensure_ascii=False, default=str))


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _perplexity(model, tokenizer, path: str, eot_id, max_tokens: int) -> dict:
    from lmforge.data.readers import iter_texts
    from lmforge.eval.loss import text_loss

    try:
        return text_loss(model, tokenizer, (t for t, _ in iter_texts([path])), eot_id, max_tokens)
    except ValueError as e:
        raise LmforgeError(f"ppl:{path}: {e}") from None


def format_table(report: dict) -> str:
    """The results as a plain-text table (what `lmforge eval` prints)."""
    lines = [f"lmforge eval: {report['model']}"]
    for spec, r in report["tasks"].items():
        if spec.startswith("harness:"):
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in r.items()
                                if isinstance(v, float) and k != "seconds" and not k.endswith("_stderr"))  # fmt: skip
            lines.append(f"  {spec:<24} n={r.get('n', 0):<5} {metrics}  ({r.get('shots', 0)}-shot)")
        elif "acc" in r:
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
