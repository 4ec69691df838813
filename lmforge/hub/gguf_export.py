"""`lmforge export --format gguf`: an lmforge run, checkpoint or imported folder -> a GGUF file llama.cpp runs.

    lmforge export runs/demo/sft --format gguf --out demo.gguf                         # f32 (the default)
    lmforge export models/smollm2 --format gguf --dtype q8_0 --out smol.q8_0.gguf --modelfile
    python -c "from llama_cpp import Llama; print(Llama('demo.gguf')('To be', max_tokens=8)['choices'][0]['text'])"
    ollama create smol -f Modelfile                                                     # the Modelfile beside it

The inverse of lmforge/hub/gguf_import.py, written with the `gguf` package as llama.cpp's own
convert_hf_to_gguf.py writes a `llama` model (names from `gguf_import.TOP_NAMES`/`LAYER_NAMES`,
q/k rows and biases through `permute_qk`, no `output.weight` when the head is tied). Weight types:
- f32, f16, bf16: 2-D weights in that type, 1-D ones (norms, biases) in F32, as the converter does;
- q8_0: the converter's `--outtype q8_0`: every 2-D weight Q8_0, the embedding and the head included;
- q4_0: what llama-quantize's Q4_0 does, except one step: it keeps the output matrix (the embedding when
  tied) at Q6_K, which the `gguf` package cannot write, so it is Q8_0 here (more precise, ~30% larger);
- a weight whose rows are not a multiple of the 32-value block falls back to F16, as in both tools.
A mixture of experts (`n_experts`) is written as the converter writes Mixtral: `llama.expert_count` and
`expert_used_count`, the router `ffn_gate_inp` (always F32, as there) and each layer's experts stacked in
`ffn_{gate,up,down}_exps`, as lmforge stacks them.
The default is f32: the export is lossless (llama.cpp computes the same function lmforge does), and a
smaller type is a choice the user makes, as `--format hf --dtype auto` keeps the checkpoint's dtype.
Llama's graph in llama.cpp has optional q/k/v biases, so Qwen2-style `qkv_bias` models are written too
(their biases permuted like the rows); what the graph cannot compute (ALiBi, learned or sinusoidal
positions, LayerNorm, GELU, QK-norm, biases on every linear) is refused, naming the config field.

The tokenizer becomes `tokenizer.*` metadata: byte-level BPE ("gpt2"), tokens, merges, types (3 control
= special added tokens, 4 user-defined = other added tokens, 5 unused = `[PAD<id>]` placeholders that fill
the token list up to the embedding rows, which llama.cpp requires), bos/eos/pad/unk/eot ids, add_bos
(whether the tokenizer's own post-processor adds BOS) and the chat template (lmforge's tokenizers: ChatML,
via `hf.hf_tokenizer_files`). llama.cpp re-implements each pre-tokenizer by *name* (`tokenizer.ggml.pre`),
so the name is chosen by comparing tokenizer.json's pre-tokenizer with the ones `gguf_import.PRE_TOKENIZERS`
builds (gpt-2, smollm, llama-bpe, qwen2); a pre-tokenizer llama.cpp has no name for is refused. lmforge's
own pattern (lmforge/tokenizer/train.py) has no twin in llama.cpp: its nearest, qwen2, splits differently
only next to Han characters and non-ASCII numerals (lmforge cuts Han runs off neighbouring letters and
punctuation and groups full-width digits). It is written as qwen2 when no token of the vocabulary can
cross such a place, since then both splits give the same tokens (`crossing_token`), and refused otherwise.
A tokenizer with a normalizer other than NFC is refused (llama.cpp normalizes nothing; NFC text is unchanged).

`--modelfile` writes an Ollama `Modelfile` beside the file (FROM, TEMPLATE, SYSTEM for a template's default
system prompt, PARAMETER stop). Only ChatML templates are translated (checked by rendering conversations);
any other template is refused with a one-line error before anything is written.
The file is written under a temporary name and renamed; an existing --out (or Modelfile) is refused.
"""

