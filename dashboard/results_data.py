"""The Results page's data: best metrics vs targets, epoch table, test results, curves, samples,
probes, baselines, checkpoints and comparisons, read from the files the engine writes
(engine/runs.py names them; evaluate, probes and the report write them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine import bench_table, report, runs
from engine.bench_table import read_bench  # noqa: F401  (the page's bench.json reader)
from engine.formatting import params as params_text  # noqa: F401  (the page's parameter-count text)
from engine.samples import sample_caption  # noqa: F401  (the page's sample captions)
from engine.targets import TARGET_LABELS, TARGETS, load_baselines, met  # noqa: F401  (re-exported for the page)

from dashboard.series import _ANSI, log_tail

PR_CURVE_FILE = runs.PR_CURVE_FILE
PRF_FILE = runs.PRF_FILE


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------- validation summary
def summary(epochs: list[dict]) -> dict:
    """Best val mAP@0.5 and the precision/recall/F1 of that epoch, best epoch, total epochs."""
    best = runs.best_epoch_record(epochs) or {}
    return {
        "map50": _num(best.get("val_map50")), "map50_95": _num(best.get("val_map50_95")),
        "precision": _num(best.get("val_precision")), "recall": _num(best.get("val_recall")),
        "f1": _num(best.get("val_f1")), "best_epoch": best.get("epoch"),
        "total_epochs": max((e["epoch"] for e in epochs), default=0),
    }


def target_rows(values: dict) -> list[dict]:
    """One row per target: metric, value, target, met / missed / no data."""
    rows = []
    for key, target in TARGETS.items():
        value = _num(values.get(key))
        ok = met(value, target)
        rows.append({"metric": TARGET_LABELS[key], "value": value, "target": f"> {target:.2f}",
                     "result": "no data" if ok is None else ("met" if ok else "missed")})
    return rows


def epoch_table(epochs: list[dict]) -> list[dict]:
    return [{
        "epoch": e.get("epoch"), "train loss": _num(e.get("train_loss")), "val mAP@0.5": _num(e.get("val_map50")),
        "val mAP@0.5:0.95": _num(e.get("val_map50_95")), "precision": _num(e.get("val_precision")),
        "recall": _num(e.get("val_recall")), "F1": _num(e.get("val_f1")), "LR": _num(e.get("lr")),
        "time (s)": _num(e.get("epoch_time_s")), "best": "★" if e.get("is_best") else "",
    } for e in epochs]


# ----------------------------------------------------------------------------- test results
def test_dir(run_dir: Path) -> Path:
    return run_dir / runs.TEST_DIR


def read_test_metrics(run_dir: Path) -> Optional[dict]:
    data = runs.read_json(test_dir(run_dir) / runs.TEST_METRICS_FILE)
    return data if isinstance(data, dict) else None


def test_summary(metrics: dict) -> dict:
    """The headline numbers of test/metrics.json (engine/evaluate.py writes them)."""
    speed = metrics.get("speed") or {}
    return {
        "map50": _num(metrics.get("map50")), "map50_95": _num(metrics.get("map50_95")),
        "map75": _num(metrics.get("map75")), "precision": _num(metrics.get("precision")),
        "recall": _num(metrics.get("recall")), "f1": _num(metrics.get("f1")),
        "ms_per_image": _num(metrics.get("ms_per_image")), "fps": _num(speed.get("fps_batch1")),
        "params": metrics.get("params"), "images": metrics.get("num_images"),
        "device": metrics.get("device_name") or metrics.get("device"),
    }


def thresholds(metrics: Optional[dict]) -> dict:
    """{'deployment': t, 'max F1': t} from test/metrics.json (missing ones left out)."""
    found = {"deployment": _num((metrics or {}).get("score_threshold")),
             "max F1": _num(((metrics or {}).get("best_f1") or {}).get("threshold"))}
    return {k: v for k, v in found.items() if v is not None}


def read_curve(run_dir: Path, name: str) -> Optional[dict]:
    data = runs.read_json(test_dir(run_dir) / name)
    return data if isinstance(data, dict) else None


def samples(run_dir: Path) -> dict[str, list[dict]]:
    """{'good': [...], 'challenging': [...]} with `path` set to the drawn image when it exists."""
    data = runs.read_json(test_dir(run_dir) / runs.SAMPLES_FILE)
    out: dict[str, list[dict]] = {}
    if not isinstance(data, dict):
        return out
    for group in ("good", "challenging"):
        items = []
        for item in data.get(group) or []:
            if not isinstance(item, dict):
                continue
            rel = item.get("file")
            path = test_dir(run_dir) / rel if rel else None
            items.append({**item, "path": path if path and path.is_file() else None})
        out[group] = items
    return out


# ----------------------------------------------------------------------------- probes
def _probe_index(run_dir: Path) -> dict:
    index = runs.read_json(run_dir / runs.PROBES_DIR / runs.PROBES_INDEX)
    return index if isinstance(index, dict) else {}


def probe_epochs(run_dir: Path) -> list[int]:
    """Epochs listed in probes/index.json (engine/probes.py rewrites it after each epoch), ascending."""
    return sorted(e for e in _probe_index(run_dir).get("epochs") or [] if isinstance(e, int))


def probe_images(run_dir: Path, epoch: int) -> list[tuple[Path, str]]:
    """(thumbnail, caption) for one epoch from probes/index.json; thumbnails not (yet) on disk are left out."""
    index = _probe_index(run_dir)
    names = {str(img["id"]): img.get("file_name") or str(img["id"])
             for img in index.get("images") or [] if isinstance(img, dict) and "id" in img}
    detections = (index.get("detections") or {}).get(str(epoch)) or {}
    out = []
    for image_id, det in detections.items():
        path = run_dir / runs.PROBES_DIR / str(det.get("file", ""))
        if not det.get("file") or not path.is_file():
            continue
        scores = det.get("scores") or []
        caption = f"{names.get(image_id, image_id)} · {len(scores)} box(es)" + (f", top {max(scores):.2f}" if scores else "")
        out.append((path, caption))
    return out


# ----------------------------------------------------------------------------- baselines, checkpoints
def baseline_table(our_name: str, our: dict, baselines: list[dict], bench: Optional[dict] = None) -> list[dict]:
    """Our measured rows first (test set, then each backend of the run's bench.json), then the quoted references."""
    rows = [{"model": f"ours ({our_name})", "mAP@0.5": _num(our.get("map50")),
             "params": params_text(our.get("params")),
             "FPS": None if our.get("fps") is None else round(our["fps"], 1),
             "source": our.get("source", "measured")}]
    for row in (bench or {}).get("rows", []):
        if bench_table.measured(row):
            rows.append({**rows[0], "model": f"ours, {row['backend']} {row['size']} px",
                         "FPS": round(bench_table.fps_batch1(row), 1),
                         "source": f"measured: bench, {row['device']} ({bench_table.machine_text(bench, row['device'])})"})
    for b in baselines:
        rows.append({"model": str(b.get("name", "?")), "mAP@0.5": _num(b.get("map50")),
                     "params": params_text(b.get("params")), "FPS": _num(b.get("fps")),
                     "source": str(b.get("source") or b.get("note") or "quoted reference")})
    return rows


def checkpoint_rows(ckpt_dir: Path, status: dict) -> list[dict]:
    """Files in checkpoints/<run>/ with size in MB and what they hold."""
    if not ckpt_dir.is_dir():
        return []
    best = (status or {}).get("best") or {}
    descriptions = {
        runs.BEST_CKPT: "best val mAP@0.5" + (f" (epoch {best['epoch']})" if best.get("epoch") else ""),
        runs.LAST_CKPT: "last completed epoch" + (f" ({status['epoch']})" if status.get("epoch") else "")
                        + "; resume point",
    }
    rows = []
    for p in sorted(ckpt_dir.glob("*.pth")):
        try:
            size = p.stat().st_size / 1e6
        except OSError:
            continue
        rows.append({"file": str(p), "size MB": round(size, 1), "description": descriptions.get(p.name, "")})
    return rows


# ----------------------------------------------------------------------------- comparison
COMPARE_KEYS = (("map50", "val mAP@0.5"), ("map50_95", "val mAP@0.5:0.95"), ("precision", "val precision"),
                ("recall", "val recall"), ("f1", "val F1"), ("best_epoch", "best epoch"),
                ("total_epochs", "epochs"))
TEST_COMPARE_KEYS = (("map50", "test mAP@0.5"), ("map50_95", "test mAP@0.5:0.95"), ("precision", "test precision"),
                     ("recall", "test recall"), ("f1", "test F1"), ("ms_per_image", "test ms/image"))


def deltas(a: dict, b: dict, keys=COMPARE_KEYS) -> list[dict]:
    """Rows metric, A, B, delta (B - A) for each key where at least one side has a number."""
    rows = []
    for key, label in keys:
        va, vb = _num(a.get(key)), _num(b.get(key))
        if va is None and vb is None:
            continue
        rows.append({"metric": label, "A": va, "B": vb,
                     "delta (B − A)": None if va is None or vb is None else vb - va})
    return rows


# ----------------------------------------------------------------------------- log, report
def log_excerpt(log_path: Path, max_lines: int = 40) -> str:
    """The report's excerpt (banner, new-best, early-stop, summary lines) or else the log's tail."""
    lines = report.log_excerpt(log_path, max_lines=max_lines)
    if lines:
        return "\n".join(_ANSI.sub("", line) for line in lines)
    return log_tail(log_path, max_lines=max_lines)


@dataclass
class ReportFiles:
    markdown: str
    zip_bytes: bytes
    path: Path


def build_report(run: str, runs_dir: Path, checkpoints_dir: Path, out: Path) -> ReportFiles:
    """engine.report.write_report -> RESULTS.md text and the zip with its images; EngineError for a bad run."""
    md_path = report.write_report(run, runs_dir=str(runs_dir), checkpoints_dir=str(checkpoints_dir), out=str(out))
    return ReportFiles(markdown=md_path.read_text(encoding="utf-8"), zip_bytes=report.report_zip(md_path),
                       path=md_path)
