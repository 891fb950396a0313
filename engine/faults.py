"""Test-only fault injection: SIGKILL this process at a named point of the training loop.

    ENGINE_FAULT_POINT=checkpoint-write:2   kill -9 ourselves the 2nd time `checkpoint-write` is reached

The points (where `fault_point(name)` is called):
    start             status.json says `running` (nothing built yet)
    step              an optimizer step is done and recorded, before the status and the stop check
    validation        before a validation batch
    epoch-record      the epoch record is in metrics.jsonl, last.pth of that epoch not yet written
    checkpoint-write  a checkpoint's temp file is written, not yet renamed over last.pth / best.pth
    test-eval         before an image of the final test evaluation
    train-image       a training image is about to be loaded (in a DataLoader worker: kills the worker)
    eval-image        a validation / test image is about to be loaded (idem)

Without the variable `fault_point` is one dict lookup. The count is per process (a DataLoader worker counts
from what its parent had counted when it was forked): a resumed
process starts counting from 1 again (and a harness normally unsets the variable to resume).
"""
from __future__ import annotations

import os
import signal

ENV = "ENGINE_FAULT_POINT"
POINTS = ("start", "step", "validation", "epoch-record", "checkpoint-write", "test-eval", "train-image", "eval-image")

_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


def fault_point(name: str) -> None:
    """SIGKILL this process if ENGINE_FAULT_POINT names `name` and this is its N-th hit."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
