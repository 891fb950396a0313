"""RESULTS.md for one run, in the structure of the results template, filled from the run's files.

Every number comes from a file of the run (status.json, config.yaml, dataset.json,
metrics.jsonl, test/metrics.json, test/samples.json, bench.json, train.log, checkpoints). What a run cannot
know (what worked, lessons, contact when the config has none) becomes a marked prompt for the
user, never invented text.

    python -m engine report --run RUN [--out DIR]      -> DIR/RESULTS.md + DIR/img/*.png|jpg
"""
from __future__ import annotations

import datetime as dt
import io
import math
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

from engine import bench_table, formatting as fmt, runs
from engine.config import validate_run_name
from engine.errors import EngineError
from engine.samples import sample_caption
from engine.targets import TARGETS, load_baselines, met

PROMPT = "✍️ *Your notes:*"  # marks what only the user can write
STATE_LINE = {
    "completed": "✅ Complete",
    "running": "🔄 Training in progress",
    "queued": "🔄 Queued",
    "stopped": "⏹️ Stopped by the user",
    "failed": "❌ Failed",
    "crashed": "❌ Crashed (process gone)",
    "stalled": "⚠️ Stalled (no heartbeat)",
}
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm lines
LOG_EXCERPT_PATTERNS = (
    re.compile(r"^=+$"),
    re.compile(r"Starting Training|Device:|LR:|Warmup:|Early Stopping Patience|Epochs:", re.I),
    re.compile(r"New best", re.I),
    re.compile(r"Early stop", re.I),
    re.compile(r"Training complete|Total time|Best mAP", re.I),
    re.compile(r"Resum", re.I),
    re.compile(r"stopped|non-finite|nan|error", re.I),
)


class ReportError(EngineError):
    pass


# ----------------------------------------------------------------------------- gathering
def _size_mb(path: Path) -> Optional[float]:
    try:
        return path.stat().st_size / 1e6
    except OSError:
        return None


def loss_convergence(epochs: list[dict], steps: list[dict]) -> dict:
    """Initial/final train loss and a judgement measured from the curve.

    unstable: a non-finite loss, or an epoch whose mean train loss rose > 20 % over the previous one;
    otherwise smooth. `trend` compares the last epoch with the mean of the two before it.
    """
    losses = [e.get("train_loss") for e in epochs if isinstance(e.get("train_loss"), (int, float))]
    step_losses = [s.get("loss") for s in steps if isinstance(s.get("loss"), (int, float))]
    out: dict[str, Any] = {
        "initial_loss": step_losses[0] if step_losses else (losses[0] if losses else None),
        "first_epoch_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "judgement": "not enough data",
        "rises": [],
    }
    if not losses:
        return out
    if any(not math.isfinite(v) for v in losses + step_losses):
        out["judgement"] = "unstable (non-finite loss)"
        return out
    rises = [epochs[i]["epoch"] for i in range(1, len(losses)) if losses[i] > 1.2 * losses[i - 1]]
    out["rises"] = rises
    if len(losses) < 2:
        out["judgement"] = "one epoch only"
    elif rises:
        out["judgement"] = "unstable (train loss rose > 20 % in epoch " + ", ".join(map(str, rises)) + ")"
    else:
        drop = 1 - losses[-1] / losses[0] if losses[0] else 0.0
        out["judgement"] = f"smooth (train loss fell {drop:.0%} from epoch 1 to the last epoch)"
    if len(losses) >= 3:
        prev = (losses[-2] + losses[-3]) / 2
        out["trend"] = "still decreasing" if losses[-1] < 0.98 * prev else "plateaued"
    return out


