"""The training loop: one run of the plate detector, writing the run folder as it goes.

    train(cfg, run_name=None)              a new run: runs/<run>/ + checkpoints/<run>/
    train(cfg, run_name, resume=True)      continue from checkpoints/<run>/last.pth

Lifecycle (status.json `state`): running -> completed | stopped | failed.
- SIGTERM / SIGINT set a flag; the loop finishes the current optimizer step, saves last.pth and
  writes `stopped` (a second Ctrl-C aborts at once).
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
"""
from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from engine import runs
from engine.checkpoint import FORMAT, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from engine.config import Config, load_config, save_config, validate_run_name
from engine.errors import EngineError
from engine.schedule import EarlyStopping, WarmupCosineLR, warmup_steps_for
from engine.tracking import is_main_process, make_recorder

log = logging.getLogger("engine.train")

HEARTBEAT_S = 5.0
RULE = "=" * 60


class RunError(EngineError):
    """The run cannot start or resume (name taken, nothing to resume, already completed...)."""


class AlreadyCompletedError(RunError):
    """--resume of a run that has finished."""


class NonFiniteLossError(EngineError):
    """The training loss became NaN or infinite."""


class StopRequested(Exception):
    """Raised inside the loop when a stop was asked for (signal or `stop_at_step`)."""


# ----------------------------------------------------------------------------- run names and folders
def default_run_name(cfg: Config) -> str:
    stem = Path(cfg.source).stem if cfg.source and not cfg.source.startswith("<") else "run"
    stem = "".join(c if (c.isalnum() or c in "-_.") else "-" for c in stem) or "run"
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _claim_new_run(run_dir: Path, ckpt_dir: Path) -> None:
    """Refuse a folder that already holds a run. A folder with only a `queued` status and a
    train.log is fine: that is the dashboard launching this very run."""
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
    return cfg


def _resume_checkpoint(run: str, run_dir: Path, ckpt_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise RunError(f"run {run!r} not found in {run_dir.parent}")
    status = runs.read_status(run_dir) or {}
    if status.get("state") == "completed":
        raise AlreadyCompletedError(f"run {run!r} already completed ({status.get('message') or 'nothing to resume'}); "
                       f"start a new run, e.g. with --set model.weights={ckpt_dir / runs.BEST_CKPT}")
    if (status.get("state") in runs.LIVE_STATES and status.get("pid") not in (None, os.getpid())
            and status.get("host") == runs.hostname() and runs.pid_alive(status.get("pid"))):
        raise RunError(f"run {run!r} is still running (pid {status.get('pid')})")
    path = ckpt_dir / runs.LAST_CKPT
    if not path.is_file():
        raise RunError(f"{path}: no checkpoint to resume run {run!r} from")
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("completed"):
        raise AlreadyCompletedError(f"run {run!r} already completed (epoch {ckpt.get('epoch')}); nothing to resume")
    return ckpt


def _settle_queued_status(run_dir: Path, exc: RunError) -> None:
    """A launcher marked the run `queued` before starting us; a refused resume must not leave it so."""
    status = runs.read_status(run_dir)
    if not status or status.get("state") != "queued" or status.get("pid") not in (None, os.getpid()):
        return
    if isinstance(exc, AlreadyCompletedError):
        fields = {"state": "completed", "message": str(exc)}
    else:
        fields = {"state": "failed", "error": str(exc), "message": str(exc)}
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, {**status, **fields, "pid": os.getpid(),
                                                        "updated_at": time.time(), "ended_at": time.time()})


class _NullStatus:
    """The status writer of non-zero ranks (torchrun): keeps the dict, writes nothing."""

    def __init__(self, run_path, **initial: Any):
        self.status: dict = dict(initial)

    def update(self, **fields: Any) -> dict:
        self.status.update(fields)
        return self.status

    def heartbeat(self, every: float = 5.0, **fields: Any) -> None:
        self.status.update(fields)


# ----------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM / SIGINT set `requested`; the loop checks it after every step."""

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


