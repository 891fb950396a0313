"""Sample predictions for the results: the best ones and the challenging cases, with reasons.

Selection (`select_samples`) is pure: it works on `metrics.match_detections` output at the
deployment threshold and optional per-image brightness statistics. Drawing (`write_samples`)
loads the chosen images and writes `samples/*.jpg` plus `samples.json`.

Kinds: "good" (highest IoU x confidence), and the challenging "missed" (a plate no kept detection
found), "false_positive" (a kept detection on no plate), "low_iou" (found, but the box fits worst).
Measured reasons, where one applies:
  small plate     box area < 1% of the image
  dark image      mean luminance < 60/255
  low contrast    luminance standard deviation < 30/255
  unusual aspect  box width/height outside 1.5..6
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.metrics import box_iou
from engine.runs import SAMPLES_DIR, SAMPLES_FILE, atomic_write_json

SMALL_AREA_SHARE = 0.01
DARK_BRIGHTNESS = 60.0  # on 0..255
LOW_CONTRAST = 30.0  # luminance std on 0..255
ASPECT_RANGE = (1.5, 6.0)

GT_COLOR = (0, 200, 0)
TP_COLOR = (255, 150, 0)  # orange: a kept detection that matched a plate
FP_COLOR = (230, 30, 30)  # red: a kept detection on no plate


# ----------------------------------------------------------------------------- measurements
def luminance_stats(image) -> dict:
    """{"brightness", "contrast"}: mean and standard deviation of the luminance on 0..255.

    `image` is a PIL image or a float tensor / array CHW in [0, 1] (RGB).
    """
    if isinstance(image, Image.Image):
        luma = np.asarray(image.convert("L"), dtype=np.float64)
    else:
        arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        arr = arr.astype(np.float64) * 255.0
        luma = arr[0] if arr.shape[0] == 1 else 0.299 * arr[0] + 0.587 * arr[1] + 0.114 * arr[2]
    return {"brightness": round(float(luma.mean()), 2), "contrast": round(float(luma.std()), 2)}


def box_measures(box, width: int, height: int) -> dict:
    """{"area_share" (box area / image area), "aspect" (width / height)} of an xyxy box."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    area = max(width, 1) * max(height, 1)
    return {"area_share": round(max(w, 0) * max(h, 0) / area, 6), "aspect": round(w / h, 3) if h > 0 else 0.0}


def reasons_for(measures: dict, stats: Optional[dict]) -> tuple[list[str], list[str]]:
    """(tags, readable reasons) that apply to a box's measures and its image's statistics."""
    tags, texts = [], []
    if measures["area_share"] < SMALL_AREA_SHARE:
        tags.append("small")
        texts.append(f"small plate ({measures['area_share'] * 100:.2f}% of the image)")
    aspect = measures["aspect"]
    if not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]:
        tags.append("unusual_aspect")
        texts.append(f"unusual aspect (w/h {aspect:.2f}, usual {ASPECT_RANGE[0]:g}-{ASPECT_RANGE[1]:g})")
    if stats:
        if stats["brightness"] < DARK_BRIGHTNESS:
            tags.append("dark")
            texts.append(f"dark image (mean brightness {stats['brightness']:.0f}/255)")
        if stats["contrast"] < LOW_CONTRAST:
            tags.append("low_contrast")
            texts.append(f"low contrast (brightness std {stats['contrast']:.0f}/255)")
    return tags, texts


# ----------------------------------------------------------------------------- selection
def _entry(kind: str, m: dict, kept: np.ndarray, box, iou, confidence, stats: Optional[dict],
           with_reasons: bool, gt_box=None) -> dict:
    measures = box_measures(box, m["width"] or 1, m["height"] or 1)
    tags, texts = reasons_for(measures, stats) if with_reasons else ([], [])
    return {"kind": kind, "image_id": m["image_id"], "gt_count": int(len(m["gt_boxes"])),
            "pred_count": int(kept.sum()), "iou": None if iou is None else round(float(iou), 4),
            "confidence": None if confidence is None else round(float(confidence), 4),
            "box": [round(float(v), 2) for v in box],
            "gt_box": None if gt_box is None else [round(float(v), 2) for v in gt_box],
            "measures": {**measures, **(stats or {})}, "tags": tags, "reasons": texts}


