"""The training loop: one run of the plate detector, writing the run folder as it goes.

    train(cfg, run_name=None)              a new run: runs/<run>/ + checkpoints/<run>/
    train(cfg, run_name, resume=True)      continue from checkpoints/<run>/last.pth

`train` opens the run (folder, logging, signals, status) and turns any error into a `failed`
status; `fit` builds everything (engine.build), restores a checkpoint, and loops over epochs:
train_one_epoch and validate_one_epoch (engine.steps), then end_of_epoch (record, checkpoints,
probes). Status bookkeeping goes through one RunState (engine.run_state).

Lifecycle (status.json `state`): running -> completed | stopped | failed.
- SIGTERM / SIGINT set a flag; the loop finishes the current optimizer step, saves last.pth and
  writes `stopped` (a second Ctrl-C aborts at once). A stop during the final test evaluation
  ends the run `stopped` too; resuming it evaluates the test split again and completes.
- A non-finite loss stops the run as `failed`, naming the step; any other exception too.

Stop and resume (the choice): a stop mid-epoch saves last.pth *with the epoch in progress*
(`epoch_progress`: batches done, partial loss sums, time). The training order of every epoch is
a fixed permutation of (seed, epoch), so a resumed run skips the batches already done and goes
on with the next one: the global step, hence the LR curve, continues with no gap and no repeat,
step records are not duplicated, and the epoch record of the interrupted epoch averages its
loss over all its batches. With num_workers 0 and the RNG states restored, interrupted + resumed
gives the same numbers as an uninterrupted run (with workers, augmentation draws may differ).
After a hard crash, resume restarts from the last epoch boundary saved in last.pth; the few
step records written after it are rewritten and readers keep the newest per step, and
TensorBoard drops the orphaned events (SummaryWriter purge_step).
last.pth of the final epoch has `completed: true` (no epochs left); the run is complete once
status.json says `completed` (it then also carries `completed_at`).

Several processes (torchrun; engine/distributed.py, docs/distributed.md): every rank runs train();
rank 0 claims the folder and owns every file, the model is wrapped in DDP after the restore, the
stop and NaN decisions are collective, validation is shared, and an elastic restart resumes from
last.pth. World size 1 creates no process group and runs the loop above unchanged.
"""
from __future__ import annotations

import copy
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from engine import build, evaluate, runs
from engine import distributed as D
from engine.checkpoint import FORMAT, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from engine.config import Config, default_run_name, load_config, resolve_paths, save_config, validate_run_name
from engine.errors import EngineError, RunError
from engine.faults import fault_point
from engine.run_state import RunState, StopRequested, StopSignals, initial_fields
from engine.schedule import EarlyStopping, epochs_within
from engine.steps import EpochProgress, check_stop, tqdm_kwargs, train_one_epoch, validate_one_epoch
from engine.tracking import make_recorder

log = logging.getLogger("engine.train")

RULE = "=" * 60


class AlreadyCompletedError(RunError):
    """--resume of a run that has finished."""


# ----------------------------------------------------------------------------- run names and folders
def _claim_new_run(run_dir: Path, ckpt_dir: Path, elastic_run_id: Optional[str] = None) -> None:
    """Refuse a folder that already holds a run. A folder with only a `queued` status and a
    train.log is fine: that is the dashboard launching this very run; so is a folder started by
    an earlier attempt of this very torchrun job (`elastic_run_id`, a restart before any last.pth)."""
    if elastic_run_id and (runs.read_status(run_dir) or {}).get("elastic_run_id") == elastic_run_id:
        return
    if (run_dir / runs.CONFIG_FILE).exists() or (run_dir / runs.METRICS_FILE).exists():
        raise RunError(f"run {run_dir.name!r} already exists in {run_dir.parent} "
                       f"(pick another name, or resume it with --resume {run_dir.name})")
    status = runs.read_status(run_dir)
    if status and status.get("state") not in (None, "queued"):
        raise RunError(f"run {run_dir.name!r} already exists in {run_dir.parent} (state {status.get('state')})")
    for name in (runs.LAST_CKPT, runs.BEST_CKPT):
        if (ckpt_dir / name).exists():
            raise RunError(f"{ckpt_dir / name}: checkpoints of another run with this name exist; pick another name")


