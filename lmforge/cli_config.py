"""A stage's command line, generated from its config dataclass: every field a flag, its comment the help text.

    add_config_command(subparsers, "dpo", "direct preference optimization", DpoConfig, dpo, rename={"base": "model"})
    # lmforge dpo --help  ->  --beta FLOAT  strength of the KL anchor ... (default: 0.1)

Every field of the dataclass becomes `--field-name` (booleans also `--no-field-name`); a nested
dataclass field (pretraining's `model`) becomes `--model.field-name`. The help text is the
comment on the field's line in the source (or the comment lines right above it), the same
text the code reader sees, with the default appended. Values stay strings here and are typed
by `lmforge.config.with_updates`, so a bad value is the same one-line error from a flag, a
recipe or `--set`. Precedence: the dataclass defaults <- `--config` YAML <- flags <- `--set`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing

from lmforge.config import LoopConfig, load_yaml, parse_set, recipe_path, resolve
from lmforge.data.textsplit import TextSplitFields


class IntermixedParser(argparse.ArgumentParser):
    """A command parser whose positionals may follow flags: `lmforge rag ask INDEX --model M "question"` (plain
    argparse takes every positional at the first one it meets, then rejects "question"). `add_config_command`
    gives it to commands with two or more positional fields."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back here: the plain parse
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field: help} for a dataclass and its bases, read from the comments in their source (a subclass's wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen app): flags keep their defaults, without help
            continue
        trailing, whole_line = {}, {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT and not tok.string.startswith("# fmt:"):
                text = tok.string.lstrip("#").strip()
                (whole_line if tok.line.strip().startswith("#") else trailing)[tok.start[0]] = text
        for node in ast.parse(src).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = trailing.get(node.end_lineno) or trailing.get(node.lineno)
            if not text:  # the comment block right above the field
                above, line = [], node.lineno - 1
                while line in whole_line:
                    above.insert(0, whole_line[line])
                    line -= 1
                text = " ".join(above)
            if text:
                out[node.target.id] = text
    return out


def _metavar(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", "VALUE").upper()


def _add_fields(group, cls, prefix: str, rename: dict, defaults_note: str | None, only) -> None:
    hints, helps, defaults = typing.get_type_hints(cls), field_help(cls), cls()
    for f in dataclasses.fields(cls):
        if only is not None and not only(f.name) or dataclasses.is_dataclass(hints[f.name]):
            continue
        name = rename.get(f.name, f.name)
        flag, dest = f"--{prefix}{name.replace('_', '-')}", f"{prefix}{f.name}"
        default = defaults_note or f"default: {getattr(defaults, f.name)!r}"
        if name != f.name:  # recipes and --set use the field's own name
            default += f"; field {f.name}"
        text = f"{helps.get(f.name, '')} ({default})".strip().replace("%", "%%")
        metavar = f.metadata.get("metavar") or _metavar(hints[f.name])
        if hints[f.name] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(hints[f.name]) is list:  # `--input A B --input C` is [A, B, C]
            group.add_argument(flag, dest=dest, action="extend", nargs="+", metavar=metavar, default=None, help=text)
        else:
            group.add_argument(flag, dest=dest, metavar=metavar, default=None, help=text)


def add_config_flags(parser: argparse.ArgumentParser, cls, rename: dict | None = None, positional=()) -> None:
    """A flag per field of `cls`: the stage's own fields, then the shared loop's, then nested dataclasses' fields.
    Fields named in `positional` may also be given as positional arguments (`lmforge eval RUN`)."""
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    for name in positional:  # a list field takes any number of positional values
        parser.add_argument(f"{name}_positional", nargs="*" if typing.get_origin(hints[name]) is list else "?",
                            metavar=name.upper(), default=None, help=f"the same as --{name.replace('_', '-')}")  # fmt: skip
    loop = {f.name for f in dataclasses.fields(LoopConfig)} if issubclass(cls, LoopConfig) else set()
    split = {f.name for f in dataclasses.fields(TextSplitFields)} if issubclass(cls, TextSplitFields) else set()
    own = parser.add_argument_group(f"{cls.__name__} fields (also as --set FIELD=VALUE or in --config)")
    _add_fields(own, cls, "", rename, None, lambda n: n not in loop | split)
    if split:
        text = parser.add_argument_group("how .txt inputs split into documents (lmforge/data/textsplit.py)")
        _add_fields(text, cls, "", rename, None, lambda n: n in split)
    if loop:
        shared = parser.add_argument_group("training loop fields (LoopConfig, the same in every training stage)")
        _add_fields(shared, cls, "", rename, None, lambda n: n in loop)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested = parser.add_argument_group(
                f"{f.name} fields ({hints[f.name].__name__}; --set {f.name}.FIELD=VALUE)"
            )
            note = "default: from --preset" if f.name == "model" and hasattr(cls, "preset") else None
            _add_fields(nested, hints[f.name], f"{f.name}.", {}, note, None)


def flags_of(args: argparse.Namespace, cls) -> dict:
    """The fields given as flags (None = not given), nested ones as {"model": {...}}: the flags layer of resolve()."""
    out: dict = {}
    for dest, value in vars(args).items():
        if value is None or dest in ("config", "set", "func", "command"):
            continue
        if dest.endswith("_positional"):  # `lmforge eval RUN`: the field's value, unless its flag was given too
            dest = dest.removesuffix("_positional")
            if getattr(args, dest, None) is not None or value == []:  # nargs="*" given nothing: not given
                continue
        head, _, rest = dest.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        elif head in {f.name for f in dataclasses.fields(cls)}:
            out[head] = value
    return out


def add_config_command(subparsers, name: str, help: str, cls, run, *, rename: dict | None = None,
                       resolve_fn=None, description: str | None = None, exit_code=None,
                       positional=()) -> argparse.ArgumentParser:  # fmt: skip
    """`lmforge NAME`: flags generated from `cls`, plus --config/--set; runs `run(cfg)`.

    `resolve_fn(recipe, flags, sets)` builds the config (default: `resolve(cls, ...)`); `description` is shown
    above the flags (a stage passes its module docstring: what it does and how to run it); `exit_code(result,
    name)` turns run's result into the exit status (default 0; training stages pass `stop_exit_code`). With two
    or more `positional` fields, positionals may follow flags (`lmforge rag ask INDEX --model M "question"`).
    """
    p = subparsers.add_parser(
        name, help=help, description=description or help, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --model must never be taken for --model.n-layer, nor --lr for --lr-something
    )  # fmt: skip
    if len(positional) > 1:
        p.__class__ = IntermixedParser  # made by the subparsers' own class; only its parsing changes
    p.add_argument("--config", help=f"YAML file of {cls.__name__} fields, or a packaged recipe (lmforge/recipes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    add_config_flags(p, cls, rename, positional)

    def main(args: argparse.Namespace) -> int:
        recipe = load_yaml(recipe_path(args.config)) if args.config else {}
        build = resolve_fn or functools.partial(resolve, cls)
        result = run(build(recipe, flags_of(args, cls), parse_set(args.set)))
        return exit_code(result, name) if exit_code else 0

    p.set_defaults(func=main)
    return p
