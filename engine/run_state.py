"""Run-state bookkeeping of one training process: status.json fields, heartbeat, ETA, stop flag.

The training loop reports what happens through a few named calls; this object turns them into
status.json updates (through engine.runs.StatusWriter, the only writer of that file in a
training process):

    state.started(resume)                     state running, message starting / resuming
    state.preparing("loading dataset")        a message while data and model are built
    state.training(...)                       sizes of the run, once built
    state.epoch_started(epoch, ...)           message "training epoch e/E"
    state.step_done(...)                      step-time and images/s averages, heartbeat
    state.validating(epoch) / state.beat()    message; heartbeat (per validation batch)
    state.epoch_done(...)                     epoch, best, ETA
    state.testing(split)                      message while best.pth is evaluated on the test split
    state.stopped(msg) | completed(msg) | failed(error) | interrupted()    end states

Stopping: SIGTERM / SIGINT (StopSignals) or `stop_at_step` make `check_stop()` raise
StopRequested; the loop catches it, saves last.pth and calls `stopped()`.
Heartbeat: while training or validating, status.json is rewritten at most every HEARTBEAT_S
seconds (readers call a run `stalled` after runs.STALL_AFTER_S without one).
"""
from __future__ import annotations

import os
import platform
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from engine import runs
from engine.faults import fault_point

HEARTBEAT_S = 5.0
EMA = 0.9  # weight of the previous value in the step-time and images/s averages


class StopRequested(Exception):
    """Raised inside the loop when a stop was asked for (signal or `stop_at_step`)."""


