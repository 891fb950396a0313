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


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "baselines.yaml"))
def test_config_files_hold_only_what_differs_from_the_defaults(name):
    from engine.config import config_from_dict, get_value

    data = yaml.safe_load((ROOT / "configs" / name).read_text()) or {}
    defaults = config_from_dict({})
    config_from_dict(data)  # the file loads
    restated = [key for key, value in _leaves(data) if get_value(defaults, key) == value]
    assert restated == [], f"{name} restates defaults: {restated}"


def test_the_recipe_file_changes_nothing():
    from engine.config import Config

    assert load_config(ROOT / "configs" / "train_plate_detector.yaml").to_dict() == Config().to_dict()


def test_config_table_in_the_docs_is_generated_from_the_code():
    from engine.config import replace_reference_table

    text = (ROOT / "docs" / "engine.md").read_text(encoding="utf-8")
    assert replace_reference_table(text) == text, "run: python -m engine config-doc --write docs/engine.md"


def test_config_table_lists_every_key_with_its_default_and_comment():
    from engine.config import reference_rows, reference_table

    rows = {key: (default, meaning) for key, default, meaning in reference_rows()}
    assert rows["train.batch_size"][0] == "16"
    assert rows["input.train_sizes"][0].startswith("[800,") and rows["input.train_sizes"][0].endswith("1333]")
    assert rows["eval.iou_threshold"][1].startswith("a detection matches")
    assert "source" not in rows
    assert "| `dist.timeout_s` | `1800.0` |" in reference_table()


def test_config_doc_command_rewrites_only_the_table(tmp_path):
    doc = tmp_path / "engine.md"
    from engine.config import TABLE_END, TABLE_START

    doc.write_text(f"intro\n{TABLE_START}\nstale\n{TABLE_END}\noutro\n")
    result = run_cli("config-doc", "--write", str(doc))
    assert result.returncode == 0, result.stderr
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{TABLE_END}\noutro\n") and "stale" not in text
    assert "| `train.epochs` | `50` |" in text


def test_default_run_name_is_the_config_stem_and_time():
    import datetime as dt

    from engine.config import default_run_name

    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert default_run_name("configs/demo_cpu.yaml", when) == "demo_cpu-20240102-030405"
    assert default_run_name("<dict>", when) == "run-20240102-030405"
    assert default_run_name("my config!.yaml", when) == "my-config--20240102-030405"
