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
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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


def test_killed_before_its_first_checkpoint_resumes_from_step_0_from_another_directory(data, tmp_path):
    """Started in a project folder with a relative data.root; killed right after start (no
    checkpoint yet); `--resume` from the repository folder starts over with the saved config."""
    proj = tmp_path / "proj"
    shutil.copytree(data, proj / "data")
    settings = [s for s in _settings(Path("data"), Path("checkpoints")) if not s.startswith("train.epochs")]
    args = ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), "--run", "early", "--runs-dir", "runs",
            "--set", "train.epochs=1"] + [x for s in settings for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ENGINE_FAULT_POINT": "start:1"}
    r = subprocess.run([sys.executable, "-m", "engine", "train", *args], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == -9, r.stderr[-2000:]
    saved = yaml.safe_load((proj / "runs" / "early" / runs.CONFIG_FILE).read_text())
    assert saved["data"]["root"] == str(proj / "data") and saved["run"]["checkpoints_dir"] == str(proj / "checkpoints")
    assert runs.effective_state(runs.read_status(proj / "runs" / "early")) == "crashed"
    r = _train(["--resume", "early", "--runs-dir", str(proj / "runs")])  # cwd: the repository
    assert r.returncode == 0, r.stderr[-3000:]
    assert runs.read_status(proj / "runs" / "early")["state"] == "completed"
    assert [e["epoch"] for e in runs.read_metrics(proj / "runs" / "early")[1]] == [1]
    assert load_checkpoint(proj / "checkpoints" / "early" / runs.LAST_CKPT)["global_step"] == 2


def test_a_killed_validation_worker_fails_the_run_with_one_line(data, tmp_path):
    """The validation loader's worker is SIGKILLed at its first image (the OOM killer's way):
    the run ends `failed` with one line naming the worker, and the process exits."""
    settings = [s for s in _settings(data, tmp_path / "checkpoints") if not s.startswith("data.num_workers")]
    args = ["--config", "configs/demo_cpu.yaml", "--run", "val-worker", "--runs-dir", str(tmp_path / "runs"),
            "--set", "data.num_workers=1"] + [x for s in settings for x in ("--set", s)]
    r = _train(args, fault="eval-image:1")
    errors = [ln for ln in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", r.stderr).splitlines() if ln.startswith("error: ")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    names_worker = re.compile(r"DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal|exited unexpectedly)")
    assert len(errors) == 1 and names_worker.search(errors[0]), errors
    status = runs.read_status(tmp_path / "runs" / "val-worker")
    assert status["state"] == "failed" and "\n" not in status["error"] and names_worker.search(status["error"])
    assert "validating epoch 1" in (tmp_path / "runs" / "val-worker" / runs.LOG_FILE).read_text() or \
        status["epoch"] == 1


def _tiny_cfg(data: Path, work: Path, *extra: str):
    from engine.config import load_config

    return load_config(ROOT / "configs" / "demo_cpu.yaml", _settings(data, work / "checkpoints") + [
        f"run.runs_dir={work / 'runs'}", *extra])


def test_train_without_the_cli_ends_its_loader_workers_after_a_worker_error(data, tmp_path):
    """train() called from Python (no engine.cli cleanup): a worker's error ends the run and the
    loop's `finally` has shut the worker down, though the exception (and its traceback) lives on."""
    import multiprocessing

    from engine.errors import EngineError
    from engine.train import train
    from tests.conftest import corrupt_png_same_size

    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    name = json.loads((bad / "train" / "_annotations.coco.json").read_text())["images"][0]["file_name"]
    corrupt_png_same_size(data / "train" / name, bad / "train" / name)
    with pytest.raises(EngineError, match="unreadable image") as caught:
        train(_tiny_cfg(bad, tmp_path, "data.num_workers=1", "train.batch_size=8"), "bad-worker")
    assert caught.value.__traceback__ is not None
    assert multiprocessing.active_children() == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root; skipped where mount is not allowed)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as fh:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError:
                pass


def test_a_full_disk_while_writing_metrics_fails_the_run_and_keeps_last_pth(data, tmp_path, small_disk, monkeypatch,
                                                                          capsys):
    """runs/ on a small filesystem that fills up at epoch 2's first step record: the run stops with
    one line naming the file it could not write; status.json cannot be written either, so that line goes to
    stderr; last.pth (epoch 1, on another disk) stays loadable."""
    from engine import tracking
    from engine.train import train

    original, calls = tracking.JsonlWriter.write, []

    def write(self, record):
        calls.append(record.get("type"))
        if calls.count("step") == 3 and record.get("type") == "step":
            _fill(small_disk)
        original(self, record)

    monkeypatch.setattr(tracking.JsonlWriter, "write", write)
    cfg = _tiny_cfg(data, tmp_path, f"run.runs_dir={small_disk / 'runs'}", "eval.probe_images=0")
    with pytest.raises(runs.RunFolderWriteError) as caught:
        train(cfg, "full-disk")
    # the line names the first file that needed a new block: metrics.jsonl (its last page may still
    # have room for a line) or status.json
    run_dir = small_disk / "runs" / "full-disk"
    assert re.fullmatch(rf"({re.escape(str(run_dir / runs.METRICS_FILE))}: cannot write a step record|"
                        rf"{re.escape(str(run_dir / runs.STATUS_FILE))}: cannot write the run status): "
                        rf"No space left on device \[errno 28\]", str(caught.value)), str(caught.value)
    err = capsys.readouterr().err
    assert "status not saved" in err and str(caught.value) in err and "the run is failed" in err
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "full-disk" / runs.LAST_CKPT)
    assert ckpt["epoch"] == 1
    assert temp_files(small_disk, tmp_path / "checkpoints") == []


def test_out_of_memory_while_loading_an_image_is_one_line_naming_it(data, monkeypatch):
    """MemoryError in a loader (a worker's or the main process's) becomes a DatasetError naming the
    image, so the run fails with that line (a worker's error is cut back to it, engine.data)."""
    from engine import data as engine_data

    split = engine_data.load_split(data, "valid")
    dataset = engine_data.PlateDataset(split, train=False)

    def no_memory(path):
        raise MemoryError()

    monkeypatch.setattr(engine_data, "read_image", no_memory)
    with pytest.raises(engine_data.DatasetError) as caught:
        dataset[0]
    assert str(caught.value) == f"{split.images[0].path}: unreadable image (image id {split.images[0].id}): MemoryError"
