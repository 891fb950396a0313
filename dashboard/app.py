"""The Streamlit app (page config, password gate, navigation); served by dashboard/server.py."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import auth, demo_data, settings  # noqa: E402

VIEWS = Path(__file__).parent / "views"

def _favicon():
    """A small licence-plate icon drawn here (a material icon would be fetched from Google's CDN)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([2, 16, 61, 47], radius=6, fill=(255, 204, 0), outline=(20, 20, 20), width=4)
    for x in (12, 24, 36, 48):
        draw.rectangle([x, 25, x + 5, 38], fill=(20, 20, 20))
    return img


st.set_page_config(page_title="Plate detector", page_icon=_favicon(), layout="wide")
auth.require_login()


@st.cache_resource(show_spinner=False)
def _demo_dataset(root: str, config: str) -> str:
    """Generate the demo dataset once per server process; returns '' or an error line."""
    try:
        demo_data.ensure_demo_dataset(Path(root), demo_data.synth_settings(Path(config)))
    except ImportError as exc:
        return f"the synthetic generator is not available ({exc})"
    except Exception as exc:  # shown as one line; the dashboard stays usable
        return f"could not generate the demo dataset at {root}: {exc}"
    return ""


def _prepare_demo() -> None:
    demo_config = settings.configs_dir() / settings.DEMO_CONFIG
    root = settings.demo_data_dir()
    if not demo_config.is_file():
        return
    if not demo_data.dataset_present(root):
        with st.spinner(f"First start: generating the synthetic demo dataset in {root} ..."):
            error = _demo_dataset(str(root), str(demo_config))
    else:
        error = _demo_dataset(str(root), str(demo_config))  # cached no-op
    if error:
        st.sidebar.warning(error)


_prepare_demo()

pages = [
    st.Page(str(VIEWS / "runs.py"), title="Runs", icon=":material/format_list_bulleted:", default=True),
    st.Page(str(VIEWS / "live.py"), title="Live", icon=":material/monitoring:"),
    st.Page(str(VIEWS / "results.py"), title="Results", icon=":material/emoji_events:"),
    st.Page(str(VIEWS / "dataset.py"), title="Dataset", icon=":material/photo_library:"),
    st.Page(str(VIEWS / "predict.py"), title="Predict", icon=":material/center_focus_strong:"),
]
page = st.navigation(pages)
st.sidebar.caption(f"Runs: `{settings.runs_dir()}`")
page.run()
