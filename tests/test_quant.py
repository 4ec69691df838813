"""Weight-only quantization: the schemes by hand, the kernels against the dequantized product, quantized
checkpoints through generate / the serving engine / eval, and `lmforge quantize`'s refusals.
Run: pytest tests/test_quant.py
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model import cpu_kernels, quant
from lmforge.model.quant import QuantLinear
from lmforge.model.transformer import KVCache, ModelConfig, Transformer
from lmforge.serve.generate import FusedDecoder, generate
from lmforge.train import checkpoint as ckpt


def test_int8_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = quant.quantize_int8(w)
    assert s[0].item() == pytest.approx(2 / 127)
    # 1 / (2/127) = 63.5 rounds to even (64); 0.5 / (2/127) = 31.75 -> 32
    assert q[0].tolist() == [64, -127, 32]
    assert q[1].tolist() == [0, 0, 0] and s[1].item() > 0  # an all-zero row: no division by zero
    assert quant.dequantize_int8(q, s)[0].tolist() == pytest.approx([64 * 2 / 127, -2.0, 32 * 2 / 127])


def test_int4_by_hand():
    w = torch.arange(32, dtype=torch.float32)[None]  # one group: min 0, max 31
    q, s, lo = quant.quantize_int4(w, 32)
    scale = float(torch.tensor(31 / 15).half())  # stored in float16
    assert s.dtype == torch.float16 and s.item() == scale and lo.item() == 0
    assert q[0].tolist() == [min(15, round(i / scale)) for i in range(32)]
    err = (quant.dequantize_int4(q, s, lo) - w).abs().max().item()
    assert err <= scale / 2 + 1e-6  # round to nearest: at most half a step


def test_int4_error_bound_random():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, s, lo = quant.quantize_int4(w, 32)
    deq = quant.dequantize_int4(q, s, lo)
    step = s.float().repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 2e-3).all()  # + float16 rounding of the minimum
    with pytest.raises(LmforgeError, match="group size 48"):
        quant.quantize_int4(w, 48)


def test_nibble_packing_by_hand():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    packed = quant.pack_nibbles(q)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]  # the even column in the low nibble
    assert torch.equal(quant.unpack_nibbles(packed), q)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_dequantized_product(method, group, bias):
    """The decode path (ATen's int kernels, bf16 activations) against x @ dequantized(W).T in fp32."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 128) * 0.05, torch.randn(96) if bias else None
    m = QuantLinear.from_weight(w, b, method, group)
    x = torch.randn(3, 128)
    ref = x @ m.weight.t() + (m.bias if bias else 0)
    y = m(x)  # 3 rows: the kernel (where this torch has it)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2  # bf16 activations and output
    many = m(x.repeat(50, 1))  # 150 rows, past every kernel's limit: the dequantized fp32 product, the same function
    assert ((many[:3] - y).norm() / y.norm()).item() < 4e-3  # bf16 rounding of the results apart
    assert ((m.weight - w).norm() / w.norm()).item() < (0.01 if method == "int8" else 0.12)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("n,k", [(96, 128), (7, 40), (13, 100), (5, 17), (4, 576)])
def test_own_int8_kernel_is_the_dequantized_function(rows, n, k):
    """lmforge's int8 kernel (cpu_kernels.c): bf16(s * sum bf16(x) q) equals the dequantized path's bf16(bf16(x) @ (q s))
    to within one bf16 rounding, for widths with a vector tail, rows that are not a multiple of its 4-row block and
    1-16 activation rows (one to four passes over each weight block)."""
    if cpu_kernels.loaded() is None:
        pytest.skip(cpu_kernels.status())
    torch.manual_seed(rows * 1000 + n + k)
    m = QuantLinear.from_weight(torch.randn(n, k), None, "int8")
    x = torch.randn(rows, k) * 3
    ref = torch.nn.functional.linear(x.to(torch.bfloat16).float(), m._kernel_weight())
    y = cpu_kernels.int8_gemm(x, m.qweight, m.scales.to(torch.bfloat16).float())
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert torch.allclose(y.float(), ref, rtol=2**-7, atol=1e-6)  # one bf16 step apart at most
    assert (y == ref.to(torch.bfloat16)).float().mean() > 0.9  # mostly the same bf16 value: same function
    assert torch.equal(m(x), y.float())  # QuantLinear runs it up to OWN_KERNEL_MAX_ROWS rows


def test_own_int8_kernel_falls_back_in_one_line(tmp_path):
    """A compiler that fails (or LMFORGE_NO_C_KERNELS) leaves ATen's kernel in place after one line on stderr; an int8
    model still runs. The build goes to a fresh cache (no half-written .so is left there)."""
    import subprocess
    import sys

    code = (
        "import torch; from lmforge.model import cpu_kernels; from lmforge.model.quant import QuantLinear\n"
        "m = QuantLinear.from_weight(torch.randn(8, 32), None, 'int8'); y = m(torch.randn(2, 32))\n"
        "print(cpu_kernels.status(), tuple(y.shape))"
    )
    for env, expect in (({"CC": "false"}, "not built: false failed"), ({"LMFORGE_NO_C_KERNELS": "1"}, "is set")):
        env = {**os.environ, "LMFORGE_KERNEL_CACHE": str(tmp_path), **env}
        done = subprocess.run(
            [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert expect in done.stdout and "(2, 8)" in done.stdout
        assert len(done.stderr.strip().splitlines()) <= 1
    assert not list(tmp_path.iterdir())


def test_cat_is_the_parts_side_by_side():
    torch.manual_seed(0)
    parts = [QuantLinear.from_weight(torch.randn(n, 64), None, "int4", 32) for n in (32, 16, 16)]
    x = torch.randn(2, 64)
    assert torch.allclose(QuantLinear.cat(parts)(x), torch.cat([p(x) for p in parts], dim=1), atol=1e-6)


CONFIGS = {
    "tied-gqa": ModelConfig(vocab_size=320, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=64),
    "untied-bias": ModelConfig(
        vocab_size=320, n_layer=2, d_model=64, n_head=4, max_seq_len=64, tie_embeddings=False, qkv_bias=True
    ),
}


def _trained_like(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger than init weights, so the logits are not all ~0 and errors show
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_quantized_checkpoint_round_trip(tmp_path, name, method, group):
    """quantize -> save -> load: the same logits as the in-memory quantized model; close to float; generation
    through FusedDecoder equals the model's own forward."""
    cfg = CONFIGS[name]
    model = _trained_like(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(idx)[0]
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "tokenizer.json").write_text("{}")
        meta = {"model_config": cfg.to_dict(), "tokenizer": {"dir": "../../../tok", "hash": "x"}}
        ckpt.save_checkpoint(tmp_path / "run", 1, ckpt.model_tensors(model.state_dict(), cfg.tie_embeddings), meta)
        assert main(["quantize", str(tmp_path / "run"), "--method", method, "--group-size", str(group or 32),
                     "--out", str(tmp_path / "q")]) == 0  # fmt: skip
        loaded, _, qmeta = ckpt.load_model(tmp_path / "q")
        assert qmeta["quantization"]["method"] == method
        assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.method == "int8"
        if cfg.tie_embeddings:  # one int8 matrix for the embedding and the head
            assert loaded.embed_tokens.qweight.data_ptr() == loaded.lm_head.qweight.data_ptr()
        in_memory = quant.quantize_model(_trained_like(cfg), quant.quant_config(method, group))
        out = loaded.eval()(idx)[0]
        assert torch.equal(out, in_memory(idx)[0])
        assert ((out - ref).norm() / ref.norm()).item() < (0.03 if method == "int8" else 0.2)
    assert FusedDecoder.supports(loaded)
    prompts = [idx[0, :5].tolist(), idx[1, :3].tolist()]
    fused = generate(loaded, prompts, 8, temperature=0)
    plain = generate(loaded, prompts, 8, temperature=0, fused=False)
    assert fused == plain
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < 0.45 * (ckpt.list_checkpoints(tmp_path / "run")[-1] / "model.safetensors").stat().st_size


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_fused_decode_calls_the_kernels_bare(name, method, group):
    """The decode step calls the quantized kernels with nothing around them (no QuantLinear.forward, the residual added
    to the bf16 product): the same logits bit for bit as through QuantLinear.forward, and the model's own forward's
    within float rounding."""
    if not quant._has("_weight_int8pack_mm" if method == "int8" else "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU weight-only kernel")
    cfg = CONFIGS[name]
    model = quant.quantize_model(_trained_like(cfg), quant.quant_config(method, group))
    idx = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    tok = torch.tensor([3, 7])
    with torch.inference_mode():
        dec = FusedDecoder(model, 2)
        projs = [p for layer in dec.layers for p in layer[3:7]] + [dec.head]
        qkv = [layer[3] for layer in dec.layers]
        # a projection with a bias (q/k/v with qkv_bias) keeps QuantLinear.forward; every other one is bare
        assert all((p.kernel is None) == (cfg.qkv_bias and p in qkv) for p in projs)
        caches = [KVCache(cfg, 2, 8) for _ in range(3)]
        for c in caches:
            model(idx, cache=c)
        fast = dec(tok, caches[0])
        for p in projs:
            p.kernel = None
        assert torch.equal(fast, dec(tok, caches[1]))
        own = model(tok[:, None], cache=caches[2])[0][:, -1]
        assert torch.allclose(fast, own, atol=1e-4, rtol=1e-5)


def test_quantized_model_serves_and_evaluates(base_run, tmp_path):
    """The serving engine (batched, chunked prefill: kernel and dequantized paths mixed) gives each prompt the
    tokens `generate` gives it alone; the loss path (the dequantized head) runs."""
    from lmforge.serve.engine import Engine
    from tests.test_serve_engine import MORE, request, run

    assert main(["quantize", str(base_run), "--method", "int4", "--out", str(tmp_path / "q")]) == 0
    model, _, _ = ckpt.load_for_inference(tmp_path / "q")
    model = quant.quantize_model(_trained_like(model.cfg), quant.quant_config("int4", 32))  # weights that matter
    for max_batch, chunk, stagger in ((2, 4, 0), (3, 20, 2)):
        engine = Engine(model, max_batch=max_batch, max_context=64, prefill_chunk=chunk)
        reqs = [request(p, max_tokens=8, temperature=0) for p in MORE]
        run(engine, reqs, stagger)
        for p, r in zip(MORE, reqs):
            assert r.on_event.tokens == generate(model, [p], 8, temperature=0)[0], (max_batch, chunk, p)
    with torch.no_grad():
        _, loss = model(torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[2, 3, 4, 5, 6]]))
    assert math.isfinite(loss.item())


def test_refusals(base_run, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(base_run), "--out", str(out)]) == 0
    assert main(["quantize", str(base_run), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(out), "--out", str(tmp_path / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert (
        main(["quantize", str(base_run), "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "q3")]) == 2
    )
    assert "--group-size" in capsys.readouterr().err
    assert main(["quantize", str(base_run), "--method", "int3", "--out", str(tmp_path / "q3")]) == 2
    assert "int3" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists()
    with pytest.raises(LmforgeError, match="is quantized .int8.: it is for inference"):
        ckpt.load_model(out, for_training=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "quantize" and meta["quantization"] == {"method": "int8", "group_size": None,
                                                                               "head": "int8"}  # fmt: skip


def test_layer_scheme_picks_a_group_that_divides():
    assert quant.layer_scheme(704, "int4", 128) == ("int4", 64)  # 704 = 11 x 64
    assert quant.layer_scheme(576, "int4", 256) == ("int4", 64)
    assert quant.layer_scheme(1536, "int4", 128) == ("int4", 128)
    assert quant.layer_scheme(100, "int4", 32) == ("int8", None)  # no group size divides 100
    assert quant.layer_scheme(100, "int8", None) == ("int8", None)


def test_lora_run_is_quantized_merged(base_run, tmp_path):
    """A LoRA run quantizes as its base with the adapter merged in (what `load_model` gives)."""
    from lmforge.model.lora import LoraConfig, apply_lora, lora_tensors

    model, base_ckpt, meta = ckpt.load_model(base_run)
    lora = LoraConfig(rank=2)
    apply_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora_meta = {
        "model_config": model.cfg.to_dict(), "adapter": lora.to_dict(),
        "tokenizer": {"dir": str(ckpt.tokenizer_dir(base_ckpt, meta)), "hash": meta["tokenizer"]["hash"]},
        "base": {"path": str(base_ckpt), "fingerprint": ckpt.file_fingerprint(base_ckpt / "model.safetensors")},
    }  # fmt: skip
    ckpt.save_checkpoint(tmp_path / "lora", 5, lora_tensors(model), lora_meta, weights_file="adapter.safetensors")
    assert main(["quantize", str(tmp_path / "lora"), "--out", str(tmp_path / "q")]) == 0
    got = ckpt.load_for_inference(tmp_path / "q")[0]
    want = quant.quantize_model(ckpt.load_for_inference(tmp_path / "lora")[0], quant.quant_config("int8", None))
    idx = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(got(idx)[0], want(idx)[0])
        base_q = quant.quantize_model(ckpt.load_for_inference(base_run)[0], quant.quant_config("int8", None))
        assert not torch.equal(got(idx)[0], base_q(idx)[0])  # the adapter is in it
