"""The model: one Transformer file, its presets and size accounting."""

from lmforge.model.presets import PRESETS, preset  # noqa: F401
from lmforge.model.transformer import (  # noqa: F401
    KVCache,
    ModelConfig,
    Transformer,
    count_params,
    flops_per_token,
)
