"""Results: one run's metrics against the targets, test evaluation, curves, samples, probes,
baselines, checkpoints, log excerpt, a comparison with another run, and the report download."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import charts, formatting as fmt, jobs, results_data as rd, series, settings, ui
from engine import launch, runs
from engine.errors import EngineError

runs_dir = settings.runs_dir()
checkpoints_dir = settings.checkpoints_dir()
PLOT_CONFIG = {"displaylogo": False}

st.title("Results")
ui.show_flashes()
names = runs.list_run_names(runs_dir)
if not names:
    st.info(f"No runs yet in `{runs_dir}`. Start one on the Runs page.")
    st.stop()

c1, c2 = st.columns(2)
with c1:
    run = ui.run_picker(names, key="results_run")
with c2:
    others = [n for n in names if n != run]
    compare = st.selectbox("Compare with", ["—", *others], key="results_compare")
compare = None if compare == "—" else compare
run_dir = runs.run_path(runs_dir, run)
status = runs.read_status(run_dir) or {}
state = runs.effective_state(status) if status else "unknown"
steps, epochs = runs.read_metrics(run_dir)
val = rd.summary(epochs)
test_metrics = rd.read_test_metrics(run_dir)
test = rd.test_summary(test_metrics) if test_metrics else None


def _metric_row(values: dict, prefix: str):
    """Five metrics with met/missed against the targets; returns the sixth (free) column."""
    cols = st.columns(6)
    for col, (key, label) in zip(cols, (("map50", "mAP@0.5"), ("precision", "precision"), ("recall", "recall"),
                                        ("f1", "F1"), ("map50_95", "mAP@0.5:0.95"))):
        target = rd.TARGETS.get(key)
        value = values.get(key)
        delta = None
        if target is not None and value is not None:
            delta = f"{'met' if rd.met(value, target) else 'missed'} (> {target:.2f})"
        col.metric(f"{prefix} {label}", fmt.number(value), delta,
                   delta_color="normal" if delta and delta.startswith("met") else "inverse", delta_arrow="off")
    return cols[5]


def _targets_table(values: dict) -> None:
    rows = rd.target_rows(values)
    df = pd.DataFrame(rows)
    colors = {"met": "color: #1a7f37; font-weight: 600", "missed": "color: #cf222e; font-weight: 600"}
    styled = df.style.map(lambda v: colors.get(v, "color: #6e7781"), subset=["result"])
    st.dataframe(styled, hide_index=True, column_config={"value": st.column_config.NumberColumn(format="%.4f")})


def _validation() -> None:
    st.subheader("Validation (best epoch)")
    st.caption(f"state {fmt.state_badge(state)} · targets from the results template: "
               "mAP@0.5 > 0.85, precision > 0.90, recall > 0.80")
    if not epochs:
        st.info("No finished epoch yet: metrics appear after the first validation.")
        return
    last = _metric_row(val, "val")
    last.metric("best epoch", f"{val['best_epoch']} / {val['total_epochs']}")
    _targets_table(val)


def _evaluation_progress() -> None:
    pid = launch.evaluate_pid(run, runs_dir)
    log = rd.test_dir(run_dir) / runs.EVALUATE_LOG
    if pid:
        st.info(f"Evaluating on the test set (pid {pid}) ...")
        st.code(series.log_tail(log, max_lines=8) or "(starting)", language=None, wrap_lines=True)
    elif st.session_state.get("_eval_running"):
        st.session_state["_eval_running"] = False
        st.rerun()
    elif log.is_file() and not test_metrics:
        st.error("The last evaluation ended without metrics.json; its log:")
        st.code(series.log_tail(log, max_lines=12), language=None, wrap_lines=True)


def _test() -> None:
    st.subheader("Test set")
    best_ckpt = runs.checkpoint_path(checkpoints_dir, run, "best")
    running = launch.evaluate_pid(run, runs_dir) is not None
    if test:
        cols = _metric_row(test, "test")
        cols.metric("ms / image", fmt.number(test["ms_per_image"], 1),
                    f"{test['fps']:.1f} FPS" if test.get("fps") else None, delta_color="off",
                    delta_arrow="off")
        details = [f"{test['images']} images" if test.get("images") else None,
                   f"device {test['device']}" if test.get("device") else None,
                   f"{rd.params_text(test['params'])} parameters" if test.get("params") else None]
        st.caption(" · ".join(d for d in details if d))
    else:
        st.info("No test results yet (runs/<run>/test/metrics.json).")
    label = "Re-evaluate on the test set" if test else "Evaluate best.pth on the test set"
    if st.button(label, icon=":material/science:", disabled=running or not best_ckpt.is_file(), key="btn_evaluate",
                 help=f"python -m engine evaluate --checkpoint {best_ckpt} (in the background)"):
        try:
            pid = launch.start_evaluate(run, runs_dir, checkpoints_dir)
            ui.flash("success", f"Evaluation started (pid {pid}); results appear here when it ends.")
        except EngineError as exc:
            ui.flash("error", str(exc))
        st.rerun()
    if not best_ckpt.is_file():
        st.caption(f"{best_ckpt} does not exist yet.")
    st.session_state["_eval_running"] = running
    st.fragment(_evaluation_progress, run_every="3s" if running else None)()

    pr = rd.read_curve(run_dir, rd.PR_CURVE_FILE)
    prf = rd.read_curve(run_dir, rd.PRF_FILE)
    if pr or prf:
        left, right = st.columns(2)
        if pr:
            curves = [(run, pr)]
            other = rd.read_curve(runs.run_path(runs_dir, compare), rd.PR_CURVE_FILE) if compare else None
            if other:
                curves.append((compare, other))
            left.plotly_chart(charts.pr_figure(curves, key="res_pr"), key="res_pr", config=PLOT_CONFIG)
            if not any((c.get("recall") or [0])[-1] for _, c in curves):
                left.caption("No detection matched a plate at IoU 0.5, so the curve stays at recall 0.")
        if prf:
            right.plotly_chart(charts.prf_confidence_figure(prf, rd.thresholds(test_metrics), key="res_prf"),
                               key="res_prf", config=PLOT_CONFIG)


def _job_panel() -> None:
    """Each job's state, one-line error and log tail; polls only while a job is alive."""
    views = [jobs.view(run_dir, kind) for kind in jobs.KINDS]
    for v in views:
        if v.state == "none":
            continue
        show = {"running": st.info, "done": st.success, "failed": st.error}[v.state]
        show(v.headline + (f"\n\n**Error:** {v.error}" if v.error else ""))
        if v.log:
            st.code(v.log, language=None, wrap_lines=True)
    was_running = st.session_state.get("_jobs_running", False)
    st.session_state["_jobs_running"] = any(v.running for v in views)
    if was_running and not st.session_state["_jobs_running"]:
        st.rerun()  # a job ended: redraw the whole page (bench table, exports, buttons)


