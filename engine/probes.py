"""Probe images: a fixed set of validation images predicted after every epoch.

Written into the run folder so the dashboard can show detections improving with an epoch slider:

    probes/epoch_NNN/<image id>.jpg   thumbnails (longest side 160 px): ground truth green,
                                      detections with score >= 0.5 orange
    probes/index.json                 {"thumb_size", "draw_threshold", "images": [{id, file_name, width,
                                      height, gt_boxes}], "epochs": [1, 2, ...], "detections":
                                      {"<epoch>": {"<image id>": {"file", "boxes", "scores", "best_iou"}}}}

index.json is rewritten atomically after each epoch (a resumed run replaces a repeated epoch).
Boxes in index.json are in original image pixels; only detections with score >= 0.25 (at most 20 per
image) are listed.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.data import CocoSplit, ImageRecord, read_image
from engine.metrics import box_iou
from engine.predict import image_to_tensor, infer
from engine.runs import PROBES_DIR, PROBES_EPOCH_DIR, PROBES_INDEX, atomic_write_bytes, atomic_write_json, read_json
from engine.samples import GT_COLOR, TP_COLOR

THUMB_SIZE = 160
DRAW_THRESHOLD = 0.5
LIST_THRESHOLD = 0.25
LIST_MAX = 20


def select_probe_images(split: CocoSplit, n: int, seed: int) -> list[ImageRecord]:
    """`n` images chosen reproducibly by `seed`, preferring images with plates; sorted by id."""
    if n <= 0:
        return []
    records = sorted(split.images, key=lambda r: r.id)
    with_plates = [r for r in records if len(r.boxes)]
    rng = random.Random(seed)
    chosen = rng.sample(with_plates, min(n, len(with_plates)))
    if len(chosen) < n:
        negatives = [r for r in records if not len(r.boxes)]
        chosen += rng.sample(negatives, min(n - len(chosen), len(negatives)))
    return sorted(chosen, key=lambda r: r.id)


def _thumbnail(image: Image.Image, gt_boxes: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> Image.Image:
    scale = THUMB_SIZE / max(image.size)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(thumb)
    for box in np.asarray(gt_boxes).reshape(-1, 4):
        draw.rectangle([float(v) * scale for v in box], outline=GT_COLOR, width=1)
    for box, score in zip(boxes, scores):
        if score >= DRAW_THRESHOLD:
            draw.rectangle([float(v) * scale for v in box], outline=TP_COLOR, width=2)
    return thumb


def write_probes(model: torch.nn.Module, records: list[ImageRecord], run_dir: Union[str, Path], epoch: int,
                 device: Union[str, torch.device], test_size: Optional[int] = None) -> dict:
    """Predict `records` with `model` (at the eval size `test_size`), write the thumbnails of `epoch`
    and update probes/index.json. The model's train/eval mode and sizes are restored afterwards.
    Returns the index."""
    device = torch.device(device)
    probe_dir = Path(run_dir) / PROBES_DIR
    epoch_dir = probe_dir / PROBES_EPOCH_DIR.format(epoch=epoch)
    epoch_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    transform = getattr(model, "transform", None)
    old_test_size = getattr(transform, "test_size", None)
    detections = {}
    try:
        if test_size and old_test_size is not None:
            transform.test_size = int(test_size)
        model.eval()
        for record in records:
            image = read_image(record.path)
            boxes, scores, _, _ = infer(model, image_to_tensor(image).to(device), device)
            thumb = _thumbnail(image, record.boxes, boxes, scores)
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            atomic_write_bytes(epoch_dir / f"{record.id}.jpg", buffer.getvalue())
            listed = scores >= LIST_THRESHOLD
            kept = scores >= DRAW_THRESHOLD
            ious = box_iou(boxes[kept], record.boxes)
            detections[str(record.id)] = {
                "file": f"{epoch_dir.name}/{record.id}.jpg",
                "boxes": [[round(float(v), 1) for v in b] for b in boxes[listed][:LIST_MAX]],
                "scores": [round(float(s), 4) for s in scores[listed][:LIST_MAX]],
                "best_iou": round(float(ious.max()), 4) if ious.size else 0.0}
    finally:
        if old_test_size is not None:
            transform.test_size = old_test_size
        model.train(was_training)
    index = read_json(probe_dir / PROBES_INDEX)
    if not isinstance(index, dict):
        index = {}
    index["thumb_size"] = THUMB_SIZE
    index["draw_threshold"] = DRAW_THRESHOLD
    index["images"] = [{"id": r.id, "file_name": r.file_name, "width": r.width, "height": r.height,
                        "gt_boxes": [[round(float(v), 1) for v in b] for b in r.boxes]} for r in records]
    all_detections = index.get("detections") if isinstance(index.get("detections"), dict) else {}
    all_detections[str(epoch)] = detections
    index["detections"] = {k: all_detections[k] for k in sorted(all_detections, key=int)}
    index["epochs"] = [int(k) for k in index["detections"]]
    atomic_write_json(probe_dir / PROBES_INDEX, index)
    return index