def gather(run: str, runs_dir: str = "runs", checkpoints_dir: str = "checkpoints") -> dict:
    """Everything the report shows, read from the run's files (also used by the dashboard)."""
    validate_run_name(run)  # a name with '/', '..' or an absolute path would leave runs_dir
    run_dir = runs.run_path(runs_dir, run)
    if not run_dir.is_dir():
        raise ReportError(f"run {run!r} not found under {runs_dir}/")
    status = runs.read_status(run_dir) or {}
    config = runs.read_config(run_dir)
    steps, epochs = runs.read_metrics(run_dir)
    dataset = runs.read_json(run_dir / runs.DATASET_FILE) or {}
    test_dir = run_dir / runs.TEST_DIR
    test = runs.read_json(test_dir / runs.TEST_METRICS_FILE)
    samples = runs.read_json(test_dir / runs.SAMPLES_FILE)
    ckpt_dir = runs.checkpoint_path(checkpoints_dir, run).parent
    return {
        "run": run,
        "run_dir": run_dir,
        "status": status,
        "state": runs.effective_state(status),
        "config": config,
        "steps": steps,
        "epochs": epochs,
        "best_epoch": runs.best_epoch_record(epochs),
        "dataset": dataset,
        "test": test if isinstance(test, dict) else None,
        "test_dir": test_dir,
        "samples": samples if isinstance(samples, dict) else None,
        "bench": bench_table.read_bench(run_dir),
        "checkpoints": {
            name: _size_mb(ckpt_dir / name) for name in (runs.BEST_CKPT, runs.LAST_CKPT)
        },
        "checkpoint_dir": ckpt_dir,
        "log": (run_dir / runs.LOG_FILE),
        "convergence": loss_convergence(epochs, steps),
        "tags": tensorboard_tags(run_dir),
    }


