"""Number formats the report's text outputs share (a missing number is a dash in report.md, n/a in summary.txt)."""
from __future__ import annotations

import math
from typing import Any, Iterable


def number_or_dash(v: float | None, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def p_value(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def seconds(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def percent(v: float | None) -> str:
    """A fraction as a percentage (the original's acc=)."""
    return "n/a" if v is None else f"{100 * v:.2f}%"


def percentage_points(v: float | None) -> str:
    """A difference of fractions in percentage points (the original's d_acc=)."""
    return "n/a" if v is None else f"{100 * v:+.2f}pp"


def mean_or_none(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


# every spread the report prints is the sample standard deviation (n - 1 in the denominator), labelled so
SD_LABEL = "sample SD (n−1)"
SD_LABEL_ASCII = "sd(n-1)"


def markdown_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return out
