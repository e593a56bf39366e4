"""Consul's `?filter=` expressions: the language of hashicorp/go-bexpr v0.1.2 (the version
Consul vendors), parsed and checked against each endpoint's selectors, then run on the JSON
items an endpoint returns.

The grammar, precedence (`or` < `and` < `not`), the selector rules (an unknown selector, an
operator a field does not support or a value that does not convert is an error before anything
is read) and the evaluation rules (a selector through a list matches when any element does; a
missing map key makes `==`, `in`, `matches` and `is not empty` false and their negations true)
are bexpr's. Error texts keep pigeon's `line:col (offset): ...` form, so a client sees what
Consul would tell it. Regular expressions are RE2's (google-re2), the engine behind Go's
`regexp`: the same syntax, lookarounds and backreferences refused, and matching in time linear
in the text, so no pattern can stall the event loop by backtracking.

`and`/`or` chains are parsed in a loop into one n-ary node each, so a filter of thousands of
clauses costs no stack; only parentheses and `not` nest, and at most MAX_NESTING deep.

Endpoints call `request_filter(request, SCHEMA)` and then `.select(items)` (a list) or
`.select_values(mapping)` (a map whose values are filtered, like agent/services).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias, TypeVar

import re2
from aiohttp import web

from node.api.common import text_error
from node.golang import ESCAPES, parse_bool, quote

__all__ = [
    "AGENT_CHECK_SCHEMA",
    "AGENT_SERVICE_SCHEMA",
    "CHECK_SERVICE_NODE_SCHEMA",
    "EVERYTHING",
    "HEALTH_CHECK_SCHEMA",
    "NODE_SCHEMA",
    "NODE_SERVICE_SCHEMA",
    "SERVICE_NODE_SCHEMA",
    "BinOp",
    "Expr",
    "Filter",
    "FilterError",
    "ListOf",
    "MapOf",
    "Match",
    "Not",
    "Schema",
    "compile_filter",
    "parse",
    "request_filter",
    "unparse",
]

T = TypeVar("T")
K = TypeVar("K")

#: Consul's prefix for every filter error (agent/consul/... bexpr.CreateFilter wrappers)
ERROR_PREFIX = "Failed to create boolean expression evaluator: "
#: nesting of parentheses and `not`, bounded so a hostile filter cannot exhaust the stack
MAX_NESTING = 128
#: RE2's memory budget per regular expression (program and match caches). Smaller than RE2's
#: default 8 MiB: compiling up to the budget blocks the event loop (about 20 ms at 1 MiB,
#: 300 ms at 8 MiB for a Unicode class repeated hundreds of times), and google-re2 caches the
#: last 128 patterns. A pattern over it is refused as Go refuses one: "expression too large".
REGEX_MAX_MEM = 1 << 20
#: the RE2 program size (instructions) all regular expressions of one filter may add up to,
#: so a filter of many large distinct patterns cannot add up compile time either
FILTER_MAX_PROGRAM = 200_000


class FilterError(ValueError):
    """A filter that does not parse or does not fit the endpoint's selectors."""


# ----- schemas: what each endpoint's items look like, as bexpr sees the Go structs -----


class ListOf(NamedTuple):
    elem: Schema


class MapOf(NamedTuple):
    """A map with string keys (`Meta`, `TaggedAddresses`): any key is a valid selector part."""

    value: Schema


#: str/int/bool for Go's string/int/bool, ListOf/MapOf, or a struct as {field: schema}
Schema: TypeAlias = type | ListOf | MapOf | Mapping[str, "Schema"]

_ADDRESS: Schema = {"Address": str, "Port": int}
_WEIGHTS: Schema = {"Passing": int, "Warning": int}
_MESH_GATEWAY: Schema = {"Mode": str}
_UPSTREAM: Schema = {
    "Datacenter": str,
    "DestinationName": str,
    "DestinationNamespace": str,
    "DestinationType": str,
    "LocalBindAddress": str,
    "LocalBindPort": int,
    "MeshGateway": _MESH_GATEWAY,
}
_PROXY: Schema = {
    "DestinationServiceID": str,
    "DestinationServiceName": str,
    "LocalServiceAddress": str,
    "LocalServicePort": int,
    "Mode": str,
    "TransparentProxy": {"OutboundListenerPort": int},
    "MeshGateway": _MESH_GATEWAY,
    "Upstreams": ListOf(_UPSTREAM),
}
_CONNECT: Schema = {"Native": bool}

