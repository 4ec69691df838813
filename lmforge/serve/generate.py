"""The generation engine: batched prompts, a preallocated KV cache, sampling, stop tokens, streaming.

    from lmforge.serve.generate import generate
    new_tokens = generate(model, [[1, 2, 3], [4, 5]], 50, temperature=0)

Prompts of different lengths are left-padded: each row gets position ids counted from its
first real token and a key mask hiding its padding, so a row's tokens match what it would get
alone. One prefill forward fills the cache with all prompts; then one decode step per new token,
by default through `FusedDecoder` (q/k/v and gate/up each one matrix product, weights in the layout
the CPU reads fastest, RMSNorm, RoPE and attention through lmforge's C kernels where they are built,
lmforge/model/cpu_kernels.c; the same tokens as the model's own forward, which `fused=False` runs).
Length policy: if the longest prompt plus `max_new_tokens` exceeds `model.cfg.max_seq_len`,
prompts are truncated from the left (the oldest tokens go), keeping the last
`max_seq_len - max_new_tokens`; `max_new_tokens >= max_seq_len` is an LmforgeError.
The CLI is `lmforge generate` (lmforge/serve/generate_cmd.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels
from lmforge.model.lora import LoraLinear
from lmforge.model.matmul import Linear, cpu_matmul, linear
from lmforge.model.quant import QuantLinear
from lmforge.model.transformer import KVCache, Transformer, apply_rope
from lmforge.serve.sampling import apply_repetition_penalty, pick

# oneDNN's prepacked linear (what inductor's freezing pass uses on CPU); a private op, so only used when present.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
PACK_MIN = 2**19  # elements of a weight from which oneDNN's packed product pays (SmolLM2's q/k/v: 553k) under MKL
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _check(model, prompts, max_new_tokens) -> list[list[int]]:
    """Validate the request; return the prompts after the left-truncation policy."""
    max_len = model.cfg.max_seq_len
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_len:
        raise LmforgeError(f"max_new_tokens ({max_new_tokens}) must be below the model's max_seq_len ({max_len})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token (start from <|endoftext|> for unconditional text)")
    keep = max_len - max_new_tokens
    return [list(p[-keep:]) for p in prompts]


class _Proj:
    """Inference-only y = x W^T + b for one or more linears that read the same input, stacked on the output side.

    A snapshot of the weights, in the layout the CPU multiplies fastest (fp32, measured): at batch 1, W^T
    stored (in, out) contiguous, which MKL's matrix-vector product reads about 2x faster than nn.Linear's
    (out, in); above batch 1, W packed once by oneDNN for that batch size, about 2x faster than MKL's
    small-M product on the AMD benchmark machine. Where MKL is the process's matmul backend (Intel CPUs,
    lmforge/model/matmul.py) only weights of `PACK_MIN` elements or more are packed: oneDNN's call costs
    25-40 us whatever the shape, so a small model's 16-row step ran 1.2-1.5x faster through MKL on a 2-core
    Xeon (the demo model), while SmolLM2-sized weights stream as fast or faster packed
    (benchmarks/decode_products.py). Batch 0 is for thousands of rows at once (the scorer's flat batches,
    lmforge/eval/scoring.py): the weight as stored (no copy but the concatenation of fused ones) and the model's
    own product (matmul.linear), which reads either layout as fast at that size.
    """

    def __init__(self, linears: list[nn.Linear], batch: int):
        self.quant = self.kernel = self.w = None
        if isinstance(linears[0], QuantLinear):  # weight-only quantized: its own kernels, the rows side by side
            self.quant = QuantLinear.cat(linears)
            # The bare kernel skips QuantLinear.forward's reshape, checks and casts (a SmolLM2 int8 decode step 1.03-1.15x
            # faster, BENCHMARKS.md); a residual is added to its bf16 product directly: the same sum as after a cast.
            self.kernel = self.quant.row_kernel(self.quant.qweight.device)
            self.kernel_rows = self.quant.kernel_rows(self.quant.qweight.device)
            return
        w = torch.cat([_weight(m) for m in linears]) if len(linears) > 1 else _weight(linears[0])
        self.b = None
        if any(m.bias is not None for m in linears):
            self.b = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
        self.packed = self.wt = None
        big = cpu_matmul() == "onednn" or w.numel() >= PACK_MIN
        if batch == 0:  # thousands of rows (the scorer): the weight as stored, the model's own product (matmul.linear)
            self.w = w
        elif _ONEDNN and batch > 1 and big and w.device.type == "cpu" and w.dtype == torch.float32:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
        else:
            self.wt = w.t().contiguous()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` when given (folded into the product where the kernel allows)."""
        if self.kernel is not None and x.shape[0] <= self.kernel_rows:
            y = self.kernel(x)
            return y.to(x.dtype) if residual is None else residual + y
        if self.quant is not None:
            y = self.quant(x)
            return y if residual is None else residual + y
        if self.w is not None:
            y = linear(x, self.w, self.b)
            return y if residual is None else y.add_(residual)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
            return y if residual is None else residual + y
        if residual is not None and self.b is None:
            return torch.addmm(residual, x, self.wt)
        y = x @ self.wt if self.b is None else torch.addmm(self.b, x, self.wt)
        return y if residual is None else residual + y


