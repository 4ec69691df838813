"""The decoder-only Transformer: one file, read it top to bottom.

    from lmforge.model import ModelConfig, Transformer, preset
    model = Transformer(preset("tiny"))
    logits, _ = model(idx)                 # (B, T, vocab)
    _, loss = model(idx, targets)          # training: the loss, without materializing logits

Architecture variants are config fields, not subclasses:
positional encoding (RoPE, sinusoidal, learned, ALiBi), norm (RMSNorm,
LayerNorm; always pre-norm), MLP (SwiGLU, GELU; dense or a mixture of top-k routed
experts through `n_experts`), heads (MHA, GQA, MQA through `n_kv_head`), tied or untied
embeddings, optional QK-norm.

Parameter names follow Hugging Face's Llama (`embed_tokens`, `layers.N.self_attn.q_proj`,
`layers.N.mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), without the leading
`model.`, so a Llama checkpoint maps onto this model one to one. RoPE uses the
rotate-half convention that HF checkpoints are stored in. The linear layers are
`lmforge.model.matmul.Linear`: an nn.Linear whose products run through oneDNN on CPU in fp32
(~2x MKL's speed on AMD CPUs; same parameters, same math).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.losses import IGNORE_INDEX, linear_cross_entropy
from lmforge.model.masks import alibi_slopes, attention_mask
from lmforge.model.matmul import Linear

POS_ENCODINGS = ("rope", "sinusoidal", "learned", "alibi")
NORMS = ("rmsnorm", "layernorm")
# The MLP's activation on its input projections, (gate or None, up) -> hidden: what an `mlp` choice means.
# The training forward and generation's fused decode step (lmforge/serve/generate.py) both read it from here.
ACTIVATIONS = {
    "swiglu": lambda gate, up: F.silu(gate) * up,
    "gelu": lambda gate, up: F.gelu(up, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_erf": lambda gate, up: F.gelu(up),  # the exact GELU (BERT)
    "relu": lambda gate, up: F.relu(up),  # T5 v1.0
    "geglu": lambda gate, up: F.gelu(gate, approximate="tanh") * up,  # T5 v1.1's gated GELU
}
GATED = ("swiglu", "geglu")  # activations that read a gate projection besides the up projection
FAMILIES = ("decoder", "encoder", "encoder-decoder")
RELATIVE = "relative"  # T5's bucketed relative position bias: an encoder-decoder's position encoding
MLPS = tuple(ACTIVATIONS)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192  # rows of the embedding (a multiple of 64 is faster); pretrain: from the data unless set
    n_layer: int = 4  # Transformer blocks
    d_model: int = 256  # width of the residual stream
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), 1 = MQA, between = GQA
    d_ff: int | None = None  # MLP hidden width; None = 4*d (gelu) or 8/3*d rounded up to 64 (swiglu)
    max_seq_len: int = 256  # longest sequence (sizes RoPE/learned tables and the KV cache)
    pos_encoding: str = "rope"  # one of rope, sinusoidal, learned, alibi
    rope_theta: float = 10000.0  # RoPE base frequency
    norm: str = "rmsnorm"  # rmsnorm or layernorm
    norm_eps: float = 1e-5  # epsilon of the norms (and QK-norm)
    mlp: str = "swiglu"  # swiglu or geglu (gated), gelu (tanh approximation), gelu_erf (exact), relu
    tie_embeddings: bool = True  # share the input embedding with the output head
    qk_norm: bool = False  # RMS-normalize queries and keys per head before attention
    bias: bool = False  # biases in linear layers (GPT-2 style)
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2 style); implied by `bias`
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches (training only)
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    # Mixture of experts: 0 = a dense MLP; E > 0 = every block's MLP is E experts of width d_ff, each token routed to
    # the experts_top_k best (Mixtral, Qwen-MoE); moe_aux_coef weighs the load-balancing loss added in training
    n_experts: int = 0
    experts_top_k: int = 2  # experts each token runs through (with n_experts > 0)
    moe_aux_coef: float = 0.01  # Switch Transformer's balance loss E * sum_e f_e * P_e; its minimum 1 is at balance
    # GLM's 2D positions (Du et al. 2022): a second learned table for each token's place inside its blank (0 outside
    # blanks), added to the learned position of the blank itself; trained by `pretrain --objective glm`
    block_positions: bool = False
    # The family: decoder (causal attention, next-token loss: this file's Transformer) or encoder (bidirectional
    # attention, masked-token loss: lmforge/model/encoder.py, BERT/RoBERTa/ALBERT). The fields below are the encoder's.
    family: str = "decoder"
    prenorm: bool = True  # norm before each sublayer (GPT-2, Llama); false: after the residual sum (BERT; encoders)
    type_vocab_size: int = 0  # encoder: token-type (segment A/B) embeddings, 2 in BERT; 0 = none
    embedding_size: int = 0  # encoder: ALBERT's factorized embedding width E < d_model, projected up; 0 = d_model
    share_layers: bool = False  # encoder: every layer runs one block's weights (ALBERT's cross-layer sharing)
    n_classes: int = 0  # encoder: a classifier on the pooled first ([CLS]) vector: 2 for NSP/SOP, finetune-cls's labels
    # encoder-decoder (T5, lmforge/model/t5.py): decoder blocks (0 = n_layer) and the relative position buckets
    n_decoder_layer: int = 0
    rel_buckets: int = 32  # encoder-decoder: buckets of T5's relative position bias (half exact, half log-spaced)
    rel_max_distance: int = 128  # encoder-decoder: distances from here on share the last bucket

    def __post_init__(self):  # frozen: the derived widths are filled in once, here
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_ff is None:
            d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64) if self.mlp in GATED else 4 * self.d_model
            object.__setattr__(self, "d_ff", d_ff)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> ModelConfig:
        """Raise LmforgeError naming the first field that does not fit with the others."""
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise LmforgeError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        positions = (RELATIVE,) if self.family == "encoder-decoder" else POS_ENCODINGS
        choices = {"pos_encoding": positions, "norm": NORMS, "mlp": MLPS, "family": FAMILIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise LmforgeError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise LmforgeError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise LmforgeError(f"model.pos_encoding=rope needs an even head dim, got {self.head_dim}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise LmforgeError(f"model.pos_encoding=sinusoidal needs an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.experts_top_k <= self.n_experts):
            raise LmforgeError(f"model.experts_top_k must be in [1, n_experts={self.n_experts}] and n_experts >= 0, "
                               f"got n_experts={self.n_experts}, experts_top_k={self.experts_top_k}")  # fmt: skip
        if self.block_positions and (self.pos_encoding != "learned" or self.family != "decoder"):
            raise LmforgeError("model.block_positions (GLM's 2D positions) needs a decoder with pos_encoding=learned")
        if self.moe_aux_coef < 0:
            raise LmforgeError(f"model.moe_aux_coef must be >= 0, got {self.moe_aux_coef}")
        for name in ("type_vocab_size", "embedding_size", "n_classes"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.family == "decoder":  # what only lmforge/model/encoder.py builds
            unsupported = [
                f"{name}={getattr(self, name)}" for name, off in ENCODER_ONLY.items() if getattr(self, name) != off
            ]
            if unsupported:
                raise LmforgeError(f"model.{unsupported[0]} is an encoder field (model.family=encoder); "
                                   "the decoder has none of them")  # fmt: skip
        elif self.n_experts or self.pos_encoding == "alibi":
            raise LmforgeError(f"model.family={self.family} supports neither n_experts nor pos_encoding=alibi")
        if self.family != "encoder-decoder" and (
            self.n_decoder_layer or (self.rel_buckets, self.rel_max_distance) != (32, 128)
        ):
            raise LmforgeError(
                "model.n_decoder_layer, rel_buckets and rel_max_distance are encoder-decoder (T5) fields"
            )
        if self.rel_buckets < 2 or self.rel_max_distance < self.rel_buckets // 2 or self.n_decoder_layer < 0:
            raise LmforgeError(
                "model.rel_buckets must be >= 2, rel_max_distance >= rel_buckets / 2, n_decoder_layer >= 0"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LmforgeError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d).validate()


# Encoder-only fields and the value that leaves them off (what a decoder config must hold).
ENCODER_ONLY = {
    "prenorm": True,
    "type_vocab_size": 0,
    "embedding_size": 0,
    "share_layers": False,
    "n_classes": 0,
    "n_decoder_layer": 0,
}


# ----------------------------------------------------------------------------- small functions


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (max_seq_len, head_dim), rotate-half layout (as HF Llama): the sin table has
    rotate-half's minus sign folded into its first half, so `apply_rope` needs no negation."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the angles of cos / signed sin, shaped (T, 1, D) or (B, T, 1, D).

    x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] written as roll(x) * [-sin, sin]: the same
    numbers bit for bit (a sign flip is exact), in one copy instead of a negation and a concatenation.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def sinusoidal_table(n_pos: int, d: int) -> torch.Tensor:
    """The fixed position table of "Attention Is All You Need" (sin on even dims, cos on odd)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    table = torch.zeros(n_pos, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table.float()


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Preallocated keys and values for every layer: generation writes in place, never concatenates.

    `k[layer]` has shape (batch, n_kv_head, max_len, head_dim). `length` is how many
    positions are filled; the model advances it after each forward.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SharedPrefix:
    """Keys and values of prompts that several training rows continue (GRPO's group of answers): the prompts run
    once, then each row's attention reads its own prompt's keys (`owner[row]`) ahead of its own.

    Unlike KVCache nothing is written in place: gradients flow back into the prompts' pass, and a block reading
    the prefix is a pure function that activation checkpointing can recompute. Built by Transformer.forward(prefix=).
    """

    def __init__(self, owner: torch.Tensor):
        self.owner, self.k, self.v, self.length, self.recording = owner, {}, {}, 0, True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.k[layer], self.v[layer] = k, v
            return k, v
        prefix_k, prefix_v = self.k[layer].index_select(0, self.owner), self.v[layer].index_select(0, self.owner)
        return torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2)


