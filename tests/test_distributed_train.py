"""Acceptance of distributed training (issue 10): real 2-process runs of the training loop on gloo.

Each test starts `torchrun` (or `python -m engine train --nproc 2`) on a tiny real model and real
plate photos (8 train images, global batch 4: 2 steps per epoch, 2 images per rank and step), and
asserts on the run folder, the processes and the checkpoints. Faults are injected through the
test-only variable ENGINE_TEST_FAULT (engine.distributed.inject_faults).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import distributed as D
from engine import launch, runs
from engine.config import load_config
from engine.model import load_model_from_checkpoint

from tests.conftest import ROOT, TINY_RUN_SETTINGS, make_real_subset

pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs" / "demo_cpu.yaml"
SETTINGS = TINY_RUN_SETTINGS + ["train.log_every=1", "dist.timeout_s=60", "eval.probe_images=0"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", D.FAULT_ENV)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _train_args(base: Path, data: Path, *more: str) -> list[str]:
    args = ["train", "--config", str(CONFIG), "--data", str(data), "--runs-dir", str(base / "runs")]
    for item in SETTINGS + [f"run.checkpoints_dir={base / 'checkpoints'}", *more]:
        args += ["--set", item]
    return args


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", "0", "-m", "engine", *args]


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(run_dir: Path) -> list[dict]:
    steps, _ = runs.read_metrics(run_dir)
    return steps


def _raw_step_numbers(run_dir: Path) -> list[int]:
    lines = (run_dir / runs.METRICS_FILE).read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "step"]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive(pids) -> list[int]:
    return [p for p in pids if p and runs.pid_alive(p)]


@pytest.fixture(scope="module")
def data(plates_real, tmp_path_factory) -> Path:
    return make_real_subset(plates_real, tmp_path_factory.mktemp("dist-data") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-epoch run under plain `torchrun --standalone --nproc-per-node 2`."""
    base = tmp_path_factory.mktemp("dist-ref")
    t0 = time.time()
    proc = _run(_torchrun(*_train_args(base, data), "--run-name", "ref"), _env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base, time.time() - t0


# ----------------------------------------------------------------------------- a whole run
def test_torchrun_two_processes_complete_one_run_written_once(reference):
    base, _ = reference
    run_dir, ckpt_dir = base / "runs" / "ref", base / "checkpoints" / "ref"
    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["world_size"] == 2 and status["backend"] == "gloo"
    assert status["global_step"] == 4 and status["steps_per_epoch"] == 2  # global batch 4 = 2 ranks x 2
    assert [r["rank"] for r in status["ranks"]] == [0, 1] and all(r["host"] for r in status["ranks"])
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert _raw_step_numbers(run_dir) == [1, 2, 3, 4]  # one writer: no duplicated step records
    epochs = [r for r in map(json.loads, (run_dir / runs.METRICS_FILE).read_text().splitlines())
              if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    log = (run_dir / runs.LOG_FILE).read_text()
    assert log.count("Epoch [1/2]") == 1 and "Processes: 2 (gloo" in log
    assert "Replicas identical after 4 steps on 2 processes" in log  # the gathered checksums agree
    assert (run_dir / runs.TEST_DIR / "metrics.json").is_file()
    for name in (runs.LAST_CKPT, runs.BEST_CKPT):
        ckpt = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
        assert not [k for k in ckpt["model"] if k.startswith("module.")]
        model, _ = load_model_from_checkpoint(ckpt_dir / name)  # strict load into a plain model
        assert sum(p.numel() for p in model.parameters()) > 0


def test_nproc_stop_from_the_dashboard_then_resume_gives_the_uninterrupted_losses(reference, data, tmp_path):
    ref_base, _ = reference
    runs_dir = tmp_path / "runs"
    cmd = [sys.executable, "-m", "engine", *_train_args(tmp_path, data), "--run", "stopme", "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    run_dir = runs_dir / "stopme"
    _wait_for(lambda: (run_dir / runs.METRICS_FILE).is_file() and _raw_step_numbers(run_dir), 240, "step 1")
    status = runs.read_status(run_dir)
    assert status["pid"] == proc.pid == status["launcher_pid"]  # the launcher: exec'd into torchrun's agent
    workers = [r["pid"] for r in D.read_heartbeats(run_dir)]
    assert len(workers) == 2 and proc.pid not in workers
    launch.stop_run("stopme", runs_dir)  # the dashboard's Stop: SIGTERM to the recorded process group
    proc.communicate(timeout=150)
    status = runs.read_status(run_dir)
    assert status["state"] == "stopped", status
    assert (tmp_path / "checkpoints" / "stopme" / runs.LAST_CKPT).is_file()
    assert not list((tmp_path / "checkpoints" / "stopme").glob("*.tmp"))
    assert _alive(workers + [proc.pid]) == []
    stopped_at = status["global_step"]
    assert 1 <= stopped_at < 4
    resumed = _run([sys.executable, "-m", "engine", "train", "--resume", "stopme", "--runs-dir", str(runs_dir),
                    "--nproc", "2"], _env())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert runs.read_status(run_dir)["state"] == "completed"
    ref_losses = {r["step"]: r["loss"] for r in _steps(ref_base / "runs" / "ref")}
    losses = {r["step"]: r["loss"] for r in _steps(run_dir)}
    assert losses == ref_losses and len(losses) == 4


# ----------------------------------------------------------------------------- failures
def test_nan_on_rank_1_only_fails_the_run_at_once_naming_the_rank(data, tmp_path):
    t0 = time.time()
    proc = _run(_torchrun(*_train_args(tmp_path, data), "--run-name", "nan"), _env(**{D.FAULT_ENV: "nan:1:2"}))
    took = time.time() - t0
    assert proc.returncode != 0
    status = runs.read_status(tmp_path / "runs" / "nan")
    assert status["state"] == "failed"
    assert "loss is nan at step 2 (epoch 1) (non-finite on rank 1)" in status["error"]
    assert took < 60  # well inside the 60 s collective timeout: nobody waited for it
    assert not (tmp_path / "checkpoints" / "nan" / runs.LAST_CKPT).exists()


def test_kill_9_of_one_worker_fails_the_run_naming_the_rank(data, tmp_path):
    cmd = _torchrun(*_train_args(tmp_path, data, "train.epochs=4"), "--run-name", "kill")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    run_dir = tmp_path / "runs" / "kill"
    ckpt = tmp_path / "checkpoints" / "kill" / runs.LAST_CKPT
    _wait_for(lambda: ckpt.is_file() and (runs.read_status(run_dir) or {}).get("global_step", 0) >= 3, 240,
              "epoch 1 saved and step 3")
    victim = next(r for r in D.read_heartbeats(run_dir) if r["rank"] == 1)
    t0 = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    status = runs.read_status(run_dir)
    assert status["state"] == "failed", status
    assert f"lost rank 1 (host {socket.gethostname()}" in status["error"] or "lost rank 1" in status["error"]
    assert time.time() - t0 < 60  # the collective timeout is 60 s
    assert next(r for r in status["ranks"] if r["rank"] == 1)["alive"] is False
    assert not list(ckpt.parent.glob("*.tmp"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # the epoch-boundary checkpoint, whole
    assert saved["epoch"] >= 1 and not saved.get("completed")
    # resume at another world size (2 -> 1 process) from the epoch boundary, with a warning
    from engine.train import load_run_config, train

    cfg = load_run_config("kill", str(tmp_path / "runs"))
    result = train(cfg, "kill", resume=True)
    assert result["state"] == "completed"
    assert "resuming a run trained on 2 process(es) with 1" in (run_dir / runs.LOG_FILE).read_text()


def test_max_restarts_resumes_a_crashed_job_by_itself(data, tmp_path):
    cmd = [sys.executable, "-m", "engine", *_train_args(tmp_path, data), "--run", "elastic", "--nproc", "2",
           "--max-restarts", "1"]
    proc = _run(cmd, _env(**{D.FAULT_ENV: "crash:1:3"}))  # rank 1 dies in step 3 of the first attempt
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "elastic"
    status = runs.read_status(run_dir)
    assert status["state"] == "completed" and status["restart_count"] == 1 and status["global_step"] == 4
    log = (run_dir / runs.LOG_FILE).read_text()
    assert "Elastic restart 1 of at most 1: resuming from" in log
    assert sorted({r["step"] for r in _steps(run_dir)}) == [1, 2, 3, 4]


def test_two_nodes_with_c10d_rendezvous_complete_and_early_stop_together(plates_real, tmp_path):
    data = make_real_subset(plates_real, tmp_path / "data")
    valid_ann = data / "valid" / "_annotations.coco.json"
    coco = json.loads(valid_ann.read_text())
    coco["annotations"] = []  # mAP stays 0: epoch 2 does not improve, patience 1 stops there
    valid_ann.write_text(json.dumps(coco))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _train_args(tmp_path, data, "train.epochs=4", "train.early_stopping_patience=1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
           "--local-addr", "127.0.0.1", "--max-restarts", "0", "-m", "engine", *args, "--run-name", "nodes"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    status = runs.read_status(tmp_path / "runs" / "nodes")
    assert status["state"] == "completed" and status["nnodes"] == 2 and status["world_size"] == 2
    assert status["message"].startswith("early stopped at epoch 2") and status["epoch"] == 2
    assert _raw_step_numbers(tmp_path / "runs" / "nodes") == [1, 2, 3, 4]


def test_time_limit_ends_both_processes_together(data, tmp_path):
    """A limit shorter than one epoch: after epoch 1 rank 0 plans no more and broadcasts it; both ranks stop there."""
    args = _train_args(tmp_path, data, "train.epochs=3", "train.time_limit_min=0.001")
    proc = _run(_torchrun(*args, "--run-name", "timed"), _env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = runs.read_status(tmp_path / "runs" / "timed")
    assert status["state"] == "completed" and status["end_reason"] == "time_limit"
    assert (status["epoch"], status["epochs"], status["total_steps"]) == (1, 1, 2)
    assert _raw_step_numbers(tmp_path / "runs" / "timed") == [1, 2]
    assert "Replicas identical after 2 steps on 2 processes" in (tmp_path / "runs" / "timed" / runs.LOG_FILE).read_text()


def test_a_process_count_that_does_not_divide_the_batch_fails_before_starting(data, tmp_path):
    proc = _run([sys.executable, "-m", "engine", *_train_args(tmp_path, data), "--run", "odd", "--nproc", "3"],
                _env(), timeout=60)
    assert proc.returncode == 2
    assert "train.batch_size 4 is the global batch and must be divisible by the number of processes (3)" in proc.stderr
    assert not (tmp_path / "runs" / "odd").exists()


def test_one_and_two_processes_take_the_same_steps_and_learning_rates(tmp_path):
    """World 1 x batch 4 and world 2 x batch 2: same steps per epoch, same LR at every step."""
    from engine.build import build_scheduler, steps_per_epoch

    cfg = load_config(CONFIG, SETTINGS)
    for n in (7, 8, 9, 13):
        ds = list(range(n))
        assert steps_per_epoch(cfg, ds, 1) == steps_per_epoch(cfg, ds, 2) == steps_per_epoch(cfg, ds, 4)
    lrs = []
    for world in (1, 2):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        sched = build_scheduler(cfg, opt, steps_per_epoch(cfg, list(range(9)), world))
        curve = []
        for _ in range(sched.total_steps):
            curve.append(sched.get_lr())
            sched.step()
        lrs.append(curve)
    assert lrs[0] == lrs[1]
