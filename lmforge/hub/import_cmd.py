"""`lmforge import`: a Hugging Face model folder or a GGUF file -> an lmforge checkpoint folder.

    lmforge import path/to/SmolLM2-135M-Instruct --out models/smollm2              # config.json + *.safetensors
    lmforge import SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2 --dtype bfloat16
    lmforge generate models/smollm2 --prompt "The capital of France is" --temperature 0

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM folders (SmolLM2 is Llama), and
llama-architecture GGUFs with a byte-level BPE tokenizer. The output folder IS a checkpoint
(`meta.json` at step 0, `model.safetensors`, `tokenizer/`), so `generate`, `pretrain
--set init_from=...` and `export` take it unchanged. It is written under a temporary name and
renamed: an interrupted import leaves nothing behind. A sliding-window model (Mistral v0.1) has
its context capped at the window, where it is exact; the summary line says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.errors import LmforgeError


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="import a Hugging Face folder or a GGUF file as an lmforge checkpoint")
    p.add_argument(
        "source", metavar="SOURCE", help="a Hugging Face model folder (config.json, *.safetensors) or a .gguf"
    )
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype (default float32)")
    p.set_defaults(func=run)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read ({e.strerror or e})") from None


def read_source(source: str | Path):
    """Dispatch on what SOURCE is: a .gguf file or a Hugging Face folder -> `Imported`."""
    path = Path(source)
    if path.is_dir():
        from lmforge.hub.hf import read_hf_folder

        return read_hf_folder(path)
    if not path.exists():
        raise LmforgeError(f"{path}: not found")
    if path.suffix == ".gguf" or _is_gguf(path):
        from lmforge.hub.gguf_import import read_gguf

        return read_gguf(path)
    raise LmforgeError(f"{path}: neither a Hugging Face model folder nor a .gguf file")


def import_model(source: str | Path, out: str | Path, dtype: str = "float32") -> dict:
    """Read SOURCE and write the checkpoint folder `out` atomically; return a summary dict."""
    import json

    from safetensors.torch import save_file

    from lmforge.fileio import atomic_dir
    from lmforge.hub.common import DTYPES, cast, check_out_dir, check_tensors, n_params
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.train.checkpoint import FORMAT

    if dtype not in DTYPES:
        raise LmforgeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_out_dir(out, source, "meta.json")
    t0 = time.perf_counter()
    imp = read_source(source)
    check_tensors(imp.cfg, imp.tensors, source)
    tensors = cast(imp.tensors, DTYPES[dtype])
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "tokenizer").mkdir()
        for name, content in imp.tokenizer_files.items():
            (tmp / "tokenizer" / name).write_bytes(content)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
        meta = {
            "format": FORMAT, "version": 1, "step": 0, "tokens_seen": 0,
            "model_config": imp.cfg.to_dict(),
            "tokenizer": {"dir": "tokenizer", "hash": tokenizer_hash(tmp / "tokenizer")},
            "source": {**imp.source, "dtype": dtype, "notes": imp.notes},
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {
        "architecture": imp.source["architecture"], "kind": imp.source["kind"], "params": n_params(tensors),
        "dtype": dtype, "max_seq_len": imp.cfg.max_seq_len, "notes": imp.notes, "out": str(out),
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def run(args) -> int:
    s = import_model(args.source, args.out, args.dtype)
    notes = "".join(f"; {n}" for n in s["notes"])
    print(
        f"imported {s['architecture']} ({s['kind']}): {s['params'] / 1e6:.1f}M params, {s['dtype']}, "
        f"max_seq_len {s['max_seq_len']}{notes} -> {s['out']} ({s['seconds']:.1f}s)"
    )
    return 0
