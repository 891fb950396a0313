"""AppTest runs of every page against fixture run folders (no browser)."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from engine import launch, runs
from engine.config import load_config
from tests.dashboard.conftest import app_test
from tests.dashboard.fixtures import (make_run, write_fake_checkpoints, write_real_checkpoint)

PAGES = [None, "views/live.py", "views/results.py", "views/dataset.py", "views/predict.py"]


def _texts(at, kind: str) -> list[str]:
    return [str(e.value) for e in getattr(at, kind)]


def _all_text(at) -> str:
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success", "code"):
        parts += _texts(at, kind)
    parts += [f"{m.label}={m.value}" for m in at.metric]
    return "\n".join(parts)


@pytest.fixture
def all_states(dash_env):
    r = dash_env["runs"]
    make_run(r, "done", with_test=True, with_probes=True)
    make_run(r, "other", epochs_done=2, epochs=2, with_test=True)
    make_run(r, "bad", state="failed", epochs_done=1, error="DatasetError: /x/train/_annotations.coco.json: missing")
    make_run(r, "dead", state="crashed", epochs_done=1)
    make_run(r, "half", state="running", epochs_done=1, epochs=5, half_written_last_line=True)
    write_fake_checkpoints(dash_env["checkpoints"], "done")
    return dash_env


# ----------------------------------------------------------------------------- every page, every folder
def test_every_page_with_an_empty_runs_folder(dash_env):
    for page in PAGES:
        at = app_test(page)
        assert not at.exception, (page, at.exception)
        if page != "views/dataset.py":
            assert any("No runs yet" in t or "No checkpoints yet" in t for t in _texts(at, "info")), page
    at = app_test("views/dataset.py")  # the dataset page still reads a dataset folder
    assert at.dataframe and at.dataframe[0].value["images"].tolist() == [264, 75, 39]


def test_every_page_with_all_run_states(all_states):
    for page in PAGES:
        at = app_test(page)
        assert not at.exception, (page, at.exception)
        assert at.title, page


# ----------------------------------------------------------------------------- runs
def _fragment_intervals(monkeypatch) -> list:
    """Record the run_every of every st.fragment the page creates."""
    import streamlit as st

    seen, real = [], st.fragment

    def fragment(func=None, *, run_every=None):
        seen.append(run_every)
        return real(func, run_every=run_every)

    monkeypatch.setattr(st, "fragment", fragment)
    return seen


def test_runs_page_polls_only_while_a_run_is_alive(dash_env, monkeypatch):
    seen = _fragment_intervals(monkeypatch)
    make_run(dash_env["runs"], "done")
    make_run(dash_env["runs"], "dead", state="crashed")
    assert not app_test().exception
    assert seen and set(seen) == {None}
    seen.clear()
    make_run(dash_env["runs"], "live", state="running")
    assert not app_test().exception
    assert seen and set(seen) == {"3s"}


def test_runs_table_shows_every_state_and_derived_ones(all_states):
    at = app_test()
    df = at.dataframe[0].value
    states = dict(zip(df["run"], df["state"]))
    assert states == {
        "done": "completed", "other": "completed", "bad": "failed", "dead": "crashed", "half": "running"}
    row = df.set_index("run").loc["done"]
    assert row["epoch"] == "3/3" and row["best mAP@0.5"] == pytest.approx(0.9) and row["device"] == "CPU (2 threads)"
    assert df.set_index("run").loc["half", "ETA"] != "—"


@pytest.mark.parametrize("name,stop,resume", [("done", False, False), ("half", True, False),
                                              ("dead", False, True), ("bad", False, True)])
def test_stop_and_resume_buttons_follow_the_state(all_states, name, stop, resume):
    at = app_test()
    at.selectbox(key="runs_action_pick").set_value(name).run()
    assert at.button(key="btn_stop").disabled is (not stop)
    assert at.button(key="btn_resume").disabled is (not resume)
    if name == "bad":
        assert any("DatasetError" in t for t in _texts(at, "error"))
    if name == "dead":
        assert any("is gone" in t for t in _texts(at, "error"))


def test_stop_button_sends_sigterm_to_the_run(dash_env):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        make_run(dash_env["runs"], "sleeper", state="running", pid=proc.pid)
        at = app_test()
        at.selectbox(key="runs_action_pick").set_value("sleeper").run()
        at.button(key="btn_stop").click().run()
        assert not at.exception
        assert any("Stop requested for sleeper" in t for t in _texts(at, "success")), _all_text(at)  # what it said
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_new_run_form_preselects_the_demo_config(dash_env):
    at = app_test()
    assert at.selectbox(key="nr_config").value.name == "demo_cpu.yaml"
    assert at.text_input(key="nr_name").value.startswith("demo_cpu-")
    assert at.text_input(key="nr_root_demo_cpu").value == "data/synthetic"
    assert at.selectbox(key="nr_model_demo_cpu").value == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert at.selectbox(key="nr_weights_demo_cpu").value == "none"
    demo = load_config(dash_env["configs"] / "demo_cpu.yaml")
    assert at.number_input(key="nr_epochs_demo_cpu").value == demo.train.epochs
    assert at.number_input(key="nr_size_demo_cpu").value == demo.input.test_size
    assert at.number_input(key="nr_limit_demo_cpu").value == 0.0  # no time limit unless asked


def _submit(at):
    """Click the New run form's submit button."""
    return at.get("form_submit_button")[0].click().run()


