"""Metrics on hand-made cases (exact numbers) and against pycocotools on the same detections."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from engine import metrics


def _gt(image_id, boxes, width=100, height=100):
    return {"image_id": image_id, "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "width": width, "height": height}


def _pred(image_id, boxes, scores):
    return {"image_id": image_id, "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "scores": np.array(scores, dtype=np.float32)}


@pytest.fixture
def hand_case():
    """4 gt plates; detections: .95 FP, .9 TP, .8 TP (IoU 0.68), .4 TP, .3 FP, .2 duplicate FP; one miss."""
    gts = [_gt(1, [[0, 0, 10, 10], [20, 20, 30, 30]]), _gt(2, [[0, 0, 10, 10]]), _gt(3, []),
           _gt(4, [[0, 0, 10, 10]])]
    preds = [_pred(1, [[0, 0, 10, 10], [21, 21, 31, 31], [50, 50, 60, 60]], [0.9, 0.8, 0.3]),
             _pred(2, [[1, 0, 11, 10], [0, 0, 10, 10]], [0.2, 0.4]),
             _pred(3, [[5, 5, 15, 15]], [0.95])]
    return gts, preds


def test_prf_at_threshold_exact(hand_case):
    gts, preds = hand_case
    r = metrics.prf_at_threshold(gts, preds, 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 2)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(4 / 7)
    assert r["threshold"] == 0.5
    r = metrics.prf_at_threshold(gts, preds, 0.4)  # score >= threshold is kept
    assert (r["tp"], r["fp"], r["fn"]) == (3, 1, 1)
    assert r["f1"] == pytest.approx(0.75)
    r = metrics.prf_at_threshold(gts, preds, 0.0)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 3, 1)
    assert r["precision"] == pytest.approx(0.5) and r["f1"] == pytest.approx(0.6)
    r = metrics.prf_at_threshold(gts, preds, 0.99)  # nothing kept
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"]) == (0, 0, 4, 0.0, 0.0, 0.0)


def test_best_f1_exact(hand_case):
    gts, preds = hand_case
    best = metrics.best_f1(gts, preds)
    assert best["threshold"] == pytest.approx(0.4)
    assert (best["tp"], best["fp"], best["fn"]) == (3, 1, 1)
    assert best["precision"] == pytest.approx(0.75) and best["recall"] == pytest.approx(0.75)
    assert best["f1"] == pytest.approx(0.75)


def test_prf_vs_confidence_grid(hand_case):
    gts, preds = hand_case
    curve = metrics.prf_vs_confidence(gts, preds, thresholds=[0.0, 0.25, 0.35, 0.5, 0.85, 0.92, 1.0])
    assert curve["tp"] == [3, 3, 3, 2, 1, 0, 0]
    assert curve["fp"] == [3, 2, 1, 1, 1, 1, 0]
    assert curve["fn"] == [1, 1, 1, 2, 3, 4, 4]
    assert curve["f1"] == pytest.approx([0.6, 2 / 3, 0.75, 4 / 7, 1 / 3, 0.0, 0.0])
    default = metrics.prf_vs_confidence(gts, preds)
    assert len(default["threshold"]) == 101 and default["threshold"][0] == 0 and default["threshold"][-1] == 1
    assert max(default["f1"]) <= metrics.best_f1(gts, preds)["f1"] + 1e-12


def test_matching_is_one_to_one_greedy_by_score():
    # two overlapping plates; the top detection takes the gt it overlaps most, the second the other one
    gts = [_gt(7, [[0, 0, 10, 10], [4, 0, 14, 10]])]
    preds = [_pred(7, [[0, 0, 10, 10], [3, 0, 13, 10], [0, 0, 10, 10]], [0.5, 0.9, 0.1])]
    (m,) = metrics.match_detections(gts, preds)
    assert m["scores"].tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert m["pred_gt"].tolist() == [1, 0, -1]  # [3,0,13,10] overlaps gt 1 (IoU .82) more than gt 0 (.54)
    assert m["gt_pred"].tolist() == [1, 0]
    # a detection under IoU 0.5 is a false positive and leaves a miss
    r = metrics.prf_at_threshold([_gt(1, [[0, 0, 10, 10]])], [_pred(1, [[5, 0, 15, 10]], [0.9])], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)


def _random_case(seed, n_images=30):
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(n_images):
        w, h = 640, 480
        n = rng.integers(0, 4)
        sizes = rng.uniform(12, 200, size=(n, 1)) * np.array([[1.0, 0.3]])
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([w, h]) - sizes)
        boxes = np.concatenate([xy, xy + sizes], axis=1)
        gts.append({"image_id": i * 3 + 5, "boxes": boxes.astype(np.float32), "width": w, "height": h})
        det, sc = [], []
        for b in boxes:
            if rng.random() < 0.85:  # found, with jitter that sometimes drops IoU under 0.5
                bw, bh = b[2] - b[0], b[3] - b[1]
                det.append(b + rng.normal(0, 0.12, 4) * np.array([bw, bh, bw, bh]))
                sc.append(rng.uniform(0.2, 1.0))
                if rng.random() < 0.15:  # a duplicate
                    det.append(b + rng.normal(0, 0.05, 4) * np.array([bw, bh, bw, bh]))
                    sc.append(rng.uniform(0.05, 0.8))
        for _ in range(rng.integers(0, 3)):  # false positives
            xy = rng.uniform(0, 400, 2)
            det.append(np.concatenate([xy, xy + rng.uniform(10, 120, 2)]))
            sc.append(rng.uniform(0.05, 0.9))
        if det:
            det = np.array(det)
            det[:, [0, 2]] = det[:, [0, 2]].clip(0, w)
            det[:, [1, 3]] = det[:, [1, 3]].clip(0, h)
            preds.append({"image_id": i * 3 + 5, "boxes": det.astype(np.float32),
                          "scores": np.array(sc, dtype=np.float32)})
    return gts, preds


def _pycocotools_stats(gts, preds):
    """A direct pycocotools run from xywh annotations, built independently of engine.metrics."""
    images = [{"id": g["image_id"], "width": g["width"], "height": g["height"]} for g in gts]
    anns = []
    for g in gts:
        for x1, y1, x2, y2 in g["boxes"].tolist():
            anns.append({"id": len(anns) + 1, "image_id": g["image_id"], "category_id": 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    results = [{"image_id": p["image_id"], "category_id": 1, "score": float(s),
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for p in preds for b, s in zip(p["boxes"].tolist(), p["scores"].tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pr_curve_ap_agrees_with_pycocotools_ap50(seed):
    gts, preds = _random_case(seed)
    stats = _pycocotools_stats(gts, preds)
    curve = metrics.pr_curve(gts, preds)
    assert 0.2 < stats[1] < 0.99  # a non-trivial case
    assert abs(curve["ap"] - stats[1]) < 0.01
    env = np.array(curve["precision_envelope"])
    assert np.all(np.diff(env) <= 1e-12)  # monotone non-increasing
    assert np.all(env >= np.array(curve["precision"]) - 1e-12)
    assert np.all(np.diff(curve["recall"]) >= 0) and curve["recall"][-1] <= 1.0
    assert len(curve["precision_interpolated"]) == 101


@pytest.mark.parametrize("seed", [0, 5])
def test_coco_map_equals_direct_pycocotools(seed):
    gts, preds = _random_case(seed)
    stats = _pycocotools_stats(gts, preds)
    got = metrics.coco_map(gts, preds)
    expected = {"map50_95": stats[0], "map50": stats[1], "map75": stats[2],
                "map_small": stats[3], "map_medium": stats[4], "map_large": stats[5]}
    for key, value in expected.items():
        assert got[key] == pytest.approx(max(value, 0.0), abs=1e-6), key


def test_empty_cases_give_zero_not_minus_one(capsys):
    gts = [_gt(1, [[0, 0, 10, 10]])]
    assert metrics.coco_map(gts, []) == {k: 0.0 for k in metrics.COCO_KEYS}
    assert metrics.coco_map([_gt(1, [])], [_pred(1, [[0, 0, 5, 5]], [0.9])]) == {k: 0.0 for k in metrics.COCO_KEYS}
    assert metrics.pr_curve(gts, [])["ap"] == 0.0
    assert metrics.best_f1(gts, [])["f1"] == 0.0
    # only large boxes: map_small has no gt -> 0.0, not -1
    big = [_gt(1, [[0, 0, 100, 100]])]
    r = metrics.coco_map(big, [_pred(1, [[0, 0, 100, 100]], [0.9])])
    assert r["map50"] == pytest.approx(1.0) and r["map_small"] == 0.0 and r["map_large"] == pytest.approx(1.0)
    assert capsys.readouterr().out == ""  # pycocotools' prints are swallowed


def test_detection_metrics_keys(hand_case):
    gts, preds = hand_case
    r = metrics.detection_metrics(gts, preds, score_threshold=0.5)
    for key in ("map50", "map50_95", "map75", "precision", "recall", "f1", "tp", "fp", "fn", "score_threshold"):
        assert key in r
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["map50"] == pytest.approx(metrics.pr_curve(gts, preds)["ap"], abs=0.01)


# ----------------------------------------------------------------------------- faster-coco-eval, vectorised matching
def _reference_matching(gts, preds, iou=0.5):
    """The greedy rule written as the plain per-image loop it is (pred_gt per image, by image id)."""
    out = {}
    by_image = {}
    for p in preds:
        by_image.setdefault(int(p["image_id"]), []).append(p)
    for g in gts:
        ps = by_image.get(int(g["image_id"]), [])
        boxes = np.concatenate([np.asarray(p["boxes"], float).reshape(-1, 4) for p in ps]) if ps else np.zeros((0, 4))
        scores = np.concatenate([np.asarray(p["scores"], float) for p in ps]) if ps else np.zeros(0)
        order = np.argsort(-scores, kind="mergesort")[: metrics.MAX_DETS]
        ious = metrics.box_iou(boxes[order], g["boxes"])
        taken, pred_gt = set(), []
        for d in range(len(order)):
            best, m = min(iou, 1 - 1e-10), -1
            for j in range(ious.shape[1]):
                if j not in taken and ious[d, j] >= best:
                    best, m = ious[d, j], j
            if m >= 0:
                taken.add(m)
            pred_gt.append(m)
        out[int(g["image_id"])] = pred_gt
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_vectorised_matching_equals_the_plain_loop(seed):
    gts, preds = _random_case(seed, n_images=60)
    expected = _reference_matching(gts, preds)
    got = metrics.match_detections(gts, preds, images_per_pass=7)  # several passes
    assert {m["image_id"]: m["pred_gt"].tolist() for m in got} == expected
    for m in got:
        assert all(m["gt_pred"][g] == d for d, g in enumerate(m["pred_gt"]) if g >= 0)


@pytest.mark.parametrize("seed", [0, 1, 5, 9])
def test_faster_coco_eval_gives_pycocotools_12_stats(seed):
    gts, preds = _random_case(seed, n_images=80)
    fast = metrics.coco_stats(gts, preds, backend="faster")
    ref = metrics.coco_stats(gts, preds, backend="pycocotools")
    assert len(fast) == 12 and 0.2 < ref[1] < 0.99
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
