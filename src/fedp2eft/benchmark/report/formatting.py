"""How numbers read in the report's tables and sentences: points of the metric, signed differences, small
values, learning rates."""

from __future__ import annotations

import numpy as np


def _title(label: str) -> str:
    """'exact match' -> 'Exact match'; 'ROUGE-L F1' stays as it is."""
    return label[:1].upper() + label[1:]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(entry: dict | None) -> str:
    """``mean ± half-width`` of the 95% interval, in points of the metric (%)."""
    if entry is None:
        return "–"
    return f"{_pct(entry['mean'])} ± {100 * (entry['ci_high'] - entry['ci_low']) / 2:.1f}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _number(value, digits: int = 3) -> str:
    """Three decimals, or three significant digits for values too small to show that way (lambda starts at 1e-4)."""
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits else f"{value:.{digits}g}"


def _lr(value) -> str:
    return f"{float(value):g}"