# ----------------------------------------------------------------------------- modules


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.causal = cfg.family == "decoder"  # an encoder's tokens see both ways
        # T5 does not scale its scores by 1/sqrt(head_dim) (its init absorbs it; Raffel et al. 2020, Mesh TF)
        self.scale = 1.0 if cfg.family == "encoder-decoder" else None
        hd = cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = Linear(cfg.d_model, cfg.n_head * hd, bias=qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_head * hd, bias=qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_head * hd, bias=qkv_bias)
        self.o_proj = Linear(cfg.n_head * hd, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)

    def forward(self, x, rope, mask, cache: KVCache | None):
        B, T, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        # Norm and RoPE work on the contiguous (B, T, H, D) layout (elementwise ops on the
        # transposed view run several times slower on CPU); attention wants (B, H, T, D).
        q = self.q_proj(x).view(B, T, cfg.n_head, hd)
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, hd)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, hd).transpose(1, 2)
        q, k = self.rotate(q, k, rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        dropout = cfg.dropout if self.training else 0.0
        gqa = cfg.n_kv_head != cfg.n_head
        if mask is None:
            # Training or a fresh prefill: plain causal attention (flash kernels on GPU). A one-token
            # decode step sees every cached key, so it needs no mask at all (is_causal would align
            # the mask top-left and hide them).
            causal = self.causal and q.shape[2] > 1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa,
                                               scale=self.scale)  # fmt: skip
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * hd))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (..., heads, head_dim) as attention reads them: per-head RMS norm (qk_norm), then RoPE."""
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp in GATED  # a gate projection (SwiGLU, GeGLU)
        self.act = ACTIVATIONS[cfg.mlp]
        if self.swiglu:
            self.gate_proj = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    @property
    def in_projs(self) -> list[nn.Module]:
        """The projections of the input the activation reads: (gate, up) or (up,)."""
        return [self.gate_proj, self.up_proj] if self.swiglu else [self.up_proj]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x) if self.swiglu else None, self.up_proj(x)))


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of N tokens over E experts from the router's logits (N, E): (weights (N, k) summing to 1 per
    token (the softmax over all experts, renormalized over the k chosen, as Mixtral and Qwen-MoE do), experts
    (N, k), the load-balancing loss). The loss is Switch Transformer's E * sum_e f_e * P_e (Fedus et al. 2021),
    f_e the share of the N * k assignments that went to expert e and P_e its mean routing probability: 1 when
    both are uniform, up to E when one expert takes everything; only P carries a gradient."""
    probs = logits.float().softmax(-1)
    weights, experts = probs.topk(k, dim=-1)
    n_experts = logits.shape[-1]
    share = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / experts.numel()
    balance = n_experts * (share * probs.mean(0)).sum()
    return weights / weights.sum(-1, keepdim=True), experts, balance


