"""Read a llama.cpp GGUF file (llama architecture) into lmforge: config, fp32 weights, a HF tokenizer.

    lmforge import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2

Needs `pip install gguf` (llama.cpp's reader; numpy only). Weights are dequantized with
`gguf.quants.dequantize` (Q4_1, Q8_0, K-quants, F16, ... -> float32). Three things differ from a
Hugging Face checkpoint and are undone here:
- shapes: ggml lists dimensions fastest-first, so a tensor listed as [in, out] is a (out, in) matrix;
- q_proj/k_proj rows: llama.cpp's converter permutes them from HF's rotate-half RoPE layout to
  its interleaved layout (`permute` in convert_hf_to_gguf.py); `unpermute_qk` reverses it;
- the tokenizer is metadata (tokens, merges, token types, a pre-tokenizer *name*), from which
  `build_tokenizer` rebuilds a `tokenizers` byte-level BPE and its tokenizer_config.json.
Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are supported, with the
pre-tokenizers in `PRE_TOKENIZERS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.hub.common import TURN_END_TOKENS, Imported
from lmforge.model.transformer import ModelConfig
from lmforge.tokenizer.special import bytes_to_unicode

# ----------------------------------------------------------------------------- the q/k row permutation


def permute_qk(w, n_head: int):
    """HF rotate-half rows -> llama.cpp interleaved rows, as convert_hf_to_gguf.py's `permute` does.

    Per head the rows (r_0 .. r_{d/2-1} | r_{d/2} .. r_{d-1}) become (r_0, r_{d/2}, r_1, r_{d/2+1}, ...):
    rotate-half pairs dimension i with i + d/2, llama.cpp's rope pairs 2i with 2i+1.
    Works on torch tensors and numpy arrays, 2-D weights and 1-D biases.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head: int):
    """The inverse of `permute_qk`: llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer

# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (llama-vocab.cpp), as the
# Hugging Face tokenizer.json of the original models spells them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern


def _split_then_bytes(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _smollm():
    from tokenizers import pre_tokenizers

    # SmolLM/SmolLM2's own tokenizer.json: every digit alone, then GPT-2's pattern (llama.cpp: "\p{N}" first).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


PRE_TOKENIZERS = {
    "smollm": _smollm,
    "gpt2": _byte_level,
    "gpt-2": _byte_level,  # llama.cpp's own spelling of the same pattern (what `lmforge export --format gguf` writes)
    # llama.cpp's "default" (also what a file without the key gets) is GPT-2's pattern plus number rules
    # that older converters guessed; transformers' GGUF loader reads it as GPT-2's pattern, and so do we.
    "default": _byte_level,
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)


def build_tokenizer(meta: dict, context_length: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json from a GGUF's `tokenizer.*` metadata (a dict of key -> value)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmforgeError(f"tokenizer.ggml.model={kind!r} is not supported; lmforge imports byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise LmforgeError(f"unknown GGUF pre-tokenizer {pre!r}; lmforge knows {', '.join(PRE_TOKENIZERS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    # Tokens are stored in the byte-level alphabet ("Ġthe"); respell any that are not (a few converters
    # write added tokens as raw text) so the BPE model can match them.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole before BPE and count as special;
    # user-defined ones (e.g. <think>) are matched whole but decoded like text.
    # A token spelled outside the byte alphabet would get a new id past the embedding rows: those are llama.cpp
    # mislabels (transformers' GGUF loader skips them too).
    whole = [(t, k) for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED) and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in whole if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in whole if k == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    template = meta.get("tokenizer.chat_template")
    # EOS: the turn-end token (eot_token_id, or the one the chat template closes turns with) for chat models.
    eos = token("eot_token_id") or token("eos_token_id")
    for t in TURN_END_TOKENS:
        if template and t in template and t in tokens:
            eos = t
            break
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if template:
        tok_cfg["chat_template"] = template
    return {
        "tokenizer.json": tok.to_str().encode("utf-8"),
        "tokenizer_config.json": (json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
    }


# ----------------------------------------------------------------------------- weights and config

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router
}
# A mixture of experts' matrices, stacked over the experts in GGUF as in lmforge (transformer.MoE; no `.weight`).
EXPERT_NAMES = {"ffn_gate_exps": "mlp.gate_proj", "ffn_up_exps": "mlp.up_proj", "ffn_down_exps": "mlp.down_proj"}
TOP_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def lmforge_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; None for a name lmforge has no place for."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if m and m.group(2) in EXPERT_NAMES and m.group(3) == "weight":
        return f"layers.{m.group(1)}.{EXPERT_NAMES[m.group(2)]}"
    return None


def _metadata(reader) -> dict:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except (ValueError, UnicodeDecodeError):  # a malformed value we do not need; the keys we need are checked
            continue
    return out


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))  # numpy prints the shortest string that rounds to the same float32


def config_from_gguf(meta: dict, where: Path, vocab_rows: int, tied: bool, qkv_bias: bool = False) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LmforgeError(f"{where}: unsupported GGUF architecture {arch!r}; lmforge imports 'llama' GGUFs")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise LmforgeError(f"{where}: metadata llama.{key} is missing")
        return value

    experts = {}
    if get("expert_count", 0):  # Mixtral as llama.cpp's converter writes it: softmax routing, top-k renormalized
        if get("expert_gating_func", 1) != 1 or get("expert_shared_count", 0):
            raise LmforgeError(f"{where}: only Mixtral-style experts are supported (softmax gating, no shared experts)")
        experts = {"n_experts": int(get("expert_count")), "experts_top_k": int(get("expert_used_count"))}
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise LmforgeError(f"{where}: llama.rope.scaling.type={scaling!r} is not supported (plain RoPE only)")
    d, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = d // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"llama.{key}", head_dim) != head_dim:
            raise LmforgeError(f"{where}: llama.{key}={meta[f'llama.{key}']} differs from the head dim {head_dim}")
    cfg = ModelConfig(
        vocab_size=vocab_rows, n_layer=int(get("block_count")), d_model=d, n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)), d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")), rope_theta=_f32(get("rope.freq_base", 10000.0)),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon")), tie_embeddings=tied, qkv_bias=qkv_bias, **experts,
    )  # fmt: skip
    try:
        return cfg.validate()
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None


def read_gguf(path: Path) -> Imported:
    """A llama-architecture .gguf -> Imported: dequantized fp32 weights in HF layout, config, tokenizer files."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise LmforgeError("reading .gguf files needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError, struct errors, IndexError... on junk)
        raise LmforgeError(
            f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    meta = _metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise LmforgeError(f"{path}: no token_embd.weight tensor")
    vocab_rows = int(by_name["token_embd.weight"].shape[-1])  # ggml shape [d, vocab]
    tied = "output.weight" not in by_name  # llama.cpp stores no output matrix for a tied head
    qkv_bias = "blk.0.attn_q.bias" in by_name  # Qwen2-style q/k/v biases (llama.cpp's llama graph takes them)
    cfg = config_from_gguf(meta, path, vocab_rows, tied, qkv_bias)
    if "tokenizer.ggml.tokens" not in meta:
        raise LmforgeError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    try:
        tokenizer_files = build_tokenizer(meta, cfg.max_seq_len)
    except LmforgeError as e:
        raise LmforgeError(f"{path}: {e}") from None

    tensors = {}
    for t in reader.tensors:
        name = lmforge_name(t.name)
        if name is None:
            raise LmforgeError(
                f"{path}: tensor {t.name} has no place in the lmforge model (e.g. rope_freqs: RoPE scaling)"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise LmforgeError(f"{path}: {t.name} is {t.tensor_type.name}, which gguf cannot dequantize") from None
        w = torch.from_numpy(w.copy())  # copy: detach from the read-only memory map
        if ".q_proj." in name:
            w = unpermute_qk(w, cfg.n_head)
        elif ".k_proj." in name:
            w = unpermute_qk(w, cfg.n_kv_head)
        tensors[name] = w
    source = {"kind": "gguf", "path": str(path.resolve()), "architecture": "llama",
              "name": meta.get("general.name"), "file_type": meta.get("general.file_type")}  # fmt: skip
    return Imported(cfg, tensors, tokenizer_files, source)
