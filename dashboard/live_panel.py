"""The Live page's header and charts as one component that polls the dashboard's JSON endpoint.

Layout only: what it shows comes from dashboard/live_api.py; components/live_panel/index.html draws it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import streamlit.components.v1 as components

_component = components.declare_component("live_panel", path=str(Path(__file__).parent / "components" / "live_panel"))


def live_panel(token: str, key: str) -> Optional[dict]:
    """Draw the panel for a live_api token; returns the latest box selection on the loss chart
    ({"x": [x0, x1], "n": count}) or None. The frame fits its content once drawn."""
    return _component(token=token, key=key, default=None)
