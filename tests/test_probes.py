"""engine/probes.py: the validation images predicted after every epoch, on a tiny trained checkpoint."""
import json

import pytest
from PIL import Image

from engine.data import load_split
from engine.model import load_model_from_checkpoint
from engine.probes import select_probe_images, write_probes
from tests.test_evaluate import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(plates_real, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_probes")
    return tmp, make_tiny_checkpoint(plates_real, tmp)


def test_probes_written_per_epoch(tiny):
    tmp, ckpt = tiny
    model, cfg = load_model_from_checkpoint(ckpt)
    split = load_split(cfg.data.root, "valid")
    chosen = select_probe_images(split, 2, seed=3)
    assert chosen == select_probe_images(split, 2, seed=3)
    assert all(len(r.boxes) for r in chosen)  # images with plates first
    assert len(select_probe_images(split, 8, seed=3)) == 3  # all there is, the negative last
    run_dir = tmp / "runs" / "probe-run"
    model.train()
    write_probes(model, chosen, run_dir, 1, "cpu", test_size=96)
    assert model.training and model.transform.test_size == 128
    index = write_probes(model, chosen, run_dir, 2, "cpu", test_size=96)
    write_probes(model, chosen, run_dir, 2, "cpu", test_size=96)  # a resumed run repeats an epoch
    saved = json.loads((run_dir / "probes" / "index.json").read_text())
    assert saved == index and saved["epochs"] == [1, 2]
    assert [im["id"] for im in saved["images"]] == [r.id for r in chosen]
    for epoch in ("1", "2"):
        for r in chosen:
            entry = saved["detections"][epoch][str(r.id)]
            assert entry["file"] == f"epoch_{int(epoch):03d}/{r.id}.jpg"
            assert len(entry["boxes"]) == len(entry["scores"])
            with Image.open(run_dir / "probes" / entry["file"]) as im:
                assert max(im.size) == 160