from __future__ import annotations

import json
import unicodedata
from functools import cache
from itertools import pairwise
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.hub.common import TURN_END_TOKENS, expected_shapes, n_params, token_text
from lmforge.hub.gguf_import import (
    CONTROL,
    EXPERT_NAMES,
    LAYER_NAMES,
    PRE_TOKENIZERS,
    TOP_NAMES,
    USER_DEFINED,
    permute_qk,
)
from lmforge.tokenizer.special import IM_END, IM_START, bytes_to_unicode

# --dtype -> (general.file_type, the type of 2-D weights); the numbers are gguf.LlamaFileType's.
FILE_TYPES = {"f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q8_0": (7, "Q8_0"), "q4_0": (2, "Q4_0")}
QUANT_BLOCK = 32  # values per Q8_0/Q4_0 block: a row must be a whole number of blocks
NORMAL, UNUSED = 1, 5
# llama.cpp's name for the pre-tokenizers gguf_import rebuilds (the import's "gpt2" is llama.cpp's "gpt-2").
LLAMA_CPP_PRE = {"gpt2": "gpt-2", "smollm": "smollm", "llama-bpe": "llama-bpe", "qwen2": "qwen2"}
_TOP = {v: k for k, v in TOP_NAMES.items()}
_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_EXPERTS = {v: k for k, v in EXPERT_NAMES.items()}

# ----------------------------------------------------------------------------- weights


def gguf_name(name: str) -> str:
    """`layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`: the inverse of `gguf_import.lmforge_name`."""
    if name in _TOP:
        return _TOP[name]
    _, i, rest = name.split(".", 2)
    if rest in _EXPERTS:  # a mixture of experts' stacked matrices, stacked the same way in GGUF
        return f"blk.{i}.{_EXPERTS[rest]}.weight"
    inner, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER[inner]}.{kind}"


def tensor_type(gname: str, shape: tuple[int, ...], dtype: str, tied: bool) -> str:
    """The GGML type a tensor is stored in (see the module docstring for the rules and where they come from)."""
    if len(shape) == 1 or ".ffn_gate_inp." in gname:  # the router stays F32, as llama.cpp's converter keeps it
        return "F32"
    want = FILE_TYPES[dtype][1]
    if dtype == "q4_0" and (gname == "output.weight" or (tied and gname == "token_embd.weight")):
        want = "Q8_0"
    if want in ("Q8_0", "Q4_0") and shape[-1] % QUANT_BLOCK:
        want = "F16"
    return want


def gguf_tensors(tensors: dict[str, torch.Tensor], cfg, dtype: str):
    """Yield (GGUF name, numpy data, GGML type name) in the model's order, q/k permuted, quantized as asked."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    for name in expected_shapes(cfg):
        w = tensors[name].detach().to(torch.float32)
        if ".q_proj." in name:
            w = permute_qk(w, cfg.n_head)
        elif ".k_proj." in name:
            w = permute_qk(w, cfg.n_kv_head)
        gname = gguf_name(name)
        kind = tensor_type(gname, tuple(w.shape), dtype, cfg.tie_embeddings)
        yield gname, quantize(w.contiguous().numpy(), GGMLQuantizationType[kind]), kind


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_json(pre) -> dict:
    """A `tokenizers` pre-tokenizer as tokenizer.json spells it, `trim_offsets` left out (it moves offsets, not ids)."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    return _without_trim(json.loads(tok.to_str())["pre_tokenizer"])


def _without_trim(obj):
    if isinstance(obj, dict):
        return {k: _without_trim(v) for k, v in obj.items() if k != "trim_offsets"}
    if isinstance(obj, list):
        return [_without_trim(v) for v in obj]
    return obj


def _kind(ch: str, han: bool) -> str:
    """space, han (a Han letter), odd (another Han-script character, a non-ASCII numeral) or plain."""
    cat = unicodedata.category(ch)
    if ch == " ":
        return "space"
    if han and cat[0] == "L":
        return "han"
    return "odd" if han or (ord(ch) > 127 and cat[0] == "N") else "plain"


