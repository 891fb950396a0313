"""Speed benchmarks; prints a markdown table (docs/benchmarks.md holds the recorded numbers).

    .venv/bin/python scripts/benchmark.py                 # all: demo training + validation passes
    .venv/bin/python scripts/benchmark.py --only val      # one validation pass over plates-real/valid
    .venv/bin/python scripts/benchmark.py --only demo     # the CPU demo, start to finish
    .venv/bin/python scripts/benchmark.py --only gpu      # the real recipe on plates-real (CUDA box)
    .venv/bin/python scripts/benchmark.py --only perf     # issue 9: Live page, evaluation, Predict, loop, browser tabs
    .venv/bin/python scripts/benchmark.py --only transfer # synthetic demo on real photos; fine-tune vs scratch

demo: trains configs/demo_cpu.yaml as a real subprocess (exactly what the dashboard launches) and
reads its metrics.jsonl: training images/s (median over step records) and the minutes from the
run's start until the first epoch whose val mAP@0.5 >= 0.5.
val:  times engine.evaluate.validate over plates-real/valid (75 images) for the demo model and the
recipe's model at the recipe's test size, weights none (speed does not depend on the weights).
gpu:  a short run of the recipe on plates-real on CUDA: images/s and seconds per epoch.
transfer: trains the demo on a freshly generated synthetic set, evaluates it on plates-real/test;
then configs/real_finetune_cpu.yaml from that checkpoint on plates-real/train, and the same config
from scratch with the same training time (train.time_limit_min = the training + validation minutes
of synthetic + fine-tune, so its cosine is fitted to that budget); test mAP@0.5 of both; then
      tests/e2e/test_e2e_recipe_photo.py on the fine-tuned model (a real test photo in Chromium).
      --seed N gives both real-photo runs run.seed N (another draw of their augmentation and init);
      --synthetic-run RUN reuses that earlier synthetic run of --runs-dir (the demo trains
      deterministically) instead of training it again, and counts its training time the same way.
perf: every number of issue 9 next to its anchor measured in the same run (scripts/perf_bench.py
      says what is measured and how, scripts/browser_bench.py the browser rows); CPU heavy for about
      15 minutes.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import runs  # noqa: E402

PLATES_REAL = next((p for p in (Path(os.environ.get("PLATES_REAL", "")), ROOT.parent / "shared/data/plates-real",
                                Path("/work/shared/data/plates-real")) if (p / "valid").is_dir()), None)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def bench_demo(runs_dir: Path) -> list[tuple[str, str, str]]:
    name = f"bench-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "engine", "train", "--config", "configs/demo_cpu.yaml", "--run", name,
           "--set", f"run.runs_dir={runs_dir}"]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    run_dir = runs_dir / name
    steps, epochs = runs.read_metrics(run_dir)
    status = runs.read_status(run_dir) or {}
    started = status.get("started_at", t0)
    ips = [s["images_per_s"] for s in steps if s.get("images_per_s")]
    reached = next((e for e in epochs if (e.get("val_map50") or 0) >= 0.5), None)
    best = max((e.get("val_map50") or 0) for e in epochs) if epochs else 0.0
    cmd_text = "python scripts/benchmark.py --only demo"
    rows = [
        ("CPU demo: training images/s (median of step records)", f"{statistics.median(ips):.2f}" if ips else "—", cmd_text),
        ("CPU demo: minutes until val mAP@0.5 >= 0.5",
         f"{(reached['time'] - started) / 60:.1f} (epoch {reached['epoch']})" if reached else f"not reached (best {best:.3f})",
         cmd_text),
        ("CPU demo: whole run, minutes (incl. test evaluation)", f"{wall / 60:.1f}; best val mAP@0.5 {best:.3f}", cmd_text),
    ]
    return rows


def bench_val() -> list[tuple[str, str, str]]:
    import torch
    from torch.utils.data import DataLoader

    from engine.config import config_from_dict
    from engine.data import PlateDataset, collate_fn, load_split
    from engine.evaluate import validate
    from engine.model import build_model

    if PLATES_REAL is None:
        return [("validation pass", "plates-real not found", "")]
    split = load_split(PLATES_REAL, "valid")
    rows = []
    for model_name, size, max_size in (("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 427),
                                       ("fasterrcnn_mobilenet_v3_large_fpn", 800, 1333)):
        cfg = config_from_dict({"model": {"name": model_name, "weights": "none"},
                                "input": {"train_sizes": [size], "test_size": size, "max_size": max_size}})
        model = build_model(cfg).eval()
        loader = DataLoader(PlateDataset(split, train=False), batch_size=cfg.eval.batch_size,
                            collate_fn=collate_fn, num_workers=0)
        t0 = time.perf_counter()
        validate(model, loader, torch.device("cpu"), cfg.eval.score_threshold)
        sec = time.perf_counter() - t0
        rows.append((f"validation pass over plates-real/valid ({len(split.images)} images), {model_name} at {size}px, CPU",
                     f"{sec:.1f} s ({sec / len(split.images) * 1000:.0f} ms/image)", "python scripts/benchmark.py --only val"))
    return rows


def bench_gpu(runs_dir: Path) -> list[tuple[str, str, str]]:
    import torch

    if not torch.cuda.is_available():
        return [("GPU recipe", "no CUDA device here", "")]
    name = f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "engine", "train", "--config", "configs/train_plate_detector.yaml", "--run", name,
           "--data", str(PLATES_REAL), "--device", "cuda", "--set", "model.weights=none", "--set", "train.epochs=3",
           "--set", f"run.runs_dir={runs_dir}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    steps, epochs = runs.read_metrics(runs_dir / name)
    ips = [s["images_per_s"] for s in steps[5:] if s.get("images_per_s")]
    return [("GPU recipe on plates-real: training images/s (AMP, batch 16)", f"{statistics.median(ips):.1f}" if ips else "—",
             "python scripts/benchmark.py --only gpu"),
            ("GPU recipe: seconds per epoch (incl. validation)",
             ", ".join(f"{e.get('epoch_time_s', 0):.1f}" for e in epochs), "python scripts/benchmark.py --only gpu")]


def _test_numbers(out_dir: Path) -> str:
    """mAP@0.5, P/R at the 0.5 threshold, and the best recall at precision >= 0.5 from an evaluate folder."""
    import json

    m = json.loads((out_dir / "metrics.json").read_text())
    prf = json.loads((out_dir / "prf_vs_confidence.json").read_text())
    recall = max((r for p, r in zip(prf["precision"], prf["recall"]) if p >= 0.5), default=0.0)
    return (f"mAP@0.5 {m['map50']:.3f}; at score 0.5: P {m['precision']:.3f} R {m['recall']:.3f}; "
            f"best recall at P >= 0.5: {recall:.3f}")


def _best_valid(run_dir: Path) -> str:
    """The run's best plates-real/valid mAP@0.5 and its epoch (75 photos: a second number beside the 39-photo test)."""
    _, epochs = runs.read_metrics(run_dir)
    best = max((e for e in epochs if e.get("val_map50") is not None), key=lambda e: e["val_map50"], default=None)
    return f"; best valid mAP@0.5 {best['val_map50']:.3f} (epoch {best['epoch']})" if best else ""


