"""dashboard/ranks.py: the per-rank heartbeat table, from real heartbeat files."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboard import new_run, ranks, runs_table
from engine import runs
from engine.config import ConfigError
from engine.launch import LaunchError, start_run

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _beat(run_dir: Path, rank: int, pid: int, at: float, step: int, mem=None, host=None) -> None:
    runs.atomic_write_json(run_dir / ranks.RANKS_DIR / f"rank-{rank}.json",
                           {"rank": rank, "host": host or runs.hostname(), "pid": pid, "step": step, "epoch": 2,
                            "time": at, "gpu_mem_peak_mb": mem})


def test_rank_rows_flag_a_dead_and_a_silent_rank(tmp_path):
    now = time.time()
    _beat(tmp_path, 0, os.getpid(), now - 2, 40, mem=1234.4)
    _beat(tmp_path, 1, _dead_pid(), now - 3, 39)
    _beat(tmp_path, 2, 12345, now - 600, 10, host="other-node")  # another host: only its age tells
    (tmp_path / ranks.RANKS_DIR / "rank-3.json").write_text('{"rank": 3, "ho')  # half-written: skipped
    rows = ranks.rank_rows(tmp_path, run_alive=True, now=now)
    assert [r["rank"] for r in rows] == [0, 1, 2]
    assert [r["state"] for r in rows] == ["ok", "dead", "silent"]
    assert rows[0]["heartbeat age (s)"] == pytest.approx(2.0) and rows[0]["GPU peak mem (MiB)"] == 1234
    assert rows[1]["step"] == 39 and rows[1]["GPU peak mem (MiB)"] is None
    assert ranks.problem_ranks(rows) == [1, 2]
    assert {r["state"] for r in ranks.rank_rows(tmp_path, run_alive=False, now=now)} == {"ended"}


def test_no_heartbeats_no_rows(tmp_path):
    assert ranks.rank_rows(tmp_path) == [] and ranks.problem_ranks([]) == []


def test_world_size_from_status():
    assert ranks.world_size({"world_size": 4}) == 4
    assert ranks.world_size({}) == ranks.world_size(None) == ranks.world_size({"world_size": "x"}) == 1


def test_runs_table_shows_the_number_of_processes(tmp_path):
    for name, extra in (("one", {}), ("two", {"world_size": 2})):
        (tmp_path / name).mkdir()
        runs.atomic_write_json(tmp_path / name / runs.STATUS_FILE,
                               {"state": "completed", "run": name, "epoch": 1, "epochs": 1, **extra})
    records = {r["run"]: r for r in runs_table.table_records(runs_table.build_rows(tmp_path))}
    assert records["one"]["processes"] == 1 and records["two"]["processes"] == 2


def test_processes_per_run_must_divide_the_batch():
    assert new_run.check_processes(2, 8) == 2
    assert new_run.default_processes() >= 1
    with pytest.raises(ConfigError, match="batch size 8 .* 3 processes"):
        new_run.check_processes(3, 8)
    with pytest.raises(ConfigError, match=">= 1"):
        new_run.check_processes(0, 8)


def test_start_run_refuses_a_process_count_before_creating_the_folder(tmp_path):
    with pytest.raises(LaunchError, match="3 processes"):
        start_run(ROOT / "configs" / "demo_cpu.yaml", "r3", [], runs_dir=tmp_path / "runs", nproc=3)
    assert not (tmp_path / "runs" / "r3").exists()


def test_resume_of_a_two_process_run_asks_for_two_processes(tmp_path):
    from engine.launch import resume_run

    run_dir = tmp_path / "runs" / "ddp"
    run_dir.mkdir(parents=True)
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, {"state": "stopped", "run": "ddp", "world_size": 2, "nnodes": 1})
    resume_run("ddp", tmp_path / "runs")
    assert runs.read_status(run_dir)["command"][-2:] == ["--nproc", "2"]
