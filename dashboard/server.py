"""The dashboard server: `streamlit run dashboard/server.py`.

The Streamlit app (dashboard/app.py: pages, password gate) plus the Live page's JSON endpoint
(dashboard/live_api.py), served by one process so both read the same run buffers."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import live_api  # noqa: E402

app = st.App(Path(__file__).with_name("app.py"), routes=live_api.routes())
