"""The Live page's columnar step buffer: incremental downsampling that keeps spikes and NaNs visible,
last-write-wins on resumed runs, full-resolution windows, EMA, and a 1M-step run in the engine's format."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dashboard import charts, metrics_columns, series, step_buffer
from engine import runs
from engine.tracking import JsonlWriter, MetricsRecorder

RNG = np.random.default_rng(7)


def _chunk(steps, loss) -> metrics_columns.Chunk:
    steps = np.asarray(steps, np.int64)
    cols = {k: np.full(len(steps), np.nan) for k in metrics_columns.STEP_COLUMNS}
    cols["loss"] = np.asarray(loss, float)
    cols["time"] = steps * 2.0
    return metrics_columns.Chunk(steps, cols, [])


def _stats_from_scratch(buf: step_buffer.StepBuffer, key: str) -> np.ndarray:
    steps, values = buf.column("step"), buf.column(key)
    out = []
    for b in np.flatnonzero(buf.rows[: buf.nb]):
        v = values[(steps >= b * buf.width) & (steps < (b + 1) * buf.width)]
        f = v[np.isfinite(v)]
        out.append([f.min() if len(f) else np.inf, f.max() if len(f) else -np.inf, f.sum(), len(f), len(v) - len(f)])
    return np.array(out).T


def test_incremental_buckets_equal_a_fresh_computation_and_stay_bounded():
    buf = step_buffer.StepBuffer(max_buckets=64)
    loss = RNG.random(5000)
    loss[RNG.choice(5000, 40, replace=False)] = np.nan
    start = 0
    while start < 5000:  # polls of random size
        n = int(RNG.integers(1, 300))
        buf.add(_chunk(np.arange(start + 1, start + n + 1)[: 5000 - start], loss[start:start + n]))
        start += n
    assert len(buf) == 5000 and buf.nb <= 64 and buf.width == 128
    expected = _stats_from_scratch(buf, "loss")
    got = buf.stats["loss"][:, np.flatnonzero(buf.rows[: buf.nb])]
    np.testing.assert_allclose(got, expected)
    s = buf.series("loss")
    assert len(s) <= 64 and s.downsampled and int(s.missing.sum()) == 40


def test_resumed_steps_overwrite_so_curves_never_zigzag():
    buf = step_buffer.StepBuffer(max_buckets=16)
    buf.add(_chunk(range(1, 101), np.ones(100)))
    buf.add(_chunk(range(60, 121), np.full(61, 2.0)))  # a resume from the step-59 checkpoint
    steps = buf.column("step")
    assert list(steps) == list(range(1, 121))
    assert (buf.column("loss")[:59] == 1).all() and (buf.column("loss")[59:] == 2).all()
    buf.add(_chunk([5, 5, 130], [7.0, 8.0, 3.0]))  # duplicates inside one poll: the later wins
    assert buf.column("loss")[4] == 8.0 and buf.column("step")[-1] == 130
    np.testing.assert_allclose(buf.stats["loss"][:, np.flatnonzero(buf.rows[: buf.nb])],
                               _stats_from_scratch(buf, "loss"))


def test_a_missing_step_in_the_middle_is_inserted_in_order():
    buf = step_buffer.StepBuffer()
    buf.add(_chunk([1, 2, 4, 5], [1, 2, 4, 5]))
    buf.add(_chunk([3], [3]))
    assert list(buf.column("step")) == [1, 2, 3, 4, 5] and list(buf.column("loss")) == [1, 2, 3, 4, 5]


def test_window_rereads_full_resolution():
    buf = step_buffer.StepBuffer(max_buckets=32)
    loss = RNG.random(10_000)
    buf.add(_chunk(np.arange(1, 10_001), loss))
    w = buf.window("loss", 5000, 5020)
    assert not w.downsampled and list(w.steps) == list(range(5000, 5021))
    np.testing.assert_array_equal(w.mean, loss[4999:5020])
    coarse = buf.window("loss", 1, 10_000, max_points=100)
    assert coarse.downsampled and len(coarse) <= 100
    assert coarse.high.max() == loss.max() and coarse.low.min() == loss.min()


def test_ema_matches_the_reference_and_extends_incrementally():
    values = RNG.random(3000)
    values[[10, 11, 500]] = np.nan
    buf = step_buffer.StepBuffer()
    buf.add(_chunk(np.arange(1, 1001), values[:1000]))
    rows = np.arange(1000)
    np.testing.assert_allclose(buf.ema("loss", 0.9, rows), np.array(series.ema(list(values[:1000]), 0.9), float),
                               equal_nan=True, rtol=1e-9)
    buf.add(_chunk(np.arange(1001, 3001), values[1000:]))
    rows = np.arange(3000)
    expected = np.array(series.ema(list(values), 0.99), float)
    np.testing.assert_allclose(buf.ema("loss", 0.99, rows), expected, equal_nan=True, rtol=1e-9)


def test_metrics_file_reads_complete_lines_and_survives_bad_ones(tmp_path):
    path = tmp_path / runs.METRICS_FILE
    good = [json.dumps({"type": "step", "step": i, "epoch": 1, "loss": 1.0 / i}) for i in range(1, 4)]
    path.write_text(good[0] + "\n" + '{"type": "step", "step": 2, "lo{"type": "step"}\n' + good[2] + "\n" + '{"type": "st')
    reader = metrics_columns.MetricsFile(path)
    chunk = reader.read_new()
    assert list(chunk.steps) == [1, 3]  # the glued line is skipped, the half line not consumed
    with open(path, "a") as fh:
        fh.write('ep", "step": 4, "epoch": 1, "loss": 0.25}\n')
    assert list(reader.read_new().steps) == [4]
    assert not len(reader.read_new())


# ----------------------------------------------------------------------------- a 1M-step run
N_STEPS = 1_000_000
SPIKE_STEP, NAN_STEP = 654_321, 876_543


def _line(step: int, t: float, loss: float) -> str:
    """One step record exactly as JsonlWriter writes MetricsRecorder's record (checked below)."""
    return (f'{{"type": "step", "step": {step}, "epoch": {(step - 1) // 18000 + 1}, "time": {t!r}, "loss": {loss!r}, '
            f'"loss_classifier": {loss * 0.4!r}, "loss_box_reg": {loss * 0.3!r}, "loss_objectness": {loss * 0.2!r}, '
            f'"loss_rpn_box_reg": {loss * 0.1!r}, "lr": 0.01, "grad_norm": 1.5, "images_per_s": 30.0, '
            f'"data_time_s": 0.01, "amp_scale": null, "gpu_mem_peak_mb": null}}\n')


