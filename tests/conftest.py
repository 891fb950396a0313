"""Shared fixtures. Tests run on 2 CPU cores: keep models tiny and images small."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The real photos (Roboflow export of 378 car photos) are not in the repository: $PLATES_REAL when
# set, else the first of ../shared/data/plates-real next to the clone, /work/shared/data/plates-real.
# Without them the tests that need them skip with one reason; REQUIRE_PLATES_REAL=1 (set by .ci/run)
# makes that a failure, so CI never skips them silently.
def _is_export(path: Path) -> bool:
    return (path / "train" / "_annotations.coco.json").is_file()


def find_plates_real() -> Path:
    if os.environ.get("PLATES_REAL"):
        return Path(os.environ["PLATES_REAL"])
    candidates = [ROOT.parent / "shared" / "data" / "plates-real", Path("/work/shared/data/plates-real")]
    return next((c for c in candidates if _is_export(c)), candidates[0])


PLATES_REAL = find_plates_real()


def require_plates_real() -> Path:
    """PLATES_REAL, or skip the calling test (fail it under REQUIRE_PLATES_REAL=1) when it is missing."""
    if _is_export(PLATES_REAL):
        return PLATES_REAL
    reason = (f"needs the real photos: no Roboflow export at {PLATES_REAL} "
              "(set PLATES_REAL=/path/to/plates-real)")
    if os.environ.get("REQUIRE_PLATES_REAL") == "1":
        pytest.fail(f"{reason}; REQUIRE_PLATES_REAL=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def plates_real() -> Path:
    """The real Roboflow export (read-only). Copy it before modifying anything."""
    return require_plates_real()


def make_real_subset(plates_real: Path, out: Path, counts=(("train", 8), ("valid", 4), ("test", 4))) -> Path:
    """A small Roboflow export made of the first N real photos of each split (quirks kept)."""
    import json
    import shutil

    for split, n in counts:
        src = plates_real / split
        coco = json.loads((src / "_annotations.coco.json").read_text())
        images = coco["images"][:n]
        keep = {im["id"] for im in images}
        coco["images"] = images
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        (out / split).mkdir(parents=True, exist_ok=True)
        for im in images:
            shutil.copy2(src / im["file_name"], out / split / im["file_name"])
        (out / split / "_annotations.coco.json").write_text(json.dumps(coco))
    return out


def corrupt_png_same_size(src: Path, dest: Path) -> None:
    """`src` re-encoded as PNG with bytes flipped inside its pixel data: header, size and the IEND
    end marker are intact, so the dataset's load-time checks pass and only a full decode fails."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(src).convert("RGB").save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 2000
    for k in range(start, start + 200):
        data[k] ^= 0x5A
    dest.write_bytes(bytes(data))


TINY_RUN_SETTINGS = [
    "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none",
    "input.train_sizes=[160]", "input.test_size=160", "input.max_size=224",
    "train.epochs=2", "train.batch_size=4", "train.device=cpu", "train.amp=false",
    "data.num_workers=0", "schedule.warmup_epochs=1", "optim.lr=0.01", "eval.probe_images=2",
]


@pytest.fixture(scope="session")
def tiny_real_run(plates_real, tmp_path_factory):
    """A real 2-epoch run of the 320 model on 8/4/4 real photos, test split evaluated.

    Returns (runs_dir, checkpoints_dir, run_name). Shared by tests that read a finished run.
    """
    from engine.config import load_config
    from engine.train import train

    base = tmp_path_factory.mktemp("tiny-run")
    data = make_real_subset(plates_real, base / "data")
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", TINY_RUN_SETTINGS + [
        f"data.root={data}", f"run.runs_dir={base / 'runs'}", f"run.checkpoints_dir={base / 'checkpoints'}",
        "run.author=Test Author"])
    result = train(cfg, "tiny-real")
    assert result["state"] == "completed", result
    return base / "runs", base / "checkpoints", "tiny-real"
