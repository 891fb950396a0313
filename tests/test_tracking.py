"""engine/tracking.py: one recorder builds step/epoch records, each writer persists them."""
import logging

import torch

from engine import runs
from engine.tracking import EPOCH_KEYS, STEP_KEYS, JsonlWriter, MetricsRecorder, TensorBoardWriter, make_recorder


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    return events, [(e.step, round(e.value, 6)) for e in events]


def test_recorder_writes_jsonl_and_tensorboard_with_purge(tmp_path):
    rec = MetricsRecorder([JsonlWriter(tmp_path / runs.METRICS_FILE), TensorBoardWriter(tmp_path)])
    for step in (1, 2, 3):
        rec.record_step(step, 1, loss=1.0 / step, lr=0.1, grad_norm=float("nan"), images_per_s=torch.tensor(2.0),
                        loss_classifier=0.1, loss_box_reg=0.1, loss_objectness=0.1, loss_rpn_box_reg=0.1)
    rec.close()  # "crash" after step 3; the checkpoint was at step 2
    rec = MetricsRecorder([JsonlWriter(tmp_path / runs.METRICS_FILE), TensorBoardWriter(tmp_path, purge_step=3)])
    rec.record_step(3, 2, loss=0.25, lr=0.05)
    rec.record_epoch(2, 3, train_loss=0.5, val_map50=0.7, is_best=True)
    rec.close()

    steps, epochs = runs.read_metrics(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[2]["loss"] == 0.25  # newest record per step
    assert steps[0]["grad_norm"] is None and steps[0]["images_per_s"] == 2.0  # NaN -> null, tensors -> numbers
    assert epochs[0]["val_map50"] == 0.7 and epochs[0]["is_best"] is True and set(epochs[0]) == {"type", "epoch", "step", "time", *EPOCH_KEYS}
    _, loss = _scalars(tmp_path, "train/loss")
    assert loss == [(1, 1.0), (2, 0.5), (3, 0.25)]  # the orphaned step-3 event was purged


def test_step_records_hold_exactly_the_contract_keys(tmp_path):
    rec = MetricsRecorder([JsonlWriter(tmp_path / runs.METRICS_FILE)])
    record = rec.record_step(7, 2, loss=torch.tensor(0.5), not_a_key=1.0, lr=float("inf"))
    assert set(record) == {"type", "step", "epoch", "time", *STEP_KEYS}
    assert (record["loss"], record["lr"], record["grad_norm"]) == (0.5, None, None)
    steps, _ = runs.read_metrics(tmp_path)
    assert steps == [record]


def test_closing_a_broken_writer_is_logged_not_raised(tmp_path, caplog):
    class Broken:
        def write(self, record):
            pass

        def close(self):
            raise OSError("disk gone")

    with caplog.at_level(logging.WARNING, logger="engine.tracking"):
        MetricsRecorder([Broken()]).close()
    assert "closing Broken failed: disk gone" in caplog.text


def test_make_recorder_writes_jsonl_and_tensorboard_in_the_run_folder(tmp_path):
    rec = make_recorder(tmp_path)
    rec.record_epoch(1, 4, train_loss=1.0, val_map50=0.5)
    rec.close()
    assert runs.read_metrics(tmp_path)[1][0]["val_map50"] == 0.5
    assert _scalars(tmp_path, "val/mAP50")[1] == [(4, 0.5)]


def test_a_disabled_recorder_writes_nothing(tmp_path):
    rec = make_recorder(tmp_path, enabled=False)
    rec.record_step(1, 1, loss=1.0)
    rec.close()
    assert list(tmp_path.iterdir()) == []
