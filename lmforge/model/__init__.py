"""The model: one Transformer file, its presets and size accounting."""

from lmforge.model.presets import PRESETS, preset  # noqa: F401
from lmforge.model.sizes import count_params, flops_per_token  # noqa: F401
from lmforge.model.transformer import KVCache, ModelConfig, Transformer  # noqa: F401
