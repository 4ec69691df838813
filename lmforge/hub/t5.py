"""T5 with Hugging Face: lmforge's encoder-decoder names <-> transformers' T5ForConditionalGeneration, both ways.

    lmforge import hf/t5-folder --out models/t5        # config.json model_type "t5" (v1.0 relu or v1.1 gated-gelu)
    lmforge export runs/t5-sft --format hf --out hf/t5

Used by lmforge/hub/hf.py (import) and lmforge/hub/export_cmd.py. The T5 block's layers are numbered in HF (layer.0 self-attention, layer.1
cross-attention or MLP, layer.2 the decoder's MLP); lmforge names them.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.hub.common import Imported
from lmforge.model.transformer import ModelConfig

ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def t5_name_map(cfg: ModelConfig) -> dict[str, str]:
    """{lmforge name: HF name} for every weight of T5(cfg) (the tied head stored once, as the shared embedding)."""
    mlp = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"} if cfg.mlp == "geglu" else {
        "wi": "up_proj", "wo": "down_proj"}  # fmt: skip
    names = {"embed_tokens.weight": "shared.weight",
             "encoder_bias.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder_bias.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder_norm.weight": "encoder.final_layer_norm.weight",
             "decoder_norm.weight": "decoder.final_layer_norm.weight"}  # fmt: skip
    for i in range(cfg.n_layer):
        p, h = f"encoder.{i}.", f"encoder.block.{i}.layer."
        names[p + "input_layernorm.weight"] = h + "0.layer_norm.weight"
        names[p + "post_attention_layernorm.weight"] = h + "1.layer_norm.weight"
        names.update({f"{p}self_attn.{o}.weight": f"{h}0.SelfAttention.{t}.weight" for t, o in ATTN.items()})
        names.update({f"{p}mlp.{o}.weight": f"{h}1.DenseReluDense.{t}.weight" for t, o in mlp.items()})
    for i in range(cfg.n_decoder_layer or cfg.n_layer):
        p, h = f"decoder.{i}.", f"decoder.block.{i}.layer."
        names[p + "input_layernorm.weight"] = h + "0.layer_norm.weight"
        names[p + "cross_layernorm.weight"] = h + "1.layer_norm.weight"
        names[p + "post_attention_layernorm.weight"] = h + "2.layer_norm.weight"
        names.update({f"{p}self_attn.{o}.weight": f"{h}0.SelfAttention.{t}.weight" for t, o in ATTN.items()})
        names.update({f"{p}cross_attn.{o}.weight": f"{h}1.EncDecAttention.{t}.weight" for t, o in ATTN.items()})
        names.update({f"{p}mlp.{o}.weight": f"{h}2.DenseReluDense.{t}.weight" for t, o in mlp.items()})
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def config_from_hf_t5(hf: dict, where: Path) -> ModelConfig:
    for key in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise LmforgeError(f"{where}: {key} is missing or not an integer")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise LmforgeError(f"{where}: feed_forward_proj={proj!r} is not supported (relu or gated-gelu)")
    if hf.get("d_kv", hf["d_model"] // hf["num_heads"]) * hf["num_heads"] != hf["d_model"]:
        raise LmforgeError(f"{where}: d_kv x num_heads != d_model, which lmforge's attention assumes")
    return ModelConfig(
        family="encoder-decoder", vocab_size=hf["vocab_size"], n_layer=hf["num_layers"], d_model=hf["d_model"],
        n_head=hf["num_heads"], d_ff=hf["d_ff"], n_decoder_layer=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        max_seq_len=int(hf.get("n_positions") or 512), pos_encoding="relative", norm="rmsnorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), mlp="geglu" if proj == "gated-gelu" else "relu",
        rel_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        rel_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        dropout=float(hf.get("dropout_rate", 0.1)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    ).validate()  # fmt: skip


def read_t5_folder(folder: Path, hf: dict) -> Imported:
    from lmforge.hub.bert import read_bert_tokenizer
    from lmforge.hub.hf import read_hf_tensors

    cfg = config_from_hf_t5(hf, folder / "config.json")
    raw = read_hf_tensors(folder, tied=False)
    raw = {("shared.weight" if k.endswith("embed_tokens.weight") and "shared.weight" not in raw else k): v
           for k, v in raw.items()}  # fmt: skip
    tensors = {ours: raw[theirs] for ours, theirs in t5_name_map(cfg).items() if theirs in raw}
    source = {"kind": "hf", "path": str(folder.resolve()), "architecture": "T5ForConditionalGeneration"}
    return Imported(cfg, tensors, read_bert_tokenizer(folder), source, [])


def write_hf_t5(folder: Path, tensors: dict, cfg: ModelConfig, tok_dir: Path, dtype_name: str) -> str:
    """Write model.safetensors, config.json (T5ForConditionalGeneration) and the tokenizer's files into `folder`."""
    import json

    from safetensors.torch import save_file

    from lmforge.tokenizer.special import document_end_id, load_tokenizer, pad_id

    tok = load_tokenizer(tok_dir)
    pad = pad_id(tok)
    out = {theirs: tensors[ours].contiguous() for ours, theirs in t5_name_map(cfg).items()}
    for stack in ("encoder", "decoder"):  # transformers keeps a reference to the shared table in each stack
        out[f"{stack}.embed_tokens.weight"] = out["shared.weight"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    save_file({k: v.clone() for k, v in out.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.n_layer,
        "num_decoder_layers": cfg.n_decoder_layer or cfg.n_layer, "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.rel_buckets, "relative_attention_max_distance": cfg.rel_max_distance,
        "dropout_rate": cfg.dropout, "layer_norm_epsilon": cfg.norm_eps, "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu" if cfg.mlp == "geglu" else "relu", "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": pad, "decoder_start_token_id": pad,
        "eos_token_id": document_end_id(tok), "torch_dtype": dtype_name,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            (folder / name).write_bytes((tok_dir / name).read_bytes())
    return "T5ForConditionalGeneration"
