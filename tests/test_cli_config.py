"""The training spine's contract: frozen typed configs, a CLI generated from them, the loop's hooks.

python -m pytest -q tests/test_cli_config.py
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from lmforge.cli import build_parser, main
from lmforge.cli_config import field_help, flags_of
from lmforge.config import LoopConfig, resolve
from lmforge.errors import LmforgeError
from lmforge.train.pretrain import TrainConfig, resolve_train_config

# Every command whose flags are generated from a config dataclass.
STAGES = {
    "pretrain": ("lmforge.train.pretrain", "TrainConfig"),
    "sft": ("lmforge.train.sft", "SftConfig"),
    "reward": ("lmforge.align.reward", "RewardConfig"),
    "dpo": ("lmforge.align.dpo", "DpoConfig"),
    "grpo": ("lmforge.align.grpo", "GrpoConfig"),
    "ppo": ("lmforge.align.ppo", "PpoConfig"),
    "best-of-n": ("lmforge.align.best_of_n", "BestOfNConfig"),
    "tokenizer train": ("lmforge.tokenizer.cli", "TokenizerTrainConfig"),
    "tokenizer extend": ("lmforge.tokenizer.cli", "TokenizerExtendConfig"),
    "data tokenize": ("lmforge.data.tokenize_cmd", "TokenizeConfig"),
    "eval": ("lmforge.eval.eval_cmd", "EvalConfig"),
}


def _config_class(stage: str):
    import importlib

    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def _subparser(stage: str):
    words = stage.split()
    parser = build_parser(words[:1])
    for word in words:  # `tokenizer train`: the command's parser, then its action's
        parser = next(a for a in parser._actions if a.choices and word in a.choices).choices[word]
    return parser


def _flags(cls, prefix: str = "") -> dict[str, str]:
    """{flag: field} the generator should make for `cls` (nested dataclasses dotted)."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _flags(tp, f"{f.name}.")
        else:
            from lmforge.train.finetune import FinetuneConfig

            name = "model" if f.name == "base" and issubclass(cls, FinetuneConfig) else f.name  # their --model
            out[f"--{prefix}{name.replace('_', '-')}"] = f"{prefix}{f.name}"
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_field_with_its_help_and_default(stage, capsys):
    cls = _config_class(stage)
    options = {s: a for a in _subparser(stage)._actions for s in a.option_strings}
    for flag, dest in _flags(cls).items():
        assert flag in options, f"{stage}: no {flag}"
        action = options[flag]
        assert action.dest == dest and action.default is None  # unset flags never override a recipe
        assert "default: " in action.help and len(action.help.split("(default")[0].strip()) > 3, (flag, action.help)
    with pytest.raises(SystemExit):
        main([*stage.split(), "--help"])
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in _flags(cls)) and "--config" in shown and "--set" in shown


def test_help_text_is_the_field_comment_and_a_subclass_may_change_it():
    from lmforge.align.dpo import DpoConfig
    from lmforge.train.finetune import FinetuneConfig

    loop, ft, dpo = field_help(LoopConfig), field_help(FinetuneConfig), field_help(DpoConfig)
    assert loop["grad_clip"] == "clip the global gradient norm; 0 = off"
    assert ft["lr"].startswith("peak LR (LoRA") and dpo["lr"] != ft["lr"]  # redeclared with its own comment
    assert dpo["grad_clip"] == loop["grad_clip"]  # inherited
    # A comment block above a field serves when the line has none (TrainConfig.model).
    assert field_help(TrainConfig)["model"].startswith("The data's tokenizer decides model.vocab_size")


