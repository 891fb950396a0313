"""The Results page's background jobs: export best.pth to ONNX and benchmark inference.

Each job is `python -m engine export|bench ...` started detached by engine.launch.start_job,
with its state, log and exit status in runs/<run>/jobs/ (engine/runs.py names the files). This
module builds the commands, starts them and turns a job's files into what the page shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from engine import bench_table, launch, runs

from dashboard.series import log_tail

EXPORT, BENCH = "export", "bench"
KINDS = (EXPORT, BENCH)
BENCH_SIZES = (320, 800)
DEFAULT_REPEATS = 30
POLL_EVERY = "2s"  # the page refreshes the job panel this often while a job is alive
LOG_LINES = 10


def job_dir(run_dir: Path) -> Path:
    return Path(run_dir) / runs.JOBS_DIR


def export_args(checkpoint: Path, size: Optional[int] = None) -> list[str]:
    """`export` writes checkpoints/<run>/export/best-<size>.onnx + .json (size: the checkpoint's test size)."""
    args = ["export", "--checkpoint", str(checkpoint), "--format", "onnx"]
    return args + (["--size", str(int(size))] if size else [])


def bench_args(checkpoint: Path, run_dir: Path, sizes: Sequence[int] = BENCH_SIZES,
               repeats: int = DEFAULT_REPEATS) -> list[str]:
    """`bench` writing this run's bench.json (the page's runs folder, wherever the checkpoint says)."""
    if not sizes:
        raise launch.LaunchError("choose at least one input size to benchmark")
    return ["bench", "--checkpoint", str(checkpoint), "--sizes", ",".join(str(int(s)) for s in sizes),
            "--repeats", str(int(repeats)), "--device", "cpu", "--out", str(Path(run_dir) / runs.BENCH_FILE)]


def start(kind: str, run: str, runs_dir: Path, checkpoints_dir: Path, **options) -> int:
    """Start the `kind` job on the run's best.pth; LaunchError (one line) when it cannot start."""
    if kind not in KINDS:
        raise launch.LaunchError(f"unknown job {kind!r}")
    run_dir = runs.run_path(runs_dir, run)
    checkpoint = runs.checkpoint_path(checkpoints_dir, run, "best")
    if not checkpoint.is_file():
        raise launch.LaunchError(f"run {run!r}: {checkpoint} not found; nothing to {kind}")
    args = export_args(checkpoint, **options) if kind == EXPORT else bench_args(checkpoint, run_dir, **options)
    return launch.start_job(job_dir(run_dir), kind, args)


@dataclass
class JobView:
    kind: str
    state: str  # none, running, done, failed
    headline: str  # one line: what ran, when, its outcome
    error: Optional[str]
    log: str
    pid: Optional[int] = None

    @property
    def running(self) -> bool:
        return self.state == "running"


def view(run_dir: Path, kind: str, log_lines: int = LOG_LINES) -> JobView:
    """What the page shows for the run's last `kind` job."""
    status = launch.job_status(job_dir(run_dir), kind)
    if status is None:
        return JobView(kind, "none", f"No {kind} job has run for this run yet.", None, "")
    command = " ".join(str(a) for a in status.get("command") or [])
    headline = {"running": f"{kind} running (pid {status.get('pid')})", "done": f"{kind} done",
                "failed": f"{kind} failed"}[status["state"]] + f": `{command}`"
    return JobView(kind, status["state"], headline, status.get("error"), log_tail(status["log_path"], log_lines),
                   status.get("pid"))


def refresh_every(views: Sequence[JobView]) -> Optional[str]:
    """The panel's fragment interval: POLL_EVERY while a job is alive, else None (no polling)."""
    return POLL_EVERY if any(v.running for v in views) else None


def exports(checkpoints_dir: Path, run: str) -> list[dict]:
    """Finished exports of the run (an .onnx with its .json beside it): file, input size, verification."""
    folder = runs.checkpoint_path(checkpoints_dir, run).parent / runs.EXPORT_DIR
    out = []
    for onnx in sorted(folder.glob("*.onnx")) if folder.is_dir() else []:
        meta = runs.read_json(onnx.with_suffix(".json"))
        if not isinstance(meta, dict):
            continue
        check = meta.get("verification") or {}
        out.append({"file": str(onnx), "size MB": round(onnx.stat().st_size / 1e6, 1),
                    "input": (meta.get("input") or {}).get("size"), "opset": meta.get("opset"),
                    "max box diff px": check.get("max_box_px"), "images verified": len(check.get("images") or [])})
    return out


def bench(run_dir: Path) -> Optional[tuple[list[dict], str]]:
    """(table rows, caption) of the run's last benchmark, or None when there is none."""
    result = bench_table.read_bench(run_dir)
    if not result:
        return None
    devices = sorted({r["device"] for r in result["rows"]})
    machine = "; ".join(f"{d}: {bench_table.machine_text(result, d)}" for d in devices)
    caption = (f"{result.get('created', '?')} · {result.get('image', '')} image, {result.get('repeats')} repeats · "
               f"{machine} · `python -m engine bench --checkpoint {result.get('checkpoint')}`")
    return bench_table.table_rows(result), caption
