"""The command line: subcommands, exit codes, and the glue to synth / evaluate / predict / report."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_parser_knows_every_command_and_option():
    p = build_parser()
    a = p.parse_args(["train", "--config", "c.yaml", "--run", "r", "--data", "d", "--device", "cpu",
                      "--set", "train.epochs=1", "--set", "optim.lr=0.1"])
    assert (a.config, a.run, a.data, a.device, a.overrides) == ("c.yaml", "r", "d", "cpu",
                                                               ["train.epochs=1", "optim.lr=0.1"])
    assert p.parse_args(["train", "--resume", "r", "--runs-dir", "x"]).resume == "r"
    a = p.parse_args(["synth", "--out", "o", "--train", "3", "--seed", "5", "--width", "96", "--height", "64"])
    assert (a.out, a.train, a.valid, a.seed, a.width) == ("o", 3, 100, 5, 96)
    a = p.parse_args(["evaluate", "--checkpoint", "c.pth", "--split", "valid", "--out", "o"])
    assert (a.checkpoint, a.split, a.out, a.device) == ("c.pth", "valid", "o", "auto")
    a = p.parse_args(["predict", "--checkpoint", "c.pth", "a.jpg", "b.png", "--score-threshold", "0.3"])
    assert (a.images, a.score_threshold) == (["a.jpg", "b.png"], 0.3)
    assert p.parse_args(["report", "--run", "r", "--out", "o"]).run == "r"


def test_usage_errors_exit_nonzero(tmp_path):
    assert run_cli("train").returncode == 2  # needs --config or --resume
    assert run_cli("train", "--config", "a.yaml", "--resume", "r").returncode == 2
    r = run_cli("train", "--resume", "r", "--set", "train.epochs=3", "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: --resume takes only")
    r = run_cli("train", "--resume", "nope", "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"error: run 'nope' not found in {tmp_path}"
    r = run_cli("report", "--run", "nope", "--runs-dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    r = run_cli("synth", "--out", str(out), "--train", "2", "--valid", "2", "--test", "2", "--seed", "3",
                "--width", "128", "--height", "96")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["splits"]["test"]["images"] == 2
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root) -> Path:
    """An untrained 320 model saved in our checkpoint format (evaluate/predict only need a real model)."""
    from engine.checkpoint import FORMAT, save_checkpoint
    from engine.config import config_from_dict
    from engine.model import build_model

    cfg = config_from_dict({"run": {"name": "clirun", "runs_dir": str(synth_root.parent / "runs")},
                            "data": {"root": str(synth_root), "num_workers": 0},
                            "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
                            "input": {"train_sizes": [96], "test_size": 96, "max_size": 128},
                            "train": {"device": "cpu", "amp": False}})
    path = synth_root.parent / "checkpoints" / "clirun" / "best.pth"
    save_checkpoint(path, {"format": FORMAT, "model": build_model(cfg).state_dict(), "epoch": 1, "global_step": 1,
                           "config": cfg.to_dict(), "run": "clirun", "best": {"epoch": 1, "map50": 0.0}})
    return path


def test_synth_writes_the_roboflow_layout(synth_root):
    from engine.data import load_split

    for split in ("train", "valid", "test"):
        assert len(load_split(synth_root, split).images) == 2


def test_evaluate_command(tiny_checkpoint, synth_root, tmp_path):
    r = run_cli("evaluate", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--data", str(synth_root),
                "--split", "test", "--out", str(tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"map50", "map50_95", "precision", "recall", "f1", "ms_per_image"} <= set(metrics)


def test_predict_command(tiny_checkpoint, synth_root, tmp_path):
    images = sorted((synth_root / "test").glob("*.jpg")) or sorted((synth_root / "test").glob("*.png"))
    r = run_cli("predict", "--checkpoint", str(tiny_checkpoint), *map(str, images), "--out", str(tmp_path / "pred"),
                "--score-threshold", "0.0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [Path(x["image"]).name for x in results] == [p.name for p in images]
    assert all(Path(x["annotated"]).is_file() and len(x["boxes"]) == len(x["scores"]) for x in results)

    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    r = run_cli("predict", "--checkpoint", str(tiny_checkpoint), str(junk), "--out", str(tmp_path / "pred"),
                "--device", "cpu")
    assert r.returncode == 2 and "error: " in r.stderr and "notes.jpg" in r.stderr
    r = run_cli("predict", "--checkpoint", str(tmp_path / "missing.pth"), str(images[0]), "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "missing.pth" in r.stderr


def test_evaluate_ignores_a_run_name_in_the_checkpoint_that_leaves_runs_dir(tiny_checkpoint, synth_root, tmp_path):
    """The default output folder is runs/<run>/test/; a stored run name like '../../escaped' is not
    trusted: the checkpoint's folder name is used instead."""
    import torch

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["run"] = "../../escaped"
    ckpt["config"]["run"]["runs_dir"] = str(tmp_path / "work" / "runs")
    path = tmp_path / "work" / "checkpoints" / "fine" / "best.pth"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    r = run_cli("evaluate", "--checkpoint", str(path), "--device", "cpu", "--data", str(synth_root), "--split", "test")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "work" / "runs" / "fine" / "test" / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["checkpoints", "runs"]


