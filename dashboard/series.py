"""Curve data for the Live page: incremental metric reading, smoothing, x axes, the run header."""
from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dashboard import metrics_columns, step_buffer
from engine import runs

X_AXES = ("step", "epoch", "wall time")
LOSS_PARTS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
EPOCH_METRICS = {
    "val_map50": "mAP@0.5", "val_map50_95": "mAP@0.5:0.95",
    "val_precision": "precision", "val_recall": "recall", "val_f1": "F1",
}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CLEARED = re.compile(r"^ {8,}(?=\S)")


def log_tail(path: Path, max_lines: int = 40) -> str:
    """The last lines of a log for display: tqdm's carriage returns folded, terminal escapes removed."""
    text = runs.tail_text(path, max_lines=max_lines * 3)
    lines = []
    for line in text.split("\n"):
        line = _ANSI.sub("", line).rstrip()
        if "\r" in line:
            line = line.rsplit("\r", 1)[-1]
        line = _CLEARED.sub("", line)  # tqdm blanks a bar with spaces before the next line
        if line.strip():
            lines.append(line)
    return "\n".join(lines[-max_lines:])


def ema(values: list, weight: float) -> list:
    """TensorBoard-style exponential moving average with bias correction; None/NaN pass through.

    weight 0 returns the values unchanged; 0.99 is very smooth.
    """
    if weight <= 0:
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if v is None or v != v:  # NaN
            out.append(v)
            continue
        n += 1
        last = last * weight + (1 - weight) * float(v)
        out.append(last / (1 - weight ** n))
    return out


def x_values(records: list[dict], axis: str, steps_per_epoch: Optional[int] = None) -> list:
    """x for each record: global step, (fractional) epoch, or wall-clock datetime."""
    if axis == "step":
        return [r.get("step") for r in records]
    if axis == "wall time":
        return [dt.datetime.fromtimestamp(r["time"]) if r.get("time") else None for r in records]
    xs = []
    for r in records:
        if r.get("type") == "epoch" or not steps_per_epoch or r.get("step") is None:
            xs.append(r.get("epoch"))
        else:
            xs.append(r["step"] / steps_per_epoch)
    return xs


def column(records: list[dict], key: str) -> list:
    return [r.get(key) for r in records]


def has_values(records: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) for r in records)


class RunTail:
    """Metrics of one run read incrementally (only new bytes per poll) plus its status.

    Step records live in a columnar `StepBuffer` (downsampled incrementally); epoch records are
    few and stay dicts, the newest per epoch. One RunTail may serve several browser sessions:
    `poll` holds a lock, and `version` changes whenever anything shown could have changed.
    """

    def __init__(self, run_dir: Path, max_buckets: int = step_buffer.MAX_BUCKETS):
        self.run_dir = Path(run_dir)
        self.max_buckets = max_buckets
        self.file = metrics_columns.MetricsFile(self.run_dir / runs.METRICS_FILE)
        self.buffer = step_buffer.StepBuffer(max_buckets)
        self._epochs: dict[int, dict] = {}
        self.epochs: list[dict] = []
        self.status: dict = {}
        self._status_key = None
        self.version = 0
        self.lock = threading.Lock()

    def poll(self) -> bool:
        """Read what is new; True when new records arrived. A replaced or truncated file is re-read."""
        with self.lock:
            self._read_status()
            if not self.file.changed_on_disk():
                return False
            generation = self.file.generation
            chunk = self.file.read_new()
            if self.file.generation != generation:  # replaced or truncated: start over
                self.buffer = step_buffer.StepBuffer(self.max_buckets)
                self._epochs = {}
                self.epochs = []
                self.version += 1
            if not len(chunk) and not chunk.epochs:
                return False
            self.buffer.add(chunk)
            if chunk.epochs:
                for e in chunk.epochs:
                    self._epochs[e["epoch"]] = e  # the last write of an epoch wins
                self.epochs = [self._epochs[k] for k in sorted(self._epochs)]
            self.version += 1
            return True

    def _read_status(self) -> None:
        path = self.run_dir / runs.STATUS_FILE
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._status_key or key is None:
            self.status = runs.read_status(self.run_dir) or {}
            self._status_key = key

    @property
    def steps_per_epoch(self) -> Optional[int]:
        return self.status.get("steps_per_epoch")

    @property
    def signature(self) -> tuple:
        """Changes whenever the curves of this run could look different."""
        return (str(self.run_dir), self.version, self.steps_per_epoch)

    @property
    def name(self) -> str:
        return self.run_dir.name


