"""CEL expressions: compiled once at policy load, evaluated per request over only what they read.

We use ``cel-expr-python``, the Python binding of Google's C++ CEL runtime (cel-cpp): it type-checks
at compile time (unknown variables, bad overloads and syntax errors are load-time errors with a
position), and evaluates a small activation in about 3 us. The Rust binding
(``common-expression-language``) took about 6 us and the pure-Python ``cel-python`` about 250 us
for the same rule (see docs/policy.md, "CEL").

Each expression is compiled twice at load. First against the real types of the variables
(``request.method`` is a string, ``request.headers`` a map of strings, ``identity.claims`` dynamic):
a typo such as ``request.methd``, ``request.method + 1`` or a ``when`` that is not a bool is a load
error with its position, never a 503 on live traffic. Then with every variable dynamic: that is the
program that runs, over plain dicts, so the checking costs nothing per request.

The checked AST is walked to list the exact paths an expression reads (``request.method``,
``request.headers['x-tenant']``, ``identity.claims``...): at run time the activation holds only
those values, which also form the key of a small per-expression memo: the same inputs never run
the same program twice.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from cel_expr_python import cel as _cel
from cel_expr_python.ext import ext_math, ext_optional, ext_strings
from google.protobuf import any_pb2

from extauthz.api.celast import ast_pb2
from extauthz.api.celvars import variables_pb2 as celvars_pb2

__all__ = [
    "BOOL", "HEADER_VALUE", "INTEGER", "KEY", "MISSING", "STRING", "VARIABLES", "Accessor", "AccessorFactory",
    "CelError", "Expression", "compile_expression",
]

_T = _cel.Type

#: The static type of each root variable, as the type checker sees it at load. The fixed-shape
#: ones are messages of proto/extauthz/api/celvars/variables.proto (a misspelt field is a load
#: error); the others are maps. At run time every variable is dynamic (see ``_EVAL_ENV``).
_TYPES: dict[str, Any] = {
    "request": _T("extauthz.cel.Request"),
    "source": _T("extauthz.cel.Source"),
    "destination": _T("extauthz.cel.Destination"),
    "tls": _T("extauthz.cel.Tls"),
    "context": _T.Map(_T.STRING, _T.STRING),
    "metadata": _T.Map(_T.STRING, _T.Map(_T.STRING, _T.DYN)),  # filter name -> its Struct
    "identity": _T("extauthz.cel.Identity"),
}

#: Which message declares the fields of which variable (for error messages).
_MESSAGE_VARIABLE = {
    "extauthz.cel.Request": "request",
    "extauthz.cel.Source": "source",
    "extauthz.cel.Destination": "destination",
    "extauthz.cel.Tls": "tls",
    "extauthz.cel.Identity": "identity",
    "extauthz.cel.Spiffe": "identity.spiffe",
    "extauthz.cel.Operation": "request.operation",
}


def _message_fields(full_name: str) -> frozenset[str]:
    message = celvars_pb2.DESCRIPTOR.message_types_by_name[full_name.removeprefix("extauthz.cel.")]
    return frozenset(message.fields_by_name)


#: Root variables every expression may use, and for the fixed-shape ones the fields they have.
#: ``None`` means "a map with any keys".
VARIABLES: dict[str, frozenset[str] | None] = {
    name: _message_fields(type_.name()) if type_.is_message() else None for name, type_ in _TYPES.items()
}

_MEMO_LIMIT = 4096


class CelError(Exception):
    """A CEL expression failed to compile or evaluate.

    An evaluation error's text goes to logs, decision logs and spans, and the runtime's own message
    can quote the values being evaluated (the missing map key, a regular expression built from a
    header): that could be a credential. So ``str()`` of an evaluation error is its code and the
    message up to the first quoted or appended value, e.g. ``NOT_FOUND: Key not found in map``;
    ``detail`` keeps the whole message for ``extauthz explain``, which shows it to whoever sent the
    request, and nowhere else.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = message if detail is None else detail

    @classmethod
    def at_runtime(cls, message: str) -> CelError:
        return cls(_value_free(message), message)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

#: Reads one value from the per-request context; returns MISSING when absent.
Accessor = Callable[[Any], Any]
#: Makes the accessor for one dependency path, e.g. ("request", "headers", "x-tenant").
AccessorFactory = Callable[[tuple[str, ...]], Accessor]

def _extensions() -> list[Any]:
    return [ext_optional.ExtOptional(), ext_strings.ExtStrings(), ext_math.ExtMath()]


