"""RESULTS.md for one run, in the structure of the results template, filled from the run's files.

Every number comes from a file of the run (status.json, config.yaml, dataset.json,
metrics.jsonl, test/metrics.json, test/samples.json, train.log, checkpoints). What a run cannot
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

import yaml

from engine import runs
from engine.config import validate_run_name
from engine.errors import EngineError

PROMPT = "✍️ *Your notes:*"  # marks what only the user can write
TARGETS = {"map50": 0.85, "precision": 0.90, "recall": 0.80}  # from the results template
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
def format_number(value: Any, digits: int = 4) -> str:
    """A metric for a table: '—' for missing, thousands separators for ints, fixed digits for floats."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


_fmt = format_number


def _lr(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2e}"


def _when(ts: Optional[float]) -> str:
    if not ts:
        return "—"
    return dt.datetime.fromtimestamp(float(ts), tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


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
    try:
        config = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    steps, epochs = runs.read_metrics(run_dir)
    dataset = runs.read_json(run_dir / runs.DATASET_FILE) or {}
    test_dir = run_dir / runs.TEST_DIR
    test = runs.read_json(test_dir / "metrics.json")
    samples = runs.read_json(test_dir / "samples.json")
    ckpt_dir = Path(checkpoints_dir) / run
    best_epoch = max(epochs, key=lambda e: (e.get("val_map50") or -1, -e["epoch"])) if epochs else None
    return {
        "run": run,
        "run_dir": run_dir,
        "status": status,
        "state": runs.effective_state(status),
        "config": config,
        "steps": steps,
        "epochs": epochs,
        "best_epoch": best_epoch,
        "dataset": dataset,
        "test": test if isinstance(test, dict) else None,
        "test_dir": test_dir,
        "samples": samples if isinstance(samples, dict) else None,
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


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def load_baselines(path: Optional[Path] = None) -> list[dict]:
    """Rows of configs/baselines.yaml (a list, or a mapping with a `baselines` list); [] if unreadable."""
    path = Path(path) if path else PROJECT_ROOT / "configs" / "baselines.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    rows = data.get("baselines", data) if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


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
    pr = runs.read_json(test_dir / "pr_curve.json")
    prf = runs.read_json(test_dir / "prf_vs_confidence.json")
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
    if value is None:
        return f"Target: >{target:.2f}"
    return f"Target: >{target:.2f} — {'✅ met' if value > target else '❌ missed'}"


def render(info: dict, img_dir_name: str = "img", images: Optional[dict] = None) -> str:
    """The markdown text. `images` maps logical names to file names inside img_dir_name."""
    images = images or {}
    status, cfg, epochs = info["status"], info["config"], info["epochs"]
    best = info["best_epoch"] or {}
    test = info["test"] or {}
    run = info["run"]
    c_model, c_optim, c_sched = cfg.get("model", {}), cfg.get("optim", {}), cfg.get("schedule", {})
    c_train, c_aug, c_input = cfg.get("train", {}), cfg.get("augment", {}), cfg.get("input", {})
    c_run, c_data, c_eval = cfg.get("run", {}), cfg.get("data", {}), cfg.get("eval", {})
    state = info["state"]
    started, ended = status.get("started_at"), status.get("ended_at") or status.get("updated_at")
    duration_h = (float(ended) - float(started)) / 3600 if started and ended else None
    if status.get("elapsed_s"):  # training time summed over resumes
        duration_h = float(status["elapsed_s"]) / 3600
    out: list[str] = []
    w = out.append

    w("# 📊 Training Results\n")
    w(f"> **Status:** {STATE_LINE.get(state, state)}  ")
    w(f"> Run `{run}` — generated by `python -m engine report --run {run}` on {_when(dt.datetime.now().timestamp())}"
      " from the run's files.\n")
    w("---\n")

    # environment
    device_name = status.get("device_name") or status.get("device") or "—"
    device = status.get("device") or "—"
    w("## 🖥️ Training Environment\n")
    w(_table(["Parameter", "Value"], [
        ["**Platform**", status.get("platform") or status.get("host") or "—"],
        ["**Device**", f"{device_name} (`{device}`)"],
        ["**CUDA Version**", status.get("cuda_version") or ("none (CPU run)" if str(device).startswith("cpu") else "—")],
        ["**PyTorch Version**", status.get("torch_version") or "—"],
        ["**Training Date**", _when(started)],
        ["**Training Duration**", f"{duration_h:.2f} hours ({duration_h * 60:.1f} min)" if duration_h is not None else "—"],
    ]))
    w("\n---\n")

    # dataset
    ds = info["dataset"] or {}
    splits = [s for s in ("train", "valid", "test") if isinstance(ds.get(s), dict)]
    total_images = sum(ds[s].get("images", 0) for s in splits)
    total_boxes = sum(ds[s].get("boxes", 0) for s in splits)
    w("## 📁 Dataset Information\n")
    rows = [
        ["**Source**", f"`{c_data.get('root', '—')}`"],
        ["**Format**", "COCO JSON (Roboflow export layout)"],
        ["**Total Images**", _fmt(total_images) if splits else "—"],
    ]
    for s in splits:
        d = ds[s]
        rows.append([f"**{s.capitalize()} Set**", f"{_fmt(d.get('images'))} images, {_fmt(d.get('boxes'))} boxes, "
                     f"{_fmt(d.get('empty_images'))} without plates, {_fmt(d.get('dropped_boxes'))} boxes dropped"])
    rows += [["**Classes**", f"1 ({ds.get('category_name') or 'license_plate'})"],
             ["**Annotations**", f"{_fmt(total_boxes)} bounding boxes" if splits else "—"]]
    w(_table(["Metric", "Value"], rows))
    w("\n---\n")

    # hyperparameters
    sizes = c_input.get("train_sizes") or []
    w("## ⚙️ Hyperparameters\n")
    w("```yaml")
    w("Model Architecture:")
    w(f"  - Model: {c_model.get('name')}")
    w(f"  - Pretrained: {c_model.get('weights')}")
    w(f"  - Parameters: {_fmt(test.get('params'))}" if test.get("params") else "  - Parameters: (counted at evaluation)")
    w("Optimizer:")
    w(f"  - Type: {str(c_optim.get('name', 'sgd')).upper()}")
    w(f"  - Momentum: {c_optim.get('momentum')}")
    w(f"  - Weight Decay: {c_optim.get('weight_decay')}")
    w("Learning Rate Schedule:")
    w(f"  - Initial LR: {c_optim.get('lr')}")
    w(f"  - Warmup: {c_sched.get('warmup_epochs')} epochs (linear, per iteration)")
    w("  - Schedule: Cosine Annealing")
    w(f"  - Min LR: {c_sched.get('min_lr')}")
    w("Training Configuration:")
    w(f"  - Batch Size: {c_train.get('batch_size')}")
    w(f"  - Epochs: {c_train.get('epochs')} (max)")
    w(f"  - Early Stopping: Patience {c_train.get('early_stopping_patience')}")
    w(f"  - Mixed Precision: {'Enabled (FP16)' if c_train.get('amp') and not str(device).startswith('cpu') else 'Disabled'}"
      + (" (requested, off on CPU)" if c_train.get("amp") and str(device).startswith("cpu") else ""))
    w(f"  - Gradient Clipping: Max norm {c_train.get('grad_clip')}")
    w("Data Augmentation:")
    w(f"  - Random Horizontal Flip (p={c_aug.get('hflip_p')})")
    w(f"  - Color Jitter (brightness {c_aug.get('brightness')}, contrast {c_aug.get('contrast')}, "
      f"saturation {c_aug.get('saturation')}, hue {c_aug.get('hue')})")
    if sizes:
        w(f"  - Random Resize: shorter side {min(sizes)}-{max(sizes)} px ({len(sizes)} scales), "
          f"longer side <= {c_input.get('max_size')} px; test {c_input.get('test_size')} px")
    w("```\n")
    w("---\n")

    # training results
    total_epochs = len(epochs)
    early = bool(total_epochs and c_train.get("epochs") and total_epochs < c_train["epochs"] and state == "completed")
    w("## 📈 Training Results\n")
    w("### Final Metrics\n")
    w(f"Validation metrics of the best epoch (score threshold {c_eval.get('score_threshold', 0.5)} for P/R/F1).\n")
    w(_table(["Metric", "Value", "Notes"], [
        ["**Best mAP@0.5**", _fmt(best.get("val_map50")), _met(best.get("val_map50"), TARGETS["map50"])],
        ["**mAP@0.5:0.95**", _fmt(best.get("val_map50_95")), "COCO primary metric"],
        ["**Precision**", _fmt(best.get("val_precision")), _met(best.get("val_precision"), TARGETS["precision"])],
        ["**Recall**", _fmt(best.get("val_recall")), _met(best.get("val_recall"), TARGETS["recall"])],
        ["**F1-Score**", _fmt(best.get("val_f1")), "Harmonic mean"],
        ["**Best Epoch**", _fmt(best.get("epoch")), "Epoch with the highest val mAP@0.5"],
        ["**Total Epochs**", _fmt(total_epochs),
         ("early stopping triggered" if early else f"of {c_train.get('epochs')} planned")],
    ]))
    w("")
    w("### Training Curve\n")
    if "curve" in images:
        w(f"![Training curve]({img_dir_name}/{images['curve']})\n")
    w(_table(["Epoch", "Train Loss", "Val mAP@0.5", "LR"],
             [[e["epoch"], _fmt(e.get("train_loss")), _fmt(e.get("val_map50")), _lr(e.get("lr"))] for e in epochs]))
    w("")
    conv = info["convergence"]
    w("### Loss Convergence\n")
    w(f"- **Initial Loss:** {_fmt(conv['initial_loss'])} (first batch); epoch 1 mean {_fmt(conv['first_epoch_loss'])}")
    w(f"- **Final Loss:** {_fmt(conv['final_loss'])} (last epoch mean)")
    w(f"- **Convergence:** {conv['judgement']}" + (f"; {conv['trend']} at the end" if conv.get("trend") else ""))
    w("\n---\n")

    # test
    w("## 🎯 Test Set Evaluation\n")
    split = test.get("split", "test")
    w("```bash\n# Command used:")
    w(f"python -m engine evaluate \\\n  --checkpoint {info['checkpoint_dir'].as_posix()}/best.pth \\\n"
      f"  --config {info['run_dir'].as_posix()}/config.yaml \\\n  --device {test.get('device', 'cuda')}"
      + (f" \\\n  --split {split}" if split != "test" else ""))
    w("```\n")
    w("### Results\n")
    if test:
        speed = test.get("speed") or {}
        w(_table(["Metric", "Value"], [
            ["**Checkpoint**", f"`{test.get('checkpoint', '—')}` (epoch {test.get('checkpoint_epoch', '—')}), split `{split}`"],
            ["**Test mAP@0.5**", _fmt(test.get("map50"))],
            ["**Test mAP@0.5:0.95**", _fmt(test.get("map50_95"))],
            ["**Test Precision**", f"{_fmt(test.get('precision'))} (at score ≥ {test.get('score_threshold')})"],
            ["**Test Recall**", _fmt(test.get("recall"))],
            ["**Test F1**", _fmt(test.get("f1"))],
            ["**Inference Time**", f"{_fmt(test.get('ms_per_image'), 1)} ms/image (model only, batch 1, "
                                   f"{test.get('device_name') or test.get('device')}, AMP {'on' if test.get('amp') else 'off'})"],
            ["**End-to-end**", f"{_fmt(speed.get('total_ms'), 1)} ms/image = preprocess {_fmt(speed.get('preprocess_ms'), 1)}"
                               f" + model {_fmt(speed.get('model_ms'), 1)} + postprocess {_fmt(speed.get('postprocess_ms'), 1)}"
                               f"; {_fmt(speed.get('fps_batch1'), 1)} FPS"],
            ["**Images**", f"{_fmt(test.get('num_images'))} images, {_fmt(test.get('num_gt_boxes'))} plates"],
        ]))
        bf = test.get("best_f1") or {}
        if bf:
            w(f"\nAt the max-F1 confidence {_fmt(bf.get('threshold'), 2)}: precision {_fmt(bf.get('precision'))}, "
              f"recall {_fmt(bf.get('recall'))}, F1 {_fmt(bf.get('f1'))} (TP {bf.get('tp')}, FP {bf.get('fp')}, FN {bf.get('fn')}).")
        if "pr" in images:
            w(f"\n![Precision-recall curve]({img_dir_name}/{images['pr']})")
    else:
        w(f"{PROMPT} this run has no test evaluation yet: run the command above, then `python -m engine report --run {run}` again.")
    w("\n---\n")

    # samples
    w("## 📸 Sample Predictions\n")
    samples = info["samples"] or {}
    for title, key in (("Good Predictions", "good"), ("Challenging Cases", "challenging")):
        w(f"### {title}\n")
        items = samples.get(key) or []
        if not items:
            w("None selected (no test evaluation yet)." if not samples else "None in this split.")
        for item in items:
            name = images.get(f"sample:{item.get('file') or ''}")
            desc = [f"**{item.get('file_name', item.get('image_id'))}**",
                    f"ground truth {item.get('gt_count', '—')} plate(s)",
                    f"predicted {item.get('pred_count', '—')}"]
            if item.get("iou") is not None:
                desc.append(f"IoU {_fmt(item.get('iou'), 2)}")
            if item.get("confidence") is not None:
                desc.append(f"confidence {_fmt(item.get('confidence'), 2)}")
            if item.get("kind"):
                desc.append(f"case: {item['kind']}")
            if item.get("reasons"):
                desc.append("measured: " + ", ".join(item["reasons"]))
            w("- " + " — ".join(desc))
            if name:
                w(f"\n  ![{item.get('file_name', '')}]({img_dir_name}/{name})\n")
        w("")
    w("Ground truth in green, predictions in orange with their score.\n")
    w("---\n")

    # checkpoints
    w("## 💾 Model Checkpoints\n")
    ck = info["checkpoints"]  # sizes measured now from the files
    cdir = info["checkpoint_dir"].as_posix()
    w(_table(["File", "Size", "Description"], [
        [f"`{cdir}/best.pth`", f"{ck['best.pth']:.1f} MB" if ck["best.pth"] else "missing",
         f"Best validation mAP@0.5 (epoch {best.get('epoch', '—')})"],
        [f"`{cdir}/last.pth`", f"{ck['last.pth']:.1f} MB" if ck["last.pth"] else "missing",
         f"Last completed epoch ({total_epochs}); resumes with `python -m engine train --resume {run}`"],
    ]))
    w("\nEach file holds model, optimizer, scheduler and scaler state, RNG states and the config.\n")
    w("---\n")

    # tensorboard
    w("## 📊 TensorBoard Logs\n")
    w(f"**Location:** `{info['run_dir'].as_posix()}/`\n")
    tags = info["tags"]
    w("**Scalars tracked:** " + (", ".join(f"`{t}`" for t in tags) if tags else "no event file found"))
    w("\n```bash")
    w(f"tensorboard --logdir {Path(info['run_dir']).parent.as_posix()} --host 0.0.0.0 --port 6006")
    w("```\n")
    w("---\n")

    # observations
    w("## 🔍 Observations & Notes\n")
    w("### Measured\n")
    facts = [f"Train loss: {conv['judgement']}."]
    if best:
        facts.append(f"Best val mAP@0.5 {_fmt(best.get('val_map50'))} at epoch {best.get('epoch')} of {total_epochs}.")
    if early:
        facts.append(f"Early stopping ended the run after {total_epochs} of {c_train.get('epochs')} epochs "
                     f"(patience {c_train.get('early_stopping_patience')}).")
    ips = [s.get("images_per_s") for s in info["steps"] if s.get("images_per_s")]
    if ips:
        facts.append(f"Training throughput: median {sorted(ips)[len(ips) // 2]:.1f} images/s on {device_name}.")
    if test:
        facts.append(f"Test mAP@0.5 {_fmt(test.get('map50'))} vs best val {_fmt(best.get('val_map50'))}.")
    for f in facts:
        w(f"- {f}")
    w("")
    for title in ("What Worked Well", "Challenges Encountered", "Lessons Learned"):
        w(f"### {title}\n")
        w(f"- {PROMPT} (a run cannot know this; write it here)\n")
    if c_run.get("notes"):
        w(f"Run notes from the config: {c_run['notes']}\n")
    w("---\n")

    w("## 🚀 Next Steps\n")
    w("- [ ] Fine-tune on additional data\n- [ ] Experiment with different backbones (ResNet50, EfficientNet)\n"
      "- [ ] Add data augmentation (Mosaic, MixUp)\n- [ ] Optimize for inference speed\n- [ ] Deploy to production API\n")
    w("---\n")

    # log excerpt
    w("## 📝 Training Log Excerpt\n")
    w("```")
    excerpt = log_excerpt(info["log"])
    w("\n".join(excerpt) if excerpt else "(train.log is empty or missing)")
    w("```\n")
    w("---\n")

    # baselines
    w("## 🏆 Comparison with Baselines\n")
    our_map = test.get("map50") if test else best.get("val_map50")
    fps = (test.get("speed") or {}).get("fps_batch1") if test else None
    rows = [[f"**Ours ({c_model.get('name')})**", _fmt(our_map), _params(test.get("params")),
             f"{fps:.1f} (measured, {test.get('device_name') or test.get('device')})" if fps else "—"]]
    for b in load_baselines():
        rows.append([b.get("name", "?"), f"~{b.get('map50')}", _params(b.get("params")), f"~{b.get('fps')}"])
    w(_table(["Model", "mAP@0.5", "Params", "Speed (FPS)"], rows))
    w(f"\nOur mAP@0.5 is {'test-set' if test else 'best validation'}; parameters are counted from the model, "
      "FPS is measured at batch 1. Baseline rows are quoted references from `configs/baselines.yaml`, "
      "not measured here.\n")
    w("---\n")

    w("## 📧 Contact\n")
    w(f"**Author:** {c_run.get('author') or PROMPT + ' set `run.author` in the config'}  ")
    w(f"**Contact:** {c_run.get('contact') or PROMPT + ' set `run.contact` in the config'}\n")
    w("---\n")
    w(f"**Last Updated:** {_when(status.get('updated_at'))}  ")
    w(f"**Training Status:** {STATE_LINE.get(state, state)}")
    return "\n".join(out) + "\n"


def _params(value: Any) -> str:
    if not value:
        return "—"
    if isinstance(value, (int, float)):
        return f"{value / 1e6:.1f}M"
    return str(value)


def write_report(run: str, runs_dir: str = "runs", checkpoints_dir: str = "checkpoints",
                 out: Optional[str] = None) -> Path:
    """Write RESULTS.md and its images to `out` (default runs/<run>/report/); returns the md path."""
    info = gather(run, runs_dir, checkpoints_dir)
    out_dir = Path(out) if out else info["run_dir"] / "report"
    img_dir = out_dir / "img"
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
    md = out_dir / "RESULTS.md"
    runs.atomic_write_text(md, render(info, "img", images))
    return md


def report_zip(md_path: Path) -> bytes:
    """RESULTS.md plus its img/ folder as a zip (for the dashboard's download button)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(md_path, md_path.name)
        img_dir = md_path.parent / "img"
        if img_dir.is_dir():
            for p in sorted(img_dir.iterdir()):
                if p.is_file():
                    zf.write(p, f"img/{p.name}")
    return buf.getvalue()
