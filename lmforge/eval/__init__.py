"""Evaluation: loss, perplexity and bits per byte (`lmforge pretrain` runs it periodically)."""