def test_flags_are_typed_like_recipes_and_sets_with_the_same_precedence():
    parser = build_parser(["pretrain"])
    args = parser.parse_args(["pretrain", "--lr", "3e-3", "--model.n-layer", "2", "--no-compile", "--max-steps", "1e3",
                              "--set", "model.d_model=64"])  # fmt: skip
    flags = flags_of(args, TrainConfig)
    assert flags == {"lr": "3e-3", "model": {"n_layer": "2"}, "compile": False, "max_steps": "1e3"}
    cfg = resolve_train_config({"lr": 1.0, "model": {"n_layer": 8, "n_head": 2}}, flags, {"model": {"d_model": 64}})
    assert (cfg.lr, cfg.max_steps, cfg.compile) == (3e-3, 1000, False)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model) == (2, 2, 64)  # flag > recipe, recipe kept


def test_list_flags_extend_and_a_list_field_takes_many_positionals():
    from lmforge.eval.report import ReportConfig

    args = build_parser(["report"]).parse_args(["report", "a", "b", "--eval", "x", "y", "--eval", "z"])
    assert flags_of(args, ReportConfig) == {"run_dir": ["a", "b"], "eval": ["x", "y", "z"]}
    args = build_parser(["report"]).parse_args(["report", "--run-dir", "c"])
    assert flags_of(args, ReportConfig) == {"run_dir": ["c"]}


def test_a_bad_flag_value_is_a_one_line_error_naming_the_field(tmp_path, capsys):
    assert main(["dpo", "--model", str(tmp_path), "--data", "x", "--beta", "big"]) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: config field beta: expected float, got 'big'"
    assert main(["pretrain", "--data", "x", "--out", "y", "--schedule", "linear"]) == 2
    assert "schedule must be one of cosine, wsd" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no abbreviations: --mod is not --model (nor --model.n-layer)
        main(["sft", "--mod", "x"])
    assert e.value.code == 2


def test_configs_are_frozen_and_resolving_makes_new_ones():
    from lmforge.train.sft import SftConfig

    cfg = resolve(SftConfig, {"lr": 1e-3}, {"base": "b", "data": "d"}, {"seq_len": "0"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve_train_config({}, {}, {}).model.n_layer = 2
    # The shared loop checks hold in every stage (they drifted when each stage had its own copy).
    for cls, extra in ((TrainConfig, {}), (SftConfig, {"base": "b", "data": "d"})):
        with pytest.raises(LmforgeError, match="keep_last must be >= 1"):
            resolve(cls, {}, extra, {"keep_last": 0})
        with pytest.raises(LmforgeError, match="log_every must be >= 1"):
            resolve(cls, {}, extra, {"log_every": 0})


def test_kl_limit_stops_rl_stages_above_max_kl():
    from lmforge.align.rollout import kl_limit

    assert kl_limit(5.0)({"kl": 4.9}) is None and kl_limit(0.0)({"kl": 1e9}) is None
    assert kl_limit(5.0)({"kl": 6.0}) == (
        "KL to the reference is 6, above max_kl=5 (lower the lr or raise the KL coefficient)"
    )


def test_recipe_sections_are_the_commands_configs(tmp_path, capsys):
    """`lmforge run` checks its tokenizer/tokenize/pretrain/sft sections against the commands' dataclasses."""
    for section, message in [
        ("tokenize: {val_fractoin: 0.1}", "unknown config field 'tokenize.val_fractoin' (did you mean 'tokenize.val_fraction'?)"),
        ("tokenize: {workers: 0}", "workers must be >= 1"),
        ("tokenizer: {out: elsewhere}", "tokenizer.out is set by `lmforge run`"),
        ("pretrain: {data: other/shards}", "pretrain.data is set by `lmforge run`"),
        ("pretrain: {lrr: 0.1}", "unknown config field 'pretrain.lrr' (did you mean 'pretrain.lr'?)"),
        ("sft: {data: chitchat, max_step: 3}", "unknown config field 'sft.max_step' (did you mean 'sft.max_steps'?)"),
    ]:  # fmt: skip
        path = tmp_path / "r.yaml"
        path.write_text(f"corpus: shakespeare\n{section}\n")
        assert main(["run", "--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()
