"""`scripts/benchmark.py --only perf`: issue 9's numbers, each next to an anchor measured in the same run.

Live page    metrics.jsonl files of 1k / 100k / 1M step records in the engine's format (the first
             records come from engine.tracking's MetricsRecorder + JsonlWriter, the rest are the same
             lines written in bulk); first load vs TensorBoard's EventAccumulator and pandas on the
             same scalars; a poll after 80 new records; rebuilding the six figures; their JSON size;
             a refresh that finds nothing new.
Evaluation   1,640 images x ~100k detections (boxes jittered from the real plates' annotations):
             faster-coco-eval vs pycocotools (all 12 stats compared), plus the vectorised matching.
Predict      a 12-MP JPEG (a real photo upscaled, EXIF orientation 6) with the 800 model (weights
             none: speed does not depend on them): upload-to-boxes and a slider move vs the bare
             model forward on the decoded full-size image.
Training     our loop (engine.train) with tracking on (JSONL, TensorBoard, status heartbeat, probes) and off, vs
             scripts/plain_loop.py over the same model, data and batch.
Browser      scripts/browser_bench.py: five Chromium tabs on the Live page of a live 18k-step run next to
             a real trainer, metric-to-screen, every page's time to idle (needs Chromium).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import runs  # noqa: E402
from engine.tracking import JsonlWriter, MetricsRecorder, TensorBoardWriter  # noqa: E402

Row = tuple[str, str, str]
STEPS_PER_EPOCH = 18_000
CMD = "python scripts/benchmark.py --only perf"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- metrics files
def _step_scalars(step: int, loss: float) -> dict:
    return dict(loss=loss, loss_classifier=loss * 0.4, loss_box_reg=loss * 0.3, loss_objectness=loss * 0.2,
                loss_rpn_box_reg=loss * 0.1, lr=0.01, grad_norm=1.5, images_per_s=30.0, data_time_s=0.01)


def _line(step: int, t: float, loss: float, steps_per_epoch: int = STEPS_PER_EPOCH) -> str:
    s = _step_scalars(step, loss)
    return (f'{{"type": "step", "step": {step}, "epoch": {(step - 1) // steps_per_epoch + 1}, "time": {t!r}, '
            f'"loss": {s["loss"]!r}, "loss_classifier": {s["loss_classifier"]!r}, "loss_box_reg": {s["loss_box_reg"]!r}, '
            f'"loss_objectness": {s["loss_objectness"]!r}, "loss_rpn_box_reg": {s["loss_rpn_box_reg"]!r}, "lr": 0.01, '
            f'"grad_norm": 1.5, "images_per_s": 30.0, "data_time_s": 0.01, "amp_scale": null, "gpu_mem_peak_mb": null}}\n')


def write_run(run_dir: Path, n_steps: int, tensorboard: bool = False, steps_per_epoch: int = STEPS_PER_EPOCH) -> None:
    """A run folder with n_steps step records and an epoch record every `steps_per_epoch` steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / runs.METRICS_FILE
    writers = [JsonlWriter(path)] + ([TensorBoardWriter(run_dir)] if tensorboard else [])
    recorder = MetricsRecorder(writers)
    rng = np.random.default_rng(0)
    loss = 0.5 + 0.1 * rng.random(n_steps)
    t0 = time.time() - n_steps * 0.5
    if tensorboard:  # every record through the engine's writers (slow: TensorBoard)
        for step in range(1, n_steps + 1):
            recorder.record_step(step, (step - 1) // steps_per_epoch + 1, **_step_scalars(step, float(loss[step - 1])))
            if step % steps_per_epoch == 0:
                recorder.record_epoch(step // steps_per_epoch, step, train_loss=0.5, val_map50=0.8, val_map50_95=0.4,
                                      val_precision=0.9, val_recall=0.8, val_f1=0.85, lr=0.01, epoch_time_s=60.0)
        recorder.close()
    else:
        first = recorder.record_step(1, 1, **_step_scalars(1, float(loss[0])))
        assert path.read_text() == _line(1, first["time"], first["loss"], steps_per_epoch), \
            "bulk lines differ from the engine's"
        with open(path, "a", encoding="utf-8") as fh:
            lines = []
            for step in range(2, n_steps + 1):
                lines.append(_line(step, t0 + step * 0.5, float(loss[step - 1]), steps_per_epoch))
                if step % steps_per_epoch == 0:
                    fh.write("".join(lines))
                    lines = []
                    fh.flush()
                    recorder.record_epoch(step // steps_per_epoch, step, train_loss=0.5, val_map50=0.8,
                                          val_map50_95=0.4, val_precision=0.9, val_recall=0.8, val_f1=0.85,
                                          lr=0.01, epoch_time_s=60.0)
            fh.write("".join(lines))
    runs.StatusWriter(run_dir).update(state="running", steps_per_epoch=steps_per_epoch, epochs=50)


def _append(run_dir: Path, first_step: int, n: int) -> None:
    with open(run_dir / runs.METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write("".join(_line(s, time.time(), 0.4) for s in range(first_step, first_step + n)))


# ----------------------------------------------------------------------------- live page
def bench_live(work: Path, tb_steps: int) -> list[Row]:
    from dashboard import live_api, live_figures, series
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import pandas as pd
    import plotly.io as pio

    rows: list[Row] = []
    view = live_figures.View("step", 0.6, False, None)
    polls = {}
    for n in (1_000, 100_000, 1_000_000):
        run = work / f"live-{n}"
        write_run(run, n)
        size_mb = (run / runs.METRICS_FILE).stat().st_size / 2**20
        cache = live_figures.LiveCache(min_rebuild_s=0)  # every rebuild measured
        t0 = time.perf_counter()
        tail = cache.tail(run)
        tail.poll()
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.figures([tail], view)
        first_figs = time.perf_counter() - t0
        times, builds, sizes = [], [], []
        next_step = n + 1
        for _ in range(5):
            _append(run, next_step, 80)
            next_step += 80
            t0 = time.perf_counter()
            tail.poll()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            figs, rebuilt = cache.figures([tail], view)
            builds.append(time.perf_counter() - t0)
            assert rebuilt
            sizes.append(sum(f.json_bytes for f in figs.values() if f is not None))
        polls[n] = statistics.median(times)

        def idle_refresh():
            tail.poll()
            figs, rebuilt = cache.figures([tail], view)
            assert not rebuilt
            for f in figs.values():  # what st.plotly_chart does with each figure
                if f is not None:
                    pio.to_json(f.to_dict(), validate=False)
        idle = _median_time(idle_refresh, 20)
        token = live_api.register([run], view)
        live_api.payload(token)  # the endpoint's own cache reads the run and builds its figures once
        endpoint = {slow: _median_time(lambda: live_api.payload(token, slow), 20) for slow in (False, True)}
        label = f"{n:,} steps ({size_mb:.0f} MB)"
        rows.append((f"Live, {label}: first load (read + columns + buckets)", _ms(load), CMD))
        rows.append((f"Live, {label}: first build of the six figures (EMA of every column)", _ms(first_figs), CMD))
        rows.append((f"Live, {label}: poll after 80 new records (median of 5)", _ms(polls[n]), CMD))
        rows.append((f"Live, {label}: rebuilding the six figures after new records", _ms(statistics.median(builds)), CMD))
        rows.append((f"Live, {label}: figure JSON per refresh", f"{statistics.median(sizes) / 1e6:.2f} MB", CMD))
        rows.append((f"Live, {label}: a refresh with no new record (poll + cached figures + JSON)", _ms(idle), CMD))
        rows.append((f"Live, {label}: the live endpoint's answer with no new record (3-s poll / 15-s poll)",
                     f"{endpoint[False] * 1000:.2f} ms / {endpoint[True] * 1000:.2f} ms", CMD))
        if n == 100_000:
            t0 = time.perf_counter()
            pd.read_json(run / runs.METRICS_FILE, lines=True)
            rows.append((f"anchor: pandas.read_json(lines=True) of the {label} file", _ms(time.perf_counter() - t0), CMD))
        if n == 1_000_000:
            flat = polls[1_000_000] / max(polls[1_000], 1e-9)
            rows.append(("Live: poll cost 1M vs 1k steps (flat = about 1x)", f"{flat:.2f}x", CMD))
        shutil.rmtree(run)
    tb_run = work / "tb"
    t0 = time.perf_counter()
    write_run(tb_run, tb_steps, tensorboard=True)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = EventAccumulator(str(tb_run), size_guidance={"scalars": 0})
    acc.Reload()
    tb_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tail = series.RunTail(tb_run)
    tail.poll()
    ours = time.perf_counter() - t0
    rows.append((f"anchor: TensorBoard EventAccumulator, {tb_steps:,} steps x {len(acc.Tags()['scalars'])} tags "
                 f"(written by the engine's writers in {write_s:.0f} s)", _ms(tb_s), CMD))
    rows.append((f"Live first load of the same {tb_steps:,}-step run", f"{_ms(ours)} ({ours / tb_s:.3f}x TensorBoard)", CMD))
    shutil.rmtree(tb_run)
    return rows


# ----------------------------------------------------------------------------- evaluation
def _eval_case(plates_real: Path, n_images: int = 1640, dets_per_image: int = 61):
    """Ground truth from the real annotations (cycled), detections jittered from it plus false positives."""
    from engine.data import load_split

    records = [r for split in ("train", "valid", "test") for r in load_split(plates_real, split).images]
    rng = np.random.default_rng(0)
    gts, preds = [], []
    for i in range(n_images):
        r = records[i % len(records)]
        boxes = r.boxes.astype(np.float64)
        gts.append({"image_id": i + 1, "boxes": boxes, "width": r.width, "height": r.height})
        det = [b + rng.normal(0, 0.1, 4) * np.r_[b[2] - b[0], b[3] - b[1], b[2] - b[0], b[3] - b[1]]
               for b in boxes if rng.random() < 0.9]
        while len(det) < dets_per_image:
            xy = rng.uniform(0, [r.width - 20, r.height - 10])
            det.append(np.r_[xy, xy + rng.uniform([10, 5], [150, 60])])
        det = np.array(det)
        scores = np.r_[rng.uniform(0.5, 1.0, len(boxes)), rng.uniform(0.0, 0.7, len(det) - len(boxes))][: len(det)]
        preds.append({"image_id": i + 1, "boxes": det, "scores": scores})
    return gts, preds


def bench_eval(plates_real: Path) -> list[Row]:
    from engine import metrics

    gts, preds = _eval_case(plates_real)
    n_det = sum(len(p["scores"]) for p in preds)
    t0 = time.perf_counter()
    ref = metrics.coco_stats(gts, preds, backend="pycocotools")
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = metrics.coco_stats(gts, preds, backend="faster")
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matches = metrics.match_detections(gts, preds)
    match_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics.prf_at_threshold(gts, preds, 0.5, matches=matches)
    metrics.best_f1(gts, preds, matches=matches)
    metrics.pr_curve(gts, preds, matches=matches)
    metrics.prf_vs_confidence(gts, preds, matches=matches)
    curves_s = time.perf_counter() - t0
    what = f"{len(gts):,} images x {n_det:,} detections"
    diff = float(np.max(np.abs(fast - ref)))
    return [
        (f"anchor: pycocotools COCOeval (evaluate + accumulate + summarize), {what}", _ms(ref_s), CMD),
        (f"faster-coco-eval, same input", f"{_ms(fast_s)} ({fast_s / ref_s:.3f}x pycocotools)", CMD),
        ("faster-coco-eval vs pycocotools: largest difference over the 12 stats", f"{diff:.1e} (AP50 {ref[1]:.4f})", CMD),
        (f"vectorised greedy matching (one pass), {what}", f"{_ms(match_s)} ({match_s / ref_s:.3f}x pycocotools)", CMD),
        ("P/R/F1 at threshold, best F1, PR curve, P/R/F1 vs confidence from that matching", _ms(curves_s), CMD),
    ]


# ----------------------------------------------------------------------------- predict page
def _phone_photo(plates_real: Path, out: Path) -> bytes:
    from PIL import Image

    src = sorted((plates_real / "test").glob("*.jpg"))[0]
    upright = Image.open(src).convert("RGB").resize((4000, 3000), Image.BICUBIC)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's pixels ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... plus the rotation a viewer applies to show the photo upright
    stored.save(out, format="JPEG", quality=90, exif=exif.tobytes())
    return out.read_bytes()


def bench_predict(plates_real: Path, work: Path) -> list[Row]:
    import torch

    from dashboard import predict_view as pv
    from engine.checkpoint import FORMAT, save_checkpoint
    from engine.config import config_from_dict
    from engine.model import build_model
    from engine.predict import Predictor, draw_boxes, image_to_tensor, load_image

    cfg = config_from_dict({"model": {"name": "fasterrcnn_mobilenet_v3_large_fpn", "weights": "none"},
                            "input": {"train_sizes": [800], "test_size": 800, "max_size": 1333}, "train": {"amp": False}})
    ckpt = work / "m800" / "best.pth"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, {"format": FORMAT, "model": build_model(cfg).state_dict(), "epoch": 1, "global_step": 1,
                           "best": {"epoch": 1, "map50": 0.0}, "config": cfg.to_dict(), "run": "m800"})
    predictor = Predictor(ckpt, device="cpu")
    data = _phone_photo(plates_real, work / "phone.jpg")
    full = load_image(data)
    tensor = image_to_tensor(full)

    def bare_forward():
        with torch.inference_mode():
            predictor.model([tensor])
    bare_forward()  # warm-up
    bare = _median_time(bare_forward, 3)
    decode_full = _median_time(lambda: load_image(data), 3)
    transform = predictor.model.transform
    state = {}

    def upload_to_boxes():
        photo = pv.decode_photo(data, "phone.jpg", int(predictor.test_size), int(transform.max_size))
        pred = pv.predict_photo(predictor, photo)
        pv.display_jpeg(photo, pred, 0.5)
        state["photo"], state["pred"] = photo, pred
    upload = _median_time(upload_to_boxes, 3)
    slider = _median_time(lambda: pv.display_jpeg(state["photo"], state["pred"], 0.3), 5)

    def old_page():  # the page before: full decode, model on the full-size image, full-size PNG per rerun
        image = load_image(data)
        pred = predictor.predict(image)
        pv.png_bytes(draw_boxes(image, pred["boxes"], pred["scores"], 0.5))
    old = _median_time(old_page, 1)

    def old_slider():
        pv.png_bytes(draw_boxes(full, state["pred"]["boxes"], state["pred"]["scores"], 0.3))
    old_sl = _median_time(old_slider, 1)
    w, h = full.size
    return [
        (f"anchor: bare forward of the 800 model on the decoded {w}x{h} photo (CPU)", _ms(bare), CMD),
        ("anchor: full decode of the 12-MP JPEG (PIL, EXIF applied)", _ms(decode_full), CMD),
        ("Predict: upload to boxes (decode at model size, forward, display JPEG)",
         f"{_ms(upload)} ({upload / bare:.2f}x the bare forward)", CMD),
        ("Predict: a slider move (redraw the display copy, JPEG)", _ms(slider), CMD),
        ("before (old page path): upload to boxes incl. full-size PNG", f"{_ms(old)} ({old / bare:.2f}x)", CMD),
        ("before (old page path): a slider move (full-size draw + PNG)", _ms(old_sl), CMD),
    ]


# ----------------------------------------------------------------------------- training loop
def _subset(plates_real: Path, out: Path, n_train: int) -> Path:
    for split, n in (("train", n_train), ("valid", 2), ("test", 2)):
        src = plates_real / split
        coco = json.loads((src / "_annotations.coco.json").read_text())
        coco["images"] = coco["images"][:n]
        keep = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        (out / split).mkdir(parents=True, exist_ok=True)
        for im in coco["images"]:
            shutil.copy2(src / im["file_name"], out / split / im["file_name"])
        (out / split / "_annotations.coco.json").write_text(json.dumps(coco))
    return out


LOOP_SETTINGS = ["model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none",
                 "input.train_sizes=[320]", "input.test_size=320", "input.max_size=427", "train.epochs=1",
                 "train.batch_size=4", "train.device=cpu", "train.amp=false", "data.num_workers=0",
                 "eval.probe_images=0", "train.log_every=1"]


class _MemoryWriter:
    """A metrics writer that keeps records in a list (tracking off: no JSONL, no TensorBoard)."""

    def __init__(self, kept: list):
        self.kept = kept

    def write(self, record):
        self.kept.append(record)

    def flush(self):
        pass

    def close(self):
        pass


PROBES_ON = 4  # probe images per epoch with tracking on (the recipe's default is 8 over a 75-image split)


def _our_loop(cfg_settings: list, name: str, work: Path, tracking: bool) -> dict:
    """engine.train on the subset. tracking on: JSONL + TensorBoard + status.json heartbeat + PROBES_ON probe
    images per epoch; off: an in-memory recorder, no status.json rewrites during training, no probes.
    Returns images/s over steps 2.., the data-wait fraction and the wall time of the whole train() call."""
    import engine.train as train_mod
    from engine.config import load_config

    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", cfg_settings + [
        f"run.runs_dir={work / 'runs'}", f"run.checkpoints_dir={work / 'ck'}",
        f"eval.probe_images={PROBES_ON if tracking else 0}"])
    kept: list = []
    original = train_mod.make_recorder, runs.StatusWriter.heartbeat
    if not tracking:
        train_mod.make_recorder = lambda *a, **k: MetricsRecorder([_MemoryWriter(kept)])
        runs.StatusWriter.heartbeat = lambda self, every=5.0, **fields: self.status.update(fields)
    t0 = time.perf_counter()
    try:
        train_mod.train(cfg, name)
    finally:
        train_mod.make_recorder, runs.StatusWriter.heartbeat = original
    wall = time.perf_counter() - t0
    steps = runs.read_metrics(work / "runs" / name)[0] if tracking else kept
    steps = [s for s in steps if s.get("type") == "step"]
    span = steps[-1]["time"] - steps[0]["time"]
    images = sum(cfg.train.batch_size for _ in steps[1:])
    wait = sum(s.get("data_time_s") or 0 for s in steps[1:]) / span
    return {"ips": images / span, "wait": wait, "wall": wall, "steps": len(steps)}


