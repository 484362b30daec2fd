"""Tools a chat model may call: calculate, solve and search, with a registry and one safe entry point.

The chat loop parses a tool call, then `call_plugin(plugins, name, arguments)` returns the text to feed
back as the observation. It never raises: a bad call comes back as `"error: NAME: what went wrong"`, so
the model can read the mistake and try again.

Safety, since the arguments are written by a model:
- calculate walks the `ast` of the expression through a whitelist and evaluates it itself; nothing is
  passed to `eval`. Sizes are checked before the work is done (see the limits below).
- solve checks the equations with the same whitelist, then builds sympy expressions from the tree
  (again without `eval`, so without `parse_expr`) in a separate Python process that is killed when its
  time is up, because sympy can think for minutes.
- search reads only the folder given on the command line and never goes online.
- call_plugin checks the arguments against the plugin's JSON schema, waits at most `timeout` seconds
  and cuts long answers to `max_chars`.
"""

import ast
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xtune.errors import XtuneError

MAX_EXPRESSION_CHARS = 1000
MAX_NESTING = 100  # calls, unary signs and right operands inside each other; long sums are not nesting
MAX_INTEGER_DIGITS = 4000
MAX_FACTORIAL = 1000  # factorial(1000) has 2,568 digits
MAX_ROUND_DIGITS = 100
SIGNIFICANT_DIGITS = 12  # floats are shown with 12 significant digits: 0.1 + 0.2 -> 0.3
SOLVE_TIMEOUT_S = 5.0
SOLVE_MEMORY_BYTES = 2 << 30
MAX_EQUATIONS = 10
CALL_TIMEOUT_S = 6.0
MAX_OUTPUT_CHARS = 2000

_MAX_INTEGER_BITS = math.ceil(MAX_INTEGER_DIGITS * math.log2(10))
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_TYPOGRAPHY = str.maketrans({"^": "**", "×": "*", "÷": "/", "−": "-"})


class PluginError(Exception):
    """A mistake in a tool call, said so that the model can fix it."""


@dataclass(frozen=True)
class Plugin:
    name: str
    description: str
    parameters: dict
    """JSON schema of the arguments object, OpenAI function-calling style."""
    run: Callable[[dict], str]
    """Takes the parsed, schema-checked arguments; returns text for the model or raises."""

    def tool_schema(self) -> dict:
        """The entry for an OpenAI-style `tools` list."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


# ---------------------------------------------------------------- the expression whitelist


def parse_expression(text: str) -> ast.expr:
    """The syntax tree of one arithmetic expression; `^` is read as a power, as people write it."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise PluginError(f"the expression has {len(text):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}")
    text = text.translate(_TYPOGRAPHY).strip()
    if not text:
        raise PluginError("the expression is empty")
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as error:
        raise PluginError(f"not a valid expression: {error.msg}") from None
    except (ValueError, RecursionError, MemoryError):
        raise PluginError("not a valid expression (nested too deeply or contains a null byte)") from None


class Domain(Protocol):
    """What the values of a whitelisted tree are: Python numbers, sympy expressions, or nothing (a check)."""

    def number(self, value: int | float): ...
    def name(self, name: str): ...
    def unary(self, op: type[ast.unaryop], operand): ...
    def binary(self, op: type[ast.operator], left, right): ...
    def call(self, function: str, args: list): ...