#: Where expressions are type-checked: every variable with its real type.
_CHECK_ENV = _cel.NewEnv(descriptor_pool=celvars_pb2.DESCRIPTOR.pool, variables=_TYPES, extensions=_extensions())
#: Where the programs that run come from: the same expressions with every variable dynamic, so an
#: activation is plain dicts and lists (a typed program would want messages built per request).
#: Once an expression passed the checker, the values it reads have the declared types; only the
#: dynamic parts (identity.claims, metadata, query_all's lists) are checked as they are used.
_EVAL_ENV = _cel.NewEnv(variables={name: _cel.Type.DYN for name in _TYPES}, extensions=_extensions())

#: The static types a site accepts (``expect``), by CEL type name. ``dyn`` is accepted everywhere:
#: what only the value can tell is checked where the value is used.
BOOL: frozenset[str] = frozenset({"bool"})
STRING: frozenset[str] = frozenset({"string"})
INTEGER: frozenset[str] = frozenset({"int", "uint"})
#: What a quota key may be: hashed as its text.
KEY: frozenset[str] = frozenset({"string", "int", "uint", "bool"})
#: What a header value may be: a scalar written as text, a list of them joined with ",", or null
#: for "remove the header".
HEADER_VALUE: frozenset[str] = frozenset({"string", "int", "uint", "double", "bool", "bytes", "null_type", "list"})
_DESCRIPTIONS = {
    KEY: "a string, an integer or a bool",
    INTEGER: "an integer",
    HEADER_VALUE: "a string, number, bool, bytes, a list of them, or null",
}


def _access_path(node: ast_pb2.Expr, roots: Iterable[str], *, plain: bool = False) -> tuple[str, ...] | None:
    """The constant access path ``node`` reads from a root variable (``request.headers['x']``), or None.

    ``plain`` accepts only reads whose result is the value itself: no ``has()`` (a select that only
    tests presence) and no optional access (``[?k]``, ``.?f``), which wrap the value.
    """
    kind = node.WhichOneof("expr_kind")
    if kind == "ident_expr":
        return (node.ident_expr.name,) if node.ident_expr.name in roots else None
    if kind == "select_expr":
        if plain and node.select_expr.test_only:
            return None
        base = _access_path(node.select_expr.operand, roots, plain=plain)
        return None if base is None else (*base, node.select_expr.field)
    indexes = ("_[_]",) if plain else ("_[_]", "_[?_]", "_?._")
    if kind == "call_expr" and node.call_expr.function in indexes and not node.call_expr.HasField("target"):
        target, index = node.call_expr.args
        if index.WhichOneof("expr_kind") == "const_expr" and index.const_expr.HasField("string_value"):
            base = _access_path(target, roots, plain=plain)
            return None if base is None else (*base, index.const_expr.string_value)
    return None


def _dependencies(expr: ast_pb2.Expr, roots: Iterable[str]) -> list[tuple[str, ...]]:
    """Every maximal constant access path starting at a root variable."""
    roots = set(roots)
    found: list[tuple[str, ...]] = []

    def visit(node: ast_pb2.Expr) -> None:
        path = _access_path(node, roots)
        if path is not None:
            found.append(path)
            return
        kind = node.WhichOneof("expr_kind")
        if kind == "select_expr":
            visit(node.select_expr.operand)
        elif kind == "call_expr":
            if node.call_expr.HasField("target"):
                visit(node.call_expr.target)
            for arg in node.call_expr.args:
                visit(arg)
        elif kind == "list_expr":
            for element in node.list_expr.elements:
                visit(element)
        elif kind == "struct_expr":
            for entry in node.struct_expr.entries:
                if entry.HasField("map_key"):
                    visit(entry.map_key)
                visit(entry.value)
        elif kind == "comprehension_expr":
            comp = node.comprehension_expr
            for part in (comp.iter_range, comp.accu_init, comp.loop_condition, comp.loop_step, comp.result):
                visit(part)

    visit(expr)
    # A path that extends another one is covered by it: the shorter one brings the whole value.
    unique = sorted(set(found), key=len)
    kept: list[tuple[str, ...]] = []
    for path in unique:
        if not any(path[: len(p)] == p for p in kept):
            kept.append(path)
    return sorted(kept)


def _memo_key(values: list[Any]) -> tuple | None:
    """The memo key of an expression's inputs, or None when one of them is not simply hashable."""
    key: list[Any] = []
    for value in values:
        kind = type(value)
        if kind is str or value is MISSING or value is None:
            key.append(value)
        elif kind is int or kind is bytes or kind is bool or kind is float:
            key.append((kind, value))
        elif kind is list and len(value) <= 32 and all(type(v) is str for v in value):
            key.append((list, *value))  # lists of strings (identity.scopes) are memoized too
        else:
            return None
    return tuple(key)


