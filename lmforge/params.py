"""`lmforge params`: parameter count by part, the closed-form estimate, and FLOPs per token.

lmforge params --preset gpt2-124m
lmforge params --preset tiny --set model.n_layer=8 --json
"""

from __future__ import annotations

import argparse
import json

import torch

from lmforge.config import parse_set
from lmforge.model.transformer import Transformer, count_params, flops_per_token
from lmforge.train.pretrain import resolve_train_config


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="parameter count by part and FLOPs per token of a model config")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=_main)


def describe(cfg) -> dict:
    """Counts by part from a real (meta-device, so free) model, next to V*H + 12*H^2*L."""
    with torch.device("meta"):
        model = Transformer(cfg)
    parts = count_params(model)
    estimate = cfg.vocab_size * cfg.d_model + 12 * cfg.d_model**2 * cfg.n_layer
    return {**parts, "estimate_VH_12H2L": estimate, "flops_per_token": flops_per_token(cfg)}


def _main(args: argparse.Namespace) -> int:
    cfg = resolve_train_config({"preset": args.preset}, {}, parse_set(args.set)).model
    info = describe(cfg)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset {args.preset}: {cfg}")
    for key in ("embedding", "attention", "mlp", "norms", "head", "total"):
        print(f"  {key:<10} {info[key]:>15,}")
    print(f"  {'V*H+12H²L':<10} {info['estimate_VH_12H2L']:>15,}  (closed-form estimate)")
    print(f"  training FLOPs per token at T={cfg.max_seq_len}: {info['flops_per_token']:.3e}")
    return 0
