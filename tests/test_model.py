"""The model file: every variant runs forward/backward, configs are checked, Llama parity with transformers."""

import itertools

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import KVCache, ModelConfig, Transformer, count_params, preset
from lmforge.model.transformer import alibi_slopes


def small(**kw):
    base = {"vocab_size": 97, "n_layer": 2, "d_model": 32, "n_head": 4, "max_seq_len": 16}
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "pos,norm,mlp,kv,tie,qk",
    list(itertools.product(["rope", "sinusoidal", "learned", "alibi"], ["rmsnorm", "layernorm"], ["swiglu", "gelu"],
                           [4, 2, 1], [True, False], [False, True])),
)  # fmt: skip
def test_every_variant_trains_and_caches(pos, norm, mlp, kv, tie, qk):
    torch.manual_seed(0)
    cfg = small(pos_encoding=pos, norm=norm, mlp=mlp, n_kv_head=kv, tie_embeddings=tie, qk_norm=qk)
    model = Transformer(cfg)
    idx = torch.randint(0, 97, (2, 12))
    logits, _ = model(idx)
    _, loss = model(idx, idx)
    assert logits.shape == (2, 12, 97) and torch.isfinite(loss)
    # The chunked head+loss equals cross-entropy on the full logits.
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, 97), idx.view(-1)))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Prefill 7 tokens then decode one at a time: same logits as the full causal forward.
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(cfg, 2, 16)
        steps = [model(idx[:, :7], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_causality():
    model = Transformer(small()).eval()
    idx = torch.randint(0, 97, (1, 10))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 97
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_an_attention_mask_packs_two_continuations_of_one_prefix(pos):
    """attn_mask + positions: [p | a | b] in one row, b at a's positions seeing p and itself, gives the hidden
    states of p + a and p + b run alone, also past max_seq_len slots; a wrong shape or a cache is refused."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=12,
                                    pos_encoding=pos)).eval()  # fmt: skip
    p, a, b = [3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15, 16, 17, 18]
    branch = torch.tensor([0] * 5 + [1] * 6 + [2] * 5)
    slot = torch.arange(16)
    mask = (slot[None, :] <= slot[:, None]) & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
    positions = torch.tensor([list(range(11)) + list(range(5, 10))])
    with torch.no_grad():
        packed, _ = model(torch.tensor([p + a + b]), positions=positions, attn_mask=mask[None], return_hidden=True)
        alone_a, _ = model(torch.tensor([p + a]), return_hidden=True)
        alone_b, _ = model(torch.tensor([p + b]), return_hidden=True)
    torch.testing.assert_close(packed[0, :11], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 11:], alone_b[0, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        model(torch.tensor([p]), attn_mask=torch.ones(1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "field,value,message",
    [("n_head", 5, "divisible by model.n_head"), ("n_kv_head", 3, "divisible by model.n_kv_head"),
     ("pos_encoding", "xpos", "pos_encoding must be one of"), ("n_layer", 0, "n_layer must be a positive")],
)  # fmt: skip
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(LmforgeError, match=message):
        Transformer(small(**{field: value}))


def test_alibi_slopes_match_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2 ** -(i + 1) for i in range(8)], dtype=torch.float32))
    assert len(alibi_slopes(6)) == 6


def test_param_count_tiny_matches_closed_form():
    parts = count_params(Transformer(preset("tiny")))
    cfg = preset("tiny")
    assert parts["embedding"] == cfg.vocab_size * cfg.d_model and parts["head"] == 0  # tied
    assert (
        abs(parts["total"] - (cfg.vocab_size * cfg.d_model + 12 * cfg.d_model**2 * cfg.n_layer)) / parts["total"] < 0.05
    )


@pytest.mark.parametrize("tie", [True, False])
def test_llama_logits_match_transformers(tie):
    """Same weights, loaded by name, give the same logits as transformers' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=160, max_seq_len=64,
                      rope_theta=50000.0, tie_embeddings=tie, norm_eps=1e-6)  # fmt: skip
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, attention_bias=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)  # tied head is one tensor
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_training_forward_compiles_without_graph_breaks():
    """torch.compile sees the whole training forward, chunked loss and oneDNN products included (one graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = Transformer(ModelConfig(vocab_size=128, n_layer=1, d_model=32, n_head=2, max_seq_len=16))
    idx = torch.randint(0, 128, (2, 16))
    explained = torch._dynamo.explain(model)(idx, torch.roll(idx, -1, dims=1))
    assert explained.graph_break_count == 0, explained.break_reasons
