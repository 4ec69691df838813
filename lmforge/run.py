"""`lmforge run`: the whole pipeline from a recipe, by default the CPU demo on Shakespeare.

    lmforge run                                  # lmforge/recipes/demo.yaml -> runs/demo
    lmforge run --recipe demo-zh                 # the Chinese demo (lmforge/recipes/demo-zh.yaml) -> runs/demo-zh
    lmforge run --recipe my.yaml --out runs/x --set pretrain.max_steps=50

Stages: data clean -> tokenizer -> data tokenize -> pretrain (with validation) -> samples
-> SFT on chat data (answer-only loss, validation) -> a short scripted chat transcript
-> stage 3: a short SFT warm-up on a verifiable task's checked answers, then GRPO on that task,
with greedy exact-match accuracy on held-out prompts before and after (runs/demo/align.json)
-> eval: `lmforge eval` on every model of the run with the same tasks (OUT/eval/<stage>/results.json)
-> `lmforge report`: OUT/report.html (one page: data funnel, curves, eval table, samples) and report.md.
Each stage's output lands in OUT/<stage>, and OUT/stages.json records what built it (`run_state.py`):
run the recipe again and each stage says what it does: a finished stage whose config and inputs
did not change is skipped, an interrupted one resumes (training from its last checkpoint), one whose
config or inputs changed is rebuilt, and so is everything downstream of it.

Training stages run for fixed step counts, so the figures are the same on any machine (a slower one
only takes longer). A time budget is a user's choice (`--set pretrain.max_seconds=300`); a stage
that stops at it is named in the final `stages:` line. Exit codes: 0 done; 3 done, but a stage
stopped at its time budget (rerun to finish it); 130 / 143 interrupted by Ctrl-C / SIGTERM
(checkpoint saved; rerun to resume); 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import textwrap
import time
from pathlib import Path

from lmforge.config import did_you_mean, load_yaml, parse_set, recipe_path, resolve, to_dict
from lmforge.data.corpora import shakespeare_files  # noqa: F401 (tests and benchmarks import it from here)
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_json, atomic_write_text
from lmforge.run_state import StageState

RECIPE_KEYS = {"out", "corpus", "clean", "tokenizer", "tokenize", "pretrain", "sample", "sft", "chat", "align", "eval"}
ALIGN_KEYS = {"task", "warmup_examples", "warmup", "grpo"}
CLEAN_KEYS = {"steps", "doc_sep", "doc_bytes", "max_doc_bytes"}
EXIT_TIME_BUDGET = 3  # the recipe ran to its end, but a stage stopped at its time budget (`max_seconds`)


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a whole recipe (default: the CPU demo on Shakespeare)")
    p.add_argument("--recipe", help="recipe YAML, or a packaged one: demo (default), demo-zh (Chinese)")
    p.add_argument("--out", help="output folder (default: the recipe's `out`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. pretrain.max_steps=50")
    p.set_defaults(func=_main)


def _merge(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | None, sets: list[str]) -> dict:
    """A recipe file, or a packaged recipe by name (`demo`, `demo-zh`), with `--set` overrides merged in."""
    recipe = _merge(load_yaml(recipe_path(path or "demo")), parse_set(sets))
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if "preset" in unknown and "pretrain" not in recipe:  # gpt2-124m.yaml, llama-1b-fsdp.yaml
        raise LmforgeError(f"recipe {path}: a pretraining config, not a pipeline recipe: "
                           f"lmforge pretrain --config {path} --data SHARDS --out RUN_DIR")  # fmt: skip
    if unknown:
        raise LmforgeError(f"recipe: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}")
    return recipe


def _main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out or recipe.get("out", "runs/demo"))
    result = run_recipe(recipe, out)
    if result["interrupted"]:
        return 128 + signal.Signals[result["interrupted"]].value
    return EXIT_TIME_BUDGET if result["stopped"] else 0


def _section(recipe: dict, name: str, owned: tuple[str, ...] = (), where: str | None = None) -> dict:
    """The mapping `recipe[name]` ({} when absent). Fields in `owned` are the recipe's to set (the paths a stage
    reads and writes), so a section naming one is an error rather than a value silently replaced."""
    where = where or name
    section = recipe.get(name) or {}
    if not isinstance(section, dict):
        raise LmforgeError(f"recipe: {where} must be a mapping of fields, got {section!r}")
    fixed = sorted(set(section) & set(owned))
    if fixed:
        raise LmforgeError(f"recipe: {where}.{fixed[0]} is set by `lmforge run` (inputs and outputs live under --out)")
    return section


def _check_section(recipe: dict, name: str, known: set[str]) -> dict:
    """A section that is not a command's config: its keys must be among `known`."""
    section = _section(recipe, name)
    unknown = sorted(set(section) - known)
    if unknown:
        raise LmforgeError(f"recipe: unknown {name} field {unknown[0]!r}{did_you_mean(unknown[0], known)}; known: "
                           f"{', '.join(sorted(known))}")  # fmt: skip
    return section


