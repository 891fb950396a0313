"""Shared fixtures. Tests run on 2 CPU cores: keep models tiny and images small."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CANDIDATES = [os.environ.get("PLATES_REAL", ""), ROOT.parent / "shared" / "data" / "plates-real",
               "/work/shared/data/plates-real"]
PLATES_REAL = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "train").is_dir()), Path(_CANDIDATES[1]))


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def plates_real() -> Path:
    """The real Roboflow export (read-only). Copy it before modifying anything."""
    if not (PLATES_REAL / "train" / "_annotations.coco.json").exists():
        pytest.fail(f"real dataset not found at {PLATES_REAL} (set PLATES_REAL)")
    return PLATES_REAL