def load_run_config(run: str, runs_dir: str = "runs", overrides: Optional[list[str]] = None) -> Config:
    """The resolved config.yaml of an existing run (for --resume)."""
    validate_run_name(run)
    path = Path(runs_dir) / run / runs.CONFIG_FILE
    if not path.parent.is_dir():
        raise RunError(f"run {run!r} not found in {runs_dir}")
    if not path.is_file():
        raise RunError(f"{path}: missing; run {run!r} cannot be resumed")
    cfg = load_config(path, overrides)
    cfg.run.runs_dir = str(runs_dir)
    cfg.run.name = run
    return resolve_paths(cfg, also_under=Path(runs_dir).resolve().parent)


def _resume_checkpoint(run: str, run_dir: Path, ckpt_dir: Path, ctx: D.DistContext) -> Optional[Path]:
    """last.pth of a run that may be resumed; None when it has none yet (the run starts over from
    step 0 with its config.yaml). A checkpoint with `completed` (no epochs left) of a run whose
    status has no `completed_at` resumes into the final test evaluation."""
    if not run_dir.is_dir():
        raise RunError(f"run {run!r} not found in {run_dir.parent}")
    status = runs.read_status(run_dir) or {}
    if status.get("state") == "completed":
        raise AlreadyCompletedError(f"run {run!r} already completed ({status.get('message') or 'nothing to resume'}); "
                                    f"start a new run, e.g. with --set model.weights={ckpt_dir / runs.BEST_CKPT}")
    if status.get("completed_at"):  # completed, then marked queued again by a launcher
        raise AlreadyCompletedError(f"run {run!r} already completed (epoch {status.get('epoch')}); nothing to resume")
    if (status.get("state") in runs.LIVE_STATES and status.get("pid") not in (None, os.getpid(), ctx.launcher_pid)
            and status.get("host") == runs.hostname() and runs.pid_alive(status.get("pid"))):
        raise RunError(f"run {run!r} is still running (pid {status.get('pid')})")
    path = ckpt_dir / runs.LAST_CKPT
    if not path.is_file():  # killed before its first checkpoint: start over with the run's config
        return None
    return path


def _settle_queued_status(run_dir: Path, exc: RunError, ctx: D.DistContext) -> None:
    """A launcher marked the run `queued` before starting us; a refused resume must not leave it so."""
    status = runs.read_status(run_dir)
    if not status or status.get("state") != "queued" or status.get("pid") not in (None, os.getpid(), ctx.launcher_pid):
        return
    if isinstance(exc, AlreadyCompletedError):
        runs.write_ended(run_dir, "completed", str(exc), pid=os.getpid())
    else:
        runs.write_ended(run_dir, "failed", str(exc), error=str(exc), pid=os.getpid())


# ----------------------------------------------------------------------------- logging
def _same_file(stream, path: Path) -> bool:
    """True when `stream` (e.g. sys.stdout) writes to `path` (compared by inode)."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _setup_logging(run_dir: Path, ctx: D.DistContext) -> list:
    """Log to stdout; rank 0 also to runs/<run>/train.log unless stdout already is that file.
    Other ranks log warnings and errors only, to stdout, marked with their rank."""
    logger = logging.getLogger("engine")
    logger.setLevel(logging.INFO)
    where = "" if ctx.is_main else f"[rank {ctx.rank}] "
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {where}%(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list = [logging.StreamHandler(sys.stdout)]
    if not ctx.is_main:
        handlers[0].setLevel(logging.WARNING)
    log_path = run_dir / runs.LOG_FILE
    if ctx.is_main and not _same_file(sys.stdout, log_path):
        handlers.append(logging.FileHandler(log_path, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return handlers


def _teardown_logging(handlers: list) -> None:
    logger = logging.getLogger("engine")
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


# ----------------------------------------------------------------------------- what the loop works on
@dataclass
class Training:
    """The built parts of a run (engine.build), as torchvision's train.py holds them in main()."""
    cfg: Config
    run_dir: Path
    ckpt_dir: Path
    device: torch.device
    device_name: str
    amp: build.Amp
    data: build.TrainingData
    valid_loader: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    num_params: int
    ctx: D.DistContext = field(default_factory=D.DistContext)
    plain: Optional[torch.nn.Module] = None  # the model itself (`model` may be its DDP wrapper)
    epochs: int = 0  # the epochs planned: train.epochs, or fewer under train.time_limit_min

    def __post_init__(self) -> None:
        self.plain = self.plain if self.plain is not None else self.model
        self.epochs = self.epochs or self.cfg.train.epochs

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass
class LoopState:
    """What the loop has done so far; all of it goes into last.pth."""
    early: EarlyStopping
    next_epoch: int = 1  # the first epoch not finished yet
    global_step: int = 0  # optimizer steps done before `progress`
    best: dict = field(default_factory=lambda: {"epoch": None, "map50": None})
    progress: Optional[EpochProgress] = None  # the epoch in progress
    training_done: bool = False  # no epochs left (the final test evaluation may still be due)
    end_reason: Optional[str] = None  # why training ended before train.epochs: early_stopping | time_limit
    last_record: Optional[dict] = None  # the last epoch record
    elapsed_before: float = 0.0  # training time of earlier processes of this run
    t_start: float = field(default_factory=time.time)

    @property
    def current_step(self) -> int:
        return self.progress.global_step if self.progress else self.global_step

    def epochs_left(self, epochs: int) -> range:
        return range(self.next_epoch, self.next_epoch if self.training_done else epochs + 1)

    def progress_for(self, epoch: int) -> EpochProgress:
        """The progress of `epoch`: the interrupted one a resumed run restored, else a fresh one."""
        if self.progress is None or self.progress.epoch != epoch:
            self.progress = EpochProgress(epoch, start_step=self.global_step)
        return self.progress

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start