def test_image_that_fails_to_decode_in_a_loader_worker_ends_the_process(plates_real, tmp_path):
    """A train image whose pixel data is damaged (headers, size and end marker intact, so the
    load-time checks pass) fails inside a DataLoader worker: the process exits with one error
    line naming the image, the run is `failed` with that line, and no worker is left behind.
    (It used to print the worker's traceback, write its status and then wait forever for the
    worker, which ignores SIGTERM, in multiprocessing's exit handler.)"""
    from tests.conftest import TINY_RUN_SETTINGS, corrupt_png_same_size, make_real_subset

    data = make_real_subset(plates_real, tmp_path / "data", counts=(("train", 4), ("valid", 2), ("test", 2)))
    bad_name = json.loads((data / "train" / "_annotations.coco.json").read_text())["images"][1]["file_name"]
    corrupt_png_same_size(plates_real / "train" / bad_name, data / "train" / bad_name)
    settings = [s for s in TINY_RUN_SETTINGS if not s.startswith("data.num_workers")] + [
        "data.num_workers=1", "train.epochs=1", "train.batch_size=2", f"data.root={data}",
        f"run.checkpoints_dir={tmp_path / 'checkpoints'}"]
    r = run_cli("train", "--config", "configs/demo_cpu.yaml", "--run", "bad-pixels", "--runs-dir",
                str(tmp_path / "runs"), *(x for s in settings for x in ("--set", s)), timeout=240)
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", r.stderr)  # what a terminal shows: no cursor moves
    errors = [line for line in shown.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and f"train/{bad_name}: unreadable image" in errors[0], r.stderr[-3000:]
    assert errors[0].endswith("(DataLoader worker process 0)")
    status = json.loads((tmp_path / "runs" / "bad-pixels" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == errors[0][len("error: "):]
    assert not subprocess.run(["pgrep", "-f", "--", f"--run bad-pixels --runs-dir {tmp_path}"],
                              capture_output=True).stdout.strip(), "a DataLoader worker outlived the run"


def test_a_killed_loader_worker_fails_the_run_with_one_line(plates_real, tmp_path):
    """SIGKILL to the DataLoader worker mid-epoch (the OOM killer's way): the run ends `failed`
    with one line naming the worker, and the process exits."""
    import signal
    import time

    from tests.conftest import TINY_RUN_SETTINGS, make_real_subset

    data = make_real_subset(plates_real, tmp_path / "data", counts=(("train", 24), ("valid", 2), ("test", 2)))
    settings = [s for s in TINY_RUN_SETTINGS if not s.startswith("data.num_workers")] + [
        "data.num_workers=1", "train.epochs=3", "train.batch_size=1", f"data.root={data}",
        f"run.checkpoints_dir={tmp_path / 'checkpoints'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "train", "--config", "configs/demo_cpu.yaml", "--run",
                             "worker-killed", "--runs-dir", str(tmp_path / "runs"),
                             *(x for s in settings for x in ("--set", s))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    status_file = tmp_path / "runs" / "worker-killed" / "status.json"
    worker = None
    deadline = time.time() + 120
    while worker is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        training = status_file.is_file() and "training epoch" in status_file.read_text()
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        worker = int(children[0]) if training and children else None
    assert worker is not None, "the run never had a training worker"
    os.kill(worker, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    errors = [line for line in shown.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    # torch words it "is killed by signal: Killed." or "exited unexpectedly", depending on when it notices
    names_worker = re.compile(rf"DataLoader worker \(pid(\(s\))? {worker}\) (is killed by signal|exited unexpectedly)")
    assert len(errors) == 1 and names_worker.search(errors[0]), errors
    status = json.loads(status_file.read_text())
    assert status["state"] == "failed" and "\n" not in status["error"] and names_worker.search(status["error"])