def test_new_run_form_rejects_bad_name_taken_name_and_bad_dataset(all_states, tmp_path):
    at = app_test()
    at.text_input(key="nr_name").set_value("bad name!")
    _submit(at)
    assert any("letters, digits" in t for t in _texts(at, "error"))
    at.text_input(key="nr_name").set_value("done")
    _submit(at)
    assert any("already used" in t for t in _texts(at, "error"))
    at.text_input(key="nr_name").set_value("fresh")
    broken = tmp_path / "broken"
    for split in ("train", "valid", "test"):
        (broken / split).mkdir(parents=True)
        (broken / split / "_annotations.coco.json").write_text('{"images": [')
    at.text_input(key="nr_root_demo_cpu").set_value(str(broken))
    _submit(at)
    errors = _texts(at, "error")
    assert any(t.startswith("Dataset:") and "broken" in t for t in errors), errors
    assert not (all_states["runs"] / "fresh").exists()
    assert not at.exception


def test_new_run_form_launches_a_detached_run_once(dash_env, plates_real, tmp_path):
    cfg = dash_env["configs"] / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"root": str(plates_real), "train_limit": 2, "valid_limit": 2, "num_workers": 0},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [64], "test_size": 64, "max_size": 128},
        "train": {"epochs": 1, "batch_size": 2, "device": "cpu"}, "eval": {"probe_images": 0}}))
    at = app_test()
    at.selectbox(key="nr_config").set_value(cfg).run()
    at.text_input(key="nr_name").set_value("from-form")
    at.number_input(key="nr_limit_tiny").set_value(45.0)
    run_dir = dash_env["runs"] / "from-form"
    try:
        _submit(at)
        _check_launched(at, run_dir)
    finally:
        for name in runs.list_run_names(dash_env["runs"]):
            pid = (runs.read_status(dash_env["runs"] / name) or {}).get("pid")
            if runs.pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
    assert runs.list_run_names(dash_env["runs"]) == ["from-form"]


def _check_launched(at, run_dir):
    assert not at.exception
    assert any("Started from-form" in t for t in _texts(at, "success")), _all_text(at)
    assert any("train 264 images" in t for t in _texts(at, "success"))
    status = runs.read_status(run_dir)
    assert status["state"] in ("queued", "running") and status["pid"]
    df = at.dataframe[0].value
    assert "from-form" in df["run"].tolist()
    # a double click sends the same form values again: nothing new starts
    assert at.text_input(key="nr_name").value != "from-form"  # the form offers a fresh name
    at.text_input(key="nr_name").set_value("from-form")
    _submit(at)
    assert any("already started" in t for t in _texts(at, "info"))
    # the detached trainer takes over (running), then stops cleanly on SIGTERM
    end = time.time() + 120
    while time.time() < end and (runs.read_status(run_dir) or {}).get("state") == "queued":
        time.sleep(0.5)
    assert runs.read_status(run_dir)["state"] in ("running", "completed"), runs.tail_text(run_dir / runs.LOG_FILE)
    assert yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text())["train"]["time_limit_min"] == 45.0
    if runs.read_status(run_dir)["state"] == "running":
        launch.stop_run("from-form", run_dir.parent)
    end = time.time() + 180
    while time.time() < end and runs.effective_state(runs.read_status(run_dir)) in runs.LIVE_STATES:
        time.sleep(0.5)
    assert runs.read_status(run_dir)["state"] in ("stopped", "completed"), runs.tail_text(run_dir / runs.LOG_FILE)


