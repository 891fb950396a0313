"""The per-rank heartbeat table of a multi-process run (Live page), from the run folder alone.

Each rank of a torchrun job replaces runs/<run>/ranks/rank-N.json (engine.distributed.RankHeartbeat:
rank, host, pid, step, epoch, time, gpu_mem_peak_mb). These functions read those files (no torch,
no collective) and say for each rank how long ago it was heard from and whether it is dead: its
process is gone on this host, or it has been silent for longer than `stale_after_s`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from engine import runs

RANKS_DIR = runs.RANKS_DIR
STALE_AFTER_S = 60.0  # a rank silent this long while the run is alive is flagged


def read_rank_heartbeats(run_dir: Path) -> list[dict]:
    """Every readable runs/<run>/ranks/rank-N.json, by rank; broken or half-written files are skipped."""
    folder = Path(run_dir) / RANKS_DIR
    out = []
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        record = runs.read_json(path)
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            out.append(record)
    return sorted(out, key=lambda r: r["rank"])


def rank_rows(run_dir: Path, run_alive: bool = True, now: Optional[float] = None,
              stale_after_s: float = STALE_AFTER_S) -> list[dict]:
    """Display rows: rank, host, step, epoch, heartbeat age (s), GPU peak memory (MiB), state.

    state: "dead" when the rank's process is gone on this host while the run is alive, "silent"
    when it has not beaten for `stale_after_s` (any host), "ok" otherwise, "ended" once the run
    is no longer alive.
    """
    now = time.time() if now is None else now
    here = runs.hostname()
    rows = []
    for r in read_rank_heartbeats(run_dir):
        beat_at = r.get("time")
        age = round(now - float(beat_at), 1) if isinstance(beat_at, (int, float)) else None
        gone = r.get("host") == here and not runs.pid_alive(r.get("pid"))
        if not run_alive:
            state = "ended"
        elif gone:
            state = "dead"
        elif age is None or age > stale_after_s:
            state = "silent"
        else:
            state = "ok"
        mem = r.get("gpu_mem_peak_mb")
        rows.append({"rank": r["rank"], "host": r.get("host") or "—", "step": r.get("step"), "epoch": r.get("epoch"),
                     "heartbeat age (s)": age, "GPU peak mem (MiB)": None if mem is None else round(float(mem)),
                     "state": state})
    return rows


def problem_ranks(rows: list[dict]) -> list[int]:
    """The ranks flagged dead or silent (what a Live header shows at a glance)."""
    return [row["rank"] for row in rows if row["state"] in ("dead", "silent")]


def world_size(status: Optional[dict]) -> int:
    """The run's number of processes (1 for a run without the field: one process)."""
    try:
        return max(1, int((status or {}).get("world_size") or 1))
    except (TypeError, ValueError):
        return 1