_BINARY_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def evaluate(node: ast.expr, domain: Domain, functions: Sequence[str], depth: int = 0):
    """Walk the whitelist: numbers, names, + - * / // % **, parentheses, calls of `functions` by bare name."""
    if depth > MAX_NESTING:
        raise PluginError(f"the expression is nested more than {MAX_NESTING} levels deep")
    match node:
        case ast.Constant(value=value) if type(value) in (int, float):
            return domain.number(value)
        case ast.Name(id=name):
            return domain.name(name)
        case ast.UnaryOp(op=ast.UAdd() | ast.USub() as op, operand=operand):
            return domain.unary(type(op), evaluate(operand, domain, functions, depth + 1))
        case ast.BinOp():
            chain = []  # walk the left spine of `1 + 2 + ... + 500` in a loop, not by recursion
            while isinstance(node, ast.BinOp):
                if type(node.op) not in _BINARY_OPS:
                    hint = "; write powers as **" if isinstance(node.op, ast.BitXor) else ""
                    raise PluginError(f"the operator {type(node.op).__name__} is not allowed{hint}")
                chain.append(node)
                node = node.left
            value = evaluate(node, domain, functions, depth + 1)
            for link in reversed(chain):
                value = domain.binary(type(link.op), value, evaluate(link.right, domain, functions, depth + 1))
            return value
        case ast.Call(func=ast.Name(id=function), args=args, keywords=[]) if function in functions:
            return domain.call(function, [evaluate(arg, domain, functions, depth + 1) for arg in args])
        case ast.Call(func=ast.Name(id=function), keywords=[]):
            raise PluginError(f"unknown function {function}(); the functions are: {', '.join(sorted(functions))}")
        case ast.Call(func=ast.Name()):
            raise PluginError("keyword arguments are not allowed; pass arguments by position, e.g. round(2.5, 1)")
        case ast.Attribute() | ast.Call(func=ast.Attribute()):
            raise PluginError("attribute access is not allowed; call functions by bare name: sqrt(4), not math.sqrt(4)")
        case ast.Call():
            raise PluginError("only functions called by bare name are allowed, e.g. sqrt(2)")
        case ast.Constant(value=value):
            raise PluginError(f"only numbers are allowed, not {type(value).__name__} values")
        case ast.Compare():
            raise PluginError("comparisons are not allowed")
        case _:
            raise PluginError(f"{type(node).__name__} is not allowed; use numbers, + - * / // % **, and functions")


def _power_digits(base: int, exponent: int) -> float:
    """About how many decimal digits `base ** exponent` has, computed without computing it."""
    if abs(base) <= 1 or exponent <= 0:
        return 1.0
    if exponent > _MAX_INTEGER_BITS:
        return math.inf
    return exponent * math.log10(abs(base))


def _refuse_power(base, exponent, digits: float):
    base, exponent = (_abbreviate(f"{v}" if re.fullmatch(r"\d+", f"{v}") else f"({v})") for v in (base, exponent))
    size = f"about {digits:,.0f} digits" if math.isfinite(digits) else "far too many digits"
    raise PluginError(f"{base} ** {exponent} would have {size}; the limit is {MAX_INTEGER_DIGITS:,} digits")


def _check_integer(value: int) -> int:
    if abs(value).bit_length() > _MAX_INTEGER_BITS:
        raise PluginError(f"an integer in the calculation has more than {MAX_INTEGER_DIGITS:,} digits")
    return value


# ---------------------------------------------------------------- calculate


def _min(*values):
    return min(values)


def _max(*values):
    return max(values)


def _factorial(n):
    if isinstance(n, int) and n > MAX_FACTORIAL:
        raise PluginError(f"factorial({n}) is too large; the limit is factorial({MAX_FACTORIAL})")
    return math.factorial(n)


def _round(value, ndigits=None):
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS:
        raise PluginError(f"round() takes a whole number of digits from -{MAX_ROUND_DIGITS} to {MAX_ROUND_DIGITS}")
    return round(value, ndigits)


MATH_FUNCTIONS: dict[str, Callable] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "degrees": math.degrees, "radians": math.radians, "hypot": math.hypot,
    "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": _round, "min": _min, "max": _max,
    "factorial": _factorial, "gcd": math.gcd, "lcm": math.lcm,
}  # fmt: skip
MATH_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


class Arithmetic:
    """Python ints (exact, at most MAX_INTEGER_DIGITS digits) and floats; complex results are refused."""

    def number(self, value):
        return _check_integer(value) if isinstance(value, int) else value

    def name(self, name):
        if name not in MATH_CONSTANTS:
            raise PluginError(f"unknown name {name!r}; the constants are: {', '.join(MATH_CONSTANTS)}")
        return MATH_CONSTANTS[name]

    def unary(self, op, operand):
        return -operand if op is ast.USub else operand

    def binary(self, op, left, right):
        if op is ast.Pow and isinstance(left, int) and isinstance(right, int):
            digits = _power_digits(left, right)
            if digits > MAX_INTEGER_DIGITS:
                _refuse_power(left, right, digits)
        try:
            match op:
                case ast.Add: value = left + right
                case ast.Sub: value = left - right
                case ast.Mult: value = left * right
                case ast.Div: value = left / right
                case ast.FloorDiv: value = left // right
                case ast.Mod: value = left % right
                case ast.Pow: value = left**right
        except ZeroDivisionError:
            raise PluginError("division by zero") from None
        except OverflowError:
            raise PluginError(f"{_BINARY_OPS[op]} overflows: the result is too large for a float") from None
        return self._checked(value)

    def call(self, function, args):
        try:
            value = MATH_FUNCTIONS[function](*args)
        except (ValueError, TypeError, OverflowError, ZeroDivisionError) as error:
            shown = ", ".join(_abbreviate(format_number(arg)) for arg in args)
            raise PluginError(f"{function}({shown}): {error}") from None
        return self._checked(value)

    def _checked(self, value):
        if isinstance(value, complex):
            raise PluginError("the result is not a real number (a negative number to a fractional power?)")
        return _check_integer(value) if isinstance(value, int) else value


