"""Serving: the generation engine (KV cache, batching, sampling) and the `lmforge generate` command."""

from lmforge.serve.generate import generate, generate_no_cache  # noqa: F401
