"""BERT with Hugging Face: lmforge encoder names <-> transformers' BertForMaskedLM / BertForPreTraining /
BertForSequenceClassification, both ways.

    lmforge import hf/bert-folder --out models/bert          # config.json model_type "bert"
    lmforge export runs/bert-mini --format hf --out hf/bert   # BertForMaskedLM (or ...ForSequenceClassification)

Used by lmforge/hub/import_cmd.py and lmforge/hub/export_cmd.py. ALBERT (shared layers, factorized embedding)
and pre-norm or RoPE encoders have no BERT layout: export refuses them, naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.hub.common import Imported
from lmforge.model.transformer import GATED, ModelConfig

# lmforge name -> HF name, per layer ({i}) and for the rest. The MLM decoder's weight is the tied embedding.
LAYER_NAMES = {
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.o_proj": "attention.output.dense",
    "input_layernorm": "attention.output.LayerNorm",
    "mlp.up_proj": "intermediate.dense",
    "mlp.down_proj": "output.dense",
    "post_attention_layernorm": "output.LayerNorm",
}
TOP_NAMES = {
    "embed_tokens": "bert.embeddings.word_embeddings",
    "embed_positions": "bert.embeddings.position_embeddings",
    "embed_types": "bert.embeddings.token_type_embeddings",
    "embed_norm": "bert.embeddings.LayerNorm",
    "head_dense": "cls.predictions.transform.dense",
    "head_norm": "cls.predictions.transform.LayerNorm",
    "lm_head": "cls.predictions.decoder",
    "pooler": "bert.pooler.dense",
}
# The classifier on the pooled [CLS]: NSP in BertForPreTraining, the labels in BertForSequenceClassification.
CLASSIFIER = {"BertForPreTraining": "cls.seq_relationship", "BertForSequenceClassification": "classifier"}


def unsupported_for_bert(cfg: ModelConfig) -> str | None:
    """Why `cfg` has no BERT layout (a field=value), or None."""
    want = {"prenorm": False, "pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu_erf", "bias": True,
            "share_layers": False, "n_experts": 0, "qk_norm": False, "tie_embeddings": True}  # fmt: skip
    for name, value in want.items():
        if getattr(cfg, name) != value:
            return f"model.{name}={getattr(cfg, name)}"
    if cfg.embedding_size not in (0, cfg.d_model):
        return f"model.embedding_size={cfg.embedding_size} (ALBERT's factorized embedding)"
    if cfg.n_kv_head != cfg.n_head:
        return f"model.n_kv_head={cfg.n_kv_head}"
    return None


def _name_map(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """{lmforge parameter name: HF name} for every weight and bias `Encoder(cfg)` stores."""
    names = {}
    for ours, theirs in TOP_NAMES.items():
        for kind in ("weight", "bias"):
            names[f"{ours}.{kind}"] = f"{theirs}.{kind}"
    names["head_bias"] = "cls.predictions.bias"
    for i in range(cfg.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
    for kind in ("weight", "bias"):
        names[f"classifier.{kind}"] = f"{CLASSIFIER.get(arch, 'classifier')}.{kind}"
    return names


def expected_encoder_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of `Encoder(cfg)` holds (the tied head stored once)."""
    d, e, ff, V = cfg.d_model, cfg.embedding_size or cfg.d_model, cfg.d_ff, cfg.vocab_size
    # make_norm gives every norm a bias exactly when it is a LayerNorm and the config has biases.
    norm_bias = cfg.norm == "layernorm" and cfg.bias
    shapes = {
        "embed_tokens.weight": (V, e),
        "embed_norm.weight": (e,),
        **({"embed_norm.bias": (e,)} if norm_bias else {}),
    }
    if cfg.pos_encoding == "learned":
        shapes["embed_positions.weight"] = (cfg.max_seq_len, e)
    if cfg.type_vocab_size:
        shapes["embed_types.weight"] = (cfg.type_vocab_size, e)
    if e != d:
        shapes.update({"embed_proj.weight": (d, e), "embed_proj.bias": (d,)})
    hd = cfg.head_dim
    for i in range(1 if cfg.share_layers else cfg.n_layer):
        p = f"layers.{i}."
        rows = {"q_proj": cfg.n_head * hd, "k_proj": cfg.n_kv_head * hd, "v_proj": cfg.n_kv_head * hd}
        for name, n in rows.items():
            shapes[f"{p}self_attn.{name}.weight"] = (n, d)
            if cfg.bias or cfg.qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (n,)
        shapes[f"{p}self_attn.o_proj.weight"] = (d, cfg.n_head * hd)
        linears = {"mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
        if cfg.mlp in GATED:
            linears["mlp.gate_proj"] = (ff, d)
        for name, shape in linears.items():
            shapes[f"{p}{name}.weight"] = shape
        for name in ("self_attn.o_proj", *linears):
            if cfg.bias:
                shapes[f"{p}{name}.bias"] = (shapes[f"{p}{name}.weight"][0],)
        for name in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}{name}.weight"] = (d,)
            if norm_bias:
                shapes[f"{p}{name}.bias"] = (d,)
        if cfg.qk_norm:
            shapes[f"{p}self_attn.q_norm.weight"] = shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
    if cfg.prenorm:
        shapes["norm.weight"] = (d,)
        if norm_bias:
            shapes["norm.bias"] = (d,)
    shapes.update({"head_dense.weight": (e, d), "head_dense.bias": (e,), "head_norm.weight": (e,),
                   "head_bias": (V,)})  # fmt: skip
    if norm_bias:
        shapes["head_norm.bias"] = (e,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, e)
    if cfg.n_classes:
        shapes.update({"pooler.weight": (d, d), "pooler.bias": (d,), "classifier.weight": (cfg.n_classes, d),
                       "classifier.bias": (cfg.n_classes,)})  # fmt: skip
    return shapes


