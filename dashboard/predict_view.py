"""The Predict page's logic: checkpoint choice, per-file caching keys, score filtering, downloads."""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from engine import runs

UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp")


def runs_with_checkpoints(runs_dir: Path, checkpoints_dir: Path) -> list[str]:
    """Run names that have best.pth or last.pth, runs newest first, then checkpoint-only folders."""
    names = [n for n in runs.list_run_names(runs_dir) if available_checkpoints(checkpoints_dir, n)]
    if checkpoints_dir.is_dir():
        extra = sorted(p.name for p in checkpoints_dir.iterdir()
                       if p.is_dir() and p.name not in names and available_checkpoints(checkpoints_dir, p.name))
        names += extra
    return names


def available_checkpoints(checkpoints_dir: Path, run: str) -> dict[str, Path]:
    """{'best': path, 'last': path} for the files that exist."""
    out = {}
    for which in ("best", "last"):
        p = runs.checkpoint_path(checkpoints_dir, run, which)
        if p.is_file():
            out[which] = p
    return out


def checkpoint_key(path: Path) -> tuple[str, float]:
    """(path, mtime): a rewritten checkpoint gets a fresh cached model."""
    try:
        return str(path), path.stat().st_mtime
    except OSError:
        return str(path), 0.0


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def filter_prediction(pred: dict, threshold: float) -> dict:
    """The prediction with only the boxes whose score >= threshold (no model call)."""
    keep = [i for i, s in enumerate(pred.get("scores") or []) if s >= threshold]
    return {**pred, "boxes": [pred["boxes"][i] for i in keep], "scores": [pred["scores"][i] for i in keep],
            "threshold": threshold}


