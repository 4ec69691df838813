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


PRESETS = {"tiny": tiny, "gpt2-124m": gpt2_124m, "llama-1b": llama_1b, "smollm2-135m": smollm2_135m}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