def _weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a linear applies: a LoRA layer's with its adapter folded in (GRPO/PPO rollouts of a LoRA policy
    run the fused path; with the adapters switched off, as for a reference, the base weight)."""
    if isinstance(linear, LoraLinear) and linear.scaling:
        return linear.weight + linear.scaling * (linear.lora_B @ linear.lora_A)
    return linear.weight


def _c_kernels(t: torch.Tensor | None) -> bool:
    """Whether the decode step's C kernels (lmforge/model/cpu_kernels.c) apply to a model whose tensors are like t."""
    return t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and cpu_kernels.loaded() is not None


def _norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as a bare functional call: at one token per row, nn.Module.__call__ costs about as much as the math.
    An fp32 RMSNorm on CPU runs lmforge's C kernel where it is built (F.rms_norm took ~25 us a call inside the step)."""
    if isinstance(module, nn.RMSNorm) and _c_kernels(module.weight):
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
        return functools.partial(cpu_kernels.rms_norm, weight=module.weight.detach(), eps=eps)
    if isinstance(module, nn.RMSNorm):
        return functools.partial(
            F.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps
        )
    if isinstance(module, nn.LayerNorm):
        shape, w, b, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return functools.partial(F.layer_norm, normalized_shape=shape, weight=w, bias=b, eps=eps)
    return module


