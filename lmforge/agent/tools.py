"""Tools an agent can call: typed Python functions, described to the model by a JSON schema built from their
signatures, called with checked arguments.

    from lmforge.agent.tools import Tool, builtin_tools
    tools = builtin_tools(["calc", "convert"])             # or "search" with an index: builtin_tools(..., index=idx)
    tools["calc"].schema()                                 # {"type": "function", "function": {"name": "calc", ...}}
    tools["calc"].call({"expression": "4821 * 377"})       # "1817517"

    def weather(city: str, days: int = 1) -> str:
        "Forecast for a city."
        ...
    Tool.from_function(weather)                            # a tool of your own, from its signature and docstring

A tool's parameters are its function's parameters: `str`, `int`, `float`, `bool` (and `list[str]`)
map to JSON schema types, parameters without a default are required, and the first line of the
docstring is the description the model reads. `call(arguments)` checks the arguments against the
signature (unknown names, missing required ones, wrong types: an int where a float is wanted is
accepted) and raises ToolError with a message meant for the model to read and correct itself.

Built in:
- `calc(expression)`: exact arithmetic (lmforge/agent/calc.py; never `eval`).
- `convert(value, from_unit, to_unit)`: units of length, mass, time, volume, data and temperature,
  exact rational factors (a mile is exactly 1609.344 m).
- `search(query, k)`: the top passages of a retrieval index (lmforge rag index), with their sources.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from lmforge.agent.calc import CalcError, calculate, format_number

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolError(Exception):
    """A tool call that cannot run as asked (bad arguments, or the tool's own refusal): told to the model."""


@dataclass
class Tool:
    name: str
    description: str
    fn: Callable
    params: dict  # name -> (python type, required, description)
    # run in a forked process that is killed at the time limit (a tool of yours might loop); the built-in tools are
    # bounded by construction and run in-process
    isolated: bool = True

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, param_help: dict | None = None,
                      isolated: bool = True) -> Tool:  # fmt: skip
        hints = typing.get_type_hints(fn)
        params = {}
        for p in inspect.signature(fn).parameters.values():
            kind = hints.get(p.name, str)
            if kind not in _JSON_TYPES and typing.get_origin(kind) is not list:
                raise TypeError(f"tool {fn.__name__}: parameter {p.name} has type {kind}; tools take str, int, "
                                "float, bool or list[str]")  # fmt: skip
            params[p.name] = (kind, p.default is inspect.Parameter.empty, (param_help or {}).get(p.name, ""))
        doc = inspect.getdoc(fn) or ""
        return cls(name or fn.__name__, doc.split("\n\n")[0].replace("\n", " "), fn, params, isolated)

    def schema(self) -> dict:
        """The OpenAI / ChatML function schema the model is shown."""
        props = {}
        for pname, (kind, _, help_text) in self.params.items():
            if typing.get_origin(kind) is list:
                prop = {"type": "array", "items": {"type": "string"}}
            else:
                prop = {"type": _JSON_TYPES[kind]}
            if help_text:
                prop["description"] = help_text
            props[pname] = prop
        required = [p for p, (_, req, _) in self.params.items() if req]
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                "parameters": {"type": "object", "properties": props, "required": required}}}  # fmt: skip

    def check(self, arguments) -> dict:
        """The arguments, checked against the signature (ToolError naming what is wrong)."""
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        unknown = sorted(set(arguments) - set(self.params))
        if unknown:
            raise ToolError(f"{self.name}: unknown argument(s) {unknown}; it takes {sorted(self.params)}")
        missing = [p for p, (_, req, _) in self.params.items() if req and p not in arguments]
        if missing:
            raise ToolError(f"{self.name}: missing required argument(s) {missing}")
        out = {}
        for pname, value in arguments.items():
            kind = self.params[pname][0]
            if not _fits(kind, value):
                want = self.schema()["function"]["parameters"]["properties"][pname]["type"]
                raise ToolError(f"{self.name}: argument {pname} must be {want}, got {json_type(value)}")
            out[pname] = value
        return out

    def call(self, arguments) -> str:
        """Run the tool on checked arguments; its result as text (ToolError for a refusal the model should see)."""
        result = self.fn(**self.check(arguments))
        return result if isinstance(result, str) else str(result)


def _fits(kind, value) -> bool:
    """Whether a JSON value fits a parameter's type (a bool is not a number; an int is a float)."""
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def calc(expression: str) -> str:
    """Exact arithmetic: + - * / // % and ** (or ^) on integers and decimals, e.g. "4821 * 377" or "(2^10 - 24) / 8"."""
    try:
        return calculate(expression)
    except CalcError as e:
        raise ToolError(f"calc: {e}") from None


