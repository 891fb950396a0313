"""faster-coco-eval against pycocotools on real predictions: a really trained (tiny) checkpoint on real photos."""
import numpy as np

from engine import metrics
from engine.data import load_split
from engine.predict import Predictor, load_image


def test_all_12_stats_equal_pycocotools_on_real_predictions(tiny_real_run, plates_real):
    _, checkpoints_dir, name = tiny_real_run
    predictor = Predictor(checkpoints_dir / name / "best.pth", device="cpu", score_floor=0.0)
    split = load_split(plates_real, "valid")
    gts, preds = [], []
    for record in split.images[:40]:
        image = load_image(record.path)
        pred = predictor.predict(image)
        gts.append({"image_id": record.id, "boxes": record.boxes, "width": record.width, "height": record.height})
        preds.append({"image_id": record.id, "boxes": np.array(pred["boxes"]).reshape(-1, 4),
                      "scores": np.array(pred["scores"])})
    assert sum(len(p["scores"]) for p in preds) > 100  # a real model's output, not a hand-made case
    fast = metrics.coco_stats(gts, preds, backend="faster")
    ref = metrics.coco_stats(gts, preds, backend="pycocotools")
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
    matches = metrics.match_detections(gts, preds)
    assert sum(int((m["pred_gt"] >= 0).sum()) for m in matches) == metrics.prf_at_threshold(
        gts, preds, 0.0, matches=matches)["tp"]
