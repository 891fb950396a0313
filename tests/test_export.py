"""ONNX export of a 1-epoch checkpoint: ONNX Runtime agrees with PyTorch on synthetic and real photos."""
import json
from pathlib import Path

import numpy as np
import pytest

from engine import export as export_mod
from engine.cli import main
from engine.export import (BOX_TOLERANCE_PX, SCORE_TOLERANCE, ExportError, OnnxPredictor, compare_detections,
                           export_onnx, load_export)
from engine.predict import Predictor, load_image
from engine.synthetic import generate_split
from tests.conftest import ROOT, TINY_RUN_SETTINGS, make_real_subset

REAL_TEST_PHOTOS = 6
SYNTHETIC_TEST_IMAGES = 4


def train_demo_checkpoint(plates_real: Path, base: Path) -> Path:
    """A real 1-epoch run of the demo recipe at tiny sizes (320 model, 160 px) on 8 real photos; its best.pth."""
    import torch

    from engine.config import load_config
    from engine.train import train

    torch.manual_seed(0)
    data = make_real_subset(plates_real, base / "data")
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", TINY_RUN_SETTINGS + [
        "train.epochs=1", "eval.test_after_train=false", f"data.root={data}",
        f"run.runs_dir={base / 'runs'}", f"run.checkpoints_dir={base / 'checkpoints'}"])
    result = train(cfg, "demo1")
    assert result["state"] == "completed", result
    return base / "checkpoints" / "demo1" / "best.pth"