def _top_per_image(candidates: list[tuple], n: int) -> list[dict]:
    """The first `n` entries of (sort_key, entry) sorted by key, at most one per image."""
    out, seen = [], set()
    for _, entry in sorted(candidates, key=lambda c: c[0]):
        if entry["image_id"] in seen:
            continue
        seen.add(entry["image_id"])
        out.append(entry)
        if len(out) == n:
            break
    return out


def select_samples(matches: list[dict], score_threshold: float, image_stats: Optional[dict] = None,
                   n_good: int = 6, n_per_kind: int = 4) -> dict:
    """{"good": [...], "challenging": [...]} from per-image matches (metrics.match_detections).

    Only detections with score >= score_threshold count, as at deployment. Good: matched pairs by
    IoU x confidence, highest first. Challenging: missed plates (smallest best IoU with a kept
    detection first), false positives (most confident first), lowest-IoU matches. At most one entry
    per image and kind; ties broken by image id.
    """
    image_stats = image_stats or {}
    good, missed, false_pos, low_iou = [], [], [], []
    for m in matches:
        image_id = m["image_id"]
        stats = image_stats.get(image_id)
        scores = m["scores"]
        kept = scores >= score_threshold
        matched_kept = kept & (m["pred_gt"] >= 0)
        for d in np.flatnonzero(matched_kept):
            g = m["pred_gt"][d]
            iou, conf = m["pred_iou"][d], scores[d]
            gt_box = m["gt_boxes"][g]
            good.append(((-iou * conf, image_id), _entry("good", m, kept, m["pred_boxes"][d], iou, conf,
                                                         stats, False, gt_box)))
            low_iou.append(((iou, image_id), _entry("low_iou", m, kept, gt_box, iou, conf, stats, True,
                                                    gt_box)))
        for d in np.flatnonzero(kept & (m["pred_gt"] < 0)):
            conf = scores[d]
            false_pos.append(((-conf, image_id), _entry("false_positive", m, kept, m["pred_boxes"][d],
                                                        m["pred_iou"][d], conf, stats, True)))
        kept_boxes = m["pred_boxes"][kept]
        for g, gt_box in enumerate(m["gt_boxes"]):
            d = m["gt_pred"][g]
            if d >= 0 and kept[d]:
                continue
            best_iou = float(box_iou(gt_box[None], kept_boxes).max()) if len(kept_boxes) else 0.0
            below = float(scores[d]) if d >= 0 else None  # a match that scored under the threshold
            missed.append(((best_iou, image_id), _entry("missed", m, kept, gt_box, best_iou, below, stats,
                                                        True, gt_box)))
    return {"score_threshold": float(score_threshold),
            "good": _top_per_image(good, n_good),
            "challenging": (_top_per_image(missed, n_per_kind) + _top_per_image(false_pos, n_per_kind)
                            + _top_per_image(low_iou, n_per_kind))}


# ----------------------------------------------------------------------------- drawing
def label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw_labeled_box(draw: ImageDraw.ImageDraw, box, color, label: str = "", width: int = 2, font=None) -> None:
    x1, y1, x2, y2 = [float(v) for v in box]
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if label:
        font = font or label_font(12)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y2 + 1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=color)
        draw.text((x1 + 2 - left, ty + 2 - top), label, fill=(0, 0, 0), font=font)


