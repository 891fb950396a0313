"""engine/runs.py: the status.json writers of launchers and refused starts; who may write status.json."""
import os
import re
import time
from pathlib import Path

import pytest

from engine import runs

ROOT = Path(__file__).resolve().parents[1]


def test_queued_then_pid_then_ended_keeps_what_the_status_held(tmp_path):
    runs.StatusWriter(tmp_path, run="r").update(state="stopped", epoch=3, started_at=100.0)
    runs.write_queued(tmp_path, "r", "resuming")
    status = runs.read_status(tmp_path)
    assert (status["state"], status["pid"], status["message"], status["epoch"]) == ("queued", None, "resuming", 3)
    assert status["started_at"] == 100.0 and status["host"] == runs.hostname() and status["ended_at"] is None
    assert runs.set_pid_if_queued(tmp_path, 4242) and runs.read_status(tmp_path)["pgid"] == 4242
    assert not runs.set_pid_if_queued(tmp_path, 99)  # the pid is set already: left alone
    before = time.time()
    runs.write_ended(tmp_path, "failed", "cannot start: no python", error="cannot start: no python")
    status = runs.read_status(tmp_path)
    assert (status["state"], status["error"], status["pid"]) == ("failed", "cannot start: no python", 4242)
    assert status["ended_at"] >= before and status["updated_at"] >= before
    with pytest.raises(ValueError, match="not an end state"):
        runs.write_ended(tmp_path, "running", "no")


def test_status_json_is_written_only_by_engine_runs():
    """Other modules may read status.json (runs.read_status) but write it only through engine/runs.py."""
    writes = re.compile(r"(atomic_write\w*|write_text|write_bytes|json\.dump|open)\(.*(STATUS_FILE|status\.json)")
    offenders = []
    for folder in ("engine", "dashboard", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "engine" / "runs.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if writes.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_read_jsonl_leaves_a_half_written_line_for_the_next_read(tmp_path):
    path = tmp_path / runs.METRICS_FILE
    runs.append_jsonl(path, {"type": "step", "step": 1})
    with open(path, "a") as fh:
        fh.write('not json\n{"type": "step", "st')
    records, offset = runs.read_jsonl(path)
    assert records == [{"type": "step", "step": 1}]
    with open(path, "a") as fh:
        fh.write('ep": 2}\n')
    more, _ = runs.read_jsonl(path, offset)
    assert more == [{"type": "step", "step": 2}]


def test_dedupe_keeps_the_newest_record_per_step_and_epoch():
    steps, epochs = runs.dedupe_records([{"type": "step", "step": 2, "loss": 1}, {"type": "step", "step": 1},
                                         {"type": "step", "step": 2, "loss": 3}, {"type": "epoch", "epoch": 1}])
    assert [(s["step"], s.get("loss")) for s in steps] == [(1, None), (2, 3)] and len(epochs) == 1


def test_effective_state_derives_crashed_and_stalled():
    now = time.time()
    live = {"state": "running", "host": runs.hostname(), "pid": os.getpid(), "updated_at": now}
    assert runs.effective_state(live, now) == "running"
    assert runs.effective_state({**live, "updated_at": now - runs.STALL_AFTER_S - 1}, now) == "stalled"
    assert runs.effective_state({**live, "pid": 2 ** 22 + 12345}, now) == "crashed"
    assert runs.effective_state({**live, "host": "elsewhere", "pid": 2 ** 22 + 12345}, now) == "running"
    assert runs.effective_state({"state": "completed"}, now) == "completed" and runs.effective_state(None) == "unknown"


def test_best_epoch_record_takes_the_earliest_of_equal_scores():
    epochs = [{"epoch": 1, "val_map50": 0.5}, {"epoch": 2, "val_map50": 0.7}, {"epoch": 3, "val_map50": 0.7},
              {"epoch": 4, "val_map50": None}]
    assert runs.best_epoch_record(epochs)["epoch"] == 2
    assert runs.best_epoch_record([{"epoch": 1, "val_map50": None}]) is None


def test_read_config_and_list_runs_tolerate_broken_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / runs.CONFIG_FILE).write_text("train: [unclosed\n")
    (tmp_path / "b").mkdir()
    runs.StatusWriter(tmp_path / "b", run="b").update(state="queued")
    (tmp_path / "not-a-run").mkdir()
    assert runs.read_config(tmp_path / "a") == {} and runs.read_config(tmp_path / "missing") == {}
    assert sorted(runs.list_run_names(tmp_path)) == ["a", "b"]


