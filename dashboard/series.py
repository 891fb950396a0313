"""Curve data for the Live page: incremental metric reading, smoothing, x axes, the run header."""
from __future__ import annotations

import datetime as dt
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

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


@dataclass
class RunTail:
    """Metrics of one run read incrementally (only new bytes per poll) plus its status."""
    run_dir: Path
    tail: runs.MetricsTail = None
    status: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    inode: Optional[int] = None

    def __post_init__(self):
        if self.tail is None:
            self.tail = runs.MetricsTail(self.run_dir / runs.METRICS_FILE)

    def poll(self) -> bool:
        """Read what is new; True when new records arrived. A replaced or truncated file is re-read."""
        path = self.run_dir / runs.METRICS_FILE
        try:
            st = os.stat(path)
            inode, size = st.st_ino, st.st_size
        except OSError:
            inode, size = None, 0
        if inode != self.inode or size < self.tail.offset:
            self.tail = runs.MetricsTail(path)
            self.inode = inode
        self.status = runs.read_status(self.run_dir) or {}
        changed = self.tail.poll()
        if changed or (not self.steps and not self.epochs):
            self.steps, self.epochs = self.tail.frames()
        return changed

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Header:
    state: str
    progress: float  # 0..1
    progress_text: str
    epoch: str
    images_per_s: Optional[float]
    eta_s: Optional[float]
    heartbeat_age_s: Optional[float]


def header(status: dict, steps: list[dict], now: Optional[float] = None) -> Header:
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
        ips = next((s.get("images_per_s") for s in reversed(steps) if s.get("images_per_s")), None)
    updated = status.get("updated_at")
    return Header(
        state=state, progress=progress, progress_text=text,
        epoch=f"{epoch}/{epochs}" if epochs else str(epoch or "—"),
        images_per_s=ips, eta_s=estimate_eta(status, now) if status else None,
        heartbeat_age_s=max(0.0, now - float(updated)) if updated else None,
    )