# ----------------------------------------------------------------------------- logging
def _same_file(stream, path: Path) -> bool:
    """True when `stream` (e.g. sys.stdout) writes to `path` (compared by inode)."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _setup_logging(run_dir: Path) -> list:
    """Log to stdout; also to runs/<run>/train.log unless stdout already is that file."""
    logger = logging.getLogger("engine")
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list = [logging.StreamHandler(sys.stdout)]
    log_path = run_dir / runs.LOG_FILE
    if is_main_process() and not _same_file(sys.stdout, log_path):
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


# ----------------------------------------------------------------------------- data plumbing
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy / random follow the worker's torch seed.

    Workers share the trainer's process group, so the dashboard's SIGTERM (and a terminal's
    Ctrl-C) reach them too. They ignore it: the main process finishes its step, saves last.pth and
    shuts the workers down itself (a worker killed first would make the run fail instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SkipSampler(Sampler):
    """The indices of `base` after the first `skip` (resuming an epoch in the middle)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, max(0, int(skip))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def make_train_sampler(dataset, seed: int, epoch: int, skip: int = 0) -> Sampler:
    """The one place that picks the training sampler: DistributedSampler under torchrun, else a
    RandomSampler whose order is a fixed function of (seed, epoch). `skip` drops leading indices."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from torch.utils.data.distributed import DistributedSampler

        sampler: Sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        generator = torch.Generator()
        generator.manual_seed(seed * 100003 + epoch)
        sampler = RandomSampler(dataset, generator=generator)
    return SkipSampler(sampler, skip) if skip else sampler


class _BeatingLoader:
    """Wraps a loader so every batch calls `beat()` (heartbeat + stop check) during validation."""

    def __init__(self, loader, beat):
        self.loader, self.beat = loader, beat

    def __iter__(self):
        for batch in self.loader:
            self.beat()
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def prepare_data_root(cfg: Config) -> Path:
    """data.root, generating the synthetic set first when it is missing and allowed."""
    root = Path(cfg.data.root)
    if root.exists():
        return root
    if not cfg.data.generate_if_missing:
        raise RunError(f"{root}: dataset root not found (set data.root / --data, or "
                       f"data.generate_if_missing: true for the synthetic set)")
    from engine.synthetic import generate_dataset

    s = cfg.data.synth
    log.info("Generating synthetic dataset at %s (%d/%d/%d images, seed %d)...", root, s.train, s.valid, s.test, s.seed)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    generate_dataset(tmp, train=s.train, valid=s.valid, test=s.test, seed=s.seed, width=s.width, height=s.height)
    try:
        os.rename(tmp, root)  # atomic: a concurrent run sees all of it or nothing
    except OSError:
        if not root.exists():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another run generated it first
    return root


def _targets_to(targets, device) -> list[dict]:
    return [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device, non_blocking=True),
             "labels": t["labels"].to(device, non_blocking=True)} for t in targets]


def _gpu_mem_peak_mb(device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated by this process so far (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Holds everything one training process needs; `run()` trains until done or stopped."""

    def __init__(self, cfg: Config, run_dir: Path, ckpt_dir: Path, status: runs.StatusWriter,
                 stop: StopSignals, resume_from: Optional[dict] = None, stop_at_step: Optional[int] = None):
        from engine.data import PlateDataset, collate_fn, load_split
        from engine.model import build_model, count_parameters, resolve_device

        self.cfg, self.run_dir, self.ckpt_dir = cfg, run_dir, ckpt_dir
        self.name = cfg.run.name
        self.status, self.stop, self.stop_at_step = status, stop, stop_at_step
        self.recorder = None
        tc = cfg.train

        self.device = resolve_device(tc.device)
        self.use_amp = bool(tc.amp and self.device.type == "cuda")
        seed_everything(cfg.run.seed)
        if tc.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        # --- data
        status.update(message="loading dataset", device=str(self.device), device_name=_device_name(self.device))
        root = prepare_data_root(cfg)
        self.train_split = load_split(root, cfg.data.train_split)
        self.valid_split = load_split(root, cfg.data.valid_split)
        summary = {cfg.data.train_split: self.train_split.summary, cfg.data.valid_split: self.valid_split.summary}
        if (root / cfg.data.test_split).is_dir():
            summary[cfg.data.test_split] = load_split(root, cfg.data.test_split).summary
        else:
            log.warning("%s: no '%s' split (needed later by evaluate)", root, cfg.data.test_split)
        if is_main_process():
            runs.atomic_write_json(run_dir / runs.DATASET_FILE, summary)
        for split, s in summary.items():
            log.info("Dataset %-5s: %d images, %d boxes, %d empty images, %d dropped boxes, %d clipped",
                     split, s["images"], s["boxes"], s["empty_images"], s["dropped_boxes"], s.get("clipped_boxes", 0))
        self.train_ds = PlateDataset(self.train_split, train=True, augment=cfg.augment, limit=cfg.data.train_limit)
        self.valid_ds = PlateDataset(self.valid_split, train=False, augment=None, limit=cfg.data.valid_limit)
        if len(self.train_ds) == 0 or len(self.valid_ds) == 0:
            raise RunError(f"{root}: the train and valid splits need at least one image each")
        self.collate_fn = collate_fn
        self.steps_per_epoch = math.ceil(len(make_train_sampler(self.train_ds, cfg.run.seed, 1)) / tc.batch_size)
        self.total_steps = self.steps_per_epoch * tc.epochs
        val_gen = torch.Generator()
        val_gen.manual_seed(cfg.run.seed)
        self.valid_loader = DataLoader(self.valid_ds, batch_size=cfg.eval.batch_size, shuffle=False,
                                       num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                                       worker_init_fn=seed_worker, generator=val_gen,
                                       pin_memory=self.device.type == "cuda")

        # --- model and optimisation
        status.update(message="building model")
        self.model = build_model(cfg).to(self.device)
        self.num_params = count_parameters(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.warmup_steps = warmup_steps_for(cfg.schedule.warmup_epochs, self.steps_per_epoch)
        self.scheduler = WarmupCosineLR(self.optimizer, cfg.optim.lr, self.total_steps, self.warmup_steps,
                                        cfg.schedule.warmup_start_factor, cfg.schedule.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.early = EarlyStopping(tc.early_stopping_patience)
        self.best: dict = {"epoch": None, "map50": None}
        self.start_epoch, self.global_step = 1, 0
        self.progress: Optional[dict] = None  # the epoch in progress (see module docstring)
        self.elapsed_before = 0.0  # training time of earlier processes of this run
        self.last_record: Optional[dict] = None
        if resume_from is not None:
            self._restore(resume_from)

        self.recorder = make_recorder(run_dir, purge_step=self.global_step + 1 if resume_from is not None else None)
        self.probe_records = self._select_probes()
        self.step_time_ema: Optional[float] = None
        self.images_per_s: Optional[float] = None
        self.val_time_s: Optional[float] = None
        if resume_from is not None:  # last, so nothing above shifts the restored RNG streams
            restore_rng_state(resume_from.get("rng") or {})

    # ------------------------------------------------------------------ resume
    def _restore(self, ckpt: dict) -> None:
        sched = ckpt.get("scheduler") or {}
        if int(sched.get("total_steps", self.total_steps)) != self.total_steps:
            raise RunError(f"{self.ckpt_dir / runs.LAST_CKPT}: the run had {sched.get('total_steps')} steps in all, "
                           f"the data and config now give {self.total_steps} ({self.steps_per_epoch}/epoch); "
                           f"the dataset or batch size changed, start a new run instead")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(sched)
        if self.use_amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt.get("early_stopping") or {})
        self.best = dict(ckpt.get("best") or self.best)
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["global_step"])
        self.elapsed_before = float(ckpt.get("elapsed_s") or 0.0)
        self.last_record = ckpt.get("metrics")
        progress = ckpt.get("epoch_progress")
        if progress and int(progress["epoch"]) == self.start_epoch:
            if int(progress["start_step"]) + int(progress["batches_done"]) != self.global_step:
                raise RunError(f"{self.ckpt_dir / runs.LAST_CKPT}: inconsistent epoch progress; cannot resume")
            self.progress = dict(progress)
        if self.scheduler.last_step != self.global_step:
            raise RunError(f"{self.ckpt_dir / runs.LAST_CKPT}: scheduler step {self.scheduler.last_step} "
                           f"!= global step {self.global_step}; cannot resume")

    def _select_probes(self) -> list:
        n = self.cfg.eval.probe_images
        if n <= 0 or not is_main_process():
            return []
        try:
            from engine.probes import select_probe_images

            return list(select_probe_images(self.valid_split, n, self.cfg.run.seed))
        except Exception as exc:
            log.warning("probe images disabled: %s: %s", type(exc).__name__, exc)
            return []

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch_done: int, completed: bool = False) -> dict:
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else {},
            "epoch": int(epoch_done),
            "global_step": int(self.global_step),
            "best": dict(self.best),
            "early_stopping": self.early.state_dict(),
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "run": self.name,
            "metrics": dict(self.last_record) if self.last_record else {},
            "completed": bool(completed),
            "epoch_progress": dict(self.progress) if self.progress and self.progress["batches_done"] else None,
            "elapsed_s": float(self.elapsed_before + self._elapsed()),
        }

    def _save(self, which: str, ckpt: dict) -> Path:
        path = self.ckpt_dir / which
        if is_main_process():
            save_checkpoint(path, ckpt)
        return path

    def _elapsed(self) -> float:
        return time.time() - self.t_start

    # ------------------------------------------------------------------ status
    def _eta(self) -> Optional[float]:
        if self.step_time_ema is None:
            return None
        remaining_steps = self.total_steps - self.global_step
        epoch_now = self.progress["epoch"] if self.progress else self.start_epoch
        remaining_vals = self.cfg.train.epochs - epoch_now + 1
        return remaining_steps * self.step_time_ema + remaining_vals * (self.val_time_s or 0.0)

    def _beat(self, **fields: Any) -> None:
        self.status.heartbeat(every=HEARTBEAT_S, global_step=self.global_step, images_per_s=self.images_per_s,
                              eta_s=self._eta(), **fields)

    def _check_stop(self) -> None:
        if self.stop.requested or (self.stop_at_step is not None and self.global_step >= self.stop_at_step):
            raise StopRequested()

    # ------------------------------------------------------------------ the loop
    def banner(self) -> None:
        cfg = self.cfg
        log.info(RULE)
        log.info("Starting Training — %d epochs (run %s)", cfg.train.epochs, self.name)
        log.info("Device: %s (%s)", self.device, self.status.status.get("device_name"))
        log.info("Model: %s, weights: %s, %.1fM parameters", cfg.model.name, cfg.model.weights, self.num_params / 1e6)
        log.info("LR: %g, Momentum: %g, Weight decay: %g", cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
        log.info("Warmup: %g epochs (linear), then cosine to %g", cfg.schedule.warmup_epochs, cfg.schedule.min_lr)
        log.info("Batch size: %d, %d steps/epoch, %d steps in all; AMP: %s; grad clip: %s",
                 cfg.train.batch_size, self.steps_per_epoch, self.total_steps, "on" if self.use_amp else "off",
                 cfg.train.grad_clip or "off")
        log.info("Early Stopping Patience: %s", cfg.train.early_stopping_patience or "off")
        if self.start_epoch > 1 or self.global_step > 0:
            log.info("Resuming at epoch %d, step %d (best mAP@0.5 so far: %s)", self.progress["epoch"]
                     if self.progress else self.start_epoch, self.global_step, _fmt(self.best.get("map50")))
        log.info(RULE)

    def run(self) -> dict:
        cfg = self.cfg
        self.t_start = time.time()
        self.status.update(state="running", message="training", epoch=self.start_epoch - 1, epochs=cfg.train.epochs,
                           step=self.progress["batches_done"] if self.progress else 0,
                           steps_per_epoch=self.steps_per_epoch, global_step=self.global_step,
                           total_steps=self.total_steps, best=self.best, error=None, ended_at=None)
        self.banner()
        epoch = self.start_epoch
        early_stopped = False
        epochs_bar = tqdm(total=cfg.train.epochs, initial=self.start_epoch - 1, desc="epochs", unit="epoch",
                          file=sys.stderr, disable=not is_main_process(), **_tqdm_kwargs())
        try:
            for epoch in range(self.start_epoch, cfg.train.epochs + 1):
                self._check_stop()
                train_loss, train_time = self.train_one_epoch(epoch)
                early_stopped = self.end_of_epoch(epoch, train_loss, train_time)
                epochs_bar.update(1)
                if early_stopped:
                    break
        except StopRequested:
            epochs_bar.close()
            return self._stopped(epoch)
        epochs_bar.close()
        return self._completed(epoch, early_stopped)

    def train_one_epoch(self, epoch: int) -> tuple[float, float]:
        cfg, tc = self.cfg, self.cfg.train
        if not self.progress or self.progress["epoch"] != epoch:
            self.progress = {"epoch": epoch, "batches_done": 0, "start_step": self.global_step,
                             "loss_sum": 0.0, "loss_count": 0, "time_s": 0.0}
        progress = self.progress
        skip = progress["batches_done"]
        sampler = make_train_sampler(self.train_ds, cfg.run.seed, epoch, skip=skip * tc.batch_size)
        loader_gen = torch.Generator()
        loader_gen.manual_seed(cfg.run.seed * 1009 + epoch)
        loader = DataLoader(self.train_ds, batch_size=tc.batch_size, sampler=sampler,
                            num_workers=cfg.data.num_workers, collate_fn=self.collate_fn,
                            worker_init_fn=seed_worker, generator=loader_gen,
                            pin_memory=self.device.type == "cuda")
        self.model.train()
        self.status.update(epoch=epoch, step=skip, global_step=self.global_step,
                           message=f"training epoch {epoch}/{tc.epochs}")
        bar = tqdm(loader, total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch}/{tc.epochs}",
                   unit="batch", leave=False, file=sys.stderr, disable=not is_main_process(), **_tqdm_kwargs())
        t_prev = time.time()
        for images, targets in bar:
            data_time = time.time() - t_prev  # waiting for the DataLoader (0 when it keeps up)
            images = [img.to(self.device, non_blocking=True) for img in images]
            targets = _targets_to(targets, self.device)
            lr = self.scheduler.get_lr()
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
                loss_dict = self.model(images, targets)
                loss = sum(loss_dict.values())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at step {self.global_step + 1} (epoch {epoch}); "
                                         f"try a lower optim.lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.use_amp:
                self.scaler.unscale_(self.optimizer)  # clip (and log) the true gradient norm
            max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            amp_scale = float(self.scaler.get_scale()) if self.use_amp else None  # the scale this step used
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1

            now = time.time()
            step_time, t_prev = now - t_prev, now
            progress["batches_done"] += 1
            progress["loss_sum"] += loss_value
            progress["loss_count"] += 1
            progress["time_s"] += step_time
            self.step_time_ema = step_time if self.step_time_ema is None else 0.9 * self.step_time_ema + 0.1 * step_time
            rate = len(images) / max(step_time, 1e-9)
            self.images_per_s = rate if self.images_per_s is None else 0.9 * self.images_per_s + 0.1 * rate
            if self.global_step % tc.log_every == 0:
                self.recorder.record_step(self.global_step, epoch, loss=loss_value, lr=lr, grad_norm=grad_norm,
                                          images_per_s=rate, data_time_s=data_time, amp_scale=amp_scale,
                                          gpu_mem_peak_mb=_gpu_mem_peak_mb(self.device),
                                          **{k: float(v.detach()) for k, v in loss_dict.items()})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            self._beat(epoch=epoch, step=progress["batches_done"])
            self._check_stop()
        bar.close()
        train_loss = progress["loss_sum"] / max(1, progress["loss_count"])
        return train_loss, progress["time_s"]

    def _validate(self, epoch: int) -> dict:
        from engine.evaluate import validate

        self.status.update(message=f"validating epoch {epoch}/{self.cfg.train.epochs}")

        def beat() -> None:
            self._beat()
            if self.stop.requested:
                raise StopRequested()

        return validate(self.model, _BeatingLoader(self.valid_loader, beat), self.device,
                        self.cfg.eval.score_threshold, amp=self.use_amp)

    def end_of_epoch(self, epoch: int, train_loss: float, train_time: float) -> bool:
        """Validate, record, checkpoint, probes. Returns True when early stopping triggers."""
        cfg = self.cfg
        t0 = time.time()
        metrics = self._validate(epoch)
        self.val_time_s = time.time() - t0
        map50 = float(metrics.get("map50") or 0.0)
        improved = self.early.update(map50 if math.isfinite(map50) else 0.0)
        if improved:
            self.best = {"epoch": epoch, "map50": map50}
        lr = self.scheduler.lr_for(max(0, self.global_step - 1))  # the LR of the epoch's last step
        record = self.recorder.record_epoch(
            epoch, self.global_step, train_loss=train_loss, val_map50=map50,
            val_map50_95=metrics.get("map50_95"), val_precision=metrics.get("precision"),
            val_recall=metrics.get("recall"), val_f1=metrics.get("f1"), lr=lr,
            epoch_time_s=train_time + self.val_time_s, is_best=improved)
        self.last_record = record
        self.progress = None
        finished = epoch >= cfg.train.epochs or self.early.should_stop
        ckpt = self._checkpoint(epoch, completed=finished)
        if improved:
            self._save(runs.BEST_CKPT, ckpt)
        self._save(runs.LAST_CKPT, ckpt)
        self._write_probes(epoch)
        log.info("Epoch [%d/%d] — Loss: %.4f | mAP@0.5: %.4f | Time: %.1fs", epoch, cfg.train.epochs,
                 train_loss, map50, train_time + self.val_time_s)
        if improved:
            log.info("  ★ New best mAP@0.5: %.4f — Saved!", map50)
        self.status.update(epoch=epoch, step=self.steps_per_epoch, global_step=self.global_step, best=self.best,
                           images_per_s=self.images_per_s, eta_s=self._eta(),
                           message=f"epoch {epoch}/{cfg.train.epochs} done, val mAP@0.5 {map50:.4f}")
        if self.early.should_stop:
            log.info("Early stopping: no improvement for %d epochs", self.early.bad_epochs)
            return True
        return False

    def _write_probes(self, epoch: int) -> None:
        if not self.probe_records:
            return
        try:
            from engine.probes import write_probes

            write_probes(self.model, self.probe_records, self.run_dir, epoch, self.device, self.cfg.input.test_size)
        except Exception as exc:
            log.warning("probe images for epoch %d not written: %s: %s", epoch, type(exc).__name__, exc)

    def _stopped(self, epoch: int) -> dict:
        done = (self.progress["epoch"] if self.progress else epoch) - 1  # last completed epoch
        ckpt = self._checkpoint(done)
        path = self._save(runs.LAST_CKPT, ckpt)
        why = f"stop requested ({self.stop.name})" if self.stop.requested else f"stop_at_step={self.stop_at_step}"
        where = f"step {self.global_step} (epoch {self.progress['epoch'] if self.progress else epoch})"
        log.info("Stopped at %s: %s; saved %s", where, why, path)
        log.info("Resume with: python -m engine train --resume %s --runs-dir %s", self.name, self.cfg.run.runs_dir)
        self.status.update(state="stopped", ended_at=time.time(), eta_s=None,
                           message=f"stopped at {where}; resume with --resume {self.name}")
        return self._result("stopped")

    def _evaluate_test_split(self) -> None:
        """Evaluate best.pth on the test split into runs/<run>/test/ (a failure only warns)."""
        best = self.ckpt_dir / runs.BEST_CKPT
        root = Path(self.cfg.data.root)
        if not self.cfg.eval.test_after_train or not is_main_process():
            return
        if not best.is_file() or not (root / self.cfg.data.test_split).is_dir():
            log.warning("test evaluation skipped: %s", "no best.pth" if not best.is_file() else
                        f"{root} has no '{self.cfg.data.test_split}' split")
            return
        self.status.update(message=f"evaluating best.pth on the {self.cfg.data.test_split} split")
        try:
            from engine.evaluate import evaluate_checkpoint

            result = evaluate_checkpoint(best, config_path=self.run_dir / runs.CONFIG_FILE, device=str(self.device),
                                         split=self.cfg.data.test_split, out=self.run_dir / runs.TEST_DIR)
            log.info("Test %s: mAP@0.5 %s | precision %s | recall %s | %.1f ms/image", self.cfg.data.test_split,
                     _fmt(result.get("map50")), _fmt(result.get("precision")), _fmt(result.get("recall")),
                     result.get("ms_per_image") or 0.0)
        except Exception as exc:  # the run itself is done; keep it completed
            log.warning("test evaluation failed: %s: %s", type(exc).__name__, exc)

    def _completed(self, epoch: int, early_stopped: bool) -> dict:
        total = self.elapsed_before + self._elapsed()
        log.info(RULE)
        log.info("Training complete! Total time: %.1fs", total)
        log.info("Best mAP@0.5: %s (epoch %s)", _fmt(self.best.get("map50")), self.best.get("epoch"))
        log.info(RULE)
        self._evaluate_test_split()
        how = f"early stopped at epoch {epoch}" if early_stopped else f"completed {epoch} epochs"
        self.status.update(state="completed", ended_at=time.time(), eta_s=0, epoch=epoch, elapsed_s=total,
                           message=f"{how}; best mAP@0.5 {_fmt(self.best.get('map50'))} at epoch {self.best.get('epoch')}")
        return self._result("completed")

    def _result(self, state: str) -> dict:
        return {"run": self.name, "state": state, "epoch": self.status.status.get("epoch"),
                "global_step": self.global_step, "best": dict(self.best), "run_dir": str(self.run_dir),
                "checkpoint_dir": str(self.ckpt_dir)}

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def _tqdm_kwargs() -> dict:
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return {"dynamic_ncols": True, "mininterval": 0.1 if interactive else 2.0}


