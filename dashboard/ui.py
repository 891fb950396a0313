"""Layout helpers shared by the pages (run pickers, one-shot messages)."""
from __future__ import annotations

from typing import Optional

import streamlit as st

SELECTED = "selected_run"  # the run the user last looked at, shared by the pages
FLASH = "_flash"


def run_picker(names: list[str], label: str = "Run", key: str = "run_pick") -> Optional[str]:
    """A selectbox over run names that starts at (and updates) the shared selected run."""
    if not names:
        return None
    current = st.session_state.get(SELECTED)
    shown, last = st.session_state.get(key), st.session_state.get(f"_last_{key}")
    if shown is not None and shown not in names:
        del st.session_state[key]  # its run disappeared
    elif shown is not None and shown == last and current in names and current != shown:
        st.session_state[key] = current  # the selection changed elsewhere (another page, a new run)
    index = names.index(current) if current in names else 0
    choice = st.selectbox(label, names, index=index, key=key)
    st.session_state[SELECTED] = choice
    st.session_state[f"_last_{key}"] = choice
    return choice


def flash(kind: str, text: str) -> None:
    """Queue a message shown once on the next render (survives st.rerun)."""
    st.session_state.setdefault(FLASH, []).append((kind, text))


def show_flashes() -> None:
    for kind, text in st.session_state.pop(FLASH, []):
        getattr(st, kind, st.info)(text)


def safe(render, *args, **kwargs):
    """Run one section; an unexpected error becomes a one-line message instead of a broken page."""
    try:
        return render(*args, **kwargs)
    except Exception as exc:  # the page must stay usable whatever a file holds (st.rerun/st.stop pass: BaseException)
        st.error(f"{getattr(render, '__name__', 'section')}: {type(exc).__name__}: {exc}")
        return None