def boxes_json(name: str, pred: dict, checkpoint: Optional[str] = None) -> str:
    out = {"image": name, "width": pred.get("width"), "height": pred.get("height"),
           "threshold": pred.get("threshold"), "ms": pred.get("ms"), "checkpoint": checkpoint,
           "detections": [{"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4)}
                          for b, s in zip(pred.get("boxes") or [], pred.get("scores") or [])]}
    return json.dumps(out, indent=2)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def download_name(name: str, suffix: str) -> str:
    stem = Path(name).stem or "image"
    return f"{stem}{suffix}"


# ----------------------------------------------------------------------------- phone-size photos
DISPLAY_MAX_SIDE = 1280  # the annotated copy sent to the browser
DISPLAY_QUALITY = 85
DOWNLOAD_QUALITY = 92
MAX_PHOTOS = 6  # decoded photos kept per session


@dataclass
class Photo:
    """One upload decoded once: the model's input size and a display copy, plus the original bytes."""
    name: str
    data: bytes
    digest: str
    width: int  # full size, EXIF orientation applied
    height: int
    model_input: Image.Image  # the size the model's transform would resize to (no resize left for it)
    display: Image.Image  # longest side <= DISPLAY_MAX_SIDE
    decode_ms: float


def model_input_size(width: int, height: int, test_size: int, max_size: int) -> tuple[int, int]:
    """The (w, h) torchvision's eval transform resizes an image to: shorter side test_size, longer <= max_size."""
    scale = min(test_size / min(width, height), max_size / max(width, height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _fit(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_photo(data: bytes, name: str, test_size: int, max_size: int, display_side: int = DISPLAY_MAX_SIDE) -> Photo:
    """Decode once at the resolution needed (a JPEG is DCT-scaled while decoding), apply EXIF orientation,
    and make the model-input and display copies. Bad files raise engine.predict.ImageError (one line)."""
    from engine.predict import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, load_image

    start = time.perf_counter()
    image = None
    if data and len(data) <= MAX_IMAGE_BYTES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                w, h = image.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError("too many pixels")
                mw, mh = model_input_size(w, h, test_size, max_size)
                dw, dh = _fit(w, h, display_side)
                image.draft("RGB", (max(mw, dw), max(mh, dh)))  # JPEG only; other formats decode in full
                image.load()
                image = ImageOps.exif_transpose(image) or image
                image = image.convert("RGB")
        except Exception:  # anything odd: the careful loader below decides and words the error
            image = None
    if image is None:
        image = load_image(data, name)
    full_w, full_h = _oriented_size(data, image)
    model_input = image.resize(model_input_size(full_w, full_h, test_size, max_size), Image.BILINEAR)
    display = image.resize(_fit(full_w, full_h, display_side), Image.BILINEAR) \
        if max(image.size) > display_side else image
    return Photo(name, data, file_hash(data), full_w, full_h, model_input, display,
                 (time.perf_counter() - start) * 1000)


def _oriented_size(data: bytes, decoded: Image.Image) -> tuple[int, int]:
    """The full-resolution size with EXIF orientation applied (the decoded copy may be DCT-scaled)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return decoded.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if abs(w / h - decoded.width / decoded.height) > 0.02:  # orientation not applied: trust the pixels
        return decoded.size
    return w, h


def predict_photo(predictor, photo: Photo) -> dict:
    """The predictor on the model-size copy, boxes mapped back to full-size pixels.

    {"boxes", "scores", "width", "height" (full size), "ms" (decode + model call), "timing"}.
    """
    pred = predictor.predict(photo.model_input)
    sx, sy = photo.width / photo.model_input.width, photo.height / photo.model_input.height
    boxes = [[round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)] for b in pred["boxes"]]
    timing = {"decode_ms": round(photo.decode_ms, 2), **pred.get("timing", {})}
    return {"boxes": boxes, "scores": pred["scores"], "width": photo.width, "height": photo.height,
            "ms": round(pred["ms"] + photo.decode_ms, 2), "timing": timing}


def display_jpeg(photo: Photo, pred: dict, threshold: float) -> bytes:
    """The display copy with the boxes >= threshold drawn, as JPEG (what a slider move redraws)."""
    from engine.predict import draw_boxes

    s = photo.display.width / photo.width
    boxes = [[v * s for v in b] for b in pred["boxes"]]
    annotated = draw_boxes(photo.display, boxes, pred["scores"], threshold)
    return jpeg_bytes(annotated, DISPLAY_QUALITY)


def full_size_jpeg(photo: Photo, pred: dict, threshold: float) -> bytes:
    """The original resolution with boxes drawn, for the download (built only when asked)."""
    from engine.predict import draw_boxes, load_image

    return jpeg_bytes(draw_boxes(load_image(photo.data, photo.name), pred["boxes"], pred["scores"], threshold),
                      DOWNLOAD_QUALITY)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def remember(cache: dict, key, value, limit: int = MAX_PHOTOS):
    """Insert into a small dict used as an LRU (oldest entries dropped)."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
    return value


def predict_via_service(url: str, token: Optional[str], photo: Photo) -> dict:
    """The same prediction dict as predict_photo, from a running `python -m engine serve`.

    The photo's original bytes are sent (the service decodes them itself, EXIF orientation applied)
    with the lowest threshold the page's slider offers, so a slider move re-filters locally.
    Failures raise dashboard.service_client.ServiceError with one line."""
    from dashboard import service_client
    from engine.predict import SCORE_FLOOR

    answer = service_client.predict(url, [(photo.name, photo.data)], token=token or None, score_threshold=SCORE_FLOOR)
    pred = service_client.as_prediction(answer["images"][0])
    if (pred["width"], pred["height"]) != (photo.width, photo.height):
        raise service_client.ServiceError(f"{url}: the service saw {photo.name} as {pred['width']}x{pred['height']}, "
                                          f"not {photo.width}x{photo.height}")
    return pred


def service_caption(info: dict) -> str:
    """One line on what a service has loaded (its GET /model answer)."""
    size = info.get("input_size")
    parts = [str(info.get("model") or "model ?"), f"{info.get('backend') or '?'} on {info.get('device') or '?'}"]
    if size:
        parts.append(f"{size} px")
    if info.get("source"):
        parts.append(f"from `{info['source']}`")
    return " · ".join(parts)

