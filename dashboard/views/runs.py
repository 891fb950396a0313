"""Runs (home): every run with its state, Stop / Resume, and the New run form."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import formatting as fmt, new_run, runs_table, settings, ui
from dashboard.predict_view import available_checkpoints
from engine import launch, runs
from engine.config import ConfigError, load_config
from engine.errors import EngineError

runs_dir = settings.runs_dir()
checkpoints_dir = settings.checkpoints_dir()

st.title("Runs")
ui.show_flashes()


def _actions(rows: list) -> None:
    by_name = {r.name: r for r in rows}
    cols = st.columns([3, 1, 1, 1, 1], vertical_alignment="bottom")
    with cols[0]:
        name = ui.run_picker(list(by_name), "Run", key="runs_action_pick")
    row = by_name[name]
    with cols[1]:
        if st.button("Stop", icon=":material/stop:", disabled=not row.can_stop, width="stretch", key="btn_stop",
                     help="SIGTERM: the trainer finishes the step, saves last.pth and stops; a process still alive "
                          "30 s after the run stopped is killed"):
            try:
                launch.stop_run(name, runs_dir)
                ui.flash("success", f"Stop requested for {name}: it saves last.pth and stops.")
            except EngineError as exc:
                ui.flash("error", str(exc))
            st.rerun()
    with cols[2]:
        if st.button("Resume", icon=":material/play_arrow:", disabled=not row.can_resume, width="stretch", key="btn_resume",
                     help="continue from last.pth in the same run folder"):
            try:
                pid = launch.resume_run(name, runs_dir)
                ui.flash("success", f"Resuming {name} (pid {pid}).")
            except EngineError as exc:
                ui.flash("error", str(exc))
            st.rerun()
    with cols[3]:
        if st.button("Live", icon=":material/monitoring:", width="stretch", key="btn_open_live"):
            st.switch_page("views/live.py")
    with cols[4]:
        if st.button("Results", icon=":material/emoji_events:", width="stretch", key="btn_open_results"):
            st.switch_page("views/results.py")
    status = row.status
    epoch = f" · epoch {row.epoch or 0}/{row.epochs}" if row.epochs else ""
    best = f" · best mAP@0.5 {row.best_map50:.3f}" if row.best_map50 is not None else ""
    st.markdown(f"**{name}** — {fmt.state_badge(row.state)}{epoch}{best}")
    if status.get("error") and row.state in ("failed", "crashed", "stopped"):
        st.error(f"{name}: {status['error']}")
    elif row.state == "crashed":
        st.error(f"{name}: the process {status.get('pid')} is gone but the status says "
                 f"{status.get('state')} (killed or crashed). Resume continues from last.pth.")
    elif row.state == "stalled":
        st.warning(f"{name}: no heartbeat for a while (host {status.get('host')}).")
    elif status.get("message"):  # a completed run's says how it ended (epochs, early stopping, time limit)
        st.caption(f"{name}: {status['message']}")


def _table() -> None:
    rows = runs_table.build_rows(runs_dir)
    if not rows:
        st.info(f"No runs yet in `{runs_dir}`. Start one with the form below, or from a shell: "
                "`python -m engine train --config configs/demo_cpu.yaml`.")
        return
    df = pd.DataFrame(runs_table.table_records(rows))
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "best mAP@0.5": st.column_config.NumberColumn(format="%.3f"),
    })
    _actions(rows)
    if st.session_state.get("_runs_alive") and runs_table.poll_interval(rows) is None:
        st.session_state["_runs_alive"] = False
        st.rerun()  # full rerun: the last live run ended, stop polling


poll = runs_table.poll_interval(runs_table.build_rows(runs_dir))
st.session_state["_runs_alive"] = poll is not None
st.fragment(_table, run_every=poll)()


# ----------------------------------------------------------------------------- new run form
def _dataset_check(root: Path, cfg) -> str | None:
    """The dataset's split counts as one line, or None after showing the one-line error."""
    if not root.exists() and cfg.data.generate_if_missing:
        return f"{root} does not exist yet: the trainer generates the synthetic dataset there."
    try:
        from engine.data import check_dataset_root
    except ImportError as exc:
        return f"not checked here ({exc}); the trainer checks it."
    try:
        counts = check_dataset_root(root)
    except EngineError as exc:
        st.error(f"Dataset: {exc}")
        return None
    summary = ", ".join(f"{split} {s.get('images', '?')} images / {s.get('boxes', '?')} boxes"
                        for split, s in counts.items() if isinstance(s, dict))
    return f"{root}: {summary}"


