"""The training loop on real tiny data: run folder contract, resume, early stopping, SIGTERM, NaN loss.

Tiny on purpose: 4 train / 2 valid / 2 test real photos from plates-real, the 320 model from
scratch at ~128 px, batch 2 (2 steps per epoch), num_workers 0, deterministic.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine import runs
from engine.checkpoint import FORMAT, load_checkpoint
from engine.config import config_from_dict, load_config
from engine.errors import EngineError
from engine.train import RunError, load_run_config, train

ROOT = Path(__file__).resolve().parents[1]
STEP_KEYS = {"type", "step", "epoch", "time", "loss", "loss_classifier", "loss_box_reg", "loss_objectness",
             "loss_rpn_box_reg", "lr", "grad_norm", "images_per_s", "data_time_s", "amp_scale",
             "gpu_mem_peak_mb"}
EPOCH_KEYS = {"type", "epoch", "step", "time", "train_loss", "val_map50", "val_map50_95", "val_precision",
              "val_recall", "val_f1", "lr", "epoch_time_s", "is_best"}
TAGS = {"train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_objectness",
        "train/loss_rpn_box_reg", "train/lr", "train/grad_norm", "train/images_per_s", "train/data_time_s", "train/epoch_loss",
        "val/mAP50", "val/mAP50_95", "val/precision", "val/recall", "val/f1"}


def make_tiny_dataset(src: Path, dst: Path, counts=(("train", 4), ("valid", 2), ("test", 2))) -> Path:
    """The first images of each split of a Roboflow export, with their annotations (a real subset)."""
    for split, n in counts:
        data = json.loads((src / split / "_annotations.coco.json").read_text())
        images = sorted(data["images"], key=lambda i: i["id"])[:n]
        ids = {i["id"] for i in images}
        data["images"] = images
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
        (dst / split).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copy(src / split / image["file_name"], dst / split / image["file_name"])
        (dst / split / "_annotations.coco.json").write_text(json.dumps(data))
    return dst


def tiny_dict(root: Path, work: Path, **sections) -> dict:
    d = {
        "run": {"runs_dir": str(work / "runs"), "checkpoints_dir": str(work / "checkpoints"), "seed": 7},
        "data": {"root": str(root), "num_workers": 0},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [128], "test_size": 128, "max_size": 160},
        "optim": {"lr": 0.01},
        "schedule": {"warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": 2, "amp": False, "device": "cpu", "deterministic": True,
                  "early_stopping_patience": 5},
        "eval": {"batch_size": 2, "probe_images": 2},
    }
    for section, values in sections.items():
        d[section] = {**d.get(section, {}), **values}
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory, plates_real) -> Path:
    work = tmp_path_factory.mktemp("train")
    make_tiny_dataset(plates_real, work / "data")
    return work


@pytest.fixture(scope="module")
def uninterrupted(work) -> dict:
    cfg = config_from_dict(tiny_dict(work / "data", work), where=str(work / "tiny.yaml"))
    result = train(cfg, "full")
    return result


def _epoch_records(run_dir):
    return runs.read_metrics(run_dir)[1]


def _raw_records(run_dir):
    return runs.read_jsonl(Path(run_dir) / runs.METRICS_FILE)[0]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)] if tag else []


# ----------------------------------------------------------------------------- the run folder contract
def test_tiny_run_writes_every_contract_file(uninterrupted, work):
    assert uninterrupted["state"] == "completed" and uninterrupted["global_step"] == 4
    run_dir, ckpt_dir = work / "runs" / "full", work / "checkpoints" / "full"

    cfg = load_config(run_dir / runs.CONFIG_FILE)
    assert cfg.run.name == "full" and cfg.train.epochs == 2 and cfg.input.train_sizes == [128]

    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["run"] == "full"
    for key in ("pid", "pgid", "host", "device", "device_name", "started_at", "updated_at", "ended_at",
                "images_per_s", "eta_s", "message"):
        assert status.get(key) is not None, key
    assert (status["epoch"], status["epochs"], status["steps_per_epoch"]) == (2, 2, 2)
    assert (status["global_step"], status["total_steps"]) == (4, 4)
    assert status["best"]["epoch"] in (1, 2) and status["error"] is None

    raw = _raw_records(run_dir)
    steps = [r for r in raw if r["type"] == "step"]
    epochs = [r for r in raw if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [1, 1, 2, 2]
    assert all(set(r) == STEP_KEYS for r in steps) and all(set(r) == EPOCH_KEYS for r in epochs)
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
    assert epochs[0]["is_best"] is True
    assert all(r["grad_norm"] > 0 and r["loss"] > 0 for r in steps)
    # per-iteration LR: 2 warmup steps from lr*0.001, then cosine to min_lr at the final step
    assert [r["lr"] for r in steps] == pytest.approx([1e-5, 0.005005, 0.01, 1e-6])
    assert epochs[0]["train_loss"] == pytest.approx((steps[0]["loss"] + steps[1]["loss"]) / 2)

    acc, lr_events = _scalars(run_dir, "train/lr")
    assert TAGS <= set(acc.Tags()["scalars"])
    assert [s for s, _ in lr_events] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/mAP50")] == [2, 4]  # epoch scalars at the epoch's last step

    log = (run_dir / runs.LOG_FILE).read_text()
    for text in ("Starting Training — 2 epochs", "Device: cpu", "LR: 0.01, Momentum: 0.9", "Warmup: 1 epochs",
                 "Early Stopping Patience: 5", "Epoch [1/2] — Loss: ", "| mAP@0.5: ", "★ New best mAP@0.5: ",
                 "Training complete! Total time: ", "Best mAP@0.5: "):
        assert text in log, text
    assert log.count("Starting Training") == 1

    dataset = json.loads((run_dir / runs.DATASET_FILE).read_text())
    assert {k: v["images"] for k, v in dataset.items()} == {"train": 4, "valid": 2, "test": 2}

    last = load_checkpoint(ckpt_dir / runs.LAST_CKPT)
    best = load_checkpoint(ckpt_dir / runs.BEST_CKPT)
    for ckpt in (last, best):
        assert ckpt["format"] == FORMAT and ckpt["run"] == "full" and ckpt["config"]["run"]["name"] == "full"
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "early_stopping", "best", "metrics"} <= set(ckpt)
    assert (last["epoch"], last["global_step"], last["completed"]) == (2, 4, True)
    assert last["metrics"]["epoch"] == 2 and last["scheduler"]["last_step"] == 4
    assert best["epoch"] == status["best"]["epoch"]
    assert (run_dir / runs.PROBES_DIR / "index.json").is_file()


def test_existing_and_completed_runs_are_refused(uninterrupted, work):
    cfg = config_from_dict(tiny_dict(work / "data", work))
    with pytest.raises(RunError, match="already exists"):
        train(cfg, "full")
    with pytest.raises(RunError, match="already completed"):
        train(load_run_config("full", str(work / "runs")), "full", resume=True)
    with pytest.raises(RunError, match="not found"):
        load_run_config("nope", str(work / "runs"))
    assert runs.read_status(work / "runs" / "full")["state"] == "completed"  # untouched
    # the dashboard marks a run `queued` before it spawns `train --resume`: a refusal settles it again
    runs.StatusWriter(work / "runs" / "full").update(state="queued", pid=None, message="resuming")
    with pytest.raises(RunError, match="already completed"):
        train(load_run_config("full", str(work / "runs")), "full", resume=True)
    assert runs.read_status(work / "runs" / "full")["state"] == "completed"


# ----------------------------------------------------------------------------- resume
def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, work):
    cfg = config_from_dict(tiny_dict(work / "data", work), where=str(work / "tiny.yaml"))
    runs_dir = str(work / "runs")
    ckpt_path = work / "checkpoints" / "split" / runs.LAST_CKPT

    # 1) stop right after the last step of epoch 1, before its validation
    assert train(cfg, "split", stop_at_step=2)["state"] == "stopped"
    ckpt = load_checkpoint(ckpt_path)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 2)
    assert ckpt["epoch_progress"]["epoch"] == 1 and ckpt["epoch_progress"]["batches_done"] == 2
    assert runs.read_status(work / "runs" / "split")["state"] == "stopped"
    # 2) resume: validates epoch 1, then stops in the middle of epoch 2
    assert train(load_run_config("split", runs_dir), "split", resume=True, stop_at_step=3)["state"] == "stopped"
    ckpt = load_checkpoint(ckpt_path)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["epoch_progress"]["batches_done"]) == (1, 3, 1)
    # 3) resume to the end
    assert train(load_run_config("split", runs_dir), "split", resume=True)["state"] == "completed"

    full_steps, full_epochs = runs.read_metrics(work / "runs" / "full")
    raw = _raw_records(work / "runs" / "split")
    steps = [r for r in raw if r["type"] == "step"]
    epochs = [r for r in raw if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # no gap, no duplicate
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["lr"] for r in steps] == [r["lr"] for r in full_steps]  # the same LR curve, exactly
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in full_steps], rel=1e-4)
    assert [(r["epoch"], r["step"], r["lr"]) for r in epochs] == [(r["epoch"], r["step"], r["lr"]) for r in full_epochs]
    assert [r["train_loss"] for r in epochs] == pytest.approx([r["train_loss"] for r in full_epochs], rel=1e-4)
    assert [r["val_map50"] for r in epochs] == pytest.approx([r["val_map50"] for r in full_epochs], abs=1e-6)

    _, lr_events = _scalars(work / "runs" / "split", "train/lr")
    assert [s for s, _ in lr_events] == [1, 2, 3, 4]
    log = (work / "runs" / "split" / runs.LOG_FILE).read_text()
    assert log.count("Resuming at epoch") == 2 and "Epoch [1/2]" in log and "Epoch [2/2]" in log


# ----------------------------------------------------------------------------- early stopping in the loop
def test_early_stopping_stops_the_run(work, monkeypatch):
    import engine.evaluate

    real_validate = engine.evaluate.validate
    sequence = iter([0.30, 0.50, 0.40, 0.45, 0.9, 0.9])

    def scripted_validate(*args, **kwargs):  # real validation, scripted mAP@0.5
        return {**real_validate(*args, **kwargs), "map50": next(sequence)}

    monkeypatch.setattr(engine.evaluate, "validate", scripted_validate)
    cfg = config_from_dict(tiny_dict(work / "data", work, data={"train_limit": 2},
                                     train={"epochs": 6, "early_stopping_patience": 2}, eval={"probe_images": 0}))
    result = train(cfg, "early")
    assert result["state"] == "completed" and result["best"] == {"epoch": 2, "map50": 0.5}
    epochs = _epoch_records(work / "runs" / "early")
    assert [r["val_map50"] for r in epochs] == [0.30, 0.50, 0.40, 0.45]
    assert [r["is_best"] for r in epochs] == [True, True, False, False]
    assert load_checkpoint(work / "checkpoints" / "early" / runs.BEST_CKPT)["epoch"] == 2
    last = load_checkpoint(work / "checkpoints" / "early" / runs.LAST_CKPT)
    assert last["epoch"] == 4 and last["completed"] and last["early_stopping"] == {"best": 0.5, "bad_epochs": 2}
    assert "Early stopping: no improvement for 2 epochs" in (work / "runs" / "early" / runs.LOG_FILE).read_text()
    assert "early stopped at epoch 4" in runs.read_status(work / "runs" / "early")["message"]


# ----------------------------------------------------------------------------- time limit
def test_time_limit_plans_the_epochs_that_fit_and_survives_a_resume(work, monkeypatch):
    """A scripted clock (60 s per epoch done) under a 3.5-min limit: after epoch 1 three epochs fit (of 6), the
    cosine is refit to end at epoch 3; a stop in epoch 2 and a resume keep that plan; the run ends with time_limit."""
    from engine.report import write_report
    from engine.train import LoopState

    monkeypatch.setattr(LoopState, "elapsed", lambda self: 60.0 * (self.next_epoch - 1))
    cfg = config_from_dict(tiny_dict(work / "data", work, train={"epochs": 6, "time_limit_min": 3.5},
                                     schedule={"warmup_epochs": 0, "min_lr": 1e-5}, eval={"probe_images": 0}))
    assert train(cfg, "timed", stop_at_step=3)["state"] == "stopped"
    run_dir, ckpt_path = work / "runs" / "timed", work / "checkpoints" / "timed" / runs.LAST_CKPT
    status = runs.read_status(run_dir)
    assert (status["epochs"], status["total_steps"]) == (3, 6)
    assert load_checkpoint(ckpt_path)["scheduler"]["total_steps"] == 6
    result = train(load_run_config("timed", str(work / "runs")), "timed", resume=True)
    assert result["state"] == "completed"
    steps, epochs = runs.read_metrics(run_dir)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert steps[-1]["step"] == 6 and steps[-1]["lr"] == pytest.approx(1e-5)  # the refit cosine ended at step 6
    assert steps[1]["lr"] > steps[2]["lr"] > steps[-1]["lr"]
    status = runs.read_status(run_dir)
    assert status["end_reason"] == "time_limit" and "time limit reached after 3 epochs" in status["message"]
    last = load_checkpoint(ckpt_path)
    assert last["completed"] and last["end_reason"] == "time_limit"
    log = (run_dir / runs.LOG_FILE).read_text()
    assert "3 epochs planned (was 6)" in log and "Epoch [3/3]" in log and "Time limit reached" in log
    report = write_report("timed", str(work / "runs"), str(work / "checkpoints"), str(work / "report-timed")).read_text()
    assert "time limit reached" in report and "The time limit (3.5 min) ended the run after 3 of 6 epochs" in report


# ----------------------------------------------------------------------------- failures
def test_dataset_error_marks_the_run_failed(work):
    broken = make_tiny_dataset(work / "data", work / "broken", counts=(("train", 4), ("valid", 2), ("test", 2)))
    victim = sorted((broken / "valid").glob("*.jpg"))[0]
    victim.unlink()
    cfg = config_from_dict(tiny_dict(broken, work))
    with pytest.raises(EngineError) as info:
        train(cfg, "broken")
    assert victim.name in str(info.value)
    status = runs.read_status(work / "runs" / "broken")
    assert status["state"] == "failed" and victim.name in status["error"]
    assert "Training failed" in (work / "runs" / "broken" / runs.LOG_FILE).read_text()


def _cli(work: Path, *args: str, stdout=subprocess.PIPE, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=work, env=env, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not subprocess.PIPE else subprocess.PIPE,
                            text=True, **kw)


def test_non_finite_loss_fails_naming_the_step(work):
    from engine.model import build_model

    cfg = config_from_dict(tiny_dict(work / "data", work))
    state = build_model(cfg).state_dict()
    state["roi_heads.box_predictor.cls_score.weight"].fill_(float("nan"))
    torch.save({"model": state}, work / "nan.pth")
    (work / "nan.yaml").write_text(yaml.safe_dump(tiny_dict(work / "data", work)))
    proc = _cli(work, "train", "--config", "nan.yaml", "--run", "nan", "--set", f"model.weights={work / 'nan.pth'}")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err
    assert "error: loss is nan at step 1 (epoch 1)" in err
    status = runs.read_status(work / "runs" / "nan")
    assert status["state"] == "failed" and "loss is nan at step 1 (epoch 1)" in status["error"]


def test_sigterm_stops_with_last_checkpoint(work):
    """Launched like the dashboard does: queued status first, stdout+stderr into train.log, own session.

    With a DataLoader worker, as in the CPU demo: the SIGTERM to the process group reaches it too."""
    cfg = tiny_dict(work / "data", work, train={"epochs": 30, "deterministic": False}, data={"num_workers": 1})
    (work / "sig.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = work / "runs" / "sig"
    run_dir.mkdir(parents=True)
    runs.StatusWriter(run_dir, run="sig").update(state="queued", message="queued")
    with open(run_dir / runs.LOG_FILE, "ab") as log_file:
        proc = _cli(work, "train", "--config", "sig.yaml", "--run", "sig", stdout=log_file, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            status = runs.read_status(run_dir) or {}
            if status.get("state") == "running" and (status.get("global_step") or 0) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (run_dir / runs.LOG_FILE).read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    status = runs.read_status(run_dir)
    assert status["state"] == "stopped" and status["pid"] == proc.pid
    assert "resume with --resume sig" in status["message"]
    ckpt = load_checkpoint(work / "checkpoints" / "sig" / runs.LAST_CKPT)
    assert ckpt["global_step"] >= 1 and ckpt["completed"] is False
    assert ckpt["global_step"] == ckpt["epoch"] * 2 + ((ckpt["epoch_progress"] or {}).get("batches_done") or 0)
    log = (run_dir / runs.LOG_FILE).read_text()
    assert log.count("Starting Training") == 1  # stdout is train.log: no second file handler
    assert "Stopped at step" in log and "SIGTERM" in log


# ----------------------------------------------------------------------------- eval settings, final stop, AMP on CPU
def test_validation_counts_matches_at_eval_iou_threshold(work, monkeypatch):
    import engine.evaluate

    real_validate = engine.evaluate.validate
    ious = []

    def recording_validate(*args, **kwargs):  # real validation; remembers the IoU it was asked for
        ious.append(kwargs.get("iou"))
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(engine.evaluate, "validate", recording_validate)
    cfg = config_from_dict(tiny_dict(work / "data", work, data={"train_limit": 2}, train={"epochs": 1},
                                     eval={"iou_threshold": 0.3, "probe_images": 0, "test_after_train": False}))
    assert train(cfg, "iou")["state"] == "completed"
    assert ious == [0.3]


def test_stop_during_the_test_evaluation_ends_stopped_and_resume_completes(work, monkeypatch):
    import engine.evaluate

    real_evaluate = engine.evaluate.evaluate_checkpoint

    def stop_pressed_then_evaluate(*args, **kwargs):  # Stop arrives while the test split is evaluated
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine.evaluate, "evaluate_checkpoint", stop_pressed_then_evaluate)
    cfg = config_from_dict(tiny_dict(work / "data", work, data={"train_limit": 2}, train={"epochs": 1},
                                     eval={"probe_images": 0}))
    run_dir, runs_dir = work / "runs" / "test-stop", str(work / "runs")
    assert train(cfg, "test-stop")["state"] == "stopped"
    status = runs.read_status(run_dir)
    assert status["state"] == "stopped" and "during the test evaluation" in status["message"]
    assert "resume with --resume test-stop" in status["message"]
    assert not (run_dir / runs.TEST_DIR / runs.TEST_METRICS_FILE).exists()
    assert load_checkpoint(work / "checkpoints" / "test-stop" / runs.LAST_CKPT)["completed"] is True

    monkeypatch.setattr(engine.evaluate, "evaluate_checkpoint", real_evaluate)
    result = train(load_run_config("test-stop", runs_dir), "test-stop", resume=True)
    assert result["state"] == "completed" and result["global_step"] == 1
    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["completed_at"] and "completed 1 epochs" in status["message"]
    assert (run_dir / runs.TEST_DIR / runs.TEST_METRICS_FILE).is_file()
    assert [(r["type"], r["step"]) for r in _raw_records(run_dir)] == [  # no retraining
        ("start", 0), ("step", 1), ("epoch", 1), ("start", 1)]
    assert "Training finished at epoch 1; evaluating the test split" in (run_dir / runs.LOG_FILE).read_text()
    with pytest.raises(RunError, match="already completed"):
        train(load_run_config("test-stop", runs_dir), "test-stop", resume=True)


def test_bfloat16_autocast_trains_on_cpu(work):
    dtypes_in_training = set()

    def hook(module, args, output):
        if module.training and isinstance(output, torch.Tensor):
            dtypes_in_training.add(output.dtype)

    cfg = config_from_dict(tiny_dict(work / "data", work, train={"epochs": 1, "amp": True, "amp_dtype": "bfloat16"},
                                     eval={"probe_images": 0, "test_after_train": False}))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        result = train(cfg, "bf16")
    finally:
        handle.remove()
    assert result["state"] == "completed" and result["global_step"] == 2
    assert torch.bfloat16 in dtypes_in_training  # autocast ran in the training forward passes
    steps = [r for r in _raw_records(work / "runs" / "bf16") if r["type"] == "step"]
    assert len(steps) == 2 and all(r["loss"] > 0 and r["amp_scale"] is None for r in steps)  # no GradScaler on bf16
    assert "AMP: on (bfloat16)" in (work / "runs" / "bf16" / runs.LOG_FILE).read_text()
