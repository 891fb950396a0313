"""Where the dashboard looks for things; every path can be moved with an environment variable.

PLATES_RUNS_DIR         run folders (default <project>/runs)
PLATES_CHECKPOINTS_DIR  checkpoints (default <project>/checkpoints)
PLATES_CONFIGS_DIR      training configs listed in the New run form (default <project>/configs)
PLATES_DEMO_DATA_DIR    the synthetic demo dataset generated on first start (default <project>/data/synthetic)
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "demo_cpu.yaml"
BASELINES_FILE = "baselines.yaml"


def _dir(env: str, default: str) -> Path:
    value = os.environ.get(env)
    if not value:
        return PROJECT_ROOT / default
    path = Path(value)
    return path if path.is_absolute() else PROJECT_ROOT / path


def runs_dir() -> Path:
    return _dir("PLATES_RUNS_DIR", "runs")


def checkpoints_dir() -> Path:
    return _dir("PLATES_CHECKPOINTS_DIR", "checkpoints")


def configs_dir() -> Path:
    return _dir("PLATES_CONFIGS_DIR", "configs")


def demo_data_dir() -> Path:
    return _dir("PLATES_DEMO_DATA_DIR", "data/synthetic")


def baselines_file() -> Path:
    """Baselines live with the project's configs, not with the (movable) training configs."""
    return PROJECT_ROOT / "configs" / BASELINES_FILE


def resolve_project_path(path: str | Path) -> Path:
    """A path from a config (relative to the project root, where the engine runs) made absolute."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path
