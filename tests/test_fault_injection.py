"""Fault injection: a real training process SIGKILLs itself at a chosen point (ENGINE_FAULT_POINT,
engine/faults.py), then `train --resume` must finish the run as if nothing happened.

Each case checks, after the kill: every file of the run parses (status.json, each complete
metrics.jsonl line, the checkpoints load) and the run reads `crashed`; after `--resume`: the
run is `completed`, epochs 1..N appear once each in engine.runs.read_metrics and in the report,
no temp file is left, and the final weights equal those of an uninterrupted run (CPU,
num_workers 0, one thread: the run is deterministic).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import runs
from engine.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY_RUN_SETTINGS, make_real_subset

EPOCHS = 2  # 2 steps per epoch (8 train images, batch 4), one validation batch (4 images)


def _settings(data: Path, ckpts: Path) -> list[str]:
    return TINY_RUN_SETTINGS + [f"train.epochs={EPOCHS}", f"data.root={data}", f"run.checkpoints_dir={ckpts}",
                                "train.deterministic=true"]


def _train(args: list[str], fault: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_FAULT_POINT"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if fault:
        env["ENGINE_FAULT_POINT"] = fault
    return subprocess.run([sys.executable, "-m", "engine", "train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _start(work: Path, data: Path, run: str, fault: str | None = None) -> subprocess.CompletedProcess:
    args = ["--config", "configs/demo_cpu.yaml", "--run", run, "--runs-dir", str(work / "runs")]
    for s in _settings(data, work / "checkpoints"):
        args += ["--set", s]
    return _train(args, fault)


@pytest.fixture(scope="module")
def data(plates_real, tmp_path_factory) -> Path:
    return make_real_subset(plates_real, tmp_path_factory.mktemp("fault-data") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted run's final weights."""
    work = tmp_path_factory.mktemp("fault-ref")
    r = _start(work, data, "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    return load_checkpoint(work / "checkpoints" / "ref" / runs.LAST_CKPT)["model"]


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.rglob(f".*{runs.TEMP_SUFFIX}")]


def assert_every_file_parses(run_dir: Path, ckpt_dir: Path) -> None:
    assert isinstance(runs.read_status(run_dir), dict)
    raw = (run_dir / runs.METRICS_FILE).read_bytes() if (run_dir / runs.METRICS_FILE).exists() else b""
    complete = raw[: raw.rfind(b"\n") + 1].splitlines()  # a half line after a kill is allowed, at the end only
    for line in complete:
        if line.strip():
            assert isinstance(json.loads(line), dict), line
    for path in [*run_dir.rglob("*.json"), *ckpt_dir.glob("*.pth")]:
        if not path.name.startswith("."):
            (load_checkpoint(path) if path.suffix == ".pth" else json.loads(path.read_text()))


CASES = {  # fault point -> what the kill interrupts
    "start:1": "status says running, nothing built",
    "step:1": "the first optimizer step, before any checkpoint",
    "step:3": "the first step of epoch 2",
    "validation:2": "epoch 2's validation",
    "epoch-record:2": "between epoch 2's record and its last.pth",
    "checkpoint-write:2": "epoch 1's last.pth temp file written, not renamed",
    "test-eval:2": "the final test evaluation",
}


@pytest.mark.parametrize("fault", list(CASES))
def test_a_run_killed_at_a_fault_point_resumes_to_the_uninterrupted_result(fault, data, reference, tmp_path):
    from engine.report import gather

    run = "killed-" + fault.replace(":", "-")
    run_dir, ckpt_dir = tmp_path / "runs" / run, tmp_path / "checkpoints" / run
    r = _start(tmp_path, data, run, fault)
    assert r.returncode == -9, f"not killed at {fault}: rc {r.returncode}\n{r.stderr[-2000:]}"
    assert_every_file_parses(run_dir, ckpt_dir)
    assert runs.effective_state(runs.read_status(run_dir)) == "crashed"

    r = _train(["--resume", run, "--runs-dir", str(tmp_path / "runs")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_every_file_parses(run_dir, ckpt_dir)
    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["completed_at"]
    assert (run_dir / runs.TEST_DIR / runs.TEST_METRICS_FILE).is_file()
    _, epochs = runs.read_metrics(run_dir)
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert [e["epoch"] for e in gather(run, str(tmp_path / "runs"), str(tmp_path / "checkpoints"))["epochs"]] == \
        list(range(1, EPOCHS + 1))
    assert temp_files(run_dir, ckpt_dir) == []
    final = load_checkpoint(ckpt_dir / runs.LAST_CKPT)["model"]
    different = [k for k in reference if not torch.equal(reference[k], final[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
