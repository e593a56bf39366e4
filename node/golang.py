"""What Consul's Go code does to values, done the same way here so that requests are read and
errors worded as Consul's: JSON field names matched case-insensitively (snake_case too),
time.ParseDuration / Duration.String, strconv.ParseBool and %q."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ESCAPES", "field", "fold", "format_duration", "parse_bool", "parse_duration", "quote"]

#: the escapes Go's %q writes itself (the rest is \x, \u or \U)
ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\v": "\\v", '"': '\\"', "\\": "\\\\"}  # fmt: skip


def fold(key: str) -> str:
    """A JSON key as Go matches it: case-insensitive, and snake_case is the same key."""
    return key.replace("_", "").lower()


def field(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """Field lookup the way Go decodes JSON: case-insensitive, snake_case accepted."""
    want = fold(name)
    return next((v for k, v in obj.items() if fold(k) == want), default)


_DUR_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration (seconds), since Consul's TTL and LockDelay use that syntax."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DUR_RE.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return sign * total


def quote(s: str) -> str:
    """Go's %q."""
    out = ['"']
    for ch in s:
        if ch in ESCAPES:
            out.append(ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def parse_bool(raw: str) -> bool:
    """strconv.ParseBool, with its error text."""
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"strconv.ParseBool: parsing {quote(raw)}: invalid syntax")


def format_duration(seconds: float) -> str:
    """Go's time.Duration.String(), so messages read as Consul's ("500ms", "1m30s")."""
    ns = round(seconds * 1e9)
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_frac(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_frac(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    secs = f"{_frac(rest, 10**9)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    return f"{sign}{minutes}m{secs}" if minutes else f"{sign}{secs}"


def _frac(value: int, unit: int) -> str:
    whole, part = divmod(value, unit)
    if not part:
        return str(whole)
    digits = str(part).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"
