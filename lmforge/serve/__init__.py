"""Serving: the generation engine (KV cache, batching, sampling) and the `lmforge generate` command.

The engine is `lmforge.serve.generate` (generate, generate_no_cache); importing this package does not import it,
so `lmforge generate --help` and `lmforge chat --help` start without torch.
"""