@pytest.fixture(scope="module")
def checkpoint(plates_real, tmp_path_factory):
    return train_demo_checkpoint(plates_real, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    return out / "best-160.onnx"


def test_export_writes_model_and_description(exported, checkpoint):
    meta = load_export(exported)
    assert meta["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert meta["input"]["size"] == 160 and meta["input"]["max_size"] == 224  # the checkpoint's test/max size
    assert meta["score_threshold"] == 0.5 and meta["opset"] >= 11
    assert meta["class_names"] == ["__background__", "license_plate"]  # from the training annotations
    assert meta["source_checkpoint"] == str(checkpoint.resolve()) and meta["run"] == "demo1"
    assert set(meta["versions"]) >= {"torch", "onnx", "onnxruntime"}
    check = meta["verification"]
    names = [r["image"] for r in check["images"]]
    assert sum(n.endswith(".jpg") for n in names) == 4 and "synthetic 240x320" in names
    assert check["max_box_px"] <= BOX_TOLERANCE_PX and check["max_score_diff"] <= SCORE_TOLERANCE
    assert all(r["compared"] > 0 for r in check["images"])
    assert sorted(p.name for p in exported.parent.iterdir()) == ["best-160.json", "best-160.onnx"]  # no temp files


def _agree_on(images, checkpoint, exported):
    torch_predictor = Predictor(checkpoint, device="cpu")
    onnx_predictor = OnnxPredictor(exported)
    compared = 0
    for path in images:
        image = load_image(path)
        ref, got = torch_predictor.predict(image), onnx_predictor.predict(image)
        assert (got["width"], got["height"]) == image.size
        result = compare_detections(np.array(ref["boxes"]), np.array(ref["scores"]), np.array(got["boxes"]),
                                    np.array(got["scores"]), threshold=0.5)
        assert result["ok"], f"{path}: {result['reason']}"
        assert result["count_ref"] == result["count_got"]  # same count at the deployment threshold
        compared += result["compared"]
    assert compared >= len(images)


def test_onnx_runtime_agrees_with_pytorch_on_real_test_photos(plates_real, checkpoint, exported):
    photos = sorted((plates_real / "test").glob("*.jpg"))[:REAL_TEST_PHOTOS]
    assert len({load_image(p).size for p in photos}) > 1  # several input sizes through one graph
    _agree_on(photos, checkpoint, exported)


def test_onnx_runtime_agrees_with_pytorch_on_synthetic_test_split(tmp_path, checkpoint, exported):
    generate_split(tmp_path, "test", SYNTHETIC_TEST_IMAGES, seed=3)
    _agree_on(sorted((tmp_path / "test").glob("*.jpg")), checkpoint, exported)


def test_compare_detections_tolerances():
    boxes = np.array([[10, 10, 50, 30], [100, 40, 160, 70], [5, 5, 9, 9]], dtype=np.float32)
    scores = np.array([0.9, 0.6, 0.2], dtype=np.float32)
    same = compare_detections(boxes, scores, boxes[::-1] + 0.5, scores[::-1] + 0.0005, threshold=0.5)
    assert same["ok"] and same["compared"] == 3 and same["count_ref"] == same["count_got"] == 2
    shifted = boxes.copy()
    shifted[1, 2] += 1.5
    moved = compare_detections(boxes, scores, shifted, scores + np.float32(1e-4), threshold=0.5)
    assert not moved["ok"] and "1.50 px" in moved["reason"]
    all_moved = compare_detections(boxes, scores, boxes + 1.5, scores, threshold=0.5)  # scores kept exactly
    assert not all_moved["ok"] and "1.50 px" in all_moved["reason"]
    fewer = compare_detections(boxes, scores, boxes[[0, 2]], scores[[0, 2]], threshold=0.5)
    assert not fewer["ok"] and "1 boxes at score >= 0.5 instead of 2" in fewer["reason"]
    rescored = compare_detections(boxes, scores, boxes, scores - np.float32(0.01), threshold=0.5)
    assert not rescored["ok"] and "score by 0.0100" in rescored["reason"]
    # a score within the tolerance of the threshold may fall either side of it
    border = compare_detections(boxes, np.array([0.9, 0.5002, 0.2]), boxes, np.array([0.9, 0.4999, 0.2]), 0.5)
    assert border["ok"] and (border["count_ref"], border["count_got"]) == (2, 1)


def test_compare_detections_leaves_the_choice_among_equal_scores_open():
    boxes = np.array([[10, 10, 50, 30], [200, 10, 240, 30], [202, 12, 242, 32], [5, 5, 9, 9],
                      [300, 50, 340, 70]], dtype=np.float32)
    scores = np.array([0.9, 0.3, 0.3, 0.2, 0.1], dtype=np.float32)  # boxes 1 and 2: an exact tie in PyTorch's output
    keep = [0, 2, 3, 4]  # ONNX Runtime's NMS kept box 2 and not box 1
    both = compare_detections(boxes, scores, boxes[keep], scores[keep], threshold=0.5)
    assert both["ok"] and both["tied"] == 1 and both["compared"] == 4
    # PyTorch kept box 1 only, ONNX Runtime box 2 only, with the very same score: NMS broke a tie the other way
    other = compare_detections(boxes[[0, 1, 3, 4]], scores[[0, 1, 3, 4]], boxes[keep], scores[keep], threshold=0.5)
    assert other["ok"] and other["tied"] == 1 and other["compared"] == 3
    # the same move with a score that differs (more than a tie, less than the tolerance) is a real difference
    nudged = scores[keep].copy()
    nudged[1] += np.float32(1e-4)
    assert not compare_detections(boxes[[0, 1, 3, 4]], scores[[0, 1, 3, 4]], boxes[keep], nudged, 0.5)["ok"]
    # more than half of the compared boxes moved, scores kept: a systematic difference, not NMS ties
    moved = boxes[keep].copy()
    moved[[0, 2], 0] += 3
    assert not compare_detections(boxes, scores, moved, scores[keep], threshold=0.5)["ok"]


def test_unverifiable_export_fails_in_one_line_and_leaves_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_mod, "BOX_TOLERANCE_PX", -1.0)  # no box can match: verification must fail
    out = tmp_path / "out"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export not verified: ONNX Runtime and PyTorch disagree on ") and "\n" not in err
    assert list(out.iterdir()) == []


def test_export_errors(checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ExportError, match="verification image .*notes.jpg: not an image"):
        export_onnx(checkpoint, out=tmp_path / "a", verify_images=[text])
    assert not any((tmp_path / "a").iterdir())
    with pytest.raises(ExportError, match="--size 8: must be between 32 and 4096"):
        export_onnx(checkpoint, size=8, out=tmp_path / "b")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert main(["export", "--checkpoint", str(broken), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.pth: not loadable" in err and err.count("\n") == 1


def test_model_without_its_description_is_refused(exported, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.symlink_to(exported)
    with pytest.raises(ExportError, match="no lone.json beside it"):
        OnnxPredictor(lone)
    (tmp_path / "lone.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ExportError, match="not a plate-detector-onnx/1 export description"):
        load_export(lone)


def test_export_with_a_test_canvas_agrees_with_pytorch(plates_real, checkpoint, tmp_path):
    """input.test_canvas pads every image at inference; the ONNX graph carries the same padding."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["config"]["input"]["test_canvas"] = [192, 256]  # larger than any 160-px image + padding to 32
    canvas_ckpt = tmp_path / "canvas" / "best.pth"
    canvas_ckpt.parent.mkdir()
    torch.save(ckpt, canvas_ckpt)
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(canvas_ckpt), "--out", str(out)]) == 0
    photos = sorted((plates_real / "test").glob("*.jpg"))[:REAL_TEST_PHOTOS]
    _agree_on(photos, canvas_ckpt, out / "best-160.onnx")
    plain = Predictor(checkpoint, device="cpu").predict(load_image(photos[0]))
    padded = Predictor(canvas_ckpt, device="cpu").predict(load_image(photos[0]))
    assert plain["scores"] != padded["scores"]  # the canvas reaches the model: padding changes its output


def test_the_exporter_traces_an_image_the_model_detects_in(checkpoint):
    """Traced on noise, a detector that finds nothing there records the no-detection path: the graph of
    a fine-tuned model then failed in ONNX Runtime on most real photos (found on the real-photo recipe)."""
    from engine.export import _graph_model, _trace_example
    from engine.model import load_model_from_checkpoint

    import torch

    model, _ = load_model_from_checkpoint(checkpoint)
    example = _trace_example(model)
    assert example.shape[0] == 3 and min(example.shape[1:]) == 160
    with torch.inference_mode():
        assert len(_graph_model(model)([example])[0]["scores"]) >= 1