# Units: factor to the category's base unit (exact), so value * f(from) / f(to) is exact.
_UNITS: dict[str, tuple[str, Fraction]] = {}
for _cat, _table in {
    "length": {"m": 1, "km": 1000, "cm": Fraction(1, 100), "mm": Fraction(1, 1000), "mi": Fraction("1609.344"),
               "yd": Fraction("0.9144"), "ft": Fraction("0.3048"), "in": Fraction("0.0254"), "nmi": 1852},
    "mass": {"kg": 1, "g": Fraction(1, 1000), "mg": Fraction(1, 10**6), "t": 1000, "lb": Fraction("0.45359237"),
             "oz": Fraction("0.45359237") / 16},
    "time": {"s": 1, "ms": Fraction(1, 1000), "min": 60, "h": 3600, "day": 86400, "week": 604800},
    "volume": {"l": 1, "ml": Fraction(1, 1000), "m3": 1000, "gal": Fraction("3.785411784"),
               "qt": Fraction("3.785411784") / 4, "pt": Fraction("3.785411784") / 8},
    "data": {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20,
             "GiB": 2**30, "TiB": 2**40, "bit": Fraction(1, 8)},
}.items():  # fmt: skip
    for _unit, _f in _table.items():
        _UNITS[_unit] = (_cat, Fraction(_f))
_ALIASES = {"meter": "m", "meters": "m", "kilometer": "km", "kilometers": "km", "mile": "mi", "miles": "mi",
            "foot": "ft", "feet": "ft", "inch": "in", "inches": "in", "yard": "yd", "yards": "yd", "kilogram": "kg",
            "kilograms": "kg", "gram": "g", "grams": "g", "pound": "lb", "pounds": "lb", "lbs": "lb", "ounce": "oz",
            "ounces": "oz", "second": "s", "seconds": "s", "minute": "min", "minutes": "min", "hour": "h",
            "hours": "h", "days": "day", "weeks": "week", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
            "L": "l", "gallon": "gal", "gallons": "gal", "celsius": "C", "fahrenheit": "F", "kelvin": "K",
            "°C": "C", "°F": "F", "bytes": "B", "byte": "B", "bits": "bit"}  # fmt: skip
_KELVIN_AT = {"C": Fraction("273.15"), "K": Fraction(0)}  # kelvin = value + offset ("F" goes through C)


def _unit(name: str) -> str:
    name = name.strip()
    return _ALIASES.get(name, _ALIASES.get(name.lower(), name))


def convert(value: float, from_unit: str, to_unit: str) -> str:
    """Convert a quantity between units of length, mass, time, volume, data size or temperature, e.g. 3 mi to km."""
    a, b = _unit(from_unit), _unit(to_unit)
    x = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    temperature = {"C", "F", "K"}
    if a in temperature or b in temperature:
        if not {a, b} <= temperature:
            raise ToolError(f"convert: cannot convert {from_unit} to {to_unit} (temperature goes to C, F or K)")
        kelvin = (x - 32) * Fraction(5, 9) + _KELVIN_AT["C"] if a == "F" else x + _KELVIN_AT[a]
        out = (kelvin - _KELVIN_AT["C"]) * Fraction(9, 5) + 32 if b == "F" else kelvin - _KELVIN_AT[b]
        return f"{format_number(out)} {b}"
    for unit, given in ((a, from_unit), (b, to_unit)):
        if unit not in _UNITS:
            raise ToolError(f"convert: unknown unit {given!r}; known: {', '.join(sorted(_UNITS))}, C, F, K")
    if _UNITS[a][0] != _UNITS[b][0]:
        raise ToolError(f"convert: {from_unit} is {_UNITS[a][0]} but {to_unit} is {_UNITS[b][0]}")
    return f"{format_number(x * _UNITS[a][1] / _UNITS[b][1])} {b}"


def search_tool(index) -> Tool:
    """The `search` tool over a RagIndex: the top passages with their sources."""

    def search(query: str, k: int = 3) -> str:
        """Search the documents; returns the top passages with their sources."""
        if not 1 <= k <= 10:
            raise ToolError("search: k must be between 1 and 10")
        hits = index.search(query, k)
        if not hits:
            return "no passage matches"
        return "\n\n".join(f"[{h.rank}] {h.source}\n{h.text.strip()}" for h in hits)

    help_ = {"query": "what to look for", "k": "how many passages (1-10)"}
    return Tool.from_function(search, param_help=help_, isolated=False)


BUILTIN = ("calc", "convert", "search")


def builtin_tools(names, index=None) -> dict[str, Tool]:
    """{name: Tool} for the built-in tools named (`search` needs a RagIndex)."""
    from lmforge.errors import LmforgeError

    out = {}
    for name in names:
        if name == "calc":
            out[name] = Tool.from_function(calc, param_help={"expression": "the arithmetic expression"}, isolated=False)
        elif name == "convert":
            out[name] = Tool.from_function(convert, isolated=False)
        elif name == "search":
            if index is None:
                raise LmforgeError("the search tool needs a retrieval index (--rag INDEX)")
            out[name] = search_tool(index)
        else:
            raise LmforgeError(f"unknown tool {name!r}; built in: {', '.join(BUILTIN)}")
    return out
