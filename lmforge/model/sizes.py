"""Model sizes: parameters by part and training FLOPs per token, for `lmforge params`, `bench`, the pretraining log
(MFU) and the scaling-law fits.

    lmforge params --preset gpt2-124m
"""

from __future__ import annotations

from torch import nn

from lmforge.model.transformer import GATED, ModelConfig


def param_part(name: str) -> str:
    """Which part a parameter belongs to: embedding, attention, mlp, norms or head."""
    if name.startswith(("embed_tokens", "embed_positions", "embed_block", "embed_types", "embed_proj")):
        return "embedding"
    if ".self_attn." in name and "_norm" not in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("lm_head", "head_", "pooler", "classifier")):  # an encoder's MLM head, pooler, classifier
        return "head"
    return "norms"


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters by part: embedding, attention, mlp, norms, head (0 when tied), total."""
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            parts[param_part(name)] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM appendix.

    6 * (non-embedding matmul params + head) + 12 * n_layer * d_model * seq_len for attention scores; with
    experts, the matmul parameters a token is active through (router and top-k experts, not all E).
    """
    T = seq_len or cfg.max_seq_len
    hd = cfg.head_dim
    attn = cfg.d_model * hd * (2 * cfg.n_head + 2 * cfg.n_kv_head)
    mlp = cfg.d_model * cfg.d_ff * (3 if cfg.mlp in GATED else 2)
    if cfg.n_experts:  # active parameters: the router and the k experts a token runs through
        mlp = cfg.experts_top_k * mlp + cfg.d_model * cfg.n_experts
    matmul_params = cfg.n_layer * (attn + mlp) + cfg.d_model * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.d_model * T
