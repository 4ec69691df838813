"""Typed configs and how YAML recipes and `--set key=value` overrides are checked against them.

    lmforge pretrain --data shards/ --out runs/x --config recipe.yaml --set model.n_layer=8 --set lr=1e-3

The dataclasses are the one source of truth: a recipe key or an override that
names no field, or a value of the wrong type, is a one-line error naming it.
Precedence: preset defaults <- YAML recipe <- plain CLI flags <- `--set`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.model.transformer import ModelConfig


def did_you_mean(name: str, known) -> str:
    """The end of an unknown-key error: ` (did you mean 'x'?)` with the closest of `known` to `name`, or ""."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require(checks: list[tuple[bool, str]], prefix: str = "config: ") -> None:
    """Raise LmforgeError with the first failing check's message (configs validate with a list of these)."""
    for ok, message in checks:
        if not ok:
            raise LmforgeError(f"{prefix}{message}")


@dataclass
class TrainConfig:
    """Pretraining (stage 1). Each field's comment is its help text."""

    data: str = ""  # folder of token shards made by `lmforge data tokenize`
    out: str = ""  # run folder: checkpoints, metrics.jsonl, TensorBoard events, resolved config
    preset: str = "tiny"  # model preset the `model` fields start from
    init_from: str = ""  # start from these weights (run or checkpoint folder; its model config wins); not a resume
    # The data's tokenizer decides model.vocab_size (pretrain_vocab_size): unset, it is the tokenizer's size rounded up
    # to 64; set (recipe, --set), it is kept if it holds every token (extra rows) and is an error if smaller.
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in total (the LR schedule spans them)
    max_seconds: float = 0.0  # stop (and checkpoint) after this much training time; 0 = no limit
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine, or wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per pass
    log_every: int = 10  # steps between metric records
    ckpt_every: int = 100  # steps between periodic checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 1337
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16
    compile: bool = False  # torch.compile the model
    nan_policy: str = "stop"  # stop: error out on a NaN/inf loss; skip: skip that batch (counted)
    parallel: str = "ddp"  # under torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard)

    # Not a field: the model fields the user set (recipe, flags or --set) rather than took from the preset, filled
    # by resolve_train_config; it says where values came from (see pretrain_vocab_size), not what runs.
    model_fields_set = frozenset()

    def validate(self) -> TrainConfig:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (0 < self.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
            (self.nan_policy in ("stop", "skip"), "nan_policy must be stop or skip"),
            (self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (self.seq_len <= self.model.max_seq_len,
             f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"),
        ]  # fmt: skip
        require(checks)
        self.model.validate()
        return self


def _coerce(value, tp, name: str):
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise LmforgeError(f"config field {name}: expected {tp.__name__}, got {value!r}")


def apply_updates(cfg, updates: dict, prefix: str = ""):
    """Set fields of the dataclass `cfg` from a (nested) dict, checking every name and type."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise LmforgeError(f"unknown config field {full!r}{did_you_mean(full, _field_paths(cfg, prefix))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LmforgeError(f"config field {full}: expected a mapping of its fields, got {value!r}")
            apply_updates(current, value, prefix=f"{full}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], full))
    return cfg


def _field_paths(cfg, prefix: str = "") -> list[str]:
    """Every field name of the dataclass `cfg`, nested ones dotted (`model.pos_encoding`): what a typo may mean."""
    paths = []
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        paths += [name, *(_field_paths(value, f"{name}.") if dataclasses.is_dataclass(value) else [])]
    return paths


def parse_set(items: list[str]) -> dict:
    """['model.n_layer=8', 'lr=1e-3'] -> {'model': {'n_layer': '8'}, 'lr': '1e-3'} (values typed later)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise LmforgeError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise LmforgeError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: a config must be a mapping of field: value")
    return data


def load_config_file(path: str | Path, known: set[str], expected: str) -> dict:
    """The YAML mapping at `path` whose top-level keys are all in `known`; one-line errors otherwise.

    `expected` names what the mapping should hold, for the error message (e.g. "a `steps` list").
    """
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: no such config file")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{path}: expected a mapping with {expected}")
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise LmforgeError(
            f"{path}: unknown key(s) {', '.join(unknown)}{did_you_mean(unknown[0], known)} "
            f"(known: {', '.join(sorted(known))})"
        )
    return cfg


def resolve_train_config(recipe: dict | None, flags: dict, sets: dict) -> TrainConfig:
    """Build the TrainConfig: preset <- recipe <- plain flags (non-None) <- --set overrides."""
    layers = [recipe or {}, {k: v for k, v in flags.items() if v is not None}, sets]
    preset_name = next((layer["preset"] for layer in reversed(layers) if "preset" in layer), "tiny")
    from lmforge.model.presets import preset

    base = preset(preset_name)
    mha = base.n_kv_head == base.n_head
    cfg = TrainConfig(preset=preset_name, model=base)
    for layer in layers:
        apply_updates(cfg, {k: v for k, v in layer.items() if k != "preset"})
    # Derived widths follow the fields they derive from unless set explicitly:
    # `--set model.d_model=512` on `tiny` must not keep tiny's 704-wide MLP.
    touched = set().union(*(layer.get("model", {}).keys() for layer in layers))
    m = cfg.model
    if touched & {"d_model", "mlp"} and "d_ff" not in touched:
        m.d_ff = None
    if "n_head" in touched and "n_kv_head" not in touched and mha:
        m.n_kv_head = None
    m.__post_init__()
    cfg.model_fields_set = frozenset(touched)
    return cfg.validate()


def pretrain_vocab_size(cfg: TrainConfig, tokenizer_size: int, data: str) -> int:
    """Embedding rows for pretraining on data whose tokenizer has `tokenizer_size` tokens: the data decides.

    model.vocab_size left unset (the preset's value): the tokenizer's size rounded up to 64 (faster matmuls).
    Set explicitly: kept when it holds every token (the extra rows are never a target), an error when smaller.
    With init_from the checkpoint's model config wins, so only the tokenizer counts.
    """
    rounded = 64 * math.ceil(tokenizer_size / 64)
    if cfg.init_from or "vocab_size" not in cfg.model_fields_set:
        return rounded
    if cfg.model.vocab_size < tokenizer_size:
        raise LmforgeError(
            f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer_size} tokens of the "
            f"tokenizer of {data}; set at least {tokenizer_size}, or leave it unset (then {rounded})"
        )
    return cfg.model.vocab_size


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