class MoE(nn.Module):
    """A mixture of experts in place of the MLP: a router (`gate`) picks each token's top-k experts and their
    outputs are mixed by the routing weights.

    The experts' weights are stacked, (E, d_ff, d) and (E, d, d_ff), and run as batched matrix products: the
    token-expert assignments are sorted by expert into an (E, C, d) buffer, C the largest expert's count (the
    others padded with zeros), so the work is three `bmm`s whatever E is, never a Python loop over experts, and
    no token is dropped. The balance loss of the last training forward is left in `aux_loss` for the model to add.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, ff = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.k, self.swiglu, self.act = cfg.experts_top_k, cfg.mlp in GATED, ACTIVATIONS[cfg.mlp]
        self.gate = Linear(d, E, bias=False)
        if self.swiglu:
            self.gate_proj = nn.Parameter(torch.empty(E, ff, d))
        self.up_proj = nn.Parameter(torch.empty(E, ff, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, ff))
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x):
        shape, d = x.shape, x.shape[-1]
        flat = x.reshape(-1, d)
        weights, experts, balance = route(self.gate(flat), self.k)
        self.aux_loss = balance if self.training else None
        # Sort the N * k assignments by expert; each gets a row (its slot) in its expert's part of the buffer.
        expert_of = experts.flatten()
        order = expert_of.argsort(stable=True)
        counts = torch.bincount(expert_of, minlength=self.up_proj.shape[0])
        sorted_expert = expert_of[order]
        slot = torch.arange(len(order), device=x.device) - (counts.cumsum(0) - counts)[sorted_expert]
        token = order // self.k
        buf = flat.new_zeros(self.up_proj.shape[0], int(counts.max()), d)
        buf[sorted_expert, slot] = flat[token]
        gate = torch.bmm(buf, self.gate_proj.to(buf.dtype).transpose(1, 2)) if self.swiglu else None
        hidden = self.act(gate, torch.bmm(buf, self.up_proj.to(buf.dtype).transpose(1, 2)))
        out = torch.bmm(hidden, self.down_proj.to(buf.dtype).transpose(1, 2))[sorted_expert, slot]
        out = out * weights.flatten()[order, None].to(out.dtype)
        return flat.new_zeros(flat.shape).index_add_(0, token, out.to(flat.dtype)).view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.prenorm = cfg.prenorm

    def forward(self, x, rope, mask, cache):
        if not self.prenorm:  # post-norm (BERT, "Attention Is All You Need"): each norm after its residual sum
            x = self.input_layernorm(x + self.drop(self.self_attn(x, rope, mask, cache)))
            return self.post_attention_layernorm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.family != "decoder":
            raise LmforgeError(f"this model is an {cfg.family} (model.family={cfg.family}): it does not generate text "
                               "here; fine-tune an encoder with `lmforge finetune-cls`, export it with `lmforge export "
                               "--format hf`")  # fmt: skip
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.block_positions:
            self.embed_block_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Fixed tables are buffers (moved with .to(), never saved: persistent=False).
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        elif cfg.pos_encoding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_head), persistent=False)
        # Recompute each block's activations in the backward pass instead of keeping them (the training loop sets
        # it from `activation_checkpointing`): memory for ~1/3 more compute.
        self.checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the residual output projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("mlp.gate_proj", "mlp.up_proj")):  # stacked experts: what _init_weights gives a Linear
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)
            if name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down_proj")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def position_table(self) -> torch.Tensor | None:
        """The table of position vectors added to the token embeddings (learned, sinusoidal), or None (RoPE and
        ALiBi act inside attention)."""
        if self.cfg.pos_encoding == "learned":
            return self.embed_positions.weight
        return self.pos_table if self.cfg.pos_encoding == "sinusoidal" else None

    def _positions(self, B, T, start, positions):
        if positions is None:
            return torch.arange(start, start + T, device=self.norm.weight.device).expand(B, T)
        return positions

    def _attn_mask(self, B, T, start, key_mask, doc_ids, device, dtype, prefix_len=None, attn_mask=None,
                   positions=None):  # fmt: skip
        """attention_mask (lmforge/model/masks.py) with this model's ALiBi slopes, if it uses ALiBi."""
        slopes = self.alibi_slopes.to(device=device, dtype=dtype) if self.cfg.pos_encoding == "alibi" else None
        return attention_mask(T, start, device, key_mask=key_mask, doc_ids=doc_ids, prefix_len=prefix_len,
                              attn_mask=attn_mask, positions=positions, alibi_slopes=slopes)  # fmt: skip

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        return_hidden: bool = False,
        prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        block_positions: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ):
        """idx (B, T) token ids -> (logits (B, T, V), None), or (None, loss) when targets are given.

        targets (B, T): next-token ids, -100 where no loss is taken. cache: a KVCache
        to read and extend (generation). positions (B, T): position ids (left-padded
        batches, or restarting at 0 for each packed document); key_mask (B, cache length + T):
        True at real tokens; doc_ids (B, T): packed documents, no attention across them.
        return_hidden: (final hidden states (B, T, d), None) instead of logits (reward and value heads).
        prefix: (prompts (N, P) right-padded, their lengths (N,), owner (B,)): row b of idx continues prompt
        owner[b], which runs once for all the rows that continue it (SharedPrefix; rows built by
        lmforge/align/batching.py collate_shared). The same outputs as each row run with its prompt in front.
        block_positions (B, T), prefix_len (B,): GLM's blank infilling (lmforge/train/glm.py): each token's place
        inside its blank, and the length of part A, which every token attends to both ways.
        attn_mask (B, T, T) bool, without a cache: which tokens each token attends to, in place of the causal mask;
        with `positions` the row may be longer than max_seq_len (several continuations packed after one context
        each at its own positions: lmforge/eval/scoring.py).
        """
        if prefix is not None:
            cache, positions, key_mask = self._run_prefix(idx, *prefix)
        B, T = idx.shape
        start = cache.length if cache is not None else 0  # a (B,) tensor for the serving engine's slots
        end = (int(start.max()) if isinstance(start, torch.Tensor) else start) + T
        if attn_mask is not None and (cache is not None or attn_mask.shape != (B, T, T)):
            raise ValueError(f"attn_mask must be (B, T, T) = {(B, T, T)} without a cache")
        if attn_mask is not None and positions is not None:  # the positions index the tables, not the slots
            end = int(positions.max()) + 1
        if end > self.cfg.max_seq_len and not isinstance(cache, SharedPrefix):  # its positions are each row's own
            raise ValueError(f"sequence length {end} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(idx)
        rope, table = None, self.position_table()
        if table is not None:
            x = x + table[self._positions(B, T, start, positions)]
        if self.cfg.block_positions:  # outside blanks (plain text) every token is at block position 0
            x = x + (self.embed_block_positions(block_positions) if block_positions is not None
                     else self.embed_block_positions.weight[0])  # fmt: skip
        elif self.cfg.pos_encoding == "rope":
            if positions is None:
                rope = (self.rope_cos[start : start + T, None], self.rope_sin[start : start + T, None])
            else:
                rope = (self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None])
        x = self.drop(x)
        mask = self._attn_mask(B, T, start, key_mask, doc_ids, x.device, x.dtype, prefix_len, attn_mask, positions)
        # Also in eval mode (DPO, GRPO). A KVCache is written in place, so no recomputing; a read SharedPrefix is fine.
        pure = cache is None or (isinstance(cache, SharedPrefix) and not cache.recording)
        recompute = self.checkpointing and pure and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:  # non-reentrant: works with frozen weights (LoRA), DDP/FSDP and torch.compile
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if cache is not None:
            cache.length += T
        if return_hidden:
            return x, None
        if targets is None:
            return self.lm_head(x), None
        # Training never materializes the (tokens x vocab) logits: the head and the loss run in chunks.
        loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1), loss_reduction)
        if self.cfg.n_experts and self.training and self.cfg.moe_aux_coef:
            # The blocks' mean balance loss, per token as the loss is (a summed loss gets it once per counted token).
            balance = torch.stack([block.mlp.aux_loss for block in self.layers]).mean().to(loss.dtype)
            per = 1 if loss_reduction == "mean" else (targets != IGNORE_INDEX).sum()
            loss = loss + self.cfg.moe_aux_coef * balance * per
        return None, loss

    def _run_prefix(self, idx, prompts, prompt_len, owner):
        """Run the shared prompts into a SharedPrefix; return what the continuation rows idx run with: (the
        prefix as their cache, their positions (each row counts on from its prompt's length), their key mask
        (the prompt's padding hidden))."""
        if self.cfg.pos_encoding == "alibi":  # its bias reads distances off the padded layout
            raise ValueError("a shared prefix does not support ALiBi; run full rows")
        shared = SharedPrefix(owner)
        self(prompts, cache=shared, return_hidden=True)
        shared.recording = False
        B, T = idx.shape
        row_len = prompt_len.index_select(0, owner)[:, None]
        # Padding past a row's end may count past the position tables; no real token reads it.
        positions = (row_len + torch.arange(T, device=idx.device)).clamp(max=self.cfg.max_seq_len - 1)
        prompt_keys = torch.arange(prompts.shape[1], device=idx.device) < row_len
        key_mask = torch.cat([prompt_keys, torch.ones(B, T, dtype=torch.bool, device=idx.device)], 1)
        return shared, positions, key_mask
