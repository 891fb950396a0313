"""Prediction on single photos: safe image loading, the Predictor, drawing, and the CLI's predict_files.

The dashboard's upload box and `python -m engine predict` use the same Predictor: the model is
loaded once (checkpoint read with `torch.load(weights_only=True)`) and every call returns all boxes
above a low floor score, so a UI slider can re-filter without running the model again.
"""
from __future__ import annotations

import io
import struct
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from engine.errors import EngineError
from engine.samples import TP_COLOR, label_font, draw_labeled_box

MAX_IMAGE_BYTES = 25 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000
SCORE_FLOOR = 0.05
ImageSource = Union[bytes, bytearray, str, Path]


class ImageError(EngineError):
    """An input that is not a usable image; the message is one line naming the file."""


# ----------------------------------------------------------------------------- loading
def _read_source(source, name: Optional[str]) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "uploaded image"
    if hasattr(source, "read"):  # a file-like object, e.g. Streamlit's UploadedFile
        data = source.read(MAX_IMAGE_BYTES + 1)
        return data, name or getattr(source, "name", None) or "uploaded image"
    path = Path(source)
    name = name or str(path)
    if not path.is_file():
        raise ImageError(f"{name}: file not found")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: file too large ({size / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB)")
    try:
        return path.read_bytes(), name
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({exc.strerror or exc.__class__.__name__})") from None


def load_image(source: ImageSource, name: Optional[str] = None) -> Image.Image:
    """Decode an image (bytes, path or file-like) to RGB with its EXIF orientation applied.

    Raises ImageError for: an empty or too large file (> 25 MB), something that is not an image, a
    corrupt or truncated image, or a decompression bomb (more than 50 megapixels).
    """
    data, name = _read_source(source, name)
    if not data:
        raise ImageError(f"{name}: empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{name}: file too large (over {MAX_IMAGE_BYTES // 2**20} MB)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{name}: image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
                                 f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f}), refusing a possible decompression bomb")
            image.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image (unrecognised format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: decompression bomb (too many pixels), refusing to decode") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, MemoryError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ImageError(f"{name}: corrupt or truncated image ({detail})") from None
    try:
        image = ImageOps.exif_transpose(image) or image  # phone photos store their rotation in EXIF
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    return image.convert("RGB")


# ----------------------------------------------------------------------------- drawing
def draw_boxes(image: Image.Image, boxes, scores, threshold: float = 0.5, color=TP_COLOR) -> Image.Image:
    """A copy of `image` with the boxes scoring >= threshold drawn and labelled with their score."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 250))
    font = label_font(max(12, min(out.size) // 30))
    for box, score in zip(boxes, scores):
        if score >= threshold:
            draw_labeled_box(draw, box, color, f"plate {score:.2f}", line, font)
    return out


# ----------------------------------------------------------------------------- inference
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer(model: torch.nn.Module, image: torch.Tensor, device: torch.device, amp: bool = False,
          score_floor: float = SCORE_FLOOR) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Run the model on one CHW float image already on `device`.

    Returns (boxes (N,4) xyxy, scores (N,), model_ms, postprocess_ms); CUDA is synchronised
    around the model call so model_ms is the real compute time.
    """
    use_amp = amp and device.type == "cuda"
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        output = model([image])[0]
    _sync(device)
    mid = time.perf_counter()
    scores = output["scores"].float().cpu().numpy()
    boxes = output["boxes"].float().cpu().numpy().reshape(-1, 4)
    keep = scores >= score_floor
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="mergesort")
    end = time.perf_counter()
    return boxes[order], scores[order], (mid - start) * 1000, (end - mid) * 1000


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 CHW tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class Predictor:
    """A checkpoint loaded once; `.predict(image)` gives every box above the floor score."""

    def __init__(self, checkpoint_path: Union[str, Path], device: str = "cpu", score_floor: float = SCORE_FLOOR):
        from engine.model import load_model_from_checkpoint, resolve_device

        self.checkpoint_path = Path(checkpoint_path)
        self.device = resolve_device(device)
        self.model, self.config = load_model_from_checkpoint(self.checkpoint_path, device=self.device)
        self.model.eval()
        self.amp = bool(self.config.train.amp) and self.device.type == "cuda"
        self.score_floor = score_floor
        self.test_size = self.config.input.test_size

    def predict(self, image: Image.Image) -> dict:
        """{"boxes": [[x1,y1,x2,y2], ...], "scores": [...], "ms", "width", "height", "timing"}.

        Boxes are in the pixel space of `image`, sorted by score; `ms` is the whole call.
        """
        start = time.perf_counter()
        tensor = image_to_tensor(image).to(self.device)
        pre_ms = (time.perf_counter() - start) * 1000
        boxes, scores, model_ms, post_ms = infer(self.model, tensor, self.device, self.amp, self.score_floor)
        return prediction_dict(image, boxes, scores, start, pre_ms, model_ms, post_ms)


def prediction_dict(image: Image.Image, boxes, scores, start: float, pre_ms: float, model_ms: float,
                    post_ms: float) -> dict:
    """The answer of a predictor (PyTorch or ONNX Runtime) for one image: rounded boxes and scores, the
    image size, and the time since `start` (a perf_counter reading) split into its stages."""
    total = (time.perf_counter() - start) * 1000
    return {"boxes": [[round(float(v), 2) for v in b] for b in boxes],
            "scores": [round(float(s), 4) for s in scores],
            "ms": round(total, 2), "width": image.width, "height": image.height,
            "timing": {"preprocess_ms": round(pre_ms, 2), "model_ms": round(model_ms, 2),
                       "postprocess_ms": round(post_ms, 2)}}


def predict_files(checkpoint: Union[str, Path], paths: list, out: Optional[Union[str, Path]] = None,
                  score_threshold: float = 0.5, device: str = "auto") -> list[dict]:
    """Predict each image file; boxes with score >= score_threshold.

    Returns one dict per path: {"image", "width", "height", "ms", "boxes", "scores", "annotated"}; a file
    that is not a usable image gives {"image", "error"} instead and the others still run. With `out`,
    annotated copies are written as `<out>/<stem>_pred.jpg`.
    """
    predictor = Predictor(checkpoint, device=device)
    out_dir = Path(out) if out else None  # created on the first annotated image: a failure writes nothing
    results, used_names = [], set()
    for path in paths:
        try:
            image = load_image(path)
        except ImageError as exc:
            results.append({"image": str(path), "error": str(exc)})
            continue
        pred = predictor.predict(image)
        keep = [i for i, s in enumerate(pred["scores"]) if s >= score_threshold]
        record = {"image": str(path), "width": pred["width"], "height": pred["height"], "ms": pred["ms"],
                  "boxes": [pred["boxes"][i] for i in keep], "scores": [pred["scores"][i] for i in keep],
                  "annotated": None}
        if out_dir:
            stem, n = Path(path).stem, 1
            while f"{stem}_pred.jpg" in used_names:  # two inputs with the same name
                n += 1
                stem = f"{Path(path).stem}_{n}"
            used_names.add(f"{stem}_pred.jpg")
            target = out_dir / f"{stem}_pred.jpg"
            out_dir.mkdir(parents=True, exist_ok=True)
            draw_boxes(image, record["boxes"], record["scores"], score_threshold).save(target, quality=92)
            record["annotated"] = str(target)
        results.append(record)
    return results
