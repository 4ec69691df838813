"""Stage 3, alignment: preference pairs, verifiable tasks, reward models, best-of-N, DPO, GRPO, PPO."""
