"""Sample selection on a crafted case, reasons from measured statistics, and the drawn files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import metrics, samples
from tests.test_metrics import _gt as gt_record, _pred


def _gt(image_id, boxes, width=200, height=100):
    return gt_record(image_id, boxes, width, height)


@pytest.fixture
def crafted():
    gts = [
        _gt(1, [[10, 10, 70, 30]]),  # found exactly, conf .9
        _gt(2, [[10, 10, 70, 30]]),  # found, IoU .875, conf .8
        _gt(3, [[0, 0, 20, 10]], width=1000, height=1000),  # tiny plate in a dark image, missed
        _gt(4, []),  # no plate: one confident false positive (tall box) and one under the threshold
        _gt(5, [[10, 10, 70, 30], [100, 10, 160, 30]]),  # IoU .714 at conf .6; 2nd found only at conf .4
    ]
    preds = [
        _pred(1, [[10, 10, 70, 30]], [0.9]),
        _pred(2, [[14, 10, 74, 30]], [0.8]),
        _pred(4, [[100, 50, 130, 90], [0, 0, 50, 20]], [0.7, 0.3]),
        _pred(5, [[20, 10, 80, 30], [100, 10, 160, 30]], [0.6, 0.4]),
    ]
    stats = {1: {"brightness": 120.0, "contrast": 50.0}, 2: {"brightness": 120.0, "contrast": 50.0},
             3: {"brightness": 40.0, "contrast": 45.0}, 4: {"brightness": 100.0, "contrast": 60.0},
             5: {"brightness": 90.0, "contrast": 10.0}}
    return gts, preds, stats


def test_selection_on_crafted_case(crafted):
    gts, preds, stats = crafted
    matches = metrics.match_detections(gts, preds)
    sel = samples.select_samples(matches, 0.5, stats, n_good=3, n_per_kind=2)

    good = sel["good"]
    assert [e["image_id"] for e in good] == [1, 2, 5]  # IoU x confidence: .9, .7, .43
    assert good[0]["iou"] == pytest.approx(1.0) and good[0]["confidence"] == pytest.approx(0.9)
    assert good[1]["iou"] == pytest.approx(0.875) and good[1]["confidence"] == pytest.approx(0.8)
    assert (good[2]["gt_count"], good[2]["pred_count"]) == (2, 1)  # image 5: 2 plates, 1 kept detection
    assert all(e["kind"] == "good" and e["reasons"] == [] for e in good)

    by_kind = {}
    for e in sel["challenging"]:
        by_kind.setdefault(e["kind"], []).append(e)
    assert list(by_kind) == ["missed", "false_positive", "low_iou"]

    missed = by_kind["missed"]
    assert [e["image_id"] for e in missed] == [3, 5]
    assert missed[0]["tags"] == ["small", "dark"]
    assert missed[0]["measures"]["area_share"] == pytest.approx(200 / 1e6)
    assert "small plate (0.02% of the image)" in missed[0]["reasons"]
    assert "dark image (mean brightness 40/255)" in missed[0]["reasons"]
    assert missed[0]["confidence"] is None and missed[0]["iou"] == 0.0
    assert missed[1]["box"] == [100, 10, 160, 30]
    assert missed[1]["confidence"] == pytest.approx(0.4)  # found, but under the threshold
    assert missed[1]["tags"] == ["low_contrast"]

    (fp,) = by_kind["false_positive"]
    assert fp["image_id"] == 4 and fp["confidence"] == pytest.approx(0.7) and fp["pred_count"] == 1
    assert fp["tags"] == ["unusual_aspect"] and fp["measures"]["aspect"] == pytest.approx(0.75)

    low = by_kind["low_iou"]
    assert [e["image_id"] for e in low] == [5, 2]  # IoU .714 then .875
    assert low[0]["iou"] == pytest.approx(50 / 70, abs=1e-4)
    assert low[0]["tags"] == ["low_contrast"]


def test_selection_threshold_and_limits(crafted):
    gts, preds, stats = crafted
    matches = metrics.match_detections(gts, preds)
    sel = samples.select_samples(matches, 0.35, stats, n_good=10, n_per_kind=10)
    # at 0.35 the 0.4 detection on image 5 counts: image 5's second plate is no longer missed
    assert [e["image_id"] for e in sel["challenging"] if e["kind"] == "missed"] == [3]
    assert len({(e["kind"], e["image_id"]) for e in sel["challenging"]}) == len(sel["challenging"])
    assert [e["image_id"] for e in sel["good"]] == [1, 2, 5]  # one per image


def test_luminance_stats_and_reasons():
    dark = Image.new("RGB", (40, 20), (30, 30, 30))
    s = samples.luminance_stats(dark)
    assert s == {"brightness": 30.0, "contrast": 0.0}
    half = torch.zeros(3, 10, 10)
    half[:, :, 5:] = 1.0
    t = samples.luminance_stats(half)
    assert t["brightness"] == pytest.approx(127.5) and t["contrast"] == pytest.approx(127.5)
    tags, _ = samples.reasons_for(samples.box_measures([0, 0, 100, 20], 400, 300), {"brightness": 100, "contrast": 50})
    assert tags == []  # 1.7% of the image, aspect 5, normal light


def test_write_samples_draws_files(tmp_path, crafted):
    gts, preds, stats = crafted
    paths = {}
    for g in gts:
        path = tmp_path / "images" / f"img{g['image_id']}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (g["width"], g["height"]), (90, 90, 90)).save(path)
        paths[g["image_id"]] = path
    matches = metrics.match_detections(gts, preds)
    sel = samples.select_samples(matches, 0.5, stats)
    written = samples.write_samples(sel, matches, paths, tmp_path / "test")
    listed = json.loads((tmp_path / "test" / "samples.json").read_text())
    assert listed == json.loads(json.dumps(written))
    entries = listed["good"] + listed["challenging"]
    assert len(entries) == len(sel["good"]) + len(sel["challenging"])
    for e in entries:
        file = tmp_path / "test" / e["file"]
        with Image.open(file) as im:
            assert im.format == "JPEG"
            assert im.width >= 200  # small images are enlarged for readable labels
        assert e["file_name"] == f"img{e['image_id']}.jpg"
    # the drawing shows the ground truth in green
    with Image.open(tmp_path / "test" / listed["good"][0]["file"]) as im:
        arr = np.asarray(im.convert("RGB")).astype(int)
    green = (arr[..., 1] > 150) & (arr[..., 0] < 80) & (arr[..., 2] < 80)
    assert green.sum() > 50


def test_one_caption_for_the_image_the_report_and_the_dashboard():
    from engine.samples import caption_parts, sample_caption

    entry = {"kind": "low_iou", "image_id": 7, "file_name": "Cars7.jpg", "gt_count": 2, "pred_count": 1,
             "iou": 0.512, "confidence": 0.9, "reasons": ["small plate (0.4% of the image)"]}
    assert caption_parts(entry, counts=False) == ["low iou", "IoU 0.51", "conf 0.90"]
    assert sample_caption(entry) == ("Cars7.jpg · low iou · ground truth 2 · predicted 1 · IoU 0.51 · conf 0.90"
                                      " · small plate (0.4% of the image)")
    assert sample_caption({"image_id": 3}, " — ") == "3 — ground truth — — predicted —"
