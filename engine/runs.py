"""The run folder contract (see docs/engine.md): names, atomic writes, tolerant readers.

Every file and folder name of a run is defined here (other modules import the names), and this
module holds the only functions that write status.json (StatusWriter for the trainer; write_queued,
set_pid_if_queued and write_ended for launchers and refused starts). Writers (the trainer,
evaluate, probes, the report) and readers (the dashboard) use these names.

    runs/<run>/config.yaml  status.json  metrics.jsonl  train.log  dataset.json  events.out.tfevents.*
               test/        metrics.json pr_curve.json prf_vs_confidence.json predictions.json
                            samples.json samples/*.jpg evaluate.log evaluate.pid
               probes/      index.json epoch_NNN/<image id>.jpg
               report/      RESULTS.md img/*.png
               ranks/       rank-N.json (several processes: each rank's heartbeat)
    checkpoints/<run>/best.pth  last.pth
    runs/<run>/bench.json  the last inference benchmark (engine/bench.py)
    runs/<run>/jobs/       <kind>.json <kind>.log <kind>.exit   background export / bench jobs
    checkpoints/<run>/export/<stem>-<size>.onnx + .json (engine/export.py)

status.json   {"state", "run", "pid", "pgid", "host", "device", "device_name", "started_at",
               "updated_at", "ended_at", "epoch", "epochs", "step", "steps_per_epoch",
               "global_step", "total_steps", "best": {"epoch", "map50"}, "images_per_s",
               "eta_s", "message", "error", "checkpoint_dir", "resumed_at", "completed_at",
               "elapsed_s", "end_reason", "command", "torch_version", "cuda_version",
               "python_version", "platform"}     times are unix seconds; `completed_at` is set once,
               when the run completes, and stays when a launcher marks the run queued again;
               `end_reason` (completed runs) is null, "early_stopping" or "time_limit"; under
               train.time_limit_min "epochs"/"total_steps" are re-planned after every epoch
              several processes (torchrun, engine/distributed.py) add {"world_size", "nnodes",
               "backend", "restart_count", "max_restarts", "elastic_run_id", "launcher_pid",
               "launcher_pgid", "worker_pid", "ranks": [{"rank", "host", "pid", "step", "epoch",
               "age_s", "gpu_mem_peak_mb", "alive"}]}; "pid"/"pgid" are then torchrun's agent's
               (the process group a Stop signals) and "worker_pid" is rank 0's
metrics.jsonl {"type": "step", "step", "epoch", "time", "loss", "loss_classifier", "loss_box_reg",
               "loss_objectness", "loss_rpn_box_reg", "lr", "grad_norm", "images_per_s",
               "data_time_s", "amp_scale", "gpu_mem_peak_mb"}   (the last two null off CUDA/AMP)
              {"type": "epoch", "epoch", "step", "time", "train_loss", "val_map50", "val_map50_95",
               "val_precision", "val_recall", "val_f1", "lr", "epoch_time_s", "is_best"}
              {"type": "start", "step", "epoch", "time", "resumed"}   written first by every
              training process: the global step and the epochs done it starts from (its
              checkpoint's, 0 and 0 for a fresh start); readers drop earlier step / epoch records
              past them (dedupe_records)
              `step` is the global iteration (1-based, the number of optimizer steps done);
              `epoch` is 1-based.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from engine.errors import EngineError
from engine.faults import fault_point

# runs/<run>/
CONFIG_FILE = "config.yaml"  # the resolved config, written once at the start
STATUS_FILE = "status.json"  # the lifecycle state, replaced atomically
METRICS_FILE = "metrics.jsonl"  # step and epoch records, appended
LOG_FILE = "train.log"
DATASET_FILE = "dataset.json"  # dataset summary per split
RESUME_LOCK = ".resume.lock"  # held by a launcher while it starts `train --resume`
# runs/<run>/test/: the output of `python -m engine evaluate`
TEST_DIR = "test"
TEST_METRICS_FILE = "metrics.json"  # written last: its presence means the evaluation finished
PR_CURVE_FILE = "pr_curve.json"
PRF_FILE = "prf_vs_confidence.json"
PREDICTIONS_FILE = "predictions.json"
SAMPLES_FILE = "samples.json"
SAMPLES_DIR = "samples"
EVALUATE_LOG = "evaluate.log"  # a background evaluation's output
EVALUATE_PID = "evaluate.pid"
# runs/<run>/probes/
RANKS_DIR = "ranks"  # ranks/rank-N.json: one heartbeat file per process of a torchrun job
PROBES_DIR = "probes"
PROBES_INDEX = "index.json"
PROBES_EPOCH_DIR = "epoch_{epoch:03d}"  # .format(epoch=N)
# runs/<run>/report/
REPORT_DIR = "report"
REPORT_FILE = "RESULTS.md"
REPORT_IMG_DIR = "img"
BENCH_FILE = "bench.json"  # the last `python -m engine bench` table, replaced atomically
# runs/<run>/jobs/: background jobs started by the dashboard (engine/launch.py start_job)
JOBS_DIR = "jobs"
JOB_STATE = "{kind}.json"  # .format(kind=...): command, pid, host, started_at (written after the spawn)
JOB_LOG = "{kind}.log"  # the job's stdout and stderr
JOB_EXIT = "{kind}.exit"  # the exit status, written when the process ends: its presence means it ended
# checkpoints/<run>/
BEST_CKPT = "best.pth"
LAST_CKPT = "last.pth"
EXPORT_DIR = "export"  # `python -m engine export` output folder, beside the checkpoint

LIVE_STATES = ("queued", "running")
END_STATES = ("completed", "stopped", "failed")
DERIVED_STATES = ("crashed", "stalled")
STALL_AFTER_S = 120.0  # no heartbeat for this long while alive -> stalled

PathLike = Union[str, Path]
TEMP_SUFFIX = ".tmp"  # atomic writes go through `.<name>.<random>.tmp` in the same folder


class RunFolderWriteError(EngineError, OSError):
    """A file of the run folder cannot be written (disk full, quota, read-only, permissions)."""


def write_error(path: PathLike, exc: OSError, what: str) -> RunFolderWriteError:
    """One line naming the file, what was being written and the OS's reason."""
    return RunFolderWriteError(f"{path}: cannot write {what}: {exc.strerror or type(exc).__name__} "
                               f"[errno {exc.errno}]")


