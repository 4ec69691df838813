"""Typed configs: the training loop's fields (`LoopConfig`), and how YAML recipes, flags and `--set key=value`
overrides are checked against a stage's dataclass.

    lmforge pretrain --data shards/ --out runs/x --config recipe.yaml --set model.n_layer=8 --set lr=1e-3

Each command's dataclass (`TrainConfig` in lmforge/train/pretrain.py, `SftConfig`, `DpoConfig`, ...,
`TokenizeConfig`) is the one source of truth: its flags are generated from it (lmforge/cli_config.py), and a
recipe key or an override that names no field, or a value of the wrong type, is a one-line error naming it.
Precedence: defaults (or a preset) <- YAML recipe <- flags <- `--set`. Imports no torch (data commands
build their command lines from here).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write_text


def did_you_mean(name: str, known) -> str:
    """The end of an unknown-key error: ` (did you mean 'x'?)` with the closest of `known` to `name`, or ""."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require(checks: list[tuple[bool, str]], prefix: str = "config: ") -> None:
    """Raise LmforgeError with the first failing check's message (configs validate with a list of these)."""
    for ok, message in checks:
        if not ok:
            raise LmforgeError(f"{prefix}{message}")


SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class LoopConfig:
    """What every training stage's loop reads: batch, schedule, optimizer, precision, checkpoints, evaluation, limits.

    Each stage's config is a subclass (TrainConfig, FinetuneConfig and the stages built on it) that adds its own
    fields and may change a default here by declaring the field again. Each field's comment is its help text
    (`lmforge <stage> --help`, lmforge/cli_config.py). Frozen: what a run resolves (seq_len from the model, the
    micro-batch after running out of memory) is a new config, written to the run's config.yaml as it runs.
    """

    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in total (the LR schedule spans them)
    max_seconds: float = 0.0  # stop (and checkpoint) after this much training time in this invocation; 0 = no limit
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine, or wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: fraction of steps spent in the final decay
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms, biases)
    # adamw, or muon: Muon on the blocks' matrices, AdamW on embeddings, head, norms and biases (modded-nanogpt,
    # nanochat); the same lr and weight decay for both (Muon's step matched to AdamW's RMS; lmforge/train/optim.py)
    optimizer: str = "adamw"
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    eval_every: int = 100  # steps between evaluations; 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per evaluation (at most)
    log_every: int = 10  # steps between metric records
    ckpt_every: int = 100  # steps between periodic checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept on disk
    seed: int = 1337  # seeds the model's init, the data order and sampling
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), float32, bfloat16
    nan_policy: str = "stop"  # stop: error out on a NaN/inf loss; skip: skip that batch (counted)
    # recompute each block's activations in the backward pass instead of keeping them: much less memory for about a
    # third more compute. on (or true), off (or false), or auto: on for models of 50M parameters or more (SmolLM2)
    activation_checkpointing: str = "auto"
    # under torchrun: seconds to wait for every process to join (a rendezvous, a node still starting) and for any one
    # collective (a checkpoint gathered to rank 0); then a one-line error instead of hanging
    dist_timeout_s: float = 1800.0

    def loop_checks(self) -> list[tuple[bool, str]]:
        """The checks of the fields above (a stage's validate() adds its own)."""
        return [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.seq_len >= 0, "seq_len must be >= 0"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_seconds >= 0, "max_seconds must be >= 0 (0 = no limit)"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 < self.decay_fraction <= 1, "decay_fraction must be in (0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.optimizer in ("adamw", "muon"), "optimizer must be adamw or muon"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1 and beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 = off)"),
            (self.eval_every >= 0 and self.eval_batches >= 0, "eval_every and eval_batches must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.ckpt_every >= 0, "ckpt_every must be >= 0 (0 = only at the end)"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.nan_policy in ("stop", "skip"), "nan_policy must be stop or skip"),
            (self.dist_timeout_s > 0, "dist_timeout_s must be > 0"),
            (
                self.activation_checkpointing in ("auto", "on", "off"),
                "activation_checkpointing must be auto, on or off",
            ),
        ]


def _coerce(value, tp, name: str):
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin is list:  # a list of files: YAML gives a list, a flag one or more values, --set a string
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, typing.get_args(tp)[0], name) for v in items]
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
            if isinstance(value, bool):  # YAML reads on/off/yes/no/true/false as booleans: a string field wants a word
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise LmforgeError(f"config field {name}: expected {tp.__name__}, got {value!r}")


def with_updates(cfg, updates: dict, prefix: str = ""):
    """A copy of the (frozen) dataclass `cfg` with fields set from a (nested) dict, every name and type checked."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise LmforgeError(f"unknown config field {full!r}{did_you_mean(full, field_paths(cfg, prefix))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LmforgeError(f"config field {full}: expected a mapping of its fields, got {value!r}")
            changes[key] = with_updates(current, value, prefix=f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve(cls, recipe: dict | None, flags: dict, sets: dict, prefix: str = ""):
    """A validated config of dataclass `cls`: its defaults <- recipe <- plain flags (non-None) <- --set.

    `prefix` names where the keys come from in errors (`tokenizer.` for a recipe section).
    """
    cfg = cls()
    for layer in (recipe or {}, {k: v for k, v in flags.items() if v is not None}, sets):
        cfg = with_updates(cfg, layer, prefix)
    return cfg.validate()


def field_paths(cfg, prefix: str = "") -> list[str]:
    """Every field name of the dataclass `cfg`, nested ones dotted (`model.pos_encoding`): what a typo may mean."""
    paths = []
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        paths += [name, *(field_paths(value, f"{name}.") if dataclasses.is_dataclass(value) else [])]
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


def recipe_path(name_or_path: str | Path) -> Path:
    """A YAML file as given, or a packaged recipe by name (`demo`, `gpt2-124m`: lmforge/recipes/NAME.yaml)."""
    from importlib import resources

    packaged = Path(str(resources.files("lmforge") / "recipes" / f"{name_or_path}.yaml"))
    return packaged if not Path(name_or_path).exists() and packaged.is_file() else Path(name_or_path)


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


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically): what the run uses, field by field."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
