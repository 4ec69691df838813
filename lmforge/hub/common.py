"""What the importers hand to `lmforge import` and the checks every import and export shares.

Used by `lmforge import` (lmforge/hub/import_cmd.py) and `lmforge export` (lmforge/hub/export_cmd.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.model.transformer import GATED, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES[torch.float16] = "float16"

# Tokens that end a chat turn in the common templates (ChatML, Llama 3, Phi-3). A chat model's EOS is its
# turn end: generation must stop there, not at the end-of-document token the base model was trained with.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


@dataclass
class Imported:
    """A model read from outside, ready to be written as an lmforge checkpoint folder."""

    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]  # lmforge names; the tied head stored once (as embed_tokens.weight)
    tokenizer_files: dict[str, bytes]  # file name -> content, written into DIR/tokenizer/
    source: dict  # {"kind": "hf" | "gguf", "path": ..., "architecture": ...}
    notes: list[str] = field(default_factory=list)  # said in the summary line (e.g. a capped context)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of `Transformer(cfg)` as stored in a checkpoint, for the configs HF can hold.

    Written out rather than read off a model built on the meta device: that costs seconds (it pulls in
    torch._dynamo) and the Llama layout is short. tests/test_hub.py checks it against `Transformer`.
    """
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.d_ff
    shapes = {"embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for name, rows in (("q", cfg.n_head * hd), ("k", cfg.n_kv_head * hd), ("v", cfg.n_kv_head * hd)):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, d)
            if cfg.qkv_bias:
                shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.n_head * hd)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if cfg.n_experts:  # a mixture of experts: the router and the experts' stacked matrices (transformer.MoE)
            E = cfg.n_experts
            shapes[p + "mlp.gate.weight"] = (E, d)
            if cfg.mlp in GATED:
                shapes[p + "mlp.gate_proj"] = (E, ff, d)
            shapes[p + "mlp.up_proj"] = (E, ff, d)
            shapes[p + "mlp.down_proj"] = (E, d, ff)
            continue
        shapes[p + "mlp.gate_proj.weight"] = (ff, d)
        shapes[p + "mlp.up_proj.weight"] = (ff, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ff)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where) -> None:
    """Raise a one-line LmforgeError unless `tensors` are exactly the weights `Transformer(cfg)` (or, for an encoder,
    `Encoder(cfg)`) wants."""
    if cfg.family == "encoder":
        from lmforge.hub.bert import expected_encoder_shapes

        want = expected_encoder_shapes(cfg)
    elif cfg.family == "encoder-decoder":
        from lmforge.model.t5 import T5

        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in T5(cfg).state_dict().items()
                    if not (cfg.tie_embeddings and k == "lm_head.weight")}  # fmt: skip
    else:
        want = expected_shapes(cfg)
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing:
        raise LmforgeError(f"{where}: weight {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise LmforgeError(f"{where}: unexpected weight {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise LmforgeError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the config implies {shape}")
        if not tensors[name].is_floating_point():
            raise LmforgeError(f"{where}: {name} has dtype {tensors[name].dtype}, expected floating point")


def n_params(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def check_out_dir(out, source, marker: str) -> None:
    """Refuse to replace SOURCE or a non-empty folder that is not an earlier output (`marker` file missing).

    The output is written under a temporary name and swapped in whole, so a wrong --out would
    otherwise delete whatever folder it names.
    """
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or out in source.parents:
        raise LmforgeError(f"--out {out} would replace the source {source}; pick another folder")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / marker).is_file()):
        raise LmforgeError(f"--out {out} exists and is not an earlier output (no {marker}); refusing to replace it")