def environment() -> dict:
    """Versions and platform recorded in status.json (the results report's environment table)."""
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda if torch.cuda.is_available() else None,
            "python_version": platform.python_version(), "platform": platform.platform(terse=True)}


# ----------------------------------------------------------------------------- entry point
def train(cfg: Config, run_name: Optional[str] = None, resume: bool = False, *,
          stop_at_step: Optional[int] = None) -> dict:
    """Train one run; returns {"run", "state", "epoch", "global_step", "best", ...}.

    `stop_at_step` (tests, automation) acts as if SIGTERM arrived right after that global step.
    Raises EngineError for user-facing problems (after writing `failed` when the run folder is ours).
    """
    cfg = copy.deepcopy(cfg)
    name = validate_run_name(run_name or cfg.run.name or default_run_name(cfg))
    cfg.run.name = name
    run_dir = runs.run_path(cfg.run.runs_dir, name)
    ckpt_dir = Path(cfg.run.checkpoints_dir) / name
    if resume:
        try:
            checkpoint = _resume_checkpoint(name, run_dir, ckpt_dir)
        except RunError as exc:
            _settle_queued_status(run_dir, exc)
            raise
    else:
        checkpoint = None
        _claim_new_run(run_dir, ckpt_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            save_config(cfg, run_dir / runs.CONFIG_FILE)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    handlers = _setup_logging(run_dir)
    stop = StopSignals()
    stop.install()
    writer = runs.StatusWriter if is_main_process() else _NullStatus
    status = writer(run_dir, run=name, pid=os.getpid(), pgid=os.getpgid(0), host=runs.hostname(),
                    ended_at=None, error=None, checkpoint_dir=str(ckpt_dir), epochs=cfg.train.epochs,
                    **environment())
    if resume:
        status.status["resumed_at"] = time.time()
    if not resume or not status.status.get("started_at"):
        status.status["started_at"] = time.time()
    status.update(state="running", message="resuming" if resume else "starting")
    log.info("%s run %s (pid %d) -> %s", "Resuming" if resume else "Starting", name, os.getpid(), run_dir)
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(cfg, run_dir, ckpt_dir, status, stop, checkpoint, stop_at_step)
        checkpoint = None  # free the memory
        return trainer.run()
    except KeyboardInterrupt:
        log.error("Interrupted (forced): progress since the last checkpoint is lost")
        status.update(state="stopped", ended_at=time.time(), eta_s=None,
                      message="interrupted (forced); resume continues from the last checkpoint")
        raise
    except EngineError as exc:
        log.error("Training failed: %s", exc)
        status.update(state="failed", ended_at=time.time(), eta_s=None, error=str(exc), message=str(exc))
        raise
    except BaseException as exc:
        log.exception("Training failed: %s: %s", type(exc).__name__, exc)
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        status.update(state="failed", ended_at=time.time(), eta_s=None, error=text, message=text)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        stop.restore()
        _teardown_logging(handlers)
