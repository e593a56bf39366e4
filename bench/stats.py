"""Summaries the benchmark tables share: medians and "median [min..max]" cells over reps."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

__all__ = ["fmt3", "goal", "med", "print_table"]


def med(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def fmt3(xs: Sequence[float | None], nd: int) -> str:
    """median [min..max] with nd decimals (and how many reps had no figure)."""
    v = [x for x in xs if x is not None]
    if not v:
        return "n/a"
    s = f"{statistics.median(v):,.{nd}f}"
    if len(v) > 1:
        s += f" [{min(v):,.{nd}f}..{max(v):,.{nd}f}]"
    if len(v) < len(xs):
        s += f" ({len(xs) - len(v)} n/a)"
    return s


def goal(
    num: Sequence[float | None], den: Sequence[float | None], limit: float, at_least: bool = True
) -> tuple[str, str]:
    """A goal on the ratio of two systems' medians: its verdict ("PASS", "MISS", or "n/a "
    when a median is missing) and the ratio as printed ("0.62x", or "n/a")."""
    a, b = med(num), med(den)
    q = a / b if a is not None and b else None
    if q is None:
        return "n/a ", "n/a"
    return ("PASS" if (q >= limit if at_least else q <= limit) else "MISS"), f"{q:.2f}x"


def print_table(
    rows: Sequence[tuple[str, str, int]],
    vals: Mapping[str, Mapping[str, Sequence[float | None]]],
    nreps: Mapping[str, int],
    *,
    label_width: int,
    width: int,
    title: str = "metric",
    ratio: tuple[str, str, str] | None = None,
    ratio_na: str = "      n/a",
    anchor: tuple[str, Mapping[str, float]] | None = None,
) -> None:
    """The figures table: a row per (key, label, decimals), a column per system in vals (its
    fmt3 over reps); optionally the ratio of two systems' medians (numerator, denominator,
    column head) and a column of reference figures (column head, figure per key)."""
    head = f"{title:<{label_width}} | "
    head += " | ".join(f"{s + f' ({nreps[s]} reps)':<{width}}" for s in vals)
    head += f" | {ratio[2]}" if ratio is not None else ""
    head += f" | {anchor[0]}" if anchor is not None else ""
    print(head)
    print("-" * len(head))
    for key, label, nd in rows:
        row = f"{label:<{label_width}} | "
        row += " | ".join(f"{fmt3(v[key], nd):<{width}}" for v in vals.values())
        if ratio is not None:
            a, b = med(vals[ratio[0]][key]), med(vals[ratio[1]][key])
            row += " | " + (f"{a / b:8.2f}x" if a is not None and b else ratio_na)
        if anchor is not None:
            fig = anchor[1].get(key)
            row += " | " + (f"{fig:g}" if fig is not None else "")
        print(row)
