"""Roboflow COCO-JSON export: loading, validation, summaries and the torch Dataset.

Layout: `<root>/{train,valid,test}/_annotations.coco.json` plus the images next to it.
Roboflow quirks handled here:
- an unused group category (id 0, "license-plates") whose name is another category's
  supercategory and which has no annotations: it is not a class;
- every annotation with a known category id is a plate (label 1, the single class);
- images without boxes are kept as negatives;
- boxes are xywh: converted to xyxy, clipped to the image, dropped (and counted) when their
  width or height is <= 1 px after clipping;
- `iscrowd` is ignored: such annotations are kept as ordinary plates and counted.
Every problem that would make training wrong (missing/malformed file, duplicate image id or
file name, unknown category, annotation for a missing image, every box of a split dropped,
missing, unreadable or truncated image) raises
DatasetError with one line naming the file and the id.
"""
from __future__ import annotations

import json
import math
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from engine.config import AugmentConfig
from engine.errors import EngineError
from engine.faults import fault_point

ANNOTATIONS_FILE = "_annotations.coco.json"
SPLITS = ("train", "valid", "test")
PLATE_LABEL = 1
MIN_BOX_SIDE = 1.0  # boxes with width or height <= this (after clipping) are dropped


class DatasetError(EngineError):
    """A dataset problem; the message is one line naming the file and the id.

    A DataLoader worker's error comes back to the main process as
    `DatasetError("Caught DatasetError in DataLoader worker process N.\nOriginal Traceback ...")`;
    such a message is cut back to the worker's own one-line message plus the worker's number.
    """

    def __init__(self, message: str = "", *args: Any):
        super().__init__(_worker_message(message) if isinstance(message, str) else message, *args)


_WORKER_HEADER = re.compile(r"^Caught \w+ in (DataLoader worker process \d+)\.")
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?DatasetError: (.+)$")


def _worker_message(message: str) -> str:
    """The original one-line message inside a DataLoader worker's wrapped traceback text."""
    header = _WORKER_HEADER.match(message)
    if not header:
        return message
    lines = [m.group(1) for m in map(_ERROR_LINE.match, message.splitlines()) if m]
    return f"{lines[-1]} ({header.group(1)})" if lines else message.splitlines()[0]


@dataclass
class ImageRecord:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (N, 4) xyxy float32


@dataclass
class CocoSplit:
    root: Path
    split: str
    images: list[ImageRecord]
    summary: dict
    category_name: str

    @property
    def annotation_file(self) -> Path:
        return self.root / self.split / ANNOTATIONS_FILE


