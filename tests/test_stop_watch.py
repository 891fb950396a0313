"""engine/stop_watch.py and `python -m engine stop`: after a Stop, every process of the run ends.

The stubborn processes here are real ones that ignore SIGTERM (what a wedged teardown looks like
from outside); the last test stops a real training run from the command line.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from engine import launch, runs, stop_watch
from tests.conftest import ROOT, make_real_subset
from tests.dashboard.fixtures import make_run

# ignores SIGTERM, starts a child (in its process group, which _stubborn makes its own), writes the child's pid, sleeps
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(300)")


def _stubborn(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, str(pid_file)], start_new_session=True)
    end = time.time() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < end:
        time.sleep(0.1)
    return proc, int(pid_file.read_text())


def _gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while runs.pid_alive(pid) and time.time() < end:
        time.sleep(0.1)
    return not runs.pid_alive(pid)


def _cleanup(*pids: int) -> None:
    for pid in pids:
        if runs.pid_alive(pid):
            os.kill(pid, 9)


def test_a_process_that_outlives_its_stopped_run_is_killed_with_its_group(tmp_path, capsys):
    proc, child = _stubborn(tmp_path)
    try:
        run_dir = make_run(tmp_path, "wedged", state="running", pid=proc.pid)
        targets = stop_watch.targets_of(runs.read_status(run_dir))
        assert [(t.role, t.pid) for t in targets] == [("trainer", proc.pid)]
        launch.send_stop("wedged", tmp_path)
        time.sleep(0.5)
        assert proc.poll() is None  # the SIGTERM did nothing
        runs.write_ended(run_dir, "stopped", "stopped at step 3")  # as a trainer does before its exit
        t0 = time.time()
        killed = stop_watch.watch(run_dir, targets, kill_after_s=1.0, deadline_s=60)
        assert [t.pid for t in killed] == [proc.pid]
        assert 1.0 <= time.time() - t0 < 10
        assert proc.wait(timeout=10) == -9
        assert _gone(child), "the group's other process (a DataLoader worker, say) goes with it"
        assert f"SIGKILL to the trainer (pid {proc.pid}): still alive 1 s after the run ended" in capsys.readouterr().out
        assert runs.read_status(run_dir)["state"] == "stopped"  # the run's own end is kept
    finally:
        _cleanup(proc.pid, child)


def test_a_run_that_never_answers_the_stop_is_killed_at_the_deadline_and_marked_failed(tmp_path):
    proc, child = _stubborn(tmp_path)
    try:
        run_dir = make_run(tmp_path, "deaf", state="running", pid=proc.pid)
        targets = stop_watch.targets_of(runs.read_status(run_dir))
        launch.send_stop("deaf", tmp_path)
        killed = stop_watch.watch(run_dir, targets, kill_after_s=1.0, deadline_s=2.0)
        assert [t.pid for t in killed] == [proc.pid] and proc.wait(timeout=10) == -9
        status = runs.read_status(run_dir)
        assert status["state"] == "failed" and "no answer to the stop within 2 s" in status["error"]
    finally:
        _cleanup(proc.pid, child)


def test_processes_that_exit_by_themselves_are_left_alone(tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"], start_new_session=True)
    run_dir = make_run(tmp_path, "clean", state="running", pid=proc.pid)
    targets = stop_watch.targets_of(runs.read_status(run_dir))
    assert stop_watch.watch(run_dir, targets, kill_after_s=30, deadline_s=60) == []
    assert proc.wait(timeout=5) == 0
    assert "every process of the run exited (1)" in capsys.readouterr().out


def test_a_reused_pid_is_never_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        start = stop_watch.process_start(proc.pid)
        assert start is not None and stop_watch.alive(stop_watch.Target("trainer", proc.pid, start))
        other = stop_watch.Target("trainer", proc.pid, start - 1)  # the pid of a process that has since exited
        assert not stop_watch.alive(other)
        run_dir = make_run(tmp_path, "reused", state="stopped")
        assert stop_watch.watch(run_dir, [other], kill_after_s=0, deadline_s=0) == []
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_targets_are_the_agent_and_the_ranks_on_this_host(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        agent, rank0, rank1 = (p.pid for p in procs)
        status = {"host": runs.hostname(), "pid": agent, "launcher_pid": agent, "worker_pid": rank0,
                  "ranks": [{"rank": 0, "host": runs.hostname(), "pid": rank0},
                            {"rank": 1, "host": runs.hostname(), "pid": rank1},
                            {"rank": 2, "host": "another-node", "pid": rank1},
                            {"rank": 3, "host": runs.hostname(), "pid": 999_999_999}]}  # long gone
        found = stop_watch.targets_of(status)
        assert [(t.role, t.pid) for t in found] == [("torchrun agent", agent), ("rank 0", rank0), ("rank 1", rank1)]
        assert stop_watch.decode(stop_watch.encode(found, 12.5)) == (found, 12.5)
        assert stop_watch.targets_of({**status, "host": "another-node"}) == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_engine_stop_ends_a_real_training_run_from_the_command_line(plates_real, tmp_path):
    data = make_real_subset(plates_real, tmp_path / "data")
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(data), "num_workers": 0},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [128], "test_size": 128, "max_size": 224},
        "train": {"epochs": 200, "batch_size": 2, "device": "cpu", "amp": False}}))
    runs_dir = tmp_path / "runs"
    pid = launch.start_run(config, "cli-stop", runs_dir=runs_dir, checkpoints_dir=tmp_path / "ck")
    run_dir = runs_dir / "cli-stop"
    end = time.time() + 240
    while not (runs.read_status(run_dir) or {}).get("global_step") and time.time() < end:
        time.sleep(0.5)
    out = subprocess.run([sys.executable, "-m", "engine", "stop", "cli-stop", "--runs-dir", str(runs_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SIGTERM sent to run cli-stop (pid {pid})" in out.stdout
    assert "stop: every process of the run exited (1)" in out.stdout
    assert out.stdout.rstrip().endswith("run cli-stop: stopped")
    assert not runs.pid_alive(pid) and (tmp_path / "ck" / "cli-stop" / runs.LAST_CKPT).is_file()
    again = subprocess.run([sys.executable, "-m", "engine", "stop", "cli-stop", "--runs-dir", str(runs_dir)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and again.stderr.strip() == "error: run 'cli-stop' is stopped, not running"


def test_engine_stop_refuses_bad_input_in_one_line(tmp_path):
    def stop(*args):
        return subprocess.run([sys.executable, "-m", "engine", "stop", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    out = stop("../x", "--runs-dir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == "error: run name '../x': use letters, digits, '-', '_', '.' only"
    out = stop("nothere", "--runs-dir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == f"error: run 'nothere' has no status.json in {tmp_path}"
    out = stop("x", "--kill-after", "-1")
    assert out.returncode == 2 and out.stderr.strip().endswith("argument --kill-after: '-1': must be >= 0 seconds")
    assert list(tmp_path.iterdir()) == []  # nothing written
