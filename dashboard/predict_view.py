"""The Predict page's logic: checkpoint choice, per-file caching keys, score filtering, downloads."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

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