def steps_in_x_range(tail: RunTail, x_axis: str, x0, x1) -> Optional[tuple[int, int]]:
    """The (first, last) step whose x on the given axis lies in [x0, x1] (a box drawn on a chart), or None.

    x is a step number, a fractional epoch, or for "wall time" a date string / ms since 1970 (local time).
    """
    buf = tail.buffer
    if not len(buf):
        return None
    try:
        if x_axis == "wall time":
            lo, hi = (_as_unix_time(v) for v in (x0, x1))
            times = buf.column("time")
            inside = np.flatnonzero((times >= min(lo, hi)) & (times <= max(lo, hi)))
            if not len(inside):
                return None
            steps = buf.column("step")[inside]
            return int(steps.min()), int(steps.max())
        lo, hi = sorted((float(x0), float(x1)))
        if x_axis == "epoch":
            spe = tail.steps_per_epoch or 0
            if not spe:
                return None
            lo, hi = lo * spe, hi * spe
    except (TypeError, ValueError, OverflowError):
        return None
    first, last = int(np.ceil(lo)), int(np.floor(hi))
    return (first, last) if last >= first else None


def _as_unix_time(value) -> float:
    """Plotly's date value (ms since 1970, or 'YYYY-MM-DD HH:MM:SS.fff') in local time -> unix seconds."""
    if isinstance(value, (int, float)):
        return float(value) / 1000.0 - time.localtime().tm_gmtoff
    return dt.datetime.fromisoformat(str(value).replace(" ", "T")).timestamp()


def step_csv(tail: RunTail) -> bytes:
    """Every step record held (one row per step, the last write of a step) as CSV; columns that are
    empty for the whole run are left out, a missing value is an empty field."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    buf = tail.buffer
    columns = {"step": buf.column("step")}
    for k in metrics_columns.STEP_COLUMNS:
        values = buf.column(k)
        if np.isfinite(values).any():
            columns[k] = pa.array(values, mask=~np.isfinite(values))
    sink = pa.BufferOutputStream()
    pcsv.write_csv(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def epoch_csv(tail: RunTail) -> bytes:
    import pandas as pd

    return pd.DataFrame(tail.epochs).to_csv(index=False).encode("utf-8")


@dataclass
class Header:
    state: str
    progress: float  # 0..1
    progress_text: str
    epoch: str
    images_per_s: Optional[float]
    eta_s: Optional[float]
    heartbeat_age_s: Optional[float]


def header(status: dict, last_images_per_s: Optional[float] = None, now: Optional[float] = None) -> Header:
    """The Live page's per-run header values."""
    from dashboard.runs_table import estimate_eta

    now = time.time() if now is None else now
    state = runs.effective_state(status, now) if status else "unknown"
    epoch, epochs = status.get("epoch") or 0, status.get("epochs")
    done, total = status.get("global_step"), status.get("total_steps")
    if done is not None and total:
        progress = min(1.0, done / total)
        text = f"step {done}/{total}"
    elif epochs:
        progress = min(1.0, epoch / epochs)
        text = f"epoch {epoch}/{epochs}"
    else:
        progress, text = 0.0, "—"
    if state == "completed":
        progress = 1.0
    ips = status.get("images_per_s")
    if ips is None:
        ips = last_images_per_s
    updated = status.get("updated_at")
    return Header(
        state=state, progress=progress, progress_text=text,
        epoch=f"{epoch}/{epochs}" if epochs else str(epoch or "—"),
        images_per_s=ips, eta_s=estimate_eta(status, now) if status else None,
        heartbeat_age_s=max(0.0, now - float(updated)) if updated else None,
    )