def build_training(cfg: Config, run_dir: Path, ckpt_dir: Path, state: RunState,
                   ctx: Optional[D.DistContext] = None) -> Training:
    """Device, seeds, data, model, optimizer, schedule, scaler, in this order (the RNG streams depend on it).

    With several processes (`ctx`) each rank seeds its own random draws (rank 0 as one process
    does) and trains on its device; the model is not wrapped in DDP yet (see fit)."""
    from engine.model import build_model, count_parameters, resolve_device

    ctx = ctx or D.DistContext()
    device = ctx.device if ctx.distributed else resolve_device(cfg.train.device)
    amp = build.amp_settings(cfg.train, device)
    build.seed_everything(D.augmentation_seed(cfg.run.seed, ctx.rank), cfg.train.deterministic)
    device_name = build.device_name(device)
    state.preparing("loading dataset", device=str(device), device_name=device_name)
    data = build.build_data(cfg)
    if state.main:
        runs.atomic_write_json(run_dir / runs.DATASET_FILE, data.summary)
    for split, s in data.summary.items():
        log.info("Dataset %-5s: %d images, %d boxes, %d empty images, %d dropped boxes, %d clipped",
                 split, s["images"], s["boxes"], s["empty_images"], s["dropped_boxes"], s.get("clipped_boxes", 0))
    steps_per_epoch = build.steps_per_epoch(cfg, data.train_ds, ctx.world_size)
    valid_loader = build.valid_loader(cfg, data.valid_ds, device)
    state.preparing("building model")
    model = build_model(cfg).to(device)
    optimizer = build.build_optimizer(cfg, model)
    scheduler = build.build_scheduler(cfg, optimizer, steps_per_epoch)
    return Training(cfg, run_dir, ckpt_dir, device, device_name, amp, data, valid_loader, model, optimizer,
                    scheduler, build.build_scaler(amp, device), steps_per_epoch, count_parameters(model), ctx)


def restore_training(ckpt: dict, t: Training) -> LoopState:
    """Load last.pth's weights and optimizer, schedule, scaler states into `t`; return its LoopState.

    A run saved by another number of processes resumes from the epoch boundary (the interrupted
    epoch is trained again from its first batch), with a warning."""
    where = t.ckpt_dir / runs.LAST_CKPT
    sched = dict(ckpt.get("scheduler") or {})
    global_step = int(ckpt["global_step"])
    progress, warning = D.resume_progress(ckpt.get("world_size"), t.ctx.world_size, ckpt.get("epoch_progress"))
    if warning:
        log.warning("%s", warning)
        if ckpt.get("epoch_progress"):
            global_step = sched["last_step"] = int(ckpt["epoch_progress"]["start_step"])
    if t.cfg.train.time_limit_min > 0:
        t.epochs = _planned_epochs(sched, t) or t.epochs
    if int(sched.get("total_steps", t.total_steps)) != t.total_steps:
        raise RunError(f"{where}: the run had {sched.get('total_steps')} steps in all, the data and config now give "
                       f"{t.total_steps} ({t.steps_per_epoch}/epoch); the dataset or batch size changed, "
                       f"start a new run instead")
    t.plain.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(sched)
    if t.scaler.is_enabled() and ckpt.get("scaler"):
        t.scaler.load_state_dict(ckpt["scaler"])
    loop = LoopState(EarlyStopping(t.cfg.train.early_stopping_patience), next_epoch=int(ckpt["epoch"]) + 1,
                     global_step=global_step, training_done=bool(ckpt.get("completed")),
                     last_record=ckpt.get("metrics"), elapsed_before=float(ckpt.get("elapsed_s") or 0.0),
                     end_reason=ckpt.get("end_reason"))
    loop.best = dict(ckpt.get("best") or loop.best)
    loop.early.load_state_dict(ckpt.get("early_stopping") or {})
    if progress and int(progress["epoch"]) == loop.next_epoch:
        loop.progress = EpochProgress.from_dict(progress)
        if loop.progress.global_step != loop.global_step:
            raise RunError(f"{where}: inconsistent epoch progress; cannot resume")
    if t.scheduler.last_step != loop.global_step:
        raise RunError(f"{where}: scheduler step {t.scheduler.last_step} != global step {loop.global_step}; "
                       f"cannot resume")
    return loop