#: catalog/nodes items; the Node of health/service entries
NODE_SCHEMA: Schema = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": MapOf(str),
    "Meta": MapOf(str),
}
#: catalog/node/<n> Services values; the Service of health/service entries; agent/services
NODE_SERVICE_SCHEMA: Schema = {
    "Kind": str,
    "ID": str,
    "Service": str,
    "Tags": ListOf(str),
    "Address": str,
    "TaggedAddresses": MapOf(_ADDRESS),
    "Meta": MapOf(str),
    "Port": int,
    "Weights": _WEIGHTS,
    "EnableTagOverride": bool,
    "Proxy": _PROXY,
    "Connect": _CONNECT,
}
#: catalog/service/<s> items, and what catalog/services filters before grouping by name
SERVICE_NODE_SCHEMA: Schema = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": MapOf(str),
    "NodeMeta": MapOf(str),
    "ServiceKind": str,
    "ServiceID": str,
    "ServiceName": str,
    "ServiceTags": ListOf(str),
    "ServiceAddress": str,
    "ServiceTaggedAddresses": MapOf(_ADDRESS),
    "ServiceWeights": _WEIGHTS,
    "ServiceMeta": MapOf(str),
    "ServicePort": int,
    "ServiceEnableTagOverride": bool,
    "ServiceProxy": _PROXY,
    "ServiceConnect": _CONNECT,
}
#: health/checks/<s>, health/node/<n>, health/state/<st> items; agent/checks values
HEALTH_CHECK_SCHEMA: Schema = {
    "Node": str,
    "CheckID": str,
    "Name": str,
    "Status": str,
    "Notes": str,
    "Output": str,
    "ServiceID": str,
    "ServiceName": str,
    "ServiceTags": ListOf(str),
    "Type": str,
}
#: health/service/<s> entries
CHECK_SERVICE_NODE_SCHEMA: Schema = {
    "Node": NODE_SCHEMA,
    "Service": NODE_SERVICE_SCHEMA,
    "Checks": ListOf(HEALTH_CHECK_SCHEMA),
}
#: for node/api/agent_services.py: /v1/agent/services and /v1/agent/checks (maps by ID)
AGENT_SERVICE_SCHEMA = NODE_SERVICE_SCHEMA
AGENT_CHECK_SCHEMA = HEALTH_CHECK_SCHEMA


# ----- the syntax tree -----

EQ, NE, IN, NOT_IN = "==", "!=", "in", "not in"
EMPTY, NOT_EMPTY, MATCHES, NOT_MATCHES = "is empty", "is not empty", "matches", "not matches"
#: bexpr's operator names, for error messages
_OP_NAMES = {EQ: "Equal", NE: "Not Equal", IN: "In", NOT_IN: "Not In", EMPTY: "Is Empty",
             NOT_EMPTY: "Is Not Empty", MATCHES: "Matches", NOT_MATCHES: "Not Matches"}  # fmt: skip
#: the operators true when the selected map key is missing (bexpr's not-present rule)
_TRUE_WHEN_MISSING = frozenset({NE, NOT_IN, EMPTY, NOT_MATCHES})


@dataclass(frozen=True)
class Match:
    """`selector op value`; `contains` is `in` with the operands swapped, as in bexpr."""

    selector: tuple[str, ...]
    op: str
    value: str | None = None


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class BinOp:
    """`a and b and c`: bexpr's right-leaning chain of one operator held flat (two or more
    operands), so evaluating a long chain takes no stack. `(a or b) or c` keeps its nesting."""

    op: str  # "and" | "or"
    operands: tuple[Expr, ...]


Expr: TypeAlias = Match | Not | BinOp


# ----- Go's quoting and number parsing, for values and messages as bexpr gives them -----

_GO_UNESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}


