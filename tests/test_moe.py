"""The mixture-of-experts MLP (model.n_experts): routing, the batched experts against a per-token reference, the
balance loss, training, generation, FLOPs of active parameters, and what refuses an MoE model. Export and import
(Mixtral's layout in Hugging Face folders and GGUF files): tests/test_hub.py, tests/test_gguf_export.py."""

import dataclasses

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.sizes import flops_per_token
from lmforge.model.transformer import ACTIVATIONS, ModelConfig, MoE, Transformer, route

CFG = ModelConfig(vocab_size=128, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=32, n_experts=4,
                  experts_top_k=2)  # fmt: skip


def test_route_picks_the_top_k_and_renormalizes():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    weights, experts, _ = route(logits, 2)
    probs = logits.softmax(-1)
    assert torch.equal(experts, probs.topk(2, dim=-1).indices)
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    assert torch.allclose(weights, probs.gather(1, experts) / probs.gather(1, experts).sum(-1, keepdim=True))


def test_balance_loss_is_one_when_uniform_and_e_when_collapsed():
    uniform = torch.zeros(8, 4)  # equal logits: topk picks ties, but P is uniform and f sums to 1
    assert float(route(uniform, 1)[2]) == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 0, 0, 0]]).repeat(8, 1)
    assert float(route(collapsed, 1)[2]) == pytest.approx(4.0, rel=1e-3)
    # Balanced assignments: each expert gets 2 of 8 tokens with its probability mass there.
    balanced = torch.full((8, 4), -10.0)
    balanced[torch.arange(8), torch.arange(8) % 4] = 10.0
    assert float(route(balanced, 1)[2]) == pytest.approx(1.0, rel=1e-3)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: sum_j w_j * expert_{e_j}(x), the definition the batched path must meet."""
    flat = x.reshape(-1, x.shape[-1])
    weights, experts, _ = route(moe.gate(flat), moe.k)
    out = torch.zeros_like(flat)
    for n in range(len(flat)):
        for w, e in zip(weights[n], experts[n], strict=True):
            gate = moe.gate_proj[e] @ flat[n] if moe.swiglu else None
            hidden = ACTIVATIONS["swiglu" if moe.swiglu else "gelu"](gate, moe.up_proj[e] @ flat[n])
            out[n] += w * (moe.down_proj[e] @ hidden)
    return out.view(x.shape)


@pytest.mark.parametrize("mlp, k", [("swiglu", 2), ("gelu", 1), ("swiglu", 4)])
def test_batched_experts_equal_the_per_token_reference(mlp, k):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, mlp=mlp, experts_top_k=k, d_ff=48)
    moe = Transformer(cfg).double().layers[0].mlp
    x = torch.randn(3, 7, cfg.d_model, dtype=torch.float64)
    assert torch.allclose(moe(x), reference_moe(moe, x), atol=1e-12)


def test_gradients_reach_the_router_and_every_expert_used():
    torch.manual_seed(0)
    model = Transformer(CFG)
    idx = torch.randint(0, CFG.vocab_size, (4, 16))
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    for block in model.layers:
        moe = block.mlp
        assert moe.gate.weight.grad.abs().sum() > 0
        # 64 tokens x 2 of 4 experts: every expert gets some, and each gets a gradient exactly where it was used.
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert (getattr(moe, name).grad.flatten(1).abs().sum(1) > 0).all(), name


def test_balance_loss_is_added_in_training_only():
    torch.manual_seed(0)
    model = Transformer(CFG)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    model.train()
    with_aux = model(idx, idx)[1].detach()
    balance = torch.stack([b.mlp.aux_loss for b in model.layers]).mean().detach()
    model.eval()
    _, plain = model(idx, idx)
    assert float(with_aux) == pytest.approx(float(plain) + CFG.moe_aux_coef * float(balance), rel=1e-6)
    no_aux = Transformer(dataclasses.replace(CFG, moe_aux_coef=0.0))
    no_aux.load_state_dict(model.state_dict())
    no_aux.train()
    assert float(no_aux(idx, idx)[1]) == pytest.approx(float(plain), rel=1e-6)


def test_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    a = Transformer(CFG).double()
    b = Transformer(CFG).double()
    b.load_state_dict(a.state_dict())
    b.checkpointing = True
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    for m in (a, b):
        m.train()
        m(idx, idx)[1].backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-12), name


def test_an_moe_model_learns_and_generates():
    from lmforge.serve.generate import generate

    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.arange(32).remainder(7).repeat(4, 1)  # a repeating pattern
    model.train()
    losses = []
    for _ in range(40):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 2.0
    model.eval()
    out = generate(model, [[0, 1, 2, 3]], 6, temperature=0.0)
    assert out == [[4, 5, 6, 0, 1, 2]]


def test_flops_count_active_experts_and_config_errors():
    dense = dataclasses.replace(CFG, n_experts=0)
    moe_fpt, dense_fpt = flops_per_token(CFG, 16), flops_per_token(dense, 16)
    mlp = 3 * CFG.d_model * CFG.d_ff
    assert moe_fpt - dense_fpt == pytest.approx(6 * CFG.n_layer * ((CFG.experts_top_k - 1) * mlp + 32 * 4))
    with pytest.raises(LmforgeError, match="experts_top_k"):
        dataclasses.replace(CFG, experts_top_k=5).validate()
    with pytest.raises(LmforgeError, match="moe_aux_coef"):
        dataclasses.replace(CFG, moe_aux_coef=-1.0).validate()


def test_quantize_refuses_an_moe_model_in_one_line(tmp_path):
    from lmforge.hub.quantize_cmd import QuantizeConfig, quantize
    from lmforge.train import checkpoint as ckpt

    model = Transformer(CFG)
    meta = {"model_config": CFG.to_dict(), "tokenizer": {"dir": "tok", "hash": "x"}}
    path = ckpt.save_checkpoint(tmp_path / "run", 1, ckpt.model_tensors(model.state_dict(), True), meta)
    with pytest.raises(LmforgeError, match="mixture-of-experts model; quantize does not quantize experts"):
        quantize(QuantizeConfig(model=str(path), out=str(tmp_path / "q")))
    assert not (tmp_path / "q").exists()
    loaded, _, _ = ckpt.load_model(path)  # the checkpoint itself round-trips
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))  # fmt: skip


def test_lora_on_an_moe_model_adapts_attention_and_says_so(capsys):
    from lmforge.model.lora import LoraConfig, apply_lora

    model = apply_lora(Transformer(CFG), LoraConfig())
    assert "get no adapters" in capsys.readouterr().err
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".self_attn." in n for n in trainable)


def test_generation_skips_the_fused_decode_step_for_experts():
    from lmforge.serve.generate import FusedDecoder

    assert not FusedDecoder.supports(Transformer(CFG))
    assert FusedDecoder.supports(Transformer(dataclasses.replace(CFG, n_experts=0)))
