"""Checkpoints: safetensors weights + JSON meta + optimizer/RNG state, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step_00000100/` with
- `model.safetensors`: the weights (tied head stored once, as `embed_tokens.weight`);
- `meta.json`: format, step, model and train config, tokenizer (folder + hash),
  data-loader position, tokens seen;
- `state.safetensors`: optimizer moments and RNG states (tensors only, so
  loading never unpickles arbitrary objects), with `optimizer.json` for the
  optimizer's scalar hyperparameters.
The folder is built under a temporary name and renamed, so a killed run leaves
either a whole checkpoint or none. `eval`, `generate`, `chat` and `export`
need only the path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.model.transformer import ModelConfig, Transformer

FORMAT = "lmforge-checkpoint"


def model_tensors(state_dict: dict, tied: bool) -> dict[str, torch.Tensor]:
    """A model state dict as safetensors wants it: contiguous CPU tensors, the tied head stored once."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if tied:
        sd.pop("lm_head.weight", None)  # same tensor as embed_tokens.weight
    return sd


def optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (`optim.<param id or name>.<key>`) and JSON-able groups."""
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    meta: dict,
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    optimizer_meta: dict | None = None,
    keep_last: int = 2,
    weights_file: str = "model.safetensors",
    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `weights_file` is `adapter.safetensors` for LoRA and bottleneck-adapter runs, which store only the adapter
    (meta["base"] names the base model it belongs to). `extra_weights` maps more file names
    to tensors written in the same atomic folder.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(model_tensors, str(tmp / weights_file), metadata={"format": "pt"})
        for name, tensors in (extra_weights or {}).items():  # e.g. head.safetensors: a reward or value head
            save_file(tensors, str(tmp / name))
        if optimizer_tensors is not None:
            save_file({**optimizer_tensors, **_rng_tensors()}, str(tmp / "state.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(optimizer_meta or {}))
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "version": 1, "step": step, **meta}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of a killed write are ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / "meta.json").is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its newest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise LmforgeError(f"{path}: no checkpoint found (expected a run folder or a checkpoint folder)")
    return found[-1]


def read_meta(ckpt: Path) -> dict:
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise LmforgeError(f"{path}: not an lmforge checkpoint")
    return meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise LmforgeError(f"{path}: corrupt or truncated checkpoint file ({str(e).splitlines()[0]})") from None


def load_model_weights(model: torch.nn.Module, ckpt: Path, tensors: dict | None = None) -> None:
    """Load `model.safetensors` (or `tensors` read from it) into `model`, with one-line errors for misfits."""
    path = ckpt / "model.safetensors"
    tensors = load_tensors(path) if tensors is None else tensors
    own = model_tensors(model.state_dict(), model.cfg.tie_embeddings)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise LmforgeError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise LmforgeError(f"{path}: {name} has shape {tuple(t.shape)}, the model wants {tuple(own[name].shape)}")
    model.load_state_dict(tensors, strict=False)


def load_training_state(ckpt: Path) -> dict:
    """Restore the RNG states saved by `save_checkpoint` and return its optimizer state dict."""
    tensors = load_tensors(ckpt / "state.safetensors")
    try:
        groups = json.loads((ckpt / "optimizer.json").read_text())["param_groups"]
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"{ckpt / 'optimizer.json'}: unreadable optimizer state ({e})") from None
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            pid, name = key[len("optim.") :].rsplit(".", 1)  # pid: an index, or a parameter name under FSDP
            state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = value
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {"state": state, "param_groups": groups}


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a weights file (first 16 hex digits): ties a LoRA adapter to the exact base it was trained on."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read weights ({e.strerror or e})") from None
    return h.hexdigest()[:16]


def weights_path(ckpt: Path, meta: dict) -> Path:
    """The checkpoint's weights file: the full model, or the adapter of a LoRA or bottleneck-adapter checkpoint."""
    return ckpt / ("adapter.safetensors" if "adapter" in meta else "model.safetensors")


def tokenizer_dir(ckpt: Path, meta: dict) -> Path:
    tok_dir = Path(meta.get("tokenizer", {}).get("dir", ""))
    return tok_dir if tok_dir.is_absolute() else (ckpt / tok_dir).resolve()