def _go_unquote(lit: str) -> str:
    """strconv.Unquote of a "..." or `...` literal; ValueError("invalid syntax") as Go."""
    body = lit[1:-1]
    if lit[0] == "`":
        return body.replace("\r", "")
    if "\n" in body:
        raise ValueError("invalid syntax")
    buf = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            buf += ch.encode()
            i += 1
            continue
        esc = body[i + 1] if i + 1 < len(body) else ""
        if esc in _GO_UNESCAPES:
            buf.append(_GO_UNESCAPES[esc])
            i += 2
        elif esc in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + n]
            if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError("invalid syntax")
            v = int(digits, 16)
            if esc == "x":
                buf.append(v)
            elif v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                raise ValueError("invalid syntax")
            else:
                buf += chr(v).encode()
            i += 2 + n
        elif esc and esc in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or any(c not in "01234567" for c in digits) or int(digits, 8) > 255:
                raise ValueError("invalid syntax")
            buf.append(int(digits, 8))
            i += 4
        else:
            raise ValueError("invalid syntax")
    return buf.decode("utf-8", errors="replace")


_INT_BODY = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _go_parse_int(raw: str) -> int:
    """strconv.ParseInt(raw, 0, 64): sign, 0x/0o/0b/0 prefixes, underscores between digits."""

    def fail(why: str) -> ValueError:
        return ValueError(f"strconv.ParseInt: parsing {quote(raw)}: {why}")

    s = raw[1:] if raw[:1] in ("+", "-") else raw
    base, digits, prefixed = 10, s, False
    if s[:2].lower() in ("0x", "0o", "0b"):
        base, digits, prefixed = {"x": 16, "o": 8, "b": 2}[s[1].lower()], s[2:], True
    elif len(s) > 1 and s[0] == "0":
        base, digits, prefixed = 8, s[1:], True
    if "_" in digits:
        if not re.fullmatch(r"_?[^_]+(_[^_]+)*" if prefixed else r"[^_]+(_[^_]+)*", digits):
            raise fail("invalid syntax")
        digits = digits.replace("_", "")
    if not digits or any(c not in _INT_BODY[base] for c in digits):
        raise fail("invalid syntax")
    value = int(digits, base) * (-1 if raw.startswith("-") else 1)
    if not -(2**63) <= value < 2**63:
        raise fail("value out of range")
    return value


# ----- the parser: go-bexpr's PEG grammar, with pigeon's error reporting -----

_WS = " \t\r\n"
_IDENT_START = re.compile(r"[a-zA-Z]")
_IDENT_REST = re.compile(r"[a-zA-Z0-9_]")


