"""Hugging Face model folders <-> lmforge: config mapping, weight names, tokenizer files.

    lmforge import path/to/SmolLM2-135M-Instruct --out models/smollm2     # read_hf_folder
    lmforge export models/smollm2 --format hf --out hf/smollm2            # hf_config, hf_tensors, hf_tokenizer_files

lmforge's parameter names are HF Llama's without the leading `model.`, and its RoPE is HF's
rotate-half layout, so weights map one to one: only names, the tied head and the config differ.
Llama, Mistral and Qwen2 (q/k/v biases) are the same network for lmforge's purposes, and Mixtral is Mistral
with lmforge's mixture-of-experts MLP (`n_experts`; Mixtral stores each expert's w1/w3/w2 matrices apart, lmforge
stacks them: `moe_from_hf` / `moe_to_hf`); anything
the lmforge model cannot compute exactly (RoPE scaling, a head_dim that is not hidden/heads, a
non-SiLU MLP, an o_proj bias, a sliding window shorter than the context) is refused with a
one-line error, except the sliding window, which caps `max_seq_len` (see `_sliding_window`).
Weights are read from safetensors only: pickled `.bin` files are never loaded (unpickling can
run arbitrary code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.hub.common import TURN_END_TOKENS, Imported, token_text
from lmforge.model.transformer import ModelConfig
from lmforge.tokenizer.special import CHAT_TEMPLATE, IM_END, IM_START

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "MixtralForCausalLM": "mixtral"}  # fmt: skip
# lmforge's stacked expert matrices -> Mixtral's per-expert names (w1: gate, w3: up, w2: down).
MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# Tokenizer files copied along with a model; anything else in the folder (READMEs, .bin, vocab.txt) is not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- reading


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: unreadable JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return obj


def _rope_theta(hf: dict, where: Path) -> float:
    """RoPE base from either config style: `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    if hf.get("rope_scaling") is not None:
        raise LmforgeError(f"{where}: rope_scaling {json.dumps(hf['rope_scaling'])} is not supported (plain RoPE only)")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise LmforgeError(f"{where}: rope_parameters.rope_type={params['rope_type']!r} is not supported (plain RoPE)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise LmforgeError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: dict, arch: str, n_layer: int) -> int | None:
    """The attention window in effect, or None when every layer attends to the whole context.

    Mistral applies `sliding_window` when it is set; Qwen2 only with `use_sliding_window` (and
    then only in layers from `max_window_layers` on; transformers 5 spells this out in `layer_types`).
    """
    window = hf.get("sliding_window")
    if not window or arch == "LlamaForCausalLM":
        return None
    if arch == "Qwen2ForCausalLM":
        if hf.get("layer_types") is not None:
            active = "sliding_attention" in hf["layer_types"]
        else:
            active = bool(hf.get("use_sliding_window")) and hf.get("max_window_layers", 0) < n_layer
        return int(window) if active else None
    return int(window)


def config_from_hf(hf: dict, where: Path) -> tuple[ModelConfig, str, list[str]]:
    """(ModelConfig, architecture, notes) from a config.json dict, or a one-line error naming the misfit."""
    archs = hf.get("architectures") or [hf.get("model_type", "unknown")]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise LmforgeError(f"{where}: unsupported architecture {arch}; lmforge imports Llama, Mistral, Qwen2, Mixtral")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise LmforgeError(f"{where}: {key} is missing or not an integer")
    d, n_head, n_layer = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    if hf.get("hidden_act", "silu") != "silu":
        raise LmforgeError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (lmforge's SwiGLU uses silu)")
    if hf.get("head_dim") not in (None, d // n_head) or d % n_head:
        raise LmforgeError(f"{where}: head_dim={hf.get('head_dim')} differs from hidden_size/num_attention_heads")
    if hf.get("attention_bias"):
        raise LmforgeError(f"{where}: attention_bias=true (a bias on o_proj) is not supported")
    if hf.get("mlp_bias"):
        raise LmforgeError(f"{where}: mlp_bias=true is not supported")
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    notes = []
    window = _sliding_window(hf, arch, n_layer)
    if window is not None and window < max_pos:
        # Within the window, sliding-window attention is plain causal attention, so capping the
        # context there keeps the model exact instead of silently computing something else.
        notes.append(f"sliding window {window} < context {max_pos}: max_seq_len capped at {window}")
        max_pos = window
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=n_layer, d_model=d, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_ff=hf["intermediate_size"], max_seq_len=max_pos,
        pos_encoding="rope", rope_theta=_rope_theta(hf, where), norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "Qwen2ForCausalLM",
        init_std=float(hf.get("initializer_range", 0.02)), **_experts_from_hf(hf, arch, where),
    )  # fmt: skip
    try:
        cfg.validate()
    except LmforgeError as e:
        raise LmforgeError(f"{where}: {e}") from None
    return cfg, arch, notes


def _experts_from_hf(hf: dict, arch: str, where: Path) -> dict:
    """Mixtral's expert fields as ModelConfig fields ({} for a dense architecture)."""
    if arch != "MixtralForCausalLM":
        return {}
    for key in ("num_local_experts", "num_experts_per_tok"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise LmforgeError(f"{where}: {key} is missing or not a positive integer")
    return {"n_experts": hf["num_local_experts"], "experts_top_k": hf["num_experts_per_tok"],
            "moe_aux_coef": float(hf.get("router_aux_loss_coef", 0.02))}  # fmt: skip


def moe_from_hf(tensors: dict[str, torch.Tensor], n_layer: int, n_experts: int, where: Path) -> dict[str, torch.Tensor]:
    """Mixtral's expert weights as the hub stores them (and transformers 4 and 5 save them), `block_sparse_moe.gate`
    and `block_sparse_moe.experts.{j}.w1/w3/w2` (each expert's gate, up, down), -> lmforge's stacked ones."""
    out = dict(tensors)
    for i in range(n_layer):
        hf, mine = f"layers.{i}.block_sparse_moe.", f"layers.{i}.mlp."
        if hf + "gate.weight" in out:
            out[mine + "gate.weight"] = out.pop(hf + "gate.weight")
        for name, hf_name in MIXTRAL_EXPERTS.items():
            keys = [f"{hf}experts.{j}.{hf_name}.weight" for j in range(n_experts)]
            missing = [k for k in keys if k not in out]
            if len(missing) == len(keys):  # none of them: check_tensors names the stacked weight
                continue
            if missing:
                raise LmforgeError(f"{where}: weight model.{missing[0]} is missing ({len(missing)} of layer {i}'s "
                                   f"{n_experts} experts' {hf_name})")  # fmt: skip
            out[mine + name] = torch.stack([out.pop(k) for k in keys])
    return out


def moe_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge's stacked expert weights -> Mixtral's hub layout (one w1/w3/w2 per expert), which transformers 4 and
    5 and llama.cpp's converter all read; other tensors pass through."""
    out = {}
    for name, t in tensors.items():
        layer, _, rest = name.partition(".mlp.")
        if rest == "gate.weight":
            out[f"{layer}.block_sparse_moe.gate.weight"] = t
        elif rest in MIXTRAL_EXPERTS and t.dim() == 3:
            for j in range(t.shape[0]):
                out[f"{layer}.block_sparse_moe.experts.{j}.{MIXTRAL_EXPERTS[rest]}.weight"] = t[j].contiguous()
        else:
            out[name] = t
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmforgeError(f"{index}: no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    if pickles:
        raise LmforgeError(
            f"{pickles[0]}: pickled PyTorch weights are not loaded (unpickling can run arbitrary code); "
            "convert the model to safetensors first (transformers: save_pretrained(out, safe_serialization=True))"
        )
    raise LmforgeError(f"{folder}: no *.safetensors weights found")


def read_hf_tensors(folder: Path, tied: bool) -> dict[str, torch.Tensor]:
    """All weights of an HF folder (sharded or not), renamed to lmforge's names."""
    from safetensors import SafetensorError, safe_open

    out = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.endswith("rotary_emb.inv_freq"):  # a recomputed buffer some old checkpoints saved
                        continue
                    out[key.removeprefix("model.")] = f.get_tensor(key)
        except FileNotFoundError:
            raise LmforgeError(f"{path}: not found (listed in model.safetensors.index.json)") from None
        except (OSError, SafetensorError, ValueError) as e:
            raise LmforgeError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    if tied:
        out.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    return out


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The chat template from tokenizer_config.json, or transformers 5's separate chat_template.jinja/.json."""
    if tok_cfg.get("chat_template"):
        return tok_cfg["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return read_json(folder / "chat_template.json").get("chat_template")
    return None


def read_hf_tokenizer(folder: Path, hf: dict, vocab_rows: int) -> dict[str, bytes]:
    """tokenizer.json (verbatim) and tokenizer_config.json (chat template folded in, EOS = turn end for chat models)."""
    from lmforge.tokenizer.special import load_tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder / 'tokenizer.json'}: not found (lmforge needs the fast tokenizer file)")
    tok = load_tokenizer(folder)
    if tok.get_vocab_size() > vocab_rows:
        raise LmforgeError(f"{folder}: tokenizer has {tok.get_vocab_size()} tokens, the model only {vocab_rows} rows")
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    tok_cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for role in ("bos", "eos", "pad"):  # a folder without tokenizer_config.json: take the roles from config.json
        token_id = hf.get(f"{role}_token_id")
        if f"{role}_token" not in tok_cfg and isinstance(token_id, int) and tok.id_to_token(token_id) is not None:
            tok_cfg[f"{role}_token"] = tok.id_to_token(token_id)
    template = _chat_template(folder, tok_cfg)
    if template:
        tok_cfg["chat_template"] = template
    # generation_config.json lists every id that ends generation; if it names a turn-end token, this is a
    # chat model and that token is its EOS (lmforge reads one EOS from tokenizer_config.json).
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    stop_ids = gen.get("eos_token_id")
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
    for token in TURN_END_TOKENS:
        if tok.token_to_id(token) is not None and tok.token_to_id(token) in stop_ids:
            tok_cfg["eos_token"] = token
            break
    files = {"tokenizer.json": (folder / "tokenizer.json").read_bytes(), "tokenizer_config.json": _json_bytes(tok_cfg)}
    if (folder / "special_tokens_map.json").is_file():
        special = read_json(folder / "special_tokens_map.json")
        special["eos_token"] = tok_cfg.get("eos_token", special.get("eos_token"))
        files["special_tokens_map.json"] = _json_bytes(special)
    return files


def read_hf_folder(folder: Path) -> Imported:
    """A Hugging Face Llama/Mistral/Qwen2 folder -> Imported (config, lmforge-named weights, tokenizer files)."""
    if not (folder / "config.json").is_file():
        raise LmforgeError(
            f"{folder / 'config.json'}: not found (expected a Hugging Face model folder or a .gguf file)"
        )
    hf = read_json(folder / "config.json")
    if hf.get("model_type") == "bert":
        from lmforge.hub.bert import read_bert_folder

        return read_bert_folder(folder, hf)
    if hf.get("model_type") == "t5":
        from lmforge.hub.t5 import read_t5_folder

        return read_t5_folder(folder, hf)
    cfg, arch, notes = config_from_hf(hf, folder / "config.json")
    tokenizer_files = read_hf_tokenizer(folder, hf, cfg.vocab_size)  # first: cheap, so its errors come fast
    tensors = read_hf_tensors(folder, cfg.tie_embeddings)
    if cfg.n_experts:
        tensors = moe_from_hf(tensors, cfg.n_layer, cfg.n_experts, folder)
    source = {"kind": "hf", "path": str(folder.resolve()), "architecture": arch}
    return Imported(cfg, tensors, tokenizer_files, source, notes)


# ----------------------------------------------------------------------------- writing


def unsupported_for_hf(cfg: ModelConfig) -> str | None:
    """The first config field HF Llama/Qwen2 cannot represent, as `field=value`, or None.

    llama.cpp's `llama` graph computes the same variants, so `lmforge export --format gguf` asks this too.
    """
    defaults = {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "bias": False}
    for name, value in defaults.items():
        if getattr(cfg, name) != value:
            return f"model.{name}={getattr(cfg, name)!r}"
    if cfg.n_experts and cfg.qkv_bias:  # Mixtral, the one expert layout written, has no q/k/v biases
        return f"model.qkv_bias=True with n_experts={cfg.n_experts}"
    return None


def hf_config(cfg: ModelConfig, dtype_name: str, special_ids: dict[str, int | None]) -> tuple[dict, str]:
    """(config.json dict, architecture): LlamaForCausalLM, Qwen2ForCausalLM for q/k/v biases, MixtralForCausalLM
    for a mixture of experts."""
    arch = "MixtralForCausalLM" if cfg.n_experts else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    config = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size,  # embedding rows (lmforge pads them to a multiple of 64), not tokenizer size
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 4 reads rope_theta/rope_scaling, transformers 5 rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "torch_dtype": dtype_name,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "MixtralForCausalLM":
        config.update(sliding_window=None, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_top_k,
                      router_aux_loss_coef=cfg.moe_aux_coef, output_router_logits=False, router_jitter_noise=0.0)  # fmt: skip
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return config, arch


def hf_tensors(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """lmforge names -> HF names (`model.` prefix; `lm_head.weight` only when untied; experts as Mixtral's)."""
    out = {("" if name == "lm_head.weight" else "model.") + name: t for name, t in moe_to_hf(tensors).items()}
    if tied:
        out.pop("lm_head.weight", None)
    return out


def hf_tokenizer_files(tok_dir: Path, cfg: ModelConfig) -> tuple[dict[str, bytes], dict[str, int | None], list[int]]:
    """(files, {bos, eos, pad} ids, generation stop ids) for an exported folder, from an lmforge tokenizer folder.

    The chat template is kept, or ChatML inserted when the vocabulary has ChatML's tokens (lmforge's own
    tokenizers always do). Generation stops at EOS and at the turn-end token, if there is one.
    """
    from lmforge.tokenizer.special import load_tokenizer

    tok = load_tokenizer(tok_dir)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise LmforgeError(
            f"{tok_dir}: tokenizer has {tok.get_vocab_size()} tokens, the model only {cfg.vocab_size} rows"
        )
    path = tok_dir / "tokenizer_config.json"
    tok_cfg = read_json(path) if path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    if not tok_cfg.get("chat_template"):
        template = _chat_template(tok_dir, tok_cfg)
        if template is None and tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None:
            template = CHAT_TEMPLATE
        if template is not None:
            tok_cfg["chat_template"] = template
    tok_cfg["model_max_length"] = cfg.max_seq_len
    ids = {role: tok.token_to_id(token_text(tok_cfg.get(f"{role}_token")) or "") for role in ("bos", "eos", "pad")}
    stop = [ids["eos"]] if ids["eos"] is not None else []
    for token in TURN_END_TOKENS:
        if tok.token_to_id(token) is not None and tok.token_to_id(token) not in stop:
            stop.append(tok.token_to_id(token))
            break
    special = {
        f"{role}_token": tok_cfg[f"{role}_token"]
        for role in ("bos", "eos", "pad", "unk")
        if tok_cfg.get(f"{role}_token")
    }
    extra = tok_cfg.get("additional_special_tokens")
    if extra:
        special["additional_special_tokens"] = extra
    files = {
        "tokenizer.json": (tok_dir / "tokenizer.json").read_bytes(),
        "tokenizer_config.json": _json_bytes(tok_cfg),
        "special_tokens_map.json": _json_bytes(special),
    }
    return files, ids, stop


def generation_config(ids: dict[str, int | None], stop: list[int]) -> dict:
    return {
        "bos_token_id": ids.get("bos"),
        "eos_token_id": stop if len(stop) > 1 else (stop[0] if stop else None),
        "pad_token_id": ids.get("pad"),
    }


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