def _record(rec: MetricsRecorder, step: int, loss: float) -> dict:
    return rec.record_step(step, (step - 1) // 18000 + 1, loss=loss, loss_classifier=loss * 0.4,
                           loss_box_reg=loss * 0.3, loss_objectness=loss * 0.2, loss_rpn_box_reg=loss * 0.1,
                           lr=0.01, grad_norm=1.5, images_per_s=30.0, data_time_s=0.01)


@pytest.fixture(scope="module")
def million_step_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "big"
    run.mkdir()
    path = run / runs.METRICS_FILE
    recorder = MetricsRecorder([JsonlWriter(path)])
    first = [_record(recorder, s, 0.5 + 0.001 * s) for s in (1, 2)]
    written = path.read_text().splitlines(keepends=True)
    assert written == [_line(r["step"], r["time"], r["loss"]) for r in first]  # the bulk lines are the engine's
    loss = 0.5 + 0.1 * np.random.default_rng(0).random(N_STEPS)
    loss[SPIKE_STEP - 1] *= 100
    t0 = first[-1]["time"]
    with open(path, "a", encoding="utf-8") as fh:
        lines = []
        for step in range(3, N_STEPS + 1):
            if step == NAN_STEP:
                continue
            lines.append(_line(step, t0 + step * 0.5, float(loss[step - 1])))
            if len(lines) == 100_000:
                fh.write("".join(lines))
                lines = []
        fh.write("".join(lines))
    _record(recorder, NAN_STEP, float("nan"))  # NaN is logged as null; a late line for an earlier step
    runs.atomic_write_json(run / runs.STATUS_FILE, {"state": "completed", "steps_per_epoch": 18000})
    return run


@pytest.fixture(scope="module")
def million_step_tail(million_step_run) -> series.RunTail:
    tail = series.RunTail(million_step_run)
    assert tail.poll()
    return tail


