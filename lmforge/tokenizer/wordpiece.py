"""WordPiece, BERT's tokenizer (Hugging Face `tokenizers`): what `lmforge tokenizer train --model wordpiece` builds.

    lmforge tokenizer train --model wordpiece --input corpus/ --vocab-size 8000 --out runs/wp

BERT's normalizer (clean control characters, a space around every CJK character so Chinese is split per
character as BERT-Chinese does, optional lowercasing with accents stripped as bert-base-uncased), BERT's
pre-tokenizer (whitespace and punctuation), WordPiece with `##` continuation pieces and [UNK] for what the
vocabulary cannot spell, and the template that wraps a text as `[CLS] A [SEP]` (pairs `[CLS] A [SEP] B [SEP]`
with token types 0/1). The folder loads in transformers as `BertTokenizerFast.from_pretrained(DIR)`
(tokenizer_config.json names the class; vocab.txt is written for the slow tokenizer and other tools).
Unlike byte-level BPE, decode(encode(x)) is not x: case (uncased), spacing and unknown characters are lost.
"""

from __future__ import annotations

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
WORDPIECE_SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4, in this order
PREFIX = "##"


def new_wordpiece_tokenizer(lowercase: bool = True):
    """An untrained BERT-style WordPiece `tokenizers.Tokenizer` (normalizer, pre-tokenizer, decoder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=PREFIX, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix=PREFIX)
    return tok


def add_post_processor(tok) -> None:
    """`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (B's tokens type 1), with the trained ids."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, tok.token_to_id(CLS)), (SEP, tok.token_to_id(SEP))],
    )


def wordpiece_trainer(vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    from tokenizers import trainers

    return trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=WORDPIECE_SPECIAL_TOKENS,
        continuing_subword_prefix=PREFIX, show_progress=show_progress,
    )  # fmt: skip


def canonical_ids(tok):
    """The trained tokenizer with its ids in a fixed order: the special tokens at 0..4, then single characters (a
    `##` continuation or not), then longer pieces, each sorted by text.

    tokenizers' WordPiece trainer orders the `##` alphabet and merges of equal count by hash-map iteration, which
    changes from one process to the next: the same corpus gave the same vocabulary under different ids, so an
    encoder's embedding rows, and its losses, changed from run to run. WordPiece encodes by the longest match on
    the text, so which id a piece has means nothing, and a fixed order costs nothing."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    rest = sorted(
        (t for t in vocab if t not in WORDPIECE_SPECIAL_TOKENS), key=lambda t: (len(t.removeprefix(PREFIX)) > 1, t)
    )
    spec["model"]["vocab"] = {t: i for i, t in enumerate(WORDPIECE_SPECIAL_TOKENS + rest)}
    return Tokenizer.from_str(json.dumps(spec))


def wordpiece_config(model_max_length: int, lowercase: bool) -> dict:
    """tokenizer_config.json for transformers' BertTokenizerFast."""
    from lmforge.tokenizer.train import added_tokens_decoder

    added = added_tokens_decoder(WORDPIECE_SPECIAL_TOKENS)
    return {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": lowercase, "strip_accents": None,
        "tokenize_chinese_chars": True, "unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS,
        "mask_token": MASK, "added_tokens_decoder": added, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True,
    }  # fmt: skip


def vocab_txt(tok) -> str:
    """vocab.txt: one token per line in id order (BERT's vocabulary file, what the slow BertTokenizer reads)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return "".join(token + "\n" for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]))


def is_wordpiece(tok) -> bool:
    """Whether a `tokenizers.Tokenizer` is a WordPiece (BERT) tokenizer, with the tokens masked-LM training needs."""
    return type(tok.model).__name__ == "WordPiece"
