"""Small text formatters shared by the pages."""
from __future__ import annotations

import datetime as dt
import math
from typing import Any, Optional

from engine import formatting as engine_formatting

STATE_COLORS = {  # Streamlit badge colours
    "queued": "blue", "running": "blue", "completed": "green", "stopped": "gray", "failed": "red",
    "crashed": "red", "stalled": "orange", "unknown": "gray",
}


def duration(seconds: Optional[float]) -> str:
    """3725 -> '1h 02m'; 65 -> '1m 05s'; None -> '—'."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)) or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def timestamp(ts: Optional[float]) -> str:
    """Unix seconds as local 'YYYY-mm-dd HH:MM'."""
    if not ts:
        return "—"
    try:
        return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return "—"


def number(value: Any, digits: int = 3) -> str:
    """engine.formatting.number with 3 digits by default (the pages' metric cards)."""
    return engine_formatting.number(value, digits)


def state_badge(state: str) -> str:
    """Markdown for a coloured state badge, e.g. ':blue-badge[running]'."""
    return f":{STATE_COLORS.get(state, 'gray')}-badge[{state}]"