def _training_s(run_dir: Path) -> float:
    """A completed run's training + validation seconds (status.json elapsed_s: what train.time_limit_min counts)."""
    return float(runs.read_status(run_dir).get("elapsed_s") or 0.0)


def _train(name: str, args: list, runs_dir: Path) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "engine", "train", "--run", name, "--set", f"run.runs_dir={runs_dir}"] + args,
                   cwd=ROOT, check=True)
    return time.time() - t0


def bench_transfer(runs_dir: Path, seed: int | None = None, synthetic_run: str | None = None) -> list[tuple[str, str, str]]:
    import yaml

    if PLATES_REAL is None:
        return [("transfer to real photos", "plates-real not found", "")]
    stamp, cmd_text = time.strftime('%Y%m%d-%H%M%S'), "python scripts/benchmark.py --only transfer"
    synth, fine, scratch = (f"bench-{k}-{stamp}" for k in ("synth", "finetune", "scratch"))
    if synthetic_run:
        synth, cmd_text = synthetic_run, cmd_text + f" --synthetic-run {synthetic_run}"
        status = runs.read_status(runs_dir / synth)
        synth_wall = float(status.get("ended_at") or 0) - float(status.get("started_at") or 0)
    else:
        synth_wall = _train(synth, ["--config", "configs/demo_cpu.yaml", "--data", str(ROOT / "data" / synth)], runs_dir)
    weights = ROOT / "checkpoints" / synth / "best.pth"
    if not (runs_dir / synth / "real-test" / "metrics.json").is_file():
        subprocess.run([sys.executable, "-m", "engine", "evaluate", "--checkpoint", str(weights), "--data",
                        str(PLATES_REAL), "--split", "test", "--out", str(runs_dir / synth / "real-test")],
                       cwd=ROOT, check=True)
    real = ["--config", "configs/real_finetune_cpu.yaml", "--data", str(PLATES_REAL)]
    if seed is not None:
        real, cmd_text = real + ["--set", f"run.seed={seed}"], cmd_text + f" --seed {seed}"
    fine_wall = _train(fine, real + ["--set", f"model.weights={weights}"], runs_dir)
    epochs = yaml.safe_load((ROOT / "configs/real_finetune_cpu.yaml").read_text())["train"]["epochs"]
    budget_min = (_training_s(runs_dir / synth) + _training_s(runs_dir / fine)) / 60  # the same training time
    scratch_wall = _train(scratch, real + ["--set", "model.weights=none", "--set", "train.epochs=1000",
                                           "--set", f"train.time_limit_min={budget_min:.2f}"], runs_dir)
    scratch_epochs = len(runs.read_metrics(runs_dir / scratch)[1])
    browser = _recipe_photo_in_browser(ROOT / "checkpoints" / fine / "best.pth")
    return [
        (f"synthetic demo ({synth_wall / 60:.1f} min) on its own synthetic test split", _test_numbers(runs_dir / synth / "test"),
         cmd_text),
        (f"synthetic demo ({synth_wall / 60:.1f} min) on plates-real/test", _test_numbers(runs_dir / synth / "real-test"), cmd_text),
        (f"synthetic + fine-tune on plates-real/train ({(synth_wall + fine_wall) / 60:.1f} min in all, training "
         f"{budget_min:.1f}; fine-tune {epochs} epochs)",
         _test_numbers(runs_dir / fine / "test") + _best_valid(runs_dir / fine), cmd_text),
        (f"from scratch on plates-real/train, time limit {budget_min:.1f} min ({scratch_wall / 60:.1f} min in all, "
         f"training {_training_s(runs_dir / scratch) / 60:.1f}; {scratch_epochs} epochs)",
         _test_numbers(runs_dir / scratch / "test") + _best_valid(runs_dir / scratch), cmd_text),
        ("Chromium: a plates-real test photo uploaded on the Predict page to the fine-tuned model shows a box "
         "on its labelled plate (IoU >= 0.5)", browser, "PLATES_RECIPE_CHECKPOINT=... pytest tests/e2e/test_e2e_recipe_photo.py"),
    ]