def _kinds(text: str) -> set[str]:
    from tokenizers import Regex, pre_tokenizers

    # \p{Han} as the tokenizer's own regex engine reads it: what is left after removing every non-Han character.
    han = [False] * len(text)
    for _, (start, end) in pre_tokenizers.Split(Regex(r"[^\p{Han}]"), "removed").pre_tokenize_str(text):
        han[start:end] = [True] * (end - start)
    return {_kind(ch, h) for ch, h in zip(text, han)}


@cache
def _partial_kinds(prefix: bytes) -> frozenset[str]:
    """The kinds of every character whose UTF-8 encoding starts with `prefix` (a lead byte and 0-2 more)."""
    n = 2 if prefix[0] < 0xE0 else 3 if prefix[0] < 0xF0 else 4
    cp = prefix[0] & (0x7F >> n)
    for b in prefix[1:]:
        cp = cp << 6 | (b & 0x3F)
    free = 6 * (n - len(prefix))
    lowest = (0x80, 0x800, 0x10000)[n - 2]  # below it: an overlong encoding, never produced
    chars = [
        chr(c) for c in range(cp << free, (cp + 1) << free) if lowest <= c <= 0x10FFFF and not 0xD800 <= c < 0xE000
    ]
    return frozenset(_kinds("".join(chars)))


_ANY = frozenset({"plain", "han", "odd"})  # the tail of a character that began before the token


def _segments(b: bytes) -> list[frozenset[str]]:
    """The possible kinds of each character a token's bytes touch, in order (partial characters included)."""
    segs, i = [], 0
    while i < len(b) and 0x80 <= b[i] < 0xC0:
        i += 1
    if i:
        segs.append(_ANY)
    while i < len(b):
        n = 1 if b[i] < 0x80 else 2 if b[i] < 0xE0 else 3 if b[i] < 0xF0 else 4
        chunk = b[i : i + n]
        if len(chunk) < n and all(0x80 <= c < 0xC0 for c in chunk[1:]):
            segs.append(_partial_kinds(chunk))
        else:
            try:
                segs.append(frozenset(_kinds(chunk.decode("utf-8"))))
            except UnicodeDecodeError:
                segs.append(_ANY)
        i += n
    return segs


def _same_split(a: str, b: str) -> bool:
    """Do lmforge's pattern and qwen2's treat a boundary between kinds a and b alike (both never cut a token there)?"""
    return (a in ("plain", "space") and b in ("plain", "space")) or (b == "han" and a in ("han", "space"))


def crossing_token(vocab: dict[str, int]) -> str | None:
    """A vocabulary token that could cross a place where lmforge's pre-tokenizer and llama.cpp's qwen2 split apart.

    The two patterns differ only at boundaries touching a Han character or a non-ASCII numeral: next to
    other letters or punctuation (qwen2 keeps "AI模型" and "，我" whole, lmforge cuts them) and between
    numerals (qwen2 splits "１９", lmforge keeps it). Byte-level BPE gives the same tokens for both splits
    unless some merge joins bytes across such a boundary, i.e. unless a token contains one. A token's
    partial characters count as every character they could be part of. None: the splits always agree.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for token in vocab:
        if len(token) < 2 or not set(token) <= byte_of.keys():
            continue
        raw = bytes(byte_of[c] for c in token)
        if max(raw) < 0x80:
            continue
        segs = _segments(raw)
        for left, right in pairwise(segs):
            if not all(_same_split(a, b) for a in left for b in right):
                return raw.decode("utf-8", errors="backslashreplace")
    return None


def llama_cpp_pre(spec: dict, where: Path) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text as tokenizer.json `spec` does, or an error."""
    from lmforge.tokenizer.train import new_tokenizer

    got = _without_trim(spec.get("pre_tokenizer"))
    for key, name in LLAMA_CPP_PRE.items():
        if got == _pre_tokenizer_json(PRE_TOKENIZERS[key]()):
            return name
    if got == _pre_tokenizer_json(new_tokenizer().pre_tokenizer):
        token = crossing_token(spec["model"]["vocab"])
        if token is None:
            return "qwen2"
        raise LmforgeError(
            f"{where}: lmforge's pre-tokenizer has no twin in llama.cpp; its nearest, qwen2, splits differently "
            f"next to Han characters and non-ASCII numerals, and this vocabulary's token {token!r} can cross such a "
            "place, so llama.cpp would tokenize differently"
        )
    shown = json.dumps(got, ensure_ascii=False)
    raise LmforgeError(
        f"{where}: pre-tokenizer {shown[:160]} matches none llama.cpp knows ({', '.join(LLAMA_CPP_PRE.values())}); "
        "llama.cpp would tokenize differently"
    )


