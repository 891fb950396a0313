"""The Live page's data and figures, shared by every browser session of the dashboard process.

One `RunTail` per run folder (so five tabs on one run read the file once), and the six figures
per (runs' versions, x axis, smoothing, log y, step range), built once and frozen (their JSON
encoded once): a refresh that finds no new record rebuilds nothing.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dashboard import charts, series
from engine import runs

MAX_TAILS = 16
MAX_FIGURE_SETS = 8
MIN_REBUILD_S = 1.0  # see LiveCache


@dataclass(frozen=True)
class View:
    x_axis: str = "step"
    smoothing: float = 0.6
    log_y: bool = False
    step_range: Optional[tuple] = None  # (first, last) step re-read at full resolution; None = whole run


FIGURES = (  # key, empty-chart caption
    ("live_loss", "Train loss: no step records yet."),
    ("live_parts", "Loss parts: no step records yet."),
    ("live_lr", "Learning rate: no step records yet."),
    ("live_grad", "Gradient norm: no step records yet."),
    ("live_map", "Validation mAP: no epoch finished yet."),
    ("live_prf", "Precision / recall / F1: no epoch finished yet."),
)


def build_figures(tails: list, view: View) -> dict:
    """The six Live figures (frozen), or None for a figure without data."""
    x, sm, log_y, rng = view.x_axis, view.smoothing, view.log_y, view.step_range
    figs = {
        "live_loss": charts.loss_figure(tails, x, sm, log_y, key="live_loss", step_range=rng, styled=False),
        "live_parts": charts.step_metric_figure(tails, series.LOSS_PARTS, "Loss parts", x, sm, log_y, key="live_parts",
                                                y_title="loss", step_range=rng, styled=False),
        "live_lr": charts.step_metric_figure(tails, ("lr",), "Learning rate", x, log_y=log_y, key="live_lr",
                                             y_title="lr", step_range=rng, band=False, styled=False),
        "live_grad": charts.step_metric_figure(tails, ("grad_norm",), "Gradient norm (before clipping)", x, sm, log_y,
                                               key="live_grad", step_range=rng, styled=False),
        "live_map": charts.epoch_metric_figure(tails, ("val_map50", "val_map50_95"), "Validation mAP", x,
                                               log_y=log_y, key="live_map", styled=False),
        "live_prf": charts.epoch_metric_figure(tails, ("val_precision", "val_recall", "val_f1"),
                                               "Validation precision / recall / F1", x, log_y=log_y, key="live_prf", styled=False),
    }
    return {k: charts.freeze(f, charts.TEMPLATE) if f.data else None for k, f in figs.items()}


def _all_live(tails: list) -> bool:
    """Every run still writing: a run that ended gets its final figures at once, never a rate-limited set."""
    return all(runs.effective_state(t.status) in runs.LIVE_STATES for t in tails)


class LiveCache:
    """Run tails and finished figure sets, least recently used dropped first; thread-safe.

    A figure set is rebuilt when the runs it shows have new records, but at most once per
    `min_rebuild_s` for the same runs and view: tabs refreshing at different moments would otherwise
    each rebuild it (five tabs, five builds per refresh period), and those moments are under a
    second apart. A tab may so show figures up to `min_rebuild_s` older than its header, only while every
    run shown is alive."""

    def __init__(self, max_tails: int = MAX_TAILS, max_figure_sets: int = MAX_FIGURE_SETS,
                 min_rebuild_s: float = MIN_REBUILD_S):
        self.max_tails, self.max_figure_sets, self.min_rebuild_s = max_tails, max_figure_sets, min_rebuild_s
        self._tails: OrderedDict = OrderedDict()
        self._figures: OrderedDict = OrderedDict()  # (runs, view) -> (signatures, built at, figures)
        self._lock = threading.Lock()

    def tail(self, run_dir: Path) -> series.RunTail:
        key = str(run_dir)
        with self._lock:
            if key not in self._tails:
                self._tails[key] = series.RunTail(Path(run_dir))
                while len(self._tails) > self.max_tails:
                    self._tails.popitem(last=False)
            self._tails.move_to_end(key)
            return self._tails[key]

    def figures(self, tails: list, view: View) -> tuple[dict, bool]:
        """(figures, rebuilt): the cached set when nothing the figures show has changed, or when it
        was built less than min_rebuild_s ago."""
        with contextlib.ExitStack() as held:  # no poll may change a buffer while it is drawn
            for t in sorted(set(tails), key=lambda t: str(t.run_dir)):
                held.enter_context(t.lock)
            key, signature = (tuple(str(t.run_dir) for t in tails), view), tuple(t.signature for t in tails)
            with self._lock:
                cached = self._figures.get(key)
                if cached is not None and (cached[0] == signature or (
                        time.monotonic() - cached[1] < self.min_rebuild_s and _all_live(tails))):
                    self._figures.move_to_end(key)
                    return cached[2], False
            figs = build_figures(tails, view)
        with self._lock:
            self._figures[key] = (signature, time.monotonic(), figs)
            self._figures.move_to_end(key)
            while len(self._figures) > self.max_figure_sets:
                self._figures.popitem(last=False)
        return figs, True
