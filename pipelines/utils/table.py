"""The one markdown table writer (evaluation, a run's per-epoch table, a sweep's results)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence


def cell(value) -> str:
    """A table cell: floats to 4 significant digits (NaN blank), None blank, the rest as ``str``."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(
    rows: Iterable[dict], columns: Sequence[str], fmt: Callable[[str, object], str] | None = None
) -> str:
    """``rows`` as a markdown table of ``columns`` (missing keys blank); ``fmt(column, value)`` overrides
    :func:`cell`."""
    fmt = fmt or (lambda _, value: cell(value))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
