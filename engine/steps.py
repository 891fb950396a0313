"""One training epoch and one validation pass, as free functions with explicit arguments.

    train_step(model, optimizer, scheduler, scaler, images, targets, ...)      one optimizer step
    train_one_epoch(model, optimizer, scheduler, scaler, loader, device, progress, ...)
    validate_one_epoch(model, loader, device, eval_cfg, amp, state, epoch)

`progress` (EpochProgress) is the epoch in progress: train_one_epoch updates it after every
optimizer step, so when a stop request (StopRequested, raised by `state.check_stop()`) ends the
epoch early the caller holds exactly what was done; saved in last.pth as `epoch_progress`, it lets
a resumed run skip the batches already done (the loader then starts at `batches_done`).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

from engine import distributed as D
from engine import evaluate
from engine.build import Amp
from engine.config import EvalConfig
from engine.data import shut_down_loader_iterator, start_loader_iterator
from engine.errors import EngineError
from engine.faults import fault_point
from engine.run_state import RunState, StopRequested


class NonFiniteLossError(EngineError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochProgress:
    """Batches done in one epoch and their loss sums (the checkpoint's `epoch_progress`)."""
    epoch: int
    start_step: int  # global step before the epoch's first batch
    batches_done: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    time_s: float = 0.0  # training time of the batches done (without validation)

    @property
    def global_step(self) -> int:
        return self.start_step + self.batches_done

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.loss_count)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EpochProgress":
        return cls(epoch=int(data["epoch"]), start_step=int(data["start_step"]),
                   batches_done=int(data["batches_done"]), loss_sum=float(data["loss_sum"]),
                   loss_count=int(data["loss_count"]), time_s=float(data["time_s"]))


def _targets_to(targets, device) -> list[dict]:
    return [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(device, non_blocking=True),
             "labels": t["labels"].to(device, non_blocking=True)} for t in targets]