def _plain_loop(settings: list) -> float:
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plain_loop.py"), "--config", "configs/demo_cpu.yaml",
                          *sum((["--set", s] for s in settings), [])], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def _values(vals: list, fmt: str = ".2f") -> str:
    return ", ".join(format(v, fmt) for v in vals)


def bench_loop(plates_real: Path, work: Path, n_train: int = 32, rounds: int = 3) -> list[Row]:
    """Plain loop, our loop with tracking on, our loop with tracking off, interleaved `rounds` times
    (medians): on a shared machine the load drifts, interleaving spreads the drift over all three."""
    data = _subset(plates_real, work / "data", n_train)
    settings = LOOP_SETTINGS + [f"data.root={data}", "eval.test_after_train=false"]
    plain, on, off = [], [], []
    for i in range(rounds):
        plain.append(_plain_loop(settings))
        on.append(_our_loop(settings, f"loop-tracked-{i}", work, tracking=True))
        off.append(_our_loop(settings, f"loop-untracked-{i}", work, tracking=False))
    p = statistics.median(plain)
    o, f = (statistics.median(r["ips"] for r in rs) for rs in (on, off))
    wall_on, wall_off = (statistics.median(r["wall"] for r in rs) for rs in (on, off))
    steps, epoch_real = on[0]["steps"], (264 // 4) * 4 / o  # plates-real/train at batch 4, at our step rate
    extra = wall_on - wall_off
    return [
        (f"anchor: plain loop (scripts/plain_loop.py, torchvision reference shape), {n_train} real photos, batch 4, "
         f"320 model, CPU, median of {rounds} interleaved rounds", f"{p:.2f} images/s ({_values(plain)})", CMD),
        ("our loop, tracking on (JSONL + TensorBoard + status heartbeat), images/s over steps 2..",
         f"{o:.2f} images/s ({_values([r['ips'] for r in on])}); **{o / p:.3f}x** the plain loop", CMD),
        ("our loop: fraction of step time waiting for data (num_workers 0)",
         f"{statistics.median(r['wait'] for r in on):.3f}", CMD),
        ("our loop, tracking off (in-memory recorder, no status.json rewrites, no probes), images/s over steps 2..",
         f"{f:.2f} images/s ({_values([r['ips'] for r in off])}); tracking costs **{(f / o - 1) * 100:+.1f}%** "
         f"of step time", CMD),
        (f"whole train() call, 1 epoch of {steps} steps + validation of 2 photos: tracking on (with {PROBES_ON} "
         f"probe images) vs off", f"{wall_on:.1f} s vs {wall_off:.1f} s ({_values([r['wall'] for r in on], '.1f')} / "
         f"{_values([r['wall'] for r in off], '.1f')}): {extra:+.1f} s per epoch", CMD),
        ("that per-epoch difference against one plates-real epoch (264 photos at batch 4) at our step rate",
         f"{extra:+.1f} s of {epoch_real:.0f} s: {extra / epoch_real * 100:+.1f}%", CMD),
    ]


def run(plates_real: Path, tb_steps: int = 100_000, parts=("live", "eval", "predict", "loop", "browser")) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="perf-bench-") as tmp:
        work = Path(tmp)
        if "live" in parts:
            rows += bench_live(work, tb_steps)
        if "eval" in parts:
            rows += bench_eval(plates_real)
        if "predict" in parts:
            rows += bench_predict(plates_real, work)
        if "loop" in parts:
            rows += bench_loop(plates_real, work)
    if "browser" in parts:  # five tabs next to a real trainer, metric-to-screen, page idle (scripts/browser_bench.py)
        import browser_bench

        rows += browser_bench.measure(browser_bench.parse_args([]))
    return rows


if __name__ == "__main__":  # a quick run of one part: python scripts/perf_bench.py live
    from benchmark import PLATES_REAL

    for row in run(PLATES_REAL, tb_steps=int(os.environ.get("TB_STEPS", "100000")), parts=sys.argv[1:] or ("live", "eval", "predict", "loop", "browser")):
        print(f"| {row[0]} | {row[1]} |")