# ----------------------------------------------------------------------------- reading


def config_from_hf_bert(hf: dict, where: Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of a BERT config.json, or a one-line error naming what does not fit."""
    arch = (hf.get("architectures") or ["BertModel"])[0]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise LmforgeError(f"{where}: {key} is missing or not an integer")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise LmforgeError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (BERT's exact gelu is)")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError(f"{where}: position_embedding_type={hf['position_embedding_type']!r}: only absolute")
    n_classes = 0
    if arch == "BertForSequenceClassification":
        n_classes = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    elif arch == "BertForPreTraining":
        n_classes = 2
    cfg = ModelConfig(
        family="encoder", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=hf["hidden_size"],
        n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
        max_seq_len=int(hf.get("max_position_embeddings", 512)), pos_encoding="learned", norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)), mlp="gelu_erf", bias=True, prenorm=False,
        type_vocab_size=int(hf.get("type_vocab_size", 2)), dropout=float(hf.get("hidden_dropout_prob", 0.1)),
        tie_embeddings=True, n_classes=n_classes,
    )  # fmt: skip
    return cfg.validate(), arch


def read_bert_folder(folder: Path, hf: dict) -> Imported:
    """A transformers BERT folder (BertModel/ForMaskedLM/ForPreTraining/ForSequenceClassification) -> Imported.
    A BertModel without the MLM head gets a fresh one (said in the notes): fine-tuning does not read it."""
    from lmforge.hub.hf import read_hf_tensors

    cfg, arch = config_from_hf_bert(hf, folder / "config.json")
    raw = read_hf_tensors(folder, tied=False)
    raw = {(k if k.startswith(("bert.", "cls.", "classifier.")) else f"bert.{k}"): v for k, v in raw.items()}
    theirs_to_ours = {theirs: ours for ours, theirs in _name_map(cfg, arch).items()}
    tensors, notes = {}, []
    for name, value in raw.items():
        if name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue  # the tied embedding and cls.predictions.bias again
        if name.endswith("position_ids") or name not in theirs_to_ours:
            continue  # a buffer older checkpoints saved; a head lmforge does not hold
        tensors[theirs_to_ours[name]] = value
    want = expected_encoder_shapes(cfg)
    fresh = sorted(set(want) - set(tensors))
    if fresh and all(n.startswith(("head_", "pooler", "classifier")) for n in fresh):
        # BertModel has no MLM head: initialize it as BERT does (what BertForMaskedLM.from_pretrained would do).
        for n in fresh:
            shape = want[n]
            is_scale = n.startswith("head_norm.weight")
            init = torch.ones(shape) if is_scale else torch.zeros(shape)
            if n.endswith("weight") and not is_scale:
                init = torch.randn(shape) * 0.02
            tensors[n] = init
        notes.append(f"no {', '.join(sorted({n.split('.')[0] for n in fresh}))} in the checkpoint: initialized fresh")
    tok_files = read_bert_tokenizer(folder)
    source = {"kind": "hf", "path": str(folder.resolve()), "architecture": arch}
    return Imported(cfg, tensors, tok_files, source, notes)


def read_bert_tokenizer(folder: Path) -> dict[str, bytes]:
    """The fast tokenizer's files (tokenizer.json, and tokenizer_config.json / vocab.txt when present)."""
    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder / 'tokenizer.json'}: not found (lmforge needs the fast tokenizer file)")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


