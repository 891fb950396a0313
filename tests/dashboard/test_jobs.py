"""The Results page's background jobs (dashboard/jobs.py on engine.launch.start_job) with real processes."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dashboard import jobs
from engine import launch, runs
from tests.dashboard.fixtures import make_run, write_real_checkpoint


def wait_until_ended(run_dir, kind, timeout=240.0) -> jobs.JobView:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = jobs.view(run_dir, kind)
        if not v.running:
            return v
        time.sleep(0.5)
    pytest.fail(f"{kind} job still running after {timeout} s:\n{jobs.view(run_dir, kind).log}")


@pytest.fixture
def tiny(tmp_path):
    runs_dir, ckpt_dir = tmp_path / "runs", tmp_path / "checkpoints"
    run_dir = make_run(runs_dir, "tiny")
    write_real_checkpoint(ckpt_dir / "tiny" / runs.BEST_CKPT, test_size=96)
    return runs_dir, ckpt_dir, run_dir


def test_bench_job_runs_detached_refuses_a_second_start_and_ends_done(tiny):
    runs_dir, ckpt_dir, run_dir = tiny
    assert jobs.view(run_dir, jobs.BENCH).state == "none" and jobs.bench(run_dir) is None
    pid = jobs.start(jobs.BENCH, "tiny", runs_dir, ckpt_dir, sizes=[96], repeats=2)
    v = jobs.view(run_dir, jobs.BENCH)
    assert v.running and v.pid == pid and os.getpgid(pid) == pid  # own session, detached from us
    assert jobs.refresh_every([v, jobs.view(run_dir, jobs.EXPORT)]) == jobs.POLL_EVERY
    with pytest.raises(launch.LaunchError, match=rf"a bench job is already running \(pid {pid}\)"):
        jobs.start(jobs.BENCH, "tiny", runs_dir, ckpt_dir, sizes=[96], repeats=2)
    v = wait_until_ended(run_dir, jobs.BENCH)
    assert v.state == "done" and v.error is None, v.log
    assert "| 96 | pytorch fp32 | cpu |" in v.log and str(run_dir / runs.BENCH_FILE) in v.log
    assert jobs.refresh_every([v]) is None
    rows, caption = jobs.bench(run_dir)
    assert [(r["input"], r["backend"], r["device"]) for r in rows][:1] == [(96, "pytorch fp32", "cpu")]
    assert rows[0]["batch-1 median ms"] > 0 and rows[0]["FPS (batch 1)"] > 0 and "2 repeats" in caption
    # a new start after the end is accepted and replaces the log
    jobs.start(jobs.BENCH, "tiny", runs_dir, ckpt_dir, sizes=[96], repeats=1)
    assert wait_until_ended(run_dir, jobs.BENCH).state == "done"


def test_failed_job_shows_the_cli_error_as_one_line(tiny):
    runs_dir, ckpt_dir, run_dir = tiny
    (ckpt_dir / "tiny" / runs.BEST_CKPT).write_bytes(b"not a checkpoint")
    jobs.start(jobs.EXPORT, "tiny", runs_dir, ckpt_dir)
    v = wait_until_ended(run_dir, jobs.EXPORT)
    assert v.state == "failed" and v.error and "\n" not in v.error and "Traceback" not in v.log
    assert f"error: {v.error}" in v.log and "best.pth" in v.error


def test_export_job_writes_a_verified_model_listed_for_the_page(tiny):
    runs_dir, ckpt_dir, run_dir = tiny
    jobs.start(jobs.EXPORT, "tiny", runs_dir, ckpt_dir, size=96)
    v = wait_until_ended(run_dir, jobs.EXPORT)
    assert v.state == "done", v.log
    [row] = jobs.exports(ckpt_dir, "tiny")
    assert row["file"] == str(ckpt_dir / "tiny" / runs.EXPORT_DIR / "best-96.onnx") and row["input"] == 96
    assert row["images verified"] >= 2 and row["max box diff px"] <= 1.0


def test_killed_job_is_failed_and_missing_checkpoint_is_refused(tiny):
    runs_dir, ckpt_dir, run_dir = tiny
    pid = jobs.start(jobs.BENCH, "tiny", runs_dir, ckpt_dir, sizes=[96], repeats=50)
    os.killpg(pid, signal.SIGKILL)
    v = wait_until_ended(run_dir, jobs.BENCH, timeout=30)
    assert v.state == "failed" and v.error == "the process ended without an exit status (killed?)"
    with pytest.raises(launch.LaunchError, match=r"run 'nope': .*best.pth not found; nothing to export"):
        jobs.start(jobs.EXPORT, "nope", runs_dir, ckpt_dir)
    with pytest.raises(launch.LaunchError, match="at least one input size"):
        jobs.start(jobs.BENCH, "tiny", runs_dir, ckpt_dir, sizes=[])
