"""The GPU proof: the recipe end to end with AMP, AMP vs fp32, the data-loader split, inference rows.

    python scripts/gpu_proof.py --data /path/to/plates-real --out results/     # on a CUDA machine

One script, one call, because GPU time is scarce. Every phase has a time cap and catches its own
errors, so a failure in one still leaves the others' numbers. Writes `gpu_proof.json` (all numbers)
and `gpu_proof.md` (the tables for docs/benchmarks.md) under --out, plus the recipe run's
metrics.jsonl / status.json / train.log / test metrics.

Phases:
  step   the recipe's model and batch (16 real photos, train augmentation, 800-1333 px) for N steps
         with AMP (fp16 autocast + GradScaler) and then fp32: images/s, time blocked on the
         DataLoader vs compute, CUDA peak memory, GradScaler scale. Same process, same data.
  recipe `python -m engine train --config configs/train_plate_detector.yaml` (weights none: no
         download there either) as a real subprocess, capped in time (SIGTERM -> stopped); reads the
         run's own files; nvidia-smi samples GPU utilisation meanwhile.
  infer  eager fp32 vs fp16 autocast, batch-1 latency (median, p90) and images/s at the best batch,
         for the 320 model at 320 px and the recipe model at 800 px.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: dict = {}
DRY = {"on": False}  # --dry-run: the same code on the CPU with tiny sizes, to catch mistakes before a GPU call


def device():
    import torch

    return torch.device("cpu" if DRY["on"] else "cuda")


def sync() -> None:
    import torch

    if not DRY["on"]:
        torch.cuda.synchronize()


def peak_gib() -> float:
    import torch

    return 0.0 if DRY["on"] else torch.cuda.max_memory_allocated() / 2**30


def phase(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            print(f"\n=== {name} ===", flush=True)
            try:
                RESULTS[name] = fn(*args, **kwargs)
            except Exception as exc:  # keep the other phases' numbers
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}"}
            RESULTS[name]["phase_wall_s"] = round(time.time() - t0, 1)
            print(json.dumps(RESULTS[name], indent=1, default=str)[:3000], flush=True)
        return run
    return wrap


def percentile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@phase("environment")
def environment() -> dict:
    import torch

    if DRY["on"]:
        return {"gpu": "none (dry run on CPU)", "gpus": 0, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "nvidia_smi": smi.stdout.strip(), "cpu_count": os.cpu_count()}


def recipe_config(data: Path, overrides: list[str]):
    from engine.config import load_config

    tiny = ["input.train_sizes=[160]", "input.test_size=160", "input.max_size=224", "train.batch_size=4",
            "data.num_workers=1"] if DRY["on"] else []
    return load_config(ROOT / "configs" / "train_plate_detector.yaml",
                       [f"data.root={data}", "model.weights=none", f"train.device={device().type}"] + tiny + overrides)


@phase("step")
def step_split(data: Path, steps: int, warmup: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from engine.data import PlateDataset, collate_fn, load_split
    from engine.model import build_model

    cfg = recipe_config(data, [])
    dev = device()
    split = load_split(data, "train")
    ds = PlateDataset(split, train=True, augment=cfg.augment)
    out = {"batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers,
           "train_sizes": list(cfg.input.train_sizes), "max_size": cfg.input.max_size}
    for amp in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg).to(dev).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and not DRY["on"])
        sampler = RandomSampler(ds, replacement=True, num_samples=(steps + warmup) * cfg.train.batch_size,
                                generator=torch.Generator().manual_seed(0))
        loader = DataLoader(ds, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                            collate_fn=collate_fn, pin_memory=not DRY["on"], persistent_workers=False)
        if not DRY["on"]:
            torch.cuda.reset_peak_memory_stats()
        data_s, compute_s, scales, dtypes = [], [], [], set()
        it = iter(loader)
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            images, targets = next(it)
            t1 = time.perf_counter()
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor).to(dev), "labels": t["labels"].to(dev)}
                       for t in targets]
            with torch.autocast(dev.type, dtype=torch.bfloat16 if DRY["on"] else torch.float16, enabled=amp):
                losses = model(images, targets)
                loss = sum(losses.values())
            dtypes.add(str(losses["loss_classifier"].dtype))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            scales.append(float(scaler.get_scale()) if scaler.is_enabled() else None)
            scaler.step(opt)
            scaler.update()
            sync()
            t2 = time.perf_counter()
            if i >= warmup:
                data_s.append(t1 - t0)
                compute_s.append(t2 - t1)
        del it, loader
        total = sum(data_s) + sum(compute_s)
        key = "amp_fp16" if amp else "fp32"
        out[key] = {
            "images_per_s": round(steps * cfg.train.batch_size / total, 1),
            "step_s_median": round(statistics.median([d + c for d, c in zip(data_s, compute_s)]), 4),
            "compute_s_median": round(statistics.median(compute_s), 4),
            "data_wait_fraction": round(sum(data_s) / total, 4),
            "peak_mem_gib": round(peak_gib(), 2),
            "grad_scaler_scale_first_last": [scales[0], scales[-1]] if amp else None,
            "loss_dtypes": sorted(dtypes),
        }
        del model, opt
        if not DRY["on"]:
            torch.cuda.empty_cache()
    out["amp_vs_fp32_images_per_s"] = round(out["amp_fp16"]["images_per_s"] / out["fp32"]["images_per_s"], 2)
    return out


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation and memory every 0.5 s while the recipe runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
            try:
                util, mem = (float(x) for x in r.stdout.strip().splitlines()[0].split(","))
                self.samples.append((util, mem))
            except (ValueError, IndexError):
                pass
            self.halt.wait(0.5)


@phase("recipe")
def recipe(data: Path, work: Path, out_dir: Path, cap_s: float) -> dict:
    from engine import runs

    name = "gpu-recipe"
    cmd = [sys.executable, "-m", "engine", "train", "--config", "configs/train_plate_detector.yaml", "--run", name,
           "--data", str(data), "--device", device().type, "--set", "model.weights=none",
           "--set", f"run.runs_dir={work / 'runs'}", "--set", f"run.checkpoints_dir={work / 'checkpoints'}"]
    if DRY["on"]:
        cmd += ["--set", "input.train_sizes=[160]", "--set", "input.test_size=160", "--set", "input.max_size=224",
                "--set", "train.epochs=2", "--set", "data.num_workers=0", "--set", "train.batch_size=16"]
    log_path = work / "recipe-stdout.log"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    shutil.rmtree(work / "checkpoints" / name, ignore_errors=True)
    sampler = GpuSampler()
    if not DRY["on"]:
        sampler.start()
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=cap_s)
            capped = False
        except subprocess.TimeoutExpired:
            capped = True
            os.killpg(proc.pid, signal.SIGTERM)  # the engine saves last.pth and writes `stopped`
            proc.wait(timeout=120)
    wall = time.time() - t0
    sampler.halt.set()
    run_dir = work / "runs" / name
    steps, epochs = runs.read_metrics(run_dir)
    status = runs.read_status(run_dir) or {}
    for f in (runs.METRICS_FILE, runs.STATUS_FILE, runs.LOG_FILE):
        if (run_dir / f).exists():
            shutil.copy(run_dir / f, out_dir / f"recipe-{f}")
    test_metrics = runs.read_json(run_dir / runs.TEST_DIR / "metrics.json") or {}
    if test_metrics:
        shutil.copy(run_dir / runs.TEST_DIR / "metrics.json", out_dir / "recipe-test-metrics.json")
    later = [s for s in steps if s.get("epoch", 0) >= 2]  # epoch 1 holds cudnn autotuning and worker start
    ips = [s["images_per_s"] for s in later if s.get("images_per_s")]
    data_t = [s["data_time_s"] for s in later if s.get("data_time_s") is not None]
    scales = [s["amp_scale"] for s in steps if s.get("amp_scale") is not None]
    mem = [s["gpu_mem_peak_mb"] for s in steps if s.get("gpu_mem_peak_mb") is not None]
    utils = [u for u, _ in sampler.samples]
    log_text = (run_dir / runs.LOG_FILE).read_text(errors="replace") if (run_dir / runs.LOG_FILE).exists() else ""
    return {
        "state": status.get("state"), "message": status.get("message"), "error": status.get("error"),
        "capped_at_s": cap_s if capped else None, "wall_s": round(wall, 1), "exit_code": proc.returncode,
        "epochs_done": len(epochs), "steps_done": len(steps),
        "epoch_time_s": [round(e.get("epoch_time_s") or 0, 1) for e in epochs],
        "epoch_time_s_median": round(statistics.median([e.get("epoch_time_s") or 0 for e in epochs]), 1) if epochs else None,
        "val_map50": [round(e.get("val_map50") or 0, 4) for e in epochs],
        "best": status.get("best"),
        "images_per_s_median": round(statistics.median(ips), 1) if ips else None,
        "data_wait_s_median": round(statistics.median(data_t), 4) if data_t else None,
        "amp_scale_first_last_min": [scales[0], scales[-1], min(scales)] if scales else None,
        "gpu_mem_peak_mib": round(max(mem)) if mem else None,
        "gpu_util_mean_pct": round(statistics.mean(utils), 1) if utils else None,
        "gpu_util_median_pct": statistics.median(utils) if utils else None,
        "gpu_mem_used_max_mib_smi": max((m for _, m in sampler.samples), default=None),
        "log_amp_line": next((ln for ln in log_text.splitlines() if "AMP" in ln), None),
        "test": {k: test_metrics.get(k) for k in ("map50", "map50_95", "precision", "recall", "f1", "ms_per_image",
                                                  "fps") if k in test_metrics},
        "checkpoint": str(work / "checkpoints" / name / runs.BEST_CKPT),
    }


@phase("infer")
def inference(repeats: int) -> dict:
    import torch

    from engine.config import config_from_dict
    from engine.model import build_model

    dev = device()
    rows = []
    for model_name, size, max_size in (("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 427),
                                       ("fasterrcnn_mobilenet_v3_large_fpn", 800, 1333)):
        cfg = config_from_dict({"model": {"name": model_name, "weights": "none"},
                                "input": {"train_sizes": [size], "test_size": size, "max_size": max_size}})
        model = build_model(cfg).to(dev).eval()
        g = torch.Generator().manual_seed(0)
        image = torch.rand(3, 600, 800, generator=g)  # a 4:3 photo; the model's transform resizes it to `size`
        for precision in ("fp32", "fp16"):
            amp = precision == "fp16"

            def run(batch: int) -> float:
                imgs = [image.to(dev) for _ in range(batch)]
                sync()
                t = time.perf_counter()
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp and not DRY["on"]):
                    model(imgs)
                sync()
                return time.perf_counter() - t

            for _ in range(2 if DRY["on"] else 10):
                run(1)
            lat = [run(1) * 1000 for _ in range(repeats)]
            best = (0.0, 1)
            for batch in ((1, 2) if DRY["on"] else (1, 4, 8, 16, 32)):
                run(batch)
                ts = [run(batch) for _ in range(max(3, repeats // batch))]
                ips = batch / statistics.median(ts)
                best = max(best, (ips, batch))
            rows.append({"model": model_name, "size": size, "precision": precision,
                         "latency_ms_median": round(statistics.median(lat), 2), "latency_ms_p90": round(percentile(lat, 0.9), 2),
                         "best_images_per_s": round(best[0], 1), "best_batch": best[1]})
        del model
        if not DRY["on"]:
            torch.cuda.empty_cache()
    return {"rows": rows, "note": "random weights: detection count affects post-processing; speed of a trained model may differ"}


def markdown() -> str:
    env, st, rc, inf = (RESULTS.get(k, {}) for k in ("environment", "step", "recipe", "infer"))
    lines = [f"GPU: {env.get('gpu')} ({env.get('gpus')} GPU), torch {env.get('torch')}, CUDA {env.get('cuda')}", ""]
    if "amp_fp16" in st:
        lines += ["| training step, recipe model, batch 16, 800-1333 px | AMP fp16 | fp32 |", "|---|---|---|"]
        for key, label in (("images_per_s", "images/s"), ("step_s_median", "step s (median)"),
                           ("compute_s_median", "compute s (median)"), ("data_wait_fraction", "fraction of time waiting for data"),
                           ("peak_mem_gib", "CUDA peak memory GiB"), ("loss_dtypes", "loss dtypes")):
            lines.append(f"| {label} | {st['amp_fp16'][key]} | {st['fp32'][key]} |")
        lines += [f"| AMP / fp32 images/s | {st.get('amp_vs_fp32_images_per_s')} | |",
                  f"| GradScaler scale first/last | {st['amp_fp16']['grad_scaler_scale_first_last']} | |", ""]
    if rc and "state" in rc:
        lines += ["| recipe end to end (`configs/train_plate_detector.yaml`, weights none) | value |", "|---|---|"]
        for key in ("state", "message", "epochs_done", "epoch_time_s_median", "images_per_s_median", "data_wait_s_median",
                    "amp_scale_first_last_min", "gpu_mem_peak_mib", "gpu_util_mean_pct", "best", "test", "wall_s"):
            lines.append(f"| {key} | {rc.get(key)} |")
        lines.append("")
    if inf.get("rows"):
        lines += ["| inference | size | precision | batch-1 ms median | p90 | best images/s (batch) |", "|---|---|---|---|---|---|"]
        for r in inf["rows"]:
            lines.append(f"| {r['model']} | {r['size']} | {r['precision']} | {r['latency_ms_median']} | "
                         f"{r['latency_ms_p90']} | {r['best_images_per_s']} ({r['best_batch']}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-proof"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--recipe-cap-s", type=float, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip", action="append", default=[], choices=["step", "recipe", "infer"])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script itself")
    args = ap.parse_args()
    DRY["on"] = args.dry_run
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    environment()
    if "step" not in args.skip:
        step_split(args.data, args.steps, warmup=5)
    if "recipe" not in args.skip:
        recipe(args.data, args.work, args.out, args.recipe_cap_s)
    if "infer" not in args.skip:
        inference(args.repeats)
    (args.out / "gpu_proof.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    md = markdown()
    (args.out / "gpu_proof.md").write_text(md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