def tensorboard_tags(run_dir: Path) -> list[str]:
    """Scalar tags in the run's event files, read with TensorBoard's own reader."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 1})
        acc.Reload()
        return sorted(acc.Tags().get("scalars", []))
    except Exception:  # a damaged event file must not stop the report
        return []


def log_excerpt(log_path: Path, max_lines: int = 40) -> list[str]:
    """Start banner, new-best lines, early-stop line and final summary from train.log."""
    text = runs.tail_text(log_path, max_bytes=2_000_000, max_lines=100_000)
    picked = []
    for line in text.splitlines():
        clean = line.strip()
        if not clean or PROGRESS_BAR.search(clean):
            continue
        if any(p.search(clean) for p in LOG_EXCERPT_PATTERNS):
            picked.append(clean)
    if len(picked) > max_lines:
        half = max_lines // 2
        picked = picked[:half] + ["..."] + picked[-half:]
    return picked


# ----------------------------------------------------------------------------- plot
def plot_training_curve(epochs: list[dict], steps: list[dict], path: Path) -> Optional[Path]:
    """Train loss (per step and per epoch), val mAP@0.5 and LR as one PNG."""
    if not epochs and not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    if steps:
        spe = max(1, max(s["step"] for s in steps) / max(1, max((s.get("epoch") or 1) for s in steps)))
        xs = [s["step"] / spe for s in steps if s.get("loss") is not None]
        axes[0].plot(xs, [s["loss"] for s in steps if s.get("loss") is not None], lw=0.6, alpha=0.35,
                     label="per batch")
    if epochs:
        axes[0].plot([e["epoch"] for e in epochs], [e.get("train_loss") for e in epochs], "o-", lw=1.6,
                     label="epoch mean")
        axes[1].plot([e["epoch"] for e in epochs], [e.get("val_map50") for e in epochs], "o-", color="C2",
                     label="mAP@0.5")
        axes[1].plot([e["epoch"] for e in epochs], [e.get("val_map50_95") for e in epochs], "s--",
                     color="C4", label="mAP@0.5:0.95")
        axes[1].axhline(TARGETS["map50"], color="grey", ls=":", lw=1, label="target 0.85")
    if steps:
        axes[2].plot([s["step"] for s in steps], [s.get("lr") for s in steps], color="C3")
        axes[2].set_xlabel("step")
    axes[0].set(title="Train loss", xlabel="epoch")
    axes[1].set(title="Validation", xlabel="epoch", ylim=(0, 1))
    axes[2].set(title="Learning rate")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_test_curves(test_dir: Path, test: dict, path: Path) -> Optional[Path]:
    """PR curve and P/R/F1 against confidence (deployment and max-F1 thresholds marked) as one PNG."""
    pr = runs.read_json(test_dir / runs.PR_CURVE_FILE)
    prf = runs.read_json(test_dir / runs.PRF_FILE)
    if not isinstance(pr, dict) or not isinstance(prf, dict):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    ax1.plot(pr.get("recall", []), pr.get("precision", []), lw=0.8, alpha=0.5, label="raw")
    ax1.plot(pr.get("recall", []), pr.get("precision_envelope", pr.get("precision", [])), lw=1.8,
             label=f"envelope (AP {pr.get('ap', 0):.3f})")
    ax1.set(title="Precision-recall (IoU 0.5)", xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    thr = prf.get("threshold", [])
    for key in ("precision", "recall", "f1"):
        ax2.plot(thr, prf.get(key, []), label=key)
    if test.get("score_threshold") is not None:
        ax2.axvline(test["score_threshold"], color="grey", ls="--", lw=1, label=f"deployment {test['score_threshold']:.2f}")
    bf = test.get("best_f1") or {}
    if bf.get("threshold") is not None:
        ax2.axvline(bf["threshold"], color="C3", ls=":", lw=1, label=f"max F1 {bf['threshold']:.2f}")
    ax2.set(title="Against confidence", xlabel="score threshold", xlim=(0, 1), ylim=(0, 1.02))
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- markdown
def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value: Optional[float], target: float) -> str:
    ok = met(value, target)
    if ok is None:
        return f"Target: >{target:.2f}"
    return f"Target: >{target:.2f} — {'✅ met' if ok else '❌ missed'}"


def _cfg(info: dict, section: str) -> dict:
    return info["config"].get(section) or {}


def _device(info: dict) -> tuple[str, str]:
    """(device name, device) of the training run."""
    status = info["status"]
    device = status.get("device") or "—"
    return status.get("device_name") or device, device


def _end_reason(info: dict) -> Optional[str]:
    """Why a completed run trained fewer than train.epochs: early_stopping | time_limit (None if it did not).
    Runs from before status.json recorded it count as early stopped."""
    planned = _cfg(info, "train").get("epochs")
    done = len(info["epochs"])
    if not (done and planned and done < planned and info["state"] == "completed"):
        return None
    return info["status"].get("end_reason") or "early_stopping"


_END_NOTE = {"early_stopping": "early stopping triggered", "time_limit": "time limit reached"}


def _header(info: dict, images: dict) -> list[str]:
    run, state = info["run"], info["state"]
    return ["# 📊 Training Results\n", f"> **Status:** {STATE_LINE.get(state, state)}  ",
            f"> Run `{run}` — generated by `python -m engine report --run {run}` on "
            f"{fmt.utc_time(dt.datetime.now().timestamp())} from the run's files.\n"]


def _environment(info: dict, images: dict) -> list[str]:
    status = info["status"]
    started, ended = status.get("started_at"), status.get("ended_at") or status.get("updated_at")
    duration_h = (float(ended) - float(started)) / 3600 if started and ended else None
    if status.get("elapsed_s"):  # training time summed over resumes
        duration_h = float(status["elapsed_s"]) / 3600
    name, device = _device(info)
    cuda = status.get("cuda_version") or ("none (CPU run)" if str(device).startswith("cpu") else "—")
    return ["## 🖥️ Training Environment\n", _table(["Parameter", "Value"], [
        ["**Platform**", status.get("platform") or status.get("host") or "—"],
        ["**Device**", f"{name} (`{device}`)"],
        ["**CUDA Version**", cuda],
        ["**PyTorch Version**", status.get("torch_version") or "—"],
        ["**Training Date**", fmt.utc_time(started)],
        ["**Training Duration**", f"{duration_h:.2f} hours ({duration_h * 60:.1f} min)" if duration_h is not None else "—"],
    ])]


def _dataset(info: dict, images: dict) -> list[str]:
    ds = info["dataset"] or {}
    splits = [s for s in ("train", "valid", "test") if isinstance(ds.get(s), dict)]
    total_images = sum(ds[s].get("images", 0) for s in splits)
    total_boxes = sum(ds[s].get("boxes", 0) for s in splits)
    rows = [["**Source**", f"`{_cfg(info, 'data').get('root', '—')}`"],
            ["**Format**", "COCO JSON (Roboflow export layout)"],
            ["**Total Images**", fmt.number(total_images) if splits else "—"]]
    for s in splits:
        d = ds[s]
        rows.append([f"**{s.capitalize()} Set**", f"{fmt.number(d.get('images'))} images, {fmt.number(d.get('boxes'))} "
                     f"boxes, {fmt.number(d.get('empty_images'))} without plates, "
                     f"{fmt.number(d.get('dropped_boxes'))} boxes dropped"])
    rows += [["**Classes**", "1 (license plate)"],
             ["**Annotations**", f"{fmt.number(total_boxes)} bounding boxes" if splits else "—"]]
    return ["## 📁 Dataset Information\n", _table(["Metric", "Value"], rows)]


def _hyperparameters(info: dict, images: dict) -> list[str]:
    model, optim, sched = _cfg(info, "model"), _cfg(info, "optim"), _cfg(info, "schedule")
    train, aug, inp = _cfg(info, "train"), _cfg(info, "augment"), _cfg(info, "input")
    params = (info["test"] or {}).get("params")
    on_cpu = str(_device(info)[1]).startswith("cpu")
    amp = "Enabled (FP16)" if train.get("amp") and not on_cpu else "Disabled"
    amp += " (requested, off on CPU)" if train.get("amp") and on_cpu else ""
    out = ["## ⚙️ Hyperparameters\n", "```yaml", "Model Architecture:", f"  - Model: {model.get('name')}",
           f"  - Pretrained: {model.get('weights')}",
           f"  - Parameters: {fmt.number(params)}" if params else "  - Parameters: (counted at evaluation)",
           "Optimizer:", f"  - Type: {str(optim.get('name', 'sgd')).upper()}", f"  - Momentum: {optim.get('momentum')}",
           f"  - Weight Decay: {optim.get('weight_decay')}",
           "Learning Rate Schedule:", f"  - Initial LR: {optim.get('lr')}",
           f"  - Warmup: {sched.get('warmup_epochs')} epochs (linear, per iteration)", "  - Schedule: Cosine Annealing",
           f"  - Min LR: {sched.get('min_lr')}",
           "Training Configuration:", f"  - Batch Size: {train.get('batch_size')}",
           f"  - Epochs: {train.get('epochs')} (max)", f"  - Early Stopping: Patience {train.get('early_stopping_patience')}",
           f"  - Mixed Precision: {amp}", f"  - Gradient Clipping: Max norm {train.get('grad_clip')}",
           "Data Augmentation:", f"  - Random Horizontal Flip (p={aug.get('hflip_p')})",
           f"  - Color Jitter (brightness {aug.get('brightness')}, contrast {aug.get('contrast')}, "
           f"saturation {aug.get('saturation')}, hue {aug.get('hue')})"]
    sizes = inp.get("train_sizes") or []
    if sizes:
        out.append(f"  - Random Resize: shorter side {min(sizes)}-{max(sizes)} px ({len(sizes)} scales), "
                   f"longer side <= {inp.get('max_size')} px; test {inp.get('test_size')} px")
    return out + ["```"]


def _training(info: dict, images: dict, img_dir: str) -> list[str]:
    best, epochs = info["best_epoch"] or {}, info["epochs"]
    planned = _cfg(info, "train").get("epochs")
    threshold = _cfg(info, "eval").get("score_threshold", 0.5)
    out = ["## 📈 Training Results\n", "### Final Metrics\n",
           f"Validation metrics of the best epoch (score threshold {threshold} for P/R/F1).\n",
           _table(["Metric", "Value", "Notes"], [
               ["**Best mAP@0.5**", fmt.number(best.get("val_map50")), _met(best.get("val_map50"), TARGETS["map50"])],
               ["**mAP@0.5:0.95**", fmt.number(best.get("val_map50_95")), "COCO primary metric"],
               ["**Precision**", fmt.number(best.get("val_precision")),
                _met(best.get("val_precision"), TARGETS["precision"])],
               ["**Recall**", fmt.number(best.get("val_recall")), _met(best.get("val_recall"), TARGETS["recall"])],
               ["**F1-Score**", fmt.number(best.get("val_f1")), "Harmonic mean"],
               ["**Best Epoch**", fmt.number(best.get("epoch")), "Epoch with the highest val mAP@0.5"],
               ["**Total Epochs**", fmt.number(len(epochs)),
                _END_NOTE.get(_end_reason(info), f"of {planned} planned")],
           ]), "", "### Training Curve\n"]
    if "curve" in images:
        out.append(f"![Training curve]({img_dir}/{images['curve']})\n")
    out.append(_table(["Epoch", "Train Loss", "Val mAP@0.5", "LR"],
                      [[e["epoch"], fmt.number(e.get("train_loss")), fmt.number(e.get("val_map50")),
                        fmt.learning_rate(e.get("lr"))] for e in epochs]))
    conv = info["convergence"]
    return out + ["", "### Loss Convergence\n",
                  f"- **Initial Loss:** {fmt.number(conv['initial_loss'])} (first batch); "
                  f"epoch 1 mean {fmt.number(conv['first_epoch_loss'])}",
                  f"- **Final Loss:** {fmt.number(conv['final_loss'])} (last epoch mean)",
                  f"- **Convergence:** {conv['judgement']}" + (f"; {conv['trend']} at the end" if conv.get("trend") else "")]


def _test_rows(test: dict) -> list[list[str]]:
    speed = test.get("speed") or {}
    split = test.get("split", "test")
    return [
        ["**Checkpoint**", f"`{test.get('checkpoint', '—')}` (epoch {test.get('checkpoint_epoch', '—')}), split `{split}`"],
        ["**Test mAP@0.5**", fmt.number(test.get("map50"))],
        ["**Test mAP@0.5:0.95**", fmt.number(test.get("map50_95"))],
        ["**Test Precision**", f"{fmt.number(test.get('precision'))} (at score ≥ {test.get('score_threshold')})"],
        ["**Test Recall**", fmt.number(test.get("recall"))],
        ["**Test F1**", fmt.number(test.get("f1"))],
        ["**Inference Time**", f"{fmt.number(test.get('ms_per_image'), 1)} ms/image (model only, batch 1, "
                               f"{test.get('device_name') or test.get('device')}, AMP {'on' if test.get('amp') else 'off'})"],
        ["**End-to-end**", f"{fmt.number(speed.get('total_ms'), 1)} ms/image = preprocess "
                           f"{fmt.number(speed.get('preprocess_ms'), 1)} + model {fmt.number(speed.get('model_ms'), 1)}"
                           f" + postprocess {fmt.number(speed.get('postprocess_ms'), 1)}; "
                           f"{fmt.number(speed.get('fps_batch1'), 1)} FPS"],
        ["**Images**", f"{fmt.number(test.get('num_images'))} images, {fmt.number(test.get('num_gt_boxes'))} plates"],
    ]


def _bench_command(bench: dict) -> str:
    sizes = ",".join(dict.fromkeys(str(r["size"]) for r in bench["rows"]))
    return f"python -m engine bench --checkpoint {bench.get('checkpoint')} --sizes {sizes} --repeats {bench.get('repeats')}"


def _bench_rows(bench: dict) -> list[list[str]]:
    """The speed rows from bench.json: batch-1 latency and FPS of each measured backend and size."""
    rows = []
    for row in bench["rows"]:
        label = f"**Inference {row['size']} px, {row['backend']} ({row['device']})**"
        if not bench_table.measured(row):
            rows.append([label, f"not measured: {row.get('note', '')}"])
            continue
        rows.append([label, f"{row['latency_ms_median']:.1f} ms/image median, p90 {row['latency_ms_p90']:.1f} "
                            f"(batch 1); {bench_table.fps_batch1(row):.1f} FPS; {row['images_per_s']:.1f} images/s at "
                            f"batch {row['best_batch']}; {bench_table.machine_text(bench, row['device'])}"])
    return rows


def _bench(info: dict) -> list[str]:
    """The inference benchmark table (bench.json), or nothing when the run has none."""
    bench = info["bench"]
    if not bench:
        return []
    return ["\n### Inference Benchmark\n",
            f"Measured {bench.get('created', '')} with `{_bench_command(bench)}` on {bench.get('image')} "
            f"images ({bench_table.machine_text(bench)}; resize, model and post-processing, no JPEG decoding).\n",
            _table(["Metric", "Value"], _bench_rows(bench)), "", bench_table.format_table(bench)]


def _test(info: dict, images: dict, img_dir: str) -> list[str]:
    test = info["test"] or {}
    split = test.get("split", "test")
    ckpt = (info["checkpoint_dir"] / runs.BEST_CKPT).as_posix()
    config = (info["run_dir"] / runs.CONFIG_FILE).as_posix()
    out = ["## 🎯 Test Set Evaluation\n", "```bash\n# Command used:",
           f"python -m engine evaluate \\\n  --checkpoint {ckpt} \\\n  --config {config} \\\n"
           f"  --device {test.get('device', 'cuda')}" + (f" \\\n  --split {split}" if split != "test" else ""),
           "```\n", "### Results\n"]
    if not test:
        return out + [f"{PROMPT} this run has no test evaluation yet: run the command above, then "
                      f"`python -m engine report --run {info['run']}` again."] + _bench(info)
    out.append(_table(["Metric", "Value"], _test_rows(test)))
    bf = test.get("best_f1") or {}
    if bf:
        out.append(f"\nAt the max-F1 confidence {fmt.number(bf.get('threshold'), 2)}: precision "
                   f"{fmt.number(bf.get('precision'))}, recall {fmt.number(bf.get('recall'))}, F1 {fmt.number(bf.get('f1'))} "
                   f"(TP {bf.get('tp')}, FP {bf.get('fp')}, FN {bf.get('fn')}).")
    if "pr" in images:
        out.append(f"\n![Precision-recall curve]({img_dir}/{images['pr']})")
    return out + _bench(info)


def _samples(info: dict, images: dict, img_dir: str) -> list[str]:
    samples = info["samples"] or {}
    out = ["## 📸 Sample Predictions\n"]
    for title, key in (("Good Predictions", "good"), ("Challenging Cases", "challenging")):
        out.append(f"### {title}\n")
        items = samples.get(key) or []
        if not items:
            out.append("None selected (no test evaluation yet)." if not samples else "None in this split.")
        for item in items:
            out.append("- " + sample_caption(item, " — "))
            name = images.get(f"sample:{item.get('file') or ''}")
            if name:
                out.append(f"\n  ![{item.get('file_name', '')}]({img_dir}/{name})\n")
        out.append("")
    return out + ["Ground truth in green, predictions in orange with their score."]


def _checkpoints(info: dict, images: dict) -> list[str]:
    ck, cdir = info["checkpoints"], info["checkpoint_dir"].as_posix()  # sizes measured now from the files
    best_epoch = (info["best_epoch"] or {}).get("epoch", "—")

    def size(name: str) -> str:
        return f"{ck[name]:.1f} MB" if ck[name] else "missing"

    return ["## 💾 Model Checkpoints\n", _table(["File", "Size", "Description"], [
        [f"`{cdir}/{runs.BEST_CKPT}`", size(runs.BEST_CKPT), f"Best validation mAP@0.5 (epoch {best_epoch})"],
        [f"`{cdir}/{runs.LAST_CKPT}`", size(runs.LAST_CKPT), f"Last completed epoch ({len(info['epochs'])}); "
                                                             f"resumes with `python -m engine train --resume {info['run']}`"],
    ]), "\nEach file holds model, optimizer, scheduler and scaler state, RNG states and the config."]


def _tensorboard(info: dict, images: dict) -> list[str]:
    tags = info["tags"]
    return ["## 📊 TensorBoard Logs\n", f"**Location:** `{info['run_dir'].as_posix()}/`\n",
            "**Scalars tracked:** " + (", ".join(f"`{t}`" for t in tags) if tags else "no event file found"),
            "\n```bash", f"tensorboard --logdir {Path(info['run_dir']).parent.as_posix()} --host 0.0.0.0 --port 6006",
            "```"]


def _observations(info: dict, images: dict) -> list[str]:
    best, test, train = info["best_epoch"] or {}, info["test"] or {}, _cfg(info, "train")
    total = len(info["epochs"])
    facts = [f"Train loss: {info['convergence']['judgement']}."]
    if best:
        facts.append(f"Best val mAP@0.5 {fmt.number(best.get('val_map50'))} at epoch {best.get('epoch')} of {total}.")
    if _end_reason(info) == "early_stopping":
        facts.append(f"Early stopping ended the run after {total} of {train.get('epochs')} epochs "
                     f"(patience {train.get('early_stopping_patience')}).")
    elif _end_reason(info) == "time_limit":
        facts.append(f"The time limit ({float(train.get('time_limit_min') or 0):g} min) ended the run after {total} "
                     f"of {train.get('epochs')} epochs; the LR schedule was fitted to the epochs that fit.")
    ips = sorted(s["images_per_s"] for s in info["steps"] if s.get("images_per_s"))
    if ips:
        facts.append(f"Training throughput: median {ips[len(ips) // 2]:.1f} images/s on {_device(info)[0]}.")
    if test:
        facts.append(f"Test mAP@0.5 {fmt.number(test.get('map50'))} vs best val {fmt.number(best.get('val_map50'))}.")
    out = ["## 🔍 Observations & Notes\n", "### Measured\n", *(f"- {f}" for f in facts), ""]
    for title in ("What Worked Well", "Challenges Encountered", "Lessons Learned"):
        out += [f"### {title}\n", f"- {PROMPT} (a run cannot know this; write it here)\n"]
    notes = _cfg(info, "run").get("notes")
    return out + ([f"Run notes from the config: {notes}"] if notes else [])


def _next_steps(info: dict, images: dict) -> list[str]:
    return ["## 🚀 Next Steps\n", "- [ ] Fine-tune on additional data", "- [ ] Experiment with different backbones "
            "(ResNet50, EfficientNet)", "- [ ] Add data augmentation (Mosaic, MixUp)",
            "- [ ] Optimize for inference speed", "- [ ] Deploy to production API"]


def _log_excerpt(info: dict, images: dict) -> list[str]:
    excerpt = log_excerpt(info["log"])
    return ["## 📝 Training Log Excerpt\n", "```", "\n".join(excerpt) if excerpt else "(train.log is empty or missing)",
            "```"]


def _quoted(source: Optional[str]) -> str:
    """A baseline's source, always saying it is quoted."""
    source = str(source or "").strip()
    return source if source.lower().startswith("quoted") else f"quoted: {source or 'reference'}"