def _abbreviate(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def format_number(value: int | float) -> str:
    """Integers exactly; floats with SIGNIFICANT_DIGITS significant digits, without a trailing `.0`."""
    if isinstance(value, int):
        return str(value)
    return format(value, f".{SIGNIFICANT_DIGITS}g")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, e.g. `2 * sqrt(2) + 10 ** 3`."""
    try:
        value = evaluate(parse_expression(expression), Arithmetic(), MATH_FUNCTIONS)
    except RecursionError:
        raise PluginError("the expression is nested too deeply") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise PluginError("the result is not a finite number" + (" (overflow)" if math.isinf(value) else ""))
    return format_number(value)


def calculate_plugin() -> Plugin:
    functions = ", ".join(MATH_FUNCTIONS)
    return Plugin(
        name="calculate",
        description=(
            "Evaluate an arithmetic expression exactly (integers) or to 12 significant digits (floats). "
            f"Operators: + - * / // % ** and parentheses. Functions: {functions}. Constants: pi, e, tau."
        ),
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) * sqrt(2) / 7"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
        run=lambda arguments: calculate(arguments["expression"]),
    )


# ---------------------------------------------------------------- solve

SOLVE_FUNCTIONS = (
    "sqrt", "exp", "log", "ln", "log10", "log2", "sin", "cos", "tan", "asin", "acos", "atan",
    "sinh", "cosh", "tanh", "floor", "ceil", "abs", "min", "max", "factorial",
)  # fmt: skip


class Shape:
    """Checks names without computing anything: the test done before a solver process is started."""

    def number(self, value):
        return None

    def name(self, name):
        if name in SOLVE_FUNCTIONS:
            raise PluginError(f"{name} is a function: call it, e.g. {name}(x)")
        if not _NAME.fullmatch(name):
            raise PluginError(f"{name!r} is not allowed as a variable: use letters, digits and _ (at most 32)")

    def unary(self, op, operand):
        return None

    def binary(self, op, left, right):
        return None

    def call(self, function, args):
        return None


class Symbolic(Shape):
    """sympy expressions; integer powers and factorials of numbers are size-checked before sympy does them."""

    def __init__(self):
        import sympy

        self.sympy = sympy
        self.functions = {
            "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "ln": sympy.log,
            "log10": lambda x: sympy.log(x, 10), "log2": lambda x: sympy.log(x, 2),
            "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "asin": sympy.asin, "acos": sympy.acos,
            "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
            "floor": sympy.floor, "ceil": sympy.ceiling, "abs": sympy.Abs, "min": sympy.Min, "max": sympy.Max,
            "factorial": sympy.factorial,
        }  # fmt: skip

    def number(self, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise PluginError("a number in the equation is too large")
        return self.sympy.Integer(value) if isinstance(value, int) else self.sympy.Rational(repr(value))

    def name(self, name):
        super().name(name)
        constants = {"pi": self.sympy.pi, "e": self.sympy.E, "tau": 2 * self.sympy.pi}
        return constants.get(name) or self.sympy.Symbol(name)

    def unary(self, op, operand):
        return -operand if op is ast.USub else operand

    def binary(self, op, left, right):
        if op is ast.Pow and left.is_Rational and right.is_Rational:  # 2**(10**10/3) is 2**3333333333 * 2**(1/3)
            digits = _power_digits(max(abs(int(left.p)), int(left.q)), abs(int(right)))
            if digits > MAX_INTEGER_DIGITS:
                _refuse_power(left, right, digits)
        match op:
            case ast.Add: return left + right
            case ast.Sub: return left - right
            case ast.Mult: return left * right
            case ast.Div: return left / right
            case ast.FloorDiv: return self.sympy.floor(left / right)
            case ast.Mod: return self.sympy.Mod(left, right)
            case ast.Pow: return left**right

    def call(self, function, args):
        if function == "factorial" and args and args[0].is_Integer and args[0] > MAX_FACTORIAL:
            raise PluginError(f"factorial({args[0]}) is too large; the limit is factorial({MAX_FACTORIAL})")
        try:
            return self.functions[function](*args)
        except TypeError as error:
            raise PluginError(f"{function}(): {error}") from None


def _split_equation(equation: str) -> tuple[str, str]:
    sides = equation.replace("==", "=").split("=")
    if len(sides) > 2:
        raise PluginError(f"{equation!r} has more than one '='; give each equation separately")
    return (sides[0], sides[1]) if len(sides) == 2 else (sides[0], "0")


def _as_list(value: str | list[str] | None, separators: str) -> list[str]:
    if value is None:
        return []
    items = re.split(separators, value) if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


def solve(
    equations: str | list[str], variables: str | list[str] | None = None, timeout: float = SOLVE_TIMEOUT_S
) -> str:
    """Solve equations such as `x**2 - 4 = 0` (a string may hold several, split by `;` or new lines)."""
    equations = _as_list(equations, r"[;\n]")
    variables = _as_list(variables, r"[,\s]+")
    if not equations:
        raise PluginError("no equation given")
    if len(equations) > MAX_EQUATIONS:
        raise PluginError(f"{len(equations)} equations; the limit is {MAX_EQUATIONS}")
    for variable in variables:
        if not _NAME.fullmatch(variable) or variable in MATH_CONSTANTS or variable in SOLVE_FUNCTIONS:
            raise PluginError(f"{variable!r} is not a variable name")
    shape = Shape()
    for equation in equations:
        for side in _split_equation(equation):
            evaluate(parse_expression(side), shape, SOLVE_FUNCTIONS)
    return _run_solver({"equations": equations, "variables": variables}, timeout)


def _solver_command() -> list[str]:
    """A fresh Python that imports this module from where it is; no fork of a process holding a model."""
    source_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {source_root!r}); import xtune.infer.plugins as p; p.solver_main()"
    return [sys.executable, "-c", code]


SOLVER_START_TIMEOUT_S = 120
"""How long the solver process may take to start Python and import sympy, apart from its time to solve (starting
took 8.2 s under load, more than the whole 5 s budget)."""
READY = "ready"


class _WarmSolver:
    """One solver process started ahead of the call that will use it, so that a call waits for sympy's answer and
    not for Python and sympy to start; each call takes the warm process and starts the next one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next: tuple[tuple[str, ...], subprocess.Popen] | None = None

    def warm(self) -> None:
        with self._lock:
            if self._next is None:
                command = tuple(_solver_command())
                self._next = (command, _start(command))

    def take(self) -> subprocess.Popen:
        command = tuple(_solver_command())
        with self._lock:
            warm, self._next = self._next, None
            if warm is not None and warm[0] != command:  # the command changed (tests): that process is no use
                warm[1].kill()
                warm = None
            process = warm[1] if warm is not None else _start(command)
            self._next = (command, _start(command))
        return process


def _start(command: tuple[str, ...]) -> subprocess.Popen:
    return subprocess.Popen(
        list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


_SOLVERS = _WarmSolver()


def _run_solver(request: dict, timeout: float) -> str:
    try:
        process = _SOLVERS.take()
    except OSError as error:
        raise PluginError(f"could not start the solver: {error}") from None
    try:
        if _first_line(process, SOLVER_START_TIMEOUT_S) != READY:
            process.kill()
            _, stderr = process.communicate()
            lines = stderr.strip().splitlines() or [f"exit status {process.returncode}"]
            raise PluginError(f"the solver did not start: {lines[-1]}")
        # the clock starts once sympy is imported; the process is killed when the time is up, so the work stops
        stdout, stderr = process.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise PluginError(f"no answer within {timeout:g} s; try a simpler equation or fewer variables") from None
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    try:
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise PluginError(f"the solver stopped: {lines[-1]}") from None
    if "error" in reply:
        raise PluginError(reply["error"])
    return reply["answer"]


def _first_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's first line of output, read straight from the pipe within `timeout` seconds ('' if none)."""
    import selectors

    data, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in data and selector.select(max(0.0, deadline - time.monotonic())):
            chunk = os.read(process.stdout.fileno(), 1)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


def solver_main() -> None:
    """The solver process: says READY once sympy is imported, then one JSON request on stdin, one JSON line on
    stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (SOLVE_MEMORY_BYTES, SOLVE_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # no address-space limit on this platform; the timeout still holds
    __import__("sympy")  # before READY: importing it is not the solver's time

    print(READY, flush=True)
    try:
        request = json.loads(sys.stdin.read())
        reply = {"answer": _solve_with_sympy(request["equations"], request["variables"])}
    except PluginError as error:
        reply = {"error": str(error)}
    except MemoryError:
        reply = {"error": "the solver ran out of memory; try a simpler equation"}
    except NotImplementedError as error:
        reason = (str(error).strip().splitlines() or ["no method applies"])[0]
        reply = {"error": f"sympy cannot solve this: {reason}"}
    except Exception as error:  # sympy raises many kinds; the model only needs the message
        reply = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(reply))


def _solve_with_sympy(equations: list[str], variables: list[str]) -> str:
    import sympy

    domain = Symbolic()
    expressions = []
    for equation in equations:
        lhs, rhs = (evaluate(parse_expression(side), domain, SOLVE_FUNCTIONS) for side in _split_equation(equation))
        difference = lhs - rhs
        if not difference.free_symbols:
            if sympy.simplify(difference) != 0:
                return f"no solution: {equation.strip()} is never true"
        elif sympy.expand(difference) != 0:
            expressions.append(difference)
    if not expressions:
        return "infinitely many solutions: every value satisfies the equations"
    symbols = [sympy.Symbol(name) for name in variables]
    if not symbols:
        symbols = sorted(set().union(*(e.free_symbols for e in expressions)), key=lambda s: s.name)
    try:
        solutions, note = sympy.solve(expressions, symbols, dict=True), ""
    except NotImplementedError:  # e.g. abs(x) = 3 needs x to be real
        real = {s: sympy.Symbol(s.name, real=True) for s in set().union(*(e.free_symbols for e in expressions))}
        symbols = [real.get(s, s) for s in symbols]
        solutions = sympy.solve([e.subs(real) for e in expressions], symbols, dict=True)
        note = " (real solutions only)"
    if not solutions:
        if all(sympy.simplify(e) == 0 for e in expressions):
            return "infinitely many solutions: every value satisfies the equations"
        return "no solution"
    if solutions == [{}]:
        return "infinitely many solutions: every value satisfies the equations"
    return _format_solutions(solutions, symbols) + note


def _format_solutions(solutions: list[dict], symbols: list) -> str:
    import sympy

    shown = []
    for solution in solutions:
        order = [s for s in symbols if s in solution] + sorted((s for s in solution if s not in symbols), key=str)
        parts = []
        for symbol in order:
            value = solution[symbol]
            text = f"{symbol} = {value}"
            if value.is_number and not all(part.is_Rational for part in value.as_real_imag()):
                text += f" (about {sympy.N(value, SIGNIFICANT_DIGITS)})"
            parts.append(text)
        in_values = set().union(*(value.free_symbols for value in solution.values()))
        free = [str(s) for s in symbols if s not in solution and s in in_values]
        if free:
            parts.append(f"for any {', '.join(free)}")
        shown.append(", ".join(parts))
    return ", ".join(shown) if len(symbols) == 1 else "; ".join(shown)


def solve_plugin(timeout: float = SOLVE_TIMEOUT_S) -> Plugin:
    """The solve tool; its first solver process starts now, so the first call does not wait for sympy to load."""
    _SOLVERS.warm()
    strings = {"type": ["string", "array"], "items": {"type": "string"}}
    return Plugin(
        name="solve",
        description=(
            "Solve equations exactly with sympy, e.g. 'x**2 - 4 = 0' or ['x + y = 3', 'x - y = 1']. "
            "Use * for products and ** for powers."
        ),
        parameters={
            "type": "object",
            "properties": {
                "equations": {**strings, "description": "one equation, or a list of them; '=' separates the sides"},
                "variables": {**strings, "description": "the unknowns; default: every name in the equations"},
            },
            "required": ["equations"],
            "additionalProperties": False,
        },
        run=lambda arguments: solve(arguments["equations"], arguments.get("variables"), timeout=timeout),
    )


# ---------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchHit:
    source: str
    """The file the passage comes from, relative to the searched folder."""
    text: str
    score: float


class SearchBackend(Protocol):
    def search(self, query: str, top_k: int) -> list[SearchHit]: ...


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def split_passages(text: str, max_words: int = 200) -> list[str]:
    """Paragraphs (split at blank lines), each under its markdown heading; long ones are cut into pieces."""
    passages, heading, heading_used = [], "", True
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if paragraph.startswith("#"):
            if not heading_used:
                passages.append(heading)
            heading, _, paragraph = paragraph.partition("\n")
            heading_used = False
        words = paragraph.split(" ") if paragraph.strip() else []
        for start in range(0, len(words), max_words):
            piece = " ".join(words[start : start + max_words])
            passages.append(f"{heading}\n{piece}" if heading else piece)
            heading_used = True
    if not heading_used:
        passages.append(heading)
    return passages


class LocalFolderSearch:
    """BM25 (rank_bm25's Okapi variant) over the paragraphs of the .txt and .md files under a folder."""

    extensions = (".txt", ".md")
    max_file_bytes = 10 << 20

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise XtuneError(
                f"search folder {self.folder} does not exist: pass a folder of .txt/.md files to --search-folder"
            )
        try:
            from rank_bm25 import BM25Okapi
        except ImportError:
            raise XtuneError("the search plugin needs rank_bm25: pip install rank-bm25") from None
        self.passages: list[tuple[str, str]] = []
        root = self.folder.resolve()
        for path in sorted(self.folder.rglob("*")):
            if path.suffix.lower() not in self.extensions or not path.is_file():
                continue
            if not path.resolve().is_relative_to(root):  # a link (or a linked folder) to a file elsewhere
                raise XtuneError(
                    f"search folder {self.folder}: {path.relative_to(self.folder)} leads outside the folder (to "
                    f"{path.resolve()}); the search plugin reads only files inside it: copy the file in, or remove the link."
                )
            if path.stat().st_size <= self.max_file_bytes:
                source = path.relative_to(self.folder).as_posix()
                text = path.read_text(encoding="utf-8", errors="replace")
                self.passages += [(source, p) for p in split_passages(text) if _tokens(p)]
        if not self.passages:
            raise XtuneError(f"no .txt or .md files with text under search folder {self.folder}")
        self.passage_tokens = [set(_tokens(text)) for _, text in self.passages]
        self.index = BM25Okapi([_tokens(text) for _, text in self.passages])

    def search(self, query: str, top_k: int) -> list[SearchHit]:
        words = _tokens(query)
        scores = self.index.get_scores(words)
        # Okapi's idf is 0 for a word in half the passages, so "shares a word" decides what matches
        matching = [i for i, tokens in enumerate(self.passage_tokens) if tokens.intersection(words)]
        best = sorted(matching, key=lambda i: -scores[i])[:top_k]
        return [SearchHit(self.passages[i][0], self.passages[i][1], float(scores[i])) for i in best]


MAX_TOP_K = 10
MAX_PASSAGE_CHARS = 800


def format_hits(query: str, hits: list[SearchHit]) -> str:
    if not hits:
        return f"no passage matches {query!r}"
    blocks = []
    for rank, hit in enumerate(hits, 1):
        text = hit.text if len(hit.text) <= MAX_PASSAGE_CHARS else hit.text[:MAX_PASSAGE_CHARS] + " ..."
        blocks.append(f"[{rank}] {hit.source}\n{text}")
    return "\n\n".join(blocks)


def search_plugin(folder: str | Path | None = None, backend: SearchBackend | None = None) -> Plugin:
    """Search `backend`, or a LocalFolderSearch of `folder`; with neither, every call answers an error."""
    if backend is None and folder is not None:
        backend = LocalFolderSearch(folder)

    def run(arguments: dict) -> str:
        if backend is None:
            raise PluginError("no search folder is configured: start the chat with --search-folder FOLDER")
        query, top_k = arguments["query"], arguments.get("top_k", 3)
        if not 1 <= top_k <= MAX_TOP_K:
            raise PluginError(f"top_k must be between 1 and {MAX_TOP_K}")
        if not _tokens(query):
            raise PluginError("the query has no words")
        return format_hits(query, backend.search(query, top_k))

    return Plugin(
        name="search",
        description="Search local documents; returns the best matching passages with their file names.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "keywords to look for"},
                "top_k": {"type": "integer", "description": f"how many passages (1 to {MAX_TOP_K}, default 3)"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
        run=run,
    )


# ---------------------------------------------------------------- registry and calls

PLUGINS: dict[str, Callable[..., Plugin]] = {
    "calculate": calculate_plugin,
    "solve": solve_plugin,
    "search": search_plugin,
}


def get_plugins(
    names: list[str], search_folder: str | Path | None = None, solve_timeout: float = SOLVE_TIMEOUT_S
) -> list[Plugin]:
    """The plugins named, in order, built; an unknown name is an XtuneError listing the known ones."""
    unknown = [name for name in names if name not in PLUGINS]
    if unknown:
        raise XtuneError(f"unknown plugin {', '.join(map(repr, unknown))}: choose from {', '.join(PLUGINS)}")
    options = {"search": {"folder": search_folder}, "solve": {"timeout": solve_timeout}}
    return [PLUGINS[name](**options.get(name, {})) for name in dict.fromkeys(names)]


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def _type_problem(value, schema: dict) -> str | None:
    """Why `value` does not fit the (small) JSON schema of one argument, or None when it fits."""
    allowed = schema.get("type")
    if allowed is None:
        return None
    allowed = [allowed] if isinstance(allowed, str) else allowed
    for name in allowed:
        if isinstance(value, _JSON_TYPES[name]) and not (isinstance(value, bool) and name in ("integer", "number")):
            if name == "array" and "items" in schema:
                problems = [_type_problem(item, schema["items"]) for item in value]
                if any(problems):
                    return f"must hold only {schema['items']['type']} items"
            return None
    return f"must be {' or '.join(allowed)}, not {type(value).__name__ if value is not None else 'null'}"


def check_arguments(plugin: Plugin, arguments: dict | str) -> dict:
    """The arguments as a dict that fits the plugin's schema, or a PluginError that says how to fix them."""
    properties = plugin.parameters.get("properties", {})
    expected = ", ".join(f'"{key}": {spec.get("type")}' for key, spec in properties.items())
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as error:
            raise PluginError(f"the arguments are not valid JSON ({error}); expected {{{expected}}}") from None
    if not isinstance(arguments, dict):
        raise PluginError(f"the arguments must be a JSON object {{{expected}}}, not {type(arguments).__name__}")
    missing = [key for key in plugin.parameters.get("required", []) if key not in arguments]
    if missing:
        raise PluginError(f"missing argument {', '.join(map(repr, missing))}; expected {{{expected}}}")
    extra = [key for key in arguments if key not in properties]
    if extra and plugin.parameters.get("additionalProperties", True) is False:
        raise PluginError(f"unknown argument {', '.join(map(repr, extra))}; expected {{{expected}}}")
    for key, value in arguments.items():
        problem = _type_problem(value, properties.get(key, {}))
        if problem:
            raise PluginError(f"argument {key!r} {problem}")
    return arguments


def call_plugin(
    plugins: list[Plugin],
    name: str,
    arguments: dict | str,
    timeout: float = CALL_TIMEOUT_S,
    max_chars: int = MAX_OUTPUT_CHARS,
) -> str:
    """Run one tool call; the text to show the model. Never raises: failures come back as 'error: NAME: ...'.

    The plugin runs in a thread that is waited on for at most `timeout` seconds. That bounds the wait, not
    the work: plugins that can run long stop themselves (solve's process is killed at its own timeout,
    which is shorter; calculate and search check sizes first).
    """
    by_name = {plugin.name: plugin for plugin in plugins}
    if not isinstance(name, str) or name not in by_name:
        return f"error: unknown tool {name!r}; the tools are: {', '.join(by_name) or 'none'}"
    plugin = by_name[name]
    outcome: list[str] = []

    def work():
        try:
            outcome.append(str(plugin.run(check_arguments(plugin, arguments))))
        except PluginError as error:
            outcome.append(f"error: {name}: {error}")
        except ZeroDivisionError:
            outcome.append(f"error: {name}: division by zero")
        except BaseException as error:  # a plugin's bug, even SystemExit, must not end the chat
            outcome.append(f"error: {name}: {type(error).__name__}: {error}")

    worker = threading.Thread(target=work, name=f"plugin-{name}", daemon=True)
    try:
        worker.start()
    except RuntimeError as error:  # the process cannot start another thread
        return f"error: {name}: {error}"
    worker.join(timeout)
    if not outcome:
        return f"error: {name}: no answer within {timeout:g} s"
    text = outcome[0]
    if len(text) > max_chars:
        text = f"{text[:max_chars]}\n[truncated: {len(text) - max_chars:,} more characters not shown]"
    return text