def check_trainable(ckpt: Path, meta: dict) -> None:
    """Refuse a weight-only quantized checkpoint as the start of training (its weights are integers)."""
    q = meta.get("quantization")
    if q:
        source = meta.get("source", {}).get("path", "the float model it was quantized from")
        raise LmforgeError(f"{ckpt} is quantized ({q['method']}): it is for inference; train from {source}")


def adapter_kind(meta: dict) -> str | None:
    """None for a full model, "lora" for a LoRA run (merges into its base), "bottleneck" for a bottleneck-adapter run
    (lmforge/model/bottleneck.py: nonlinear, it stays beside its base)."""
    if "adapter" not in meta:
        return None
    return meta["adapter"].get("kind", "lora")


def load_model(
    path: str | Path, *, for_training: bool = False, encoder_ok: bool = False
) -> tuple[Transformer, Path, dict]:
    """(model on CPU, checkpoint folder, meta) from a run, checkpoint or imported-model folder.

    A LoRA checkpoint is rebuilt as its base with the adapter merged in; a bottleneck-adapter checkpoint as its
    base with the adapter layers in it (they do not merge). Either way the base must be the very weights the adapter
    was trained on (checked by fingerprint); with `for_training` a bottleneck-adapter run is refused (a stage would
    train its base weights through layers it cannot save). A quantized checkpoint (`lmforge quantize`) comes back
    with its quantized modules (lmforge/model/quant.py); with `for_training` it is refused. An encoder or
    encoder-decoder (model.family) loads only with `encoder_ok` (the stages that can use one); elsewhere it is a
    one-line error saying what it is for.
    """
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if for_training:
        check_trainable(ckpt, meta)
    if meta.get("quantization"):
        from lmforge.model.quant import load_quantized, quantize_model

        model = quantize_model(Transformer(ModelConfig.from_dict(meta["model_config"])), meta["quantization"],
                               from_weights=False)  # fmt: skip
        load_quantized(model, load_tensors(ckpt / "model.safetensors"), ckpt / "model.safetensors")
        return model, ckpt, meta
    kind = adapter_kind(meta)
    if kind is None:
        cfg = ModelConfig.from_dict(meta["model_config"])
        if encoder_ok and cfg.family != "decoder":
            from lmforge.model.encoder import build_model

            model = build_model(cfg)
        else:
            model = Transformer(cfg)
        load_model_weights(model, ckpt)
        return model, ckpt, meta
    if kind not in ("lora", "bottleneck"):
        raise LmforgeError(f"{ckpt}: unknown adapter kind {kind!r} (this lmforge knows lora and bottleneck)")
    base = meta["base"]
    if kind == "bottleneck" and for_training:
        raise LmforgeError(f"{ckpt} is a bottleneck-adapter run: its adapters do not fold into the weights, so "
                           f"it cannot be the base of another stage; start from its base {base['path']} "
                           "with --adapter")  # fmt: skip
    model, base_ckpt, base_meta = load_model(base["path"], for_training=for_training, encoder_ok=encoder_ok)
    if file_fingerprint(weights_path(base_ckpt, base_meta)) != base["fingerprint"]:
        what = "LoRA adapter" if kind == "lora" else "bottleneck adapter"
        raise LmforgeError(
            f"{ckpt}: this {what} was trained on base weights {base['fingerprint']}, "
            f"but {base_ckpt} now holds different weights"
        )
    where = ckpt / "adapter.safetensors"
    if kind == "bottleneck":
        from lmforge.model.bottleneck import AdapterConfig, apply_adapters, load_adapter_tensors

        apply_adapters(model, AdapterConfig.from_dict(meta["adapter"]))
        load_adapter_tensors(model, load_tensors(where), str(where))
        return model, ckpt, meta
    from lmforge.model.lora import LoraConfig, apply_lora, load_lora_tensors, merge_lora

    apply_lora(model, LoraConfig.from_dict(meta["adapter"]))
    load_lora_tensors(model, load_tensors(where), str(where))
    return merge_lora(model), ckpt, meta


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Path, dict]:
    """(model in eval mode, tokenizer folder, meta) from a run folder or checkpoint folder (LoRA merged, bottleneck
    adapters in place)."""
    model, ckpt, meta = load_model(path)
    return model.to(device).eval(), tokenizer_dir(ckpt, meta), meta