# ----------------------------------------------------------------------------- writing


def hf_bert_config(cfg: ModelConfig, dtype_name: str, labels: list[str] | None, pad_id: int | None) -> tuple[dict, str]:
    """(config.json for transformers, architecture): ForSequenceClassification when the model carries labels,
    ForPreTraining when it has an (NSP/SOP) classifier, else ForMaskedLM."""
    arch = (
        "BertForSequenceClassification" if labels
        else "BertForPreTraining" if cfg.n_classes
        else "BertForMaskedLM"
    )  # fmt: skip
    config = {
        "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size or 1,
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": pad_id or 0,
        "position_embedding_type": "absolute", "tie_word_embeddings": True, "torch_dtype": dtype_name,
    }  # fmt: skip
    if labels:
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
    return config, arch


def hf_bert_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """lmforge encoder tensors -> HF BERT names (the decoder's weight and bias written out: HF ties them on load)."""
    names = _name_map(cfg, arch)
    out = {names[k]: v.contiguous() for k, v in tensors.items()}
    if not cfg.type_vocab_size:  # HF always has a token-type table: one row of zeros adds nothing
        out["bert.embeddings.token_type_embeddings.weight"] = torch.zeros(
            1, cfg.d_model, dtype=out[names["embed_tokens.weight"]].dtype
        )
    if arch == "BertForSequenceClassification":  # transformers' class has no MLM head: leave it out
        out = {k: v for k, v in out.items() if not k.startswith("cls.")}
    else:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    return {k: v.clone() for k, v in out.items()}  # safetensors refuses tensors that share memory


def write_hf_bert(folder: Path, tensors: dict, cfg: ModelConfig, tok_dir: Path, dtype_name: str,
                  labels: list[str] | None) -> str:  # fmt: skip
    """Write model.safetensors, config.json and the tokenizer's files into `folder` (a temp dir); return the arch."""
    from safetensors.torch import save_file

    from lmforge.tokenizer.special import load_tokenizer

    bad = unsupported_for_bert(cfg)
    if bad is not None:
        raise LmforgeError(f"{bad} has no Hugging Face BERT layout; export supports BERT-shaped encoders")
    pad_id = load_tokenizer(tok_dir).token_to_id("[PAD]")
    config, arch = hf_bert_config(cfg, dtype_name, labels, pad_id)
    save_file(hf_bert_tensors(tensors, cfg, arch), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            (folder / name).write_bytes((tok_dir / name).read_bytes())
    return arch
