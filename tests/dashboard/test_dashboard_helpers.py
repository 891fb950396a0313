"""Unit tests of the dashboard's plain helper functions (no browser, no Streamlit runtime)."""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from dashboard import (auth, charts, dataset_view, demo_data, formatting, new_run, predict_view,
                       results_data as rd, runs_table, series)
from engine import runs
from engine.config import ConfigError, load_config
from tests.dashboard.fixtures import make_run, write_fake_checkpoints

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- smoothing, axes
def test_ema_zero_weight_is_identity_and_constant_stays_constant():
    assert series.ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert series.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])


def test_ema_hand_computed_with_bias_correction():
    # w=0.5: s1=0.5*1 /(1-0.5)=1; s2=(0.25+0.5*3)=1.75 /(1-0.25)=2.3333
    out = series.ema([1.0, 3.0], 0.5)
    assert out == pytest.approx([1.0, 1.75 / 0.75])


def test_ema_passes_none_and_nan_through():
    out = series.ema([1.0, None, float("nan"), 1.0], 0.5)
    assert out[0] == 1.0 and out[1] is None and out[2] != out[2] and out[3] == pytest.approx(1.0)


def test_x_values_step_epoch_and_wall_time():
    recs = [{"type": "step", "step": 2, "epoch": 1, "time": 100.0}, {"type": "step", "step": 6, "epoch": 2, "time": 200.0}]
    assert series.x_values(recs, "step") == [2, 6]
    assert series.x_values(recs, "epoch", steps_per_epoch=4) == [0.5, 1.5]
    assert series.x_values(recs, "epoch") == [1, 2]
    assert series.x_values(recs, "wall time") == [dt.datetime.fromtimestamp(100.0), dt.datetime.fromtimestamp(200.0)]
    assert series.x_values([{"type": "epoch", "epoch": 3, "step": 12}], "epoch", 4) == [3]


# ----------------------------------------------------------------------------- runs table
def test_estimate_eta_from_status_eta_aged_by_heartbeat():
    now = 1000.0
    status = {"state": "running", "pid": None, "eta_s": 100.0, "updated_at": 970.0, "started_at": 900.0}
    assert runs_table.estimate_eta(status, now) == pytest.approx(70.0)


def test_estimate_eta_from_steps_when_no_eta():
    now = 1000.0
    status = {"state": "running", "updated_at": 999.0, "started_at": 900.0, "global_step": 25, "total_steps": 100}
    assert runs_table.estimate_eta(status, now) == pytest.approx(300.0)  # 100 s for 25 steps -> 300 s for 75


def test_estimate_eta_none_for_ended_runs():
    assert runs_table.estimate_eta({"state": "completed", "eta_s": 5}, 10.0) is None


def test_run_duration_live_uses_now_and_ended_uses_end():
    assert runs_table.run_duration({"state": "completed", "started_at": 100, "ended_at": 160}, 1000) == 60
    live = {"state": "running", "started_at": 100, "updated_at": 990, "pid": None}
    assert runs_table.run_duration(live, 1000) == 900


def test_build_rows_for_every_state(tmp_path):
    make_run(tmp_path, "done")
    make_run(tmp_path, "live", state="running", epochs_done=1, epochs=5)
    make_run(tmp_path, "bad", state="failed", error="boom")
    make_run(tmp_path, "dead", state="crashed", epochs_done=1)
    make_run(tmp_path, "old", state="running", updated_at=time.time() - 3600)
    make_run(tmp_path, "halt", state="stopped", epochs_done=2)
    rows = {r.name: r for r in runs_table.build_rows(tmp_path)}
    assert {n: r.state for n, r in rows.items()} == {
        "done": "completed", "live": "running", "bad": "failed", "dead": "crashed", "old": "stalled", "halt": "stopped"}
    assert rows["live"].can_stop and not rows["live"].can_resume
    assert rows["dead"].can_resume and rows["bad"].can_resume and rows["halt"].can_resume
    assert not rows["done"].can_resume and not rows["done"].can_stop
    assert rows["done"].best_map50 == pytest.approx(0.9) and rows["done"].best_epoch == 3
    assert rows["live"].eta_s is not None and rows["done"].eta_s is None
    recs = {r["run"]: r for r in runs_table.table_records(list(rows.values()))}
    assert recs["live"]["epoch"] == "1/5" and recs["live"]["state"] == "running"
    assert recs["done"]["best mAP@0.5"] == pytest.approx(0.9)
    assert recs["done"]["duration"] == "15m 00s"