# ----------------------------------------------------------------------------- parsing helpers
def _exc_line(exc: BaseException) -> str:
    """`Type: first line of the message` (Pillow's messages are short but may hold a path)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read annotation file ({exc.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: malformed JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: malformed COCO file: top level must be an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key in data and not isinstance(data[key], list):
            raise DatasetError(f"{path}: malformed COCO file: '{key}' must be a list, got {type(data[key]).__name__}")
    if "images" not in data:
        raise DatasetError(f"{path}: malformed COCO file: no 'images' list")
    return data


def _class_categories(path: Path, categories: list, annotated_ids: set) -> tuple[set, str]:
    """Known category ids and the plate class name (the Roboflow group category is not a class)."""
    ids: dict[int, dict] = {}
    for index, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DatasetError(f"{path}: category #{index}: needs an integer 'id'")
        ids[cat["id"]] = cat
    groups = {cid for cid, c in ids.items() if cid not in annotated_ids
              and any(o.get("supercategory") == c.get("name") for oid, o in ids.items() if oid != cid)}
    names = [str(c.get("name", cid)) for cid, c in ids.items() if cid not in groups]
    return set(ids), ", ".join(names) or "license_plate"


def _parse_images(path: Path, images: list) -> dict[int, dict]:
    by_id: dict[int, dict] = {}
    id_by_name: dict[str, int] = {}
    for index, img in enumerate(images):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DatasetError(f"{path}: image #{index}: needs an integer 'id'")
        image_id = img["id"]
        if image_id in by_id:
            raise DatasetError(f"{path}: duplicate image id {image_id} "
                               f"({by_id[image_id]['file_name']!r} and {img.get('file_name')!r})")
        name = img.get("file_name")
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise DatasetError(f"{path}: image id {image_id}: 'file_name' must be a relative file name, got {name!r}")
        key = Path(name).as_posix()  # "./a.jpg" and "a.jpg" are the same file
        if key in id_by_name:
            raise DatasetError(f"{path}: duplicate file_name {name!r} (image ids {id_by_name[key]} and {image_id})")
        id_by_name[key] = image_id
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise DatasetError(f"{path}: image id {image_id}: '{key}' must be a positive integer, got {img.get(key)!r}")
        by_id[image_id] = img
    return by_id


# Where a complete file ends: a cut file (headers intact, data missing) lacks its end marker.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
END_TAIL_BYTES = 4096  # end marker searched in the last bytes (some writers pad after it)


def _is_complete(image_path: Path, image_format: Optional[str]) -> bool:
    """False for a cut JPEG/PNG. Cheap: the end marker in the last bytes; only a file without it
    (e.g. a phone photo with a video appended after the JPEG) is decoded in full to decide."""
    marker = END_MARKERS.get(image_format or "")
    if marker is None:
        return True  # formats without a cheap end check are decoded only when used
    with open(image_path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - END_TAIL_BYTES))
        if marker in fh.read():
            return True
    try:
        with Image.open(image_path) as im:
            im.load()
    except OSError:  # "image file is truncated", "broken data stream"
        return False
    return True


def _check_image_file(image_path: Path, image: dict, ann_path: Path) -> None:
    """Existence, a header read and an end-marker check for JPEG/PNG (no full decode: cheap for
    thousands of images). Size must match the annotation file."""
    where = f"image id {image['id']} in {ann_path.name}"
    if not image_path.is_file():
        raise DatasetError(f"{image_path}: image file not found ({where})")
    try:
        with Image.open(image_path) as im:
            size, image_format = im.size, im.format
        complete = _is_complete(image_path, image_format)
    except Image.DecompressionBombError:
        raise DatasetError(f"{image_path}: image too large, refused as a decompression bomb ({where})") from None
    except Exception as exc:  # UnidentifiedImageError, OSError, truncated header...
        raise DatasetError(f"{image_path}: unreadable image ({where}): {_exc_line(exc)}") from None
    if not complete:
        raise DatasetError(f"{image_path}: truncated {image_format} file ({where})")
    if size != (image["width"], image["height"]):
        raise DatasetError(f"{image_path}: image is {size[0]}x{size[1]} but {ann_path.name} says "
                           f"{image['width']}x{image['height']} (image id {image['id']})")


def _box_xyxy(path: Path, ann: dict) -> np.ndarray:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DatasetError(f"{path}: annotation id {ann.get('id')}: 'bbox' must be 4 finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    return np.array([x, y, x + w, y + h], dtype=np.float64)


# ----------------------------------------------------------------------------- public loading API
def load_split(root: Union[str, Path], split: str) -> CocoSplit:
    """Parse and validate one split of a Roboflow COCO export. Raises DatasetError."""
    root = Path(root)
    split_dir = root / split
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split folder '{split}' not found")
    ann_path = split_dir / ANNOTATIONS_FILE
    if not ann_path.is_file():
        raise DatasetError(f"{ann_path}: annotation file not found")
    data = _read_json(ann_path)
    images = _parse_images(ann_path, data["images"])
    annotations = data.get("annotations", [])
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")) or not _is_int(ann.get("category_id")):
            aid = ann.get("id", f"#{index}") if isinstance(ann, dict) else f"#{index}"
            raise DatasetError(f"{ann_path}: annotation id {aid}: needs integer 'image_id' and 'category_id'")
    known_ids, category_name = _class_categories(
        ann_path, data.get("categories", []), {a["category_id"] for a in annotations})

    boxes: dict[int, list] = {image_id: [] for image_id in images}
    dropped = clipped = crowd = 0
    for ann in annotations:
        aid = ann.get("id")
        if ann["category_id"] not in known_ids:
            known = ", ".join(str(c) for c in sorted(known_ids)) or "none"
            raise DatasetError(f"{ann_path}: annotation id {aid}: unknown category id {ann['category_id']} (known: {known})")
        image = images.get(ann["image_id"])
        if image is None:
            raise DatasetError(f"{ann_path}: annotation id {aid}: image id {ann['image_id']} is not in 'images'")
        box = _box_xyxy(ann_path, ann)
        if ann.get("iscrowd"):
            crowd += 1  # the flag is ignored: the box is kept as a plate
        limits = np.array([image["width"], image["height"], image["width"], image["height"]], dtype=np.float64)
        inside = np.clip(box, 0.0, limits)
        if inside[2] - inside[0] <= MIN_BOX_SIDE or inside[3] - inside[1] <= MIN_BOX_SIDE:
            dropped += 1
            continue
        if not np.array_equal(inside, box):
            clipped += 1
        boxes[ann["image_id"]].append(inside)

    if annotations and dropped == len(annotations):
        raise DatasetError(f"{ann_path}: all {dropped} boxes are degenerate or outside their images (width or "
                           f"height <= {MIN_BOX_SIDE:g} px after clipping); COCO boxes are [x, y, width, height] in pixels")
    records: list[ImageRecord] = []
    for image_id, image in images.items():
        image_path = split_dir / image["file_name"]
        _check_image_file(image_path, image, ann_path)
        kept = np.array(boxes[image_id], dtype=np.float32).reshape(-1, 4)
        records.append(ImageRecord(image_id, image["file_name"], image_path, image["width"], image["height"], kept))

    summary = {
        "images": len(records),
        "boxes": int(sum(len(r.boxes) for r in records)),
        "empty_images": int(sum(1 for r in records if len(r.boxes) == 0)),
        "dropped_boxes": dropped,
        "clipped_boxes": clipped,
        "crowd_ignored": crowd,
    }
    return CocoSplit(root=root, split=split, images=records, summary=summary, category_name=category_name)


def summarize_dataset(root: Union[str, Path], splits: Iterable[str] = SPLITS) -> dict:
    """{split: summary} for every split; raises DatasetError on the first problem."""
    return {split: load_split(root, split).summary for split in splits}


def check_dataset_root(root: Union[str, Path]) -> dict:
    """Pre-launch check (dashboard): the three splits exist and parse. Returns {split: summary}."""
    root = Path(root)
    if not str(root).strip() or not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found")
    missing = [s for s in SPLITS if not (root / s / ANNOTATIONS_FILE).is_file()]
    if missing:
        raise DatasetError(f"{root}: missing split(s) {', '.join(missing)} "
                           f"(each needs <split>/{ANNOTATIONS_FILE})")
    return summarize_dataset(root)


# ----------------------------------------------------------------------------- torch dataset
def build_transforms(train: bool, augment: Optional[AugmentConfig]) -> v2.Compose:
    """PIL image + target -> float image in [0, 1]; flip/jitter only for training. Never resizes:
    the model's own transform resizes once."""
    steps: list = [v2.ToImage()]
    if train and augment is not None:
        if augment.hflip_p > 0:
            steps.append(v2.RandomHorizontalFlip(p=augment.hflip_p))
        if any((augment.brightness, augment.contrast, augment.saturation, augment.hue)):
            steps.append(v2.ColorJitter(brightness=augment.brightness, contrast=augment.contrast,
                                        saturation=augment.saturation, hue=augment.hue))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


