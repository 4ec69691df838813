"""Training memory per process, predicted before a run: weights, gradients, optimizer state, activations.

    lmforge params --config gpt2-124m --gpus 8           # a packaged recipe's model and batch on 8 GPUs
    lmforge params --preset llama-1b --gpus 8 --set parallel=fsdp --set batch_size=4 --set seq_len=2048

Parameters are fp32 whatever the compute dtype (bf16 autocast computes in bf16 and keeps fp32 masters), and so
are their gradients and AdamW's two moments: 16 bytes a parameter per process under DDP; under FSDP that is
divided by the processes, plus one block gathered whole while it runs. Muon keeps one moment for the blocks'
matrices (AdamW's two for the rest).

Activations are measured, not guessed: the real model runs forward on CPU (one block, then two; a few tokens,
then twice as many), and autograd's saved-tensor hooks count the bytes kept for the backward pass. The
differences give each block's bytes per token and its fixed bytes (autocast's bf16 copies of the weights), and
the same for what lies outside the blocks. Bytes per token are linear in tokens here: attention keeps its
output and log-sum-exp, not the T x T scores (SDPA's memory-efficient kernels; the math kernel would keep them).
With activation checkpointing a block keeps only its input, and one block's full activations exist while it
is recomputed. Not counted: the CUDA context and library workspaces (about 0.5-1 GB per GPU), allocator
fragmentation, and the backward pass's transient gradients of one block's activations.
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.model.transformer import ModelConfig, Transformer

GIB = 1 << 30


def _saved_bytes(model: Transformer, tokens: int, bf16: bool) -> int:
    """Bytes autograd keeps for the backward pass of one forward over `tokens` tokens (one row), parameters not
    counted (they exist anyway); storages shared by several saved tensors are counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.zeros(1, tokens, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, bf16):
        model(idx, idx)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@dataclasses.dataclass(frozen=True)
class ActivationCost:
    """Measured bytes kept for backward: per block (per token and fixed) and outside the blocks (the same)."""

    block_per_token: float
    block_fixed: float
    outside_per_token: float
    outside_fixed: float

    def total(self, tokens: int, n_layer: int) -> float:
        return n_layer * (self.block_per_token * tokens + self.block_fixed) + (
            self.outside_per_token * tokens + self.outside_fixed
        )


def measure_activations(cfg: ModelConfig, bf16: bool, checkpointing: bool = False, tokens: int = 16) -> ActivationCost:
    """Run one and two blocks of the model `cfg` describes at `tokens` and 2 x `tokens` tokens (see the module doc).

    The vocabulary is cut to 64 rows: the embedding output and the chunked loss keep d_model-wide rows whatever the
    vocabulary (the head's logits are recomputed in backward, lmforge/model/losses.py).
    """
    small = dataclasses.replace(cfg, n_layer=2, vocab_size=64, max_seq_len=max(2 * tokens, 8), dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(small)
    model.checkpointing = checkpointing
    two = model.layers
    runs = {}
    for n_blocks in (1, 2):
        model.layers = two[:n_blocks]
        for t in (tokens, 2 * tokens):
            runs[n_blocks, t] = _saved_bytes(model, t, bf16)
    model.layers = two
    block_1, block_2 = runs[2, tokens] - runs[1, tokens], runs[2, 2 * tokens] - runs[1, 2 * tokens]
    per_token = (block_2 - block_1) / tokens
    outside_per_token = (runs[1, 2 * tokens] - runs[1, tokens]) / tokens - per_token
    # The chunked loss forms the head's gradient in its forward pass and keeps it (V x d_model, fp32): measured at 64
    # rows, the rest added here.
    head_rows = (cfg.vocab_size - small.vocab_size) * cfg.d_model * 4
    block_fixed = block_1 - per_token * tokens
    outside_fixed = runs[1, tokens] - (per_token + outside_per_token) * tokens - block_fixed + head_rows
    return ActivationCost(per_token, block_fixed, outside_per_token, outside_fixed)


def train_memory(cfg: ModelConfig, *, batch_size: int, seq_len: int, world_size: int = 1, parallel: str = "ddp",
                 optimizer: str = "adamw", bf16: bool = True, checkpointing: bool = False) -> dict:  # fmt: skip
    """Predicted peak bytes per process of a training step with micro-batch `batch_size` x `seq_len` tokens.

    Returns the parts (`weights`, `grads`, `optimizer`, `gathered_block` (FSDP), `activations`, `loss_chunk` (the
    loss's logits, one chunk at a time)), `total` bytes and `params`.
    """
    with torch.device("meta"):  # shapes only, no memory
        named = list(Transformer(cfg).named_parameters())  # a tied head is listed once
    params = sum(p.numel() for _, p in named)
    matrices = sum(p.numel() for n, p in named if p.ndim == 2 and n.startswith("layers."))  # what Muon steps
    per_block = sum(p.numel() for n, p in named if n.startswith("layers.")) / cfg.n_layer
    shard = world_size if parallel == "fsdp" else 1
    moments = 8 * params if optimizer == "adamw" else 4 * matrices + 8 * (params - matrices)
    tokens = batch_size * seq_len
    full = measure_activations(cfg, bf16)
    if checkpointing:
        kept = measure_activations(cfg, bf16, checkpointing=True)
        # Every block's input, plus one block's whole activations while the backward pass recomputes it.
        activations = kept.total(tokens, cfg.n_layer) + full.block_per_token * tokens + full.block_fixed
    else:
        activations = full.total(tokens, cfg.n_layer)
    # The loss's logits exist one chunk of 1024 tokens at a time (fp32 logits and their log-softmax).
    loss_chunk = 2 * min(1024, tokens) * cfg.vocab_size * 4
    parts = {
        "weights": 4 * params / shard,
        "grads": 4 * params / shard,
        "optimizer": moments / shard,
        "gathered_block": 4 * per_block if shard > 1 else 0,
        "activations": activations,
        "loss_chunk": loss_chunk,
    }
    return {**{k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values())), "params": params}


def describe_memory(mem: dict, world_size: int, parallel: str) -> str:
    """Lines for `lmforge params`: each part in GiB and the total per process."""
    where = f"per process, {world_size} x {parallel}" if world_size > 1 else "one process"
    lines = [f"  training memory ({where}; predicted, see lmforge/train/memory.py):"]
    for key in ("weights", "grads", "optimizer", "gathered_block", "activations", "loss_chunk", "total"):
        if key == "gathered_block" and not mem[key]:
            continue
        lines.append(f"    {key:<15} {mem[key] / GIB:>8.2f} GiB")
    return "\n".join(lines)
