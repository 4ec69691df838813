"""The report of benchmarks/finetune_vs_trl.py: its runs aggregated, and the markdown that states every setting
and every convention where the two tools differ (the script writes it next to its JSON)."""

from __future__ import annotations

import statistics

from finetune_vs_trl_settings import DPO, GRPO, JOBS, LORA, LR, OPTIM, SFT


def aggregate(rows: list[dict]) -> dict:
    """Per (job, mode, tool): the median over rounds of each figure; the first loss of round 1."""
    out = {}
    for key in sorted({(r["job"], r["mode"], r["tool"]) for r in rows}, key=lambda k: (JOBS.index(k[0]), k[1], k[2])):
        runs = [r for r in rows if (r["job"], r["mode"], r["tool"]) == key]
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("tokens_per_s", "s_per_step", "steps_wall_s", "peak_rss_mb", "tokens_per_step",
                         "process_s")}  # fmt: skip
        rewards = runs[0].get("reward") or [float("nan")]
        out["/".join(key)] = {**med, "first_loss": runs[0]["first_loss"], "rounds": len(runs),
                              "mean_reward": statistics.mean(rewards),
                              "load_avg_1min": max(r["load_avg_1min"] for r in runs)}  # fmt: skip
    return out


def markdown(rep: dict) -> str:
    agg, s, chk, mach, v = rep["aggregate"], rep["settings"], rep["checks"], rep["machine"], rep["versions"]
    lines = [
        "## Fine-tuning: lmforge vs TRL (+ peft), SmolLM2-135M-Instruct on CPU (`benchmarks/finetune_vs_trl.py`)",
        "",
        (
            f"{mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; {rep['date']}; Python {v['python']}, "
            f"torch {v['torch']}, trl {v['trl']}, peft {v['peft']}, transformers {v['transformers']}, accelerate "
            f"{v['accelerate']}, datasets {v['datasets']}; lmforge {v['lmforge']}."
        ),
        "",
        f"Command: `{rep['command']}`",
        "",
        (
            "| job | mode | tool | tokens/s | s/step | steps wall s | tokens/step | peak RSS MB | first loss "
            "| process s | lmforge/TRL tokens/s |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, x in agg.items():
        job, mode, tool = key.split("/")
        other = agg.get(f"{job}/{mode}/trl")
        ratio = f"**{x['tokens_per_s'] / other['tokens_per_s']:.2f}x**" if tool == "lmforge" and other else ""
        lines.append(f"| {job} | {mode} | {tool} | {x['tokens_per_s']:,.0f} | {x['s_per_step']:.2f} | "
                     f"{x['steps_wall_s']:.1f} | {x['tokens_per_step']:,.0f} | {x['peak_rss_mb']:,.0f} | "
                     f"{x['first_loss']:.4f} | {x['process_s']:.0f} | {ratio} |")  # fmt: skip
    loads = max((x["load_avg_1min"] for x in agg.values()), default=0.0)
    lrs = ", ".join(f"{j} {m} {lr:g}" for (j, m), lr in LR.items() if j in s["steps"] and m in s["modes"])
    lines += [
        "",
        (
            f"Figures: medians over {s['rounds']} round(s), each (tool, job, mode) in a fresh process; tokens/s and "
            "s/step are medians over a run's steps after the first; steps wall s is the sum of all its training "
            "steps (model load, data preparation and lmforge's final checkpoint excluded; process s includes them, "
            "with the imports). Peak RSS: the process's own (getrusage), glibc's mmap threshold at 128 KiB on both. "
            f"The highest 1-minute load average at the end of a run was {loads:.1f} on {mach['cores']} cores "
            "(other jobs share the machine: only ratios within one run compare)."
        ),
        "",
        "Settings (both tools):",
        (
            f"- model: {s['model']} (fp32 on both; the lmforge import and its transformers export agree to "
            f"{chk['model']['logits_max_abs_diff']:.1e} in the logits); torch threads {s['threads']}; seed "
            f"{s['seed']}; "
            f"steps: {', '.join(f'{j} {n}' for j, n in s['steps'].items())}."
        ),
        (
            f"- optimizer: AdamW, fused (torch), betas ({OPTIM['beta1']}, {OPTIM['beta2']}), eps 1e-8, weight decay "
            f"{OPTIM['weight_decay']}, gradient clip {OPTIM['grad_clip']}, no accumulation; LR cosine to "
            f"{OPTIM['min_lr_ratio']:.0%} of the peak after {s['warmup']} warmup steps; peak LR {lrs}."
        ),
        (
            f"- LoRA: r={LORA['rank']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']}, on "
            f"{'/'.join(LORA['targets'])}, A Kaiming-uniform, B zero (peft's default init = lmforge's); full: "
            "every parameter trained."
        ),
        (
            f"- activation checkpointing {'on' if s['checkpointing'] else 'off'} in both (lmforge "
            "`activation_checkpointing`, which defaults to on from 50M parameters; TRL `gradient_checkpointing`, "
            "which TRL 1.16 defaults to True, as it does bf16, even on CPU: all set explicitly here). Evaluation, "
            "sampling, reporting (`report_to=none`) and checkpoints off (lmforge writes one at the end, outside the "
            "steps)."
        ),
    ]
    if "sft" in chk:
        c, loss = chk["sft"], chk["model"]["sft_first_batch_loss"]
        lines.append(
            f"- SFT: {c['conversations']} chatterbot conversations (the first that fit in {SFT['seq_len']} tokens "
            f"with SmolLM2's template and default system prompt; {c['skipped_too_long']} longer ones skipped; "
            f"{c['tokens']:,} tokens), one JSONL both read; batch {SFT['batch_size']} rows of {SFT['seq_len']}, "
            "packed by best-fit decreasing on both (lmforge: always; TRL: `packing=True, packing_strategy=bfd`, "
            "padding-free). Loss on each answer and its <|im_end|>: TRL `assistant_only_loss=True` with SmolLM2's "
            "template plus {% generation %} tags (`chat_template_path`): same text "
            f"{c['same_text']}/{c['conversations']}, same token ids {c['same_ids']}/{c['conversations']}, same "
            f"trained tokens {c['same_mask']}/{c['conversations']} as lmforge's own mask. lmforge's first packed "
            f"batch gives loss {loss['lmforge']:.6f} in lmforge and {loss['trl_collator_transformers']:.6f} through "
            "TRL's padding-free collator and the transformers model (so both compute the same loss on the same rows)."
        )
    if "dpo" in chk:
        c = chk["dpo"]
        lines.append(
            f"- DPO: the first {c['pairs']} pairs of `lmforge prefs --source chitchat` whose sides fit in "
            f"{DPO['seq_len']} tokens; batch {DPO['batch_size']} pairs, beta {DPO['beta']}, sigmoid loss, "
            "reference = the starting weights (LoRA: adapters off; full: a second copy). TRL reads them in "
            f"lmforge's draw order (`train_sampling_strategy=sequential`): the same pairs in {c['same_batches']}/"
            f"{c['steps_checked']} steps (checked against lmforge's PairLoader). Dropout off on both (TRL "
            "`disable_dropout=True`, its DPO default; lmforge's dpo and grpo always run the policy without dropout)."
        )
    if "grpo" in chk:
        lines.append(
            f"- GRPO: task `{GRPO['task']}`, {GRPO['prompts']} prompts x {GRPO['group_size']} answers per optimizer "
            f"step, at most {GRPO['max_new_tokens']} new tokens, temperature {GRPO['temperature']}, top-p 1, no "
            f"top-k; KL coefficient {GRPO['kl_coef']} (k3 per token), clip {GRPO['clip']}, one update per rollout "
            "batch; advantages standardized within each group (std with Bessel's correction, + 1e-4, on both); "
            "loss averaged over all answer tokens of the batch (TRL `loss_type=dapo`). TRL: "
            "`per_device_train_batch_size=64, num_generations=8, gradient_accumulation_steps=1` (so "
            "`steps_per_generation=1`, `generation_batch_size=64`), `shuffle_dataset=False` on the prompts lmforge "
            f"draws step by step (first: {chk['grpo']['first']!r}); reward = lmforge's `add` checker. lmforge: "
            "`max_kl=0` (no stop on KL), no evaluation prompts. Tokens/s counts the answer tokens sampled (TRL: "
            "`completions/mean_length` x 64); each step includes its sampling. Mean reward over the steps of round "
            "1 (the share of correct answers): "
            + ", ".join(f"{k.split('/', 1)[1]} {x['mean_reward']:.3f}" for k, x in agg.items() if k.startswith("grpo"))
            + "."
        )
    lines += [
        "",
        "Conventions: where the two differ, and what could not be made equal:",
        (
            "- SFT tokens: lmforge's rows hold a conversation minus its last token (the final newline is only a "
            "target, and not a trained one); TRL's hold the whole conversation, so TRL processes one more token per "
            "conversation. Each tool's tokens/s counts its own inputs. The batches differ: each tool packs and "
            "shuffles in its own way, so SFT first-step losses are of different batches. lmforge computes the "
            "whole 4 x 256 (padding included, attention block-diagonal per conversation); TRL flattens the 4 packs "
            "into one padding-free row and transformers derives a block-diagonal mask from the position ids (SDPA "
            "with a dense mask over the whole flattened row: no varlen attention kernel on CPU)."
        ),
        (
            "- SFT loss mask: lmforge trains the answer and its <|im_end|>, not the newline after it. TRL's "
            "assistant_only_loss needs {% generation %} tags that SmolLM2's template lacks (and TRL 1.16 has no "
            "patched version of it); with the tags placed as here it trains the same tokens. TRL's own training "
            "templates for ChatML models (e.g. Qwen2.5's) put the newline inside the tags, so there TRL trains on "
            "the newline after <|im_end|> too; and prompt/completion data would train it as well."
        ),
        (
            "- DPO: TRL's completion is answer + <|im_end|> + newline, so its log-probabilities sum one more token "
            "(the newline) than lmforge's; each row also carries that token as input. TRL computes log-probs "
            "through its fused LM head; lmforge runs its head on the answer tokens only, a chunk at a time. Layout: "
            "lmforge packs a batch's 8 sides padding-free into as few rows as fit (dpo `packing`, default on); TRL "
            "pads one row per side (its `padding_free` needs FlashAttention, and TRL 1.16 falls back to padding). "
            "Not run "
            "here: IPO averages the log-probabilities per answer token on both by default (lmforge "
            "`ipo_logps=mean`; `ipo_logps=sum` sums them as DPO does)."
        ),
        (
            "- GRPO: the prompts are the same, the answers are not (different samplers and RNG: lmforge's KV-cache "
            "generator, transformers' `generate`), so answer lengths, rewards and losses differ and tokens/s is "
            "per answer token each side sampled. lmforge runs each prompt once for its group of 8 answers (grpo "
            "`share_prompts`, default on); TRL runs prompt + answer as one row for each answer. Not run here: "
            "lmforge's PPO whitens advantages with the biased "
            "variance (TRL: n - 1) and adds the score at the turn-end token (TRL: one position later)."
        ),
        (
            "- LR schedule: identical with 0 warmup steps; with warmup W > 0, transformers' schedule starts at 0 "
            "(the first update has LR 0) where lmforge's starts at peak/W, one step ahead."
        ),
        (
            "- Matrix products: lmforge's linear layers run fp32 products through oneDNN "
            "(lmforge/model/matmul.py); transformers' nn.Linear through torch's default (MKL on x86, which does not "
            "use AVX-512 on AMD: see BENCHMARKS.md, Training speed). Part of any speed gap is that kernel, not the "
            "training loop; `LMFORGE_CPU_MATMUL=aten` (not set here) would give lmforge torch's products."
        ),
    ]
    return "\n".join(lines) + "\n"


# ---- main ----
