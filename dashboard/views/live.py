"""Live: curves of one or several runs, refreshed every few seconds while a run is alive."""
from __future__ import annotations

from typing import Optional

import streamlit as st

from dashboard import live_api, live_figures, ranks, series, settings, ui
from dashboard.live_panel import live_panel
from engine import runs

runs_dir = settings.runs_dir()
TAILS = "_live_tails"
FAST_S, SLOW_S = int(live_api.POLL_S), int(live_api.SLOW_POLL_S)  # header + loss, and everything else

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
ZOOM_REQUEST = "_live_zoom_request"  # a step range picked with box select on the loss chart
request = st.session_state.pop(ZOOM_REQUEST, None)
if request:
    st.session_state.update({"live_zoom": True, "live_zoom_from": request[0], "live_zoom_to": request[1]})
c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
with c1:
    x_axis = st.radio("x axis", series.X_AXES, horizontal=True, key="live_x")
with c2:
    smoothing = st.slider("Smoothing (EMA weight)", 0.0, 0.99, 0.6, 0.01, key="live_smooth",
                          help="0 shows the raw loss only")
with c3:
    log_y = st.toggle("log y", key="live_log")


def _cache() -> live_figures.LiveCache:
    """Run tails and figures shared by every session and by the live endpoint: five tabs on a run read
    and draw it once."""
    return live_api.shared_cache()


def _tail(name: str) -> series.RunTail:
    """One incremental reader per run, shared across sessions, so only new bytes are read."""
    tail = _cache().tail(runs.run_path(runs_dir, name))
    st.session_state.setdefault(TAILS, {})[str(tail.run_dir)] = tail
    return tail


def _zoom_to_latest() -> None:
    """Switching the zoom on starts at the newest 2,000 steps of the first run shown."""
    if not st.session_state.get("live_zoom"):
        return
    tails = [_tail(n) for n in st.session_state.get("live_runs") or []]
    last = max((int(t.buffer.column("step")[-1]) for t in tails if len(t.buffer)), default=0)
    st.session_state["live_zoom_from"] = max(0, last - 2000)
    st.session_state["live_zoom_to"] = 0


def _step_range() -> Optional[tuple]:
    """(first, last) step to re-read at full resolution, or None for the whole run (downsampled)."""
    r1, r2, r3 = st.columns([1.4, 1, 1], vertical_alignment="bottom")
    on = r1.toggle("Zoom to a step range (every record)", key="live_zoom", on_change=_zoom_to_latest,
                   help="Long runs are drawn as a min–max band and a mean per bucket of steps; a range re-reads "
                        "its steps from the file at full resolution.")
    if not on:
        return None
    first = r2.number_input("first step", min_value=0, step=100, key="live_zoom_from")
    last = r3.number_input("last step", min_value=0, step=100, key="live_zoom_to", help="0 = the newest step")
    return int(first), int(last) if last else 2**62


def _problems(t: series.RunTail) -> None:
    """What the live panel does not show: the run's error in full and its processes (multi-GPU runs)."""
    if t.status.get("error"):
        st.error(f"{t.name}: {t.status['error']}")
    _ranks(t, runs.effective_state(t.status))


def _ranks(t: series.RunTail, state: str) -> None:
    """Processes of a multi-process run: each rank's heartbeat, step, host and GPU memory; dead ranks first."""
    world = ranks.world_size(t.status)
    if world <= 1:
        return
    rows = ranks.rank_rows(t.run_dir, run_alive=state in runs.LIVE_STATES)
    bad = ranks.problem_ranks(rows)
    restarts = t.status.get("restart_count") or 0
    label = f"{world} processes" + (f", {restarts} restart(s)" if restarts else "")
    if bad:
        st.warning(f"{label}: rank {', '.join(map(str, bad))} not heard from (dead or silent)")
    with st.expander(label + (" — problem" if bad else ""), expanded=bool(bad)):
        st.dataframe(rows, hide_index=True, width="stretch")


def _panel(chosen: list[str], view: live_figures.View) -> None:
    """The header and the six charts: a component that polls the live endpoint (no rerun per refresh). A box
    drawn on the loss chart with the box-select tool re-reads its steps at full resolution."""
    shown = repr((chosen, view))
    token = st.session_state.get("_live_token")
    if st.session_state.get("_live_shown") != shown or token is None or not live_api.known(token):
        st.session_state["_live_token"] = live_api.register([runs.run_path(runs_dir, n) for n in chosen], view)
        st.session_state["_live_shown"] = shown
    box = live_panel(st.session_state["_live_token"], key="live_panel")
    if not box or st.session_state.get("_live_box_done") == box.get("n"):
        return
    st.session_state["_live_box_done"] = box.get("n")
    xs = box.get("x") or []
    picked = series.steps_in_x_range(_tail(chosen[0]), view.x_axis, xs[0], xs[-1]) if len(xs) >= 2 else None
    if picked:
        st.session_state[ZOOM_REQUEST] = picked
        st.rerun()


def _exports(t: series.RunTail) -> None:
    c1, c2, _ = st.columns([1, 1, 3])
    c1.download_button("Export full data: steps (CSV)", lambda: series.step_csv(t), f"{t.name}_steps.csv",
                       mime="text/csv", on_click="ignore", key=f"live_csv_steps_{t.name}", icon=":material/download:")
    c2.download_button("Epochs (CSV)", lambda: series.epoch_csv(t), f"{t.name}_epochs.csv",
                       mime="text/csv", on_click="ignore", key=f"live_csv_epochs_{t.name}", icon=":material/download:")


def _render_slow(chosen: list[str]) -> None:
    """Every SLOW_S while a run is alive: errors and processes, the exports and the train.log tail. Each
    rerun costs every open tab about 70 ms of browser CPU, so the charts are in the panel."""
    tails = [_tail(n) for n in chosen]
    for t in tails:
        t.poll()
    for t in tails:
        _problems(t)
    for t in tails:
        _exports(t)
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
    st.caption(f"Refreshing while a run is alive: the header and loss chart every {FAST_S} s, the other charts and "
               f"train.log every {SLOW_S} s; zoom and pan are kept. A hidden tab pauses until it is shown.")
view = live_figures.View(x_axis, round(float(smoothing), 4), bool(log_y), _step_range())
_panel(chosen, view)
st.fragment(_render_slow, run_every=f"{SLOW_S}s" if alive else None)(chosen)