def test_build_rows_falls_back_to_metrics_and_tolerates_missing_status(tmp_path):
    run = make_run(tmp_path, "nostatus")
    (run / runs.STATUS_FILE).unlink()
    [row] = runs_table.build_rows(tmp_path)
    assert row.state == "unknown" and row.best_map50 == pytest.approx(0.9)
    (run / runs.STATUS_FILE).write_text('{"state": "runn')  # half written (not atomic) -> unknown, no crash
    assert runs_table.build_rows(tmp_path)[0].state == "unknown"


def test_best_from_epochs_ties_take_the_earliest():
    assert runs_table.best_from_epochs([{"epoch": 1, "val_map50": 0.5}, {"epoch": 2, "val_map50": 0.5}]) == (0.5, 1)
    assert runs_table.best_from_epochs([]) == (None, None)


def test_formatting():
    assert formatting.duration(3725) == "1h 02m"
    assert formatting.duration(65) == "1m 05s"
    assert formatting.duration(None) == "—"
    assert formatting.number(0.12345) == "0.123"
    assert formatting.number(None) == "—"


# ----------------------------------------------------------------------------- incremental metrics
def test_run_tail_reads_only_new_complete_lines(tmp_path):
    run = make_run(tmp_path, "r", epochs_done=1, half_written_last_line=True)
    tail = series.RunTail(run)
    tail.poll()
    assert len(tail.buffer) == 4 and len(tail.epochs) == 1
    offset = tail.file.offset
    assert offset < (run / runs.METRICS_FILE).stat().st_size  # the half line is not consumed
    with open(run / runs.METRICS_FILE, "a") as fh:  # the writer completes the line, then adds one
        fh.write('ss": 1.0}\n')
        fh.write(json.dumps({"type": "step", "step": 5, "epoch": 2, "loss": 0.5}) + "\n")
    assert tail.poll()
    assert list(tail.buffer.column("step")) == [1, 2, 3, 4, 5, 999]  # the completed line is read once, whole
    assert not tail.poll()


def test_run_tail_rereads_a_replaced_file(tmp_path):
    run = make_run(tmp_path, "r", epochs_done=2)
    tail = series.RunTail(run)
    tail.poll()
    assert len(tail.epochs) == 2
    (run / runs.METRICS_FILE).write_text(json.dumps({"type": "epoch", "epoch": 1, "val_map50": 0.1}) + "\n")
    tail.poll()
    assert [e["val_map50"] for e in tail.epochs] == [0.1]


def test_header_values(tmp_path):
    run = make_run(tmp_path, "live", state="running", epochs_done=1, epochs=4)
    tail = series.RunTail(run)
    tail.poll()
    h = series.header(tail.status, tail.buffer.last("images_per_s"))
    assert h.state == "running" and h.epoch == "1/4" and h.progress == pytest.approx(0.25)
    assert h.images_per_s == 3.2 and h.heartbeat_age_s < 60


# ----------------------------------------------------------------------------- charts
def test_loss_figure_raw_and_smoothed_per_run_with_constant_uirevision(tmp_path):
    tails = []
    for name in ("a", "b"):
        t = series.RunTail(make_run(tmp_path, name, epochs_done=2))
        t.poll()
        tails.append(t)
    fig = charts.loss_figure(tails, "step", 0.6, log_y=True, key="k")
    assert len(fig.data) == 4 and fig.layout.uirevision == "k" and fig.layout.yaxis.type == "log"
    raw = charts.loss_figure(tails[:1], "epoch", 0.0, log_y=False)
    assert len(raw.data) == 1 and raw.data[0].x[-1] == pytest.approx(2.0)
    fig = charts.epoch_metric_figure(tails, ("val_map50", "val_map50_95"), "mAP", "epoch")
    assert len(fig.data) == 4 and list(fig.data[0].x) == [1, 2]


def test_pr_and_prf_figures_mark_thresholds():
    pr = charts.pr_figure([("a", {"recall": [0.5, 1.0], "precision": [1.0, 0.5], "ap": 0.7})])
    assert pr.data[0].name == "a (AP50 0.700)"
    prf = charts.prf_confidence_figure({"threshold": [0, 0.5, 1], "precision": [0.1, 0.5, 1], "recall": [1, 0.5, 0],
                                        "f1": [0.2, 0.5, 0]}, {"deployment": 0.5, "max F1": 0.42})
    assert len(prf.data) == 3 and len(prf.layout.shapes) == 2


