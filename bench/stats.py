"""Summaries the benchmark tables share: medians and "median [min..max]" cells over reps."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["fmt3", "med"]


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
