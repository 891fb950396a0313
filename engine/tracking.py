"""Metrics recording: the training loop reports scalars to one recorder, writers persist them.

    recorder = MetricsRecorder([JsonlWriter(run_dir / METRICS_FILE), TensorBoardWriter(run_dir)])
    recorder.record_step(step, epoch, loss=..., lr=..., grad_norm=...)
    recorder.record_epoch(epoch, step, train_loss=..., val_map50=..., is_best=True)
    recorder.record_start(step, epochs_done, resumed)   first, by every training process

Records have exactly the shapes documented in engine/runs.py. TensorBoard scalars are all
logged against the global step, so `purge_step` on resume drops orphaned events of every tag.
Only the main process (rank 0 under torchrun) writes: `make_recorder` returns a recorder
without writers elsewhere.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional, Union

from engine.faults import fault_point
from engine.runs import METRICS_FILE, append_jsonl, end_partial_line

log = logging.getLogger(__name__)

STEP_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
             "lr", "grad_norm", "images_per_s", "data_time_s", "amp_scale", "gpu_mem_peak_mb")
EPOCH_KEYS = ("train_loss", "val_map50", "val_map50_95", "val_precision", "val_recall", "val_f1",
              "lr", "epoch_time_s", "is_best")

# record key -> TensorBoard tag
STEP_TAGS = {
    "loss": "train/loss",
    "loss_classifier": "train/loss_classifier",
    "loss_box_reg": "train/loss_box_reg",
    "loss_objectness": "train/loss_objectness",
    "loss_rpn_box_reg": "train/loss_rpn_box_reg",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "images_per_s": "train/images_per_s",
    "data_time_s": "train/data_time_s",
    "amp_scale": "train/amp_scale",
    "gpu_mem_peak_mb": "train/gpu_mem_peak_mb",
}
EPOCH_TAGS = {
    "train_loss": "train/epoch_loss",
    "val_map50": "val/mAP50",
    "val_map50_95": "val/mAP50_95",
    "val_precision": "val/precision",
    "val_recall": "val/recall",
    "val_f1": "val/f1",
}


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialized torch.distributed group."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _clean(value: Any) -> Any:
    """Plain JSON values: tensors/numpy to Python numbers, NaN/inf to None."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends each record as one line to metrics.jsonl (flushed per line). A half line a killed
    earlier process left at the end is terminated first, so it cannot swallow the next record."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        end_partial_line(self.path)

    def write(self, record: dict) -> None:
        append_jsonl(self.path, record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """The same scalars as events.out.tfevents.* under stable tags, in the run folder.

    `purge_step` (the first step this process will write) makes TensorBoard drop events a
    crashed earlier process wrote at or after that step.
    """

    def __init__(self, log_dir: Union[str, Path], purge_step: Optional[int] = None, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def write(self, record: dict) -> None:
        if record.get("type") not in ("step", "epoch"):
            return
        tags = STEP_TAGS if record.get("type") == "step" else EPOCH_TAGS
        step = int(record["step"])
        walltime = record.get("time")
        for key, tag in tags.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, float(value), global_step=step, walltime=walltime)
        if record.get("type") == "epoch":
            self.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsRecorder:
    """Builds step / epoch records and hands them to every writer."""

    def __init__(self, writers: Optional[list] = None):
        self.writers = list(writers or [])

    def _emit(self, record: dict) -> dict:
        for writer in self.writers:
            writer.write(record)
        return record

    def record_start(self, step: int, epochs_done: int, resumed: bool) -> dict:
        """The `start` record: this process continues from global step `step` after
        `epochs_done` epochs (its checkpoint); readers drop earlier records past them."""
        return self._emit({"type": "start", "step": int(step), "epoch": int(epochs_done), "time": time.time(),
                           "resumed": bool(resumed)})

    def record_step(self, step: int, epoch: int, **scalars: Any) -> dict:
        record = {"type": "step", "step": int(step), "epoch": int(epoch), "time": time.time()}
        record.update({k: _clean(scalars.get(k)) for k in STEP_KEYS})
        return self._emit(record)

    def record_epoch(self, epoch: int, step: int, **scalars: Any) -> dict:
        record = {"type": "epoch", "epoch": int(epoch), "step": int(step), "time": time.time()}
        record.update({k: _clean(scalars.get(k)) for k in EPOCH_KEYS})
        record["is_best"] = bool(scalars.get("is_best", False))
        self._emit(record)
        fault_point("epoch-record")
        return record

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            try:
                writer.close()
            except Exception as exc:  # closing must never hide the run's real outcome
                log.warning("closing %s failed: %s", type(writer).__name__, exc)


def make_recorder(run_dir: Union[str, Path], purge_step: Optional[int] = None,
                  tensorboard: bool = True, enabled: Optional[bool] = None) -> MetricsRecorder:
    """metrics.jsonl + TensorBoard in `run_dir` when `enabled` (default: on the main process);
    a recorder without writers otherwise."""
    if not (is_main_process() if enabled is None else enabled):
        return MetricsRecorder([])
    run_dir = Path(run_dir)
    writers: list = [JsonlWriter(run_dir / METRICS_FILE)]
    if tensorboard:
        try:
            writers.append(TensorBoardWriter(run_dir, purge_step=purge_step))
        except ImportError as exc:
            log.warning("TensorBoard events disabled: %s", exc)
    return MetricsRecorder(writers)