def test_status_writer_heartbeat_writes_at_most_every_n_seconds(tmp_path):
    writer = runs.StatusWriter(tmp_path, run="r")
    writer.update(state="running", step=1)
    writer.heartbeat(every=3600, step=2)
    assert runs.read_status(tmp_path)["step"] == 1 and writer.status["step"] == 2
    writer.heartbeat(every=0, step=3)
    assert runs.read_status(tmp_path)["step"] == 3

# ----------------------------------------------------------------------------- crash consistency
def _step(step, epoch):
    return {"type": "step", "step": step, "epoch": epoch, "loss": float(step)}


def test_a_start_record_supersedes_the_records_a_killed_process_wrote_past_its_checkpoint(tmp_path):
    """Killed between epoch 2's record and its last.pth (which still holds epoch 1, step 2): the
    resumed process writes `start` at step 2 / epoch 1, and readers drop the dead epoch 2 and its
    steps at once, before the resumed run writes them again (then the new ones win)."""
    path = tmp_path / runs.METRICS_FILE
    for rec in [{"type": "start", "step": 0, "epoch": 0}, _step(1, 1), _step(2, 1), {"type": "epoch", "epoch": 1, "step": 2},
                _step(3, 2), _step(4, 2), {"type": "epoch", "epoch": 2, "step": 4, "val_map50": 0.1},
                {"type": "start", "step": 2, "epoch": 1}, _step(3, 2)]:
        runs.append_jsonl(path, rec)
    steps, epochs = runs.read_metrics(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3] and [e["epoch"] for e in epochs] == [1]
    runs.append_jsonl(path, _step(4, 2))
    runs.append_jsonl(path, {"type": "epoch", "epoch": 2, "step": 4, "val_map50": 0.2})
    steps, epochs = runs.read_metrics(tmp_path)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and [(e["epoch"], e.get("val_map50")) for e in epochs] == \
        [(1, None), (2, 0.2)]
    # a run restarted from scratch (killed before its first checkpoint) drops everything before
    runs.append_jsonl(path, {"type": "start", "step": 0, "epoch": 0})
    assert runs.read_metrics(tmp_path) == ([], [])


def test_a_half_line_left_by_a_kill_does_not_swallow_the_next_record(tmp_path):
    from engine.tracking import JsonlWriter, MetricsRecorder

    path = tmp_path / runs.METRICS_FILE
    runs.append_jsonl(path, _step(1, 1))
    with open(path, "a") as fh:
        fh.write('{"type": "step", "step": 2, "ep')  # the kill
    MetricsRecorder([JsonlWriter(path)]).record_step(2, 1, loss=0.5)
    steps, _ = runs.read_metrics(tmp_path)
    assert [(s["step"], s["loss"]) for s in steps] == [(1, 1.0), (2, 0.5)]


def test_a_full_disk_is_one_line_naming_the_file_for_metrics_and_status(tmp_path, monkeypatch):
    with pytest.raises(runs.RunFolderWriteError, match=r"^/dev/full: cannot write a step record: No space left "
                                                       r"on device \[errno 28\]$"):
        runs.append_jsonl("/dev/full", _step(1, 1))
    writer = runs.StatusWriter(tmp_path, run="r")
    writer.update(state="running")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", full)  # the write hook: the temp file cannot be made durable
    with pytest.raises(runs.RunFolderWriteError, match=r"status.json: cannot write the run status: No space left"):
        writer.update(message="x")
    assert runs.read_status(tmp_path)["state"] == "running"  # the previous status stays readable
    assert [p.name for p in tmp_path.iterdir()] == [runs.STATUS_FILE]  # no temp file left


def test_temp_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "test").mkdir()
    left = [tmp_path / ".status.json.abc123.tmp", tmp_path / "test" / ".metrics.json.x.tmp"]
    for p in left:
        p.write_text("half")
    (tmp_path / "keep.tmp").write_text("not ours")
    assert sorted(runs.remove_temp_files(tmp_path, tmp_path / "missing")) == sorted(left)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.tmp"]
