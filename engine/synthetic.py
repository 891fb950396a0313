"""Synthetic license-plate dataset in the Roboflow COCO layout (the offline CPU demo's data).

Each image: a cluttered background (gradient, shapes, noise, car-like blobs, plate-like
distractor rectangles without text), 0-3 plates with text, tilted and in perspective, blurred
and under varied light. The box is the tight bounding box of the plate's transformed quad,
clipped to the image. Deterministic: image i of a split depends only on (seed, split, i).
Plates stay learnable on purpose (width mostly 12-40% of the image, clear contrast); hard cases
(small, dark, low-contrast, strong blur or perspective) are a minority.
"""
from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from engine.data import ANNOTATIONS_FILE, SPLITS

CATEGORIES = [
    {"id": 0, "name": "license-plates", "supercategory": "none"},
    {"id": 1, "name": "license_plate", "supercategory": "license-plates"},
]
DATE = "2020-01-01T00:00:00+00:00"
PLATE_RENDER_HEIGHT = 48  # plates are drawn at this height, then warped to their place
CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
# (plate colour, text colour, weight)
PLATE_STYLES = [
    ((242, 242, 238), (20, 20, 20), 0.45),
    ((245, 205, 35), (15, 15, 15), 0.20),
    ((200, 205, 210), (20, 30, 90), 0.10),
    ((25, 25, 28), (240, 240, 240), 0.08),
    ((30, 70, 160), (245, 245, 245), 0.07),
    ((40, 120, 60), (245, 245, 245), 0.05),
    ((150, 150, 145), (95, 95, 95), 0.05),  # low contrast: a hard case
]
CAR_COLOURS = [(180, 20, 25), (20, 40, 110), (30, 30, 30), (200, 200, 205), (120, 120, 125),
               (240, 240, 240), (20, 90, 60), (140, 90, 40), (90, 20, 90), (60, 60, 60)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _colour(rng: np.random.Generator, base=None, spread=40) -> tuple:
    if base is None:
        return tuple(int(v) for v in rng.integers(0, 256, 3))
    return tuple(int(np.clip(b + rng.integers(-spread, spread + 1), 0, 255)) for b in base)


def _pick_style(rng: np.random.Generator):
    weights = np.array([s[2] for s in PLATE_STYLES])
    style = PLATE_STYLES[int(rng.choice(len(PLATE_STYLES), p=weights / weights.sum()))]
    return _colour(rng, style[0], 12), _colour(rng, style[1], 12), style is PLATE_STYLES[-1]


def _plate_text(rng: np.random.Generator, n: int) -> str:
    chars = "".join(CHARS[int(i)] for i in rng.integers(0, len(CHARS), n))
    if n >= 5 and rng.random() < 0.6:
        cut = int(rng.integers(2, n - 1))
        chars = chars[:cut] + (" " if rng.random() < 0.7 else "-") + chars[cut:]
    return chars


def _render_plate(rng: np.random.Generator, aspect: float) -> Image.Image:
    h = PLATE_RENDER_HEIGHT
    w = max(h, int(round(h * aspect)))
    plate_colour, text_colour, _ = _pick_style(rng)
    img = Image.new("RGBA", (w, h), plate_colour + (255,))
    draw = ImageDraw.Draw(img)
    left = 0
    if rng.random() < 0.25 and aspect > 3:  # EU-style blue band
        left = int(w * 0.09)
        draw.rectangle([0, 0, left, h], fill=(30, 60, 170, 255))
    if rng.random() < 0.75:
        border = int(rng.integers(1, 4))
        draw.rectangle([0, 0, w - 1, h - 1], outline=text_colour + (255,), width=border)
    size = int(h * rng.uniform(0.55, 0.72))
    n = int(np.clip(round((w - left) * 0.8 / (0.6 * size)), 2, 9))
    text = _plate_text(rng, n)
    font = _font(size)
    box = draw.textbbox((0, 0), text, font=font, stroke_width=1)
    tw, th = box[2] - box[0], box[3] - box[1]
    if tw > (w - left) * 0.9:
        font = _font(max(8, int(size * (w - left) * 0.9 / tw)))
        box = draw.textbbox((0, 0), text, font=font, stroke_width=1)
        tw, th = box[2] - box[0], box[3] - box[1]
    x = left + (w - left - tw) / 2 - box[0]
    y = (h - th) / 2 - box[1]
    draw.text((x, y), text, font=font, fill=text_colour + (255,), stroke_width=1, stroke_fill=text_colour + (255,))
    return img


def _plate_quad(rng: np.random.Generator, cx: float, cy: float, pw: float, ph: float, hard: bool) -> np.ndarray:
    """Corners (4, 2) of a plate centred at (cx, cy): foreshortened, jittered, rotated."""
    quad = np.array([[-pw / 2, -ph / 2], [pw / 2, -ph / 2], [pw / 2, ph / 2], [-pw / 2, ph / 2]], dtype=np.float64)
    yaw = rng.uniform(0, 0.35 if hard else 0.18)  # one side shorter
    side = [1, 2] if rng.random() < 0.5 else [0, 3]
    quad[side, 1] *= 1 - yaw
    pitch = rng.uniform(0, 0.15 if hard else 0.08)  # top or bottom edge narrower
    edge = [0, 1] if rng.random() < 0.5 else [2, 3]
    quad[edge, 0] *= 1 - pitch
    quad += rng.normal(0, 0.015, (4, 2)) * np.array([pw, ph * 2])
    angle = np.deg2rad(np.clip(rng.normal(0, 9 if hard else 5), -20, 20))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return quad @ rot.T + np.array([cx, cy])


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list:
    """Coefficients for Image.transform(PERSPECTIVE): output point (dst) -> input point (src)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows), np.array(rhs)).tolist()


def _warp_onto(canvas: Image.Image, tile: Image.Image, quad: np.ndarray) -> None:
    w, h = tile.size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    layer = tile.transform(canvas.size, Image.Transform.PERSPECTIVE, _perspective_coeffs(quad, src),
                           resample=Image.Resampling.BICUBIC)
    canvas.alpha_composite(layer)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    top, bottom = np.array(_colour(rng), float), np.array(_colour(rng), float)
    t = np.linspace(0, 1, height)[:, None, None]
    grad = top * (1 - t) + bottom * t
    img = Image.fromarray(np.repeat(grad, width, axis=1).astype(np.uint8), "RGB").convert("RGBA")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        kind = rng.random()
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * width, y0 + rng.uniform(0.05, 0.5) * height
        fill = _colour(rng) + (255,)
        if kind < 0.35:
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif kind < 0.6:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif kind < 0.8:
            pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(int(rng.integers(3, 6)))]
            draw.polygon(pts, fill=fill)
        else:
            draw.line([x0, y0, x1, y1], fill=fill, width=int(rng.integers(1, 6)))
    return img


def _draw_car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, bumper_y: float, car_w: float) -> None:
    """A car-like blob (body, windows, wheels) whose bumper line is at bumper_y."""
    body = _colour(rng, CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))], 20) + (255,)
    car_h = car_w * rng.uniform(0.45, 0.65)
    x0, x1 = cx - car_w / 2, cx + car_w / 2
    y1 = bumper_y + car_h * 0.15
    y0 = y1 - car_h
    draw.rounded_rectangle([x0, y0 + car_h * 0.35, x1, y1], radius=max(1, int(car_h * 0.12)), fill=body)
    draw.rounded_rectangle([x0 + car_w * 0.15, y0, x1 - car_w * 0.15, y0 + car_h * 0.45],
                           radius=max(1, int(car_h * 0.1)), fill=body)
    glass = _colour(rng, (60, 80, 100), 30) + (255,)
    draw.rectangle([x0 + car_w * 0.2, y0 + car_h * 0.06, x1 - car_w * 0.2, y0 + car_h * 0.36], fill=glass)
    r = car_h * 0.16
    for wx in (x0 + car_w * 0.2, x1 - car_w * 0.2):
        draw.ellipse([wx - r, y1 - r, wx + r, y1 + r], fill=(15, 15, 15, 255))
    for lx in (x0 + car_w * 0.05, x1 - car_w * 0.15):  # lights
        draw.rectangle([lx, y0 + car_h * 0.45, lx + car_w * 0.1, y0 + car_h * 0.55], fill=_colour(rng, (230, 200, 120), 25) + (255,))


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """A plate-coloured rectangle without text (or a striped sign): teaches that text matters."""
    w = rng.uniform(0.08, 0.35) * width
    h = w / rng.uniform(0.8, 5.0)
    x, y = rng.uniform(0, width - w), rng.uniform(0, max(1.0, height - h))
    fill = _colour(rng, PLATE_STYLES[int(rng.integers(0, 3))][0], 15) + (255,)
    draw.rectangle([x, y, x + w, y + h], fill=fill)
    if rng.random() < 0.4:
        stripe = _colour(rng) + (255,)
        for k in range(int(rng.integers(2, 5))):
            yy = y + h * (k + 1) / 6
            draw.line([x, yy, x + w, yy], fill=stripe, width=1)


def _overlaps(box: np.ndarray, others: list, margin: float) -> bool:
    for o in others:
        if box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin:
            return True
    return False


def _lighting(img: Image.Image, rng: np.random.Generator, hard: bool) -> Image.Image:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    height, width = arr.shape[:2]
    gain = rng.uniform(0.35, 0.55) if hard and rng.random() < 0.5 else rng.uniform(0.7, 1.25)
    direction = rng.uniform(-1, 1, 2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx / width - 0.5) * direction[0] + (yy / height - 0.5) * direction[1]
    shade = gain * (1 + rng.uniform(0, 0.5) * ramp)
    arr = arr * shade[..., None] + rng.uniform(-15, 15)
    arr += rng.normal(0, rng.uniform(0, 8 if hard else 5), arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return out


def render_image(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list]:
    """One synthetic image and its plate boxes [[x1, y1, x2, y2], ...] in pixels."""
    hard = rng.random() < 0.15
    roll = rng.random()
    n_plates = 0 if roll < 0.10 else (int(rng.integers(2, 4)) if roll < 0.25 else 1)
    canvas = _background(rng, width, height)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.5 else 0):
        _draw_distractor(draw, rng, width, height)

    placed: list = []  # (quad, box)
    scale = 1.0 if n_plates <= 1 else 0.75
    for _ in range(n_plates):
        for _attempt in range(30):
            frac = rng.uniform(0.07, 0.12) if (hard and rng.random() < 0.5) else rng.uniform(0.12, 0.40) * scale
            frac = max(frac, 0.07)
            aspect = float(rng.uniform(1.8, 5.0))
            pw = frac * width
            ph = pw / aspect
            partial = rng.random() < 0.03
            lo_x, hi_x = (0, width) if partial else (pw * 0.6, width - pw * 0.6)
            lo_y, hi_y = (0, height) if partial else (ph * 1.2, height - ph * 1.2)
            if hi_x <= lo_x or hi_y <= lo_y:
                continue
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            quad = _plate_quad(rng, cx, cy, pw, ph, hard)
            box = np.array([quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()])
            box = np.clip(box, 0, [width, height, width, height])
            if box[2] - box[0] <= 4 or box[3] - box[1] <= 3 or _overlaps(box, [p[1] for p in placed], 4):
                continue
            placed.append((quad, box, aspect, pw))
            break

    for quad, box, aspect, pw in placed:  # cars first, so plates sit on top
        if rng.random() < 0.7:
            _draw_car(draw, rng, float(quad[:, 0].mean()) + rng.normal(0, pw * 0.1), float(quad[:, 1].mean()),
                      pw * rng.uniform(2.8, 4.5))
    for quad, box, aspect, pw in placed:
        tile = _render_plate(rng, aspect)
        blur = rng.uniform(1.5, 3.0) if hard and rng.random() < 0.5 else (rng.uniform(0.3, 1.2) if rng.random() < 0.5 else 0)
        if blur:
            tile = tile.filter(ImageFilter.GaussianBlur(blur))
        _warp_onto(canvas, tile, quad)
    image = _lighting(canvas, rng, hard)
    return image, [[float(v) for v in p[1]] for p in placed]


def _coco_json(images: list, annotations: list, split: str, seed: int) -> str:
    data = {
        "info": {"description": f"synthetic license plates, split {split}, seed {seed} (engine.synthetic)",
                 "year": 2020, "date_created": DATE},
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }
    return json.dumps(data, indent=1)


def generate_split(out: Union[str, Path], split: str, count: int, seed: int = 0,
                   width: int = 320, height: int = 240) -> dict:
    """Write `count` images + `_annotations.coco.json` into out/split. Returns its counts."""
    split_dir = Path(out) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    ann_path = split_dir / ANNOTATIONS_FILE
    if ann_path.exists():
        ann_path.unlink()  # an interrupted run then leaves a split that visibly lacks its annotations
    split_code = SPLITS.index(split) if split in SPLITS else 3 + sum(split.encode())
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, split_code, i])
        image, boxes = render_image(rng, width, height)
        file_name = f"synth_{split}_{i:05d}.jpg"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        (split_dir / file_name).write_bytes(buf.getvalue())
        images.append({"id": i, "license": 1, "file_name": file_name, "height": height, "width": width,
                       "date_captured": DATE})
        for x1, y1, x2, y2 in boxes:
            w, h = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({"id": len(annotations), "image_id": i, "category_id": 1,
                                "bbox": [round(x1, 2), round(y1, 2), w, h], "area": round(w * h, 2),
                                "segmentation": [], "iscrowd": 0})
    written = {im["file_name"] for im in images}
    for stale in split_dir.glob(f"synth_{split}_*.jpg"):  # left by an earlier, larger generation
        if stale.name not in written:
            stale.unlink()
    tmp = ann_path.with_name(ann_path.name + ".tmp")
    tmp.write_text(_coco_json(images, annotations, split, seed), encoding="utf-8")
    os.replace(tmp, ann_path)
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=count) if count else np.zeros(0)
    return {"images": count, "boxes": len(annotations), "empty_images": int((per_image == 0).sum()),
            "multi_plate_images": int((per_image >= 2).sum())}


def generate_dataset(out: Union[str, Path], train: int = 600, valid: int = 100, test: int = 100, seed: int = 0,
                     width: int = 320, height: int = 240) -> dict:
    """Write a deterministic synthetic dataset in the Roboflow layout under `out`."""
    out = Path(out)
    splits = {}
    for split, count in (("train", train), ("valid", valid), ("test", test)):
        splits[split] = generate_split(out, split, count, seed, width, height)
    return {"root": str(out), "seed": seed, "width": width, "height": height, "splits": splits}