class _Parser:
    """A packrat-free recursive descent over bexpr's grammar. Alternatives that share a prefix
    are factored (`A or B / A` as `A (or B)?`), which gives the same results and records the
    same failures, so parsing stays linear."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.fail_pos = 0
        self.fail_expected: set[str] = set()
        self.invert = False
        self.errors: list[str] = []
        self.depth = 0

    # -- error bookkeeping (pigeon's failAt/addErrAt) --

    def where(self, pos: int) -> str:
        line = self.s.count("\n", 0, pos) + 1
        col = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        return f"{line}:{col} ({len(self.s[:pos].encode())})"

    def record(self, matched: bool, pos: int, want: str) -> None:
        """Remember what was expected at the farthest position reached (inside `!`, what
        matched)."""
        if matched != self.invert or pos < self.fail_pos:
            return
        if pos > self.fail_pos:
            self.fail_pos = pos
            self.fail_expected = set()
        self.fail_expected.add("!" + want if self.invert else want)

    def error(self, pos: int, rule: str, message: str) -> None:
        text = f"{self.where(pos)}: rule {quote(rule)}: {message}"
        if text not in self.errors:
            self.errors.append(text)

    def no_match(self) -> str:
        wants = self.fail_expected
        eof = "!." in wants
        listed = sorted(w for w in wants if w != "!.") + (["EOF"] if eof else [])
        joined = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} or {listed[-1]}"
        return f"{self.where(self.fail_pos)}: no match found, expected: {joined}"

    # -- terminals --

    def lit(self, pos: int, text: str) -> int | None:
        ok = self.s.startswith(text, pos)
        self.record(ok, pos, quote(text))
        return pos + len(text) if ok else None

    def cls(self, pos: int, pattern: re.Pattern[str], want: str) -> int | None:
        ok = pos < self.n and pattern.fullmatch(self.s[pos]) is not None
        self.record(ok, pos, want)
        return pos + 1 if ok else None

    def any(self, pos: int) -> int | None:
        ok = pos < self.n
        self.record(ok, pos, ".")
        return pos + 1 if ok else None

    def ws(self, pos: int) -> int | None:
        """`_ <- [ \\t\\r\\n]+`"""
        p = pos
        while True:
            ok = p < self.n and self.s[p] in _WS
            self.record(ok, p, "[ \\t\\r\\n]")
            if not ok:
                return p if p > pos else None
            p += 1

    def ws_opt(self, pos: int) -> int:
        p = self.ws(pos)
        return pos if p is None else p

    def eof(self, pos: int) -> bool:
        """`EOF <- !.`"""
        self.invert = not self.invert
        p = self.any(pos)
        self.invert = not self.invert
        return p is None

    def words(self, pos: int, *parts: str) -> int | None:
        """A keyword sequence such as `_ "not" _ "in" _`: "" stands for `_`, "?" for `_?`."""
        p: int | None = pos
        for part in parts:
            assert p is not None
            if part == "":
                p = self.ws(p)
            elif part == "?":
                p = self.ws_opt(p)
            else:
                p = self.lit(p, part)
            if p is None:
                return None
        return p

    # -- rules --

    def input(self) -> Expr:
        p = self.ws_opt(0)
        q = self.lit(p, "(")
        if q is not None:
            r = self.chain(self.ws_opt(q), "or")
            if r is not None:
                end = self.lit(self.ws_opt(r[1]), ")")
                if end is not None and self.eof(self.ws_opt(end)):
                    return self.finish(r[0])
        r = self.chain(p, "or")
        if r is not None and self.eof(self.ws_opt(r[1])):
            return self.finish(r[0])
        raise FilterError("\n".join(self.errors) if self.errors else self.no_match())

    def finish(self, expr: Expr) -> Expr:
        if self.errors:  # pigeon fails a parse that recorded any error, even on a match
            raise FilterError("\n".join(self.errors))
        return expr

    def chain(self, pos: int, op: str) -> tuple[Expr, int] | None:
        """OrExpression (`op` "or", over AndExpressions) or AndExpression ("and", over
        NotExpressions). bexpr's rule `X _ op _ Self / X` recurses once per clause; this loop
        makes the same attempts in the same order, so it records the same failures. (One
        method for both levels keeps the stack per parenthesis level as short as before.)"""
        first = self.chain(pos, "and") if op == "or" else self.not_expr(pos)
        if first is None:
            return None
        operands, end = [first[0]], first[1]
        while (p := self.words(end, "", op, "")) is not None:
            more = self.chain(p, "and") if op == "or" else self.not_expr(p)
            if more is None:
                break
            operands.append(more[0])
            end = more[1]
        return (operands[0] if len(operands) == 1 else BinOp(op, tuple(operands))), end

    def nested(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise FilterError(f"{self.where(pos)}: expression nested more than "
                              f"{MAX_NESTING} levels deep")  # fmt: skip

    def not_expr(self, pos: int) -> tuple[Expr, int] | None:
        p = self.words(pos, "not", "")
        if p is not None:
            self.nested(pos)
            inner = self.not_expr(p)
            self.depth -= 1
            if inner is not None:
                expr = inner[0]
                # bexpr drops a double negation ("not not x" is "x")
                return (expr.operand if isinstance(expr, Not) else Not(expr)), inner[1]
        return self.paren_expr(pos)

    def paren_expr(self, pos: int) -> tuple[Expr, int] | None:
        inner: tuple[Expr, int] | None = None
        q = self.lit(pos, "(")
        if q is not None:
            self.nested(pos)
            inner = self.chain(self.ws_opt(q), "or")
            self.depth -= 1
            if inner is not None:
                end = self.lit(self.ws_opt(inner[1]), ")")
                if end is not None:
                    return inner[0], end
        match = self.match_expr(pos)
        if match is not None:
            return match
        if inner is not None:  # "(" _? OrExpression _? !")"
            self.error(self.ws_opt(inner[1]), "grouping", "Unmatched parentheses")
        return None

    def match_expr(self, pos: int) -> tuple[Expr, int] | None:
        sel = self.selector(pos)
        if sel is not None:
            ops: tuple[tuple[str, tuple[str, ...]], ...] = (
                (EQ, ("?", "==", "?")), (NE, ("?", "!=", "?")),
                (IN, ("", "contains", "")), (NOT_IN, ("", "not", "", "contains", "")),
                (MATCHES, ("", "matches", "")), (NOT_MATCHES, ("", "not", "", "matches", "")),
            )  # fmt: skip
            for op, parts in ops:
                p = self.words(sel[1], *parts)
                if p is not None:
                    value = self.value(p)
                    if value is not None:
                        return Match(sel[0], op, value[0]), value[1]
                    break
            sel = self.selector(pos)
            assert sel is not None
            ops = ((EMPTY, ("", "is", "", "empty")),
                   (NOT_EMPTY, ("", "is", "", "not", "", "empty")))  # fmt: skip
            for op, parts in ops:
                p = self.words(sel[1], *parts)
                if p is not None:
                    return Match(sel[0], op), p
        value = self.value(pos)
        if value is None:
            return None
        for op, parts in ((IN, ("", "in", "")), (NOT_IN, ("", "not", "", "in", ""))):
            p = self.words(value[1], *parts)
            if p is not None:
                target = self.selector(p)
                if target is not None:
                    return Match(target[0], op, value[0]), target[1]
                # Value (MatchIn / MatchNotIn) !Selector: a value where a selector must be
                self.error(p, "match", "Invalid selector")
                return None
        return None

    def identifier(self, pos: int) -> int | None:
        p = self.cls(pos, _IDENT_START, "[a-zA-Z]")
        if p is None:
            return None
        while True:
            q = self.cls(p, _IDENT_REST, "[a-zA-Z0-9_]")
            if q is None:
                return p
            p = q

    def selector(self, pos: int) -> tuple[tuple[str, ...], int] | None:
        p = self.identifier(pos)
        if p is None:
            return None
        parts = [self.s[pos:p]]
        while True:
            q = self.lit(p, ".")
            if q is not None:
                r = self.identifier(q)
                if r is not None:
                    parts.append(self.s[q:r])
                    p = r
                    continue
            index = self.index_expr(p)
            if index is None:
                return tuple(parts), p
            parts.append(index[0])
            p = index[1]

    def index_expr(self, pos: int) -> tuple[str, int] | None:
        q = self.lit(pos, "[")
        if q is None:
            return None
        q = self.ws_opt(q)
        key = self.string(q)
        if key is not None:
            end = self.lit(self.ws_opt(key[1]), "]")
            if end is not None:
                return key[0], end
            self.error(self.ws_opt(key[1]), "index", "Unclosed index expression")
            return None
        self.invert = not self.invert  # !StringLiteral
        self.string(q)
        self.invert = not self.invert
        self.error(q, "index", "Invalid index")
        return None

    def value(self, pos: int) -> tuple[str, int] | None:
        sel = self.selector(pos)
        if sel is not None:
            return ".".join(sel[0]), sel[1]
        num = self.number(pos)
        if num is not None:
            return num
        return self.string(pos)

    def number(self, pos: int) -> tuple[str, int] | None:
        p = self.lit(pos, "-")
        p = pos if p is None else p
        q = self.lit(p, "0")
        if q is None:
            q = self.cls(p, re.compile("[1-9]"), "[1-9]")
            while q is not None:
                r = self.cls(q, re.compile("[0-9]"), "[0-9]")
                if r is None:
                    break
                q = r
        if q is None:
            return None
        dot = self.lit(q, ".")
        if dot is not None:
            r = self.cls(dot, re.compile("[0-9]"), "[0-9]")
            if r is not None:
                q = r
                while (r := self.cls(q, re.compile("[0-9]"), "[0-9]")) is not None:
                    q = r
        # &AfterNumbers, AfterNumbers <- &(_ / EOF / ")")
        if self.ws(q) is not None or self.eof(q) or self.lit(q, ")") is not None:
            return self.s[pos:q], q
        self.error(q, "number", "Invalid number literal")
        return None

    def string(self, pos: int) -> tuple[str, int] | None:
        for mark in ("`", '"'):
            p = self.lit(pos, mark)
            if p is None:
                continue
            end = self.s.find(mark, p)
            # RawStringChar <- !'`' . / DoubleStringChar <- !'"' . : what the loop tried
            stop = self.n if end < 0 else end
            for i in range(p, stop + 1):
                self.invert = not self.invert
                self.lit(i, mark)
                self.invert = not self.invert
                self.any(i)
            if end >= 0:
                self.lit(end, mark)
                try:
                    return _go_unquote(self.s[pos : end + 1]), end + 1
                except ValueError as e:  # the action's error; the match still stands
                    self.error(pos, "string", str(e))
                    return "", end + 1
            self.lit(self.n, mark)
            if self.eof(self.n):
                self.error(self.n, "string", "Unterminated string literal")
            return None
        return None


def parse(text: str) -> Expr:
    """The syntax tree of a filter, or FilterError with bexpr's message."""
    return _Parser(text).input()