# ----------------------------------------------------------------------------- live
def _panel(at) -> dict:
    """What the Live page's panel component shows: the endpoint's answer for the token the page minted."""
    from dashboard import live_api

    assert len(at.get("component_instance")) == 1
    return json.loads(live_api.payload(at.session_state["_live_token"]))


def test_live_page_running_run_with_half_written_line(all_states):
    from dashboard import live_api

    at = app_test("views/live.py")
    at.multiselect(key="live_runs").set_value(["half"]).run()
    assert not at.exception
    body = _panel(at)
    (row,) = body["header"]
    assert row["epoch"] == "1/5" and row["images_per_s"] == "3.2" and row["state"] == "running"
    assert body["alive"] and 0 < row["progress"] < 1
    assert [k for k, v in body["figures"].items() if v] == list(live_api.PANEL_FIGURES)
    assert not at.get("plotly_chart")  # every chart is in the panel
    assert any("Starting Training: half" in t for t in _texts(at, "code"))
    assert any(t.startswith("Refreshing while a run is alive: the header and loss chart every 3 s") for t in _texts(at, "caption"))
    tails = at.session_state["_live_tails"]
    [tail] = tails.values()
    assert list(tail.buffer.column("step")) == [1, 2, 3, 4]  # the half line is not read


def test_live_page_overlays_several_runs_and_stops_polling_for_ended_runs(all_states):
    at = app_test("views/live.py")
    at.multiselect(key="live_runs").set_value(["done", "other"]).run()
    at.radio(key="live_x").set_value("wall time").run()
    at.toggle(key="live_log").set_value(True).run()
    assert not at.exception
    body = _panel(at)
    assert [r["name"] for r in body["header"]] == ["done", "other"] and not body["alive"]
    assert not any("Refreshing" in t for t in _texts(at, "caption"))


def test_live_page_zoom_rereads_a_step_range_and_offers_the_full_data(all_states):
    at = app_test("views/live.py")
    at.multiselect(key="live_runs").set_value(["done"]).run()
    at.toggle(key="live_zoom").set_value(True).run()
    assert not at.exception
    assert at.number_input(key="live_zoom_from").value == 0 and at.number_input(key="live_zoom_to").value == 0
    at.number_input(key="live_zoom_from").set_value(3).run()
    at.number_input(key="live_zoom_to").set_value(6).run()
    assert not at.exception and not at.get("plotly_chart")
    loss = _panel(at)["figures"]["live_loss"]["figure"]
    xs = loss["data"][0]["x"]  # plotly sends numpy arrays as base64 typed arrays
    xs = np.frombuffer(base64.b64decode(xs["bdata"]), dtype=xs["dtype"]) if isinstance(xs, dict) else xs
    assert list(xs) == [3, 4, 5, 6]  # the four steps of the range, every record
    labels = [b.label for b in at.get("download_button")]
    assert labels[:2] == ["Export full data: steps (CSV)", "Epochs (CSV)"]


def test_live_page_crashed_and_failed_runs(all_states):
    at = app_test("views/live.py")
    at.multiselect(key="live_runs").set_value(["dead", "bad"]).run()
    assert not at.exception
    assert [r["state"] for r in _panel(at)["header"]] == ["crashed", "failed"]
    assert "DatasetError" in _all_text(at)


