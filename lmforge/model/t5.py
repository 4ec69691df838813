"""The encoder-decoder Transformer (T5): the encoder reads the input both ways, the decoder writes the output
token by token, attending to itself (causally) and to the encoder's states.

    from lmforge.model.t5 import T5
    model = T5(cfg)                                    # cfg.family == "encoder-decoder" (lmforge/model/presets.py)
    logits, _ = model(src, tgt_in)                     # (B, T, vocab)
    _, loss = model(src, tgt_in, targets)              # targets: the output, -100 where no loss is taken
    out = model.generate(src, max_new_tokens=32)       # greedy: the encoder once, the decoder with caches

T5 (Raffel et al. 2020) on the decoder's own parts (lmforge/model/transformer.py): the encoder's blocks are
`Block`s (pre-norm RMSNorm, the MLP, `Attention` without the 1/sqrt(d) scaling T5 does not use); a decoder block
adds cross-attention between its self-attention and MLP. Positions are T5's relative position bias: a learned
scalar per head for each bucket of the distance key - query (`relative_buckets`: exact below half the buckets,
log-spaced up to `rel_max_distance`), one table for the encoder (both directions) and one for the decoder
(backwards only), computed once and added in every layer. The embedding is shared by encoder, decoder and (tied)
head, which then reads the decoder's output scaled by d_model^-0.5, as T5 does. Parameter names map onto
transformers' T5ForConditionalGeneration in lmforge/hub/t5.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.losses import IGNORE_INDEX
from lmforge.model.matmul import Linear
from lmforge.model.transformer import MLP, Attention, Block, KVCache, ModelConfig, make_norm


def relative_buckets(distance: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative distance (key position - query position): the first half of a direction's
    buckets exact (0, 1, 2, ...), the rest log-spaced up to max_distance, beyond which all share the last. A
    decoder (not bidirectional) sees only keys at or before the query."""
    out = torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        out = out + (distance > 0).long() * buckets
        distance = distance.abs()
    else:
        distance = -distance.clamp(max=0)
    exact = buckets // 2
    log_part = (
        exact
        + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    return out + torch.where(distance < exact, distance, log_part.clamp(max=buckets - 1))


class CrossAttention(nn.Module):
    """The decoder's attention to the encoder's states: queries from the decoder, keys and values from the
    encoder (computed once per input: `memory`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_head * cfg.head_dim
        self.q_proj, self.k_proj = Linear(cfg.d_model, inner, bias=False), Linear(cfg.d_model, inner, bias=False)
        self.v_proj, self.o_proj = Linear(cfg.d_model, inner, bias=False), Linear(inner, cfg.d_model, bias=False)

    def memory(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = enc.shape
        shape = (B, S, self.cfg.n_head, self.cfg.head_dim)
        return self.k_proj(enc).view(shape).transpose(1, 2), self.v_proj(enc).view(shape).transpose(1, 2)

    def forward(self, x, kv, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)
        dropout = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, dropout_p=dropout, scale=1.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm, self.self_attn = make_norm(cfg, cfg.d_model), Attention(cfg, layer)
        self.cross_layernorm, self.cross_attn = make_norm(cfg, cfg.d_model), CrossAttention(cfg)
        self.post_attention_layernorm, self.mlp = make_norm(cfg, cfg.d_model), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, bias, kv, cross_mask, cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), None, bias, cache))
        x = x + self.drop(self.cross_attn(self.cross_layernorm(x), kv, cross_mask))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class T5(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.family != "encoder-decoder":
            raise LmforgeError(f"model.family is {cfg.family!r}: T5 needs family=encoder-decoder (a t5 preset)")
        self.n_dec = cfg.n_decoder_layer or cfg.n_layer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        self.decoder_bias = nn.Embedding(cfg.rel_buckets, cfg.n_head)
        self.encoder = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.encoder_norm = make_norm(cfg, cfg.d_model)
        self.decoder = nn.ModuleList(DecoderBlock(cfg, i) for i in range(self.n_dec))
        self.decoder_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.drop = nn.Dropout(cfg.dropout)
        # Mesh TF's init, which stands in for the missing 1/sqrt(head_dim) in attention: queries ~ (d * head_dim)^-0.5,
        # every other matrix ~ fan_in^-0.5, the shared embedding ~ 1, the bias tables ~ d^-0.5.
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan = cfg.d_model * cfg.head_dim if name.endswith("q_proj") else module.in_features
                nn.init.normal_(module.weight, std=fan**-0.5)
        for table in (self.encoder_bias, self.decoder_bias):
            nn.init.normal_(table.weight, std=cfg.d_model**-0.5)
        nn.init.normal_(self.embed_tokens.weight, std=1.0)

    def _bias(self, table: nn.Embedding, q_pos, k_pos, bidirectional: bool) -> torch.Tensor:
        """(1, heads, Tq, Tk): the bias of each query/key pair's bucketed distance."""
        buckets = relative_buckets(k_pos[None, :] - q_pos[:, None], bidirectional, self.cfg.rel_buckets,
                                   self.cfg.rel_max_distance)  # fmt: skip
        return table(buckets).permute(2, 0, 1)[None]

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> the encoder's states (B, S, d). src_mask (B, S): True at real tokens (padding is hidden)."""
        S = src.shape[1]
        pos = torch.arange(S, device=src.device)
        bias = self._bias(self.encoder_bias, pos, pos, True)
        if src_mask is not None:
            bias = bias.masked_fill(~src_mask[:, None, None, :].bool(), float("-inf"))
        x = self.drop(self.embed_tokens(src))
        for block in self.encoder:
            x = block(x, None, bias, None)
        return self.drop(self.encoder_norm(x))

    def memory(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of the encoder's states (once per input)."""
        return [block.cross_attn.memory(enc) for block in self.decoder]

    def decode(self, tgt, memory, src_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """tgt (B, T): the decoder's input (the output shifted right behind the start token) -> hidden (B, T, d)."""
        T = tgt.shape[1]
        start = cache.length if cache is not None else 0
        q_pos = torch.arange(start, start + T, device=tgt.device)
        k_pos = torch.arange(start + T, device=tgt.device)
        bias = self._bias(self.decoder_bias, q_pos, k_pos, False)
        bias = bias.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))  # causal
        cross = None if src_mask is None else torch.zeros(src_mask.shape, device=tgt.device).masked_fill(
            ~src_mask.bool(), float("-inf"))[:, None, None, :]  # fmt: skip
        x = self.drop(self.embed_tokens(tgt))
        for block, kv in zip(self.decoder, memory, strict=True):
            x = block(x, bias, kv, cross, cache)
        if cache is not None:
            cache.length += T
        x = self.drop(self.decoder_norm(x))
        return x * self.cfg.d_model**-0.5 if self.cfg.tie_embeddings else x

    def forward(self, src, tgt_in, targets=None, *, src_mask=None, loss_reduction: str = "mean"):
        """(logits (B, T, V), None), or (None, the mean (or summed) cross-entropy at targets != -100)."""
        hidden = self.decode(tgt_in, self.memory(self.encode(src, src_mask)), src_mask)
        logits = self.lm_head(hidden)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=loss_reduction)  # fmt: skip
        return None, loss

    @torch.no_grad()
    def generate(self, src, max_new_tokens: int, *, src_mask=None, start_id: int = 0, eos_id: int | None = None):
        """Greedy output ids (B, <= max_new_tokens): the encoder and the cross-attention keys once, then one decoder
        step per token with a KV cache; a row stops at eos_id (later positions repeat it)."""
        B = src.shape[0]
        memory = self.memory(self.encode(src, src_mask))
        cache = KVCache(dataclasses.replace(self.cfg, n_layer=self.n_dec), B, max_new_tokens, src.device,
                        self.embed_tokens.weight.dtype)  # fmt: skip
        token = torch.full((B, 1), start_id, dtype=torch.long, device=src.device)
        out, done = [], torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.decode(token, memory, src_mask, cache)[:, -1])
            token = logits.argmax(-1, keepdim=True)
            if eos_id is not None:
                token = torch.where(done[:, None], torch.full_like(token, eos_id), token)
                done |= token[:, 0] == eos_id
            out.append(token)
            if eos_id is not None and bool(done.all()):
                break
        return torch.cat(out, 1)