class FusedDecoder:
    """One-token decode steps with q/k/v and the MLP's input projections each fused into one matrix product:
    generation's fast path.

    The fused weights are built from the model when generation starts and dropped when it ends
    (one extra copy of the weights meanwhile); the model, its parameters and their names are not
    touched, so checkpoints, import/export and LoRA never see them. Only the matrix products are
    its own: the variant math comes from the model's modules (the norms' weights and eps, the
    attention's `rotate` for QK-norm and RoPE, the position table, the attention mask with ALiBi,
    the MLP's `in_projs` and `act`), so a new variant runs the same here or not at all
    (tests/test_generate.py holds the logits equal within 1e-5 for every config field). It skips
    the (B, 1, d) shapes, the per-module calls and half the matrix products.
    """

    def __init__(self, model: Transformer, batch: int):
        self.model, self.cfg = model, model.cfg
        self.layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            up = mlp.in_projs
            norms = (_norm(block.input_layernorm), _norm(block.post_attention_layernorm))
            projs = (_Proj([attn.q_proj, attn.k_proj, attn.v_proj], batch), _Proj([attn.o_proj], batch))
            self.layers.append((block, *norms, *projs, _Proj(up, batch), _Proj([mlp.down_proj], batch), len(up) == 2))
        self.norm, self.head = _norm(model.norm), _Proj([model.lm_head], batch)
        self.table = model.position_table()
        # SDPA costs ~60 us a call at one query per row inside the step, the C kernel a few; RoPE likewise (BENCHMARKS.md)
        self.c_kernels = _c_kernels(next(model.parameters(), None))
        self.rope = cpu_kernels.rope if self.c_kernels else apply_rope
        self.silu_mul = self.c_kernels and self.cfg.mlp == "swiglu"  # SwiGLU in one C pass over [gate | up]

    @staticmethod
    def supports(model) -> bool:
        """Our Transformer with plain, LoRA or quantized linear projections (another model uses its own forward)."""
        if not isinstance(model, Transformer) or model.cfg.n_experts or model.cfg.block_positions:  # own forward
            return False
        kinds = (nn.Linear, Linear, LoraLinear, QuantLinear)
        return all(type(m) in kinds for name, m in model.named_modules() if name.endswith(_PROJ))

    def __call__(self, tok: torch.Tensor, cache: KVCache, positions=None, key_mask=None) -> torch.Tensor:
        """tok (B,) -> next-token logits (B, V); writes the new keys/values into `cache` and advances it.

        positions (B,): position ids (left-padded rows); key_mask (B, cache.length + 1): True at real tokens.
        """
        m, cfg = self.model, self.cfg
        start = cache.length
        x, rope = self._embed(tok, start if positions is None else positions)
        # The serving engine's rows, each at its own length: their mask only hides keys past a row's own, which the C
        # attention does from the lengths (left padding, a key_mask, or ALiBi's biases keep the mask and SDPA).
        per_row = isinstance(start, torch.Tensor) and key_mask is None and cfg.pos_encoding != "alibi"
        row_lengths = start + 1 if per_row and self.c_kernels else None
        mask = None if row_lengths is not None else m._attn_mask(len(tok), 1, start, key_mask, None, x.device, x.dtype)

        def attend(layer, q, k, v):
            k, v = cache.update(layer, k[:, :, None], v[:, :, None])
            if self.c_kernels and mask is None:  # lmforge's C kernel: every cached key, or each row's own
                return cpu_kernels.decode_attention(q, k, v, row_lengths)
            return F.scaled_dot_product_attention(
                q[:, :, None], k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
            )

        x = self._layers(x, rope, attend)
        cache.length += 1
        return self.head(self.norm(x))

    def packed(
        self,
        tok: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """Tokens of several KV-cache slots in one pass, each at its own position: the serving engine's step, where
        the decode rows' next tokens and the chunks of prompts being prefilled share every matrix product.

        tok, slots, positions (N,); k_cache, v_cache (n_layer, slots, Hk, L, D), written at (slot, position) for
        every token before the layer's attention, so a prompt token sees its slot's earlier keys, its own chunk's
        included (causal), and no other slot's. Returns the logits (len(logits_at), V) of the rows `logits_at` (None:
        every row's).
        Needs the C attention kernel and no ALiBi (`supports_packed`).
        """
        x, rope = self._embed(tok, positions)
        lengths = positions + 1

        def attend(layer, q, k, v):  # the kernel stores each token's key and value before attending
            return cpu_kernels.decode_attention(q, k_cache[layer], v_cache[layer], lengths, slots, new=(k, v))

        x = self._layers(x, rope, attend)
        return self.head(self.norm(x if logits_at is None else x[logits_at]))

    def supports_packed(self) -> bool:
        return self.c_kernels and self.cfg.pos_encoding != "alibi"

    def _embed(self, tok: torch.Tensor, pos) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings (B, d) (plus the position table's rows) and RoPE's cos/sin for positions `pos`."""
        m, cfg = self.model, self.cfg
        emb = m.embed_tokens  # (B, d): one token per row, no time axis
        x = emb.weight.index_select(0, tok) if isinstance(emb, nn.Embedding) else emb(tok)
        rope = None
        if self.table is not None:
            x = x + self.table[pos]
        elif cfg.pos_encoding == "rope":  # (1, D) or (B, 1, D): broadcast over the heads of (B, H, D)
            rope = (m.rope_cos[pos][..., None, :], m.rope_sin[pos][..., None, :])
        return x, rope

    def _layers(self, x: torch.Tensor, rope, attend: Callable) -> torch.Tensor:
        """The blocks on x (B, d), one token per row; attend(layer, q, k, v) with q (B, H, D), k and v (B, Hk, D)
        stores the keys and values where they belong and returns the attention's output (B, H, D)."""
        cfg = self.cfg
        B, H, Hk, D = x.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
        for layer, (block, norm1, norm2, qkv, o_proj, up_proj, down_proj, gated) in enumerate(self.layers):
            h = qkv(norm1(x)).view(B, H + 2 * Hk, D)
            if rope is not None and not cfg.qk_norm:  # `rotate` is apply_rope on each: here on both at once
                qk = self.rope(h[:, : H + Hk], *rope)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q, k = block.self_attn.rotate(h[:, :H], h[:, H : H + Hk], rope)
            y = attend(layer, q, k, h[:, H + Hk :])
            x = o_proj(y.reshape(B, H * D), residual=x)
            h = up_proj(norm2(x))
            if self.silu_mul and h.dtype == torch.float32:
                a = cpu_kernels.silu_mul(h)
            else:
                a = block.mlp.act(*(h.chunk(2, dim=-1) if gated else (None, h)))
            x = down_proj(a, residual=x)
        return x


def _sampler(temperature, top_k, top_p, repetition_penalty, generator):
    """Return (logits, seen) -> token ids: the whole per-step sampling recipe in one closure."""

    def sample(logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        return pick(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    return sample


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    include_stop: bool = False,
    seed: int | None = None,
    pad_id: int = 0,
    stream: Callable[[int, int], None] | None = None,
    stop_when: Callable[[int, list[int]], bool] | None = None,
    fused: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt (not the prompt), up to `max_new_tokens` per row.

    temperature 0 is greedy. A row ends at its first token in `stop_ids`; that token is left
    out of the output (and not streamed) unless `include_stop`. `seed` makes sampling
    repeatable (a private torch.Generator; the global RNG is untouched). `stream(row, token_id)`
    is called for each new token as it is chosen. `pad_id` only fills padding, which the
    attention mask hides, so any valid id works. `stop_when(row, new_ids)` ends a row when it returns True
    (after that token: e.g. a stop string in the decoded text, which the caller cuts). `fused` runs the decode
    steps through
    `FusedDecoder` (same tokens, faster; our Transformer with plain linears, on CPU, else ignored);
    False runs the model's own forward for every step.
    """
    model.eval()
    prompts = _check(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    sample = _sampler(temperature, top_k, top_p, repetition_penalty, generator)
    seen = None
    if repetition_penalty != 1.0:  # tokens in the prompt or output so far (HF counts the prompt too)
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, device=device)] = True
        # Stop tokens are never penalized: a chat prompt holds a turn-end token for every earlier turn,
        # and penalizing it teaches the model to never stop (HF penalizes it; a known chat pitfall).
        if stop_ids:
            seen[:, torch.tensor(list(stop_ids), device=device)] = False
    dtype = next(model.parameters()).dtype
    # The last new token is never fed back, so the cache needs P + max_new_tokens - 1 slots.
    cache = KVCache(model.cfg, B, P + max_new_tokens - 1, device=device, dtype=dtype)

    # Equal lengths need no positions or mask: the model then uses plain causal attention and sliced tables.
    padded = bool((lengths != P).any())
    if padded:
        real = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]
        key_mask = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
        key_mask[:, :P] = real
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        logits, _ = model(tokens, cache=cache, positions=positions, key_mask=key_mask[:, :P], last_only=True)
        next_pos = lengths[:, None]
    else:
        logits, _ = model(tokens, cache=cache, last_only=True)
    logits = logits[:, -1]

    # CPU only: measured there; on a GPU the model's own forward runs (the fused path is unmeasured on CUDA and would
    # hold a second copy of the projection weights, which a large model may not have room for).
    on_cpu = logits.device.type == "cpu"
    use_fused = fused and on_cpu and max_new_tokens > 1 and FusedDecoder.supports(model)
    decoder = FusedDecoder(model, B) if use_fused else None
    stop_set = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # the same as `done`, as a tensor
    for step in range(max_new_tokens):
        tok = sample(logits, seen)
        for row, t in enumerate(tok.tolist()):
            if done[row]:
                continue
            if t in stop_set:
                done[row] = True
                finished[row] = True
                if not include_stop:
                    continue
            out[row].append(t)
            if stream is not None:
                stream(row, t)
            if stop_when is not None and stop_when(row, out[row]):
                done[row] = True
                finished[row] = True
        if step == max_new_tokens - 1 or all(done):
            break
        if any(done):
            tok = tok.masked_fill(finished, pad_id)  # finished rows keep feeding padding
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        L = P + step + 1
        if decoder is not None:
            logits = decoder(tok, cache, *((next_pos[:, 0] + step, key_mask[:, :L]) if padded else ()))
        elif padded:
            logits = model(tok[:, None], cache=cache, positions=next_pos + step, key_mask=key_mask[:, :L])[0][:, -1]
        else:
            logits = model(tok[:, None], cache=cache)[0][:, -1]
    return out


@torch.inference_mode()
def generate_no_cache(model, prompt: Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence each step: the slow reference the tests use."""
    model.eval()
    device = next(model.parameters()).device
    seq = list(prompt)
    new = []
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], device=device))
        t = int(logits[0, -1].argmax())
        if t in stop_ids:
            break
        seq.append(t)
        new.append(t)
    return new