# ----- writing a tree back (for tests and messages) -----

_IDENT = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*")


def _quote_value(value: str) -> str:
    if '"' in value and "`" not in value and "\r" not in value:
        return f"`{value}`"
    out = []
    for ch in value:
        if ch == '"':
            out.append("\\x22")
        elif ch in ESCAPES:
            out.append(ESCAPES[ch])
        elif not ch.isprintable():
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _unparse_selector(selector: tuple[str, ...]) -> str:
    out = selector[0]
    for part in selector[1:]:
        out += f".{part}" if _IDENT.fullmatch(part) else f"[{_quote_value(part)}]"
    return out


def unparse(expr: Expr) -> str:
    """A filter string that parses back to `expr` (binary operations fully parenthesised)."""
    if isinstance(expr, BinOp):
        return f" {expr.op} ".join([f"({unparse(operand)})" for operand in expr.operands])
    if isinstance(expr, Not):
        return f"not ({unparse(expr.operand)})"
    sel = _unparse_selector(expr.selector)
    if expr.value is None:
        return f"{sel} {expr.op}"
    if expr.op in (IN, NOT_IN):
        return f"{_quote_value(expr.value)} {expr.op} {sel}"
    return f"{sel} {expr.op} {_quote_value(expr.value)}"


# ----- checking a tree against a schema, and running it -----