# ----------------------------------------------------------------------------- results
def test_results_page_completed_run(all_states):
    at = app_test("views/results.py")
    at.selectbox(key="results_run").set_value("done").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["val mAP@0.5"] == "0.900" and metrics["best epoch"] == "3 / 3"
    test = runs.read_json(all_states["runs"] / "done" / runs.TEST_DIR / runs.TEST_METRICS_FILE)
    assert metrics["test mAP@0.5"] == f"{test['map50']:.3f}" and metrics["ms / image"] == "85.0"
    deltas = {m.label: m.delta for m in at.metric}
    assert deltas["val mAP@0.5"].startswith("met") and deltas["test mAP@0.5"].startswith("missed")
    frames = [d.value for d in at.dataframe]
    targets = frames[0]
    assert targets["result"].tolist() == ["met", "met", "met"]
    assert len(at.get("plotly_chart")) == 2  # PR curve + P/R/F1 vs confidence
    assert at.select_slider(key="probe_epoch").value == 3
    assert len(at.image) >= 1
    baseline = next(f for f in frames if "model" in f.columns)
    assert baseline["model"].tolist()[1:] == ["YOLOv5s", "FasterRCNN-ResNet50"]
    assert baseline["FPS"].tolist()[0] == pytest.approx(11.4)
    ckpt = next(f for f in frames if "size MB" in f.columns)
    assert ckpt["size MB"].tolist() == [2.0, 3.0]
    assert any("Starting Training: done" in t for t in _texts(at, "code"))


def test_results_page_compare_and_report(all_states):
    at = app_test("views/results.py")
    at.selectbox(key="results_run").set_value("done").run()
    at.selectbox(key="results_compare").set_value("other").run()
    assert not at.exception
    frames = [d.value for d in at.dataframe]
    delta = next(f for f in frames if "delta (B − A)" in f.columns).set_index("metric")
    assert delta.loc["val mAP@0.5", "delta (B − A)"] == pytest.approx(0.7 - 0.9)
    assert delta.loc["test mAP@0.5", "delta (B − A)"] == pytest.approx(0.0)
    pr = at.get("plotly_chart")[0]
    assert pr.proto.spec.count('"name"') >= 2 or "other" in pr.proto.spec
    at.button(key="btn_report").click().run()
    assert not at.exception
    labels = [b.label for b in at.get("download_button")]
    assert "RESULTS.md" in labels and "RESULTS.zip (with images)" in labels


def test_results_page_without_test_results_offers_evaluation(all_states):
    at = app_test("views/results.py")
    at.selectbox(key="results_run").set_value("bad").run()
    assert not at.exception
    assert any("No test results yet" in t for t in _texts(at, "info"))
    assert at.button(key="btn_evaluate").disabled  # no best.pth for this run
    at.selectbox(key="results_run").set_value("half").run()
    assert not at.exception


# ----------------------------------------------------------------------------- dataset
def test_dataset_page_from_a_run_and_from_a_folder(all_states, tmp_path):
    at = app_test("views/dataset.py")
    at.selectbox(key="ds_run").set_value("done").run()
    assert not at.exception
    assert at.dataframe[0].value["images"].tolist() == [264, 75, 39]
    assert len(at.get("plotly_chart")) == 3
    assert len(at.image) >= 1
    at.radio(key="ds_source").set_value("a dataset folder").run()
    at.text_input(key="ds_root").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception
    assert any("does not exist" in t for t in _texts(at, "warning"))
    bad = tmp_path / "bad"
    for split in ("train", "valid", "test"):
        (bad / split).mkdir(parents=True)
        (bad / split / "_annotations.coco.json").write_text("{broken")
    at.text_input(key="ds_root").set_value(str(bad)).run()
    assert not at.exception
    assert any("_annotations.coco.json" in t for t in _texts(at, "error"))


# ----------------------------------------------------------------------------- predict
@pytest.fixture(scope="session")
def real_checkpoint(tmp_path_factory):
    return write_real_checkpoint(tmp_path_factory.mktemp("ck") / "tiny" / "best.pth")