def _stage_key(cfg) -> dict:
    """What decides whether a stage's output is still good (stages.json): its config without the paths."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("input", "out", "tokenizer")}


def _loop_result(state: StageState, name: str, result: dict, max_steps: int) -> None:
    """Record how a training stage ended; stop the pipeline on a signal (the checkpoint is saved)."""
    stopped = result.get("stopped")
    state.finish(name, done=stopped is None, step=result.get("step"), stopped=stopped)
    if stopped in ("SIGINT", "SIGTERM"):
        raise Interrupted(stopped)
    if stopped:
        _say(f"      {name} stopped at its time budget at step {result.get('step')}/{max_steps}; "
             "the next `lmforge run` resumes it")  # fmt: skip


class Interrupted(Exception):
    """A training stage stopped on SIGINT/SIGTERM (after saving): the pipeline stops too."""


def run_recipe(recipe: dict, out: Path) -> dict:
    """Run every stage of `recipe` into `out`; returns {"stopped": {stage: why}, "interrupted": signal or None}."""
    state = StageState(out)
    interrupted = None
    try:
        _run_stages(recipe, out, state)
    except Interrupted as e:
        interrupted = str(e)
    summary = [f"{name}: {action}" + (f", stopped at {state.stages[name]['stopped']} "
                                      f"(step {state.stages[name]['step']})" if state.stages[name].get("stopped")
                                      else "")
               for name, action in state.actions.items()]  # fmt: skip
    _say("stages: " + "; ".join(summary))
    stopped = state.stopped()
    if interrupted:
        _say(f"interrupted by {interrupted}: checkpoint saved; run the same command again to resume")
    elif stopped:
        _say(f"done, but {', '.join(stopped)} stopped at a time budget before max_steps: the figures are not the "
             "recipe's; run the same command again to finish (exit code 3)")  # fmt: skip
    return {"stopped": stopped, "interrupted": interrupted}


def _run_stages(recipe: dict, out: Path, state: StageState) -> None:
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.align.prefs import chosen_as_sft, task_pairs
    from lmforge.data.clean.pipeline import clean_corpus, format_summary, input_stat, resolve_steps
    from lmforge.data.corpora import CHAT, TEXT, chat_file, corpus_files
    from lmforge.data.readers import list_inputs
    from lmforge.data.textsplit import TextSplit
    from lmforge.data.tokenize_cmd import TokenizeConfig, tokenize_corpus
    from lmforge.data.tokenize_cmd import format_summary as format_tokenize_summary
    from lmforge.tokenizer.cli import TokenizerTrainConfig
    from lmforge.tokenizer.train import format_report, train_tokenizer
    from lmforge.train.pretrain import pretrain, resolve_train_config
    from lmforge.train.sft import SftConfig, sft

    corpus = recipe.get("corpus", "shakespeare")
    corpus = [corpus] if isinstance(corpus, str) else corpus
    if not isinstance(corpus, list) or not corpus or not all(isinstance(c, str) for c in corpus):
        raise LmforgeError(f"recipe: corpus must be a corpus name ({', '.join(TEXT)}) or a list of names and "
                           f"files/folders, got {recipe.get('corpus')!r}")  # fmt: skip
    clean_dir, tok_dir, shard_dir, run_dir = out / "clean", out / "tokenizer", out / "shards", out / "pretrain"
    sft_dir = out / "sft"
    # Check every section before the first minute of work.
    clean = _check_section(recipe, "clean", CLEAN_KEYS)
    split = TextSplit(**{k: clean[k] for k in ("doc_sep", "doc_bytes", "max_doc_bytes") if k in clean})
    clean_steps = resolve_steps(clean.get("steps"))  # None: the default pipeline of `lmforge data clean`
    # The tokenizer and tokenize sections are the commands' own configs (the recipe picks inputs and outputs).
    kept = [str(clean_dir / "kept")]
    paths = {"input": kept, "out": str(tok_dir)}
    section = {"vocab_size": 4096, **_section(recipe, "tokenizer", tuple(paths))}
    tok_cfg = resolve(TokenizerTrainConfig, section, paths, {}, prefix="tokenizer.")
    paths = {"input": kept, "tokenizer": str(tok_dir), "out": str(shard_dir)}
    section = {"val_fraction": 0.05, **_section(recipe, "tokenize", tuple(paths))}
    tokenize_cfg = resolve(TokenizeConfig, section, paths, {}, prefix="tokenize.")
    tok_section, tokenize_section = _stage_key(tok_cfg), _stage_key(tokenize_cfg)
    paths = {"data": str(shard_dir), "out": str(run_dir)}
    tcfg = resolve_train_config(_section(recipe, "pretrain", tuple(paths)), paths, {}, prefix="pretrain.")
    scfg = chat_set = None
    if "sft" in recipe:
        sft_section = dict(_section(recipe, "sft", ("base", "out")))
        if sft_section.get("data") in CHAT:  # a packaged set, written out as JSONL once the recipe is checked
            chat_set = sft_section["data"]
            sft_section["data"] = str(out / "corpus" / f"{chat_set}.jsonl")
        scfg = resolve(SftConfig, sft_section, {"base": str(run_dir), "out": str(sft_dir)}, {}, prefix="sft.")
    wcfg = gcfg = None
    align = recipe.get("align")
    if align is not None:
        if scfg is None:
            raise LmforgeError("recipe: an align section needs an sft section (alignment starts from the SFT model)")
        align = _check_section(recipe, "align", ALIGN_KEYS)
        task = align.get("task", "sort")
        examples = align.get("warmup_examples", 8000)
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
            raise LmforgeError(f"recipe: align.warmup_examples must be a positive integer, got {examples!r}")
        paths = {"base": str(sft_dir), "out": str(out / "task-sft"), "data": str(out / "task-sft.jsonl")}
        section = _section(align, "warmup", tuple(paths), "align.warmup")
        wcfg = resolve(SftConfig, section, paths, {}, prefix="align.warmup.")
        paths = {"base": str(out / "task-sft"), "out": str(out / "grpo"), "task": task}
        section = _section(align, "grpo", tuple(paths), "align.grpo")
        gcfg = resolve(GrpoConfig, section, paths, {}, prefix="align.grpo.")
    ecfg = None
    if "eval" in recipe:
        from lmforge.eval.eval_cmd import EvalConfig

        paths = {"model": str(run_dir), "out": str(out / "eval")}  # each model of the run in turn (_eval_and_report)
        ecfg = resolve(EvalConfig, _section(recipe, "eval", tuple(paths)), paths, {}, prefix="eval.")
    chat = {"questions": [], "max_new_tokens": 60, "temperature": 0.0, "system": None,
            **_check_section(recipe, "chat", {"questions", "max_new_tokens", "temperature", "system"})}  # fmt: skip
    sample = {"prompts": ["\n"], "max_new_tokens": 100, "temperature": 0.8, "top_k": 50, "seed": 0,
              **_check_section(recipe, "sample", {"prompts", "max_new_tokens", "temperature", "top_k", "seed"})}  # fmt: skip

    # The recipe is checked: now the packaged corpora that need converting are written (once) into OUT/corpus.
    inputs = corpus_files(corpus, out / "corpus")
    if chat_set is not None:
        chat_file(chat_set, out / "corpus")

    n = (9 if gcfg else 7 if scfg else 5) + (ecfg is not None)
    models = ["pretrain"] + (["sft"] if scfg else []) + (["grpo"] if gcfg else [])
    action = state.begin("clean", {"inputs": [input_stat(f) for f in list_inputs(inputs)], "steps": clean_steps,
                                   "split": split.to_dict()}, [], [clean_dir])  # fmt: skip
    _say(f"[1/{n}] data clean -> {clean_dir}: {action}")
    if action != "skip":
        report = clean_corpus(inputs, clean_dir, steps=clean_steps, split=split, progress=False)
        _say(textwrap.indent(format_summary(report), "      "))
        state.finish("clean")
    inputs = [clean_dir / "kept"]
    action = state.begin("tokenizer", tok_section, ["clean"], [tok_dir])
    _say(f"[2/{n}] tokenizer -> {tok_dir}: {action}")
    if action != "skip":
        report = train_tokenizer(inputs, tok_cfg.vocab_size, tok_dir, min_frequency=tok_cfg.min_frequency,
                                 heldout_fraction=tok_cfg.heldout_fraction, text_field=tok_cfg.text_field,
                                 split=tok_cfg.text_split(), model_max_length=tok_cfg.model_max_length)  # fmt: skip
        _say(textwrap.indent(format_report(report, tok_dir), "      "))
        state.finish("tokenizer")
    action = state.begin("tokenize", tokenize_section, ["tokenizer"], [shard_dir])
    _say(f"[3/{n}] tokenize -> {shard_dir}: {action}")
    if action != "skip":
        t0 = time.perf_counter()
        index = tokenize_corpus(inputs, tok_dir, shard_dir, val_fraction=tokenize_cfg.val_fraction,
                                workers=tokenize_cfg.workers, shard_tokens=tokenize_cfg.shard_tokens,
                                text_field=tokenize_cfg.text_field, split=tokenize_cfg.text_split(), progress=False)  # fmt: skip
        _say(textwrap.indent(format_tokenize_summary(index, shard_dir, time.perf_counter() - t0), "      "))
        state.finish("tokenize")
    action = state.begin("pretrain", to_dict(tcfg), ["tokenize"], [run_dir])
    _say(f"[4/{n}] pretrain -> {run_dir}: {action}")
    if action != "skip":
        _loop_result(state, "pretrain", pretrain(tcfg), tcfg.max_steps)
    _say(f"[5/{n}] samples from {run_dir}")
    text = _samples(run_dir, sample)
    atomic_write_text(out / "samples.txt", text)
    print(text)
    if scfg is None:
        _eval_and_report(ecfg, out, state, models, n)
        _say(f"done: {out}/samples.txt, metrics in {run_dir}/metrics.jsonl (tensorboard --logdir {run_dir}/tb)")
        return
    action = state.begin("sft", to_dict(scfg), ["pretrain"], [sft_dir])
    _say(f"[6/{n}] sft on {scfg.data} -> {sft_dir}: {action}")
    if action != "skip":
        result = sft(scfg)
        if "val_loss_before" in result and result.get("val_loss_after") is not None:
            ended = (f"; {result['samples_ended']}/{result['samples']} held-out replies ended at the turn-end token"
                     if result.get("samples") else "")  # fmt: skip
            _say(f"      held-out answer loss {result['val_loss_before']:.3f} -> {result['val_loss_after']:.3f}{ended}")
        _loop_result(state, "sft", result, scfg.max_steps)
    _say(f"[7/{n}] chat with {sft_dir}")
    transcript = _chat_transcript(sft_dir, chat)
    atomic_write_text(out / "chat.txt", transcript)
    print(transcript)
    if gcfg is not None:
        data = Path(wcfg.data)
        action = state.begin("task-sft", {"task": gcfg.task, "examples": examples, "seed": gcfg.seed,
                                          "warmup": to_dict(wcfg)}, ["sft"], [data, Path(wcfg.out)])  # fmt: skip
        _say(f"[8/{n}] sft warm-up on {examples} checked {gcfg.task} answers -> {wcfg.out}: {action}")
        if action != "skip":
            if not data.is_file():
                rows = chosen_as_sft(task_pairs(gcfg.task, examples, seed=gcfg.seed))
                atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
            _loop_result(state, "task-sft", sft(wcfg), wcfg.max_steps)
        action = state.begin("grpo", to_dict(gcfg), ["task-sft"], [Path(gcfg.out), out / "align.json"])
        _say(f"[9/{n}] grpo on {gcfg.task} -> {gcfg.out}: {action}")
        if action != "skip":
            g = grpo(gcfg)
            if "before" in g and "after" in g:
                atomic_write_json(out / "align.json", _align_report(gcfg, g))
            _loop_result(state, "grpo", g, gcfg.max_steps)
        if (out / "align.json").is_file():
            _say("      " + json.loads((out / "align.json").read_text())["summary"])
    _eval_and_report(ecfg, out, state, models, n)
    _say(f"done: {out}/samples.txt, {out}/chat.txt; metrics in {run_dir}, {sft_dir}"
         f"{' and ' + str(out / 'grpo') if gcfg else ''} (metrics.jsonl, tb/)")  # fmt: skip


def _eval_and_report(ecfg, out: Path, state: StageState, models: list[str], n: int) -> None:
    """The last stage: `lmforge eval` on each model with the same tasks (OUT/eval/<stage>/), then the report
    page of the whole run (always rewritten: it reads what the stages left, in seconds)."""
    from lmforge.eval.eval_cmd import evaluate
    from lmforge.eval.report import write_report

    if ecfg is not None:
        action = state.begin("eval", to_dict(ecfg), models, [out / "eval"])
        _say(f"[{n}/{n}] eval {', '.join(models)} on {', '.join(ecfg.task_list + ecfg.harness_list)} -> "
             f"{out / 'eval'}: {action}")  # fmt: skip
        for name in models:  # a finished or interrupted eval resumes from OUT/eval/<name>: nothing is scored twice
            evaluate(dataclasses.replace(ecfg, model=str(out / name), out=str(out / "eval" / name)))
        if action != "skip":
            state.finish("eval")
    html, md = write_report([out], out)
    _say(f"report: {html} (and {md.name})")


def _align_report(cfg, result: dict) -> dict:
    """Held-out exact-match accuracy of the warm-up model (GRPO's step 0) and of the GRPO model, the paired
    change on the same prompts (fixed, broken, exact McNemar p), and the KL."""
    from lmforge.align.rollout import paired_change

    b, a = result["before"], result["after"]
    kls = [r["kl"] for r in map(json.loads, (Path(cfg.out) / "metrics.jsonl").open()) if "kl" in r]
    paired = paired_change(cfg.out, b["step"], a["step"])
    summary = (f"held-out {cfg.task} accuracy (greedy, {a['val_prompts']} prompts never trained on): "
               f"{b['val_accuracy']:.3f} [{b['val_accuracy_lo']:.3f}, {b['val_accuracy_hi']:.3f}] -> "
               f"{a['val_accuracy']:.3f} [{a['val_accuracy_lo']:.3f}, {a['val_accuracy_hi']:.3f}] after "
               f"{a['step']} GRPO steps")  # fmt: skip
    if paired:
        summary += (f"; same prompts: {paired['fixed']} fixed, {paired['broken']} broken "
                    f"(exact McNemar p = {paired['p_value']:.2g})")  # fmt: skip
    summary += f"; KL to the warm-up model: last {kls[-1]:.3f}, max {max(kls):.3f}"
    return {"task": cfg.task, "before": b, "after": a, "paired": paired, "kl_last": kls[-1], "kl_max": max(kls),
            "summary": summary}  # fmt: skip


def _chat_transcript(run_dir: Path, chat: dict) -> str:
    from lmforge.chat.template import ChatFormat
    from lmforge.serve.chat_cmd import ChatSession
    from lmforge.train.checkpoint import load_for_inference

    model, tok_dir, meta = load_for_inference(run_dir)
    session = ChatSession(model, ChatFormat(tok_dir), chat["system"], max_new_tokens=int(chat["max_new_tokens"]),
                          temperature=float(chat["temperature"]), repetition_penalty=1.1)  # fmt: skip
    lines = [f"# chat with {run_dir} at step {meta['step']} (temperature {chat['temperature']})"]
    for question in chat["questions"]:
        answer, ended = session.reply(question)
        lines += [f"you> {question}", f"assistant> {answer}" + ("" if ended else "  [cut: no turn end]")]
    return "\n".join(lines) + "\n"


def _samples(run_dir: Path, sample: dict) -> str:
    from lmforge.serve.generate import generate
    from lmforge.tokenizer.special import EOT, load_tokenizer
    from lmforge.train.checkpoint import load_for_inference

    model, tok_dir, meta = load_for_inference(run_dir)
    tok = load_tokenizer(tok_dir)
    prompts = list(sample["prompts"])
    ids = [tok.encode(p).ids for p in prompts]
    outs = generate(model, ids, int(sample["max_new_tokens"]), temperature=float(sample["temperature"]),
                    top_k=sample["top_k"], seed=int(sample["seed"]), stop_ids=[tok.token_to_id(EOT)])  # fmt: skip
    parts = [f"# samples at step {meta['step']} (temperature {sample['temperature']}, top-k {sample['top_k']})\n"]
    for p, o in zip(prompts, outs):
        parts.append(f"--- prompt: {p!r}\n{p}{tok.decode(o)}\n")
    return "\n".join(parts)


def _say(msg: str) -> None:
    print(f"lmforge run: {msg}", file=sys.stderr, flush=True)
