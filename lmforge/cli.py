"""`lmforge <stage>`: one subcommand per pipeline stage.

    lmforge --help
    lmforge run                      # the demo recipe end to end
    lmforge tokenizer train ...      # then: data tokenize, pretrain, generate

Each stage module defines `register(subparsers)`, which adds its subcommand and
sets `func` to a function taking the parsed arguments; COMMANDS below says which
module registers which command, so only the one being run is imported. Any
`LmforgeError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.errors import LmforgeError

# Every command: the modules that register it and the line `lmforge --help` shows for it. Only the modules of the
# command being run (or asked for with `lmforge CMD --help`) are imported, so listing the commands imports none of
# them: most import torch (seconds). tests/test_data_cli_imports.py checks this table against what they register.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "run": (("lmforge.run",), "run a whole recipe (default: the CPU demo on Shakespeare)"),
    "tokenizer": (("lmforge.tokenizer.cli",), "train (BPE or WordPiece) or extend a tokenizer"),
    "data": (
        (
            "lmforge.data.tokenize_cmd",
            "lmforge.data.clean.cli",
            "lmforge.data.quality_cmd",
            "lmforge.data.mix",
            "lmforge.data.stats",
        ),
        "prepare training data (tokenize into shards, ...)",
    ),
    "params": (("lmforge.params",), "parameter count by part and FLOPs per token of a model config"),
    "pretrain": (("lmforge.train.pretrain",), "pretrain a model on token shards (resumes if RUN_DIR has a checkpoint)"),
    "sft": (
        ("lmforge.train.sft",),
        "instruction-tune a model on conversations (answer-only loss; --lora or --adapter)",
    ),
    "finetune-cls": (
        ("lmforge.train.classify",),
        "fine-tune a classifier (encoder [CLS] or decoder last token) on labelled text: accuracy, F1 per class",
    ),
    "distill": (("lmforge.train.distill",), "distill a teacher into a student (logit KD, or SFT on its answers)"),
    "prefs": (("lmforge.align.prefs",), "build preference pairs from real signals (chitchat ratings, tasks)"),
    "reward": (("lmforge.align.reward",), "train a reward model on preference pairs (pairwise ranking loss)"),
    "dpo": (("lmforge.align.dpo",), "direct preference optimization (DPO / IPO / SimPO) on pairs"),
    "grpo": (("lmforge.align.grpo",), "GRPO on a verifiable task (group-relative advantages, KL to the reference)"),
    "ppo": (("lmforge.align.ppo",), "PPO with a value head, rewarded by a verifiable task or a reward model"),
    "best-of-n": (("lmforge.align.best_of_n",), "best-of-N sampling by a verifier or reward model: curve, RS data"),
    "eval": (
        ("lmforge.eval.eval_cmd",),
        "score a model: multiple choice (acc, acc_norm, intervals), perplexity, bits/byte",
    ),
    "report": (("lmforge.eval.report",), "one HTML + Markdown page for a run: data funnel, curves, evals, samples"),
    "scaling": (
        ("lmforge.eval.scaling_cmd",),
        "scaling laws: train a grid of small models, fit L(N), L(D), L(N, D), predict compute-optimal sizes",
    ),
    "generate": (("lmforge.serve.generate_cmd",), "continue prompts with a trained model (KV-cache sampling)"),
    "chat": (("lmforge.serve.chat_cmd",), "chat with a model in the terminal (stdin lines when piped)"),
    "serve": (
        ("lmforge.serve.serve_cmd",),
        "serve a model: OpenAI-compatible API (continuous batching, streaming) and a chat page",
    ),
    "bench": (("lmforge.train.bench",), "time a training step or generation"),
    "import": (("lmforge.hub.import_cmd",), "import a Hugging Face folder or a GGUF file as an lmforge checkpoint"),
    "quantize": (("lmforge.hub.quantize_cmd",), "weight-only int8 / int4 quantization (a smaller, faster model)"),
    "export": (("lmforge.hub.export_cmd",), "export a run or checkpoint as a Hugging Face folder or a GGUF file"),
    "agent": (("lmforge.agent.cli",), "answer with tools (calculator, unit converter, document search)"),
    "self-instruct": (("lmforge.chat.self_instruct",), "generate instruction data from seed tasks (Self-Instruct)"),
    "tool-traces": (("lmforge.agent.traces",), "tool-use conversations for SFT from the verifiable tasks"),
    "rag": (("lmforge.rag.cli",), "retrieval-augmented generation: index documents, search them, answer with sources"),
}


def _modules_of(command: str) -> list:
    """The modules that register `command`, imported."""
    return [importlib.import_module(name) for name in COMMANDS[command][0]]


def _command_modules() -> list:
    """Every command module, imported (what `lmforge --help` lists without importing; the tests compare them)."""
    return [module for command in COMMANDS for module in _modules_of(command)]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (default `sys.argv[1:]`): its command registered in full, or every command listed
    by name and help only (for `lmforge --help`, no command or an unknown one), importing no command module."""
    parser = argparse.ArgumentParser(prog="lmforge", description="Build a language model end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    first = (sys.argv[1:] if argv is None else argv)[:1]
    if first and first[0] in COMMANDS:
        for module in _modules_of(first[0]):
            module.register(sub)
    else:
        for name, (_, help_text) in COMMANDS.items():
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)  # inside: building the parser imports the command's modules
        rc = args.func(args)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