def test_predict_page_real_photo_threshold_and_bad_files(dash_env, real_checkpoint, plates_real):
    import shutil

    ck = dash_env["checkpoints"] / "tiny"
    ck.mkdir()
    shutil.copy(real_checkpoint, ck / "best.pth")
    make_run(dash_env["runs"], "tiny")
    at = app_test("views/predict.py")
    assert not at.exception
    photo = (plates_real / "test" / "Cars91.jpg").read_bytes()
    at.file_uploader(key="predict_upload").set_value([
        ("Cars91.jpg", photo, "image/jpeg"), ("notes.jpg", b"this is not an image", "image/jpeg")]).run()
    assert not at.exception
    errors = _texts(at, "error")
    assert len(errors) == 1 and errors[0].startswith("notes.jpg:"), errors
    assert len(at.image) == 1
    assert any(m.label == "inference" and m.value.endswith("ms") for m in at.metric)
    cache = at.session_state["_predictions"]
    assert len(cache) == 1
    [pred] = cache.values()
    at.slider(key="predict_threshold").set_value(0.05).run()
    assert not at.exception
    plates = next(m.value for m in at.metric if m.label == "plates")
    assert plates == str(sum(s >= 0.05 for s in pred["scores"]))
    assert at.session_state["_predictions"] == cache  # the slider re-filtered without a new prediction
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Annotated JPEG (full size)", "Boxes JSON"]


def test_predict_page_corrupt_checkpoint_is_one_line(dash_env):
    write_fake_checkpoints(dash_env["checkpoints"], "junk")
    at = app_test("views/predict.py")
    assert not at.exception
    assert len(_texts(at, "error")) == 1 and "best.pth" in _texts(at, "error")[0]


# ----------------------------------------------------------------------------- auth
def test_password_gate(dash_env, monkeypatch):
    monkeypatch.setenv("DASHBOARD_PASSWORD", "s3cret")
    at = app_test()
    assert not at.exception
    assert [t.value for t in at.title] == ["Plate detector dashboard"]
    at.text_input[0].set_value("wrong")
    at.get("form_submit_button")[0].click().run()
    assert "Wrong password." in _texts(at, "error") and [t.value for t in at.title] == ["Plate detector dashboard"]
    at.text_input[0].set_value("s3cret")
    at.get("form_submit_button")[0].click().run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Runs"]


def test_refuses_to_serve_on_a_public_address_without_password(dash_env):
    from streamlit import config

    old = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    try:
        at = app_test()
    finally:
        config.set_option("server.address", old)
    assert not at.exception
    assert not at.title and any("non-loopback" in t for t in _texts(at, "error"))


def test_open_live_and_results_buttons_switch_page_with_the_run(all_states):
    at = app_test()
    at.selectbox(key="runs_action_pick").set_value("other").run()
    at.button(key="btn_open_live").click().run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Live"]
    assert at.multiselect(key="live_runs").value == ["other"]
    at.switch_page("views/runs.py").run()
    at.button(key="btn_open_results").click().run()
    assert [t.value for t in at.title] == ["Results"] and at.selectbox(key="results_run").value == "other"


def test_resume_button_reports_a_failed_resume_as_one_line(all_states, monkeypatch):
    """A crashed run without last.pth: `--resume` starts it over from step 0 with its config.yaml, whose
    COCO weights are not on this machine, so the run ends failed with that one line; the page never breaks."""
    monkeypatch.setenv("TORCH_HOME", str(all_states["tmp"] / "empty-torch-home"))  # no cached COCO weights
    at = app_test()
    at.selectbox(key="runs_action_pick").set_value("dead").run()
    at.button(key="btn_resume").click().run()
    assert not at.exception
    assert any("Resuming dead" in t for t in _texts(at, "success")), _all_text(at)
    run_dir = all_states["runs"] / "dead"
    end = time.time() + 120
    while time.time() < end and runs.effective_state(runs.read_status(run_dir)) in runs.LIVE_STATES:
        time.sleep(0.5)
    status = runs.read_status(run_dir)
    assert runs.effective_state(status) == "failed"
    assert "COCO weights not found" in status["error"] and "\n" not in status["error"]


