"""When to change the learning rate and when to stop: warmup + cosine LR, early stopping.

The LR is set per iteration. `step` below is the 0-based index of the optimizer step about to
be taken (= the number of steps already done), so the LR of the whole run is a pure function of
the global step: a resumed run that restores the step counter reproduces the curve exactly.

    step < warmup_steps:  lr * (f + (1 - f) * step / warmup_steps)      f = warmup_start_factor
    step >= warmup_steps: min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2,
                          t = (step - warmup_steps) / (total_steps - 1 - warmup_steps)
so the first post-warmup step uses `lr` and the final step (total_steps - 1) uses `min_lr`.
"""
from __future__ import annotations

import math
from typing import Optional


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0,
          warmup_start_factor: float = 0.001, min_lr: float = 0.0) -> float:
    """The learning rate for the optimizer step with 0-based index `step`."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    if step < warmup_steps:
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps)
    span = total_steps - 1 - warmup_steps
    t = 1.0 if span <= 0 else min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def epochs_within(time_limit_s: float, elapsed_s: float, epochs_done: int, max_epochs: int) -> int:
    """The epochs a run under a time limit plans in all, after `epochs_done` epochs took `elapsed_s`.

    The mean epoch so far (training + validation) predicts the next ones; an epoch is planned
    only if it is expected to end within the limit, so the run ends at or before it. Without a
    limit (<= 0) or before the first epoch the answer is `max_epochs`; never fewer than the
    epochs done, never more than `max_epochs`."""
    if time_limit_s <= 0 or epochs_done <= 0:
        return max_epochs
    per_epoch = max(elapsed_s, 1e-9) / epochs_done
    fitting = epochs_done + max(0, int((time_limit_s - elapsed_s) // per_epoch))
    return max(epochs_done, min(max_epochs, fitting))


def warmup_steps_for(warmup_epochs: float, steps_per_epoch: int) -> int:
    return int(round(warmup_epochs * steps_per_epoch))


class WarmupCosineLR:
    """Sets the optimizer's LR from `lr_at`; call `step()` after each `optimizer.step()`.

    Its state is one integer (`last_step`, the number of steps done) plus the curve's
    parameters for a sanity check, so it round-trips through a weights_only checkpoint.
    """

    def __init__(self, optimizer, base_lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.001, min_lr: float = 0.0):
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.min_lr = float(min_lr)
        self.last_step = 0
        self._apply()

    def lr_for(self, step: int) -> float:
        return lr_at(step, self.base_lr, self.total_steps, self.warmup_steps,
                     self.warmup_start_factor, self.min_lr)

    def get_lr(self) -> float:
        """The LR the next optimizer step will use."""
        return self.lr_for(self.last_step)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def refit(self, total_steps: int) -> None:
        """End the cosine at step `total_steps - 1` instead (a time limit changed the plan);
        the steps done keep their LR, the next ones follow the new curve."""
        self.total_steps = int(total_steps)
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "warmup_start_factor": self.warmup_start_factor,
                "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        for key in ("base_lr", "total_steps", "warmup_steps", "warmup_start_factor", "min_lr"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))
        self.last_step = int(state["last_step"])
        self._apply()


class EarlyStopping:
    """Stop when the watched metric (higher is better) has not improved for `patience` epochs.

    `patience` 0 disables stopping; the best value is still tracked (it decides best.pth).
    """

    def __init__(self, patience: int):
        self.patience = int(patience)
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Feed one epoch's metric; True when it is a new best."""
        if self.best is None or value > self.best:
            self.best = float(value)
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.bad_epochs = int(state.get("bad_epochs", 0))