# ----------------------------------------------------------------------------- new run form
def test_list_configs_demo_first_and_baselines_excluded():
    names = [p.name for p in new_run.list_configs(ROOT / "configs")]
    assert names[0] == "demo_cpu.yaml" and "baselines.yaml" not in names


def test_build_overrides_only_changed_values_and_image_size_sets_both():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    d = new_run.form_defaults(cfg)
    assert new_run.build_overrides(d, d) == []
    chosen = new_run.FormValues(**{**d.__dict__, "epochs": 2, "lr": 0.001, "image_size": 160, "weights": "coco",
                                   "batch_size": 4, "model": "fasterrcnn_mobilenet_v3_large_fpn", "time_limit_min": 30})
    ov = new_run.build_overrides(d, chosen)
    assert ov == ["model.name=fasterrcnn_mobilenet_v3_large_fpn", "model.weights=coco", "train.epochs=2",
                  "train.time_limit_min=30", "train.batch_size=4", "optim.lr=0.001", "input.train_sizes=[160]",
                  "input.test_size=160"]
    cfg2 = new_run.validate_launch(ROOT / "configs" / "demo_cpu.yaml", ov)
    assert cfg2.input.train_sizes == [160] and cfg2.input.test_size == 160 and cfg2.optim.lr == 0.001
    assert cfg2.train.time_limit_min == 30


def test_validate_launch_names_the_bad_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        new_run.validate_launch(ROOT / "configs" / "demo_cpu.yaml", ["optim.lr=0.0"])


def test_check_name_rejects_bad_characters_and_taken_names(tmp_path):
    (tmp_path / "taken").mkdir()
    assert new_run.check_name(" ok-1.a_b ", tmp_path) == "ok-1.a_b"
    with pytest.raises(ConfigError, match="letters"):
        new_run.check_name("bad name/..", tmp_path)
    with pytest.raises(ConfigError, match="already used"):
        new_run.check_name("taken", tmp_path)
    with pytest.raises(ConfigError):
        new_run.check_name("", tmp_path)


def test_default_run_name_and_weight_choices():
    assert new_run.default_run_name(Path("configs/demo_cpu.yaml"), dt.datetime(2024, 1, 2, 3, 4, 5)) == \
        "demo_cpu-20240102-030405"
    assert new_run.weight_choices("none", [Path("/c/a/best.pth")]) == ["coco", "none", "/c/a/best.pth"]
    assert new_run.weight_choices("/x.pth", []) == ["coco", "none", "/x.pth"]


# ----------------------------------------------------------------------------- results
def test_summary_and_targets_met_or_missed():
    epochs = [{"epoch": 1, "val_map50": 0.5, "val_precision": 0.95, "val_recall": 0.6},
              {"epoch": 2, "val_map50": 0.9, "val_precision": 0.92, "val_recall": 0.79, "val_f1": 0.85}]
    s = rd.summary(epochs)
    assert s["map50"] == 0.9 and s["best_epoch"] == 2 and s["total_epochs"] == 2 and s["f1"] == 0.85
    rows = {r["metric"]: r["result"] for r in rd.target_rows(s)}
    assert rows == {"mAP@0.5": "met", "precision": "met", "recall": "missed"}
    assert rd.met(0.85, 0.85) is False  # the targets are strict (> 0.85)
    assert {r["result"] for r in rd.target_rows({})} == {"no data"}


def test_deltas_b_minus_a_and_skip_empty():
    rows = rd.deltas({"map50": 0.5, "recall": 0.7}, {"map50": 0.75, "precision": 0.9})
    by = {r["metric"]: r for r in rows}
    assert by["val mAP@0.5"]["delta (B − A)"] == pytest.approx(0.25)
    assert by["val precision"]["delta (B − A)"] is None and by["val recall"]["B"] is None
    assert "val F1" not in by


