"""engine/run_state.py: the status.json a training process writes, heartbeat, ETA, stop requests."""
import os
import signal
import time

import pytest

from engine import run_state, runs
from engine.run_state import RunState, StopRequested, StopSignals, initial_fields


def _state(tmp_path, stop_at_step=None, main=True) -> RunState:
    return RunState(tmp_path, StopSignals(), stop_at_step=stop_at_step, main=main,
                    **initial_fields("r", tmp_path / "ck", epochs=2))


def test_lifecycle_writes_each_state_with_its_fields(tmp_path):
    state = _state(tmp_path)
    state.started(resume=False)
    first = runs.read_status(tmp_path)
    assert first["state"] == "running" and first["pid"] == os.getpid() and first["epochs"] == 2
    assert first["started_at"] and "resumed_at" not in first and first["torch_version"]
    state.training(epochs_done=0, step=0, steps_per_epoch=3, global_step=0, total_steps=6,
                   best={"epoch": None, "map50": None})
    state.epoch_started(1, 0, 0)
    assert runs.read_status(tmp_path)["message"] == "training epoch 1/2"
    state.validating(1)
    assert runs.read_status(tmp_path)["message"] == "validating epoch 1/2"
    state.epoch_done(1, 3, 3, {"epoch": 1, "map50": 0.25}, 0.25, val_time_s=2.0)
    status = runs.read_status(tmp_path)
    assert (status["epoch"], status["step"], status["global_step"], status["best"]) == (1, 3, 3, {"epoch": 1, "map50": 0.25})
    state.completed("completed 2 epochs", epoch=2, elapsed_s=9.0)
    status = runs.read_status(tmp_path)
    assert status["state"] == "completed" and status["completed_at"] == status["ended_at"] and status["eta_s"] == 0

    again = _state(tmp_path)  # a resumed process keeps started_at
    again.started(resume=True)
    status = runs.read_status(tmp_path)
    assert status["started_at"] == first["started_at"] and status["resumed_at"] >= first["started_at"]
    again.failed("boom")
    status = runs.read_status(tmp_path)
    assert (status["state"], status["error"], status["message"], status["eta_s"]) == ("failed", "boom", "boom", None)


def test_heartbeat_is_throttled_and_eta_counts_steps_and_validations(tmp_path, monkeypatch):
    state = _state(tmp_path)
    state.training(epochs_done=0, step=0, steps_per_epoch=10, global_step=0, total_steps=20,
                   best={"epoch": None, "map50": None})
    state.epoch_started(1, 0, 0)
    assert state.eta() is None
    written = runs.read_status(tmp_path)["updated_at"]
    state.step_done(global_step=1, step=1, images=4, step_time=2.0)  # right after a write: kept, not written
    assert runs.read_status(tmp_path)["updated_at"] == written and state.status["global_step"] == 1
    assert state.eta() == pytest.approx(19 * 2.0)
    state.epoch_done(1, 10, 10, {"epoch": 1, "map50": 0.1}, 0.1, val_time_s=5.0)
    assert state.eta() == pytest.approx(10 * 2.0 + 1 * 5.0)  # epoch 2 still has its validation to run
    monkeypatch.setattr(run_state, "HEARTBEAT_S", 0.0)
    state.beat(step=3)
    assert runs.read_status(tmp_path)["step"] == 3


def test_stop_requests_raise_where_they_apply(tmp_path):
    state = _state(tmp_path, stop_at_step=2)
    state.step_done(global_step=1, step=1, images=1, step_time=1.0)
    state.check_stop()
    state.step_done(global_step=2, step=2, images=1, step_time=1.0)
    with pytest.raises(StopRequested):
        state.check_stop()
    state.check_signal()  # stop_at_step is not a signal: validation and the test evaluation go on
    assert state.stop_reason() == "stop_at_step=2"

    stop = StopSignals()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.restore()
    state.stop = stop
    with pytest.raises(StopRequested):
        state.check_signal()
    assert state.stop_reason() == "stop requested (SIGTERM)"
    state.stopped("stopped at step 2 (epoch 1)")
    assert runs.read_status(tmp_path)["state"] == "stopped"


def test_non_main_ranks_write_nothing(tmp_path):
    state = _state(tmp_path, main=False)
    state.started(resume=False)
    state.completed("done", epoch=1, elapsed_s=1.0)
    assert state.status["state"] == "completed" and not (tmp_path / runs.STATUS_FILE).exists()
