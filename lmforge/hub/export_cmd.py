"""`lmforge export`: a run, checkpoint or imported folder -> a Hugging Face model folder or a llama.cpp GGUF file.

    lmforge export runs/demo --format hf --out hf/demo
    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; M.from_pretrained('hf/demo'); T.from_pretrained('hf/demo')"
    lmforge export runs/demo/sft --format gguf --dtype q8_0 --out demo.gguf --modelfile   # lmforge/hub/gguf_export.py

A LoRA run is exported with its adapter merged into the base (`checkpoint_tensors`, shared by both formats); a
bottleneck-adapter run (`--adapter`) is refused: its adapters are nonlinear layers no Llama or GGUF layout has.
`--format hf` writes model.safetensors (HF names, `lm_head` left out when tied), config.json (LlamaForCausalLM,
Qwen2ForCausalLM for q/k/v biases, MixtralForCausalLM for a mixture of experts), generation_config.json
(stopping at EOS and the chat turn end), tokenizer.json, tokenizer_config.json (with a chat template) and special_tokens_map.json; transformers
loads the folder with no extra arguments. Models HF Llama cannot compute (ALiBi or other position
encodings, LayerNorm, GELU, QK-norm, biases on every linear) are refused, naming the field.
The embedding keeps its padded rows (lmforge rounds the vocabulary up to a multiple of 64):
config.json's vocab_size is the row count, larger than the tokenizer, as with many HF models.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LmforgeError

# The weight types each format can hold; the first is the default (gguf: f32, so an export is lossless unless
# a smaller type is asked for, as `auto` keeps the checkpoint's own dtype for hf).
DTYPES_BY_FORMAT = {"hf": ("auto", "float32", "bfloat16"), "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0")}


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run or checkpoint as a Hugging Face folder or a GGUF file")
    p.add_argument("checkpoint", metavar="RUN_OR_MODEL", help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("--format", choices=tuple(DTYPES_BY_FORMAT), default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file (gguf) to write")
    p.add_argument("--dtype", default=None,
                   help="weight dtype. hf: auto (as stored in the checkpoint, default), float32, bfloat16; "
                        "gguf: f32 (default), f16, bf16, q8_0, q4_0")  # fmt: skip
    p.add_argument("--modelfile", action="store_true", help="gguf: also write an Ollama Modelfile beside the file")
    p.set_defaults(func=run)


def open_checkpoint(source: str | Path):
    """(checkpoint folder, meta, ModelConfig) of a run, checkpoint or imported folder; cheap, no weights read."""
    from lmforge.model.transformer import ModelConfig
    from lmforge.train.checkpoint import adapter_kind, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(source)
    meta = read_meta(ckpt)
    if adapter_kind(meta) == "bottleneck":
        raise LmforgeError(
            f"{ckpt} is a bottleneck-adapter run: its adapters do not fold into the weights, so "
            "no Llama/GGUF layout holds it (export its base, or train with --lora, which merges)"
        )
    if meta.get("quantization"):
        raise LmforgeError(f"{ckpt} is quantized ({meta['quantization'].get('method')}); export its float source")
    cfg = ModelConfig.from_dict(meta["model_config"])
    return ckpt, meta, cfg


def checkpoint_tensors(ckpt: Path, meta: dict, cfg) -> dict:
    """The model's weights under lmforge names, checked against `cfg`; a LoRA run: its base with the adapter merged."""
    from lmforge.hub.common import check_tensors
    from lmforge.train.checkpoint import load_model, load_tensors, model_tensors

    if "adapter" in meta:
        tensors = model_tensors(load_model(ckpt)[0].state_dict(), cfg.tie_embeddings)
    else:
        tensors = load_tensors(ckpt / "model.safetensors")
    check_tensors(cfg, tensors, ckpt / "model.safetensors")
    return tensors