def test_test_summary_thresholds_samples_and_probes(tmp_path):
    run = make_run(tmp_path, "r", with_test=True, with_probes=True, epochs_done=2)
    m = rd.read_test_metrics(run)
    s = rd.test_summary(m)
    assert s["map50"] == m["map50"] and s["fps"] == pytest.approx(11.36) and s["ms_per_image"] == 85.0
    assert (s["precision"], s["recall"]) == (pytest.approx(7 / 9), pytest.approx(0.7))
    assert s["images"] == 10 and s["params"] == 18930000 and s["device"] == "CPU"
    assert rd.thresholds(m) == {"deployment": 0.5, "max F1": m["best_f1"]["threshold"]}
    groups = rd.samples(run)
    assert groups["good"][0]["path"].is_file()
    assert {i["kind"] for i in groups["challenging"]} == {"missed", "false_positive", "low_iou"}
    missed = next(i for i in groups["challenging"] if i["kind"] == "missed" and i["pred_count"] == 0)
    assert rd.sample_caption(missed).startswith(f"{missed['file_name']} · missed · ground truth 1 · predicted 0")
    assert rd.probe_epochs(run) == [1, 2]
    images = rd.probe_images(run, 2)
    assert [p.name for p, _ in images] == ["0.jpg", "1.jpg"]
    assert images[0][1] == "Cars0.jpg · 2 box(es), top 0.70"


def test_results_readers_tolerate_missing_and_broken_files(tmp_path):
    run = make_run(tmp_path, "r")
    assert rd.read_test_metrics(run) is None and rd.samples(run) == {} and rd.probe_epochs(run) == []
    (run / "test").mkdir()
    (run / "test" / "metrics.json").write_text("{not json")
    (run / "test" / "samples.json").write_text('{"good": [1, {"file": "missing.jpg"}]}')
    assert rd.read_test_metrics(run) is None
    assert rd.samples(run)["good"][0]["path"] is None
    assert rd.thresholds(None) == {}


def test_baselines_checkpoints_and_log_excerpt(tmp_path):
    baselines = rd.load_baselines(ROOT / "configs" / "baselines.yaml")
    rows = rd.baseline_table("m", {"map50": 0.7, "params": 18_930_000, "fps": 11.36}, baselines)
    assert rows[0]["params"] == "18.9M" and rows[0]["FPS"] == 11.4
    assert {r["model"] for r in rows[1:]} == {"YOLOv5s", "FasterRCNN-ResNet50"}
    assert rd.load_baselines(tmp_path / "none.yaml") == []
    write_fake_checkpoints(tmp_path / "ck", "r")
    ck = rd.checkpoint_rows(tmp_path / "ck" / "r", {"best": {"epoch": 3}, "epoch": 5})
    assert [(Path(r["file"]).name, r["size MB"]) for r in ck] == [("best.pth", 2.0), ("last.pth", 3.0)]
    assert "epoch 3" in ck[0]["description"] and "(5)" in ck[1]["description"]
    run = make_run(tmp_path, "r")
    assert "Starting Training" in rd.log_excerpt(run / runs.LOG_FILE)


def test_build_report_gives_markdown_and_zip(tmp_path):
    import io
    import zipfile

    run = make_run(tmp_path / "runs", "r", with_test=True)
    rep = rd.build_report("r", tmp_path / "runs", tmp_path / "ck", tmp_path / "out")
    assert "Run `r`" in rep.markdown and rep.path == tmp_path / "out" / "RESULTS.md" and rep.path.is_file()
    names = zipfile.ZipFile(io.BytesIO(rep.zip_bytes)).namelist()
    assert "RESULTS.md" in names and run.is_dir()


# ----------------------------------------------------------------------------- dataset
def test_dataset_summary_from_run_file(tmp_path):
    run = make_run(tmp_path, "r")
    splits, root = dataset_view.read_run_dataset(run)
    assert root.endswith("plates-real")
    rows = dataset_view.summary_table(splits)
    assert [r["split"] for r in rows] == ["train", "valid", "test"] and rows[0]["images"] == 264
    assert dataset_view.splits_from_file({"train": {"images": 1}, "note": "x"}) == {"train": {"images": 1}}
    assert dataset_view.splits_from_file(None) == {}


def test_box_stats_and_drawing_on_real_images(plates_real):
    from engine.data import load_split

    split = load_split(plates_real, "test")
    stats = dataset_view.box_stats(split.images)
    assert sum(stats["boxes_per_image"]) == 42 == len(stats["aspect"]) == len(stats["box_size_px"])
    assert all(a > 0 for a in stats["aspect"]) and all(0 < s <= 1 for s in stats["box_area_share"])
    picks = dataset_view.pick_samples(split.images, 4, seed=1)
    assert len(picks) == 4 and picks == dataset_view.pick_samples(split.images, 4, seed=1)
    img = dataset_view.draw_boxes(picks[0].path, picks[0].boxes, max_side=200)
    assert max(img.size) == 200