def _planned_epochs(sched: dict, t: Training) -> Optional[int]:
    """The epochs a time-limited run had planned when saved (its schedule's length), if they fit this config."""
    total = int(sched.get("total_steps") or 0)
    epochs, rest = divmod(total, t.steps_per_epoch)
    return epochs if total and not rest and 1 <= epochs <= t.cfg.train.epochs else None


def make_checkpoint(t: Training, loop: LoopState, epochs_done: int) -> dict:
    """The checkpoint dict (engine.checkpoint's format) of the loop's current state.

    With several processes every rank must call it at the same point (it gathers every rank's RNG
    state: `rng` is rank 0's, `rng_ranks` all of them); only rank 0 saves it."""
    extra = {}
    if t.ctx.distributed:
        states = D.gather_rng_states(t.ctx, rng_state())
        extra = {"world_size": t.ctx.world_size, "rng_ranks": states}
    return {
        "format": FORMAT,
        "model": t.plain.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else {},
        "epoch": int(epochs_done),
        "global_step": int(loop.current_step),
        "best": dict(loop.best),
        "early_stopping": loop.early.state_dict(),
        "rng": extra["rng_ranks"][0] if extra else rng_state(),
        "config": t.cfg.to_dict(),
        "run": t.cfg.run.name,
        "metrics": dict(loop.last_record) if loop.last_record else {},
        "completed": loop.training_done,
        "end_reason": loop.end_reason,
        "epoch_progress": loop.progress.to_dict() if loop.progress and loop.progress.batches_done else None,
        "elapsed_s": float(loop.elapsed()),
        **extra,
    }


def _save(t: Training, which: str, ckpt: dict, main: bool) -> Path:
    path = t.ckpt_dir / which
    if main:
        save_checkpoint(path, ckpt)
    return path