def _baselines(info: dict, images: dict) -> list[str]:
    test, best, bench = info["test"] or {}, info["best_epoch"] or {}, info["bench"]
    fps = (test.get("speed") or {}).get("fps_batch1")
    map50 = fmt.number(test.get("map50") if test else best.get("val_map50"))
    params = fmt.params(test.get("params"))
    rows = [[f"**Ours ({_cfg(info, 'model').get('name')})**", map50, params, f"{fps:.1f}" if fps else "—",
             f"measured: test set, {test.get('device_name') or test.get('device')}" if fps
             else "measured: best validation mAP (no test evaluation)"]]
    for row in (bench or {}).get("rows", []):
        if bench_table.measured(row):
            rows.append([f"Ours, {row['backend']} {row['size']} px", map50, params,
                         f"{bench_table.fps_batch1(row):.1f}",
                         f"measured: bench, {row['device']} ({bench_table.machine_text(bench, row['device'])})"])
    rows += [[b.get("name", "?"), f"~{b.get('map50')}", fmt.params(b.get("params")), f"~{b.get('fps')}",
              _quoted(b.get("source"))] for b in load_baselines()]
    bench_note = (" Bench rows are `python -m engine bench` (bench.json) on a synthetic "
                  f"{bench.get('image', '').replace('synthetic ', '')} frame." if bench else "")
    return ["## 🏆 Comparison with Baselines\n",
            _table(["Model", "mAP@0.5", "Params", "Speed (FPS)", "Source"], rows),
            f"\nOur mAP@0.5 is {'test-set' if test else 'best validation'}; parameters are counted from the model, "
            "our FPS is measured at batch 1 on the device named in its row." + bench_note + " Baseline rows are "
            "quoted references from `configs/baselines.yaml`, not measured here, on unknown hardware."]


