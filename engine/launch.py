"""Start, resume and stop engine processes detached from the caller (the dashboard).

A launched process runs `python -m engine ...` in its own session (so closing the browser or
restarting the dashboard does not stop it), with stdout and stderr appended to the run's log.
The run folder is created with os.mkdir before anything else: that is the lock that makes a
second start with the same name fail, even when two clicks arrive at once.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from engine import runs, stop_watch
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


def _spawn(args: Sequence[str], log_path: Path, wrapper: Sequence[str] = ()) -> subprocess.Popen:
    """`python -m engine <args>` in a new session, output appended to log_path.

    `wrapper` (e.g. ["/bin/sh", "-c", script]) is put in front of the command, which a shell
    script gets as "$0" "$@".

    A daemon thread waits on the child so it never lingers as a zombie of this process; if
    this process exits first, the child is re-parented and keeps running.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "engine", *args],
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
    """SIGTERM to the run's process group (the trainer saves last.pth and writes `stopped`), then a
    detached `python -m engine stop RUN --watch ...` makes sure every process of the run ends
    (engine.stop_watch: SIGKILL to one still alive 30 s after the run ended).

    Returns the signalled pid; LaunchError when the run is not alive on this host.
    """
    runs_dir = _abs(runs_dir)
    pid, targets, sent_at = send_stop(run_name, runs_dir)
    if targets:
        try:
            _spawn(["stop", run_name, "--runs-dir", str(runs_dir), "--watch", stop_watch.encode(targets, sent_at)],
                   runs_dir / run_name / runs.LOG_FILE)
        except OSError as exc:  # the stop itself is sent; only the escalation is missing
            log.warning("stop_run: cannot start the stop watch for %s (%s)", run_name, exc)
    return pid


def send_stop(run_name: str, runs_dir: PathLike = "runs") -> tuple[int, list[stop_watch.Target], float]:
    """SIGTERM to the run's process group; (the signalled pid, the run's processes as they were, when).
    LaunchError when the run is not alive on this host."""
    validate_run_name(run_name)
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
    targets = stop_watch.targets_of(status)
    pgid = status.get("pgid") or pid
    sent_at = time.time()
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
    return pid, targets, sent_at


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


# ----------------------------------------------------------------------------- background jobs (export, bench)
def _job_paths(job_dir: Path, kind: str) -> dict[str, Path]:
    return {"state": job_dir / runs.JOB_STATE.format(kind=kind), "log": job_dir / runs.JOB_LOG.format(kind=kind),
            "exit": job_dir / runs.JOB_EXIT.format(kind=kind), "lock": job_dir / f".{kind}.lock"}


def _last_error_line(log_path: Path) -> Optional[str]:
    """The CLI's `error: ...` line (the last one), else the log's last non-empty line."""
    lines = [ln.strip() for ln in runs.tail_text(log_path, max_lines=400).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1] if lines else None


def job_status(job_dir: PathLike, kind: str) -> Optional[dict]:
    """The last `kind` job in job_dir: its state file plus `state` (running, done, failed) and `error`.

    The truth is <kind>.exit (written by the wrapper shell when the command ends): 0 -> done, other
    -> failed with the log's `error:` line. No exit file and the pid gone -> failed (killed).
    None when no such job was ever started.
    """
    paths = _job_paths(Path(job_dir), kind)
    info = runs.read_json(paths["state"])
    if not isinstance(info, dict):
        return None
    info = {**info, "log_path": paths["log"], "error": None}
    try:
        code: Optional[int] = int(paths["exit"].read_text().strip())
    except (OSError, ValueError):
        code = None
    if code is None and _live_pid(info):
        return {**info, "state": "running"}
    if code == 0:
        return {**info, "state": "done", "exit_code": 0}
    if code is None:
        error = "the process ended without an exit status (killed?)"
    else:
        error = _last_error_line(paths["log"]) or f"exit status {code}"
    return {**info, "state": "failed", "exit_code": code, "error": error}


def start_job(job_dir: PathLike, kind: str, args: Sequence[str]) -> int:
    """Run `python -m engine <args>` detached as the `kind` job of job_dir; returns its pid.

    One job per kind at a time (LaunchError while one runs, even for two clicks at once: an
    O_EXCL lock file covers check and spawn). The log starts empty; a wrapper shell writes the
    command's exit status to <kind>.exit (tmp + rename) when it ends.
    """
    job_dir = _abs(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    paths = _job_paths(job_dir, kind)
    try:
        fd = os.open(paths["lock"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if time.time() - paths["lock"].stat().st_mtime < 30:
            raise LaunchError(f"a {kind} job is being started already") from None
        os.unlink(paths["lock"])  # left behind by a launcher that died
        fd = os.open(paths["lock"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    try:
        current = job_status(job_dir, kind)
        if current and current["state"] == "running":
            raise LaunchError(f"a {kind} job is already running (pid {current['pid']}); wait for it to end")
        for stale in (paths["exit"], paths["state"]):
            stale.unlink(missing_ok=True)
        paths["log"].write_bytes(b"")
        exit_tmp = paths["exit"].with_name(paths["exit"].name + ".tmp")
        tmp, final = shlex.quote(str(exit_tmp)), shlex.quote(str(paths["exit"]))
        script = f'"$0" "$@"; echo $? > {tmp} && mv {tmp} {final}'
        try:
            proc = _spawn(args, paths["log"], wrapper=["/bin/sh", "-c", script])
        except OSError as exc:
            raise LaunchError(f"cannot start the {kind} job ({exc})") from None
        runs.atomic_write_json(paths["state"], {"kind": kind, "pid": proc.pid, "host": runs.hostname(),
                                                "command": ["python", "-m", "engine", *args],
                                                "started_at": time.time()})
        return proc.pid
    finally:
        paths["lock"].unlink(missing_ok=True)
