"""engine/runs.py: the status.json writers of launchers and refused starts; who may write status.json."""
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