def _activation(paths: tuple[tuple[str, ...], ...], values: list[Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for path, value in zip(paths, values, strict=True):
        parent = data
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
        # An absent value still gets its parents, so that has()/optional tests see an absent key,
        # not an absent map.
        if value is not MISSING:
            parent[path[-1]] = value
    return data


class Expression:
    """A compiled CEL expression bound to the paths it reads."""

    __slots__ = ("__weakref__", "_direct", "_getters", "_memo", "_program", "_single", "paths", "result_type",
                 "source")

    def __init__(
        self,
        source: str,
        program: Any,
        paths: tuple[tuple[str, ...], ...],
        getters: tuple[Accessor, ...],
        result_type: str,
        direct: Accessor | None = None,
    ) -> None:
        self.source = source
        self._program = program
        self.paths = paths
        self._getters = getters
        self._single = getters[0] if len(getters) == 1 else None
        self.result_type = result_type
        self._memo: dict[Any, Any] = {}  # tuples of inputs; a lone string or MISSING as itself
        #: For an expression that only reads one value (``identity.subject``): its accessor. A
        #: string or bool read that way is the result CEL would give, without building an
        #: activation; anything else (absent, a map, a number) goes through the program.
        self._direct = direct

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(path[0] for path in self.paths)

    def evaluate(self, ctx: Any) -> Any:
        """Evaluate against ``ctx`` (read through the accessors); raise CelError on any error."""
        if self._direct is not None:
            value = self._direct(ctx)
            if type(value) is str or type(value) is bool:
                return value
        memo = self._memo
        single = self._single
        if single is not None:  # one input, most often a string: it is its own memo key
            value = single(ctx)
            values = [value]
            if type(value) is str or value is MISSING:
                hit = memo.get(value, MISSING)  # never equal to the tuple keys of other inputs
                if hit is not MISSING:
                    return hit
                key: Any = value
            else:
                key = _memo_key(values)
        else:
            values = [getter(ctx) for getter in self._getters]
            key = _memo_key(values)
        if key is not None:
            hit = memo.get(key, MISSING)
            if hit is not MISSING:
                return hit  # the common case: the activation is only built for the runtime
        try:
            value = self._program.eval(data=_activation(self.paths, values))
            if value.type() == _cel.Type.ERROR:
                raise CelError.at_runtime(str(value.value()))
            result = value.plain_value()
        except CelError:
            raise
        except Exception as exc:  # the runtime raises for values it cannot represent
            raise CelError.at_runtime(str(exc)) from exc
        if key is not None:
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[key] = result
        return result


#: The compile cache's key: source, accepted types, allowed roots, accessor factory.
_CacheKey = tuple[str, frozenset[str] | None, frozenset[str] | None, AccessorFactory]
#: Compiled expressions that something still holds (a served policy, the set being compiled), by
#: what they were compiled from. It never holds one alive, so its size is that of the live sets.
_COMPILED: weakref.WeakValueDictionary[_CacheKey, Expression] = weakref.WeakValueDictionary()
#: Recent compile errors (a templated typo repeated in a thousand policies costs one compile).
_FAILED: OrderedDict[_CacheKey, str] = OrderedDict()
_FAILED_LIMIT = 512
_CACHE_LOCK = threading.Lock()


def compile_expression(
    source: str,
    accessor: AccessorFactory,
    *,
    expect: str | Iterable[str] | None = None,
    allowed: Iterable[str] | None = None,
) -> Expression:
    """Compile ``source`` or raise CelError with the compiler's message and the position.

    ``expect`` (a CEL type name such as "bool", or a set such as :data:`KEY`) rejects expressions
    whose static type can never be one of them. ``allowed`` limits the root variables (e.g.
    identity keys cannot read ``identity``).

    An expression compiled before with the same source, ``expect``, ``allowed`` and accessor
    factory, and still held by something, is returned as it is: programs are immutable and an
    expression's memo maps the same inputs to the same result, so policies share them. Compiling
    takes about 1.5 ms and a thousand templated policies repeat a handful of expressions.
    """
    if not isinstance(source, str) or not source.strip():
        raise CelError("expression must be a non-empty string")
    wanted = None if expect is None else frozenset((expect,) if isinstance(expect, str) else expect)
    roots = None if allowed is None else frozenset(allowed)
    key: _CacheKey = (source, wanted, roots, accessor)
    with _CACHE_LOCK:
        found = _COMPILED.get(key)
        failure = _FAILED.get(key)
    if found is not None:
        return found
    if failure is not None:
        raise CelError(failure)
    try:
        expression = _compile(source, accessor, wanted, roots)
    except CelError as exc:
        with _CACHE_LOCK:
            _FAILED[key] = str(exc)
            while len(_FAILED) > _FAILED_LIMIT:
                _FAILED.popitem(last=False)
        raise
    with _CACHE_LOCK:
        _COMPILED[key] = expression
    return expression


def _compile(source: str, accessor: AccessorFactory, wanted: frozenset[str] | None,
             allowed: frozenset[str] | None) -> Expression:
    try:
        checked_program = _CHECK_ENV.compile(source)
    except Exception as exc:
        raise CelError(_clean_message(str(exc))) from exc
    result_type = _type_name(checked_program.return_type())
    if wanted is not None and not _accepts(wanted, result_type):
        raise CelError(_mismatch(source, result_type, wanted))
    try:
        program = _EVAL_ENV.compile(source)
    except Exception as exc:  # cannot happen: the dynamic environment accepts more
        raise CelError(_clean_message(str(exc))) from exc
    wrapped = any_pb2.Any.FromString(program.serialize())
    checked = ast_pb2.CheckedExpr.FromString(wrapped.value)
    paths = tuple(_dependencies(checked.expr, VARIABLES))
    if allowed is not None:
        for path in paths:
            if path[0] not in allowed:
                raise CelError(f"'{path[0]}' is not available here (allowed: {', '.join(sorted(allowed))})")
    getters = tuple(accessor(path) for path in paths)
    plain = _access_path(checked.expr, VARIABLES, plain=True)
    direct = getters[0] if plain is not None and paths == (plain,) else None
    return Expression(source, program, paths, getters, result_type, direct)


_BUILTIN_TYPE = re.compile(r"\b[A-Z][A-Z_0-9]*\b")


def _type_name(type_: Any) -> str:
    """A type as CEL writes it (``map<string, string>``), with our messages named by the variable
    they describe (``request``)."""
    name: str = type_.name()
    for message, variable in _MESSAGE_VARIABLE.items():
        name = name.replace(message, variable)
    return _BUILTIN_TYPE.sub(lambda m: "null_type" if m[0] == "NULL" else m[0].lower(), name)


def _accepts(wanted: frozenset[str], type_name: str) -> bool:
    if type_name == "dyn" or type_name in wanted:
        return True
    if "list" in wanted and type_name.startswith("list<") and type_name.endswith(">"):
        return _accepts(wanted - {"list"}, type_name[5:-1])
    return False


def _mismatch(source: str, type_name: str, wanted: frozenset[str]) -> str:
    """The error for an expression of the wrong type, pointing at it as the checker's errors do."""
    expected = _DESCRIPTIONS.get(wanted)
    if expected is None:
        names = sorted(wanted)
        expected = " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + f" or {names[-1]}"
    hint = ""
    if type_name.startswith("optional_type<"):
        hint = " (an optional value: add .orValue(<default>))"
    elif type_name in _MESSAGE_VARIABLE.values():
        hint = " (a whole variable: read one of its fields)"
    offset = len(source) - len(source.lstrip())
    line_start = source.rfind("\n", 0, offset) + 1
    line_end = source.find("\n", offset)
    line = source[line_start : None if line_end < 0 else line_end]
    line_no = source.count("\n", 0, offset) + 1
    column = offset - line_start
    return (f"at {line_no}:{column + 1}: expression has type {type_name}{hint}, expected {expected}\n"
            f" | {line}\n | {'.' * column}^")


_VALUE_START = re.compile(r"""\s*(?:[:"'\[=\n]|$)""")


def _value_free(message: str) -> str:
    """A runtime error message without what it quotes: the status code (``NOT_FOUND``) and the
    text up to the first ``:``, quote, ``[``, ``=`` or line break after it (where runtimes append
    values)."""
    code, sep, rest = message.partition(": ")
    if not (sep and code.replace("_", "").isalpha() and code.isupper()):
        code, rest = "", message
    head = rest[: _VALUE_START.search(rest).start()]  # type: ignore[union-attr]  # $ always matches
    head = head or "evaluation failed"
    return f"{code}: {head}" if code else head


_UNDEFINED_FIELD = re.compile(r"undefined field '([^']*)' not found in struct '([^']*)'")


def _clean_message(message: str) -> str:
    message = message.removeprefix("INVALID_ARGUMENT: ").removesuffix(" [INVALID_ARGUMENT]")
    message = _UNDEFINED_FIELD.sub(_unknown_field, message)
    return message.replace("ERROR: <input>:", "at ")


def _unknown_field(match: re.Match[str]) -> str:
    field_name, message = match[1], match[2]
    variable = _MESSAGE_VARIABLE.get(message)
    if variable is None:
        return match[0]
    known = sorted(_message_fields(message))
    return f"unknown field '{field_name}' on {variable} (known: {', '.join(known)})"
