"""Checkpoint format and atomic writes (checkpoints and status.json)."""
import errno
import json
import os
import random
import subprocess

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
    with pytest.raises(CheckpointError, match="last.pth: cannot write the checkpoint.*previous file is unchanged"):
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
    with pytest.raises(CheckpointError, match="evil.pth: refused: it would load the Python object engine.checkpoint.CheckpointError"):
        load_checkpoint(evil)


def _weights(megabytes: float) -> dict:
    return {"format": FORMAT, "model": {"w": torch.full((int(megabytes * 2**20) // 4,), megabytes)}}


def _assert_failed_save_keeps_previous(path, old_mb: float, new_mb: float) -> str:
    """Saving a `new_mb` checkpoint over an `old_mb` one fails on a full disk: one clear line, the
    old file whole and loadable, no temp file left."""
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _weights(new_mb))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot write the checkpoint")
    assert "No space left on device [errno 28]" in message and "previous file is unchanged" in message
    assert float(load_checkpoint(path)["model"]["w"][0]) == pytest.approx(old_mb)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    return message


def test_disk_full_on_a_small_filesystem_keeps_the_previous_checkpoint(tmp_path):
    """A real 1 MiB tmpfs: the new checkpoint does not fit next to the old one (mounting needs root)."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the write-hook test covers ENOSPC")
    try:
        save_checkpoint(small / "last.pth", _weights(0.3))
        _assert_failed_save_keeps_previous(small / "last.pth", old_mb=0.3, new_mb=0.8)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_at_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC after the temp file was created and written (what delayed allocation reports at fsync)."""
    save_checkpoint(tmp_path / "last.pth", _weights(0.05))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    _assert_failed_save_keeps_previous(tmp_path / "last.pth", old_mb=0.05, new_mb=0.1)