def _start_job(kind: str, **options) -> None:
    """Start the job; the outcome is shown once beside the buttons (a refusal as one line)."""
    try:
        pid = jobs.start(kind, run, runs_dir, checkpoints_dir, **options)
        st.session_state["_job_message"] = ("success", f"{kind} started in the background (pid {pid}); "
                                                       "its output appears below.")
    except EngineError as exc:
        st.session_state["_job_message"] = ("error", str(exc))
    st.rerun()


def _deploy() -> None:
    st.subheader("Export and inference benchmark")
    best_ckpt = runs.checkpoint_path(checkpoints_dir, run, "best")
    st.caption(f"Runs `python -m engine export` / `python -m engine bench` on `{best_ckpt}` in the background.")
    c1, c2 = st.columns(2)
    with c1:
        size = st.number_input("Export input size (px, 0 = the run's test size)", 0, 4096, 0, 32, key="export_size")
        if st.button("Export to ONNX", icon=":material/output:", key="btn_export", disabled=not best_ckpt.is_file()):
            _start_job(jobs.EXPORT, size=int(size) or None)
    with c2:
        sizes = st.multiselect("Benchmark input sizes", jobs.BENCH_SIZES, default=list(jobs.BENCH_SIZES),
                               key="bench_sizes")
        repeats = st.number_input("Timed calls per measurement", 1, 1000, jobs.DEFAULT_REPEATS, key="bench_repeats")
        if st.button("Benchmark inference", icon=":material/speed:", key="btn_bench", disabled=not best_ckpt.is_file()):
            _start_job(jobs.BENCH, sizes=sizes, repeats=int(repeats))
    if not best_ckpt.is_file():
        st.caption(f"{best_ckpt} does not exist yet.")
    kind, text = st.session_state.pop("_job_message", (None, None))
    if text:
        getattr(st, kind)(text)
    views = [jobs.view(run_dir, kind) for kind in jobs.KINDS]
    st.session_state["_jobs_running"] = any(v.running for v in views)
    st.fragment(_job_panel, run_every=jobs.refresh_every(views))()
    exported = jobs.exports(checkpoints_dir, run)
    if exported:
        st.markdown("**Exported models**")
        st.dataframe(pd.DataFrame(exported), hide_index=True)
    bench = jobs.bench(run_dir)
    if bench:
        rows, caption = bench
        st.markdown("**Last inference benchmark** (batch-1 latency, images/s at the best batch size)")
        frame = pd.DataFrame(rows)
        if not frame["note"].astype(bool).any():
            frame = frame.drop(columns="note")
        st.dataframe(frame, hide_index=True, column_config={
            **{c: st.column_config.NumberColumn(format="%.1f") for c in (
                "batch-1 median ms", "batch-1 p90 ms", "FPS (batch 1)", "images/s (best batch)")},
            "vs PyTorch fp32 CPU": st.column_config.NumberColumn(format="%.2fx")})
        st.caption(caption)
    else:
        st.caption(f"No benchmark yet ({runs.BENCH_FILE} in the run folder).")


