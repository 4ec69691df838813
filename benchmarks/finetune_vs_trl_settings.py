"""The settings benchmarks/finetune_vs_trl.py gives both tools, shared with its report (finetune_vs_trl_report.py)."""

JOBS, MODES, TOOLS = ("sft", "dpo", "grpo"), ("lora", "full"), ("lmforge", "trl")
DEFAULT_STEPS = {"sft": 10, "dpo": 10, "grpo": 4}
LR = {("sft", "lora"): 5e-4, ("sft", "full"): 2e-5, ("dpo", "lora"): 5e-5, ("dpo", "full"): 5e-6,
      ("grpo", "lora"): 5e-5, ("grpo", "full"): 1e-5}  # fmt: skip
LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
OPTIM = {"beta1": 0.9, "beta2": 0.95, "weight_decay": 0.0, "grad_clip": 1.0, "min_lr_ratio": 0.1}
SFT = {"conversations": 200, "seq_len": 256, "batch_size": 4}
DPO = {"pairs": 100, "seq_len": 512, "batch_size": 4, "beta": 0.1}
GRPO = {"task": "add", "prompts": 8, "group_size": 8, "max_new_tokens": 64, "temperature": 1.0, "kl_coef": 0.04,
        "clip": 0.2, "train_prompts": 2000}  # fmt: skip
