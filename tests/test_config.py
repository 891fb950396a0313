"""Config files: the shipped recipes, and bad values reported by the CLI as one line naming key and file."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_recipe_matches_the_results_template():
    cfg = load_config(ROOT / "configs" / "train_plate_detector.yaml")
    assert (cfg.model.name, cfg.model.weights) == ("fasterrcnn_mobilenet_v3_large_fpn", "coco")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.005, 0.9, 5e-4)
    assert (cfg.schedule.warmup_epochs, cfg.schedule.min_lr) == (3, 1e-6)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.early_stopping_patience) == (16, 50, 10)
    assert cfg.train.amp is True and cfg.train.grad_clip == 10.0
    assert cfg.augment.hflip_p == 0.5
    assert (cfg.augment.brightness, cfg.augment.contrast, cfg.augment.saturation) == (0.2, 0.2, 0.2)
    assert min(cfg.input.train_sizes) == 800 and max(cfg.input.train_sizes) == 1333
    assert cfg.input.max_size == 1333 and cfg.input.test_size == 800


def test_cpu_demo_is_offline_and_small():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    assert cfg.model.name == "fasterrcnn_mobilenet_v3_large_320_fpn" and cfg.model.weights == "none"
    assert cfg.data.generate_if_missing and cfg.train.device == "cpu" and cfg.train.amp is False
    assert max(cfg.input.train_sizes) <= 320 and cfg.input.max_size <= 320


def test_baselines_are_quoted_references():
    rows = yaml.safe_load((ROOT / "configs" / "baselines.yaml").read_text())["baselines"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["YOLOv5s"]["map50"] == 0.82 and by_name["YOLOv5s"]["params"] == 7_000_000
    assert by_name["FasterRCNN-ResNet50"]["fps"] == 15
    assert all("not measured" in r["source"] for r in rows)


BAD = [
    ("train:\n  epochz: 3\n", "unknown key 'train.epochz'"),
    ("train:\n  epochs: three\n", "train.epochs must be an integer"),
    ("optim:\n  lr: -0.1\n", "optim.lr must be > 0"),
    ("model:\n  name: yolo\n", "model.name must be one of"),
    ("augment:\n  hflip_p: 1.5\n", "augment.hflip_p must be between 0 and 1"),
    ("train: [1, 2]\n", "train must be a mapping"),
    ("train:\n  epochs: 3\n   bad indent: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_config_file_exits_nonzero_naming_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("train", "--config", str(path), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    assert str(path) in line and message in line
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size must be between 1 and 1024"),
    ("train.nope=1", "unknown key 'train.nope'"),
    ("train.amp=maybe", "train.amp must be true or false"),
    ("epochs", "expected section.key=value"),
])
def test_bad_override_exits_nonzero(tmp_path, override, message):
    result = run_cli("train", "--config", "configs/demo_cpu.yaml", "--set", override,
                     "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_bad_device_and_run_name(tmp_path):
    result = run_cli("train", "--config", "configs/demo_cpu.yaml", "--device", "tpu", "--runs-dir", str(tmp_path))
    assert result.returncode == 2 and "train.device" in result.stderr
    result = run_cli("train", "--config", "configs/demo_cpu.yaml", "--run", "a b/c", "--runs-dir", str(tmp_path))
    assert result.returncode == 2 and "run name 'a b/c'" in result.stderr


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml",
                      ["train.epochs=3", "input.train_sizes=[128,160]", "optim.lr=1e-3"])
    assert cfg.train.epochs == 3 and cfg.input.train_sizes == [128, 160] and cfg.optim.lr == 0.001
    with pytest.raises(ConfigError, match="schedule.min_lr"):
        load_config(ROOT / "configs" / "demo_cpu.yaml", ["optim.lr=1e-6", "schedule.min_lr=1e-3"])
