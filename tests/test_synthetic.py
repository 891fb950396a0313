"""Synthetic plates: deterministic, Roboflow layout, negatives and multi-plate images."""
import json

import numpy as np
import pytest

from engine.data import ANNOTATIONS_FILE, PlateDataset, load_split
from engine.synthetic import generate_dataset


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "plates"
    info = generate_dataset(root, train=40, valid=6, test=4, seed=3, width=160, height=120)
    return root, info


def test_same_seed_gives_identical_files(synth_root, tmp_path):
    root, _ = synth_root
    again = tmp_path / "again"
    generate_dataset(again, train=40, valid=6, test=4, seed=3, width=160, height=120)
    for split in ("train", "valid", "test"):
        assert (again / split / ANNOTATIONS_FILE).read_bytes() == (root / split / ANNOTATIONS_FILE).read_bytes()
        names = sorted(p.name for p in (root / split).glob("*.jpg"))
        assert names == sorted(p.name for p in (again / split).glob("*.jpg"))
        for name in names:
            assert (again / split / name).read_bytes() == (root / split / name).read_bytes(), name
    other = tmp_path / "other"
    generate_dataset(other, train=2, valid=1, test=1, seed=4, width=160, height=120)
    assert (other / "train" / "synth_train_00000.jpg").read_bytes() != (root / "train" / "synth_train_00000.jpg").read_bytes()


def test_layout_has_roboflow_quirks_and_loads(synth_root):
    root, info = synth_root
    data = json.loads((root / "train" / ANNOTATIONS_FILE).read_text())
    assert data["categories"] == [
        {"id": 0, "name": "license-plates", "supercategory": "none"},
        {"id": 1, "name": "license_plate", "supercategory": "license-plates"}]
    assert [im["id"] for im in data["images"]] == list(range(40))
    assert {a["category_id"] for a in data["annotations"]} == {1}
    split = load_split(root, "train")
    assert split.category_name == "license_plate"
    assert split.summary["images"] == 40 and split.summary["dropped_boxes"] == 0
    assert split.summary["boxes"] == info["splits"]["train"]["boxes"]
    per_image = [len(r.boxes) for r in split.images]
    assert 0 in per_image, "expected negative images"
    assert max(per_image) >= 2, "expected images with several plates"
    assert split.summary["empty_images"] < 10
    boxes = np.concatenate([r.boxes for r in split.images])
    widths = boxes[:, 2] - boxes[:, 0]
    assert np.all(boxes >= 0) and np.all(boxes[:, 2] <= 160) and np.all(boxes[:, 3] <= 120)
    assert np.mean((widths >= 0.10 * 160) & (widths <= 0.5 * 160)) > 0.7  # plates mostly 12-40% wide
    image, target = PlateDataset(split, train=False)[0]
    assert image.shape == (3, 120, 160)
    for split_name in ("valid", "test"):
        assert load_split(root, split_name).summary["images"] == info["splits"][split_name]["images"]


def test_plate_pixels_lie_inside_their_box(tmp_path):
    """On a plain background, the plate's pixels differ from the background only inside the box."""
    from engine import synthetic

    rng = np.random.default_rng(11)
    quad = synthetic._plate_quad(rng, 80, 60, 60, 18, hard=False)
    canvas = synthetic.Image.new("RGBA", (160, 120), (0, 0, 0, 255))
    tile = synthetic.Image.new("RGBA", (200, 48), (255, 255, 255, 255))
    synthetic._warp_onto(canvas, tile, quad)
    ys, xs = np.nonzero(np.asarray(canvas)[..., 0] > 128)
    box = [quad[:, 0].min(), quad[:, 1].min(), quad[:, 0].max(), quad[:, 1].max()]
    assert xs.min() >= np.floor(box[0]) - 1 and xs.max() <= np.ceil(box[2]) + 1
    assert ys.min() >= np.floor(box[1]) - 1 and ys.max() <= np.ceil(box[3]) + 1
    assert xs.min() <= box[0] + 2 and xs.max() >= box[2] - 3  # tight, not loose