def test_run_pickers_follow_the_shared_selection(all_states):
    at = app_test()
    at.selectbox(key="runs_action_pick").set_value("bad").run()
    at.session_state["selected_run"] = "other"  # e.g. a run just started from the form
    at.run()
    assert at.selectbox(key="runs_action_pick").value == "other"
    assert any(t.startswith("**other**") for t in _texts(at, "markdown"))


def test_a_completed_run_says_how_it_ended(all_states):
    """The trainer's closing message (here: a time limit) is shown under the selected run."""
    run_dir = all_states["runs"] / "other"
    status = runs.read_status(run_dir)
    status.update(message="time limit reached after 2 epochs; best mAP@0.5 0.4200 at epoch 2", end_reason="time_limit")
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, status)
    at = app_test()
    at.selectbox(key="runs_action_pick").set_value("other").run()
    assert "other: time limit reached after 2 epochs; best mAP@0.5 0.4200 at epoch 2" in _texts(at, "caption")
    assert not at.exception


def test_first_start_generates_the_demo_dataset_once(dash_env, monkeypatch):
    demo = dash_env["configs"] / "demo_cpu.yaml"
    cfg = yaml.safe_load(demo.read_text())
    cfg["data"]["synth"] = {"train": 3, "valid": 2, "test": 2, "seed": 1, "width": 96, "height": 64}
    demo.write_text(yaml.safe_dump(cfg))
    root = dash_env["tmp"] / "data" / "synthetic"
    monkeypatch.setenv("PLATES_DEMO_DATA_DIR", str(root))
    at = app_test()
    assert not at.exception
    for split, n in (("train", 3), ("valid", 2), ("test", 2)):
        assert len(list((root / split).glob("*.jpg"))) == n
    assert at.selectbox(key="nr_config").value.name == "demo_cpu.yaml"
    stamp = (root / "train" / "_annotations.coco.json").stat().st_mtime
    app_test()
    assert (root / "train" / "_annotations.coco.json").stat().st_mtime == stamp


def test_live_page_shows_the_processes_of_a_multi_process_run_and_flags_a_dead_rank(all_states):
    from tests.dashboard.test_ranks import _beat, _dead_pid

    run_dir = make_run(all_states["runs"], "ddp", state="running", epochs_done=1, epochs=5)
    runs.StatusWriter(run_dir).update(world_size=2, restart_count=1)
    now = time.time()
    _beat(run_dir, 0, os.getpid(), now - 1, 4, mem=2048.0)
    _beat(run_dir, 1, _dead_pid(), now - 2, 3)
    at = app_test("views/live.py")
    at.multiselect(key="live_runs").set_value(["ddp"]).run()
    assert not at.exception
    assert any("2 processes, 1 restart(s): rank 1 not heard from" in t for t in _texts(at, "warning"))
    table = at.dataframe[0].value
    assert table["rank"].tolist() == [0, 1] and table["state"].tolist() == ["ok", "dead"]
    at.multiselect(key="live_runs").set_value(["done"]).run()  # a one-process run: no processes table
    assert not at.exception and not at.dataframe and not _texts(at, "warning")


def test_predict_page_says_what_the_model_was_trained_on(dash_env, real_checkpoint):
    import shutil

    for name, root in (("real", None), ("synth", str(dash_env["tmp"] / "data" / "synthetic"))):
        (dash_env["checkpoints"] / name).mkdir()
        shutil.copy(real_checkpoint, dash_env["checkpoints"] / name / "best.pth")
        make_run(dash_env["runs"], name, data_root=root)
    at = app_test("views/predict.py")
    at.selectbox(key="predict_run").set_value("real").run()
    assert not at.exception
    assert any(t.startswith("Trained on real photos: plates-real") for t in _texts(at, "caption"))
    assert not _texts(at, "warning")
    at.selectbox(key="predict_run").set_value("synth").run()
    assert not at.exception
    assert any(t.startswith("Trained on synthetic plates") for t in _texts(at, "caption"))
    [warning] = _texts(at, "warning")
    assert "trained only on synthetic plates" in warning
    [command] = _texts(at, "code")
    assert command.startswith("python -m engine train --config configs/real_finetune_cpu.yaml --data ")
    assert command.endswith(f"--set model.weights={dash_env['checkpoints'] / 'synth' / 'best.pth'}")
