"""Run folders written exactly per the run-folder contract (engine/runs.py), for dashboard tests.

make_run(runs_dir, "name", state="completed") writes status.json, metrics.jsonl, config.yaml,
train.log and dataset.json; with_test adds test/{metrics,pr_curve,prf_vs_confidence,samples}.json
and sample images; with_probes adds probes/epoch_NNN/*.jpg + index.json.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml
from PIL import Image, ImageDraw

from engine import runs
from engine.config import Config

from tests.conftest import PLATES_REAL  # noqa: E402  (one place finds the real dataset)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped) on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _step_records(epoch: int, steps_per_epoch: int, t0: float) -> list[dict]:
    out = []
    for i in range(steps_per_epoch):
        step = (epoch - 1) * steps_per_epoch + i + 1
        loss = 2.0 * math.exp(-step / 10) + 0.2 + 0.05 * ((step * 7) % 5) / 5
        out.append({"type": "step", "step": step, "epoch": epoch, "time": t0 + step * 2.0, "loss": loss,
                    "loss_classifier": loss * 0.4, "loss_box_reg": loss * 0.3, "loss_objectness": loss * 0.2,
                    "loss_rpn_box_reg": loss * 0.1, "lr": 0.01 * min(1.0, step / steps_per_epoch),
                    "grad_norm": 5.0 / (1 + step / 5), "images_per_s": 3.2})
    return out


def _epoch_record(epoch: int, steps_per_epoch: int, t0: float, best_so_far: float) -> dict:
    m = round(min(0.95, 0.3 + 0.2 * epoch), 4)
    return {"type": "epoch", "epoch": epoch, "step": epoch * steps_per_epoch, "time": t0 + epoch * steps_per_epoch * 2.0 + 1,
            "train_loss": round(1.5 / epoch, 4), "val_map50": m, "val_map50_95": round(m * 0.5, 4),
            "val_precision": round(min(0.99, m + 0.05), 4), "val_recall": round(m - 0.05, 4),
            "val_f1": round(m, 4), "lr": 0.01 / epoch, "epoch_time_s": 9.5, "is_best": m > best_so_far}


def make_run(runs_dir: Path, name: str, state: str = "completed", epochs_done: int = 3, epochs: int = 3,
             steps_per_epoch: int = 4, half_written_last_line: bool = False, pid: Optional[int] = None,
             updated_at: Optional[float] = None, error: Optional[str] = None, with_test: bool = False,
             with_probes: bool = False, with_dataset: bool = True, data_root: Optional[str] = None) -> Path:
    """A run folder in `state` (queued, running, completed, stopped, failed, or crashed = running with a dead pid)."""
    run_dir = Path(runs_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    t0 = now - 3600
    cfg = Config().to_dict()
    cfg["run"]["name"] = name
    cfg["model"]["name"] = "fasterrcnn_mobilenet_v3_large_320_fpn"
    cfg["data"]["root"] = data_root or str(PLATES_REAL)
    cfg["train"]["epochs"] = epochs
    (run_dir / runs.CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")

    records, best, best_epoch = [], -1.0, None
    for e in range(1, epochs_done + 1):
        records += _step_records(e, steps_per_epoch, t0)
        rec = _epoch_record(e, steps_per_epoch, t0, best)
        if rec["is_best"]:
            best, best_epoch = rec["val_map50"], e
        records.append(rec)
    with open(run_dir / runs.METRICS_FILE, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        if half_written_last_line:
            fh.write('{"type": "step", "step": 999, "epoch": 9, "lo')

    written_state = "running" if state == "crashed" else state
    if pid is None:
        pid = dead_pid() if state == "crashed" else (os.getpid() if state in runs.LIVE_STATES else 12345)
    live = written_state in runs.LIVE_STATES
    status = {
        "state": written_state, "run": name, "pid": pid, "pgid": pid, "host": runs.hostname(),
        "device": "cpu", "device_name": "CPU (2 threads)", "started_at": t0,
        "updated_at": updated_at if updated_at is not None else (now if live else t0 + 900),
        "ended_at": None if live else t0 + 900, "epoch": epochs_done, "epochs": epochs,
        "step": steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "global_step": epochs_done * steps_per_epoch, "total_steps": epochs * steps_per_epoch,
        "best": {"epoch": best_epoch, "map50": best if best >= 0 else None}, "images_per_s": 3.2,
        "eta_s": 120.0 if live else None, "message": "training" if live else state,
        "error": error, "checkpoint_dir": f"checkpoints/{name}",
    }
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, status)
    lines = ["=" * 60, f"Starting Training: {name}", "Device: cpu", "=" * 60]
    lines += [f"Epoch {e}: New best mAP@0.5" for e in range(1, epochs_done + 1)]
    if error:
        lines.append(f"ERROR Training failed: {error}")
    (run_dir / runs.LOG_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if with_dataset:
        runs.atomic_write_json(run_dir / runs.DATASET_FILE, {
            "train": {"images": 264, "boxes": 295, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 1, "crowd_ignored": 0},
            "valid": {"images": 75, "boxes": 87, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 0, "crowd_ignored": 0},
            "test": {"images": 39, "boxes": 42, "empty_images": 0, "dropped_boxes": 0, "clipped_boxes": 0, "crowd_ignored": 0}})
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


def write_test_results(run_dir: Path, map50: float = 0.62) -> None:
    test = run_dir / runs.TEST_DIR
    test.mkdir(parents=True, exist_ok=True)
    recall = [i / 10 for i in range(1, 9)]
    precision = [1.0, 1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6]
    runs.atomic_write_json(test / "pr_curve.json", {
        "iou": 0.5, "num_gt": 10, "scores": [0.99 - i * 0.1 for i in range(8)], "precision": precision,
        "recall": recall, "precision_envelope": precision, "ap": map50})
    thresholds = [i / 100 for i in range(101)]
    runs.atomic_write_json(test / "prf_vs_confidence.json", {
        "iou": 0.5, "num_gt": 10, "threshold": thresholds,
        "precision": [0.5 + 0.5 * t for t in thresholds], "recall": [0.9 - 0.8 * t for t in thresholds],
        "f1": [0.6 for _ in thresholds], "score_threshold": 0.5, "best_f1": {"threshold": 0.42, "f1": 0.7}})
    for kind in ("good_01_3", "missed_01_7"):
        _picture(test / "samples" / f"{kind}.jpg", kind)
    runs.atomic_write_json(test / "samples.json", {"score_threshold": 0.5, "good": [
        {"kind": "good", "image_id": 3, "gt_count": 1, "pred_count": 1, "iou": 0.91, "confidence": 0.98,
         "reasons": [], "file": "samples/good_01_3.jpg", "file_name": "Cars3.jpg"}], "challenging": [
        {"kind": "missed", "image_id": 7, "gt_count": 2, "pred_count": 1, "iou": None, "confidence": None,
         "reasons": ["small plate (0.4% of the image)"], "file": "samples/missed_01_7.jpg", "file_name": "Cars7.jpg"}]})
    runs.atomic_write_json(test / "metrics.json", {
        "map50": map50, "map50_95": map50 / 2, "map75": map50 / 3, "precision": 0.8, "recall": 0.7, "f1": 0.7467,
        "tp": 7, "fp": 2, "fn": 3, "score_threshold": 0.5, "iou_threshold": 0.5,
        "best_f1": {"threshold": 0.42, "precision": 0.78, "recall": 0.75, "f1": 0.76, "tp": 8, "fp": 2, "fn": 2},
        "ms_per_image": 85.0, "speed": {"preprocess_ms": 2.0, "model_ms": 85.0, "postprocess_ms": 1.0,
                                        "total_ms": 88.0, "fps_batch1": 11.36},
        "device": "cpu", "device_name": "CPU", "amp": False, "num_images": 39, "params": 18930000,
        "model": "fasterrcnn_mobilenet_v3_large_320_fpn"})


def write_probes(run_dir: Path, epochs: int, ids=(0, 1)) -> None:
    probes = run_dir / runs.PROBES_DIR
    detections = {}
    for e in range(1, epochs + 1):
        detections[str(e)] = {}
        for i in ids:
            _picture(probes / f"epoch_{e:03d}" / f"{i}.jpg", f"epoch {e} img {i}")
            detections[str(e)][str(i)] = {"file": f"epoch_{e:03d}/{i}.jpg", "boxes": [[1, 2, 30, 12]] * e,
                                          "scores": [0.5 + 0.1 * e] * e, "best_iou": 0.5}
    runs.atomic_write_json(probes / "index.json", {
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

    cfg = config_from_dict({"model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
                            "input": {"train_sizes": [test_size], "test_size": test_size, "max_size": test_size * 2},
                            "train": {"amp": False}})
    model = build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"format": FORMAT, "model": model.state_dict(), "epoch": 1, "global_step": 1,
                           "best": {"epoch": 1, "map50": 0.0}, "config": cfg.to_dict(), "run": path.parent.name,
                           "metrics": {}})
    return path
