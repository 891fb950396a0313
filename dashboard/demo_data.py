"""The synthetic demo dataset, generated once on the dashboard's first start when it is missing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

SPLITS = ("train", "valid", "test")


def dataset_present(root: Path) -> bool:
    return all((root / s / "_annotations.coco.json").is_file() for s in SPLITS)


def synth_settings(config_path: Optional[Path]) -> dict:
    """generate_dataset keyword arguments from the demo config's data.synth section (defaults if none)."""
    if config_path is None or not config_path.is_file():
        return {}
    try:
        from engine.config import load_config

        s = load_config(config_path).data.synth
    except Exception:
        return {}
    return {"train": s.train, "valid": s.valid, "test": s.test, "seed": s.seed, "width": s.width, "height": s.height}


def ensure_demo_dataset(root: Path, settings: Optional[dict] = None) -> bool:
    """Generate the synthetic dataset at `root` unless it is there; True when it was generated.

    Written to a temporary sibling folder and renamed into place, so an interrupted generation
    never leaves a half dataset that looks complete."""
    if dataset_present(root):
        return False
    from engine.synthetic import generate_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp, **(settings or {}))
    if dataset_present(root):  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    if root.exists():
        shutil.rmtree(root)  # an incomplete earlier attempt
    os.replace(tmp, root)
    return True