def _new_run_form() -> None:
    configs = new_run.list_configs(settings.configs_dir())
    if not configs:
        st.warning(f"No training configs (*.yaml) in {settings.configs_dir()}.")
        return
    cfg_path = st.selectbox("Config", configs, format_func=lambda p: p.name, key="nr_config",
                            help=f"YAML files in {settings.configs_dir()}; {settings.DEMO_CONFIG} is the CPU demo")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as exc:
        st.error(str(exc))
        return
    defaults = new_run.form_defaults(cfg)
    if st.session_state.get("_nr_name_for") != cfg_path.name or st.session_state.pop("_nr_reset_name", False):
        st.session_state["nr_name"] = new_run.default_run_name(cfg_path)
        st.session_state["_nr_name_for"] = cfg_path.name
    k = cfg_path.stem
    ckpts = [available_checkpoints(checkpoints_dir, n).get("best") for n in runs.list_run_names(runs_dir)]
    weights = new_run.weight_choices(defaults.weights, [p for p in ckpts if p])
    with st.form("new_run_form", border=True):
        c1, c2, c3 = st.columns(3)
        with c1:
            data_root = st.text_input("Dataset root", value=defaults.data_root, key=f"nr_root_{k}",
                                      help="Roboflow COCO export: <root>/{train,valid,test}/_annotations.coco.json")
            models = new_run.model_choices(defaults.model)
            model = st.selectbox("Model", models, index=models.index(defaults.model), key=f"nr_model_{k}")
            weight = st.selectbox("Weights", weights, index=weights.index(defaults.weights), key=f"nr_weights_{k}",
                                  help="coco: torchvision COCO weights (needs the file in TORCH_HOME); "
                                       "none: random init; a best.pth: fine-tune from that run")
        with c2:
            epochs = st.number_input("Epochs", 1, 10000, int(defaults.epochs), key=f"nr_epochs_{k}")
            limit = st.number_input("Time limit (min)", 0.0, 1e6, float(defaults.time_limit_min), step=5.0,
                                    format="%g", key=f"nr_limit_{k}",
                                    help="0: none. Training + validation stop at the last epoch that fits; the LR "
                                         "schedule is refit after every epoch to end there (the test evaluation is "
                                         "extra)")
            batch = st.number_input("Batch size", 1, 1024, int(defaults.batch_size), key=f"nr_batch_{k}")
            lr = st.number_input("Learning rate", 1e-7, 10.0, float(defaults.lr), format="%.6f", step=0.0005,
                                 key=f"nr_lr_{k}")
        with c3:
            size = st.number_input("Image size (shorter side, px)", 32, 4096, int(defaults.image_size), step=32,
                                   key=f"nr_size_{k}", help="sets input.train_sizes=[size] and input.test_size=size")
            device_options = list(dict.fromkeys([defaults.device, *new_run.DEVICES]))
            device = st.selectbox("Device", device_options, key=f"nr_device_{k}")
            nproc = st.number_input("Processes (GPUs) per run", 1, 1024, new_run.default_processes(),
                                    key=f"nr_nproc_{k}", help="> 1 trains with torchrun (DDP), one process per GPU; "
                                                              "the batch size is split over them")
            name = st.text_input("Run name", key="nr_name", help="letters, digits, '-', '_', '.'; must be new")
        submitted = st.form_submit_button("Start run", icon=":material/play_arrow:", type="primary")
    if not submitted:
        return
    name = (name or "").strip()
    if name and name == st.session_state.get("_last_launched"):
        st.info(f"Run {name} is already started (a second click does not start another).")
        return
    chosen = new_run.FormValues(data_root=data_root.strip(), model=model, weights=weight, epochs=int(epochs),
                                batch_size=int(batch), lr=float(lr), image_size=int(size), device=device, name=name,
                                time_limit_min=float(limit))
    _launch(cfg_path, defaults, chosen, int(nproc))


def _launch(cfg_path, defaults: new_run.FormValues, chosen: new_run.FormValues, nproc: int) -> None:
    """Check the form's values and the dataset, then start the run detached (or show one error line)."""
    name, device = chosen.name, chosen.device
    try:
        name = new_run.check_name(name, runs_dir)
        new_run.check_processes(nproc, chosen.batch_size)
        overrides = new_run.build_overrides(defaults, chosen)
        cfg_run = new_run.validate_launch(cfg_path, overrides)
    except ConfigError as exc:
        st.error(str(exc))
        return
    if not chosen.data_root:
        st.error("Dataset root is empty.")
        return
    root = settings.resolve_project_path(chosen.data_root)
    checked = _dataset_check(root, cfg_run)
    if checked is None:
        return
    try:
        pid = launch.start_run(
            cfg_path, name, overrides,
            data_root=root if chosen.data_root != defaults.data_root else None,
            device=device if device != defaults.device else None,
            runs_dir=runs_dir, checkpoints_dir=checkpoints_dir, nproc=nproc)
    except EngineError as exc:
        st.error(str(exc))
        return
    st.session_state["_last_launched"] = name
    st.session_state[ui.SELECTED] = name
    st.session_state["_nr_reset_name"] = True
    ui.flash("success", f"Started {name} (pid {pid}). It shows as queued, then running.  \nDataset {checked}")
    st.rerun()


st.subheader("New run")
ui.safe(_new_run_form)
