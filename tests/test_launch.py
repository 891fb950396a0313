"""engine/launch.py: detached start, atomic name claim, stop by process group, resume/evaluate guards."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from engine import launch, runs
from engine.config import ConfigError
from tests.dashboard.fixtures import make_run


def _wait(predicate, timeout=90.0, every=0.2):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def _bad_data_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad_data.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "no-such-dataset"), "generate_if_missing": False},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "train": {"epochs": 1, "device": "cpu"}}))
    return path


def test_start_run_refuses_an_existing_name_without_starting_anything(tmp_path):
    cfg = _bad_data_config(tmp_path)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(launch.LaunchError, match="already exists"):
        launch.start_run(cfg, "taken", [], runs_dir=tmp_path / "runs")
    assert list((tmp_path / "runs" / "taken").iterdir()) == []


def test_start_run_checks_config_and_name_before_creating_the_folder(tmp_path):
    cfg = _bad_data_config(tmp_path)
    with pytest.raises(ConfigError, match="train.epochs"):
        launch.start_run(cfg, "r1", ["train.epochs=0"], runs_dir=tmp_path / "runs")
    with pytest.raises(ConfigError, match="letters"):
        launch.start_run(cfg, "bad name", [], runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs" / "r1").exists()


def test_double_start_gives_one_detached_process_that_reports_its_failure(tmp_path):
    """Two simultaneous starts with one name: one process; it shows as queued at once, then failed."""
    cfg = _bad_data_config(tmp_path)
    results, errors = [], []

    def start():
        try:
            results.append(launch.start_run(cfg, "twice", [], device="cpu", runs_dir=tmp_path / "runs",
                                            checkpoints_dir=tmp_path / "ck"))
        except launch.LaunchError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and len(errors) == 1 and "already exists" in errors[0]
    pid = results[0]
    run_dir = tmp_path / "runs" / "twice"
    status = runs.read_status(run_dir)
    assert status["state"] in ("queued", "running", "failed") and status["host"] == runs.hostname()
    assert _wait(lambda: (runs.read_status(run_dir) or {}).get("pgid") == pid)  # its own session / process group
    assert _wait(lambda: (runs.read_status(run_dir) or {}).get("state") == "failed")
    assert _wait(lambda: not runs.pid_alive(pid), 30)
    status = runs.read_status(run_dir)
    assert "no-such-dataset" in (status.get("error") or "")
    assert "no-such-dataset" in (run_dir / runs.LOG_FILE).read_text()
    assert runs.effective_state(status) == "failed"


def _sleeper(runs_dir: Path, name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    make_run(runs_dir, name, state="running", pid=proc.pid)
    return proc


def test_stop_run_signals_the_process_group(tmp_path):
    proc = _sleeper(tmp_path, "live")
    try:
        assert launch.stop_run("live", tmp_path) == proc.pid
        assert proc.wait(timeout=10) == -signal.SIGTERM
        # the detached stop watch saw it go and says so in the run's log
        log = tmp_path / "live" / runs.LOG_FILE
        assert _wait(lambda: "stop: every process of the run exited (1)" in log.read_text(), 30), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_run_refuses_runs_that_are_not_alive(tmp_path):
    make_run(tmp_path, "done")
    make_run(tmp_path, "dead", state="crashed")
    with pytest.raises(launch.LaunchError, match="not running"):
        launch.stop_run("done", tmp_path)
    with pytest.raises(launch.LaunchError, match="gone"):
        launch.stop_run("dead", tmp_path)
    with pytest.raises(launch.LaunchError, match="no status"):
        launch.stop_run("missing", tmp_path)


def test_resume_refuses_a_live_or_missing_run(tmp_path):
    make_run(tmp_path, "live", state="running")  # this test process's pid: alive
    with pytest.raises(launch.LaunchError, match="stop it before resuming"):
        launch.resume_run("live", tmp_path)
    with pytest.raises(launch.LaunchError, match="not found"):
        launch.resume_run("nope", tmp_path)
    assert not (tmp_path / "live" / ".resume.lock").exists()


def test_start_evaluate_needs_a_checkpoint(tmp_path):
    make_run(tmp_path / "runs", "r")
    with pytest.raises(launch.LaunchError, match="best.pth"):
        launch.start_evaluate("r", tmp_path / "runs", tmp_path / "ck")
    assert launch.evaluate_pid("r", tmp_path / "runs") is None