def gguf_tokenizer(tok_dir: Path, cfg) -> dict:
    """Everything `tokenizer.*` holds for an lmforge tokenizer folder, as a dict of plain values."""
    from tokenizers import Tokenizer

    from lmforge.hub.hf import hf_tokenizer_files

    files, ids, _ = hf_tokenizer_files(tok_dir, cfg)  # the chat template (ChatML inserted) and bos/eos/pad ids
    spec = json.loads(files["tokenizer.json"])
    tok_cfg = json.loads(files["tokenizer_config.json"])
    where = tok_dir / "tokenizer.json"
    model = spec.get("model") or {}
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise LmforgeError(
            f"{where}: a {model.get('type')} model with a {decoder} decoder; GGUF export needs byte-level BPE"
        )
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise LmforgeError(f"{where}: BPE {key}={model[key]!r} has no equivalent in llama.cpp")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise LmforgeError(f"{where}: normalizer {normalizer} is not applied by llama.cpp")
    pre = llama_cpp_pre(spec, where)

    tokens: list[str | None] = [None] * cfg.vocab_size
    types = [NORMAL] * cfg.vocab_size
    for text, i in model["vocab"].items():
        tokens[i] = text
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    for i, text in enumerate(tokens):  # unused ids and lmforge's padded embedding rows
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED

    # What the tokenizer itself adds around a text (lmforge encodes prompts with add_special_tokens on).
    tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), None)
    before, after = (full[:start], full[start + len(plain) :]) if start is not None else (full, [])
    if before not in ([], [ids["bos"]]) or after not in ([], [ids["eos"]]):
        raise LmforgeError(f"{where}: its post-processor adds tokens {before} ... {after}; llama.cpp adds only BOS/EOS")

    unk = tok.token_to_id(token_text(tok_cfg.get("unk_token")) or "")
    eot = next((tok.token_to_id(t) for t in TURN_END_TOKENS if tok.token_to_id(t) is not None), None)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {
        "pre": pre, "tokens": tokens, "types": types, "merges": merges, "bos": ids["bos"], "eos": ids["eos"],
        "pad": ids["pad"], "unk": unk, "eot": eot, "add_bos": bool(before), "add_eos": bool(after),
        "chat_template": tok_cfg.get("chat_template"), "tok_cfg": tok_cfg,
    }  # fmt: skip


# ----------------------------------------------------------------------------- Ollama Modelfile

# Ollama's Go-template spelling of ChatML: one turn per message, then an open assistant turn.
OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
_CONVERSATIONS = [
    ([{"role": "user", "content": "Hi!"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}], True),
    ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}], False),
]  # fmt: skip


