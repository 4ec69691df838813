"""Byte-level BPE tokenizers (Hugging Face `tokenizers`): train, extend, load.

lmforge tokenizer train --input corpus/ --vocab-size 8192 --out tok/
lmforge tokenizer extend --base tok/ --input zh/ --add 2000 --out tok-zh/
"""

from lmforge.tokenizer.special import (  # noqa: F401
    EOT,
    IM_END,
    IM_START,
    PAD,
    SPECIAL_TOKENS,
    load_tokenizer,
    tokenizer_hash,
)