# ----------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: PathLike, data: bytes, fault: Optional[str] = None) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers never see half.

    A temp file left by a process killed in between is named `.<name>.<random>.tmp`
    (remove_temp_files deletes them when the run resumes). `fault`: engine.faults point name
    reached between the temp file and the rename (tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_temp_files(*folders: PathLike) -> list[Path]:
    """Delete the temp files of atomic writes a killed process left in `folders` (recursively).
    Call only while no other process writes there (a resuming trainer, after its liveness check)."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for tmp in folder.rglob(f".*{TEMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode("utf-8"))


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: PathLike) -> Optional[Any]:
    """The parsed file, or None when it is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- status
def hostname() -> str:
    return socket.gethostname()


def pid_alive(pid: Optional[int]) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0); check /proc.
    fields = proc_stat(pid)
    return not fields or fields[0] != b"Z"


def proc_stat(pid: int) -> Optional[list[bytes]]:
    """/proc/<pid>/stat from field 3 (the state) on, split; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split() or None
    except (OSError, IndexError):
        return None


def read_config(run_path: PathLike) -> dict:
    """The run's config.yaml as a dict; {} when it is missing or not valid YAML."""
    import yaml

    try:
        data = yaml.safe_load((Path(run_path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(run_path: PathLike) -> Optional[dict]:
    status = read_json(Path(run_path) / STATUS_FILE)
    return status if isinstance(status, dict) else None


def effective_state(status: Optional[dict], now: Optional[float] = None,
                    stall_after: float = STALL_AFTER_S) -> str:
    """The state a reader should show: the written state, or `crashed` / `stalled` derived.

    crashed: the status says queued/running, it was written on this host and the pid is gone.
    stalled: the status says queued/running but the heartbeat is older than `stall_after`.
    """
    if not status:
        return "unknown"
    state = status.get("state") or "unknown"
    if state not in LIVE_STATES:
        return state
    if status.get("host") == hostname() and status.get("pid") and not pid_alive(status.get("pid")):
        return "crashed"
    now = time.time() if now is None else now
    updated = status.get("updated_at") or status.get("started_at") or 0
    if now - float(updated) > stall_after:
        return "stalled"
    return state


class StatusWriter:
    """Holds the current status dict and replaces status.json atomically on every update.

    `enabled=False` (non-zero ranks under torchrun) keeps the dict and writes nothing.
    """

    def __init__(self, run_path: PathLike, enabled: bool = True, **initial: Any):
        self.path = Path(run_path) / STATUS_FILE
        self.enabled = enabled
        previous = (read_status(run_path) or {}) if enabled else {}
        self.status: dict = {**previous, **initial}
        self.status.setdefault("host", hostname())
        self.last_write = 0.0

    def update(self, **fields: Any) -> dict:
        """Apply `fields` and replace status.json; RunFolderWriteError when it cannot be written."""
        self.status.update(fields)
        self.status["updated_at"] = time.time()
        if self.enabled:
            try:
                atomic_write_json(self.path, self.status)
            except OSError as exc:
                raise write_error(self.path, exc, "the run status") from None
        self.last_write = self.status["updated_at"]
        return self.status

    def update_or_report(self, **fields: Any) -> bool:
        """`update`, for end states: when status.json cannot be written, the status (state and
        message) goes to stderr as one line instead of raising over the run's real outcome."""
        try:
            self.update(**fields)
            return True
        except RunFolderWriteError as exc:
            print(f"status not saved ({exc}); the run is {self.status.get('state')}: "
                  f"{self.status.get('message')}", file=sys.stderr, flush=True)
            return False

    def heartbeat(self, every: float = 5.0, **fields: Any) -> None:
        """Keep `fields`; write only when `every` seconds have passed since the last write."""
        self.status.update(fields)
        if time.time() - self.last_write >= every:
            self.update()


def _merge_status(run_path: PathLike, fields: dict) -> dict:
    """Read status.json, apply `fields` and `updated_at`, replace it atomically; returns the new status."""
    status = {**(read_status(run_path) or {}), **fields, "updated_at": time.time()}
    atomic_write_json(Path(run_path) / STATUS_FILE, status)
    return status


def write_queued(run_path: PathLike, name: str, message: str, **extra: Any) -> dict:
    """Mark a run `queued` (a launcher, before it spawns the trainer); keeps what the status holds."""
    previous = read_status(run_path) or {}
    return _merge_status(run_path, {"state": "queued", "run": name, "pid": None, "pgid": None,
                                    "host": hostname(), "message": message, "error": None, "ended_at": None,
                                    "started_at": previous.get("started_at") or time.time(), **extra})


def set_pid_if_queued(run_path: PathLike, pid: int) -> bool:
    """Record a spawned trainer's pid unless the trainer already wrote its own status."""
    status = read_status(run_path) or {}
    if status.get("state") != "queued" or status.get("pid"):
        return False
    _merge_status(run_path, {"pid": pid, "pgid": pid})
    return True


def write_ended(run_path: PathLike, state: str, message: str, error: Optional[str] = None,
                **extra: Any) -> dict:
    """End a run that never got a StatusWriter (a spawn that failed, a refused --resume)."""
    if state not in END_STATES:
        raise ValueError(f"{state!r} is not an end state ({', '.join(END_STATES)})")
    now = time.time()
    return _merge_status(run_path, {"state": state, "message": message, "error": error, "ended_at": now, **extra})


# ----------------------------------------------------------------------------- metrics
def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one record as a line and flush it (one write call per line).
    RunFolderWriteError (one line) when the file cannot be written."""
    line = json.dumps(record, default=_json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
    except OSError as exc:
        raise write_error(path, exc, f"a {record.get('type', 'metrics')} record") from None


def end_partial_line(path: PathLike) -> None:
    """Terminate a last line a killed process left half-written, so the next record starts on a
    line of its own (the half line is then skipped by readers instead of swallowing it)."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise write_error(path, exc, "the metrics file") from None


def read_jsonl(path: PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Records of complete lines from byte `offset`; returns (records, new_offset).

    A half-written last line (no newline yet) is not consumed: the next call reads it once it
    is complete. Lines that are not valid JSON objects are skipped.
    """
    records: list[dict] = []
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return records, offset
    end = data.rfind(b"\n")
    if end < 0:
        return records, offset
    for raw in data[: end + 1].splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, offset + end + 1


def dedupe_records(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) as the run's checkpoints tell them, sorted by step / epoch.

    Records are read in file order. A `start` record (written by every training process, with the
    step and epoch its checkpoint holds, 0 and 0 for a fresh start) supersedes the records before
    it that lie past that step / epoch: a process killed after them lost them with its unsaved
    state. Then the newest record per step and per epoch wins (a resumed run writes them again).
    """
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    for rec in records:
        kind = rec.get("type")
        if kind == "start" and isinstance(rec.get("step"), int) and isinstance(rec.get("epoch"), int):
            steps = {k: v for k, v in steps.items() if k <= rec["step"]}
            epochs = {k: v for k, v in epochs.items() if k <= rec["epoch"]}
        elif kind == "step" and isinstance(rec.get("step"), int):
            steps[rec["step"]] = rec
        elif kind == "epoch" and isinstance(rec.get("epoch"), int):
            epochs[rec["epoch"]] = rec
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]


def best_epoch_record(epochs: Iterable[dict]) -> Optional[dict]:
    """The epoch record with the highest val_map50 (the earliest on ties); None when none has one."""
    scored = [e for e in epochs if isinstance(e.get("val_map50"), (int, float)) and isinstance(e.get("epoch"), int)]
    return max(scored, key=lambda e: (e["val_map50"], -e["epoch"])) if scored else None


@dataclass
class MetricsTail:
    """Incremental reader of metrics.jsonl: each `poll()` reads only bytes added since the last."""
    path: Path
    offset: int = 0
    records: list = field(default_factory=list)

    def poll(self) -> bool:
        new, self.offset = read_jsonl(self.path, self.offset)
        self.records.extend(new)
        return bool(new)

    def frames(self) -> tuple[list[dict], list[dict]]:
        return dedupe_records(self.records)


def read_metrics(run_path: PathLike) -> tuple[list[dict], list[dict]]:
    records, _ = read_jsonl(Path(run_path) / METRICS_FILE)
    return dedupe_records(records)


def tail_text(path: PathLike, max_bytes: int = 20000, max_lines: int = 200) -> str:
    """The last lines of a text file (e.g. train.log), tqdm carriage returns folded."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    lines = [ln.rsplit("\r", 1)[-1] if "\r" in ln.rstrip("\r") else ln.rstrip("\r") for ln in text.split("\n")]
    return "\n".join(lines[-max_lines:])


# ----------------------------------------------------------------------------- listing
def run_path(runs_dir: PathLike, name: str) -> Path:
    return Path(runs_dir) / name


def checkpoint_path(checkpoints_dir: PathLike, name: str, which: str = "best") -> Path:
    return Path(checkpoints_dir) / name / (BEST_CKPT if which == "best" else LAST_CKPT)


def list_run_names(runs_dir: PathLike) -> list[str]:
    """Folders under runs_dir holding a status.json or config.yaml, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and ((child / STATUS_FILE).exists() or (child / CONFIG_FILE).exists()):
            found.append(child)
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.name for p in found]