# ----------------------------------------------------------------------------- the loop
def fit(cfg: Config, run_dir: Path, ckpt_dir: Path, state: RunState, resume_from: Optional[Path] = None,
        ctx: Optional[D.DistContext] = None) -> dict:
    """Build, restore `resume_from` (last.pth) if given, train the epochs left, evaluate the test split.

    With several processes (`ctx`) every rank runs this; the model is wrapped in DDP after the
    restore, and rank 0 alone records, saves and evaluates the test split."""
    ctx = ctx or D.DistContext()
    checkpoint = load_checkpoint(resume_from, map_location="cpu") if resume_from else None
    t = build_training(cfg, run_dir, ckpt_dir, state, ctx)
    loop = restore_training(checkpoint, t) if checkpoint else LoopState(EarlyStopping(cfg.train.early_stopping_patience))
    if ctx.distributed:
        t.model = D.inject_faults(D.wrap_model(t.plain, ctx, cfg.dist.find_unused_parameters), ctx, loop.global_step)
    recorder = make_recorder(run_dir, purge_step=loop.global_step + 1)
    recorder.record_start(loop.global_step, loop.next_epoch - 1, resumed=checkpoint is not None)
    probes = build.select_probes(cfg, t.data.valid_split, state.main)
    if checkpoint:  # last, so nothing above shifts the restored RNG streams
        _restore_rng(checkpoint, ctx)
        checkpoint = None  # free the memory
    state.planned(t.epochs, t.total_steps)
    state.training(epochs_done=loop.next_epoch - 1, step=loop.progress.batches_done if loop.progress else 0,
                   steps_per_epoch=t.steps_per_epoch, global_step=loop.global_step, total_steps=t.total_steps,
                   best=loop.best)
    _log_banner(t, loop)
    epochs_bar = tqdm(total=t.epochs, initial=loop.next_epoch - 1, desc="epochs", unit="epoch",
                      file=sys.stderr, disable=not state.main, **tqdm_kwargs())
    try:
        for epoch in loop.epochs_left(cfg.train.epochs):
            check_stop(state, ctx)
            progress = loop.progress_for(epoch)
            loader = build.train_loader(cfg, t.data.train_ds, epoch, progress.batches_done, t.device, ctx)
            train_one_epoch(t.model, t.optimizer, t.scheduler, t.scaler, loader, t.device, progress, amp=t.amp,
                            grad_clip=cfg.train.grad_clip, log_every=cfg.train.log_every, recorder=recorder,
                            state=state, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch, ctx=ctx)
            t0 = time.time()
            metrics = validate_one_epoch(t.plain, t.valid_loader, t.device, cfg.eval, t.amp, state, epoch, ctx)
            end_of_epoch(t, loop, epoch, metrics, time.time() - t0, recorder, probes, state)
            epochs_bar.total = t.epochs
            epochs_bar.update(1)
            if loop.training_done:
                break
        elapsed = loop.elapsed()
        _check_replicas(t, loop)
        D.barrier(ctx)  # last.pth is saved; the other ranks may leave (the test split is rank 0's)
        _log_summary(elapsed, loop)
        evaluate_test_split(t, state)
    except StopRequested:
        return _stopped(t, loop, state)
    finally:
        epochs_bar.close()
        recorder.close()
    return _completed(t, loop, state, elapsed)


def _restore_rng(checkpoint: dict, ctx: D.DistContext) -> None:
    """This rank's saved RNG state; after a change of process count, only rank 0's (others keep their seeds)."""
    per_rank = checkpoint.get("rng_ranks")
    if per_rank and len(per_rank) == ctx.world_size:
        restore_rng_state(per_rank[ctx.rank] or {})
    elif ctx.is_main:
        restore_rng_state(checkpoint.get("rng") or {})


def _check_replicas(t: Training, loop: LoopState) -> None:
    """With several processes: every rank's weights must be bit-identical (a gathered checksum)."""
    if not t.ctx.distributed:
        return
    sums = D.gather_checksums(t.plain, t.ctx)
    if len(set(sums)) != 1:
        raise D.DistributedError(f"replicas differ after {loop.current_step} steps: " +
                                 ", ".join(f"rank {r} {s[:12]}" for r, s in enumerate(sums)))
    log.info("Replicas identical after %d steps on %d processes (weights sha256 %s)", loop.current_step,
             t.ctx.world_size, sums[0][:16])


def end_of_epoch(t: Training, loop: LoopState, epoch: int, metrics: dict, val_time_s: float, recorder,
                 probes: list, state: RunState) -> None:
    """Record the epoch, save best.pth (if better) and last.pth, write the probe images."""
    cfg, progress = t.cfg, loop.progress
    map50 = float(metrics.get("map50") or 0.0)
    improved = loop.early.update(map50 if math.isfinite(map50) else 0.0)
    if improved:
        loop.best = {"epoch": epoch, "map50": map50}
    loop.global_step, loop.progress, loop.next_epoch = progress.global_step, None, epoch + 1
    epoch_time = progress.time_s + val_time_s
    loop.last_record = recorder.record_epoch(
        epoch, loop.global_step, train_loss=progress.mean_loss, val_map50=map50,
        val_map50_95=metrics.get("map50_95"), val_precision=metrics.get("precision"),
        val_recall=metrics.get("recall"), val_f1=metrics.get("f1"),
        lr=t.scheduler.lr_for(max(0, loop.global_step - 1)),  # the LR of the epoch's last step
        epoch_time_s=epoch_time, is_best=improved)
    replan_for_time_limit(t, loop, epoch, state)
    loop.training_done = epoch >= t.epochs or loop.early.should_stop
    if loop.early.should_stop and epoch < t.epochs:
        loop.end_reason = "early_stopping"
    ckpt = make_checkpoint(t, loop, epoch)
    if improved:
        _save(t, runs.BEST_CKPT, ckpt, state.main)
    _save(t, runs.LAST_CKPT, ckpt, state.main)
    if probes:
        _write_probes(t, probes, epoch)
    log.info("Epoch [%d/%d] — Loss: %.4f | mAP@0.5: %.4f | Time: %.1fs", epoch, t.epochs,
             progress.mean_loss, map50, epoch_time)
    if improved:
        log.info("  ★ New best mAP@0.5: %.4f — Saved!", map50)
    state.epoch_done(epoch, t.steps_per_epoch, loop.global_step, loop.best, map50, val_time_s)
    if loop.end_reason == "early_stopping":
        log.info("Early stopping: no improvement for %d epochs", loop.early.bad_epochs)
    elif loop.end_reason == "time_limit":
        log.info("Time limit reached: %g min allows no further epoch (%.1f min used)",
                 cfg.train.time_limit_min, loop.elapsed() / 60)