def caption_parts(entry: dict, counts: bool = True) -> list[str]:
    """What a sample is shown with (drawn image, report, dashboard): case, plate counts, IoU, confidence."""
    parts = [str(entry["kind"]).replace("_", " ")] if entry.get("kind") else []
    if counts:
        parts += [f"ground truth {entry.get('gt_count', '—')}", f"predicted {entry.get('pred_count', '—')}"]
    if entry.get("iou") is not None:
        parts.append(f"IoU {entry['iou']:.2f}")
    if entry.get("confidence") is not None:
        parts.append(f"conf {entry['confidence']:.2f}")
    return parts


def sample_caption(entry: dict, sep: str = " · ") -> str:
    """One line: the image name, caption_parts, then the measured reasons."""
    name = str(entry.get("file_name") or entry.get("image_id") or "?")
    return sep.join([name, *caption_parts(entry), *map(str, entry.get("reasons") or [])])


def draw_sample(image: Image.Image, match: dict, entry: dict, score_threshold: float) -> Image.Image:
    """The image with ground truth (green), kept detections (orange matched, red false) and a caption."""
    image = image.convert("RGB")
    w, h = image.size
    scale = max(1.0, 480.0 / max(w, h))  # small images are enlarged so the labels stay readable
    if scale > 1:
        image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    line = max(3, round(min(image.size) / 150))
    font = label_font(max(11, min(image.size) // 32))
    draw = ImageDraw.Draw(image)
    for d in np.flatnonzero(match["scores"] >= score_threshold):
        color = TP_COLOR if match["pred_gt"][d] >= 0 else FP_COLOR
        draw_labeled_box(draw, match["pred_boxes"][d] * scale, color, f"{match['scores'][d]:.2f}", line, font)
    for box in match["gt_boxes"]:  # drawn just outside the box, so a perfect match shows both
        draw_labeled_box(draw, np.asarray(box) * scale + np.array([-line, -line, line, line]), GT_COLOR, "", line)
    lines = ["  ".join(caption_parts(entry, counts=False))] + list(entry.get("reasons") or [])
    cap_font = label_font(max(11, image.size[0] // 40))
    line_h = draw.textbbox((0, 0), "Ag", font=cap_font)[3] + 4
    canvas = Image.new("RGB", (image.size[0], image.size[1] + line_h * len(lines) + 6), (20, 20, 20))
    canvas.paste(image, (0, 0))
    cdraw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        cdraw.text((6, image.size[1] + 3 + i * line_h), text, fill=(240, 240, 240), font=cap_font)
    return canvas


def write_samples(selection: dict, matches: list[dict], image_paths: dict, out_dir: Union[str, Path],
                  file_names: Optional[dict] = None) -> dict:
    """Draw every selected entry to `out_dir/samples/<kind>_<rank>_<image id>.jpg`, write samples.json.

    `image_paths` maps image id -> image file. Returns the samples.json content, where each entry
    gained "file" (relative to out_dir) and "file_name" (the dataset's image name).
    """
    out_dir = Path(out_dir)
    sample_dir = out_dir / SAMPLES_DIR
    sample_dir.mkdir(parents=True, exist_ok=True)
    for old in sample_dir.glob("*.jpg"):
        old.unlink()
    by_id = {m["image_id"]: m for m in matches}
    thr = selection["score_threshold"]
    written = {"score_threshold": thr, "good": [], "challenging": []}
    for group in ("good", "challenging"):
        counters: dict = {}
        for entry in selection[group]:
            counters[entry["kind"]] = counters.get(entry["kind"], 0) + 1
            name = f"{entry['kind']}_{counters[entry['kind']]:02d}_{entry['image_id']}.jpg"
            path = image_paths.get(entry["image_id"])
            entry = {**entry, "file": None,
                     "file_name": (file_names or {}).get(entry["image_id"], Path(path).name if path else None)}
            if path is not None:
                with Image.open(path) as img:
                    draw_sample(img, by_id[entry["image_id"]], entry, thr).save(sample_dir / name, quality=90)
                entry["file"] = f"{SAMPLES_DIR}/{name}"
            written[group].append(entry)
    atomic_write_json(out_dir / SAMPLES_FILE, written)
    return written
