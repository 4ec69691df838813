"""Stage 1: pretrain a model on token shards: a decoder on next-token prediction, an encoder on masked tokens.

    lmforge pretrain --data shards/ --out runs/tiny --preset tiny --max-steps 500
    lmforge pretrain --data shards-wp/ --out runs/bert --preset bert-mini --sentence-task sop   # lmforge/train/mlm.py
    lmforge pretrain --data shards/ --out runs/tiny            # again: resumes from the last checkpoint
    torchrun --nproc_per_node 8 -m lmforge pretrain --data shards/ --out runs/big --preset gpt2-124m

The same command resumes when RUN_DIR holds a checkpoint and logs the same
losses as a run never interrupted. SIGTERM or Ctrl-C saves a checkpoint and
exits cleanly. Everything the run needs later (config, tokenizer copy,
checkpoints, metrics.jsonl, TensorBoard events) lives in RUN_DIR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.cli_config import add_config_command
from lmforge.config import LoopConfig, require, save_config, to_dict, with_updates
from lmforge.data.loader import TokenLoader
from lmforge.data.shards import load_index
from lmforge.errors import LmforgeError, warn
from lmforge.eval.loss import bits_per_byte, evaluate_loss
from lmforge.model.encoder import build_model
from lmforge.model.sizes import flops_per_token
from lmforge.model.transformer import ModelConfig
from lmforge.tokenizer.special import tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.common import (
    adopt_saved_batch_split,
    pick_device,
    setup_distributed,
    stop_exit_code,
    teardown_distributed,
    tune_cpu_allocator,
)
from lmforge.train.glm import N_GLM_TOKENS, GlmBatches, glm_window
from lmforge.train.loop import Hooks, next_token_step, refit_loader, train_loop
from lmforge.train.metrics import MetricsLogger
from lmforge.train.mlm import MASKINGS, SENTENCE_TASKS, MlmBatches, MlmVocab, evaluate_mlm, mlm_step
from lmforge.train.optim import make_optimizer
from lmforge.train.span import N_SENTINELS, SpanBatches, window_length

OBJECTIVES = ("clm", "glm", "mlm", "span")
OBJECTIVE_OF = {"decoder": "clm", "encoder": "mlm", "encoder-decoder": "span"}  # what each model family trains on
FAMILY_OF = {"clm": "decoder", "glm": "decoder", "mlm": "encoder", "span": "encoder-decoder"}

# Settings that must match for a resume to continue the same run (and sequences per step: adopt_saved_batch_split).
RESUME_FIELDS = ("seq_len", "objective", "sentence_task", "masking", "mask_rate", "whole_word")


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """Pretraining (stage 1): the loop's fields plus these. Each field's comment is its help text."""

    data: str = ""  # folder of token shards made by `lmforge data tokenize`
    out: str = ""  # run folder: checkpoints, metrics.jsonl, TensorBoard events, resolved config
    # model preset the `model` fields start from (tiny, gpt2-124m, llama-1b, smollm2-135m; encoders bert-mini,
    # bert-base, albert-base; encoder-decoders t5-mini, t5-small)
    preset: str = "tiny"
    init_from: str = ""  # start from these weights (run or checkpoint folder; its model config wins); not a resume
    # The data's tokenizer decides model.vocab_size (pretrain_vocab_size): unset, it is the tokenizer's size rounded up
    # to 64; set (recipe, --set), it is kept if it holds every token (extra rows) and is an error if smaller.
    model: ModelConfig = field(default_factory=ModelConfig)
    seq_len: int = 256  # tokens per sequence (at most model.max_seq_len)
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: ddp (replicate) or fsdp (FSDP2 fully_shard)
    # auto: clm (next token) for a decoder, mlm (masked tokens, BERT) for an encoder, span (span corruption, T5:
    # lmforge/train/span.py) for an encoder-decoder; glm: a decoder on GLM's blank infilling (lmforge/train/glm.py)
    objective: str = "auto"
    mask_rate: float = 0.15  # mlm: share of tokens predicted (80% [MASK], 10% random, 10% kept)
    masking: str = "dynamic"  # mlm: dynamic (new masks each epoch, RoBERTa) or static (the same each epoch, BERT)
    whole_word: bool = False  # mlm: mask whole words (## pieces together; Chinese words by jieba), BERT-wwm
    sentence_task: str = "none"  # mlm: none, nsp (BERT: is B the next segment?) or sop (ALBERT: are A, B in order?)

    # Not a field: the model fields the user set (recipe, flags or --set) rather than took from the preset, filled
    # by resolve_train_config; it says where values came from (see pretrain_vocab_size), not what runs.
    model_fields_set = frozenset()

    def validate(self) -> TrainConfig:
        checks = [
            *self.loop_checks(),
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp"),
            (not (self.parallel == "fsdp" and self.optimizer == "muon"),
             "optimizer=muon needs whole matrices: use parallel=ddp (FSDP shards them)"),
            (self.seq_len <= self.model.max_seq_len,
             f"seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"),
            (self.objective in ("auto", *OBJECTIVES), f"objective must be auto, {' or '.join(OBJECTIVES)}"),
            (FAMILY_OF.get(self.resolved_objective) == self.model.family,
             (f"objective={self.objective} does not fit model.family={self.model.family} "
              f"({' / '.join(f'{k} for {v}' for k, v in FAMILY_OF.items())}; use --preset bert-mini for mlm)")),
            (0 < self.mask_rate < 1, f"mask_rate must be in (0, 1), got {self.mask_rate}"),
            (self.masking in MASKINGS, f"masking must be one of {', '.join(MASKINGS)}"),
            (self.sentence_task in SENTENCE_TASKS, f"sentence_task must be one of {', '.join(SENTENCE_TASKS)}"),
            (self.sentence_task == "none" or self.model.n_classes in (0, 2),
             f"sentence_task={self.sentence_task} needs model.n_classes=2 (its classifier), got {self.model.n_classes}"),
            (self.resolved_objective == "mlm" or (self.sentence_task == "none" and not self.whole_word),
             "sentence_task and whole_word are masked-LM options (an encoder: --preset bert-mini)"),
            (self.resolved_objective == "clm" or self.seq_len >= 4 + MlmBatches.specials(self.sentence_task),
             "seq_len is too short for [CLS]/[SEP] and a few tokens"),
        ]  # fmt: skip
        require(checks)
        self.model.validate()
        return self

    @property
    def resolved_objective(self) -> str:
        return OBJECTIVE_OF[self.model.family] if self.objective == "auto" else self.objective


def resolve_train_config(recipe: dict | None, flags: dict, sets: dict, prefix: str = "") -> TrainConfig:
    """Build the TrainConfig: preset <- recipe <- plain flags (non-None) <- --set overrides."""
    layers = [recipe or {}, {k: v for k, v in flags.items() if v is not None}, sets]
    preset_name = next((layer["preset"] for layer in reversed(layers) if "preset" in layer), "tiny")
    from lmforge.model.presets import preset

    base = preset(preset_name)
    mha = base.n_kv_head == base.n_head
    cfg = TrainConfig(preset=preset_name, model=base)
    for layer in layers:
        cfg = with_updates(cfg, {k: v for k, v in layer.items() if k != "preset"}, prefix)
    # Derived widths follow the fields they derive from unless set explicitly:
    # `--set model.d_model=512` on `tiny` must not keep tiny's 704-wide MLP.
    touched = set().union(*(layer.get("model", {}).keys() for layer in layers))
    derived = {}
    if touched & {"d_model", "mlp"} and "d_ff" not in touched:
        derived["d_ff"] = None  # recomputed by ModelConfig.__post_init__
    if "n_head" in touched and "n_kv_head" not in touched and mha:
        derived["n_kv_head"] = None
    if any(layer.get("objective") == "glm" for layer in layers):  # GLM's 2D positions are learned tables
        derived.update({k: v for k, v in (("block_positions", True), ("pos_encoding", "learned")) if k not in touched})
    if cfg.sentence_task != "none" and "n_classes" not in touched:
        derived["n_classes"] = 2  # the NSP/SOP classifier on [CLS]
    if derived:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **derived))
    object.__setattr__(cfg, "model_fields_set", frozenset(touched))  # provenance, not a field (see above)
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


def register(subparsers) -> None:
    help = "pretrain a model on token shards (resumes if RUN_DIR has a checkpoint)"
    add_config_command(subparsers, "pretrain", help, TrainConfig, pretrain, resolve_fn=resolve_train_config,
                       description=__doc__, exit_code=stop_exit_code)  # fmt: skip


def _check_resume(meta: dict, cfg, path: Path, world: int) -> TrainConfig:
    saved_model, saved_train = meta["model_config"], meta["train_config"]
    defaults = ModelConfig.__dataclass_fields__
    for key, value in cfg.model.to_dict().items():
        saved = saved_model.get(key, defaults[key].default)  # a field newer than the checkpoint was at its default then
        if saved != value:
            raise LmforgeError(
                f"{path}: cannot resume: model.{key} is {saved!r} in the checkpoint "
                f"but {value!r} now (use a new --out, or the same config)"
            )
    for key in RESUME_FIELDS:  # a field newer than the checkpoint was at its default then
        if saved_train.get(key, TrainConfig.__dataclass_fields__[key].default) != getattr(cfg, key):
            raise LmforgeError(
                f"{path}: cannot resume: {key} is {saved_train.get(key)!r} in the checkpoint but {getattr(cfg, key)!r} now"
            )
    # Checkpoints hold whole tensors (gathered under FSDP), so any number of processes can resume them.
    return adopt_saved_batch_split(cfg, saved_train, path, meta.get("world_size", world), world)


def pretrain(cfg: TrainConfig) -> dict:
    """Run (or resume) pretraining as configured; returns the last metrics record."""
    if not cfg.data:
        raise LmforgeError("pretrain needs --data (a folder made by `lmforge data tokenize`)")
    if not cfg.out:
        raise LmforgeError("pretrain needs --out (the run folder; rerun the same command to resume)")
    run_dir = Path(cfg.out)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    dd = setup_distributed(device, cfg.dist_timeout_s)
    try:
        return _train(cfg, run_dir, device, dd)
    finally:
        teardown_distributed()


def _train(cfg: TrainConfig, run_dir: Path, device: torch.device, dd) -> dict:
    index = load_index(cfg.data)
    init = None
    if cfg.init_from:
        init, model_cfg = _init_source(cfg, index)
        cfg = dataclasses.replace(cfg, model=model_cfg)
    # The data decides the vocabulary: the tokenizer's size rounded up to 64, or an explicit model.vocab_size >= it.
    vocab_size = pretrain_vocab_size(cfg, index["vocab_size"], cfg.data)
    extra_rows = {"span": N_SENTINELS, "glm": N_GLM_TOKENS}.get(cfg.resolved_objective, 0)
    if extra_rows:  # T5's sentinels, GLM's [MASK] and [START]: the top rows, above every token of the tokenizer
        vocab_size = max(vocab_size, 64 * math.ceil((index["vocab_size"] + extra_rows) / 64))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size)).validate()

    existing = ckpt.list_checkpoints(run_dir)
    meta = ckpt.read_meta(existing[-1]) if existing else None
    if meta is not None:
        cfg = _check_resume(meta, cfg, existing[-1], dd.world_size)
        if meta["tokenizer"]["hash"] != index["tokenizer_hash"]:
            raise LmforgeError(
                f"{cfg.data}: shards were made with tokenizer {index['tokenizer_hash']}, "
                f"but the run in {run_dir} was trained with {meta['tokenizer']['hash']}"
            )

    # Tokenizer: copied into the run so checkpoints stand alone.
    tok_src = Path(index.get("tokenizer_dir", ""))
    tok_dst = run_dir / "tokenizer"
    mlm = cfg.resolved_objective == "mlm"  # the data's tokenizer must fit the objective before the run folder is made
    vocab = _check_tokenizer(tok_src if (tok_src / "tokenizer.json").is_file() else tok_dst, mlm,
                             cfg.resolved_objective == "span")  # fmt: skip
    if dd.main and not tok_dst.exists():
        if not (tok_src / "tokenizer.json").is_file():
            raise LmforgeError(f"{cfg.data}/index.json: tokenizer folder {tok_src} not found")
        if tokenizer_hash(tok_src) != index["tokenizer_hash"]:
            raise LmforgeError(f"{tok_src}: tokenizer changed since the shards in {cfg.data} were made")
        tmp = run_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tok_src, tmp)
        tmp.replace(tok_dst)
    if dd.main:  # resolved: what runs, field by field (a refit after running out of memory writes it again)
        save_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if init is not None and meta is None:
        _load_resized(model, init)
    start_step, tokens_seen = 0, 0
    if meta is not None:
        ckpt.load_model_weights(model, existing[-1])
        start_step, tokens_seen = meta["step"], meta["tokens_seen"]
    raw_model = model
    fsdp = dd.enabled and cfg.parallel == "fsdp"
    if fsdp:
        _fully_shard(model)  # before the optimizer: FSDP2 swaps parameters for sharded ones
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device, cfg.optimizer)
    if meta is not None:
        _load_optimizer(raw_model, optimizer, ckpt.load_training_state(existing[-1]), fsdp, existing[-1])
    if cfg.compile:
        model = torch.compile(model)
    if dd.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # An encoder's rows are windows of the stream wrapped in [CLS] ... [SEP] (lmforge/train/mlm.py); T5's windows are
    # longer than its input by what span corruption takes out (lmforge/train/span.py).
    span, glm = cfg.resolved_objective == "span", cfg.resolved_objective == "glm"
    window = cfg.seq_len - (MlmBatches.specials(cfg.sentence_task) if mlm else 0)
    window = window_length(cfg.seq_len, 0.15, 3.0) if span else glm_window(cfg.seq_len) if glm else window
    loader = TokenLoader(
        cfg.data, "train", cfg.batch_size, window, dd.rank, dd.world_size, index["tokenizer_hash"], device
    )
    if meta is not None:
        loader.load_state_dict(meta["loader"])
    mlm_options = {"rate": cfg.mask_rate, "whole_word": cfg.whole_word, "sentence_task": cfg.sentence_task,
                   "seed": cfg.seed}  # fmt: skip
    batches = MlmBatches(loader, vocab, masking=cfg.masking, **mlm_options) if mlm else loader
    if span:
        span_options = {"vocab_rows": cfg.model.vocab_size, "eos": index["eot_id"], "start": _pad_id(tok_src, tok_dst)}
        batches = SpanBatches(loader, **span_options, seed=cfg.seed)
    glm_options = {"vocab_rows": cfg.model.vocab_size, "end_id": index["eot_id"]}
    if glm:
        batches = GlmBatches(loader, **glm_options, seed=cfg.seed)
    val_tokens = sum(s["num_tokens"] for s in index["splits"].get("val", []))
    val_bytes = sum(s["num_bytes"] for s in index["splits"].get("val", []))
    val_batches = None
    # A small val split is read with fewer rows per batch rather than not at all.
    val_rows = min(cfg.batch_size, (val_tokens - 1) // (cfg.seq_len * dd.world_size)) if val_tokens else 0
    if val_rows >= 1 and cfg.eval_batches > 0:
        vl = TokenLoader(cfg.data, "val", val_rows, window, dd.rank, dd.world_size, device=device)
        n = max(1, min(cfg.eval_batches, val_tokens // (val_rows * window * dd.world_size)))
        source = MlmBatches(vl, vocab, masking="static", **mlm_options) if mlm else vl  # the same masks every time
        source = SpanBatches(vl, **span_options, seed=cfg.seed) if span else source
        source = GlmBatches(vl, **glm_options, seed=cfg.seed) if glm else source
        val_batches = [source.next_batch() for _ in range(n)]
    elif dd.main:
        why = (
            "eval_batches is 0" if cfg.eval_batches <= 0
            else f"{cfg.data} has no val split (tokenized with --val-fraction 0, or from a single document)"
            if not val_tokens
            else f"its val split has {val_tokens} tokens, fewer than one sequence of seq_len {cfg.seq_len} + 1"
        )  # fmt: skip
        warn(f"this run will not validate (no val_loss, no bits per byte): {why}")

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dd.world_size
    tok_meta = {"dir": "../../tokenizer", "hash": index["tokenizer_hash"]}

    def save(step: int, tokens_seen: int, cfg: TrainConfig) -> None:
        model_sd, optim_sd = _full_state(raw_model, optimizer, fsdp)  # a collective under FSDP: every rank
        if not dd.main:
            return
        model_tensors = ckpt.model_tensors(model_sd, cfg.model.tie_embeddings)
        opt_tensors, opt_meta = ckpt.optimizer_tensors(optim_sd)
        ckpt_meta = {
            "model_config": cfg.model.to_dict(), "train_config": to_dict(cfg), "tokenizer": tok_meta,
            "data": str(Path(cfg.data).resolve()), "loader": loader.state_dict(), "tokens_seen": tokens_seen,
            "world_size": dd.world_size,
        }  # fmt: skip
        ckpt.save_checkpoint(run_dir, step, model_tensors, ckpt_meta, opt_tensors, opt_meta, cfg.keep_last)

    def evaluate(step: int) -> dict | None:
        if val_batches is None:
            return None
        if mlm:  # no bits per byte: a masked token's loss is not a code length of the text
            record = evaluate_mlm(model, val_batches, autocast())
            if dd.enabled:
                t = torch.tensor(list(record.values()), device=device)
                dist.all_reduce(t, op=dist.ReduceOp.AVG)
                record = dict(zip(record, t.tolist(), strict=True))
            record["val_ppl"] = math.exp(min(record["val_loss"], 50))
            return record
        loss = evaluate_loss(model, val_batches, autocast())
        if dd.enabled:
            t = torch.tensor(loss, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            loss = float(t)
        if span or glm:  # a target token's loss, not a code length of the text: no bits per byte
            return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_bpb": bits_per_byte(loss, val_tokens, val_bytes),
        }

    if dd.main:
        print(
            f"lmforge pretrain: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params on {device}"
            f"{f' x{dd.world_size}' if dd.enabled else ''}, {tokens_per_step} tokens/step, "
            f"steps {start_step}->{cfg.max_steps}; a uniform guess has loss ln(V)={math.log(cfg.model.vocab_size):.2f}",
            file=sys.stderr,
        )
    hooks = Hooks(
        save=save,
        evaluate=evaluate,
        logger=MetricsLogger(run_dir, resume_step=start_step if meta else None, enabled=dd.main),
        run_dir=run_dir,
        refit=refit_loader(loader, run_dir, dd.main),
        flops_per_token=flops_per_token(cfg.model, cfg.seq_len),
        evaluate_first=False,  # a fresh model's loss is ln(V), said above
    )
    step_fn = mlm_step(autocast) if mlm else next_token_step(autocast)
    return train_loop(cfg, model, optimizer, step_fn, batches, hooks, start_step=start_step, tokens_seen=tokens_seen,
                      desc="pretrain")  # fmt: skip


def _pad_id(*tok_dirs: Path) -> int:
    """The padding id of the first tokenizer folder that exists (T5's decoder starts from it)."""
    from lmforge.tokenizer.special import load_tokenizer, pad_id

    return pad_id(load_tokenizer(next(d for d in tok_dirs if (d / "tokenizer.json").is_file())))


def _check_tokenizer(tok_dir: Path, mlm: bool, span: bool = False) -> MlmVocab | None:
    """The masking vocabulary of an encoder's WordPiece tokenizer; a WordPiece tokenizer under a decoder (or a BPE
    one under an encoder, in MlmVocab) is a one-line error. T5 (span) takes either."""
    from lmforge.tokenizer.special import load_tokenizer
    from lmforge.tokenizer.wordpiece import is_wordpiece

    tok = load_tokenizer(tok_dir)
    if mlm:
        return MlmVocab(tok, tok_dir / "tokenizer.json")
    if is_wordpiece(tok) and not span:
        raise LmforgeError(f"{tok_dir / 'tokenizer.json'}: a WordPiece (BERT) tokenizer; a decoder trains on a "
                           "byte-level BPE (`lmforge tokenizer train` without --model wordpiece), or use an "
                           "encoder preset (--preset bert-mini)")  # fmt: skip
    return None


def _init_source(cfg: TrainConfig, index: dict) -> tuple[Path, ModelConfig]:
    """`init_from`'s checkpoint and model config (which the run adopts); the data's tokenizer must be its own or an
    extension of it."""
    src = ckpt.resolve_checkpoint(cfg.init_from)
    meta = ckpt.read_meta(src)
    old_hash, new_hash = meta["tokenizer"]["hash"], index["tokenizer_hash"]
    if old_hash != new_hash:
        report_path = Path(index.get("tokenizer_dir", "")) / "train_report.json"
        try:
            base_hash = json.loads(report_path.read_text()).get("base_tokenizer_hash")
        except (OSError, ValueError):
            base_hash = None
        if base_hash != old_hash:
            raise LmforgeError(
                f"{cfg.data}: shards use tokenizer {new_hash}, which is neither {src}'s tokenizer ({old_hash}) "
                "nor an extension of it (`lmforge tokenizer extend`)"
            )
    return src, ModelConfig.from_dict(meta["model_config"])


def _load_resized(model: torch.nn.Module, src: Path) -> None:
    """Load weights from `src`; a grown vocabulary keeps the old rows and starts new ones at their mean.

    Mean initialization of new rows follows Hewitt (2021), "Initializing new word embeddings
    for pretrained language models": new tokens start as an average token, not noise.
    """
    ckpt.check_trainable(src, ckpt.read_meta(src))
    tensors = ckpt.load_tensors(src / "model.safetensors")
    own = model.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        old = tensors.get(name)
        if old is not None and old.shape[0] < own[name].shape[0]:
            grown = old.mean(0, keepdim=True).expand(own[name].shape[0], -1).clone()
            grown[: old.shape[0]] = old
            tensors[name] = grown
    ckpt.load_model_weights(model, src, tensors)


def _fully_shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    # FSDP2: shard each block, then the root (embeddings, final norm, head).
    for block in model.layers if hasattr(model, "layers") else [*model.encoder, *model.decoder]:
        fully_shard(block)
    fully_shard(model)


def _full_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Whole model and optimizer state dicts, the same whatever the number of processes (gathered to CPU under FSDP).

    AdamW's state is keyed by parameter name rather than position, so a checkpoint saved under FSDP resumes
    on one process or under DDP and the other way round. Muon's pair of optimizers keeps its own keys
    (it never runs under FSDP: validate refuses it).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if fsdp else StateDictOptions()
    model_sd = get_model_state_dict(model, options=opts) if fsdp else model.state_dict()
    if not isinstance(optimizer, torch.optim.Optimizer):
        return model_sd, optimizer.state_dict()
    return model_sd, get_optimizer_state_dict(model, optimizer, options=opts)


def _load_optimizer(model, optimizer, state: dict, fsdp: bool, where: Path) -> None:
    """Restore `_full_state`'s optimizer state: by parameter name (any number of processes, FSDP or not), or by
    position (checkpoints written before names, and Muon's pair)."""
    # Groups list parameter names ("layers.0.mlp.up_proj.weight"), positions (0, 1, ...) or Muon's "i:position".
    by_name = any(isinstance(p, str) and not p[:1].isdigit() for g in state["param_groups"] for p in g["params"])
    try:
        if by_name and isinstance(optimizer, torch.optim.Optimizer):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True) if fsdp else StateDictOptions()
            set_optimizer_state_dict(model, optimizer, state, options=opts)
        elif fsdp:
            raise ValueError("it keys parameters by position; FSDP needs them by name (resume it without FSDP once)")
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, AssertionError) as e:
        raise LmforgeError(f"{where}: optimizer state does not fit this run ({str(e).splitlines()[0]})") from None
