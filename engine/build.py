"""Builders of a training run: data, loaders, model, optimizer, LR schedule, AMP and scaler, probes.

Plain functions of the config; engine.train calls them in a fixed order (the order matters for
the RNG streams: the model's initial weights are drawn right after the data is loaded).

Data order: every epoch's training order is a fixed permutation of (seed, epoch)
(`make_train_sampler`), so a resumed run can skip the batches an interrupted epoch already did.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler

from engine.config import Config, TrainConfig
from engine.data import CocoSplit, PlateDataset, collate_fn, load_split
from engine.errors import RunError
from engine.model import device_name  # noqa: F401  (train.py calls build.device_name)
from engine.schedule import WarmupCosineLR, warmup_steps_for

log = logging.getLogger("engine.train")

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- seeds and device
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy / random follow the worker's torch seed.

    Workers share the trainer's process group, so the dashboard's SIGTERM (and a terminal's
    Ctrl-C) reach them too. They ignore it: the main process finishes its step, saves last.pth and
    shuts the workers down itself (a worker killed first would make the run fail instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))  # forked blocked: engine.data.start_loader_iterator
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@dataclass(frozen=True)
class Amp:
    """Mixed precision of a run: autocast to `dtype` when `enabled`; a GradScaler only for float16."""
    enabled: bool
    dtype: torch.dtype = torch.float16

    @property
    def scaled(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    @property
    def label(self) -> str:
        return f"on ({str(self.dtype).removeprefix('torch.')})" if self.enabled else "off"

    def autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, dtype=self.dtype, enabled=self.enabled)


def amp_settings(tc: TrainConfig, device: torch.device) -> Amp:
    """train.amp + train.amp_dtype on `device`: auto = float16 on CUDA, off on CPU."""
    if not tc.amp:
        return Amp(False)
    if tc.amp_dtype == "auto":
        return Amp(device.type == "cuda", torch.float16)
    if tc.amp_dtype == "float16" and device.type != "cuda":
        raise RunError(f"train.amp_dtype=float16 needs a CUDA device (this run uses {device.type}); "
                       f"use bfloat16, or auto to train without AMP on CPU")
    return Amp(True, AMP_DTYPES[tc.amp_dtype])


def build_scaler(amp: Amp, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16 autocast (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=amp.scaled)


# ----------------------------------------------------------------------------- data
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
        shutil.rmtree(tmp, ignore_errors=True)  # another run generated it first
    return root


@dataclass
class TrainingData:
    train_ds: PlateDataset
    valid_ds: PlateDataset
    valid_split: CocoSplit
    summary: dict  # split name -> dataset summary (dataset.json)


def build_data(cfg: Config) -> TrainingData:
    """The train and valid datasets, and the summary of every split (the test split if present)."""
    root = prepare_data_root(cfg)
    train_split = load_split(root, cfg.data.train_split)
    valid_split = load_split(root, cfg.data.valid_split)
    summary = {cfg.data.train_split: train_split.summary, cfg.data.valid_split: valid_split.summary}
    if (root / cfg.data.test_split).is_dir():
        summary[cfg.data.test_split] = load_split(root, cfg.data.test_split).summary
    else:
        log.warning("%s: no '%s' split (needed later by evaluate)", root, cfg.data.test_split)
    train_ds = PlateDataset(train_split, train=True, augment=cfg.augment, limit=cfg.data.train_limit)
    valid_ds = PlateDataset(valid_split, train=False, augment=None, limit=cfg.data.valid_limit)
    if len(train_ds) == 0 or len(valid_ds) == 0:
        raise RunError(f"{root}: the train and valid splits need at least one image each")
    return TrainingData(train_ds, valid_ds, valid_split, summary)


class SkipSampler(Sampler):
    """The indices of `base` after the first `skip` (resuming an epoch in the middle)."""

    def __init__(self, base: Sampler, skip: int):
        self.base, self.skip = base, max(0, int(skip))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def make_train_sampler(dataset, seed: int, epoch: int, skip: int = 0) -> Sampler:
    """The training order of one process: a RandomSampler whose order is a fixed function of
    (seed, epoch). `skip` drops leading indices. (Several processes: engine.distributed.train_sampler.)"""
    generator = torch.Generator()
    generator.manual_seed(seed * 100003 + epoch)
    sampler: Sampler = RandomSampler(dataset, generator=generator)
    return SkipSampler(sampler, skip) if skip else sampler


def steps_per_epoch(cfg: Config, train_ds, world_size: int = 1) -> int:
    """Optimizer steps per epoch; train.batch_size is the global batch (over all processes)."""
    from engine import distributed as D

    return D.steps_per_epoch(len(train_ds), cfg.train.batch_size, world_size)


def train_loader(cfg: Config, train_ds, epoch: int, skip_batches: int, device: torch.device,
                 ctx=None) -> DataLoader:
    """The loader of one training epoch, without its first `skip_batches` batches.

    With several processes (`ctx`, an engine.distributed.DistContext) each rank loads its share
    (DistributedSampler, reshuffled per epoch) in batches of train.batch_size / world size, and
    seeds its DataLoader workers apart from the other ranks'; rank 0 draws exactly as one process."""
    from engine import distributed as D

    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    batch = D.per_rank_batch_size(cfg.train.batch_size, world)
    if world > 1:
        sampler: Sampler = D.train_sampler(train_ds, ctx, cfg.run.seed, epoch)
        sampler = SkipSampler(sampler, skip_batches * batch) if skip_batches else sampler
    else:
        sampler = make_train_sampler(train_ds, cfg.run.seed, epoch, skip=skip_batches * batch)
    generator = torch.Generator()
    generator.manual_seed(D.augmentation_seed(cfg.run.seed, rank) * 1009 + epoch)
    return DataLoader(train_ds, batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, generator=generator,
                      pin_memory=device.type == "cuda")


def valid_loader(cfg: Config, valid_ds, device: torch.device) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(cfg.run.seed)
    return DataLoader(valid_ds, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_fn, worker_init_fn=seed_worker, generator=generator,
                      pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- optimisation
def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD over the trainable parameters (one parameter group)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> WarmupCosineLR:
    return WarmupCosineLR(optimizer, cfg.optim.lr, steps_per_epoch * cfg.train.epochs,
                          warmup_steps_for(cfg.schedule.warmup_epochs, steps_per_epoch),
                          cfg.schedule.warmup_start_factor, cfg.schedule.min_lr)


# ----------------------------------------------------------------------------- probes
def select_probes(cfg: Config, valid_split: CocoSplit, main: bool) -> list:
    """The validation images predicted after every epoch (none on non-zero ranks); a failure only warns."""
    if cfg.eval.probe_images <= 0 or not main:
        return []
    try:
        from engine.probes import select_probe_images

        return list(select_probe_images(valid_split, cfg.eval.probe_images, cfg.run.seed))
    except Exception as exc:
        log.warning("probe images disabled: %s: %s", type(exc).__name__, exc)
        return []
