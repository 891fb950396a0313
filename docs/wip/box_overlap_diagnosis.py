"""Diagnosis (issue 11, session 8): how a checkpoint's boxes miss the plates of a plates-real split.

Prints AP at IoU 0.1 / 0.3 / 0.5 (engine.metrics.pr_curve, the COCO 101-point AP) and, for every labelled
plate, the best-overlapping predicted box: how many overlap at IoU > 0.1, their median IoU, and their width /
height relative to the plate's (quartiles).

    .venv/bin/python docs/wip/box_overlap_diagnosis.py checkpoints/RUN/best.pth valid
"""
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from engine import metrics  # noqa: E402
from engine.data import PlateDataset, load_split  # noqa: E402
from engine.evaluate import _predict_timed  # noqa: E402
from engine.model import load_model_from_checkpoint  # noqa: E402


def predict_split(checkpoint: str, split: str) -> tuple[list, list]:
    """Ground truth and predictions per image, by the same loop as `python -m engine evaluate`."""
    model, _ = load_model_from_checkpoint(checkpoint, device="cpu")
    model.eval()
    dataset = PlateDataset(load_split(ROOT.parent / "shared" / "data" / "plates-real", split), train=False)
    gts, preds, *_ = _predict_timed(model, dataset, torch.device("cpu"), False, False, split, None)
    return gts, preds


def best_overlaps(gts: list, preds: list) -> np.ndarray:
    """(n, 3): width ratio, height ratio and IoU of each plate's best-overlapping box, IoU > 0.1 only."""
    rows = []
    for gt, pred in zip(gts, preds):
        plates, boxes = np.asarray(gt["boxes"]).reshape(-1, 4), np.asarray(pred["boxes"]).reshape(-1, 4)
        if not len(plates) or not len(boxes):
            continue
        ious = metrics.box_iou(boxes, plates)
        for j, plate in enumerate(plates):
            k = int(np.argmax(ious[:, j]))
            if ious[k, j] > 0.1:
                box = boxes[k]
                rows.append(((box[2] - box[0]) / (plate[2] - plate[0]), (box[3] - box[1]) / (plate[3] - plate[1]),
                             ious[k, j]))
    return np.array(rows).reshape(-1, 3)


def _quartiles(values: np.ndarray) -> str:
    return "-".join(f"{v:.2f}" for v in np.percentile(values, [25, 75]))


def main() -> None:
    gts, preds = predict_split(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "valid")
    print("AP at IoU " + ", ".join(f"{iou}: {metrics.pr_curve(gts, preds, iou)['ap']:.3f}" for iou in (0.1, 0.3, 0.5)))
    rows = best_overlaps(gts, preds)
    plates = sum(len(np.asarray(g["boxes"]).reshape(-1, 4)) for g in gts)
    print(f"{len(rows)} of {plates} plates overlapped at IoU > 0.1; median IoU {np.median(rows[:, 2]):.2f}; "
          f"width / height vs the plate: median {np.median(rows[:, 0]):.2f} / {np.median(rows[:, 1]):.2f}, "
          f"quartiles {_quartiles(rows[:, 0])} / {_quartiles(rows[:, 1])}")


if __name__ == "__main__":
    main()
