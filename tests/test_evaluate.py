"""evaluate_checkpoint and validate on a tiny really-trained checkpoint and real plate photos."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine import metrics
from engine.checkpoint import save_checkpoint
from engine.config import config_from_dict
from engine.data import PlateDataset, collate_fn, load_split
from engine.errors import EngineError
from engine.evaluate import EvaluationError, evaluate_checkpoint, predict_loader, validate
from engine.model import build_model, load_model_from_checkpoint

TINY = {"model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [128], "test_size": 128, "max_size": 160},
        "train": {"amp": False, "batch_size": 2, "device": "cpu"}}


def make_tiny_dataset(plates_real: Path, out: Path, n_images: int = 3) -> Path:
    """Roboflow layout with the first real test photos in every split; the last image's plates are
    removed so it is a negative (predictions there are false positives)."""
    ann = json.loads((plates_real / "test" / "_annotations.coco.json").read_text())
    images = ann["images"][:n_images]
    ids = {im["id"] for im in images[:-1]}
    for split in ("train", "valid", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for im in images:
            shutil.copy(plates_real / "test" / im["file_name"], out / split / im["file_name"])
        trimmed = {**ann, "images": images, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids]}
        (out / split / "_annotations.coco.json").write_text(json.dumps(trimmed))
    return out


def make_tiny_checkpoint(plates_real: Path, tmp: Path, steps: int = 2) -> Path:
    """A 320-model trained a few SGD steps at 128 px, saved in the shared checkpoint format."""
    root = make_tiny_dataset(plates_real, tmp / "data")
    cfg = config_from_dict({**TINY, "data": {"root": str(root), "num_workers": 0},
                            "run": {"name": "tiny", "runs_dir": str(tmp / "runs"),
                                    "checkpoints_dir": str(tmp / "checkpoints")}}, where="tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    dataset = PlateDataset(load_split(root, "train"), train=False)
    images, targets = collate_fn([dataset[0], dataset[1]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        loss = sum(model(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp / "checkpoints" / "tiny" / "best.pth"
    save_checkpoint(path, {"format": "plate-detector/1", "model": model.state_dict(), "epoch": 1,
                           "global_step": steps, "best": {"epoch": 1, "map50": 0.0}, "config": cfg.to_dict(),
                           "run": "tiny", "metrics": {}})
    return path


@pytest.fixture(scope="module")
def tiny(plates_real, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_eval")
    return tmp, make_tiny_checkpoint(plates_real, tmp)


def _config_file(tmp: Path, **eval_cfg) -> Path:
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump({**TINY, "data": {"root": "does/not/matter", "num_workers": 0},
                                    "eval": eval_cfg}))
    return path


def test_evaluate_checkpoint_writes_everything(tiny, capsys):
    tmp, ckpt = tiny
    result = evaluate_checkpoint(ckpt, device="cpu", progress=False)
    out = tmp / "runs" / "tiny" / "test"  # default: <checkpoint config's runs_dir>/<run>/test
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("map50", "map50_95", "map75", "map_small", "map_medium", "map_large", "precision", "recall",
                "f1", "tp", "fp", "fn", "score_threshold", "best_f1", "ms_per_image", "speed", "device",
                "device_name", "amp", "num_images", "num_gt_boxes", "params", "checkpoint_sizes_mb", "split",
                "data_root", "checkpoint", "created_at"):
        assert key in saved, key
    assert saved["num_images"] == 3 and saved["num_gt_boxes"] == 2
    assert saved["tp"] + saved["fn"] == 2
    assert saved["device"] == "cpu" and saved["amp"] is False and saved["split"] == "test"
    assert saved["params"] > 1_000_000
    assert saved["checkpoint_sizes_mb"]["best.pth"] > 1
    assert saved["ms_per_image"] > 0 and saved["speed"]["fps_batch1"] > 0
    assert saved["speed"]["total_ms"] == pytest.approx(saved["speed"]["preprocess_ms"] + saved["speed"]["model_ms"]
                                                       + saved["speed"]["postprocess_ms"], abs=0.01)
    assert set(saved["best_f1"]) == {"threshold", "precision", "recall", "f1", "tp", "fp", "fn"}
    assert saved["best_f1"]["f1"] >= saved["f1"]

    preds = json.loads((out / "predictions.json").read_text())
    real_ids = {im["id"] for im in json.loads((tmp / "data" / "test" / "_annotations.coco.json").read_text())["images"]}
    assert preds, "the tiny model predicts low-score boxes"
    assert {p["image_id"] for p in preds} <= real_ids
    assert all(p["category_id"] == 1 and len(p["bbox"]) == 4 and p["bbox"][2] >= 0 for p in preds)
    kept = sum(p["score"] >= saved["score_threshold"] for p in preds)
    assert saved["tp"] + saved["fp"] == kept

    curve = json.loads((out / "pr_curve.json").read_text())
    assert abs(curve["ap"] - saved["map50"]) < 0.01
    prf = json.loads((out / "prf_vs_confidence.json").read_text())
    assert len(prf["threshold"]) == 101 and prf["score_threshold"] == saved["score_threshold"]

    listed = json.loads((out / "samples.json").read_text())
    entries = listed["good"] + listed["challenging"]
    assert entries
    for e in entries:
        assert (out / e["file"]).is_file() and e["image_id"] in real_ids
    assert "mAP@0.5" in capsys.readouterr().out


def test_evaluate_with_config_and_data_override(tiny, tmp_path):
    tmp, ckpt = tiny
    data = tmp / "data"
    cfg = _config_file(tmp_path, score_threshold=0.05)
    result = evaluate_checkpoint(ckpt, config_path=cfg, device="cpu", data_root=data, split="valid",
                                 out=tmp_path / "out", progress=False, verbose=False)
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert result["split"] == "valid" and result["data_root"] == str(data)
    assert result["score_threshold"] == 0.05
    # at the floor score every detection is kept
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert result["tp"] + result["fp"] == len(preds)


def test_evaluate_bad_inputs_give_one_line_errors(tiny, tmp_path):
    tmp, ckpt = tiny
    with pytest.raises(EngineError) as err:
        evaluate_checkpoint(tmp_path / "missing.pth", device="cpu")
    assert "missing.pth" in str(err.value) and "\n" not in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(EngineError, match="junk.pth"):
        evaluate_checkpoint(junk, device="cpu")
    with pytest.raises(EngineError, match="nowhere"):
        evaluate_checkpoint(ckpt, device="cpu", data_root=tmp_path / "nowhere", progress=False)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"model": {"name": "fasterrcnn_resnet50_fpn_v2", "weights": "none"}}))
    with pytest.raises(EvaluationError, match="does not match"):
        evaluate_checkpoint(ckpt, config_path=other, device="cpu")


def test_validate_and_predict_loader(tiny):
    tmp, ckpt = tiny
    model, cfg = load_model_from_checkpoint(ckpt)
    split = load_split(cfg.data.root, "valid")
    loader = torch.utils.data.DataLoader(PlateDataset(split, train=False), batch_size=2, collate_fn=collate_fn)
    gts, preds = predict_loader(model, loader, "cpu", progress=False)
    assert [g["image_id"] for g in gts] == [r.id for r in split.images]
    for g, r in zip(gts, split.images):
        np.testing.assert_allclose(g["boxes"], r.boxes)
        assert (g["width"], g["height"]) == (r.width, r.height)
    assert all(len(p["boxes"]) == len(p["scores"]) for p in preds)
    model.train()
    result = validate(model, loader, "cpu", score_threshold=0.5, progress=False)
    assert model.training  # mode restored for the trainer
    assert model.transform.min_size == (128,)
    for key in ("map50", "map50_95", "precision", "recall", "f1"):
        assert 0.0 <= result[key] <= 1.0
    assert result["map50"] == pytest.approx(metrics.coco_map(gts, preds)["map50"], abs=0.05)