_STRUCT_OPS: frozenset[str] = frozenset()
_SCALAR_OPS = frozenset({EQ, NE})
_STRING_OPS = frozenset({EQ, NE, IN, NOT_IN, MATCHES, NOT_MATCHES})
_LIST_OPS = frozenset({IN, NOT_IN, EMPTY, NOT_EMPTY})
_STRUCT_LIST_OPS = frozenset({EMPTY, NOT_EMPTY})
_MAP_OPS = frozenset({EMPTY, NOT_EMPTY, IN, NOT_IN})


def _is_struct(node: Schema) -> bool:
    return isinstance(node, Mapping)


def _ops(node: Schema) -> frozenset[str]:
    if isinstance(node, ListOf):
        return _STRUCT_LIST_OPS if _is_struct(node.elem) else _LIST_OPS
    if isinstance(node, MapOf):
        return _MAP_OPS
    if _is_struct(node):
        return _STRUCT_OPS
    return _STRING_OPS if node is str else _SCALAR_OPS


def _coerce(node: Schema, raw: str) -> str | int | bool:
    """bexpr's coercion of a raw value for the selected field (lists: their elements')."""
    kind = node.elem if isinstance(node, ListOf) else str if isinstance(node, MapOf) else node
    if kind is int:
        return _go_parse_int(raw)
    if kind is bool:
        return parse_bool(raw)
    return raw


# ----- regular expressions: RE2, as Go's regexp -----

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = REGEX_MAX_MEM
_RE2_OPTIONS.log_errors = False  # a bad pattern is the client's 400, not a line on our stderr
#: an escape pair, or a \Q...\E quote: what a scan for \C must step over
_ESCAPE = re.compile(r"\\Q.*?(?:\\E|\Z)|\\(.)", re.DOTALL)
#: RE2's (C++) error codes as Go's regexp/syntax words them; the others read the same
_GO_REGEXP_ERRORS = {
    "missing ]": "missing closing ]",
    "missing )": "missing closing )",
    "trailing \\": "trailing backslash at end of expression",
    "no argument for repetition operator": "missing argument to repetition operator",
    "invalid repetition size": "invalid repeat count",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "invalid named capture group": "invalid named capture",
    "pattern too large - compile failed": "expression too large",
    "unexpected error": "regexp/syntax: internal error",
}


