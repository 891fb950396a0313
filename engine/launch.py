"""Start, resume and stop engine processes detached from the caller (the dashboard).

A launched process runs `python -m engine ...` in its own session (so closing the browser or
restarting the dashboard does not stop it), with stdout and stderr appended to the run's log.
The run folder is created with os.mkdir before anything else: that is the lock that makes a
second start with the same name fail, even when two clicks arrive at once.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from engine import runs
from engine.config import load_config, validate_run_name
from engine.errors import EngineError
from engine.runs import EVALUATE_LOG, EVALUATE_PID

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

PathLike = Union[str, Path]


class LaunchError(EngineError):
    """A run cannot be started, resumed or stopped; the message says why in one line."""


def _abs(path: PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (Path.cwd() / path)


def _spawn(args: Sequence[str], log_path: Path) -> subprocess.Popen:
    """`python -m engine <args>` in a new session, output appended to log_path.

    A daemon thread waits on the child so it never lingers as a zombie of this process; if
    this process exits first, the child is re-parented and keeps running.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", *args],
            cwd=str(PROJECT_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return proc


def start_run(config_path: PathLike, run_name: str, overrides: Optional[list[str]] = None,
              data_root: Optional[PathLike] = None, device: Optional[str] = None,
              runs_dir: PathLike = "runs", checkpoints_dir: Optional[PathLike] = None, nproc: int = 1) -> int:
    """Start `python -m engine train` detached; returns its pid.

    `nproc` > 1 trains on that many processes (GPUs): the child replaces itself with torchrun
    (engine/distributed_launch.py), so the pid returned is torchrun's agent, whose process group
    stop_run signals.

    The config and overrides are validated first (ConfigError). The run folder is created
    atomically; an existing name raises LaunchError. `checkpoints_dir` (an addition to the
    brief's signature) sets run.checkpoints_dir for the child.
    """
    validate_run_name(run_name)
    overrides = list(overrides or [])
    runs_dir = _abs(runs_dir)
    all_overrides = overrides + [f"run.runs_dir={runs_dir}"]
    if checkpoints_dir is not None:
        all_overrides.append(f"run.checkpoints_dir={_abs(checkpoints_dir)}")
    cfg = load_config(config_path, all_overrides)  # a bad value fails here, before any folder exists
    if int(nproc) < 1 or cfg.train.batch_size % int(nproc):
        raise LaunchError(f"{nproc} processes: need >= 1 dividing train.batch_size ({cfg.train.batch_size}, "
                          f"the global batch)")

    runs_dir.mkdir(parents=True, exist_ok=True)
    run_dir = runs_dir / run_name
    try:
        os.mkdir(run_dir)
    except FileExistsError:
        raise LaunchError(f"run {run_name!r} already exists in {runs_dir}; choose another name") from None

    args = ["train", "--config", str(_abs(config_path)), "--run", run_name]
    if data_root:
        args += ["--data", str(_abs(data_root))]
    if device:
        args += ["--device", device]
    for item in all_overrides:
        args += ["--set", item]
    if int(nproc) > 1:
        args += ["--nproc", str(int(nproc))]
    runs.write_queued(run_dir, run_name, "launched", started_at=time.time(), command=args)
    try:
        proc = _spawn(args, run_dir / runs.LOG_FILE)
    except OSError as exc:
        runs.write_ended(run_dir, "failed", f"cannot start: {exc}", error=f"cannot start: {exc}")
        raise LaunchError(f"run {run_name!r}: cannot start the trainer ({exc})") from None
    runs.set_pid_if_queued(run_dir, proc.pid)
    return proc.pid


def _live_pid(status: Optional[dict]) -> Optional[int]:
    """The pid of a process that is still alive on this host according to the status, else None."""
    if not status or status.get("host") != runs.hostname():
        return None
    pid = status.get("pid")
    return pid if runs.pid_alive(pid) else None


def resume_run(run_name: str, runs_dir: PathLike = "runs") -> int:
    """Resume a stopped, failed or crashed run in the same folder; returns the new pid.
    A run of several processes on one machine resumes on as many (`--nproc`)."""
    validate_run_name(run_name)
    runs_dir = _abs(runs_dir)
    run_dir = runs_dir / run_name
    if not run_dir.is_dir():
        raise LaunchError(f"run {run_name!r} not found in {runs_dir}")
    lock = run_dir / runs.RESUME_LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime < 30:
            raise LaunchError(f"run {run_name!r} is being resumed already") from None
        os.unlink(lock)  # left behind by a launcher that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    try:
        status = runs.read_status(run_dir)
        state = runs.effective_state(status)
        if state in runs.LIVE_STATES or _live_pid(status):
            raise LaunchError(f"run {run_name!r} is {state}; stop it before resuming")
        if status and status.get("host") not in (None, runs.hostname()) and state == "stalled":
            raise LaunchError(f"run {run_name!r} runs on host {status.get('host')}; resume it there")
        args = ["train", "--resume", run_name, "--runs-dir", str(runs_dir)]
        nproc = int((status or {}).get("world_size") or 1)
        if nproc > 1 and int((status or {}).get("nnodes") or 1) == 1:  # as many processes as before
            args += ["--nproc", str(nproc)]
        runs.write_queued(run_dir, run_name, "resuming", command=args)
        proc = _spawn(args, run_dir / runs.LOG_FILE)
        runs.set_pid_if_queued(run_dir, proc.pid)
        return proc.pid
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass


def stop_run(run_name: str, runs_dir: PathLike = "runs") -> int:
    """SIGTERM to the run's process group (the trainer saves last.pth and writes `stopped`).

    Returns the signalled pid; LaunchError when the run is not alive on this host.
    """
    run_dir = _abs(runs_dir) / run_name
    status = runs.read_status(run_dir)
    if not status:
        raise LaunchError(f"run {run_name!r} has no status.json in {run_dir.parent}")
    if status.get("state") not in runs.LIVE_STATES:
        raise LaunchError(f"run {run_name!r} is {status.get('state')}, not running")
    if status.get("host") != runs.hostname():
        raise LaunchError(f"run {run_name!r} runs on host {status.get('host')}; stop it there")
    pid = _live_pid(status)
    if not pid:
        raise LaunchError(f"run {run_name!r}: process {status.get('pid')} is gone (crashed)")
    pgid = status.get("pgid") or pid
    log.info("stop_run: SIGTERM to run %s (pid %s, process group %s)", run_name, pid, pgid)
    try:
        if pgid == os.getpgid(pid):
            os.killpg(pgid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise LaunchError(f"run {run_name!r}: process {pid} is gone") from None
    except PermissionError:
        raise LaunchError(f"run {run_name!r}: not allowed to signal process {pid}") from None
    return pid


def evaluate_pid(run_name: str, runs_dir: PathLike = "runs") -> Optional[int]:
    """The pid of this run's background evaluation while it is alive, else None."""
    pid_file = _abs(runs_dir) / run_name / runs.TEST_DIR / EVALUATE_PID
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if runs.pid_alive(pid) else None


def start_evaluate(run_name: str, runs_dir: PathLike = "runs", checkpoints_dir: PathLike = "checkpoints",
                   which: str = "best", device: Optional[str] = None, split: str = "test") -> int:
    """Run `python -m engine evaluate --checkpoint <ckpt> --out runs/<run>/test` in the background.

    Output goes to runs/<run>/test/evaluate.log; one evaluation per run at a time.
    """
    validate_run_name(run_name)
    ckpt = runs.checkpoint_path(_abs(checkpoints_dir), run_name, which)
    if not ckpt.is_file():
        raise LaunchError(f"run {run_name!r}: checkpoint {ckpt} not found")
    if evaluate_pid(run_name, runs_dir):
        raise LaunchError(f"run {run_name!r}: an evaluation is already running")
    out = _abs(runs_dir) / run_name / runs.TEST_DIR
    out.mkdir(parents=True, exist_ok=True)
    args = ["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--split", split]
    if device:
        args += ["--device", device]
    proc = _spawn(args, out / EVALUATE_LOG)
    runs.atomic_write_text(out / EVALUATE_PID, f"{proc.pid}\n")
    return proc.pid