def gpu_mem_peak_mb(device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated by this process so far (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def tqdm_kwargs() -> dict:
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return {"dynamic_ncols": True, "mininterval": 0.1 if interactive else 2.0}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
               images: list, targets: list, *, amp: Amp, device: torch.device, params: list, max_norm: float,
               where: str, ctx: Optional[D.DistContext] = None) -> dict:
    """One optimizer step on one batch (already on `device`).

    Forward under autocast, loss check (NonFiniteLossError naming `where`, before any weight
    changes), backward through the GradScaler, unscale and clip the gradient to `max_norm`,
    optimizer, scaler and LR steps. Returns the step record's scalars: loss and its parts, the LR
    this step used, the gradient norm before clipping, the scale (None without a GradScaler).

    With several processes (`ctx`) the losses returned are the averages over the ranks, and the
    check runs on that average, so every rank raises at the same step, before the gradient
    all-reduce; the error names the ranks whose own loss was not finite.
    """
    lr = scheduler.get_lr()
    with amp.autocast(device):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
    if ctx is not None and ctx.distributed:
        losses = D.average_losses({**loss_dict, "loss": loss}, ctx)
        if not math.isfinite(losses["loss"]):
            who = D.agree(ctx, nonfinite=not math.isfinite(float(loss.detach()))).who("nonfinite")
            raise NonFiniteLossError(f"loss is {losses['loss']} at {where} (non-finite on {who or 'no rank alone'}); "
                                     f"try a lower optim.lr")
        return {**_backward_and_step(optimizer, scheduler, scaler, loss, params, max_norm), "lr": lr, **losses}
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at {where}; try a lower optim.lr")
    return {"loss": loss_value, "lr": lr, **_backward_and_step(optimizer, scheduler, scaler, loss, params, max_norm),
            **{k: float(v.detach()) for k, v in loss_dict.items()}}


def _backward_and_step(optimizer, scheduler, scaler: torch.amp.GradScaler, loss: torch.Tensor, params: list,
                       max_norm: float) -> dict:
    """Backward (DDP all-reduces the gradients here), clip, optimizer/scaler/LR steps."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # clip (and log) the true gradient norm
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    amp_scale = float(scaler.get_scale()) if scaler.is_enabled() else None  # the scale this step used
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"grad_norm": grad_norm, "amp_scale": amp_scale}


def check_stop(state: RunState, ctx: Optional[D.DistContext] = None) -> None:
    """Raise StopRequested when a stop was asked for; with several processes all ranks decide
    together (one collective), so they leave at the same step even when one rank got the signal."""
    if ctx is None or not ctx.distributed:
        state.check_stop()
    elif D.agree(ctx, stop=state.stop_requested())["stop"]:
        raise StopRequested()


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                    loader, device: torch.device, progress: EpochProgress, *, amp: Amp, grad_clip: float,
                    log_every: int, recorder, state: RunState, epochs: int, steps_per_epoch: int,
                    ctx: Optional[D.DistContext] = None) -> EpochProgress:
    """Train over `loader` (the batches of `progress.epoch` not done yet): one train_step per batch,
    `progress` updated after each, a step record every `log_every` global steps (`grad_clip` 0:
    no clipping, the norm is logged either way). Raises StopRequested after the step during
    which a stop was asked for. With several processes (`ctx`) the records hold the losses averaged
    over the ranks and the images/s of all of them."""
    world = ctx.world_size if ctx is not None else 1
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    model.train()
    state.epoch_started(progress.epoch, progress.batches_done, progress.global_step)
    batches = start_loader_iterator(loader)
    bar = tqdm(batches, total=steps_per_epoch, initial=progress.batches_done, desc=f"epoch {progress.epoch}/{epochs}",
               unit="batch", leave=False, file=sys.stderr, disable=not state.main, **tqdm_kwargs())
    t_prev = time.time()
    try:
        for images, targets in bar:
            data_time = time.time() - t_prev  # waiting for the DataLoader (0 when it keeps up)
            images = [img.to(device, non_blocking=True) for img in images]
            scalars = train_step(model, optimizer, scheduler, scaler, images, _targets_to(targets, device), amp=amp,
                                 device=device, params=params, max_norm=max_norm,
                                 where=f"step {progress.global_step + 1} (epoch {progress.epoch})", ctx=ctx)
            now = time.time()
            step_time, t_prev = now - t_prev, now
            progress.batches_done += 1
            progress.loss_sum += scalars["loss"]
            progress.loss_count += 1
            progress.time_s += step_time
            step = progress.global_step
            if step % log_every == 0:
                recorder.record_step(step, progress.epoch, images_per_s=len(images) * world / max(step_time, 1e-9),
                                     data_time_s=data_time, gpu_mem_peak_mb=gpu_mem_peak_mb(device), **scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", refresh=False)
            fault_point("step")
            state.step_done(step, progress.batches_done, len(images) * world, step_time)
            check_stop(state, ctx)
    finally:
        shut_down_loader_iterator(batches)
    bar.close()
    return progress


class _BeatingLoader:
    """Wraps a loader so every batch first calls `beat()` (heartbeat + stop check)."""

    def __init__(self, loader, beat):
        self.loader, self.beat = loader, beat

    def __iter__(self):
        batches = start_loader_iterator(self.loader)
        try:
            for batch in batches:
                fault_point("validation")
                self.beat()
                yield batch
        finally:
            shut_down_loader_iterator(batches)

    def __len__(self) -> int:
        return len(self.loader)


def validate_one_epoch(model: torch.nn.Module, loader, device: torch.device, eval_cfg: EvalConfig, amp: Amp,
                       state: RunState, epoch: int, ctx: Optional[D.DistContext] = None) -> dict:
    """engine.evaluate.validate at eval.score_threshold and eval.iou_threshold, with a heartbeat per
    batch; a stop signal raises StopRequested (the epoch is then redone from its validation).

    With several processes (`ctx`) each rank predicts its share of `loader.dataset`
    (engine.distributed.evaluate_distributed) and every rank returns the same metrics."""
    state.validating(epoch)
    if ctx is not None and ctx.distributed:
        try:
            return D.evaluate_distributed(model, loader.dataset, ctx, batch_size=eval_cfg.batch_size,
                                          collate_fn=loader.collate_fn, score_threshold=eval_cfg.score_threshold,
                                          iou=eval_cfg.iou_threshold, amp=amp.enabled, amp_dtype=amp.dtype,
                                          num_workers=loader.num_workers, should_stop=lambda: state.stop.requested,
                                          beat=state.beat)
        except D.EvaluationStopped:
            raise StopRequested() from None

    def beat() -> None:
        state.beat()
        state.check_signal()

    return evaluate.validate(model, _BeatingLoader(loader, beat), device, eval_cfg.score_threshold,
                             amp=amp.enabled, iou=eval_cfg.iou_threshold, amp_dtype=amp.dtype)
