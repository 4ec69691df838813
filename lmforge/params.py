"""`lmforge params`: parameter count by part, the closed-form estimate, FLOPs per token, and training memory.

lmforge params --preset gpt2-124m
lmforge params --preset tiny --set model.n_layer=8 --json
lmforge params --config gpt2-124m --gpus 8            # a pretraining recipe: its model, batch and parallelism

The memory is predicted per process for the config's micro-batch (batch_size x seq_len), optimizer,
parallel (ddp or fsdp over --gpus processes), precision (auto: bf16 autocast, as on a GPU) and activation
checkpointing (lmforge/train/memory.py says what is counted and how activations are measured).
"""

from __future__ import annotations

import argparse
import json

import torch

from lmforge.config import load_yaml, parse_set, recipe_path
from lmforge.errors import LmforgeError
from lmforge.model.encoder import build_model
from lmforge.model.sizes import count_params, flops_per_token
from lmforge.train.common import checkpointing_on
from lmforge.train.memory import describe_memory, train_memory
from lmforge.train.pretrain import resolve_train_config


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="parameter count by part and FLOPs per token of a model config")
    p.add_argument("--preset", help="model preset (default: the config's, else tiny)")
    p.add_argument("--config", help="a pretraining config YAML, or a packaged recipe's name (lmforge/recipes)")
    p.add_argument("--gpus", type=int, default=1, help="processes the run is split over (torchrun's world size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_main)


def describe(cfg) -> dict:
    """Counts by part from a real (meta-device, so free) model, next to V*H + 12*H^2*L."""
    with torch.device("meta"):
        model = build_model(cfg)
    parts = count_params(model)
    estimate = cfg.vocab_size * cfg.d_model + 12 * cfg.d_model**2 * cfg.n_layer
    return {**parts, "estimate_VH_12H2L": estimate, "flops_per_token": flops_per_token(cfg)}


def _main(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise LmforgeError("--gpus must be >= 1")
    recipe = load_yaml(recipe_path(args.config)) if args.config else {}
    train = resolve_train_config(recipe, {"preset": args.preset}, parse_set(args.set))
    cfg = train.model
    info = describe(cfg)
    on = checkpointing_on(train.activation_checkpointing, info["total"])
    if cfg.family != "decoder":  # lmforge/train/memory.py measures the decoder's blocks
        mem = None
    else:
        mem = train_memory(cfg, batch_size=train.batch_size, seq_len=train.seq_len, world_size=args.gpus,
                           parallel=train.parallel, optimizer=train.optimizer, bf16=train.dtype != "float32",
                           checkpointing=on)  # fmt: skip
    info["memory"] = mem and {**mem, "batch_size": train.batch_size, "seq_len": train.seq_len, "gpus": args.gpus,
                              "parallel": train.parallel, "activation_checkpointing": on}  # fmt: skip
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset {train.preset}: {cfg}")
    for key in ("embedding", "attention", "mlp", "norms", "head", "total"):
        print(f"  {key:<10} {info[key]:>15,}")
    print(f"  {'V*H+12H²L':<10} {info['estimate_VH_12H2L']:>15,}  (closed-form estimate)")
    print(f"  training FLOPs per token at T={cfg.max_seq_len}: {info['flops_per_token']:.3e}")
    print(
        f"  micro-batch {train.batch_size} x {train.seq_len} tokens, {train.optimizer}, "
        f"{'bf16 autocast' if train.dtype != 'float32' else 'fp32'}, activation checkpointing {'on' if on else 'off'}"
    )
    print(describe_memory(mem, args.gpus, train.parallel) if mem else "  training memory: not predicted for encoders")
    return 0