def replan_for_time_limit(t: Training, loop: LoopState, epochs_done: int, state: RunState) -> None:
    """Under train.time_limit_min: plan the epochs that fit the time left and refit the cosine to end
    there. Rank 0's clock decides (broadcast), so every process plans the same epochs."""
    limit_s = t.cfg.train.time_limit_min * 60
    if limit_s <= 0:
        return
    elapsed = loop.elapsed()
    planned = D.broadcast_object(epochs_within(limit_s, elapsed, epochs_done, t.cfg.train.epochs), t.ctx)
    if planned <= epochs_done < t.cfg.train.epochs:
        loop.end_reason = "time_limit"
    if planned == t.epochs:
        return
    log.info("Time limit %g min: %.1f min used after epoch %d; %d epochs planned (was %d), the LR schedule now "
             "ends at epoch %d", t.cfg.train.time_limit_min, elapsed / 60, epochs_done, planned, t.epochs, planned)
    t.epochs = planned
    t.scheduler.refit(t.total_steps)
    state.planned(planned, t.total_steps)


def _write_probes(t: Training, probes: list, epoch: int) -> None:
    try:
        from engine.probes import write_probes

        write_probes(t.plain, probes, t.run_dir, epoch, t.device, t.cfg.input.test_size)
    except Exception as exc:
        log.warning("probe images for epoch %d not written: %s: %s", epoch, type(exc).__name__, exc)


def evaluate_test_split(t: Training, state: RunState) -> None:
    """Evaluate best.pth on the test split into runs/<run>/test/. A stop signal raises
    StopRequested; any other failure only warns (the training itself is done)."""
    cfg, best = t.cfg, t.ckpt_dir / runs.BEST_CKPT
    root, split = Path(cfg.data.root), cfg.data.test_split
    if not cfg.eval.test_after_train or not state.main:
        return
    if not best.is_file() or not (root / split).is_dir():
        log.warning("test evaluation skipped: %s", "no best.pth" if not best.is_file() else
                    f"{root} has no '{split}' split")
        return
    state.check_signal()
    state.testing(split)

    def on_image() -> None:
        fault_point("test-eval")
        state.beat()
        state.check_signal()

    try:
        result = evaluate.evaluate_checkpoint(best, config_path=t.run_dir / runs.CONFIG_FILE, device=str(t.device),
                                              split=split, out=t.run_dir / runs.TEST_DIR, on_image=on_image)
    except StopRequested:
        raise
    except Exception as exc:
        log.warning("test evaluation failed: %s: %s", type(exc).__name__, exc)
        return
    log.info("Test %s: mAP@0.5 %s | precision %s | recall %s | %.1f ms/image", split, _fmt(result.get("map50")),
             _fmt(result.get("precision")), _fmt(result.get("recall")), result.get("ms_per_image") or 0.0)


