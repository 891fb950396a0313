"""model_provenance: what a run's model was trained on, from real config files and datasets."""
import shutil
from pathlib import Path

import yaml

from dashboard.model_provenance import FINETUNE_CONFIG, describe_config, describe_run, is_synthetic_data
from engine.config import load_config
from engine.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[2]


def _write_run(runs_dir: Path, name: str, cfg: dict) -> None:
    (runs_dir / name).mkdir(parents=True)
    (runs_dir / name / "config.yaml").write_text(yaml.safe_dump(cfg))


def _resolved(config_file: str, **data) -> dict:
    cfg = load_config(ROOT / config_file).to_dict()
    cfg["data"].update(data)
    return cfg


def test_synthetic_data_is_recognised_from_the_generated_annotations(tmp_path, plates_real):
    generate_dataset(tmp_path / "plates", train=2, valid=1, test=1, seed=0, width=96, height=72)
    assert is_synthetic_data({"root": str(tmp_path / "plates")})
    assert not is_synthetic_data({"root": str(plates_real)})
    # not on disk: the config decides
    assert is_synthetic_data({"root": str(tmp_path / "elsewhere"), "generate_if_missing": True})
    assert not is_synthetic_data({"root": str(tmp_path / "elsewhere"), "generate_if_missing": False})


def test_demo_run_is_synthetic_only_and_gives_the_finetune_command(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "demo-1", _resolved("configs/demo_cpu.yaml", root=str(tmp_path / "not-yet-generated")))
    p = describe_run("demo-1", runs, tmp_path / "ckpt")
    assert p.synthetic_only and p.trained_on.startswith("synthetic plates")
    assert "real data" in p.warning
    assert p.command.startswith(f"python -m engine train --config {FINETUNE_CONFIG} ")
    assert f"--set model.weights={tmp_path / 'ckpt' / 'demo-1' / 'best.pth'}" in p.command
    assert (ROOT / FINETUNE_CONFIG).is_file()


def test_finetuned_run_names_its_real_dataset_and_its_synthetic_parent(tmp_path, plates_real):
    runs = tmp_path / "runs"
    _write_run(runs, "demo-1", _resolved("configs/demo_cpu.yaml", root=str(tmp_path / "synthetic")))
    cfg = _resolved(FINETUNE_CONFIG, root=str(plates_real))
    cfg["model"]["weights"] = "checkpoints/demo-1/best.pth"
    _write_run(runs, "real-1", cfg)
    p = describe_run("real-1", runs)
    assert not p.synthetic_only and p.warning is None and p.command is None
    assert p.trained_on == f"real photos: plates-real ({plates_real})"
    assert p.pretrained_from.startswith("run demo-1 (synthetic plates")


def test_coco_weights_on_synthetic_data_are_still_synthetic_only(tmp_path):
    cfg = {"data": {"root": str(tmp_path / "synthetic")}, "model": {"weights": "coco"}}
    p = describe_config(cfg, tmp_path)
    assert p.synthetic_only and p.pretrained_from.startswith("COCO")


def test_missing_or_broken_config_gives_none(tmp_path):
    assert describe_run("absent", tmp_path) is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.yaml").write_text("data: [unclosed")
    assert describe_run("broken", tmp_path) is None
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.yaml").write_text("- a\n- b\n")
    assert describe_run("list", tmp_path) is None
    p = describe_config({"data": "oops", "model": None}, tmp_path)  # wrong types: still an answer
    assert isinstance(p.trained_on, str)
