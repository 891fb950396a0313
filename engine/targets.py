"""The results template's targets and the quoted baseline rows (configs/baselines.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

TARGETS = {"map50": 0.85, "precision": 0.90, "recall": 0.80}  # strict: a value must exceed its target
TARGET_LABELS = {"map50": "mAP@0.5", "precision": "precision", "recall": "recall"}
BASELINES_FILE = Path(__file__).resolve().parents[1] / "configs" / "baselines.yaml"


def met(value: Optional[float], target: float) -> Optional[bool]:
    """True when value > target, None when the value is unknown."""
    return None if value is None else value > target


def load_baselines(path: Optional[Path] = None) -> list[dict]:
    """Rows of configs/baselines.yaml (a mapping with a `baselines` list); [] if missing or unreadable."""
    try:
        data = yaml.safe_load(Path(path or BASELINES_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    rows = data.get("baselines") if isinstance(data, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
