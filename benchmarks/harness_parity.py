"""lmforge's multiple-choice scoring against lm-evaluation-harness's HFLM: same numbers, and how much faster.

    python benchmarks/harness_parity.py --model models/smollm2 --items 100
    python benchmarks/harness_parity.py --model runs/demo/sft --items 300
    python benchmarks/harness_parity.py --model models/smollm2 --items 40 --dtype float64 --exact

The model is exported with `lmforge export` (float32) to a Hugging Face folder; the built-in cloze sets
(chatterbot-en, chatterbot-zh; lmforge/eval/tasks.py) are written as a local harness task (the prompt and
the choices exactly as `lmforge eval` renders them). Then, on the same items, side by side in one process:
  1. the harness with HFLM on the exported folder (transformers' Llama), batch sizes from --hf-batch;
  2. the harness with lmforge's model class (LmforgeLM: the context runs once per question, its KV cache
     shared by the choices);
  3. `lmforge eval`'s own scorer (score_items), no harness around it.
It reports the largest per-choice log-likelihood difference from HFLM, whether acc / acc_norm agree, and the
seconds each took (threads: --threads, the same for all). Needs `pip install "lmforge[eval]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def write_task(root: Path, name: str, requests) -> None:
    rows = [{"prompt": r.prompt, "choices": r.continuations, "answer": r.item.answer} for r in requests]
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / (name + '.jsonl')}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_target: answer\n'
        'doc_to_choice: choices\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def float64_throughout() -> None:
    """Patch transformers' Llama RMSNorm and rotary embedding to compute in the model's dtype, and lmforge's RoPE
    tables to stay float64 (they are rounded to float32 when built): for --exact."""
    import torch
    import transformers.models.llama.modeling_llama as llama

    import lmforge.model.transformer as ours

    def inv_freq(theta, dim):
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def rms_norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].double() * inv_freq(self.config.rope_parameters["rope_theta"],
                                                             self.config.head_dim)  # fmt: skip
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def tables(cfg):
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq(cfg.rope_theta, cfg.head_dim))
        sin = angles.sin()
        return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)

    llama.LlamaRMSNorm.forward, llama.LlamaRotaryEmbedding.forward, ours.rope_tables = rms_norm, rotary, tables


def lls_of(samples) -> list[list[float]]:
    return [[r[0][0] for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="lmforge run, checkpoint or imported model")
    ap.add_argument("--items", type=int, default=100, help="items per set (the first N)")
    ap.add_argument("--sets", default="chatterbot-en,chatterbot-zh")
    ap.add_argument("--hf-batch", default="1,8", help="HFLM batch sizes to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the fastest counts")
    ap.add_argument("--shots", type=int, default=0, help="solved examples before each question (long contexts)")
    ap.add_argument("--dtype", default="float32", help="float64: both sides without float32 rounding")
    ap.add_argument(
        "--exact",
        action="store_true",
        help="with --dtype float64: take out transformers' float32 islands "
        "(Llama's RMSNorm and RoPE angles compute in float32 whatever the dtype) and lmforge's float32 "
        "RoPE tables, so both sides are float64 throughout",
    )
    ap.add_argument("--out", default="", help="also write the figures here (JSON)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM, task_manager
    from lmforge.eval.mc import prompts_for, score_items
    from lmforge.eval.tasks import task_items
    from lmforge.hub.export_cmd import export_hf

    torch.set_num_threads(args.threads)
    if args.exact:
        if args.dtype != "float64":
            raise SystemExit("--exact needs --dtype float64")
        float64_throughout()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="harness-parity-"))
    requests = {}
    for s in sets:
        items = task_items(s, 0)
        requests[s] = prompts_for(items[: args.items], "cloze", args.shots, pool=items[args.items :] or None)
    names = {s: "lmf_" + s.replace("-", "_") for s in sets}
    for s in sets:
        write_task(tmp, names[s], requests[s])
    export_hf(args.model, tmp / "hf", dtype="float32")  # HFLM casts to --dtype when it loads
    manager = task_manager(list(names.values()), str(tmp))
    kw = {"tasks": list(names.values()), "task_manager": manager, "log_samples": True, "bootstrap_iters": 0}

    # Each contender runs --repeat times, interleaved (ours, HFLM, ours, HFLM...) so that load from elsewhere
    # falls on both alike; the fastest time of each counts.
    runs, native_s = {}, float("inf")
    t0 = time.perf_counter()
    ours = LmforgeLM(args.model, device="cpu", dtype=args.dtype)
    load_ours = time.perf_counter() - t0
    hfs = {int(b): HFLM(pretrained=str(tmp / "hf"), device="cpu", batch_size=int(b), dtype=args.dtype)
           for b in args.hf_batch.split(",")}  # fmt: skip

    def timed(label, fn):
        t0 = time.perf_counter()
        result = fn()
        secs = time.perf_counter() - t0
        best = min(secs, runs[label][1]) if label in runs else secs
        runs[label] = (result, best)

    for _ in range(args.repeat):
        timed("lmforge (harness, LmforgeLM)", lambda: lm_eval.simple_evaluate(model=ours, **kw))
        t0 = time.perf_counter()
        native = {s: score_items(ours.model, ours.tok, requests[s]) for s in sets}
        native_s = min(native_s, time.perf_counter() - t0)
        for bs, hf in hfs.items():
            timed(f"HFLM batch {bs}", lambda hf=hf: lm_eval.simple_evaluate(model=hf, **kw))

    ref_name = f"HFLM batch {args.hf_batch.split(',')[0]}"
    ref = runs[ref_name][0]
    n_items = sum(len(requests[s]) for s in sets)
    print(f"model {args.model} ({args.dtype}, {args.shots}-shot), {n_items} items ({', '.join(f'{s}: {len(requests[s])}' for s in sets)}), "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    report = {
        "model": args.model,
        "items": n_items,
        "sets": sets,
        "threads": args.threads,
        "repeat": args.repeat,
        "load_average": os.getloadavg()[0],
        "runs": {},
    }
    for label, (res, secs) in runs.items():
        diff, rel, same = 0.0, 0.0, True
        for s in sets:
            a, b = lls_of(res["samples"][names[s]]), lls_of(ref["samples"][names[s]])
            pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
            diff = max(diff, max(abs(x - y) for x, y in pairs))
            rel = max(rel, max(abs(x - y) / max(1.0, abs(y)) for x, y in pairs))
            for m in ("acc,none", "acc_norm,none"):
                same &= res["results"][names[s]][m] == ref["results"][names[s]][m]
        accs = {s: (res["results"][names[s]]["acc,none"], res["results"][names[s]]["acc_norm,none"]) for s in sets}
        report["runs"][label] = {"seconds": round(secs, 2), "max_abs_ll_diff": diff, "max_rel_ll_diff": rel,
                                 "same_acc": same, "acc": accs}  # fmt: skip
        print(f"  {label:<30} {secs:8.1f} s  max |ll - {ref_name}| {diff:.2e} (relative {rel:.1e})  "
              f"same acc/acc_norm: {same}  "
              + "  ".join(f"{s} acc {a:.3f} acc_norm {an:.3f}" for s, (a, an) in accs.items()))  # fmt: skip
    diff = max(
        abs(x - y)
        for s in sets
        for ra, rb in zip([r["loglikelihoods"] for r in native[s]], lls_of(ref["samples"][names[s]]), strict=True)
        for x, y in zip(ra, rb, strict=True)
    )
    report["runs"]["lmforge eval (score_items)"] = {"seconds": round(native_s, 2), "max_abs_ll_diff": diff}
    print(f"  {'lmforge eval (score_items)':<30} {native_s:8.1f} s  max |ll - {ref_name}| {diff:.2e}")
    best_hf = min(v[1] for k, v in runs.items() if k.startswith("HFLM"))
    speedup = best_hf / runs["lmforge (harness, LmforgeLM)"][1]
    report["speedup_vs_best_hflm"] = round(speedup, 2)
    report["load_seconds_lmforge"] = round(load_ours, 2)
    print(f"  LmforgeLM vs the fastest HFLM: {speedup:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
