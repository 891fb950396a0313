"""Checkpoint format and atomic writes (checkpoints and status.json)."""
import json
import os
import random

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt_mod
from engine import runs
from engine.checkpoint import (FORMAT, CheckpointError, load_checkpoint, restore_rng_state, rng_state,
                               save_checkpoint)


def _ckpt(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"format": FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": {"last_step": 7}, "scaler": {}, "epoch": 2, "global_step": 7,
            "best": {"epoch": 1, "map50": 0.5}, "early_stopping": {"best": 0.5, "bad_epochs": 1},
            "rng": rng_state(), "config": {"train": {"epochs": 3}}, "run": "r", "metrics": {"val_map50": 0.4},
            "completed": False, "epoch_progress": None}


def test_roundtrip_with_weights_only(tmp_path):
    path = save_checkpoint(tmp_path / "c" / "last.pth", _ckpt(0.25))
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["epoch"] == 2 and loaded["global_step"] == 7
    assert torch.all(loaded["model"]["weight"] != 0)
    assert set(loaded["rng"]) == {"torch", "cuda", "numpy", "python"}
    # the plain torch loader with weights_only=True reads it too (what evaluate/predict use)
    assert torch.load(path, weights_only=True)["run"] == "r"
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temp file left


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.random(), np.random.rand(), torch.rand(1)
    path = save_checkpoint(tmp_path / "rng.pth", {"model": {}, "rng": rng_state()})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(np.random.randn()))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), float(np.random.randn())) == expected


def test_crash_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, _ckpt(0.25))
    before = load_checkpoint(path)["model"]["weight"].clone()

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, _ckpt(9.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["weight"], before)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # the temp file was removed


def test_crash_mid_status_write_keeps_the_old_status(tmp_path, monkeypatch):
    writer = runs.StatusWriter(tmp_path, run="r")
    writer.update(state="running", epoch=1)
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        writer.update(state="completed", epoch=2)
    monkeypatch.undo()
    status = json.loads((tmp_path / runs.STATUS_FILE).read_text())
    assert status["state"] == "running" and status["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [runs.STATUS_FILE]


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="bad.pth: not a readable checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(other)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "obj": ckpt_mod.CheckpointError("x")}, evil)  # an arbitrary class: refused
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint(evil)
