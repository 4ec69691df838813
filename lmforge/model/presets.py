"""Model presets: plain functions returning a ModelConfig (`--preset NAME`).

lmforge params --preset gpt2-124m
"""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig


def tiny() -> ModelConfig:
    """About 5M parameters: the CPU demo (trains on Shakespeare in minutes on 2 cores)."""
    return ModelConfig(vocab_size=8192, n_layer=4, d_model=256, n_head=4, max_seq_len=256)


def gpt2_124m() -> ModelConfig:
    """GPT-2 small's shape (vocab padded to 50304 as nanoGPT does, for fast matmuls)."""
    return ModelConfig(
        vocab_size=50304, n_layer=12, d_model=768, n_head=12, max_seq_len=1024,
        pos_encoding="learned", norm="layernorm", mlp="gelu", tie_embeddings=True,
    )  # fmt: skip


def llama_1b() -> ModelConfig:
    """Llama 3.2 1B's shape: GQA 32/8 heads, SwiGLU 8192, RoPE theta 500k, tied embeddings."""
    return ModelConfig(
        vocab_size=128256, n_layer=16, d_model=2048, n_head=32, n_kv_head=8, d_ff=8192,
        max_seq_len=2048, rope_theta=500000.0, tie_embeddings=True,
    )  # fmt: skip


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M's shape (the real model `lmforge import` loads): 30 layers, 9/3 heads."""
    return ModelConfig(
        vocab_size=49152, n_layer=30, d_model=576, n_head=9, n_kv_head=3, d_ff=1536,
        max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True,
    )  # fmt: skip


def _bert(**shape) -> ModelConfig:
    """BERT's architecture (Devlin et al. 2019): post-norm LayerNorm blocks with biases, exact GELU, learned
    positions, two token types, dropout 0.1, the MLM head tied to the embedding; vocabulary from the data."""
    return ModelConfig(
        family="encoder", vocab_size=30522, max_seq_len=512, pos_encoding="learned", norm="layernorm", norm_eps=1e-12,
        mlp="gelu_erf", bias=True, prenorm=False, type_vocab_size=2, dropout=0.1, tie_embeddings=True, **shape,
    )  # fmt: skip


def bert_mini() -> ModelConfig:
    """BERT-mini (Turc et al. 2019, "Well-Read Students Learn Better"): 4 layers, 256 wide, 4 heads; ~11M params
    with BERT's 30k vocabulary. Pretrains on a CPU in minutes."""
    return _bert(n_layer=4, d_model=256, n_head=4)


def bert_base() -> ModelConfig:
    """BERT-base: 12 layers, 768 wide, 12 heads (110M parameters with the 30k vocabulary)."""
    return _bert(n_layer=12, d_model=768, n_head=12)


def albert_base() -> ModelConfig:
    """ALBERT-base (Lan et al. 2020): BERT-base's shape with a 128-wide factorized embedding and one block's weights
    shared by all 12 layers (12M parameters instead of 110M)."""
    return _bert(n_layer=12, d_model=768, n_head=12, embedding_size=128, share_layers=True)


def _t5(**shape) -> ModelConfig:
    """T5 v1.0's architecture (Raffel et al. 2020): pre-norm RMSNorm blocks without biases, ReLU MLP, relative
    position bias (32 buckets up to 128), no attention scaling, shared embedding and tied head, dropout 0.1."""
    return ModelConfig(
        family="encoder-decoder", vocab_size=32128, max_seq_len=512, pos_encoding="relative", norm="rmsnorm",
        norm_eps=1e-6, mlp="relu", dropout=0.1, tie_embeddings=True, **shape,
    )  # fmt: skip


def t5_mini() -> ModelConfig:
    """A small T5 for CPU runs: 4 encoder and 4 decoder layers, 256 wide, 4 heads, MLP 1024."""
    return _t5(n_layer=4, d_model=256, n_head=4, d_ff=1024)


def t5_small() -> ModelConfig:
    """T5-small (t5-small on the Hub): 6 + 6 layers, 512 wide, 8 heads, MLP 2048 (60M parameters)."""
    return _t5(n_layer=6, d_model=512, n_head=8, d_ff=2048)


PRESETS = {
    "tiny": tiny, "gpt2-124m": gpt2_124m, "llama-1b": llama_1b, "smollm2-135m": smollm2_135m,
    "bert-mini": bert_mini, "bert-base": bert_base, "albert-base": albert_base, "t5-mini": t5_mini,
    "t5-small": t5_small,
}  # fmt: skip


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
