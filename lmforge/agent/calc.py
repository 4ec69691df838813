"""Exact arithmetic on an expression a model wrote, without `eval`: the calculator tool's engine.

    from lmforge.agent.calc import calculate, CalcError
    calculate("4821 * 377")          # "1817517"
    calculate("(2^10 - 24) / 8")     # "125"
    calculate("1/3 + 0.5")           # "5/6 (≈ 0.8333333333)"
    calculate("__import__('os')")    # CalcError: not arithmetic: a name (__import__)

The expression is parsed by Python's own parser (`ast`) and walked node by node: numbers (ints,
decimals, scientific notation), + - * / // % **, unary signs and parentheses, nothing else. Any
other node (a name, a call, an attribute, a string, a comparison) is a CalcError naming it; nothing
is ever executed. Numbers are exact rationals (`fractions.Fraction`; "0.1" is 1/10, not a float), so
a model that calls the calculator gets the exact product of two 20-digit numbers. `^` means power
(what people and models write; it is read as `**`, with power's precedence), `×`/`÷` times and divide, `_` and thin spaces group digits.

Limits, so that no expression can hang the agent: at most 2,000 characters, a power's exponent an
integer of at most 10,000 in size and a result of at most 4,000 digits (Python itself refuses to print
an integer past 4,300); deeper nesting than the
parser allows is a CalcError too.
"""

from __future__ import annotations

import ast
import math
import operator
from fractions import Fraction

MAX_CHARS = 2000
MAX_EXPONENT = 10_000
MAX_DIGITS = 4000  # under Python's 4300-digit limit on printing an int


class CalcError(ValueError):
    """The expression is not arithmetic, is malformed, or is out of the calculator's limits."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_NODE_NAMES = {ast.Name: "a name", ast.Call: "a function call", ast.Attribute: "an attribute", ast.Compare: "a "
               "comparison", ast.BoolOp: "a boolean operator", ast.Subscript: "a subscript", ast.Lambda: "a lambda"}  # fmt: skip


def _digits(x: Fraction) -> int:
    """About how many decimal digits the numerator and denominator of x have together (from their bit lengths:
    printing a huge int to count is itself refused past 4300 digits)."""
    return int((abs(x.numerator).bit_length() + x.denominator.bit_length()) * 0.30103) + 1


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise CalcError("a power's exponent must be a whole number (roots are not exact)")
    e = exp.numerator
    if abs(e) > MAX_EXPONENT:
        raise CalcError(f"exponent {e} is larger than {MAX_EXPONENT}")
    if base == 0 and e < 0:
        raise CalcError("division by zero (0 to a negative power)")
    size = abs(e) * max(math.log10(abs(base.numerator) or 1), math.log10(base.denominator))
    if size > MAX_DIGITS:
        raise CalcError(f"the result would have more than {MAX_DIGITS} digits")
    return base**e


def _eval(node) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError(f"not arithmetic: a {type(node.value).__name__} constant ({node.value!r})")
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise CalcError(f"the number {node.value} is out of range")
        return Fraction(node.value) if isinstance(node.value, int) else Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        op = _BINARY.get(type(node.op))
        if op is None:
            raise CalcError(f"not arithmetic: the operator {type(node.op).__name__}")
        if right == 0 and op in (operator.truediv, operator.floordiv, operator.mod):
            raise CalcError("division by zero")
        out = op(left, right)
        if _digits(out) > MAX_DIGITS:
            raise CalcError(f"the result would have more than {MAX_DIGITS} digits")
        return out
    what = _NODE_NAMES.get(type(node), type(node).__name__)
    if isinstance(node, ast.Name):
        what += f" ({node.id})"
    raise CalcError(f"not arithmetic: {what}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression (see the module docstring)."""
    if not isinstance(expression, str):
        raise CalcError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalcError(f"the expression is longer than {MAX_CHARS} characters")
    text = (
        expression.replace("^", "**")
        .replace("×", "*")
        .replace("÷", "/")
        .replace("−", "-")
        .replace("\u2009", "")
        .strip()
    )
    if not text:
        raise CalcError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalcError(f"malformed expression ({e.msg})") from None
    except (RecursionError, MemoryError):
        raise CalcError("the expression is nested too deeply") from None
    try:
        return _eval(tree)
    except RecursionError:
        raise CalcError("the expression is nested too deeply") from None


def format_number(x: Fraction) -> str:
    """An integer as digits; a terminating decimal exactly; anything else as p/q with a 10-digit approximation."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # terminates: print it exactly
        places = 0
        while (x * 10**places).denominator != 1:
            places += 1
        sign = "-" if x < 0 else ""
        scaled = abs(x.numerator * 10**places // x.denominator)
        whole, frac = divmod(scaled, 10**places)
        return f"{sign}{whole}.{str(frac).rjust(places, '0')}"
    return f"{x.numerator}/{x.denominator} (≈ {float(x):.10g})"


def calculate(expression: str) -> str:
    """The formatted exact value of `expression`; CalcError says why when it cannot be computed."""
    return format_number(evaluate(expression))