def _contact(info: dict, images: dict) -> list[str]:
    run_cfg, state = _cfg(info, "run"), info["state"]
    return ["## 📧 Contact\n",
            f"**Author:** {run_cfg.get('author') or PROMPT + ' set `run.author` in the config'}  ",
            f"**Contact:** {run_cfg.get('contact') or PROMPT + ' set `run.contact` in the config'}\n", "---\n",
            f"**Last Updated:** {fmt.utc_time(info['status'].get('updated_at'))}  ",
            f"**Training Status:** {STATE_LINE.get(state, state)}"]


SECTIONS = (_header, _environment, _dataset, _hyperparameters, _training, _test, _samples, _checkpoints,
            _tensorboard, _observations, _next_steps, _log_excerpt, _baselines, _contact)
WITH_IMAGES = (_training, _test, _samples)  # sections that link images under img_dir


def render(info: dict, img_dir_name: str = runs.REPORT_IMG_DIR, images: Optional[dict] = None) -> str:
    """The markdown text, one section per function. `images` maps logical names to files in img_dir_name."""
    images = images or {}
    blocks = []
    for section in SECTIONS:
        lines = section(info, images, img_dir_name) if section in WITH_IMAGES else section(info, images)
        blocks.append("\n".join(lines))
    return "\n\n---\n\n".join(blocks) + "\n"