class _Regex:
    """A pattern compiled by RE2 (google-re2 has no type information: this is all we use)."""

    __slots__ = ("_compiled", "pattern")

    def __init__(self, pattern: str) -> None:
        """ValueError with Go's regexp/syntax message for a pattern RE2 or Go refuses."""
        self.pattern = pattern
        if any(m.group(1) == "C" for m in _ESCAPE.finditer(pattern)):
            # \C (any byte) is RE2's in C++ only; Go refuses it
            raise ValueError("invalid escape sequence: `\\C`")
        try:
            self._compiled = re2.compile(pattern, _RE2_OPTIONS)
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it
            raise ValueError(f"invalid UTF-8: `{pattern}`") from None
        except re2.error as e:
            raw = e.args[0] if e.args else b""
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            code, sep, arg = text.partition(": ")
            if not sep:  # Go names the whole pattern (the trailing backslash: nothing)
                arg = "" if code == "trailing \\" else pattern
            raise ValueError(f"{_GO_REGEXP_ERRORS.get(code, code)}: `{arg}`") from None

    @property
    def program_size(self) -> int:
        return int(self._compiled.programsize)

    def search(self, text: str) -> bool:
        """Go's MatchString, on the text's UTF-8 (a lone surrogate reads as U+FFFD, which is
        what Go's JSON decoder makes of one)."""
        try:
            data = text.encode()
        except UnicodeEncodeError:
            data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
        return self._compiled.search(data) is not None


def _regex(raw: str) -> _Regex:
    try:
        return _Regex(raw)
    except ValueError as e:
        raise FilterError(f"Failed to compile regular expression {quote(raw)}: "
                          f"error parsing regexp: {e}") from None  # fmt: skip


# ----- the checked tree -----


@dataclass(frozen=True)
class _Check:
    """A Match with its selector resolved against the schema and its value converted."""

    selector: tuple[str, ...]
    op: str
    leaf: Schema
    value: str | int | bool | _Regex | None
    root: Schema


@dataclass(frozen=True)
class _Negated:
    operand: _Tree


@dataclass(frozen=True)
class _Chain:
    every: bool  # "and": every operand holds; "or": any one does
    operands: tuple[_Tree, ...]


_Tree: TypeAlias = "_Check | _Negated | _Chain"


def _resolve(match: Match, schema: Schema) -> _Check:
    node = schema
    for i, part in enumerate(match.selector):
        if isinstance(node, ListOf) and _is_struct(node.elem):
            node = node.elem  # a list of structs selects through its elements
        if isinstance(node, MapOf):
            node = node.value
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            shown = ".".join(match.selector[: i + 1])
            raise FilterError(f"Selector {quote(shown)} is not valid")
    shown = ".".join(match.selector)
    if match.op not in _ops(node):
        raise FilterError(f"Invalid match operator {quote(_OP_NAMES[match.op])} for selector "
                          f"{quote(shown)}")  # fmt: skip
    value: str | int | bool | _Regex | None = None
    if match.value is not None:
        try:
            value = _coerce(node, match.value)
        except ValueError as e:
            raise FilterError(f"Failed to coerce value {quote(match.value)} for selector "
                              f"{quote(shown)}: {e}") from None  # fmt: skip
        if match.op in (MATCHES, NOT_MATCHES):
            value = _regex(match.value)
    return _Check(match.selector, match.op, node, value, schema)


def _validate(expr: Expr, schema: Schema) -> _Tree:
    """The tree with every Match resolved into a _Check (errors in bexpr's order), its regular
    expressions within FILTER_MAX_PROGRAM together."""
    program = 0

    def check(expr: Expr) -> _Tree:
        nonlocal program
        if isinstance(expr, Not):
            return _Negated(check(expr.operand))
        if isinstance(expr, BinOp):
            operands = []
            for operand in expr.operands:  # a loop, not a comprehension: one frame less a level
                operands.append(check(operand))
            return _Chain(expr.op == "and", tuple(operands))
        resolved = _resolve(expr, schema)
        if isinstance(resolved.value, _Regex):
            program += resolved.value.program_size
            if program > FILTER_MAX_PROGRAM:  # Go's words for a pattern over its own limit
                raw = resolved.value.pattern
                raise FilterError(f"Failed to compile regular expression {quote(raw)}: error "
                                  f"parsing regexp: expression too large: `{raw}`")  # fmt: skip
        return resolved

    return check(expr)


def _zero(node: Schema) -> Any:
    """The Go zero value of a field our JSON leaves out or holds as null."""
    if isinstance(node, ListOf):
        return []
    if isinstance(node, MapOf) or _is_struct(node):
        return {}
    if node is int:
        return 0
    return False if node is bool else ""