def test_a_one_step_spike_and_a_nan_in_a_million_steps_stay_visible(million_step_tail):
    tail = million_step_tail
    assert len(tail.buffer) == N_STEPS
    fig = charts.loss_figure([tail], "step", 0.6, log_y=False, key="loss")
    band_high = next(t for t in fig.data if t.fill == "tonexty")
    assert len(band_high.x) <= step_buffer.MAX_BUCKETS
    top = int(np.argmax(band_high.y))
    width = tail.buffer.width
    assert band_high.y[top] > 40  # the spike (~50) stands out of a 0.5-0.6 curve
    assert abs(int(band_high.x[top]) - SPIKE_STEP) < width
    nan_marks = next(t for t in fig.data if t.name.endswith("NaN/inf"))
    assert len(nan_marks.x) == 1 and abs(int(nan_marks.x[0]) - NAN_STEP) < width
    assert charts.freeze(fig).json_bytes < 1_000_000
    zoom = charts.loss_figure([tail], "step", 0.0, log_y=False, step_range=(SPIKE_STEP - 50, SPIKE_STEP + 50))
    [line] = [t for t in zoom.data if t.mode == "lines"]
    assert len(line.x) == 101 and float(max(line.y)) == pytest.approx(float(np.float32(max(line.y))))
    assert int(line.x[int(np.argmax(line.y))]) == SPIKE_STEP


def test_a_poll_after_a_million_steps_reads_only_what_is_new(million_step_run, million_step_tail):
    tail = million_step_tail  # runs after the spike test (file order): it appends to the shared run
    offset = tail.file.offset
    assert not tail.poll()  # nothing new: no read at all
    with open(million_step_run / runs.METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write("".join(_line(s, 0.0, 0.1) for s in range(N_STEPS + 1, N_STEPS + 81)))
    version = tail.version
    assert tail.poll() and tail.version > version
    assert len(tail.buffer) == N_STEPS + 80 and tail.file.offset > offset
    csv = series.step_csv(tail)
    assert csv.count(b"\n") == N_STEPS + 81
    assert math.isclose(float(csv.splitlines()[-1].split(b",")[3]), 0.1)


def test_a_large_file_with_a_glued_line_keeps_every_good_record(tmp_path):
    path = tmp_path / runs.METRICS_FILE
    lines = [json.dumps({"type": "step", "step": i, "epoch": 1, "loss": 1.0, "pad": "x" * 300}) + "\n"
             for i in range(1, 30_001)]
    lines[15_000] = lines[15_000][:40] + lines[15_001]  # a crash mid-line, then the resumed writer's line
    path.write_text("".join(lines))
    assert path.stat().st_size > metrics_columns.CHUNK_BYTES  # the memory-mapped first load
    chunk = metrics_columns.MetricsFile(path).read_new()
    assert len(chunk) == 29_999 and 15_001 not in set(chunk.steps.tolist())


def test_uncharted_columns_are_bucketed_on_demand():
    buf = step_buffer.StepBuffer(max_buckets=16)
    chunk = _chunk(np.arange(1, 1001), RNG.random(1000))
    chunk.columns["data_time_s"] = np.arange(1000.0)
    buf.add(chunk)
    s = buf.series("data_time_s")
    assert len(s) <= 16 and s.high.max() == 999.0 and s.low.min() == 0.0


def test_a_box_on_any_x_axis_maps_back_to_steps(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [json.dumps({"type": "step", "step": s, "epoch": 1, "time": 1000.0 + s, "loss": 1.0}) for s in range(1, 101)]
    (run / runs.METRICS_FILE).write_text("\n".join(lines) + "\n")
    runs.atomic_write_json(run / runs.STATUS_FILE, {"state": "completed", "steps_per_epoch": 10})
    tail = series.RunTail(run)
    tail.poll()
    assert series.steps_in_x_range(tail, "step", 20.4, 30.2) == (21, 30)
    assert series.steps_in_x_range(tail, "epoch", 5.0, 2.0) == (20, 50)
    local = lambda t: (t + __import__("time").localtime().tm_gmtoff) * 1000.0  # the chart's date x (ms, local)
    assert series.steps_in_x_range(tail, "wall time", local(1010.0), local(1019.5)) == (10, 19)
    as_text = lambda t: __import__("datetime").datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    assert series.steps_in_x_range(tail, "wall time", as_text(1010.0), as_text(1019.5)) == (10, 19)
    assert series.steps_in_x_range(tail, "step", "bad", 3) is None
