"""The encoder-only Transformer (BERT, RoBERTa, ALBERT): bidirectional attention, masked-token prediction.

    from lmforge.model import preset
    from lmforge.model.encoder import Encoder
    model = Encoder(preset("bert-mini"))
    logits, _ = model(idx, token_types=types, key_mask=real)      # (B, T, vocab): every position's token
    parts, loss = model(idx, targets, labels=is_next)              # training: masked-LM (+ sentence) loss
    class_logits, _ = model(idx, head="cls")                       # (B, n_classes) from the pooled [CLS]

Trained by `lmforge pretrain --preset bert-mini --objective mlm` (lmforge/train/mlm.py makes the masked
batches) and `lmforge finetune-cls` (lmforge/train/classify.py).

The blocks are the decoder's own (lmforge/model/transformer.py: `Block`, `Attention`, `MLP`, the norms and the
position tables): with `family=encoder` attention is not causal, and `prenorm=False` puts each norm after its
residual sum as BERT does. What is the encoder's alone is here: token-type (segment) embeddings and a norm on
the summed embeddings; ALBERT's factorized embedding (width `embedding_size`, projected up to `d_model`) and
cross-layer sharing (`share_layers`: one block run `n_layer` times); BERT's masked-LM head (a dense layer, GELU
and a norm, then the embedding matrix transposed plus a bias); the pooler (dense + tanh on the first token) and
a classifier on it (NSP/SOP in pretraining, the labels in fine-tuning). lmforge/hub/bert.py maps these names
onto Hugging Face's BertForMaskedLM / BertForPreTraining / BertForSequenceClassification.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.losses import IGNORE_INDEX
from lmforge.model.matmul import Linear
from lmforge.model.transformer import ACTIVATIONS, Block, ModelConfig, make_norm, rope_tables, sinusoidal_table

HEADS = ("mlm", "cls", "hidden")


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.family != "encoder":
            raise LmforgeError(f"model.family is {cfg.family!r}: an Encoder needs family=encoder (a BERT preset)")
        d, e = cfg.d_model, cfg.embedding_size or cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e)
        if cfg.pos_encoding == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, e)
        if cfg.type_vocab_size:
            self.embed_types = nn.Embedding(cfg.type_vocab_size, e)
        self.embed_norm = make_norm(cfg, e)
        if e != d:  # ALBERT: a V x E table and an E x H projection instead of a V x H table
            self.embed_proj = Linear(e, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(1 if cfg.share_layers else cfg.n_layer))
        if cfg.prenorm:  # a pre-norm stack ends un-normalized; post-norm blocks end on their own norm
            self.norm = make_norm(cfg, d)
        # The masked-LM head (BERT's cls.predictions): transform to the embedding width, then the tied decoder.
        self.head_dense = Linear(d, e)
        self.head_norm = make_norm(cfg, e)
        self.lm_head = Linear(e, cfg.vocab_size, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.n_classes:
            self.pooler = Linear(d, d)
            self.classifier = Linear(d, cfg.n_classes)
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, e), persistent=False)
        self.checkpointing = False  # set by the training loop (activation_checkpointing)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # BERT's init: every matrix and embedding N(0, 0.02), biases 0, norms 1.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def blocks(self):
        """The block each layer runs: n_layer of them, or one block n_layer times (share_layers)."""
        return [self.layers[0]] * self.cfg.n_layer if self.cfg.share_layers else list(self.layers)

    def encode(self, idx, token_types=None, key_mask=None) -> torch.Tensor:
        """idx (B, T) -> the last block's hidden states (B, T, d_model). token_types (B, T): segment 0/1 of each
        token (None: all 0); key_mask (B, T): True at real tokens, False at padding, which no token attends to."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(idx)
        if self.cfg.pos_encoding == "learned":
            x = x + self.embed_positions.weight[:T]
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[:T]
        if self.cfg.type_vocab_size:
            x = x + (self.embed_types(token_types) if token_types is not None else self.embed_types.weight[0])
        x = self.drop(self.embed_norm(x))
        if hasattr(self, "embed_proj"):
            x = self.embed_proj(x)
        rope = (self.rope_cos[:T, None], self.rope_sin[:T, None]) if self.cfg.pos_encoding == "rope" else None
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()  # (B, 1, 1, T): keys each query sees
        recompute = self.checkpointing and torch.is_grad_enabled()
        for block in self.blocks():
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, None)
        return self.norm(x) if self.cfg.prenorm else x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits (..., vocab) of hidden states (..., d_model): BERT's prediction head."""
        h = self.head_norm(ACTIVATIONS[self.cfg.mlp](None, self.head_dense(hidden)))
        return self.lm_head(h) + self.head_bias

    def class_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Classifier logits (B, n_classes) from the pooled first token of hidden (B, T, d_model)."""
        if not self.cfg.n_classes:
            raise LmforgeError("this encoder has no classifier (model.n_classes=0)")
        return self.classifier(self.drop(torch.tanh(self.pooler(hidden[:, 0]))))

    def forward(self, idx, targets=None, *, labels=None, token_types=None, key_mask=None, head: str = "mlm",
                loss_reduction: str = "mean"):  # fmt: skip
        """Without targets or labels: (logits of `head`, None): mlm (B, T, V), cls (B, n_classes) or hidden
        (B, T, d). With them: ({"mlm_loss", "cls_loss", "cls_logits"} as present, loss). targets (B, T): the
        original token at masked positions, -100 elsewhere; labels (B,): a class per row (NSP/SOP, finetune-cls).
        The loss is the masked-LM loss plus the classifier's (each a mean, or a sum with loss_reduction="sum"),
        as BERT's pretraining sums them. Only masked positions run the vocabulary head (BERT runs it on all)."""
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        hidden = self.encode(idx, token_types, key_mask)
        if targets is None and labels is None:
            out = {"mlm": self.mlm_logits, "cls": self.class_logits, "hidden": lambda h: h}[head](hidden)
            return out, None
        parts, loss = {}, 0.0
        if targets is not None:
            picked = targets.reshape(-1) != IGNORE_INDEX
            logits = self.mlm_logits(hidden.reshape(-1, hidden.shape[-1])[picked])
            parts["mlm_loss"] = F.cross_entropy(logits.float(), targets.reshape(-1)[picked], reduction=loss_reduction)
            loss = loss + parts["mlm_loss"]
        if labels is not None:
            parts["cls_logits"] = self.class_logits(hidden)
            parts["cls_loss"] = F.cross_entropy(parts["cls_logits"].float(), labels, reduction=loss_reduction)
            loss = loss + parts["cls_loss"]
        return parts, loss


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model class a config's family names: Encoder, T5 (encoder-decoder) or the decoder Transformer."""
    from lmforge.model.t5 import T5
    from lmforge.model.transformer import Transformer

    return {"encoder": Encoder, "encoder-decoder": T5}.get(cfg.family, Transformer)(cfg)
