"""`lmforge export --format hf`: a run, checkpoint or imported folder -> a Hugging Face model folder.

    lmforge export runs/demo --format hf --out hf/demo
    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; M.from_pretrained('hf/demo'); T.from_pretrained('hf/demo')"

A LoRA run is exported with its adapter merged into the base. Writes model.safetensors (HF names, `lm_head` left out when tied), config.json (LlamaForCausalLM, or
Qwen2ForCausalLM for q/k/v biases), generation_config.json (stopping at EOS and the chat turn end),
tokenizer.json, tokenizer_config.json (with a chat template) and special_tokens_map.json; transformers
loads the folder with no extra arguments. Models HF Llama cannot compute (ALiBi or other position
encodings, LayerNorm, GELU, QK-norm, biases on every linear) are refused, naming the field.
The embedding keeps its padded rows (lmforge rounds the vocabulary up to a multiple of 64):
config.json's vocab_size is the row count, larger than the tokenizer, as with many HF models.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LmforgeError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run or checkpoint as a Hugging Face model folder")
    p.add_argument("checkpoint", metavar="RUN_OR_MODEL", help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("--format", choices=("hf",), default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weight dtype; auto = as stored in the checkpoint (default)")  # fmt: skip
    p.set_defaults(func=run)


def export_hf(source: str | Path, out: str | Path, dtype: str = "auto") -> dict:
    """Write the HF folder `out` atomically from a run/checkpoint folder; return a summary dict."""
    from safetensors.torch import save_file

    from lmforge.fileio import atomic_dir
    from lmforge.hub.common import DTYPE_NAMES, DTYPES, cast, check_out_dir, check_tensors, n_params
    from lmforge.hub.hf import generation_config, hf_config, hf_tensors, hf_tokenizer_files, unsupported_for_hf
    from lmforge.model.transformer import ModelConfig
    from lmforge.train.checkpoint import (
        load_model,
        load_tensors,
        model_tensors,
        read_meta,
        resolve_checkpoint,
        tokenizer_dir,
    )

    ckpt = resolve_checkpoint(source)
    check_out_dir(out, ckpt, "config.json")
    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    bad = unsupported_for_hf(cfg)
    if bad is not None:
        raise LmforgeError(f"{ckpt}: {bad} cannot be exported to Hugging Face Llama/Qwen2")
    if "adapter" in meta:  # a LoRA run: its base with the adapter merged in
        tensors = model_tensors(load_model(ckpt)[0].state_dict(), cfg.tie_embeddings)
    else:
        tensors = load_tensors(ckpt / "model.safetensors")
    check_tensors(cfg, tensors, ckpt / "model.safetensors")
    if dtype != "auto":
        tensors = cast(tensors, DTYPES[dtype])
    dtype_name = DTYPE_NAMES.get(tensors["embed_tokens.weight"].dtype, "float32")

    files, ids, stop = hf_tokenizer_files(tokenizer_dir(ckpt, meta), cfg)
    config, arch = hf_config(cfg, dtype_name, ids)

    with atomic_dir(out) as tmp:
        save_file(hf_tensors(tensors, cfg.tie_embeddings), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(ids, stop), indent=2) + "\n")
        for name, content in files.items():
            (tmp / name).write_bytes(content)
    return {"architecture": arch, "params": n_params(tensors), "dtype": dtype_name, "from": str(ckpt), "out": str(out)}


def run(args) -> int:
    s = export_hf(args.checkpoint, args.out, args.dtype)
    print(
        f"exported {s['architecture']}: {s['params'] / 1e6:.1f}M params, {s['dtype']}, from {s['from']} -> {s['out']}"
    )
    return 0