# ----------------------------------------------------------------------------- predict
def test_filter_prediction_and_boxes_json():
    pred = {"boxes": [[0, 0, 10, 10], [5, 5, 20, 20]], "scores": [0.9, 0.3], "ms": 12.0, "width": 30, "height": 30}
    kept = predict_view.filter_prediction(pred, 0.5)
    assert kept["boxes"] == [[0, 0, 10, 10]] and kept["scores"] == [0.9] and pred["scores"] == [0.9, 0.3]
    data = json.loads(predict_view.boxes_json("a.jpg", kept, "ck.pth"))
    assert data["detections"] == [{"box_xyxy": [0.0, 0.0, 10.0, 10.0], "score": 0.9}] and data["threshold"] == 0.5
    assert predict_view.download_name("dir/a.photo.jpg", "_pred.png") == "a.photo_pred.png"
    assert predict_view.file_hash(b"x") != predict_view.file_hash(b"y")


def test_runs_with_checkpoints(tmp_path):
    make_run(tmp_path / "runs", "a")
    make_run(tmp_path / "runs", "b")
    write_fake_checkpoints(tmp_path / "ck", "b")
    write_fake_checkpoints(tmp_path / "ck", "shell-only")
    assert predict_view.runs_with_checkpoints(tmp_path / "runs", tmp_path / "ck") == ["b", "shell-only"]
    assert set(predict_view.available_checkpoints(tmp_path / "ck", "b")) == {"best", "last"}


# ----------------------------------------------------------------------------- auth
def test_auth_decisions_and_password_check(monkeypatch):
    assert auth.gate_decision("127.0.0.1", None) == "open"
    assert auth.gate_decision("localhost", None) == "open"
    assert auth.gate_decision("::1", None) == "open"
    assert auth.gate_decision("0.0.0.0", None) == "refuse"
    assert auth.gate_decision(None, None) == "refuse"  # Streamlit binds all interfaces then
    assert auth.gate_decision("127.0.0.1", "pw") == "ask"
    assert auth.password_ok("pw", "pw") and not auth.password_ok("pW", "pw") and not auth.password_ok(None, "pw")
    monkeypatch.setenv(auth.ENV_VAR, "from-env")
    assert auth.configured_password({"password": "from-secrets"}) == "from-env"
    monkeypatch.delenv(auth.ENV_VAR)
    assert auth.configured_password({"password": "from-secrets"}) == "from-secrets"
    assert auth.configured_password(None) is None

    class NoSecrets:
        def get(self, key):
            raise FileNotFoundError("no secrets.toml")

    assert auth.configured_password(NoSecrets()) is None


# ----------------------------------------------------------------------------- demo dataset
def test_ensure_demo_dataset_generates_once(tmp_path):
    root = tmp_path / "data" / "synthetic"
    settings = {"train": 2, "valid": 1, "test": 1, "seed": 0, "width": 96, "height": 64}
    assert demo_data.ensure_demo_dataset(root, settings) is True
    assert demo_data.dataset_present(root)
    assert demo_data.ensure_demo_dataset(root, settings) is False
    assert not list((tmp_path / "data").glob(".synthetic.tmp-*"))


def test_synth_settings_from_demo_config():
    s = demo_data.synth_settings(ROOT / "configs" / "demo_cpu.yaml")
    synth = load_config(ROOT / "configs" / "demo_cpu.yaml").data.synth
    assert (s["train"], s["valid"], s["width"]) == (synth.train, synth.valid, synth.width)
    assert demo_data.synth_settings(Path("/nonexistent.yaml")) == {}


def test_log_tail_folds_progress_bars_and_drops_terminal_escapes(tmp_path):
    log = tmp_path / "train.log"
    log.write_bytes(b"start\nepoch 1:  50%|##  | 1/2\repoch 1: 100%|####| 2/2\x1b[A\n" + b" " * 40
                    + b"\x1b[A2024 INFO done\n\n  indented\n")
    assert series.log_tail(log) == "start\nepoch 1: 100%|####| 2/2\n2024 INFO done\n  indented"
    assert series.log_tail(tmp_path / "missing.log") == ""
