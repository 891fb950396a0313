"""Step records of one run as growing numpy columns, with per-bucket statistics kept up to date.

`StepBuffer` holds one row per global step, sorted by step, each step once: a record for a step
already present replaces it (the last write wins), so the duplicate steps a crash-and-resume
leaves in metrics.jsonl never make a curve zig-zag back. Columns grow in place (capacity doubles).

Downsampling: steps are grouped into buckets of `width` consecutive step numbers (a power of two,
doubled when the run outgrows `max_buckets`). For every column each bucket keeps min, max, sum,
the number of finite values and the number of missing/non-finite ones. New records only touch
their own buckets (recomputed from the columns), so a poll costs time proportional to what is
new. A chart draws the min/max band and the mean per bucket: a single-step spike moves its
bucket's max and a NaN (written as null by the engine) is counted, so neither can hide.

`window(key, lo, hi)` re-reads a step range at full resolution (or with buckets of the range's
own, finer width when it holds more than `max_points` steps). `ema` smooths like TensorBoard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from dashboard.metrics_columns import STEP_COLUMNS, Chunk

MAX_BUCKETS = 512  # a half-page chart is about 600 px wide: more points cost every tab a slower redraw
EMA_BLOCK = 128
BUCKET_KEYS = ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr", "grad_norm",
               "images_per_s")  # the charted columns; others are bucketed on demand (window)


@dataclass
class Series:
    """One column over a step range, per point: step, row index, min, max, mean, missing count."""
    steps: np.ndarray       # representative step of each point (the middle record of its bucket)
    index: np.ndarray       # row of that record in the buffer (for time / EMA lookups)
    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray        # NaN when the bucket holds no finite value
    missing: np.ndarray     # records whose value is null/NaN/inf
    width: int              # steps per bucket; 1 = every record as written

    @property
    def downsampled(self) -> bool:
        return self.width > 1

    def __len__(self) -> int:
        return len(self.steps)


def _reduce(values: np.ndarray, bounds: np.ndarray):
    """min, max, sum, finite count, missing count of each segment [bounds[2i], bounds[2i+1]) of values.

    Segments are sorted, non-empty and do not overlap; null/NaN/inf count as missing.
    """
    starts, ends = bounds[0::2], bounds[1::2]
    cut = np.unique(bounds[bounds < len(values)])
    at = np.searchsorted(cut, starts)
    finite = np.isfinite(values)
    low = np.minimum.reduceat(np.where(finite, values, np.inf), cut)[at]
    high = np.maximum.reduceat(np.where(finite, values, -np.inf), cut)[at]
    total = np.add.reduceat(np.where(finite, values, 0.0), cut)[at]
    count = np.add.reduceat(finite.astype(np.int64), cut)[at]
    return low, high, total, count.astype(np.float64), (ends - starts - count).astype(np.float64)


class StepBuffer:
    def __init__(self, max_buckets: int = MAX_BUCKETS, capacity: int = 1024):
        self.max_buckets = max_buckets
        self.n = 0
        self.step = np.zeros(capacity, np.int64)
        self.cols = {k: np.full(capacity, np.nan) for k in STEP_COLUMNS}
        self.width = 1
        self.nb = 0  # buckets in use: bucket b holds steps [b*width, (b+1)*width)
        self.rows = np.zeros(0, np.int64)  # records per bucket
        self.stats = {k: np.zeros((5, 0)) for k in BUCKET_KEYS}  # min, max, sum, finite, missing
        self.version = 0  # bumped by every change
        self._ema: dict = {}  # (key, weight) -> (raw EMA per row, finite count per row, rows valid)

    # ------------------------------------------------------------------ writing
    def __len__(self) -> int:
        return self.n

    def column(self, key: str) -> np.ndarray:
        return self.step[: self.n] if key == "step" else self.cols[key][: self.n]

    def last(self, key: str) -> Optional[float]:
        """The newest finite value of a column, or None."""
        values = self.cols[key][: self.n]
        finite = np.flatnonzero(np.isfinite(values[-1000:]))
        return float(values[-1000:][finite[-1]]) if len(finite) else None

    def _reserve(self, size: int) -> None:
        if size <= len(self.step):
            return
        cap = max(size, 2 * len(self.step))
        step = np.zeros(cap, np.int64)
        step[: self.n] = self.step[: self.n]
        self.step = step
        for k, col in self.cols.items():
            grown = np.empty(cap)
            grown[: self.n] = col[: self.n]
            self.cols[k] = grown

    def add(self, chunk: Chunk) -> int:
        """Merge step records (any order, duplicates allowed: the later one wins); returns rows touched."""
        if not len(chunk):
            return 0
        steps, cols = chunk.steps, chunk.columns
        if len(steps) > 1 and not (steps[1:] > steps[:-1]).all():
            # the last occurrence of each step inside the chunk wins
            unique, rev_first = np.unique(steps[::-1], return_index=True)
            pick = len(steps) - 1 - rev_first
            steps, cols = unique, {k: v[pick] for k, v in cols.items()}
        written = steps
        first_changed = self.n
        last = self.step[self.n - 1] if self.n else np.iinfo(np.int64).min
        old = steps <= last
        if old.any():
            first_changed = self._merge_old(steps[old], {k: v[old] for k, v in cols.items()})
            steps, cols = steps[~old], {k: v[~old] for k, v in cols.items()}
        if len(steps):
            self._reserve(self.n + len(steps))
            end = self.n + len(steps)
            self.step[self.n:end] = steps
            for k in STEP_COLUMNS:
                self.cols[k][self.n:end] = cols[k]
            first_changed = min(first_changed, self.n)
            self.n = end
        self._drop_ema_from(first_changed)
        self._grow_buckets(int(self.step[self.n - 1]) // self.width + 1)
        self._refresh_buckets(np.unique(written // self.width))
        self.version += 1
        return len(written)

    def _merge_old(self, steps: np.ndarray, cols: dict) -> int:
        """Steps at or before the newest one: overwrite rows that exist, insert the others."""
        have = self.step[: self.n]
        pos = np.searchsorted(have, steps)
        exists = (pos < self.n) & (have[np.minimum(pos, self.n - 1)] == steps)
        for k in STEP_COLUMNS:
            self.cols[k][pos[exists]] = cols[k][exists]
        first = int(pos.min())
        if (~exists).any():  # a step missing in the middle: rebuild the columns in order (rare)
            new_steps = np.concatenate([have, steps[~exists]])
            order = np.argsort(new_steps, kind="stable")
            merged = {k: np.concatenate([self.cols[k][: self.n], cols[k][~exists]])[order] for k in STEP_COLUMNS}
            self.n = 0
            self._reserve(len(new_steps))
            self.step[: len(new_steps)] = new_steps[order]
            for k in STEP_COLUMNS:
                self.cols[k][: len(new_steps)] = merged[k]
            self.n = len(new_steps)
        return first

    # ------------------------------------------------------------------ buckets
    def _grow_buckets(self, needed: int) -> None:
        while needed > self.max_buckets:  # twice as wide: merge neighbouring pairs
            if self.nb % 2:
                self._pad_buckets(self.nb + 1)
            self.rows = self.rows.reshape(-1, 2).sum(axis=1)
            for k, s in self.stats.items():
                pairs = s.reshape(5, -1, 2)
                self.stats[k] = np.stack([pairs[0].min(axis=1), pairs[1].max(axis=1), pairs[2].sum(axis=1),
                                          pairs[3].sum(axis=1), pairs[4].sum(axis=1)])
            self.nb //= 2
            self.width *= 2
            needed = (needed + 1) // 2
        if needed > self.nb:
            self._pad_buckets(needed)

    def _pad_buckets(self, nb: int) -> None:
        extra = nb - self.nb
        self.rows = np.concatenate([self.rows, np.zeros(extra, np.int64)])
        empty = np.array([[np.inf], [-np.inf], [0.0], [0.0], [0.0]]).repeat(extra, axis=1)
        for k in self.stats:
            self.stats[k] = np.concatenate([self.stats[k], empty], axis=1)
        self.nb = nb

    def _refresh_buckets(self, buckets: np.ndarray) -> None:
        """Recompute the given buckets from the columns."""
        buckets = buckets[(buckets >= 0) & (buckets < self.nb)]
        if not len(buckets):
            return
        have = self.step[: self.n]
        starts = np.searchsorted(have, buckets * self.width)
        ends = np.searchsorted(have, (buckets + 1) * self.width)
        self.rows[buckets] = ends - starts
        full = ends > starts
        buckets, starts, ends = buckets[full], starts[full], ends[full]
        if not len(buckets):
            return
        lo_row, hi_row = int(starts[0]), int(ends[-1])
        bounds = np.stack([starts, ends], axis=1).ravel() - lo_row
        for k in BUCKET_KEYS:
            self.stats[k][:, buckets] = np.stack(_reduce(self.cols[k][lo_row:hi_row], bounds))

    # ------------------------------------------------------------------ reading
    def series(self, key: str) -> Series:
        """The whole run as at most `max_buckets` points (every record when the run is short)."""
        if self.width == 1:
            return self._raw(key, 0, self.n)
        if key not in self.stats:
            return self.window(key, int(self.step[0]), int(self.step[self.n - 1]), self.max_buckets)
        full = np.flatnonzero(self.rows[: self.nb] > 0)
        s = self.stats[key][:, full]
        return self._bucket_series(full, s, self.width)

    def _bucket_series(self, buckets: np.ndarray, s: np.ndarray, width: int, base: int = 0) -> Series:
        have = self.step[: self.n]
        starts = np.searchsorted(have, base + buckets * width)
        ends = np.searchsorted(have, base + (buckets + 1) * width)
        mid = (starts + ends - 1) // 2
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(s[3] > 0, s[2] / np.maximum(s[3], 1), np.nan)
        low = np.where(s[3] > 0, s[0], np.nan)
        high = np.where(s[3] > 0, s[1], np.nan)
        return Series(have[mid], mid, low, high, mean, s[4].astype(np.int64), width)

    def _raw(self, key: str, start: int, end: int) -> Series:
        values = self.cols[key][start:end]
        finite = np.isfinite(values)
        shown = np.where(finite, values, np.nan)
        return Series(self.step[start:end].copy(), np.arange(start, end), shown, shown, shown,
                      (~finite).astype(np.int64), 1)

    def window(self, key: str, lo_step: int, hi_step: int, max_points: Optional[int] = None) -> Series:
        """Steps lo..hi (inclusive) read from the columns: every record, or finer buckets if too many."""
        max_points = max_points or self.max_buckets
        have = self.step[: self.n]
        start, end = int(np.searchsorted(have, lo_step)), int(np.searchsorted(have, hi_step, side="right"))
        if end - start <= max_points:
            return self._raw(key, start, end)
        span = int(have[end - 1]) - int(have[start]) + 1
        width = 1 << int(np.ceil(np.log2(max(1.0, span / max_points))))
        base = int(have[start])
        rel = have[start:end] - base
        bucket_of = rel // width
        cut = np.flatnonzero(np.r_[True, bucket_of[1:] != bucket_of[:-1]])
        buckets = bucket_of[cut]
        bounds = np.stack([cut, np.r_[cut[1:], end - start]], axis=1).ravel()
        return self._bucket_series(buckets, np.stack(_reduce(self.cols[key][start:end], bounds)), width, base)

    # ------------------------------------------------------------------ smoothing
    def _drop_ema_from(self, row: int) -> None:
        for key in list(self._ema):
            raw, count, valid = self._ema[key]
            self._ema[key] = (raw, count, min(valid, row))

    def ema(self, key: str, weight: float, rows: np.ndarray) -> np.ndarray:
        """TensorBoard's bias-corrected EMA of a column at the given rows (NaN where the value is)."""
        if weight <= 0:
            v = self.cols[key][rows]
            return np.where(np.isfinite(v), v, np.nan)
        cache_key = (key, round(float(weight), 6))
        raw, count, valid = self._ema.get(cache_key, (np.zeros(0), np.zeros(0, np.int64), 0))
        if valid < self.n:
            raw, count = self._extend_ema(key, weight, raw, count, valid)
            for other in [k for k in self._ema if k[0] == key and k != cache_key]:
                del self._ema[other]  # one weight per column is kept
            self._ema[cache_key] = (raw, count, self.n)
        values = self.cols[key][rows]
        n = count[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = raw[rows] / (1.0 - weight ** n)
        return np.where(np.isfinite(values) & (n > 0), out, np.nan)

    def _extend_ema(self, key: str, weight: float, raw: np.ndarray, count: np.ndarray, valid: int):
        if len(raw) < len(self.step):
            raw = np.concatenate([raw[:valid], np.zeros(len(self.step) - valid)])
            count = np.concatenate([count[:valid], np.zeros(len(self.step) - valid, np.int64)])
        prev, n0 = (float(raw[valid - 1]), int(count[valid - 1])) if valid else (0.0, 0)
        values = self.cols[key][valid: self.n]
        finite = np.isfinite(values)
        smoothed = ema_raw(values[finite], weight, prev)
        # rows with a missing value carry the previous state forward
        filled = np.full(len(values), prev)
        positions = np.flatnonzero(finite)
        filled[positions] = smoothed
        carry = np.maximum.accumulate(np.where(finite, np.arange(len(values)), -1))
        filled = np.where(carry >= 0, filled[np.maximum(carry, 0)], prev)
        raw[valid: self.n] = filled
        count[valid: self.n] = n0 + np.cumsum(finite)
        return raw, count


def ema_raw(x: np.ndarray, weight: float, start: float = 0.0) -> np.ndarray:
    """e_t = weight * e_{t-1} + (1 - weight) * x_t from e_{-1} = start, in blocks (vectorised)."""
    n = len(x)
    if n == 0:
        return np.zeros(0)
    size = EMA_BLOCK
    blocks = -(-n // size)
    padded = np.zeros(blocks * size)
    padded[:n] = x
    powers = weight ** np.arange(size + 1)
    t = np.arange(size)
    lower = t[:, None] >= t[None, :]
    mix = np.where(lower, (1 - weight) * powers[np.abs(t[:, None] - t[None, :])], 0.0)
    local = padded.reshape(blocks, size) @ mix.T  # each block started from 0
    carry_in = np.empty(blocks)
    c = start
    ends = local[:, -1]
    decay = powers[size]
    for b in range(blocks):  # one scalar recurrence per block of EMA_BLOCK values
        carry_in[b] = c
        c = ends[b] + decay * c
    out = local + carry_in[:, None] * powers[1:][None, :]
    return out.ravel()[:n]
