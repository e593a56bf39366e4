"""node/api/filter.py: Consul's ?filter= language (go-bexpr v0.1.2) - parsing with bexpr's
error texts, checking against an endpoint's selectors, evaluating on JSON items - plus
Hypothesis properties: trees survive a round trip through text, and no input (expression or
data) makes it fail other than with a clean FilterError."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
import re2
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from node.api.filter import (
    AGENT_CHECK_SCHEMA,
    AGENT_SERVICE_SCHEMA,
    CHECK_SERVICE_NODE_SCHEMA,
    HEALTH_CHECK_SCHEMA,
    MAX_NESTING,
    NODE_SCHEMA,
    NODE_SERVICE_SCHEMA,
    SERVICE_NODE_SCHEMA,
    BinOp,
    Expr,
    Filter,
    FilterError,
    ListOf,
    MapOf,
    Match,
    Not,
    Schema,
    compile_filter,
    parse,
    request_filter,
    unparse,
)
from node.golang import quote

# ----- parsing -----


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        # consul#7338: the whole message as Consul 1.7 gave it
        ("foo", '1:4 (3): no match found, expected: "!=", ".", "==", "[", [ \\t\\r\\n] or '
                "[a-zA-Z0-9_]"),
        # consul#9441
        ("Address == 10.10.10.10 ", '1:17 (16): rule "number": Invalid number literal'),
        # consul#6467 (an unquoted value with a dash)
        ("Node==host-name", '1:11 (10): no match found, expected: ".", "[", [ \\t\\r\\n], '
                            "[a-zA-Z0-9_] or EOF"),
        ("Meta[foo] == x", '1:6 (5): rule "index": Invalid index'),
        ('Meta["foo" == x', '1:12 (11): rule "index": Unclosed index expression'),
        ("(Node == x", '1:11 (10): rule "grouping": Unmatched parentheses'),
        ('"x" in 5', '1:8 (7): rule "match": Invalid selector'),
        ('Node == "abc', '1:13 (12): rule "string": Unterminated string literal'),
        ('Node == "a\\q"', '1:9 (8): rule "string": invalid syntax'),
        ("Node == 01", '1:10 (9): rule "number": Invalid number literal'),
        ("Node == x\nor", "2:3 (12): no match found, expected: [ \\t\\r\\n]"),
        ("Node == é", "1:9 (8): no match found"),
        # columns count characters, offsets bytes
        ('"é" in Tags.', "1:13 (13): no match found, expected: [a-zA-Z]"),
    ],
)  # fmt: skip
def test_syntax_errors_read_as_bexpr_writes_them(expression: str, message: str) -> None:
    with pytest.raises(FilterError) as e:
        parse(expression)
    assert str(e.value).startswith(message)


M = Match


@pytest.mark.parametrize(
    ("expression", "tree"),
    [
        ('Node == "a"', M(("Node",), "==", "a")),
        ("Node==a", M(("Node",), "==", "a")),
        ("Node != a.b", M(("Node",), "!=", "a.b")),  # an unquoted value may be a selector
        ("Port == -12.5", M(("Port",), "==", "-12.5")),
        ("Tags contains `x\"y`", M(("Tags",), "in", 'x"y')),  # raw strings keep everything
        ('"a\\tb" in Tags', M(("Tags",), "in", "a\tb")),
        ("Tags not contains x", M(("Tags",), "not in", "x")),
        ("x not in Tags", M(("Tags",), "not in", "x")),
        ('Meta["k-1"].x == y', M(("Meta", "k-1", "x"), "==", "y")),
        ("Meta is empty", M(("Meta",), "is empty")),
        ("Meta is not empty", M(("Meta",), "is not empty")),
        ('Name matches "^a"', M(("Name",), "matches", "^a")),
        ('Name not matches "^a"', M(("Name",), "not matches", "^a")),
        ("notes == x", M(("notes",), "==", "x")),  # "not" needs whitespace after it
        ("not not a == b", M(("a",), "==", "b")),  # bexpr drops double negations
        # and binds tighter than or
        ("a == 1 or b == 2 and c == 3",
         BinOp("or", (M(("a",), "==", "1"),
                      BinOp("and", (M(("b",), "==", "2"), M(("c",), "==", "3")))))),
        ("not a == 1 and b == 2",
         BinOp("and", (Not(M(("a",), "==", "1")), M(("b",), "==", "2")))),
        ("(a == 1 or b == 2) and c == 3",
         BinOp("and", (BinOp("or", (M(("a",), "==", "1"), M(("b",), "==", "2"))),
                       M(("c",), "==", "3")))),
        # a chain of one operator is one node; parentheses keep their own
        ("a == 1 or b == 2 or c == 3",
         BinOp("or", (M(("a",), "==", "1"), M(("b",), "==", "2"), M(("c",), "==", "3")))),
        ("a == 1 or (b == 2 or c == 3)",
         BinOp("or", (M(("a",), "==", "1"),
                      BinOp("or", (M(("b",), "==", "2"), M(("c",), "==", "3")))))),
        (" ( a == 1 ) ", M(("a",), "==", "1")),
    ],
)  # fmt: skip
def test_parse_trees(expression: str, tree: Expr) -> None:
    assert parse(expression) == tree
    assert parse(unparse(tree)) == tree


def test_deep_nesting_is_refused_cleanly() -> None:
    with pytest.raises(FilterError, match="nested more than"):
        parse("(" * 2000 + "a == b" + ")" * 2000)
    with pytest.raises(FilterError, match="nested more than"):
        parse("not " * 2000 + "a == b")
    assert parse("(" * 50 + "a == b" + ")" * 50) == M(("a",), "==", "b")


def _nested(levels: int) -> str:
    """A filter with `levels` parentheses, each holding an or of an and: the deepest tree the
    nesting limit lets through."""
    text = "ServiceName == web"
    for _ in range(levels):
        text = f"(ServiceID == q or ServiceName == web and {text})"
    return text


@pytest.mark.parametrize("op", ["or", "and"])
def test_long_chains_take_no_stack(op: str) -> None:
    """Review 1.2: bexpr's grammar recursed once per clause, so 1000 `or` clauses raised
    RecursionError (a 500 over HTTP). A chain is now one node, parsed, checked and run in a
    loop."""
    clauses = 5000
    last = "ServiceName == web" if op == "or" else "ServiceName != db"
    text = f" {op} ".join(["ServiceName == x" if op == "or" else "ServiceID != x"] * clauses
                          + [last])  # fmt: skip
    tree = parse(text)
    assert isinstance(tree, BinOp) and tree.op == op and len(tree.operands) == clauses + 1
    assert parse(unparse(tree)) == tree
    f = compile_filter(text, SERVICE_NODE_SCHEMA)
    assert f({"ServiceName": "web", "ServiceID": "web-1"}) is True
    assert f({"ServiceName": "db", "ServiceID": "db-1"}) is False
    # request_filter (the HTTP side) answers a Filter, not an exception
    req = make_mocked_request("GET", "/v1/catalog/service/web?" + urlencode({"filter": text}))
    assert isinstance(request_filter(req, SERVICE_NODE_SCHEMA), Filter)
    # and a mixed chain: or of ands, 2000 clauses
    mixed = " or ".join(["ServiceName == x and ServiceID == y"] * 1000 + ["ServiceName == web"])
    assert compile_filter(mixed, SERVICE_NODE_SCHEMA)({"ServiceName": "web"}) is True


def test_the_nesting_limit_leaves_room_on_the_stack() -> None:
    """The deepest filter the parser takes parses, checks and runs with the default limit.
    (The outermost parentheses are the grammar's own, so they do not count.)"""
    f = compile_filter(_nested(MAX_NESTING + 1), SERVICE_NODE_SCHEMA)
    # ServiceName "web" makes every "and" look inside, down to the innermost clause
    assert f({"ServiceName": "web", "ServiceID": "x"}) is True
    assert f({"ServiceName": "db", "ServiceID": "x"}) is False
    with pytest.raises(FilterError, match="nested more than 128"):
        parse(_nested(MAX_NESTING + 2))


R = TypeVar("R")


def _with_stack_left(frames: int, fn: Callable[[], R]) -> R:
    """fn() called `frames` short of the recursion limit (as if deep in some caller)."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back

    def down(n: int) -> R:
        return fn() if n <= 0 else down(n - 1)

    return down(sys.getrecursionlimit() - depth - frames)


def test_a_recursion_error_is_a_filter_error() -> None:
    """The backstop: should the stack run out anyway, the client gets a 400, not a 500."""
    text = _nested(MAX_NESTING + 1)
    with pytest.raises(FilterError, match="nested too deeply"):
        _with_stack_left(150, lambda: compile_filter(text, SERVICE_NODE_SCHEMA))
    f = compile_filter(text, SERVICE_NODE_SCHEMA)
    with pytest.raises(FilterError, match="nested too deeply"):
        _with_stack_left(100, lambda: f({"ServiceName": "web", "ServiceID": "x"}))
    req = make_mocked_request("GET", "/v1/catalog/service/web?" + urlencode({"filter": text}))
    resp = _with_stack_left(150, lambda: request_filter(req, SERVICE_NODE_SCHEMA))
    assert isinstance(resp, web.Response) and resp.status == 400
    assert (
        resp.text == "Failed to create boolean expression evaluator: expression nested too deeply"
    )


# ----- checking against an endpoint's selectors -----


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("Foo == 1", 'Selector "Foo" is not valid'),
        ("ServiceMeta.a.b == 1", 'Selector "ServiceMeta.a.b" is not valid'),
        ("ServiceTags.x == 1", 'Selector "ServiceTags.x" is not valid'),
        ("serviceName == web", 'Selector "serviceName" is not valid'),  # case-sensitive
        ("ServicePort == abc", 'Failed to coerce value "abc" for selector "ServicePort": '
                               'strconv.ParseInt: parsing "abc": invalid syntax'),
        ("ServicePort == 99999999999999999999", "value out of range"),
        ("ServiceEnableTagOverride == yes", 'strconv.ParseBool: parsing "yes": invalid syntax'),
        ("ServiceWeights == 1", 'Invalid match operator "Equal" for selector "ServiceWeights"'),
        ("ServiceTags == x", 'Invalid match operator "Equal" for selector "ServiceTags"'),
        ("ServicePort matches x", 'Invalid match operator "Matches" for selector "ServicePort"'),
        ("ServiceName is empty", 'Invalid match operator "Is Empty" for selector "ServiceName"'),
        ("ServiceProxy.Upstreams contains x", 'Invalid match operator "In"'),
        ('Node matches "("', 'Failed to compile regular expression "(": error parsing regexp: '
                             "missing closing ): `(`"),
        ('Node matches "a(?!b)"', "invalid or unsupported Perl syntax: `(?!`"),
        ('Node matches "(a)\\\\1"', "invalid escape sequence: `\\1`"),
        # validation runs left to right and stops at the first problem
        ("Node == a and Bad == 1 and Worse == 2", 'Selector "Bad" is not valid'),
    ],
)  # fmt: skip
def test_selectors_operators_and_values_are_checked(expression: str, message: str) -> None:
    with pytest.raises(FilterError) as e:
        compile_filter(expression, SERVICE_NODE_SCHEMA)
    assert message in str(e.value)


def test_the_empty_expression_keeps_everything() -> None:
    f = compile_filter("", HEALTH_CHECK_SCHEMA)
    assert f.everything and f.select([1, 2]) == [1, 2] and f.select_values({"a": 1}) == {"a": 1}


# ----- evaluating -----

ENTRY: dict[str, Any] = {
    "Node": {"ID": "11111111-1111-1111-1111-111111111111", "Node": "box1", "Address": "10.0.0.1",
             "Datacenter": "dc1", "TaggedAddresses": {"lan": "10.0.0.1"},
             "Meta": {"rack": "r1", "os-name": "linux"}},
    "Service": {"ID": "web-1", "Service": "web", "Tags": ["prod", "v2"], "Address": "",
                "TaggedAddresses": {"lan": {"address": "10.0.0.9", "port": 8080}},
                "Meta": {"version": "1.2"}, "Port": 8080,
                "Weights": {"Passing": 3, "Warning": 1}, "EnableTagOverride": False,
                "Proxy": None, "Connect": None, "Kind": ""},
    "Checks": [
        {"Node": "box1", "CheckID": "serfHealth", "Name": "Serf", "Status": "passing",
         "Notes": "", "Output": "alive", "ServiceID": "", "ServiceName": "", "ServiceTags": []},
        {"Node": "box1", "CheckID": "service:web-1", "Name": "web", "Status": "critical",
         "Notes": "", "Output": "HTTP GET: 503", "ServiceID": "web-1", "ServiceName": "web",
         "ServiceTags": ["prod"]},
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service.Service == web", True),
        ('Service.Service == "Web"', False),  # values compare exactly
        ("Service.Service != web", False),
        ("prod in Service.Tags", True),
        ("Service.Tags contains v3", False),
        ("Service.Tags not contains v3", True),
        ("Service.Tags is not empty", True),
        ('"eb" in Service.Service', True),  # in on a string: a substring
        ('Service.ID matches "^web-[0-9]+$"', True),
        ('Service.ID not matches "^web"', False),
        ("Service.Meta.version == 1.2", True),
        ('Service.Meta["version"] == "1.2"', True),
        ('Node.Meta["os-name"] == linux', True),
        ("rack in Node.Meta", True),  # in on a map: a key
        ("zone in Node.Meta", False),
        # a missing map key: ==, in, matches and is not empty are false, their negations true
        ("Node.Meta.zone == a", False),
        ("Node.Meta.zone != a", True),
        ('Node.Meta.zone matches "."', False),
        ('Node.Meta.zone not matches "."', True),
        ("Node.Meta.zone contains a", False),
        ("Node.Meta.zone not contains a", True),
        ("Service.TaggedAddresses.wan.Port == 0", False),
        ("Service.TaggedAddresses.wan.Port != 0", True),
        # struct fields of map values match the JSON's lower-case keys
        ('Service.TaggedAddresses.lan.Address == "10.0.0.9"', True),
        ("Service.TaggedAddresses.lan.Port == 8080", True),
        ("Service.Port == 8080", True),
        ('Service.Port == "0x1F90"', True),  # ints take Go's base prefixes
        ("Service.Weights.Passing == 3", True),
        ("Service.EnableTagOverride == false", True),
        ("Service.EnableTagOverride == 1", False),
        # null structs read as Go's zero values
        ('Service.Proxy.DestinationServiceName == ""', True),
        ("Service.Connect.Native == false", True),
        ("Service.Proxy.Upstreams is empty", True),
        # a selector through a list matches when any element does
        ("Checks.Status == critical", True),
        ("Checks.Status == warning", False),
        ("Checks.Status != passing", True),
        ('Checks.Output contains "503"', True),
        ("prod in Checks.ServiceTags", True),
        ("Checks is not empty", True),
        ("Service.Service == web and not Checks.Status == warning", True),
        ("Service.Service == db or Node.Node == box1", True),
        ("(Service.Service == db or Node.Node == box2) and Service.Port == 8080", False),
    ],
)
def test_evaluation(expression: str, expected: bool) -> None:
    assert compile_filter(expression, CHECK_SERVICE_NODE_SCHEMA)(ENTRY) is expected


# ----- regular expressions: RE2, the engine of Go's regexp -----


@pytest.mark.timeout(5)  # generous: RE2 answers in microseconds; Python's re took hours here
def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    """Review 1.1: with a backtracking engine `^(a+)+$` against 40 a's and a "!" tries 2^40
    ways before failing, freezing the event loop; RE2 never backtracks."""
    f = compile_filter('ServiceName matches "^(a+)+$"', SERVICE_NODE_SCHEMA)
    assert f({"ServiceName": "a" * 40 + "!"}) is False
    assert f({"ServiceName": "a" * 40}) is True
    g = compile_filter('ServiceName not matches "(x+x+)+y"', SERVICE_NODE_SCHEMA)
    assert g({"ServiceName": "x" * 10_000}) is True


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        # RE2 syntax that Python's re refuses
        (r"^\pL+\z", "héllo", True),  # Unicode classes, \z
        (r"^\pL+\z", "hello1", False),
        (r"^\p{Greek}+$", "αβγ", True),
        (r"\Q1.*\E$", "v1.*", True),  # \Q...\E quotes
        (r"\Q1.*\E$", "v1.2", False),
        (r"\Q\C\E", "a\\Cb", True),  # \C inside a quote is text
        (r"\\C", "a\\Cb", True),  # an escaped backslash, then C
        (r"^[[:digit:]]+$", "123", True),  # POSIX classes (Python: a set and a warning)
        # RE2's matching rules
        (r"^.$", "é", True),  # "." is a character, not a byte
        (r"(?i)^WEB", "web-1", True),
        (r"^\x{FFFD}x$", "\ud800x", True),  # a lone surrogate reads as U+FFFD, as Go decodes it
        (r"^web-[0-9]+$", "web-12", True),
        (r"^web-[0-9]+$", "web-12a", False),
    ],
)
def test_patterns_are_re2s(pattern: str, name: str, expected: bool) -> None:
    f = compile_filter(f"ServiceName matches `{pattern}`", SERVICE_NODE_SCHEMA)
    assert f({"ServiceName": name}) is expected
    g = compile_filter(f"ServiceName not matches `{pattern}`", SERVICE_NODE_SCHEMA)
    assert g({"ServiceName": name}) is not expected


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        # refused by RE2 (and Go), taken by Python's re
        (r"a(?=b)", "invalid or unsupported Perl syntax: `(?=`"),
        (r"(?<=a)b", "invalid or unsupported Perl syntax: `(?<=`"),
        (r"(?>a)", "invalid or unsupported Perl syntax: `(?>`"),
        (r"a*+", "invalid nested repetition operator: `*+`"),
        (r"(a)\1", r"invalid escape sequence: `\1`"),
        (r"a\Z", r"invalid escape sequence: `\Z`"),
        (r"\C", r"invalid escape sequence: `\C`"),  # RE2 in C++ takes it; Go does not
        # the rest of Go's messages
        (r"a{1001}", "invalid repeat count: `{1001}`"),
        (r"[a", "missing closing ]: `[a`"),
        (r"a(b", "missing closing ): `a(b`"),
        (r"a)", "unexpected ): `a)`"),
        (r"*", "missing argument to repetition operator: `*`"),
        ("a\\", "trailing backslash at end of expression: ``"),
        (r"\pL{100}", r"expression too large: `\pL{100}`"),  # over REGEX_MAX_MEM
    ],
)
def test_patterns_re2_refuses_have_gos_message(pattern: str, error: str) -> None:
    with pytest.raises(FilterError) as e:
        compile_filter(f"ServiceName matches `{pattern}`", SERVICE_NODE_SCHEMA)
    assert str(e.value) == (f"Failed to compile regular expression {quote(pattern)}: "
                            f"error parsing regexp: {error}")  # fmt: skip


def test_a_filter_s_patterns_share_one_size_budget() -> None:
    """Many large distinct patterns cannot add up compile time on the event loop."""

    def patterns(n: int) -> str:
        return " or ".join(f"ServiceName matches `\\pL{{30}}{i}`" for i in range(n))

    assert compile_filter(patterns(2), SERVICE_NODE_SCHEMA)({"ServiceName": "é" * 30 + "1"})
    with pytest.raises(FilterError) as e:
        compile_filter(patterns(8), SERVICE_NODE_SCHEMA)
    # each is about 36,000 instructions: the one that passes 200,000 (the sixth) is named
    assert re.fullmatch(r'Failed to compile regular expression "\\\\pL\{30\}\d": error parsing '
                        r"regexp: expression too large: `\\pL\{30\}\d`", str(e.value))  # fmt: skip


def test_a_list_selector_over_no_elements_matches_nothing() -> None:
    entry = dict(ENTRY, Checks=[])
    for expression in ("Checks.Status == passing", "Checks.Status != passing"):
        assert compile_filter(expression, CHECK_SERVICE_NODE_SCHEMA)(entry) is False
    assert compile_filter("Checks is empty", CHECK_SERVICE_NODE_SCHEMA)(entry) is True


def test_select_and_select_values() -> None:
    services = {"a": {"Service": "api", "Tags": ["x"], "Meta": {"env": "qa"}},
                "b": {"Service": "web", "Tags": None, "Meta": {"env": "prod"}}}  # fmt: skip
    f = compile_filter('Meta.env == "qa"', AGENT_SERVICE_SCHEMA)
    assert f.select_values(services) == {"a": services["a"]}
    assert compile_filter("Tags is empty", AGENT_SERVICE_SCHEMA).select(list(services.values())) \
        == [services["b"]]  # fmt: skip
    checks = [{"CheckID": "c1", "Status": "passing"}, {"CheckID": "c2", "Status": "critical"}]
    assert compile_filter("Status != passing", AGENT_CHECK_SCHEMA).select(checks) == [checks[1]]
    nodes = [{"Node": "n1", "Meta": {}}, {"Node": "n2", "Meta": {"a": "b"}}]
    assert compile_filter("Meta is empty", NODE_SCHEMA).select(nodes) == [nodes[0]]
    assert compile_filter('Kind == ""', NODE_SERVICE_SCHEMA)({"Kind": None}) is True


def test_request_filter_answers_consul_400() -> None:
    bad = make_mocked_request("GET", "/v1/agent/services?filter=Service%20%3D%3D")
    resp = request_filter(bad, AGENT_SERVICE_SCHEMA)
    assert isinstance(resp, web.Response) and resp.status == 400
    assert resp.text is not None
    assert resp.text.startswith("Failed to create boolean expression evaluator: 1:11 (10): ")
    good = make_mocked_request("GET", "/v1/agent/services?filter=Service%20%3D%3D%20web")
    f = request_filter(good, AGENT_SERVICE_SCHEMA)
    assert isinstance(f, Filter) and f({"Service": "web"}) and not f({"Service": "db"})
    none = request_filter(make_mocked_request("GET", "/v1/agent/services"), AGENT_SERVICE_SCHEMA)
    assert isinstance(none, Filter) and none.everything


# ----- properties -----

_IDENT = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,6}", fullmatch=True)
_PART = st.one_of(_IDENT, st.text(max_size=6))
_SELECTOR = st.tuples(_IDENT).flatmap(
    lambda first: st.lists(_PART, max_size=3).map(lambda rest: (*first, *rest))
)
_VALUE = st.text(max_size=10)


@st.composite
def _match(draw: st.DrawFn) -> Match:
    op = draw(st.sampled_from(["==", "!=", "in", "not in", "is empty", "is not empty",
                               "matches", "not matches"]))  # fmt: skip
    value = None if op in ("is empty", "is not empty") else draw(_VALUE)
    return Match(draw(_SELECTOR), op, value)


_TREES = st.recursive(
    _match(),
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(
            BinOp,
            st.sampled_from(["and", "or"]),
            st.lists(inner, min_size=2, max_size=3).map(tuple),
        ),
    ),
    max_leaves=8,
)


def _normal(tree: Expr) -> Expr:
    """What the parser builds: no double negations."""
    if isinstance(tree, Not):
        inner = _normal(tree.operand)
        return inner.operand if isinstance(inner, Not) else Not(inner)
    if isinstance(tree, BinOp):
        return BinOp(tree.op, tuple(_normal(operand) for operand in tree.operands))
    return tree


@settings(max_examples=300, deadline=None)
@given(_TREES)
def test_round_trip_through_text(tree: Expr) -> None:
    assert parse(unparse(tree)) == _normal(tree)


_TOKENS = [*'abNode.Meta[]"`()=!<> \t\n-_01.\\éx', "==", "!=", " and ", " or ", "not ", " in ",
           " contains ", " is empty", " is not empty", " matches ", "Checks.Status",
           "Service.Tags", '"x"', "`y`"]  # fmt: skip
_FILTER_ALPHABET = st.sampled_from(_TOKENS)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_FILTER_ALPHABET, max_size=12).map("".join)))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        f = compile_filter(text, CHECK_SERVICE_NODE_SCHEMA)
    except FilterError as e:
        assert str(e)
        return
    assert isinstance(f(ENTRY), bool)


def _leaves(schema: Schema, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Schema]]:
    """Every selector the schema takes, with what it selects (map keys as "k")."""
    out: list[tuple[tuple[str, ...], Schema]] = [(prefix, schema)] if prefix else []
    if isinstance(schema, ListOf) and isinstance(schema.elem, dict):
        schema = schema.elem
    if isinstance(schema, MapOf):
        out += _leaves(schema.value, (*prefix, "k"))
    elif isinstance(schema, dict):
        for name, sub in schema.items():
            out += _leaves(sub, (*prefix, name))
    return out


_SELECTABLE = _leaves(CHECK_SERVICE_NODE_SCHEMA)


@st.composite
def _valid_match(draw: st.DrawFn) -> Match:
    selector, node = draw(st.sampled_from(_SELECTABLE))
    if isinstance(node, ListOf):
        ops = ["is empty", "is not empty"] + ([] if isinstance(node.elem, dict) else ["in"])
    elif isinstance(node, MapOf):
        ops = ["is empty", "is not empty", "in", "not in"]
    elif isinstance(node, dict):
        return Match(("Service", "Port"), "==", "1")
    elif node is str:
        ops = ["==", "!=", "in", "not in", "matches", "not matches"]
    else:
        ops = ["==", "!="]
    op = draw(st.sampled_from(ops))
    if op in ("is empty", "is not empty"):
        return Match(selector, op)
    kind = node.elem if isinstance(node, ListOf) else node
    if kind is int:
        return Match(selector, op, str(draw(st.integers(-(2**63), 2**63 - 1))))
    if kind is bool:
        return Match(selector, op, draw(st.sampled_from(["true", "false", "1", "F"])))
    raw = draw(_VALUE)
    return Match(selector, op, re2.escape(raw) if "matches" in op else raw)


_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
)
_KEYS = st.sampled_from(["k", "Status", "Tags", "Meta", "Port", "address", "x"])
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)
_VALID_TREES = st.recursive(
    _valid_match(),
    lambda i: (
        st.builds(
            BinOp, st.sampled_from(["and", "or"]), st.lists(i, min_size=2, max_size=3).map(tuple)
        )
        | st.builds(Not, i)
    ),
    max_leaves=4,
)


@settings(max_examples=300, deadline=None)
@given(
    _VALID_TREES,
    st.one_of(_JSON, st.fixed_dictionaries({"Node": _JSON, "Service": _JSON, "Checks": _JSON})),
)
def test_valid_filters_run_on_any_data(tree: Expr, item: Any) -> None:
    """Catalog rows can hold odd JSON (Meta values, TaggedAddresses): evaluation still answers."""
    f = compile_filter(unparse(tree), CHECK_SERVICE_NODE_SCHEMA)
    assert isinstance(f(item), bool)


def test_every_endpoint_schema_accepts_its_documented_selectors() -> None:
    """A few selectors from each endpoint's table in Consul's API docs."""
    for schema, expression in [
        (NODE_SCHEMA, 'Meta.env == "qa" and TaggedAddresses.lan != "" and ID != ""'),
        (SERVICE_NODE_SCHEMA, "NodeMeta is empty or ServiceTaggedAddresses.lan.Port == 1 or "
                              "ServiceProxy.Upstreams.DestinationName == db or "
                              "ServiceProxy.TransparentProxy.OutboundListenerPort == 15001 or "
                              "ServiceConnect.Native == true or ServiceWeights.Warning == 1"),
        (NODE_SERVICE_SCHEMA, "Kind == `connect-proxy` and Proxy.MeshGateway.Mode == local and "
                              "Weights.Passing == 1 and Tags is empty and Address == a"),
        (HEALTH_CHECK_SCHEMA, "CheckID == a and Name == b and Node == c and Notes == d and "
                              "Output == e and ServiceID == f and ServiceName == g and "
                              "ServiceTags is empty and Status == passing and Type == ttl"),
        (CHECK_SERVICE_NODE_SCHEMA, "Checks.ServiceTags is empty and Node.Meta.x == y and "
                                    "Service.Proxy.LocalServicePort == 1"),
    ]:  # fmt: skip
        compile_filter(expression, schema)
