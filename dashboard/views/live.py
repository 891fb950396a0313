"""Live: curves of one or several runs, refreshed every few seconds while a run is alive."""
from __future__ import annotations

import streamlit as st

from dashboard import charts, formatting as fmt, series, settings, ui
from engine import runs

runs_dir = settings.runs_dir()
TAILS = "_live_tails"
CONFIG = {"displaylogo": False, "scrollZoom": False}

st.title("Live")
names = runs.list_run_names(runs_dir)
if not names:
    st.info(f"No runs yet in `{runs_dir}`. Start one on the Runs page.")
    st.stop()

selected = st.session_state.get(ui.SELECTED)
default = [selected] if selected in names else names[:1]
chosen = st.multiselect("Runs", names, default=default, key="live_runs",
                        help="several runs are overlaid on the same charts")
if chosen:
    st.session_state[ui.SELECTED] = chosen[0]
c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
with c1:
    x_axis = st.radio("x axis", series.X_AXES, horizontal=True, key="live_x")
with c2:
    smoothing = st.slider("Smoothing (EMA weight)", 0.0, 0.99, 0.6, 0.01, key="live_smooth",
                          help="0 shows the raw loss only")
with c3:
    log_y = st.toggle("log y", key="live_log")


def _tail(name: str) -> series.RunTail:
    """One incremental reader per run, kept across refreshes so only new bytes are read."""
    tails = st.session_state.setdefault(TAILS, {})
    key = str(runs.run_path(runs_dir, name))
    if key not in tails:
        tails[key] = series.RunTail(runs.run_path(runs_dir, name))
    return tails[key]


def _header(t: series.RunTail) -> None:
    h = series.header(t.status, t.steps)
    with st.container(border=True):
        cols = st.columns([2, 1, 1, 1, 1.3])
        cols[0].markdown(f"**{t.name}**  \n{fmt.state_badge(h.state)}")
        cols[1].metric("epoch", h.epoch)
        cols[2].metric("images/s", fmt.number(h.images_per_s, 1))
        cols[3].metric("ETA", fmt.duration(h.eta_s) if h.eta_s is not None else "—")
        cols[4].metric("since heartbeat", fmt.duration(h.heartbeat_age_s))
        st.progress(h.progress, text=h.progress_text)
        if t.status.get("error"):
            st.error(t.status["error"])


def _chart(fig, key: str, empty: str) -> None:
    if fig.data:
        st.plotly_chart(fig, key=key, config=CONFIG)
    else:
        st.caption(empty)


def _charts(tails: list) -> None:
    left, right = st.columns(2)
    with left:
        _chart(charts.loss_figure(tails, x_axis, smoothing, log_y, key="live_loss"), "live_loss",
               "Train loss: no step records yet.")
        _chart(charts.step_metric_figure(tails, ("lr",), "Learning rate", x_axis, log_y=log_y, key="live_lr",
                                         y_title="lr"), "live_lr", "Learning rate: no step records yet.")
        _chart(charts.epoch_metric_figure(tails, ("val_map50", "val_map50_95"), "Validation mAP", x_axis,
                                          log_y=log_y, key="live_map"), "live_map",
               "Validation mAP: no epoch finished yet.")
    with right:
        _chart(charts.step_metric_figure(tails, series.LOSS_PARTS, "Loss parts", x_axis, smoothing, log_y,
                                         key="live_parts", y_title="loss"), "live_parts",
               "Loss parts: no step records yet.")
        _chart(charts.step_metric_figure(tails, ("grad_norm",), "Gradient norm (before clipping)", x_axis,
                                         smoothing, log_y, key="live_grad"), "live_grad",
               "Gradient norm: no step records yet.")
        _chart(charts.epoch_metric_figure(tails, ("val_precision", "val_recall", "val_f1"),
                                          "Validation precision / recall / F1", x_axis, log_y=log_y,
                                          key="live_prf"), "live_prf", "Precision / recall / F1: no epoch finished yet.")


def _render(chosen: list[str]) -> None:
    tails = [_tail(n) for n in chosen]
    for t in tails:
        t.poll()
    for t in tails:
        _header(t)
    ui.safe(_charts, tails)
    for t in tails:
        with st.expander(f"train.log — {t.name}", expanded=len(tails) == 1):
            text = series.log_tail(t.run_dir / runs.LOG_FILE, max_lines=40)
            st.code(text or "(train.log is empty)", language=None, wrap_lines=True)
    alive_now = any(runs.effective_state(t.status) in runs.LIVE_STATES for t in tails)
    if st.session_state.get("_live_alive") and not alive_now:
        st.session_state["_live_alive"] = False
        st.rerun()  # the runs ended: a full rerun drops the timer


if not chosen:
    st.info("Pick one or more runs.")
    st.stop()
alive = any(runs.effective_state(runs.read_status(runs.run_path(runs_dir, n))) in runs.LIVE_STATES for n in chosen)
st.session_state["_live_alive"] = alive
if alive:
    st.caption("Refreshing every 3 s while a run is alive; zoom and pan are kept.")
st.fragment(_render, run_every="3s" if alive else None)(chosen)
