"""Number and time text shared by the results report and the dashboard."""
from __future__ import annotations

import datetime as dt
import math
from typing import Any, Optional


def number(value: Any, digits: int = 4) -> str:
    """A metric for a table: '—' for missing, thousands separators for ints, fixed digits for floats."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def params(value: Any) -> str:
    """A parameter count as millions: 18930000 -> '18.9M'; '—' when unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return f"{value / 1e6:.1f}M"
    return "—" if value in (None, "", 0) else str(value)


def learning_rate(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2e}"


def utc_time(ts: Optional[float]) -> str:
    """Unix seconds as 'YYYY-mm-dd HH:MM UTC'; '—' when missing."""
    if not ts:
        return "—"
    return dt.datetime.fromtimestamp(float(ts), tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