def _log_banner(t: Training, loop: LoopState) -> None:
    cfg = t.cfg
    log.info(RULE)
    log.info("Starting Training — %d epochs (run %s)", cfg.train.epochs, cfg.run.name)
    log.info("Device: %s (%s)", t.device, t.device_name)
    log.info("Model: %s, weights: %s, %.1fM parameters", cfg.model.name, cfg.model.weights, t.num_params / 1e6)
    log.info("LR: %g, Momentum: %g, Weight decay: %g", cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    log.info("Warmup: %g epochs (linear), then cosine to %g", cfg.schedule.warmup_epochs, cfg.schedule.min_lr)
    log.info("Batch size: %d, %d steps/epoch, %d steps in all; AMP: %s; grad clip: %s", cfg.train.batch_size,
             t.steps_per_epoch, t.total_steps, t.amp.label, cfg.train.grad_clip or "off")
    if t.ctx.distributed:
        log.info("Processes: %d (%s, %d per node), %d images per process and step; collective timeout %gs",
                 t.ctx.world_size, t.ctx.backend, t.ctx.local_world_size,
                 cfg.train.batch_size // t.ctx.world_size, t.ctx.timeout_s)
    log.info("Early Stopping Patience: %s", cfg.train.early_stopping_patience or "off")
    if loop.training_done:
        log.info("Training finished at epoch %d; evaluating the test split to complete the run", loop.next_epoch - 1)
    elif loop.next_epoch > 1 or loop.global_step > 0:
        log.info("Resuming at epoch %d, step %d (best mAP@0.5 so far: %s)", loop.next_epoch, loop.global_step,
                 _fmt(loop.best.get("map50")))
    log.info(RULE)


def _log_summary(elapsed: float, loop: LoopState) -> None:
    log.info(RULE)
    log.info("Training complete! Total time: %.1fs", elapsed)
    log.info("Best mAP@0.5: %s (epoch %s)", _fmt(loop.best.get("map50")), loop.best.get("epoch"))
    log.info(RULE)


def _stopped(t: Training, loop: LoopState, state: RunState) -> dict:
    name = t.cfg.run.name
    if loop.training_done:  # last.pth already holds the final epoch
        log.info("Stopped during the test evaluation: %s", state.stop_reason())
        state.stopped(f"stopped during the test evaluation; resume with --resume {name} to evaluate and complete")
        return _result(t, loop, state, "stopped")
    where = f"step {loop.current_step} (epoch {loop.next_epoch})"
    path = _save(t, runs.LAST_CKPT, make_checkpoint(t, loop, loop.next_epoch - 1), state.main)
    D.barrier(t.ctx)  # every rank leaves after last.pth is saved
    log.info("Stopped at %s: %s; saved %s", where, state.stop_reason(), path)
    log.info("Resume with: python -m engine train --resume %s --runs-dir %s", name, t.cfg.run.runs_dir)
    state.stopped(f"stopped at {where}; resume with --resume {name}")
    return _result(t, loop, state, "stopped")


def _completed(t: Training, loop: LoopState, state: RunState, elapsed: float) -> dict:
    epoch = loop.next_epoch - 1
    how = {"early_stopping": f"early stopped at epoch {epoch}",
           "time_limit": f"time limit reached after {epoch} epochs"}.get(loop.end_reason, f"completed {epoch} epochs")
    state.completed(f"{how}; best mAP@0.5 {_fmt(loop.best.get('map50'))} at epoch {loop.best.get('epoch')}",
                    epoch, elapsed, end_reason=loop.end_reason)
    return _result(t, loop, state, "completed")


def _result(t: Training, loop: LoopState, state: RunState, outcome: str) -> dict:
    return {"run": t.cfg.run.name, "state": outcome, "epoch": state.status.get("epoch"),
            "global_step": loop.current_step, "best": dict(loop.best), "run_dir": str(t.run_dir),
            "checkpoint_dir": str(t.ckpt_dir)}


# ----------------------------------------------------------------------------- entry point
def train(cfg: Config, run_name: Optional[str] = None, resume: bool = False, *,
          stop_at_step: Optional[int] = None) -> dict:
    """Train one run; returns {"run", "state", "epoch", "global_step", "best", ...}.

    `stop_at_step` (tests, automation) acts as if SIGTERM arrived right after that global step.
    Raises EngineError for user-facing problems (after writing `failed` when the run folder is ours).
    Under torchrun every process calls this: it joins the process group first (engine.distributed)
    and leaves it at the end; world size 1 creates none.
    """
    cfg = resolve_paths(copy.deepcopy(cfg))
    ctx = D.init_from_env(cfg)
    try:
        return _train(cfg, ctx, run_name, resume, stop_at_step)
    finally:
        D.shutdown(ctx)


def _train(cfg: Config, ctx: D.DistContext, run_name: Optional[str], resume: bool,
           stop_at_step: Optional[int]) -> dict:
    D.per_rank_batch_size(cfg.train.batch_size, ctx.world_size)  # a process count that does not divide it fails now
    name = validate_run_name(D.shared_run_name(ctx, run_name or cfg.run.name,
                                               lambda: default_run_name(cfg.source)))
    cfg.run.name = name
    run_dir = runs.run_path(cfg.run.runs_dir, name)
    ckpt_dir = Path(cfg.run.checkpoints_dir) / name
    resume, resume_from = D.on_main_then_share(ctx, lambda: _open_run(cfg, run_dir, ckpt_dir, resume, ctx))
    handlers = _setup_logging(run_dir, ctx)
    stop = StopSignals()
    stop.install()
    state = RunState(run_dir, stop, stop_at_step=stop_at_step, main=ctx.is_main, **_rank_tracking(run_dir, ctx),
                     **{**initial_fields(name, ckpt_dir, cfg.train.epochs), **_launch_fields(ctx)})
    state.started(resume)
    log.info("%s run %s (pid %d) -> %s", "Resuming" if resume else "Starting", name, os.getpid(), run_dir)
    if ctx.restart_count and ctx.is_main:
        log.warning("Elastic restart %d of at most %d: %s", ctx.restart_count, ctx.max_restarts,
                    f"resuming from {resume_from}" if resume_from else "starting over (no last.pth yet)")
    try:
        return fit(cfg, run_dir, ckpt_dir, state, resume_from, ctx)
    except KeyboardInterrupt:
        log.error("Interrupted (forced): progress since the last checkpoint is lost")
        state.interrupted()
        raise
    except EngineError as exc:
        log.error("Training failed: %s", exc)
        state.failed(str(exc))
        raise
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        if ctx.distributed and D.is_peer_failure(exc):
            reason = _peer_failure_reason(run_dir, ctx, reason)
            log.error("Training failed: %s", reason)
        else:
            log.exception("Training failed: %s: %s", type(exc).__name__, exc)
        state.failed(reason)
        raise
    finally:
        stop.restore()
        _teardown_logging(handlers)


def _peer_failure_reason(run_dir: Path, ctx: D.DistContext, error: str, wait_s: float = 3.0) -> str:
    """The failure of a collective, naming the ranks that are gone (their heartbeat files tell;
    a dead worker may take a moment to be reaped by torchrun)."""
    deadline = time.time() + wait_s
    lost = D.describe_lost_ranks(run_dir, ctx)
    while not lost and time.time() < deadline:
        time.sleep(0.2)
        lost = D.describe_lost_ranks(run_dir, ctx)
    return f"{lost or 'another rank stopped answering'} ({error})"


def _rank_tracking(run_dir: Path, ctx: D.DistContext) -> dict:
    """RunState's per-rank heartbeat (several processes): this rank's file, and on rank 0 the table of all."""
    if not ctx.distributed:
        return {}
    heartbeat = D.RankHeartbeat(run_dir, ctx)
    heartbeat.beat(0, None, force=True)
    return {"rank_heartbeat": heartbeat, "rank_table": (lambda: D.rank_table(run_dir)) if ctx.is_main else None}


def _launch_fields(ctx: D.DistContext) -> dict:
    """Status fields of a torchrun job: world size, restarts, and as pid/pgid the launcher's (torchrun's
    agent), whose process group the dashboard's Stop signals (the agent forwards it to every worker)."""
    if not ctx.distributed and ctx.launcher_pid is None:
        return {}
    fields = {**ctx.status_fields(), "worker_pid": os.getpid()}
    if ctx.launcher_pid:
        fields.update(pid=ctx.launcher_pid, pgid=fields["launcher_pgid"] or ctx.launcher_pid)
    return fields


def _open_run(cfg: Config, run_dir: Path, ckpt_dir: Path, resume: bool,
              ctx: D.DistContext) -> tuple[bool, Optional[Path]]:
    """(resume, last.pth to resume from): claim a new run folder (writing config.yaml), or check a
    resume. Rank 0 runs this; an elastic restart resumes from last.pth when there is one."""
    checkpoint = None
    if not resume and ctx.restart_count > 0 and (ckpt_dir / runs.LAST_CKPT).is_file():
        resume = True
    if resume:
        try:
            checkpoint = _resume_checkpoint(cfg.run.name, run_dir, ckpt_dir, ctx)
        except RunError as exc:
            _settle_queued_status(run_dir, exc, ctx)
            raise
        runs.remove_temp_files(run_dir, ckpt_dir)  # left by a killed process; nothing else writes here now
    else:
        _claim_new_run(run_dir, ckpt_dir, ctx.run_id if ctx.restart_count > 0 else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    D.prune_heartbeats(run_dir, ctx.world_size)
    return resume, checkpoint
