"""The Dataset page's data: split summaries, box statistics and sample images with boxes drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from engine import runs

SPLITS = ("train", "valid", "test")
SUMMARY_COLUMNS = (("images", "images"), ("boxes", "boxes"), ("empty_images", "empty images"),
                   ("dropped_boxes", "dropped boxes"), ("clipped_boxes", "clipped boxes"),
                   ("crowd_ignored", "crowd ignored"))


def splits_from_file(data: Any) -> dict[str, dict]:
    """{split: summary} from a run's dataset.json (the trainer writes {split: summary})."""
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def read_run_dataset(run_dir: Path) -> tuple[dict[str, dict], Optional[str]]:
    """(summaries per split from runs/<run>/dataset.json, data.root from runs/<run>/config.yaml)."""
    root = (runs.read_config(run_dir).get("data") or {}).get("root")
    return splits_from_file(runs.read_json(run_dir / runs.DATASET_FILE)), str(root) if root else None


def summary_table(splits: dict[str, dict]) -> list[dict]:
    rows = []
    for split in [s for s in SPLITS if s in splits] + [s for s in splits if s not in SPLITS]:
        s = splits[split]
        row = {"split": split}
        for key, label in SUMMARY_COLUMNS:
            row[label] = s.get(key)
        rows.append(row)
    return rows


def box_stats(images: list) -> dict[str, list]:
    """Per-image box counts and per-box size (sqrt of area, px), relative area and aspect (w/h)."""
    per_image, size, rel_area, aspect = [], [], [], []
    for rec in images:
        boxes = np.asarray(rec.boxes, dtype=float).reshape(-1, 4)
        per_image.append(int(len(boxes)))
        if not len(boxes):
            continue
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        area = np.clip(w * h, 0, None)
        size += np.sqrt(area).round(2).tolist()
        rel_area += (area / max(1.0, float(rec.width * rec.height))).round(5).tolist()
        aspect += (w / np.maximum(h, 1e-6)).round(3).tolist()
    return {"boxes_per_image": per_image, "box_size_px": size, "box_area_share": rel_area, "aspect": aspect}


def draw_boxes(path: Path, boxes, max_side: int = 480, color: str = "#00e000") -> Image.Image:
    """The image (downscaled to max_side) with ground-truth boxes drawn."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = min(1.0, max_side / max(im.size))
    if scale < 1.0:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    draw = ImageDraw.Draw(im)
    width = max(2, round(max(im.size) / 200))
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        draw.rectangle([x1 * scale, y1 * scale, x2 * scale, y2 * scale], outline=color, width=width)
    return im


def pick_samples(images: list, n: int, seed: int = 0) -> list:
    """n images spread over the split, deterministic for a seed; images with boxes first."""
    if not images:
        return []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    with_boxes = [images[i] for i in order if len(images[i].boxes)]
    without = [images[i] for i in order if not len(images[i].boxes)]
    return (with_boxes + without)[:n]
