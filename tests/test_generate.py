"""The generation engine and the sampling functions: `python -m pytest -q tests/test_generate.py`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.transformer import MLPS, NORMS, POS_ENCODINGS, KVCache
from lmforge.serve.generate import FusedDecoder, generate, generate_no_cache
from lmforge.serve.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, pick


def tiny(pos_encoding="rope", seed=0) -> Transformer:
    torch.manual_seed(seed)
    # A large init and an untied head give peaked, varied logits, so greedy text does not just repeat a token.
    cfg = ModelConfig(
        vocab_size=101, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=64, pos_encoding=pos_encoding,
        init_std=0.3, tie_embeddings=False,
    )  # fmt: skip
    return Transformer(cfg).eval()


PROMPTS = [[5, 17, 3, 99, 42, 8, 1], [7, 7, 23], [60, 2, 31, 4, 90]]


@pytest.mark.parametrize("pos", ["rope", "sinusoidal", "learned", "alibi"])
def test_greedy_cache_matches_full_recompute(pos):
    model = tiny(pos)
    for p in PROMPTS:
        assert generate(model, [p], 20, temperature=0) == [generate_no_cache(model, p, 20)]


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
def test_batched_left_padding_matches_each_prompt_alone(pos):
    model = tiny(pos)
    batched = generate(model, PROMPTS, 15, temperature=0)
    assert batched == [generate(model, [p], 15, temperature=0)[0] for p in PROMPTS]
    assert batched == [generate_no_cache(model, p, 15) for p in PROMPTS]


def test_stop_tokens_end_rows():
    model = tiny()
    free = [generate_no_cache(model, p, 20) for p in PROMPTS]
    stop = free[0][4]  # the 5th token of row 0, its first occurrence
    assert stop not in free[0][:4]
    out = generate(model, PROMPTS, 20, temperature=0, stop_ids=[stop])
    for row, full in zip(out, free):
        cut = full.index(stop) if stop in full else len(full)
        assert row == full[:cut]
    assert len(out[0]) == 4
    with_stop = generate(model, PROMPTS, 20, temperature=0, stop_ids=[stop], include_stop=True)
    assert with_stop[0] == free[0][:5]
    streamed = {}
    generate(
        model, PROMPTS, 20, temperature=0, stop_ids=[stop], stream=lambda r, t: streamed.setdefault(r, []).append(t)
    )
    assert [streamed.get(r, []) for r in range(3)] == out


def test_all_rows_stopped_ends_early():
    model = tiny()
    first = generate(model, [PROMPTS[0]], 1, temperature=0)[0][0]
    calls = []
    out = generate(model, [PROMPTS[0]], 30, temperature=0, stop_ids=[first], stream=lambda r, t: calls.append(t))
    assert out == [[]] and calls == []


def test_seeded_sampling_is_reproducible():
    model = tiny()
    kw = {"temperature": 1.5, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3}
    a = generate(model, PROMPTS, 25, seed=123, **kw)
    b = generate(model, PROMPTS, 25, seed=123, **kw)
    c = generate(model, PROMPTS, 25, seed=124, **kw)
    assert a == b and a != c
    assert all(len(r) == 25 for r in a)


def test_length_policy_truncates_prompt_from_left():
    model = tiny()  # max_seq_len 64
    long_prompt = list(range(1, 61))
    out = generate(model, [long_prompt], 10, temperature=0)
    assert out == generate(model, [long_prompt[-54:]], 10, temperature=0)
    with pytest.raises(LmforgeError):
        generate(model, [[1]], 64, temperature=0)
    with pytest.raises(LmforgeError):
        generate(model, [[]], 5)


# ----------------------------------------------------------------------------- the fused decode step

VARIANTS = {
    "rope-gqa": {},
    "learned-gelu-layernorm-bias": {"pos_encoding": "learned", "mlp": "gelu", "norm": "layernorm", "bias": True},
    "sinusoidal-qkv-bias": {"pos_encoding": "sinusoidal", "qkv_bias": True},
    "alibi-mqa": {"pos_encoding": "alibi", "n_kv_head": 1},
    "rope-qk-norm-tied": {"qk_norm": True, "tie_embeddings": True},
}


def variant(**overrides) -> Transformer:
    torch.manual_seed(0)
    kw = {"vocab_size": 101, "n_layer": 2, "d_model": 32, "n_head": 4, "n_kv_head": 2, "max_seq_len": 64}
    kw |= {"init_std": 0.3, "tie_embeddings": False} | overrides
    model = Transformer(ModelConfig(**kw)).eval()
    with torch.no_grad():  # nonzero biases, so a bias put in the wrong slot shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


def _check_fused_decode(model, batch: int, padded: bool) -> None:
    """Prefill a prompt, then decode 4 tokens both ways: the fused step's logits and cache equal the model's."""
    assert FusedDecoder.supports(model)
    P, steps, V = 6, 4, model.cfg.vocab_size
    torch.manual_seed(1)
    prompt = torch.randint(0, V, (batch, P))
    kw, key_mask = {}, None
    if padded:  # row 0 left-padded by 2: positions counted from its first real token
        key_mask = torch.ones(batch, P + steps, dtype=torch.bool)
        key_mask[0, :2] = False
        kw = {"positions": (key_mask[:, :P].long().cumsum(1) - 1).clamp(min=0), "key_mask": key_mask[:, :P]}
    ref_cache, fused_cache = KVCache(model.cfg, batch, P + steps), KVCache(model.cfg, batch, P + steps)
    model(prompt, cache=ref_cache, **kw)
    model(prompt, cache=fused_cache, **kw)
    decoder = FusedDecoder(model, batch)
    tok = torch.randint(0, V, (batch, steps))
    for i in range(steps):
        L = P + i + 1
        pos = kw["positions"][:, -1] + 1 + i if padded else None
        step_kw = {"positions": pos[:, None], "key_mask": key_mask[:, :L]} if padded else {}
        ref = model(tok[:, i : i + 1], cache=ref_cache, **step_kw)[0][:, -1]
        got = decoder(tok[:, i], fused_cache, *((pos, key_mask[:, :L]) if padded else ()))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert fused_cache.length == ref_cache.length
    torch.testing.assert_close(fused_cache.k, ref_cache.k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])  # batch 1 and above take different matmul layouts
@pytest.mark.parametrize("padded", [False, True])
@torch.inference_mode()
def test_fused_decode_step_matches_model_forward(name, batch, padded):
    _check_fused_decode(variant(**VARIANTS[name]), batch, padded)


# Every ModelConfig field, with the values the fused step is checked against the model's forward at. A new field
# fails test_every_model_field_is_checked_by_the_fused_decode_test until it is added here, so a variant the fused
# step would run differently (a new MLP, norm or position encoding) cannot slip past.
FIELD_VALUES = {
    "pos_encoding": list(POS_ENCODINGS),
    "norm": list(NORMS),
    "mlp": list(MLPS),
    "n_kv_head": [4, 2, 1],
    "d_ff": [None, 48],
    "qk_norm": [False, True],
    "bias": [False, True],
    "qkv_bias": [False, True],
    "tie_embeddings": [False, True],
    "rope_theta": [10000.0, 300.0],
    "norm_eps": [1e-5, 0.5],
}
SHAPE_FIELDS = {"vocab_size", "n_layer", "d_model", "n_head", "max_seq_len"}  # set by variant(), checked at its sizes
NOT_IN_DECODE = {"dropout", "init_std"}  # generation runs in eval mode; the init only draws the weights
# A mixture of experts decodes with the model's own forward (FusedDecoder.supports says no; tests/test_moe.py).
NOT_FUSED = {"n_experts", "experts_top_k", "moe_aux_coef", "block_positions"}  # GLM: tests/test_glm.py
# The encoder and encoder-decoder fields (encoder.py, t5.py): a decoder config refuses any value but the default.
ENCODER_FIELDS = {
    "family",
    "prenorm",
    "type_vocab_size",
    "embedding_size",
    "share_layers",
    "n_classes",
    "n_decoder_layer",
    "rel_buckets",
    "rel_max_distance",
}


def all_pairs(values: dict[str, list]) -> list[dict]:
    """Configs in which every pair of values of every two fields occurs at least once (greedy covering arrays)."""
    names = list(values)
    key = {n: i for i, n in enumerate(names)}

    def pairs(row: dict) -> set:
        return {(a, row[a], b, row[b]) for a in row for b in row if key[a] < key[b]}

    todo = {(a, i, b, j) for a in names for b in names if key[a] < key[b]
            for i in range(len(values[a])) for j in range(len(values[b]))}  # fmt: skip
    rows = []
    while todo:
        a, i, b, j = min(todo)
        row = {a: i, b: j}
        for n in names:
            if n not in row:
                row[n] = max(range(len(values[n])), key=lambda k: len(pairs({**row, n: k}) & todo))
        todo -= pairs(row)
        rows.append({n: values[n][row[n]] for n in names})
    return rows


def test_every_model_field_is_checked_by_the_fused_decode_test():
    covered = set(FIELD_VALUES) | SHAPE_FIELDS | NOT_IN_DECODE | NOT_FUSED | ENCODER_FIELDS
    assert {f.name for f in dataclasses.fields(ModelConfig)} == covered
    rows = all_pairs(FIELD_VALUES)
    seen = {(a, str(r[a]), b, str(r[b])) for r in rows for a in FIELD_VALUES for b in FIELD_VALUES}
    wanted = {(a, str(x), b, str(y)) for a in FIELD_VALUES for b in FIELD_VALUES if a != b
              for x in FIELD_VALUES[a] for y in FIELD_VALUES[b]}  # fmt: skip
    assert wanted <= seen and len(rows) < 30  # 6 MLPs x 4 position encodings need at least 24


@pytest.mark.parametrize("overrides", all_pairs(FIELD_VALUES), ids=lambda r: "-".join(f"{v}" for v in r.values()))
@torch.inference_mode()
def test_fused_decode_matches_the_model_for_every_pair_of_field_values(overrides):
    _check_fused_decode(variant(**overrides), batch=3, padded=True)


@pytest.mark.parametrize("name", VARIANTS)
def test_fused_generation_equals_unfused(name):
    model = variant(**VARIANTS[name])
    kw = {"temperature": 0, "stop_ids": [7]}
    assert generate(model, PROMPTS, 20, **kw) == generate(model, PROMPTS, 20, fused=False, **kw)
    assert generate(model, PROMPTS[:1], 20, **kw) == generate(model, PROMPTS[:1], 20, fused=False, **kw)
    sampled = {"temperature": 1.2, "top_k": 30, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 3}
    assert generate(model, PROMPTS, 20, **sampled) == generate(model, PROMPTS, 20, fused=False, **sampled)


@pytest.mark.parametrize("padded", [False, True])
@torch.inference_mode()
def test_fused_decode_folds_lora_adapters_in(padded):
    """A LoRA policy (GRPO/PPO rollouts) decodes through the fused step with its adapters folded in, and with them
    switched off (the reference) as the base model; the model itself is left as it was."""
    from lmforge.model.lora import LoraConfig, adapters_disabled, apply_lora

    model = variant()
    plain = generate(model, PROMPTS, 10, temperature=0)
    names = list(model.state_dict())
    apply_lora(model, LoraConfig(rank=2)).eval()  # the new layers' dropout off, as generate() does
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)  # a trained adapter: it changes the function
    assert FusedDecoder.supports(model)
    _check_fused_decode(model, batch=3, padded=padded)
    adapted = generate(model, PROMPTS, 10, temperature=0)
    assert adapted == generate(model, PROMPTS, 10, temperature=0, fused=False) and adapted != plain
    with adapters_disabled(model):
        _check_fused_decode(model, batch=3, padded=padded)
        assert generate(model, PROMPTS, 10, temperature=0) == plain
    assert len(list(model.state_dict())) == len(names) + 2 * sum(1 for n in names if n.endswith("proj.weight"))


# ----------------------------------------------------------------------------- sampling functions


def test_sampling_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, False, True, False]]))
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0
    assert torch.equal(apply_top_k(logits, None), logits)


def test_sampling_top_p_keeps_smallest_set_with_mass_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()
    assert keep(0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(0.6) == [True, False, True, False]  # 0.5 + 0.3 = 0.8 >= 0.6
    assert keep(0.85) == [True, False, True, True]  # 0.8 + 0.15 = 0.95
    assert keep(0.99) == [True, True, True, True]
    assert keep(0.01) == [True, False, False, False]  # the top token is always kept


def test_sampling_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_sampling_pick_greedy_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert pick(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([pick(logits, temperature=1.0, generator=g) for _ in range(4000)])
    freq = (draws[:, 0] == 1).float().mean().item()
    expected = math.exp(3) / (1 + math.exp(3) + math.exp(1))
    assert abs(freq - expected) < 0.03
    # top_k=1 is greedy whatever the temperature.
    assert pick(logits, temperature=5.0, top_k=1, generator=g).tolist() == [1, 0]


# ----------------------------------------------------------------------------- the CLI


def test_generate_cli_streams_and_is_seeded(small_shards, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import model_tensors, save_checkpoint

    tok_dir = small_shards.parent / "tok"
    cfg = ModelConfig(
        vocab_size=load_tokenizer(tok_dir).get_vocab_size(), n_layer=1, d_model=32, n_head=4, max_seq_len=64
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": str(tok_dir)}}
    save_checkpoint(tmp_path, 1, model_tensors(model.state_dict(), cfg.tie_embeddings), meta)
    argv = ["generate", str(tmp_path), "--prompt", "To be, or not", "--max-new-tokens", "12", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("To be, or not") and "tok/s" in first.err
    assert "stopped at --max-new-tokens=12" in first.err or "stopped at the end token" in first.err
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out
    assert main([*argv, "--prompt", "Second", "--temperature", "0"]) == 0
    batched = capsys.readouterr().out
    assert batched.count("--- prompt") == 2
    assert main([*argv, "--prompt", "Second", "--temperature", "0", "--no-fused"]) == 0
    assert capsys.readouterr().out == batched
    assert main([*argv[:4], "--max-new-tokens", "64"]) == 2  # no room left for the prompt: one-line error


def test_repetition_penalty_never_penalizes_stop_tokens():
    """A chat prompt holds the turn-end token once per earlier turn; the penalty must not keep the model from stopping."""
    import torch

    from lmforge.model import ModelConfig
    from lmforge.serve.generate import generate

    class FixedLogits(torch.nn.Module):
        """Every position predicts: token 3 (the stop) at 2.0, token 7 at 1.8, the rest 0."""

        def __init__(self):
            super().__init__()
            self.cfg = ModelConfig(vocab_size=16, n_layer=1, d_model=8, n_head=2, max_seq_len=32)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, cache=None, last_only=False, **_):
            logits = torch.zeros(idx.shape[0], 1 if last_only else idx.shape[1], 16)
            logits[..., 3], logits[..., 7] = 2.0, 1.8
            cache.length += idx.shape[1]
            return logits, None

    model = FixedLogits()
    # Penalized, the stop token would score 2.0 / 1.5 = 1.33 < 1.8 and the reply would never end.
    assert generate(model, [[3, 1, 3, 2]], 4, temperature=0, repetition_penalty=1.5, stop_ids=[3]) == [[]]
    # Not a stop token: penalized as seen (7 first; once 7 is seen too, 3 wins again at 1.33 > 1.2).
    assert generate(model, [[3, 1, 3, 2]], 2, temperature=0, repetition_penalty=1.5) == [[7, 3]]


def _im_end_model(tok_dir, path):
    """A checkpoint whose model always predicts <|im_end|>: an instruction-tuned model given a bare prompt."""
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import model_tensors, save_checkpoint

    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=1, d_model=32, n_head=4, max_seq_len=64,
                      norm="layernorm", bias=True, tie_embeddings=False)  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():  # the final norm outputs e_0 whatever the input; the head maps e_0 to <|im_end|>
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.token_to_id("<|im_end|>"), 0] = 10.0
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": str(tok_dir)}}
    save_checkpoint(path, 1, model_tensors(model.state_dict(), cfg.tie_embeddings), meta)
    return path


def test_generate_says_why_it_stopped_and_chat_wraps_the_prompt(small_shards, tmp_path, capsys, monkeypatch):
    import importlib

    from lmforge.chat.template import ChatFormat
    from lmforge.cli import main

    tok_dir = small_shards.parent / "tok"
    run = _im_end_model(tok_dir, tmp_path / "run")
    argv = ["generate", str(run), "--prompt", "Hello there", "--device", "cpu", "--temperature", "0",
            "--max-new-tokens", "8"]  # fmt: skip
    assert main(argv) == 0
    got = capsys.readouterr()
    assert got.out == "Hello there\n"  # nothing generated: the end token is not printed
    assert "0 tokens in" in got.err
    assert "stopped at the end token <|im_end|> after 0 tokens; this looks like a chat model: try --chat" in got.err

    seen = []

    def recording(model, prompts, *a, **kw):
        seen.append((prompts, kw["stop_ids"]))
        return generate(model, prompts, *a, **kw)

    monkeypatch.setattr(importlib.import_module("lmforge.serve.generate"), "generate", recording)
    assert main([*argv, "--chat"]) == 0
    fmt = ChatFormat(tok_dir)
    assert seen[-1] == ([fmt.encode([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)],
                        fmt.stop_ids)  # fmt: skip
    err = capsys.readouterr().err
    assert "stopped at the end token <|im_end|> after 0 tokens" in err and "try --chat" not in err
    # Several prompts: the reason per prompt.
    assert main([*argv, "--prompt", "Again"]) == 0
    assert "prompt 2 stopped at the end token <|im_end|> after 0 tokens" in capsys.readouterr().err


def test_fused_step_packs_only_large_weights_under_mkl(monkeypatch):
    """Under MKL (Intel) only weights of PACK_MIN elements or more are packed by oneDNN for a batch (its call costs
    tens of microseconds at any shape); under oneDNN every weight is; batch 1 never packs. The logits agree."""
    from lmforge.model import matmul
    from lmforge.serve import generate as gen

    if not gen._ONEDNN:
        pytest.skip("this torch has no oneDNN prepacked linear")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, d_ff=128, max_seq_len=32)).eval()
    monkeypatch.setattr(gen, "PACK_MIN", 512 * 64)  # the head (512 x 64) only: gate/up is 256 x 64
    tok = torch.tensor([3, 5, 7])
    logits = []
    for backend, packed in (("aten", {"head"}), ("onednn", {"head", "layers"})):
        previous = matmul.set_cpu_matmul(backend)
        try:
            dec = FusedDecoder(model, 3)
            assert (dec.head.packed is not None) == ("head" in packed)
            assert all((p.packed is not None) == ("layers" in packed) for layer in dec.layers for p in layer[3:7])
            assert all(p.packed is None for layer in FusedDecoder(model, 1).layers for p in layer[3:7])
            cache = KVCache(model.cfg, 3, 8)
            with torch.inference_mode():
                model(torch.tensor([[1, 2], [3, 4], [5, 6]]), cache=cache)
                logits.append(dec(tok, cache))
        finally:
            matmul.set_cpu_matmul(previous)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
