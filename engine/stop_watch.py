"""After a Stop, make sure every process of the run ends: SIGTERM first, SIGKILL for what outlives it.

A Stop (engine.launch.stop_run) sends SIGTERM; the trainer finishes its step, saves last.pth, writes
`stopped` and exits, and torchrun's agent exits after its workers. A process that does not exit (a
worker wedged in its teardown, an agent stuck in its own shutdown) would keep its memory, a GPU's
included, while the dashboard already says `stopped`. The watch takes the run's processes at the
moment of the stop (pid and start time, so that a pid the kernel hands to a new process is never
hit) and then:

- all of them have exited: done (one line in train.log says how long it took);
- the status is ended (stopped / failed / completed) and a process is still alive `kill_after_s`
  later, or `deadline_s` have passed since the stop whatever the status says: SIGKILL to it (to its
  process group when it leads one, so its DataLoader workers go with it), one line in train.log each.

The dashboard runs the watch as a detached `python -m engine stop RUN --watch TARGETS` beside the run;
`python -m engine stop RUN` in a terminal signals and watches in the foreground.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from engine import runs

KILL_AFTER_S = 30.0  # after the status says the run ended: time left to a process to exit by itself
DEADLINE_S = 300.0  # after the stop, whatever the status says (a run that never answers the SIGTERM)
POLL_S = 0.5

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Target:
    """One process of the run as it was when the stop was sent."""

    role: str  # "trainer", "torchrun agent", "rank 1"
    pid: int
    start: Optional[int] = None  # start time in clock ticks since boot (/proc/<pid>/stat); None: unknown


def process_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks since boot), None where /proc cannot tell."""
    fields = runs.proc_stat(pid)
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (the state)
    except (TypeError, IndexError, ValueError):
        return None


def alive(target: Target) -> bool:
    """The very process of `target` still runs (a reused pid with another start time does not count)."""
    if not runs.pid_alive(target.pid):
        return False
    return target.start is None or process_start(target.pid) in (None, target.start)


def targets_of(status: Optional[dict]) -> list[Target]:
    """The processes of the run on this host according to its status: the trainer, or torchrun's
    agent and every rank's worker. Only the ones alive now are returned."""
    if not status or status.get("host") != runs.hostname():
        return []
    found: list[tuple[str, int]] = []
    pid = status.get("pid")
    if pid:
        found.append(("torchrun agent" if status.get("launcher_pid") == pid else "trainer", int(pid)))
    for rank in status.get("ranks") or []:
        if rank.get("pid") and rank.get("host") in (None, runs.hostname()):
            found.append((f"rank {rank.get('rank')}", int(rank["pid"])))
    if status.get("worker_pid") and all(p != status["worker_pid"] for _, p in found):
        found.append(("rank 0", int(status["worker_pid"])))
    return [Target(role, p, process_start(p)) for role, p in found if runs.pid_alive(p)]


def encode(targets: list[Target], sent_at: float) -> str:
    """The processes and the time (epoch seconds) the SIGTERM was sent, for `python -m engine stop --watch`."""
    return json.dumps({"sent_at": sent_at, "targets": [asdict(t) for t in targets]})


def decode(text: str) -> tuple[list[Target], float]:
    """(targets, sent_at) from `encode`; a ValueError names what is wrong."""
    try:
        data = json.loads(text)
        targets = [Target(str(i["role"]), int(i["pid"]), None if i.get("start") is None else int(i["start"]))
                   for i in data["targets"]]
        return targets, float(data["sent_at"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"--watch: expected the JSON a stop sends, {{'sent_at': ..., 'targets': [...]}} ({exc})") from None


def kill(target: Target) -> None:
    """SIGKILL to the target, to its whole process group when it leads one."""
    try:
        if os.getpgid(target.pid) == target.pid:
            os.killpg(target.pid, signal.SIGKILL)
        else:
            os.kill(target.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO stop: {text}", flush=True)


def _mark_killed(run_dir: PathLike, deadline_s: float) -> None:
    """The run never wrote its end and its processes are killed now: say so in the status."""
    message = (f"killed: no answer to the stop within {deadline_s:.0f} s; last.pth is the last checkpoint "
               f"it saved")
    try:
        runs.write_ended(run_dir, "failed", message, error=message)
    except OSError:  # RunFolderWriteError included
        pass


def watch(run_dir: PathLike, targets: list[Target], kill_after_s: float = KILL_AFTER_S,
          deadline_s: float = DEADLINE_S, sent_at: Optional[float] = None, poll_s: float = POLL_S,
          clock: Callable[[], float] = time.time) -> list[Target]:
    """Wait for `targets` to exit, SIGKILL the ones that outlive the rules above; returns those killed.
    `sent_at`: when the SIGTERM went out (default: now), in the clock's seconds."""
    start = clock() if sent_at is None else sent_at
    ended_at: Optional[float] = None
    killed: list[Target] = []
    left = [t for t in targets if alive(t)]
    while left:
        now = clock()
        if ended_at is None and (runs.read_status(run_dir) or {}).get("state") in runs.END_STATES:
            ended_at = now
        overdue = now - start >= deadline_s or (ended_at is not None and now - ended_at >= kill_after_s)
        if overdue:
            why = (f"still alive {now - ended_at:.0f} s after the run ended" if ended_at is not None
                   else f"the run did not end within {deadline_s:.0f} s of the stop")
            for target in [t for t in left if alive(t)]:  # the start time checked again just before
                kill(target)
                killed.append(target)
                _say(f"SIGKILL to the {target.role} (pid {target.pid}): {why}")
            if ended_at is None:
                _mark_killed(run_dir, deadline_s)
            break
        time.sleep(poll_s)
        left = [t for t in left if alive(t)]
    if not killed and targets:
        _say(f"every process of the run exited ({len(targets)}), {clock() - start:.1f} s after the stop")
    return killed
