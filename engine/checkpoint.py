"""Checkpoint files: atomic save, weights_only load, and RNG states in plain types.

Format "plate-detector/1" (a dict readable with torch.load(weights_only=True)):
    format, model, optimizer, scheduler, scaler, epoch (last completed, 1-based), global_step,
    best {epoch, map50}, early_stopping {best, bad_epochs}, rng {torch, cuda, numpy, python},
    config (cfg.to_dict()), run, metrics (last epoch record), completed (bool),
    epoch_progress (None, or the epoch interrupted by a stop request:
        {epoch, batches_done, start_step, loss_sum, loss_count, time_s}).
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from engine.errors import EngineError
from engine.runs import atomic_write_bytes

FORMAT = "plate-detector/1"


class CheckpointError(EngineError):
    """A checkpoint file is missing, unreadable or not ours."""


def save_checkpoint(path: Union[str, Path], obj: dict) -> Path:
    """Serialize to memory, then write atomically (tmp in the same folder, fsync, os.replace).

    A failed write (disk full, quota, read-only folder) removes the temp file, leaves the
    previous file at `path` untouched and raises CheckpointError naming the file and the cause."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    size_mb = buffer.getbuffer().nbytes / 2**20
    try:
        atomic_write_bytes(path, buffer.getvalue(), fault="checkpoint-write")
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
        kept = "the previous file is unchanged" if path.exists() else "no file was written"
        raise CheckpointError(f"{path}: cannot write the checkpoint ({size_mb:.1f} MB): {cause} "
                              f"[errno {exc.errno}]; {kept}") from None
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise CheckpointError(f"{path}: refused: it would load the Python object {unsafe.group(1)} (only "
                                  f"tensors and plain data are allowed; nothing in it was run)") from None
        raise CheckpointError(f"{path}: not a readable checkpoint, corrupt or truncated (UnpicklingError: "
                              f"{_unpickler_reason(exc)})") from None
    except Exception as exc:  # zip / storage errors come in many types
        raise CheckpointError(f"{path}: not a readable checkpoint, corrupt or truncated "
                              f"({type(exc).__name__}: {_first_sentence(exc)})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: not a plate-detector checkpoint (no 'model' entry)")
    return obj


def _unpickler_reason(exc: BaseException) -> str:
    """The reason torch gives after 'WeightsUnpickler error:' (its message runs to a paragraph)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return found.group(1).strip() if found else _first_sentence(exc)


def _first_sentence(exc: BaseException) -> str:
    """torch's load errors run to several sentences (and terminal colour codes): keep the first."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return re.split(r"(?<=[.!?])\s", text[0], maxsplit=1)[0] if text else ""


# ----------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """All RNG states as tensors / lists / tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": _to_lists(random.getstate()),
    }
    return state


def restore_rng_state(state: dict) -> None:
    if not state:
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if state.get("numpy"):
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("python"):
        random.setstate(_to_tuples(state["python"]))


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_to_lists(x) for x in obj]
    return obj


def _to_tuples(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuples(x) for x in obj)
    return obj


def fsync_dir(path: Union[str, Path]) -> None:
    """Best effort: make a rename in `path` durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