class StopSignals:
    """SIGTERM / SIGINT set `requested`; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self.name: Optional[str] = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # keep it tiny: no I/O in a signal handler
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class RunState:
    """The status of one training process; `main=False` (non-zero ranks) writes nothing."""

    def __init__(self, run_dir: Path, stop: StopSignals, *, stop_at_step: Optional[int] = None,
                 main: bool = True, rank_heartbeat=None, rank_table=None, **initial: Any):
        self.writer = runs.StatusWriter(run_dir, enabled=main, **initial)
        # several processes: this rank's heartbeat file (engine.distributed.RankHeartbeat), and on
        # rank 0 a function giving every rank's last heartbeat, copied into status.json as `ranks`
        self.rank_heartbeat, self.rank_table = rank_heartbeat, rank_table
        self.stop, self.stop_at_step = stop, stop_at_step
        self.main = main
        self.epochs = int(initial.get("epochs") or 0)
        self.total_steps = 0
        self.global_step = 0
        self.epoch = 0  # the epoch in progress (training or validating), 0 before the first
        self.step_time_ema: Optional[float] = None
        self.images_per_s: Optional[float] = None
        self.val_time_s: Optional[float] = None

    @property
    def status(self) -> dict:
        return self.writer.status

    # ------------------------------------------------------------------ lifecycle
    def started(self, resume: bool) -> None:
        now = time.time()
        if resume:
            self.status["resumed_at"] = now
        if not resume or not self.status.get("started_at"):
            self.status["started_at"] = now
        self.writer.update(state="running", message="resuming" if resume else "starting")
        fault_point("start")

    def preparing(self, message: str, **fields: Any) -> None:
        self.writer.update(message=message, **fields)

    def training(self, *, epochs_done: int, step: int, steps_per_epoch: int, global_step: int,
                 total_steps: int, best: dict) -> None:
        self.total_steps, self.global_step, self.epoch = total_steps, global_step, epochs_done + 1
        self.writer.update(state="running", message="training", epoch=epochs_done, epochs=self.epochs, step=step,
                           steps_per_epoch=steps_per_epoch, global_step=global_step, total_steps=total_steps,
                           best=dict(best), error=None, ended_at=None)

    def planned(self, epochs: int, total_steps: int) -> None:
        """A time limit changed the epochs planned (and so the steps in all and the ETA)."""
        self.epochs, self.total_steps = epochs, total_steps
        self.writer.update(epochs=epochs, total_steps=total_steps)

    def epoch_started(self, epoch: int, step: int, global_step: int) -> None:
        self.epoch, self.global_step = epoch, global_step
        self.writer.update(epoch=epoch, step=step, global_step=global_step,
                           message=f"training epoch {epoch}/{self.epochs}")

    def step_done(self, global_step: int, step: int, images: int, step_time: float) -> None:
        """One optimizer step finished: `step` batches of the epoch done, `images` in this batch."""
        self.global_step = global_step
        self.step_time_ema = step_time if self.step_time_ema is None else \
            EMA * self.step_time_ema + (1 - EMA) * step_time
        rate = images / max(step_time, 1e-9)
        self.images_per_s = rate if self.images_per_s is None else EMA * self.images_per_s + (1 - EMA) * rate
        self.beat(epoch=self.epoch, step=step)

    def validating(self, epoch: int) -> None:
        self.writer.update(message=f"validating epoch {epoch}/{self.epochs}")

    def epoch_done(self, epoch: int, steps_per_epoch: int, global_step: int, best: dict, map50: float,
                   val_time_s: float) -> None:
        self.epoch, self.global_step, self.val_time_s = epoch + 1, global_step, val_time_s
        if self.rank_heartbeat is not None:
            self.rank_heartbeat.beat(global_step, epoch, force=True)
        self.writer.update(epoch=epoch, step=steps_per_epoch, global_step=global_step, best=dict(best),
                           images_per_s=self.images_per_s, eta_s=self.eta(), **self._ranks(),
                           message=f"epoch {epoch}/{self.epochs} done, val mAP@0.5 {map50:.4f}")

    def testing(self, split: str) -> None:
        self.writer.update(message=f"evaluating best.pth on the {split} split")

    def stopped(self, message: str) -> None:
        self.writer.update(state="stopped", ended_at=time.time(), eta_s=None, message=message, **self._ranks())

    def completed(self, message: str, epoch: int, elapsed_s: float, end_reason: Optional[str] = None) -> None:
        """The run is done (`completed_at` stays when a launcher later marks the run queued);
        `end_reason` says why before train.epochs: early_stopping | time_limit."""
        now = time.time()
        self.writer.update(state="completed", ended_at=now, completed_at=now, eta_s=0, epoch=epoch,
                           elapsed_s=elapsed_s, end_reason=end_reason, message=message, **self._ranks())

    def failed(self, error: str) -> None:
        """Never raises: when status.json cannot be written (disk full) the line goes to stderr."""
        self.writer.update_or_report(state="failed", ended_at=time.time(), eta_s=None, error=error, message=error,
                                     **self._ranks())

    def interrupted(self) -> None:
        self.writer.update(state="stopped", ended_at=time.time(), eta_s=None,
                           message="interrupted (forced); resume continues from the last checkpoint")

    # ------------------------------------------------------------------ heartbeat, ETA, stop
    def beat(self, **fields: Any) -> None:
        """Rewrite status.json if HEARTBEAT_S passed since the last write; `fields` are kept either way."""
        if self.rank_heartbeat is not None:
            self.rank_heartbeat.beat(self.global_step, self.epoch)
        if self.rank_table is not None and time.time() - self.writer.last_write >= HEARTBEAT_S:
            fields["ranks"] = self.rank_table()
        self.writer.heartbeat(every=HEARTBEAT_S, global_step=self.global_step, images_per_s=self.images_per_s,
                              eta_s=self.eta(), **fields)

    def _ranks(self) -> dict:
        """{"ranks": every rank's last heartbeat} on rank 0 of a multi-process run, else {}."""
        return {"ranks": self.rank_table()} if self.rank_table is not None else {}

    def eta(self) -> Optional[float]:
        """Seconds left: remaining steps at the average step time + the validations still to run."""
        if self.step_time_ema is None:
            return None
        validations_left = max(0, self.epochs - self.epoch + 1)
        return (self.total_steps - self.global_step) * self.step_time_ema + validations_left * (self.val_time_s or 0.0)

    def stop_requested(self) -> bool:
        return self.stop.requested or (self.stop_at_step is not None and self.global_step >= self.stop_at_step)

    def check_stop(self) -> None:
        """Raise StopRequested after a signal or once `stop_at_step` steps are done."""
        if self.stop_requested():
            raise StopRequested()

    def check_signal(self) -> None:
        """Raise StopRequested after a signal (during validation and the test evaluation)."""
        if self.stop.requested:
            raise StopRequested()

    def stop_reason(self) -> str:
        if self.stop.requested:
            return f"stop requested ({self.stop.name})"
        if self.stop_at_step is not None:
            return f"stop_at_step={self.stop_at_step}"
        return "stop requested on another rank"


def environment() -> dict:
    """Versions and platform recorded in status.json (the results report's environment table)."""
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda if torch.cuda.is_available() else None,
            "python_version": platform.python_version(), "platform": platform.platform(terse=True)}


def initial_fields(run: str, checkpoint_dir: Path, epochs: int) -> dict:
    """The status fields a training process sets when it starts."""
    return {"run": run, "pid": os.getpid(), "pgid": os.getpgid(0), "host": runs.hostname(), "ended_at": None,
            "error": None, "checkpoint_dir": str(checkpoint_dir), "epochs": epochs, **environment()}