def export_hf(source: str | Path, out: str | Path, dtype: str = "auto") -> dict:
    """Write the HF folder `out` atomically from a run/checkpoint folder; return a summary dict."""
    from safetensors.torch import save_file

    from lmforge.fileio import atomic_dir
    from lmforge.hub.common import DTYPE_NAMES, DTYPES, cast, check_out_dir, n_params
    from lmforge.hub.hf import generation_config, hf_config, hf_tensors, hf_tokenizer_files, unsupported_for_hf
    from lmforge.train.checkpoint import tokenizer_dir

    ckpt, meta, cfg = open_checkpoint(source)
    check_out_dir(out, ckpt, "config.json")
    if cfg.family != "decoder":
        return _export_family(ckpt, meta, cfg, out, dtype)
    bad = unsupported_for_hf(cfg)
    if bad is not None:
        raise LmforgeError(f"{ckpt}: {bad} cannot be exported to Hugging Face Llama/Qwen2")
    tensors = checkpoint_tensors(ckpt, meta, cfg)
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


def _export_family(ckpt: Path, meta: dict, cfg, out, dtype: str) -> dict:
    """An encoder (BERT, lmforge/hub/bert.py) or encoder-decoder (T5, lmforge/hub/t5.py) as a transformers folder."""
    from lmforge.fileio import atomic_dir
    from lmforge.hub.bert import write_hf_bert
    from lmforge.hub.common import DTYPE_NAMES, DTYPES, cast, n_params
    from lmforge.hub.t5 import write_hf_t5
    from lmforge.train.checkpoint import tokenizer_dir

    tensors = checkpoint_tensors(ckpt, meta, cfg)
    if dtype != "auto":
        tensors = cast(tensors, DTYPES[dtype])
    dtype_name = DTYPE_NAMES.get(tensors["embed_tokens.weight"].dtype, "float32")
    with atomic_dir(out) as tmp:
        if cfg.family == "encoder":
            arch = write_hf_bert(tmp, tensors, cfg, tokenizer_dir(ckpt, meta), dtype_name, meta.get("labels"))
        else:
            arch = write_hf_t5(tmp, tensors, cfg, tokenizer_dir(ckpt, meta), dtype_name)
    return {"architecture": arch, "params": n_params(tensors), "dtype": dtype_name, "from": str(ckpt), "out": str(out)}


def run(args) -> int:
    allowed = DTYPES_BY_FORMAT[args.format]
    dtype = args.dtype or allowed[0]
    if dtype not in allowed:
        raise LmforgeError(f"--dtype {dtype} does not fit --format {args.format} (choose from {', '.join(allowed)})")
    if args.modelfile and args.format != "gguf":
        raise LmforgeError("--modelfile goes with --format gguf (an Ollama Modelfile points at a GGUF file)")
    if args.format == "gguf":
        from lmforge.hub.gguf_export import export_gguf
        from lmforge.model.transformer import ModelConfig
        from lmforge.train.checkpoint import read_meta, resolve_checkpoint

        if ModelConfig.from_dict(read_meta(resolve_checkpoint(args.checkpoint))["model_config"]).family != "decoder":
            raise LmforgeError(f"{args.checkpoint}: not a decoder; GGUF export writes decoders (use --format hf)")

        s = export_gguf(args.checkpoint, args.out, dtype, modelfile=args.modelfile)
        extra = f" (+ {s['modelfile']})" if s["modelfile"] else ""
        print(
            f"exported GGUF llama: {s['params'] / 1e6:.1f}M params, {s['dtype']}, pre-tokenizer {s['pre']}, "
            f"{s['bytes'] / 1e6:.1f} MB, from {s['from']} -> {s['out']}{extra}"
        )
        return 0
    s = export_hf(args.checkpoint, args.out, dtype)
    print(
        f"exported {s['architecture']}: {s['params'] / 1e6:.1f}M params, {s['dtype']}, from {s['from']} -> {s['out']}"
    )
    return 0
