"""Run folders for dashboard tests, written by the engine's own writers.

make_run(runs_dir, "name", state="completed") writes config.yaml (engine.config.save_config),
status.json (runs.StatusWriter), metrics.jsonl (tracking.MetricsRecorder + JsonlWriter), train.log
and dataset.json (as the trainer writes them); with_test adds the test outputs from engine.metrics
and engine.samples; with_probes adds probes/epoch_NNN/*.jpg + index.json.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
from PIL import Image, ImageDraw

from engine import metrics, runs
from engine.config import config_from_dict, save_config
from engine.samples import select_samples, write_samples
from engine.tracking import JsonlWriter, MetricsRecorder

from tests.conftest import PLATES_REAL  # noqa: E402  (one place finds the real dataset)

# what engine.data.load_split(...).summary gives for plates-real, as the trainer writes it to dataset.json
PLATES_REAL_SUMMARY = {
    "train": {"images": 264, "boxes": 295, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 1, "crowd_ignored": 0},
    "valid": {"images": 75, "boxes": 87, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 0, "crowd_ignored": 0},
    "test": {"images": 39, "boxes": 42, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 0, "crowd_ignored": 0}}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextmanager
def clock(at: float):
    """engine.runs reads `at` as the current time (for status files with an old heartbeat)."""
    with mock.patch.object(runs, "time", mock.Mock(time=lambda: at)):
        yield


def _record_epochs(recorder: MetricsRecorder, epochs_done: int, steps_per_epoch: int) -> tuple[float, Optional[int]]:
    """Step and epoch records of a run whose val mAP rises each epoch; returns (best mAP, best epoch)."""
    best, best_epoch = -1.0, None
    for epoch in range(1, epochs_done + 1):
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i + 1
            loss = 2.0 * math.exp(-step / 10) + 0.2 + 0.05 * ((step * 7) % 5) / 5
            recorder.record_step(step, epoch, loss=loss, loss_classifier=loss * 0.4, loss_box_reg=loss * 0.3,
                                 loss_objectness=loss * 0.2, loss_rpn_box_reg=loss * 0.1,
                                 lr=0.01 * min(1.0, step / steps_per_epoch), grad_norm=5.0 / (1 + step / 5),
                                 images_per_s=3.2)
        m = round(min(0.95, 0.3 + 0.2 * epoch), 4)
        recorder.record_epoch(epoch, epoch * steps_per_epoch, train_loss=round(1.5 / epoch, 4), val_map50=m,
                              val_map50_95=round(m * 0.5, 4), val_precision=round(min(0.99, m + 0.05), 4),
                              val_recall=round(m - 0.05, 4), val_f1=round(m, 4), lr=0.01 / epoch,
                              epoch_time_s=9.5, is_best=m > best)
        if m > best:
            best, best_epoch = m, epoch
    return best, best_epoch


def _write_status(run_dir: Path, name: str, state: str, pid: Optional[int], updated_at: Optional[float],
                  error: Optional[str], progress: dict) -> None:
    now = time.time()
    t0 = now - 3600
    written = "running" if state == "crashed" else state
    live = written in runs.LIVE_STATES
    if pid is None:
        pid = dead_pid() if state == "crashed" else (os.getpid() if live else 12345)
    writer = runs.StatusWriter(run_dir, run=name, pid=pid, pgid=pid, device="cpu", device_name="CPU (2 threads)",
                               started_at=t0, checkpoint_dir=f"checkpoints/{name}")
    fields = dict(state=written, ended_at=None if live else t0 + 900, eta_s=120.0 if live else None,
                  message="training" if live else state, error=error, images_per_s=3.2, **progress)
    with clock(updated_at if updated_at is not None else (now if live else t0 + 900)):
        writer.update(**fields)


def make_run(runs_dir: Path, name: str, state: str = "completed", epochs_done: int = 3, epochs: int = 3,
             steps_per_epoch: int = 4, half_written_last_line: bool = False, pid: Optional[int] = None,
             updated_at: Optional[float] = None, error: Optional[str] = None, with_test: bool = False,
             with_probes: bool = False, with_dataset: bool = True, data_root: Optional[str] = None) -> Path:
    """A run folder in `state` (queued, running, completed, stopped, failed, or crashed = running with a dead pid)."""
    run_dir = Path(runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config_from_dict({"run": {"name": name}, "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn"},
                                  "data": {"root": data_root or str(PLATES_REAL)}, "train": {"epochs": epochs}}),
                run_dir / runs.CONFIG_FILE)
    best, best_epoch = _record_epochs(MetricsRecorder([JsonlWriter(run_dir / runs.METRICS_FILE)]), epochs_done,
                                      steps_per_epoch)
    if half_written_last_line:  # a trainer killed in the middle of a line
        with open(run_dir / runs.METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write('{"type": "step", "step": 999, "epoch": 9, "lo')
    _write_status(run_dir, name, state, pid, updated_at, error, {
        "epoch": epochs_done, "epochs": epochs, "step": steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "global_step": epochs_done * steps_per_epoch, "total_steps": epochs * steps_per_epoch,
        "best": {"epoch": best_epoch, "map50": best if best >= 0 else None}})
    lines = ["=" * 60, f"Starting Training: {name}", "Device: cpu", "=" * 60]
    lines += [f"Epoch {e}: New best mAP@0.5" for e in range(1, epochs_done + 1)]
    if error:
        lines.append(f"ERROR Training failed: {error}")
    (run_dir / runs.LOG_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if with_dataset:
        runs.atomic_write_json(run_dir / runs.DATASET_FILE, PLATES_REAL_SUMMARY)
    if with_test:
        write_test_results(run_dir)
    if with_probes:
        write_probes(run_dir, epochs_done)
    return run_dir


def _picture(path: Path, text: str) -> None:
    img = Image.new("RGB", (160, 120), (90, 110, 130))
    d = ImageDraw.Draw(img)
    d.rectangle([40, 70, 120, 90], outline=(0, 220, 0), width=2)
    d.text((5, 5), text, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=85)


def _detections() -> tuple[list[dict], list[dict]]:
    """Ground truth and detections on 10 images of 160x120: 7 plates found, 3 missed, 2 false alarms."""
    gts, preds = [], []
    for i in range(10):
        plate = np.array([[40.0, 70.0, 120.0, 90.0]])
        gts.append({"image_id": i, "boxes": plate, "width": 160, "height": 120})
        found = plate + 1.0 if i < 7 else np.zeros((0, 4))
        scores = [0.99 - 0.05 * i] if i < 7 else []
        if i in (7, 8):  # a false alarm far from the plate
            found, scores = np.array([[0.0, 0.0, 20.0, 10.0]]), [0.6]
        preds.append({"image_id": i, "boxes": found, "scores": np.array(scores)})
    return gts, preds


def write_test_results(run_dir: Path) -> dict:
    """test/ as engine/evaluate.py writes it: the curves and samples from engine.metrics and engine.samples,
    metrics.json with evaluate's keys (last, as evaluate writes it). Returns metrics.json's content."""
    test = run_dir / runs.TEST_DIR
    test.mkdir(parents=True, exist_ok=True)
    gts, preds = _detections()
    matches = metrics.match_detections(gts, preds, 0.5)
    at_thr = metrics.prf_at_threshold(gts, preds, 0.5, 0.5, matches=matches)
    best = metrics.best_f1(gts, preds, 0.5, matches=matches)
    curve = metrics.pr_curve(gts, preds, 0.5, matches=matches)
    runs.atomic_write_json(test / runs.PR_CURVE_FILE, curve)
    runs.atomic_write_json(test / runs.PRF_FILE, {**metrics.prf_vs_confidence(gts, preds, iou=0.5, matches=matches),
                                                  "score_threshold": 0.5, "best_f1": best})
    images = {}
    for g in gts:
        images[g["image_id"]] = test / "images" / f"Cars{g['image_id']}.png"
        _picture(images[g["image_id"]], f"image {g['image_id']}")
    write_samples(select_samples(matches, 0.5), matches, images, test,
                  file_names={i: p.name for i, p in images.items()})
    speed = {"preprocess_ms": 2.0, "model_ms": 85.0, "postprocess_ms": 1.0, "total_ms": 88.0, "fps_batch1": 11.36}
    result = {**metrics.coco_map(gts, preds), **{k: at_thr[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
              "score_threshold": 0.5, "iou_threshold": 0.5, "best_f1": best, "pr_ap50": curve["ap"],
              "ms_per_image": speed["model_ms"], "speed": speed, "device": "cpu", "device_name": "CPU", "amp": False,
              "num_images": len(gts), "num_gt_boxes": len(gts), "params": 18930000,
              "model": "fasterrcnn_mobilenet_v3_large_320_fpn", "split": "test", "checkpoint_epoch": 3}
    runs.atomic_write_json(test / runs.TEST_METRICS_FILE, result)
    return result


def write_probes(run_dir: Path, epochs: int, ids=(0, 1)) -> None:
    """probes/ in the layout engine/probes.py writes (its write_probes needs a model and real images)."""
    probes = run_dir / runs.PROBES_DIR
    detections = {}
    for e in range(1, epochs + 1):
        folder = runs.PROBES_EPOCH_DIR.format(epoch=e)
        detections[str(e)] = {}
        for i in ids:
            _picture(probes / folder / f"{i}.jpg", f"epoch {e} img {i}")
            detections[str(e)][str(i)] = {"file": f"{folder}/{i}.jpg", "boxes": [[1, 2, 30, 12]] * e,
                                          "scores": [0.5 + 0.1 * e] * e, "best_iou": 0.5}
    runs.atomic_write_json(probes / runs.PROBES_INDEX, {
        "thumb_size": 160, "draw_threshold": 0.5,
        "images": [{"id": i, "file_name": f"Cars{i}.jpg", "width": 400, "height": 300, "gt_boxes": []} for i in ids],
        "epochs": list(range(1, epochs + 1)), "detections": detections})


def write_fake_checkpoints(ckpt_dir: Path, name: str) -> Path:
    """best.pth / last.pth files (not loadable) for tables that only list files."""
    d = Path(ckpt_dir) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / runs.BEST_CKPT).write_bytes(b"\0" * 2_000_000)
    (d / runs.LAST_CKPT).write_bytes(b"\0" * 3_000_000)
    return d


def write_real_checkpoint(path: Path, test_size: int = 128) -> Path:
    """A loadable checkpoint of the 320 model with random weights (for the Predict page)."""
    from engine.checkpoint import FORMAT, save_checkpoint
    from engine.config import config_from_dict
    from engine.model import build_model
    import torch

    cfg = config_from_dict({"model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
                            "input": {"train_sizes": [test_size], "test_size": test_size, "max_size": test_size * 2},
                            "train": {"amp": False}})
    with torch.random.fork_rng():  # the same random weights every time (tests compare where its top box
        torch.manual_seed(0)       # lands), without touching the global generator of the tests that follow
        model = build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"format": FORMAT, "model": model.state_dict(), "epoch": 1, "global_step": 1,
                           "best": {"epoch": 1, "map50": 0.0}, "config": cfg.to_dict(), "run": path.parent.name,
                           "metrics": {}})
    return path