def _chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return turns + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chatml_default_system(template, tok_cfg: dict) -> str | None:
    """'' for plain ChatML, the system prompt a ChatML template inserts when there is none, or a one-line error."""
    from lmforge.chat.template import _compile

    if not isinstance(template, str):
        raise LmforgeError("--modelfile: the tokenizer has no single chat template to translate for Ollama")
    special = {k: token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(messages, gen):
        try:
            return _compile(template).render(messages=messages, add_generation_prompt=gen, **special)
        except Exception as e:  # noqa: BLE001 (a template may raise anything on a conversation it rejects)
            raise LmforgeError(f"--modelfile: the chat template fails on a plain conversation ({e})") from None

    first = render(*_CONVERSATIONS[0])
    head = f"{IM_START}system\n"
    rest = _chatml(*_CONVERSATIONS[0])
    system = ""
    if first != rest and first.startswith(head) and first.endswith(IM_END + "\n" + rest):
        system = first[len(head) : -len(IM_END + "\n" + rest)]
    for messages, gen in _CONVERSATIONS:
        with_system = (
            [{"role": "system", "content": system}] + messages
            if system and messages[0]["role"] != "system"
            else messages
        )
        if render(messages, gen) != _chatml(with_system, gen):
            raise LmforgeError(
                "--modelfile: the chat template is not ChatML; lmforge translates only ChatML to Ollama's template "
                "syntax (export without --modelfile and write the Modelfile's TEMPLATE by hand)"
            )
    if '"""' in system:
        raise LmforgeError(
            '--modelfile: the template\'s default system prompt contains """, which a Modelfile cannot quote'
        )
    return system


def modelfile_text(gguf_file: str, system: str) -> str:
    lines = [
        "# Ollama Modelfile written by `lmforge export --modelfile` (the model's chat template is ChatML).",
        "# ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{OLLAMA_CHATML}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines.append(f'PARAMETER stop "{IM_END}"')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- export


def export_gguf(source: str | Path, out: str | Path, dtype: str = "f32", modelfile: bool = False) -> dict:
    """Write the GGUF file `out` (and an Ollama Modelfile beside it) from a run/checkpoint folder; return a summary."""
    try:
        import gguf
    except ImportError:
        raise LmforgeError("writing .gguf files needs the gguf package: pip install gguf") from None
    from lmforge.fileio import atomic_path, atomic_write_text
    from lmforge.hub.export_cmd import checkpoint_tensors, open_checkpoint
    from lmforge.hub.hf import unsupported_for_hf
    from lmforge.train.checkpoint import tokenizer_dir

    if dtype not in FILE_TYPES:
        raise LmforgeError(f"--dtype must be one of {', '.join(FILE_TYPES)} for GGUF, got {dtype!r}")
    out = Path(out)
    modelfile_path = out.parent / "Modelfile" if modelfile else None
    for path in (out, modelfile_path):
        if path is not None and path.exists():
            raise LmforgeError(f"--out {path} exists; refusing to replace it (remove it or pick another name)")
    ckpt, meta, cfg = open_checkpoint(source)
    bad = unsupported_for_hf(cfg)  # llama.cpp's llama graph computes the same variants as HF Llama/Qwen2
    if bad is not None:
        raise LmforgeError(f"{ckpt}: {bad} cannot be exported to GGUF (llama.cpp's llama architecture)")
    tok = gguf_tokenizer(tokenizer_dir(ckpt, meta), cfg)  # before the weights: its errors are cheap
    system = chatml_default_system(tok["chat_template"], tok["tok_cfg"]) if modelfile else ""
    tensors = checkpoint_tensors(ckpt, meta, cfg)

    name = (meta.get("source") or {}).get("name") or Path(source).resolve().name
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_file_type(FILE_TYPES[dtype][0])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.n_experts:
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.experts_top_k)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                          ("unk", w.add_unk_token_id), ("eot", w.add_eot_token_id)):  # fmt: skip
            if tok[role] is not None:
                add(tok[role])
        w.add_add_bos_token(tok["add_bos"])
        w.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        types = {}
        for gname, data, kind in gguf_tensors(tensors, cfg, dtype):
            w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind])
            types[kind] = types.get(kind, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if modelfile_path is not None:
        atomic_write_text(modelfile_path, modelfile_text(out.name, system))
    return {
        "params": n_params(tensors), "dtype": dtype, "tensor_types": types, "pre": tok["pre"],
        "bytes": out.stat().st_size, "from": str(ckpt), "out": str(out),
        "modelfile": str(modelfile_path) if modelfile_path else None,
    }  # fmt: skip