def _epochs() -> None:
    st.subheader("Per epoch")
    if not epochs:
        st.caption("No epoch records yet.")
        return
    st.dataframe(pd.DataFrame(rd.epoch_table(epochs)), hide_index=True, column_config={
        k: st.column_config.NumberColumn(format="%.4f")
        for k in ("train loss", "val mAP@0.5", "val mAP@0.5:0.95", "precision", "recall", "F1")} | {
        "LR": st.column_config.NumberColumn(format="%.2e"), "time (s)": st.column_config.NumberColumn(format="%.1f")})


def _grid(items: list[tuple[Path, str]], per_row: int = 4) -> None:
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, (path, caption) in zip(cols, items[start:start + per_row]):
            col.image(str(path), caption=caption, width="stretch")


def _samples() -> None:
    groups = rd.samples(run_dir)
    if not groups:
        return
    st.subheader("Sample predictions (test set)")
    st.caption("Ground truth in green, predictions in orange with their score.")
    for group, title in (("good", "Good predictions"), ("challenging", "Challenging cases")):
        items = [(i["path"], rd.sample_caption(i)) for i in groups.get(group, []) if i.get("path")]
        if items:
            st.markdown(f"**{title}**")
            _grid(items)


def _probes() -> None:
    epochs_with_probes = rd.probe_epochs(run_dir)
    if not epochs_with_probes:
        return
    st.subheader("Probe images per epoch")
    if len(epochs_with_probes) > 1:
        epoch = st.select_slider("Epoch", epochs_with_probes, value=epochs_with_probes[-1], key="probe_epoch")
    else:
        epoch = epochs_with_probes[0]
        st.caption(f"epoch {epoch}")
    _grid(rd.probe_images(run_dir, epoch))


def _baselines() -> None:
    st.subheader("Baseline comparison")
    cfg_model = (runs.read_config(run_dir).get("model") or {}).get("name") or "model"
    if test:
        ours = {"map50": test["map50"], "params": test["params"], "fps": test["fps"],
                "source": f"measured: test set, {test.get('device') or 'device ?'}"}
    else:
        ours = {"map50": val["map50"], "params": None, "fps": None,
                "source": "best validation mAP (no test evaluation yet)"}
    baselines = rd.load_baselines(settings.baselines_file())
    rows = rd.baseline_table(cfg_model, ours, baselines, rd.read_bench(run_dir))
    st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
        "mAP@0.5": st.column_config.NumberColumn(format="%.3f")})
    st.caption("FPS at batch 1. Rows marked measured were measured on the named device; the other rows are "
               "quoted references, not measured here.")
    if not baselines:
        st.caption(f"No reference rows: {settings.baselines_file()} is missing or empty.")


def _checkpoints() -> None:
    st.subheader("Checkpoints")
    rows = rd.checkpoint_rows(checkpoints_dir / run, status)
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True)
    else:
        st.caption(f"No checkpoints in {checkpoints_dir / run}.")


def _log() -> None:
    st.subheader("Training log excerpt")
    text = rd.log_excerpt(run_dir / runs.LOG_FILE)
    st.code(text or "(train.log is empty or missing)", language=None, wrap_lines=True)


def _compare() -> None:
    if not compare:
        return
    st.subheader(f"Comparison: A = {run}, B = {compare}")
    other_dir = runs.run_path(runs_dir, compare)
    _, other_epochs = runs.read_metrics(other_dir)
    rows = rd.deltas(val, rd.summary(other_epochs))
    other_test = rd.read_test_metrics(other_dir)
    if test or other_test:
        rows += rd.deltas(test or {}, rd.test_summary(other_test) if other_test else {}, rd.TEST_COMPARE_KEYS)
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
            c: st.column_config.NumberColumn(format="%+.4f" if c.startswith("delta") else "%.4f")
            for c in ("A", "B", "delta (B − A)")})
    else:
        st.caption("Neither run has metrics yet.")
    if not rd.read_curve(runs.run_path(runs_dir, compare), rd.PR_CURVE_FILE):
        st.caption(f"{compare} has no PR curve (no test evaluation).")


def _report() -> None:
    st.subheader("Results report")
    built = st.session_state.get("_report", {}).get(run)
    if st.button("Build RESULTS.md", icon=":material/description:", key="btn_report"):
        try:
            built = rd.build_report(run, runs_dir, checkpoints_dir, run_dir / runs.REPORT_DIR)
            st.session_state.setdefault("_report", {})[run] = built
        except EngineError as exc:
            st.error(str(exc))
    if built:
        c1, c2 = st.columns(2)
        c1.download_button(runs.REPORT_FILE, built.markdown, icon=":material/download:", file_name=runs.REPORT_FILE, mime="text/markdown",
                           on_click="ignore", key="dl_report_md")
        c2.download_button("RESULTS.zip (with images)", built.zip_bytes, icon=":material/download:", file_name=f"RESULTS-{run}.zip",
                           mime="application/zip", on_click="ignore", key="dl_report_zip")
        with st.expander("Preview"):
            st.markdown(built.markdown)


for section in (_validation, _test, _compare, _epochs, _samples, _probes, _deploy, _baselines, _checkpoints, _log,
                _report):
    ui.safe(section)