def write_report(run: str, runs_dir: str = "runs", checkpoints_dir: str = "checkpoints",
                 out: Optional[str] = None) -> Path:
    """Write RESULTS.md and its images to `out` (default runs/<run>/report/); returns the md path."""
    info = gather(run, runs_dir, checkpoints_dir)
    out_dir = Path(out) if out else info["run_dir"] / runs.REPORT_DIR
    img_dir = out_dir / runs.REPORT_IMG_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if plot_training_curve(info["epochs"], info["steps"], img_dir / "training_curve.png"):
        images["curve"] = "training_curve.png"
    if plot_test_curves(info["test_dir"], info["test"] or {}, img_dir / "test_curves.png"):
        images["pr"] = "test_curves.png"
    for item in (info["samples"] or {}).get("good", []) + (info["samples"] or {}).get("challenging", []):
        rel = item.get("file")
        if not rel:
            continue
        src = info["test_dir"] / rel
        if src.is_file():
            dest = "sample_" + Path(rel).name
            shutil.copy2(src, img_dir / dest)
            images[f"sample:{rel}"] = dest
    md = out_dir / runs.REPORT_FILE
    runs.atomic_write_text(md, render(info, runs.REPORT_IMG_DIR, images))
    return md


def report_zip(md_path: Path) -> bytes:
    """RESULTS.md plus its img/ folder as a zip (for the dashboard's download button)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(md_path, md_path.name)
        img_dir = md_path.parent / runs.REPORT_IMG_DIR
        if img_dir.is_dir():
            for p in sorted(img_dir.iterdir()):
                if p.is_file():
                    zf.write(p, f"{runs.REPORT_IMG_DIR}/{p.name}")
    return buf.getvalue()