def _field(obj: Any, name: str) -> Any:
    """A struct field from the JSON: Consul's name, else the same name in another case
    (ServiceTaggedAddresses values are {"address", "port"} on the wire)."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    lower = name.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == lower:
            return v
    return None


def _as(kind: Schema, value: Any) -> Any:
    """A JSON value as the Go field would hold it (wrong types read as the zero value)."""
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        return "" if value is None or isinstance(value, dict | list) else str(value)
    if kind is bool:
        return value if isinstance(value, bool) else False
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    return value


_MISSING = object()


def _leaf(check: _Check, node: Schema, value: Any) -> bool:
    op, want = check.op, check.value
    if op in (EMPTY, NOT_EMPTY):
        size = len(value) if isinstance(value, list | dict | str) else 0
        return (size == 0) == (op == EMPTY)
    if op in (MATCHES, NOT_MATCHES):
        assert isinstance(want, _Regex)
        return want.search(_as(str, value)) == (op == MATCHES)
    if op in (EQ, NE):
        return bool(_as(node, value) == want) == (op == EQ)
    # in / not in
    if isinstance(node, ListOf):
        items = value if isinstance(value, list) else []
        found = any(_as(node.elem, v) == want for v in items)
    elif isinstance(node, MapOf):
        found = isinstance(value, dict) and want in value
    else:
        found = want in _as(str, value)
    return found == (op == IN)


def _walk(check: _Check, node: Schema, value: Any, depth: int) -> bool:
    if depth == len(check.selector):
        return _leaf(check, node, value)
    if isinstance(node, ListOf):  # any element (bexpr's implicit "any" over slices)
        items = value if isinstance(value, list) else []
        return any(_walk(check, node.elem, item, depth) for item in items)
    part = check.selector[depth]
    if isinstance(node, MapOf):
        got = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if got is _MISSING:
            return check.op in _TRUE_WHEN_MISSING
        return _walk(check, node.value, got, depth + 1)
    assert isinstance(node, Mapping)
    sub = node[part]
    got = _field(value, part)
    return _walk(check, sub, _zero(sub) if got is None else got, depth + 1)


def _run(tree: _Tree, item: Any) -> bool:
    if isinstance(tree, _Check):
        return _walk(tree, tree.root, item, 0)
    if isinstance(tree, _Negated):
        return not _run(tree.operand, item)
    # all() / any() over the operands, as a loop: a generator would be one more frame a level
    for operand in tree.operands:
        if _run(operand, item) != tree.every:
            return not tree.every
    return tree.every


@dataclass(frozen=True)
class Filter:
    """A compiled filter; the empty expression keeps everything (Consul's nil filter)."""

    expression: str
    _tree: _Tree | None = field(default=None, repr=False)

    def __call__(self, item: Any) -> bool:
        try:
            return self._tree is None or _run(self._tree, item)
        except RecursionError:  # a backstop: parsing bounds the depth well inside the limit
            raise FilterError("expression nested too deeply") from None

    def select(self, items: Iterable[T]) -> list[T]:
        return list(items) if self._tree is None else [i for i in items if self(i)]

    def select_values(self, mapping: Mapping[K, T]) -> dict[K, T]:
        return {k: v for k, v in mapping.items() if self(v)}

    @property
    def everything(self) -> bool:
        return self._tree is None


EVERYTHING = Filter("")


def compile_filter(expression: str, schema: Schema) -> Filter:
    """Parse `expression` and check it against `schema`; FilterError says what is wrong."""
    if expression == "":
        return EVERYTHING
    try:
        return Filter(expression, _validate(parse(expression), schema))
    except RecursionError:  # a backstop: MAX_NESTING keeps both well inside the limit
        raise FilterError("expression nested too deeply") from None


def request_filter(request: web.Request, schema: Schema) -> Filter | web.Response:
    """The request's ?filter= for items shaped like `schema`, or Consul's 400 for a bad one.

    Use: `f = request_filter(request, AGENT_SERVICE_SCHEMA)`; return `f` if it is a
    web.Response; else answer `f.select_values(services)` (or `f.select(list)`).
    """
    try:
        return compile_filter(request.query.get("filter", ""), schema)
    except FilterError as e:
        return text_error(400, ERROR_PREFIX + str(e))
