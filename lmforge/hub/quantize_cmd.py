"""`lmforge quantize`: a run, checkpoint or imported model -> a weight-only quantized checkpoint folder.

    lmforge quantize models/smollm2 --method int8 --out models/smollm2-int8
    lmforge quantize runs/demo/sft --method int4 --group-size 32 --out models/demo-int4
    lmforge generate models/smollm2-int8 --prompt "The capital of France is" --temperature 0
    lmforge chat models/smollm2-int8 | lmforge eval models/smollm2-int8 ... | lmforge serve models/smollm2-int8

The output is a checkpoint like any other (meta.json, model.safetensors, tokenizer/), with its scheme in
meta.json's `quantization` key and the integer weights in safetensors (the layout: lmforge/model/quant.py),
so `generate`, `chat`, `eval` and `serve` load it without flags. A LoRA run is merged first; a bottleneck-adapter
run (`--adapter`) is refused (its adapters do not merge into the weights quantize replaces). Training stages
refuse a quantized checkpoint (train the float model, then quantize). It is written under a temporary name and
renamed: a killed run leaves nothing, and an existing --out is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli_config import add_config_command
from lmforge.config import require
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class QuantizeConfig:
    """`lmforge quantize`: each field's comment is its help text."""

    model: str = ""  # run, checkpoint or imported model folder to quantize (also the first positional argument)
    method: str = "int8"  # int8 (symmetric, one scale per output row) or int4 (asymmetric, per group of columns)
    group_size: int = 32  # int4 only: input columns sharing one scale and minimum (32, 64, 128 or 256)
    out: str = ""  # the checkpoint folder to write (must not exist)

    def validate(self) -> QuantizeConfig:
        from lmforge.model.quant import quant_config

        require([(bool(self.model), "quantize needs a model: lmforge quantize RUN_OR_MODEL --out DIR"),
                 (bool(self.out), "quantize needs --out DIR")])  # fmt: skip
        quant_config(self.method, self.group_size)  # the method and group size fit together
        return self


def quantize(cfg: QuantizeConfig) -> dict:
    """Write the quantized checkpoint `cfg.out`; return a summary dict."""
    from safetensors.torch import save_file

    from lmforge.fileio import atomic_dir
    from lmforge.model.quant import quant_config, quantize_model, quantized_tensors, weight_bytes
    from lmforge.tokenizer.special import tokenizer_hash
    from lmforge.train.checkpoint import (
        FORMAT,
        adapter_kind,
        file_fingerprint,
        load_model,
        read_meta,
        resolve_checkpoint,
        tokenizer_dir,
        weights_path,
    )

    cfg = cfg.validate()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if out.exists():
        raise LmforgeError(f"--out {out} exists; pick a new folder (quantize never replaces one)")
    ckpt = resolve_checkpoint(cfg.model)
    meta = read_meta(ckpt)
    if meta.get("quantization"):
        raise LmforgeError(f"{ckpt} is already quantized ({meta['quantization']['method']}); quantize the float model")
    if adapter_kind(meta) == "bottleneck":  # quantize_model would swap its adapter'd linears for plain ones
        raise LmforgeError(
            f"{ckpt} is a bottleneck-adapter run: its adapters do not fold into the weights, "
            "so quantizing would drop them (quantize its base, or train with --lora, which merges)"
        )
    if meta["model_config"].get("n_experts"):  # its experts are stacked tensors, not the linears quantize replaces
        raise LmforgeError(f"{ckpt}: a mixture-of-experts model; quantize does not quantize experts yet")
    qcfg = quant_config(cfg.method, cfg.group_size)
    tok_dir = tokenizer_dir(ckpt, meta)
    if not (tok_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"{ckpt}: its tokenizer {tok_dir} is missing (tokenizer.json not found)")
    model, _, _ = load_model(ckpt)  # a LoRA run comes back merged
    before = weight_bytes(model)
    quantize_model(model.eval(), qcfg)
    tensors = quantized_tensors(model)
    with atomic_dir(out) as tmp:
        shutil.copytree(tok_dir, tmp / "tokenizer")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
        new_meta = {
            "format": FORMAT, "version": 1, "step": meta.get("step", 0), "tokens_seen": meta.get("tokens_seen", 0),
            "model_config": meta["model_config"],
            "tokenizer": {"dir": "tokenizer", "hash": tokenizer_hash(tmp / "tokenizer")},
            "quantization": qcfg,
            "source": {"kind": "quantize", "path": str(ckpt.resolve()),
                       "fingerprint": file_fingerprint(weights_path(ckpt, meta))},
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(new_meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    size = (out / "model.safetensors").stat().st_size
    return {"method": cfg.method, "group_size": qcfg["group_size"], "from": str(ckpt), "out": str(out),
            "bytes_before": before, "bytes_after": size, "seconds": time.perf_counter() - t0}  # fmt: skip


def _print(s: dict) -> None:
    scheme = s["method"] + (f", group size {s['group_size']}" if s["group_size"] else "")
    print(f"quantized {s['from']} ({scheme}): {s['bytes_before'] / 1e6:.1f} MB of weights -> "
          f"{s['bytes_after'] / 1e6:.1f} MB file {s['out']} ({s['seconds']:.1f}s)")  # fmt: skip


def register(subparsers) -> None:
    add_config_command(
        subparsers, "quantize", "weight-only int8 / int4 quantization (a smaller, faster model)",
        QuantizeConfig, lambda cfg: _print(quantize(cfg)), description=__doc__, positional=("model",),
    )  # fmt: skip