def _recipe_photo_in_browser(checkpoint: Path) -> str:
    """Issue 11's browser check on the model the real-photo recipe just trained (tests/e2e/test_e2e_recipe_photo.py)."""
    env = dict(os.environ, PLATES_RECIPE_CHECKPOINT=str(checkpoint))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "tests/e2e/test_e2e_recipe_photo.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    found = re.search(r"recipe model: (\d+ of \d+ test photos[^\n]*)", res.stdout)
    verdict = "passed" if res.returncode == 0 else f"FAILED (pytest exit {res.returncode})"
    return verdict + (f"; {found.group(1)}" if found else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["demo", "val", "gpu", "perf", "transfer"], action="append")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--tb-steps", type=int, default=100_000,
                    help="perf: steps of the TensorBoard anchor run (written through the engine's writers)")
    ap.add_argument("--seed", type=int, help="transfer: run.seed of the fine-tune and the from-scratch run")
    ap.add_argument("--synthetic-run", help="transfer: reuse this synthetic demo run of --runs-dir")
    args = ap.parse_args()
    only = set(args.only or ["val", "demo"])
    rows: list[tuple[str, str, str]] = []
    if "val" in only:
        rows += bench_val()
    if "demo" in only:
        rows += bench_demo(Path(args.runs_dir))
    if "transfer" in only:
        rows += bench_transfer(Path(args.runs_dir), args.seed, args.synthetic_run)
    if "gpu" in only:
        rows += bench_gpu(Path(args.runs_dir))
    if "perf" in only:
        sys.path.insert(0, str(ROOT / "scripts"))
        import perf_bench

        if PLATES_REAL is None:
            rows.append(("perf", "plates-real not found", ""))
        else:
            rows += perf_bench.run(PLATES_REAL, tb_steps=args.tb_steps)
    print(f"\nMachine: {machine()}; date {time.strftime('%Y-%m-%d')}\n")
    print("| measurement | value | command |\n|---|---|---|")
    for what, value, cmd in rows:
        print(f"| {what} | {value} | `{cmd}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