def read_image(path: Union[str, Path]) -> Image.Image:
    """Decode as RGB. No EXIF transpose on purpose: Roboflow exports are already oriented and the
    boxes are in stored-pixel space, so rotating by an EXIF tag would misplace them."""
    with Image.open(path) as im:
        return im.convert("RGB")


class PlateDataset(torch.utils.data.Dataset):
    """Items: (float32 CHW image in [0, 1], {"boxes": BoundingBoxes XYXY, "labels": int64, "image_id": int})."""

    def __init__(self, split: CocoSplit, train: bool, augment: Optional[AugmentConfig] = None, limit: int = 0):
        self.split = split
        self.records = list(split.images[:limit] if limit and limit > 0 else split.images)
        self.train = train
        self.transform = build_transforms(train, augment)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        """Any failure (decode, transform, out of memory) is a DatasetError naming the image, so a
        DataLoader worker's error reaches the user as one line."""
        record = self.records[index]
        fault_point("train-image" if self.train else "eval-image")
        try:
            image = read_image(record.path)
        except Exception as exc:
            raise DatasetError(f"{record.path}: unreadable image (image id {record.id}): {_exc_line(exc)}") from None
        try:
            return self._item(record, image)
        except Exception as exc:
            raise DatasetError(f"{record.path}: cannot prepare the image (image id {record.id}): "
                               f"{_exc_line(exc)}") from None

    def _item(self, record: ImageRecord, image: Image.Image):
        boxes = tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes.copy()).reshape(-1, 4),
                                         format=tv_tensors.BoundingBoxFormat.XYXY,
                                         canvas_size=(image.height, image.width), dtype=torch.float32)
        target = {"boxes": boxes, "labels": torch.full((len(record.boxes),), PLATE_LABEL, dtype=torch.int64),
                  "image_id": record.id}
        return self.transform(image, target)


def collate_fn(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------- COCO ground truth
def to_coco_gt(split_or_records: Union[CocoSplit, Iterable[ImageRecord]]) -> dict:
    """A COCO ground-truth dict for pycocotools (annotation ids from 1: pycocotools treats 0 as unmatched)."""
    records = split_or_records.images if isinstance(split_or_records, CocoSplit) else list(split_or_records)
    images, annotations = [], []
    for record in records:
        images.append({"id": int(record.id), "file_name": record.file_name,
                       "width": int(record.width), "height": int(record.height)})
        for x1, y1, x2, y2 in np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4):
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": int(record.id), "category_id": PLATE_LABEL,
                                "bbox": [float(x1), float(y1), float(w), float(h)], "area": float(w * h),
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": PLATE_LABEL, "name": "license_plate"}]}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def start_loader_iterator(loader):
    """`iter(loader)` with SIGTERM / SIGINT blocked while its worker processes are forked.

    A worker ignores the stop signals only once its worker_init_fn (engine.build.seed_worker) runs;
    a process-group SIGTERM landing between the fork and that point killed the worker and failed
    the run instead of stopping it. Forked while blocked, a worker holds such a signal pending until
    seed_worker ignores it (which discards it); here it is delivered when the block is lifted."""
    if threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shut_down_loader_iterator(iterator) -> None:
    """End the worker processes of a DataLoader iterator now (a no-op without workers).

    Called in a `finally` by the loops: an iterator kept alive by an exception's traceback would
    otherwise keep its workers (which ignore SIGTERM) and their SIGCHLD watch until the process
    exits, where multiprocessing waits for them."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
