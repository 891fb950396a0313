"""The Runs page's table: one row per run folder, built only from status.json and metrics.jsonl."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dashboard import ranks
from engine import runs

RESUMABLE = ("stopped", "failed", "crashed")
STOPPABLE = ("queued", "running", "stalled")


@dataclass
class RunRow:
    name: str
    state: str
    device: str
    epoch: Optional[int]
    epochs: Optional[int]
    best_map50: Optional[float]
    best_epoch: Optional[int]
    started_at: Optional[float]
    duration_s: Optional[float]
    eta_s: Optional[float]
    status: dict
    world_size: int = 1  # processes (GPUs) of the run

    @property
    def alive(self) -> bool:
        return self.state in runs.LIVE_STATES

    @property
    def can_stop(self) -> bool:
        return self.state in STOPPABLE

    @property
    def can_resume(self) -> bool:
        return self.state in RESUMABLE


LIVE_POLL = "3s"  # how often the Runs table refreshes while a run is queued or running


def poll_interval(rows: list[RunRow]) -> Optional[str]:
    """The Runs table's refresh interval: LIVE_POLL while a run is alive, else None (no polling)."""
    return LIVE_POLL if any(r.alive for r in rows) else None


def run_duration(status: dict, now: float) -> Optional[float]:
    """Seconds from start to end (or to now while alive, to the last heartbeat otherwise)."""
    started = status.get("started_at")
    if not started:
        return None
    if status.get("state") in runs.LIVE_STATES and runs.effective_state(status, now) in runs.LIVE_STATES:
        end = now
    else:
        end = status.get("ended_at") or status.get("updated_at") or started
    return max(0.0, float(end) - float(started))


def estimate_eta(status: dict, now: float) -> Optional[float]:
    """Seconds left for a live run: the trainer's own eta_s aged by the time since it was written,
    else elapsed time scaled by the steps still to do. None for runs that are not alive."""
    if runs.effective_state(status, now) not in runs.LIVE_STATES:
        return None
    eta = status.get("eta_s")
    updated = status.get("updated_at")
    if isinstance(eta, (int, float)) and updated:
        return max(0.0, float(eta) - max(0.0, now - float(updated)))
    done, total, started = status.get("global_step"), status.get("total_steps"), status.get("started_at")
    if done and total and started and done > 0:
        elapsed = max(0.0, now - float(started))
        return max(0.0, elapsed * (total - done) / done)
    return None


def best_from_epochs(epochs: list[dict]) -> tuple[Optional[float], Optional[int]]:
    """(best val mAP@0.5, its epoch) among epoch records; earliest epoch on ties."""
    best = runs.best_epoch_record(epochs)
    return (float(best["val_map50"]), int(best["epoch"])) if best else (None, None)


def build_row(run_dir: Path, now: Optional[float] = None) -> RunRow:
    now = time.time() if now is None else now
    status = runs.read_status(run_dir) or {}
    state = runs.effective_state(status, now) if status else "unknown"
    best = status.get("best") or {}
    best_map, best_epoch = best.get("map50"), best.get("epoch")
    if best_map is None:  # no status, or one written before the first validation: read the metrics file
        _, epochs = runs.read_metrics(run_dir)
        best_map, best_epoch = best_from_epochs(epochs)
    return RunRow(
        name=run_dir.name, state=state,
        device=str(status.get("device_name") or status.get("device") or "—"),
        epoch=status.get("epoch"), epochs=status.get("epochs"),
        best_map50=best_map, best_epoch=best_epoch,
        started_at=status.get("started_at"), duration_s=run_duration(status, now) if status else None,
        eta_s=estimate_eta(status, now) if status else None, status=status, world_size=ranks.world_size(status),
    )


def build_rows(runs_dir: Path, now: Optional[float] = None) -> list[RunRow]:
    """Every run folder (newest first)."""
    now = time.time() if now is None else now
    return [build_row(runs.run_path(runs_dir, name), now) for name in runs.list_run_names(runs_dir)]


def table_records(rows: list[RunRow]) -> list[dict]:
    """Rows as display records (column name -> value) for st.dataframe."""
    from dashboard import formatting as fmt

    out = []
    for r in rows:
        epoch = f"{r.epoch or 0}/{r.epochs}" if r.epochs else (str(r.epoch) if r.epoch else "—")
        out.append({
            "run": r.name,
            "state": r.state,
            "device": r.device,
            "processes": r.world_size,
            "epoch": epoch,
            "best mAP@0.5": None if r.best_map50 is None else round(float(r.best_map50), 4),
            "best epoch": r.best_epoch,
            "started": fmt.timestamp(r.started_at),
            "duration": fmt.duration(r.duration_s),
            "ETA": fmt.duration(r.eta_s) if r.eta_s is not None else "—",
        })
    return out
