"""The Results page's data: best metrics vs targets, epoch table, test results, curves, samples,
probes, baselines, checkpoints and comparisons, all read from a run's files."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from engine import runs
from engine.report import load_baselines  # noqa: F401  (re-exported for the Results page)

from dashboard.settings import TARGETS

TEST_METRICS_FILE = "metrics.json"
PR_CURVE_FILE = "pr_curve.json"
PRF_FILE = "prf_vs_confidence.json"
SAMPLES_FILE = "samples.json"
PROBES_INDEX = "index.json"
TARGET_LABELS = {"map50": "mAP@0.5", "precision": "precision", "recall": "recall"}


def _num(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def dig(d: Any, *paths: str) -> Any:
    """The first value found among dotted paths ('speed.fps_batch1') in nested dicts, else None."""
    for path in paths:
        node = d
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None:
            return node
    return None


# ----------------------------------------------------------------------------- validation summary
def best_epoch_record(epochs: list[dict]) -> Optional[dict]:
    scored = [e for e in epochs if _num(e.get("val_map50")) is not None]
    if not scored:
        return None
    return max(scored, key=lambda e: (e["val_map50"], -e["epoch"]))


def met(value: Optional[float], target: float) -> Optional[bool]:
    """True when value > target (the template's targets are strict), None when unknown."""
    return None if value is None else value > target


def summary(epochs: list[dict]) -> dict:
    """Best val mAP@0.5 and the precision/recall/F1 of that epoch, best epoch, total epochs."""
    best = best_epoch_record(epochs) or {}
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
    data = runs.read_json(test_dir(run_dir) / TEST_METRICS_FILE)
    return data if isinstance(data, dict) else None


def test_summary(metrics: dict) -> dict:
    """The headline test numbers, whatever nesting the evaluator used."""
    ms = _num(dig(metrics, "ms_per_image", "speed.ms_per_image", "speed.total_ms"))
    fps = _num(dig(metrics, "fps", "speed.fps_batch1", "speed.fps"))
    if fps is None and ms:
        fps = 1000.0 / ms
    return {
        "map50": _num(dig(metrics, "map50")), "map50_95": _num(dig(metrics, "map50_95")),
        "map75": _num(dig(metrics, "map75")),
        "precision": _num(dig(metrics, "precision", "at_threshold.precision", "deployment.precision")),
        "recall": _num(dig(metrics, "recall", "at_threshold.recall", "deployment.recall")),
        "f1": _num(dig(metrics, "f1", "at_threshold.f1", "deployment.f1")),
        "ms_per_image": ms, "fps": fps,
        "params": dig(metrics, "params", "num_params", "parameters"),
        "images": dig(metrics, "images", "num_images"),
        "device": dig(metrics, "device_name", "device"),
    }


def thresholds(metrics: Optional[dict]) -> dict:
    """{'deployment': t, 'max F1': t} found in test metrics.json (missing ones left out)."""
    out = {}
    dep = _num(dig(metrics or {}, "score_threshold", "deployment_threshold", "at_threshold.threshold",
                   "deployment.threshold"))
    best = _num(dig(metrics or {}, "best_f1.threshold", "max_f1.threshold", "at_max_f1.threshold",
                    "best_f1_threshold", "max_f1_threshold"))
    if dep is not None:
        out["deployment"] = dep
    if best is not None:
        out["max F1"] = best
    return out


def read_curve(run_dir: Path, name: str) -> Optional[dict]:
    data = runs.read_json(test_dir(run_dir) / name)
    return data if isinstance(data, dict) else None


def samples(run_dir: Path) -> dict[str, list[dict]]:
    """{'good': [...], 'challenging': [...]} with `path` set to the drawn image when it exists."""
    data = runs.read_json(test_dir(run_dir) / SAMPLES_FILE)
    out: dict[str, list[dict]] = {}
    if not isinstance(data, dict):
        return out
    for group in ("good", "challenging"):
        items = []
        for item in data.get(group) or []:
            if not isinstance(item, dict):
                continue
            rel = item.get("file") or item.get("image_file") or item.get("drawn")
            path = test_dir(run_dir) / rel if rel else None
            items.append({**item, "path": path if path and path.is_file() else None})
        out[group] = items
    return out


def sample_caption(item: dict) -> str:
    parts = [str(item.get("file_name") or item.get("image_id") or "?")]
    if item.get("gt_count") is not None:
        parts.append(f"gt {item['gt_count']}")
    if item.get("pred_count") is not None:
        parts.append(f"pred {item['pred_count']}")
    if _num(item.get("iou")) is not None:
        parts.append(f"IoU {item['iou']:.2f}")
    if _num(item.get("confidence")) is not None:
        parts.append(f"conf {item['confidence']:.2f}")
    if item.get("kind"):
        parts.append(str(item["kind"]))
    if item.get("reasons"):
        parts.append(", ".join(map(str, item["reasons"])))
    return " · ".join(parts)


# ----------------------------------------------------------------------------- probes
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def probe_epochs(run_dir: Path) -> list[int]:
    """Epochs with a probes/epoch_NNN folder, ascending."""
    root = run_dir / runs.PROBES_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _EPOCH_DIR.match(child.name)
        if m and child.is_dir():
            found.append(int(m.group(1)))
    return sorted(found)


def probe_images(run_dir: Path, epoch: int) -> list[tuple[Path, str]]:
    """(thumbnail, caption) for one epoch; captions from probes/index.json when it has them."""
    folder = run_dir / runs.PROBES_DIR / f"epoch_{epoch:03d}"
    if not folder.is_dir():
        return []
    index = runs.read_json(run_dir / runs.PROBES_DIR / PROBES_INDEX)
    names = {}
    dets = {}
    if isinstance(index, dict):
        for img in index.get("images") or []:
            if isinstance(img, dict) and img.get("id") is not None:
                names[str(img["id"])] = img.get("file_name") or str(img["id"])
        per_epoch = index.get("detections") or {}
        if isinstance(per_epoch, dict):
            dets = per_epoch.get(str(epoch)) or per_epoch.get(f"{epoch:03d}") or {}
    out = []
    for thumb in sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png")):
        caption = names.get(thumb.stem, thumb.stem)
        d = dets.get(thumb.stem) if isinstance(dets, dict) else None
        scores = d.get("scores") if isinstance(d, dict) else None
        if isinstance(scores, list):
            caption += f" · {len(scores)} box(es)" + (f", top {max(scores):.2f}" if scores else "")
        out.append((thumb, caption))
    return out


# ----------------------------------------------------------------------------- baselines, checkpoints
def params_text(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1000:
        return f"{value / 1e6:.1f}M"
    return "—" if value in (None, "") else str(value)


def baseline_table(our_name: str, our: dict, baselines: list[dict]) -> list[dict]:
    """Our measured row first, then the quoted references."""
    rows = [{"model": f"ours ({our_name})", "mAP@0.5": _num(our.get("map50")),
             "params": params_text(our.get("params")),
             "FPS": None if our.get("fps") is None else round(our["fps"], 1),
             "source": our.get("source", "measured")}]
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
        runs.BEST_CKPT: f"best val mAP@0.5" + (f" (epoch {best['epoch']})" if best.get("epoch") else ""),
        runs.LAST_CKPT: f"last completed epoch" + (f" ({status['epoch']})" if status.get("epoch") else "")
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


# ----------------------------------------------------------------------------- log
def log_excerpt(log_path: Path, max_lines: int = 40) -> str:
    """The report's excerpt (banner, new-best, early-stop, summary lines) or the log's tail."""
    try:
        from engine.report import log_excerpt as report_excerpt

        lines = report_excerpt(log_path, max_lines=max_lines)
        if lines:
            return "\n".join(_clean(line) for line in lines)
    except Exception:  # the report module is optional for this page
        pass
    from dashboard.series import log_tail

    return log_tail(log_path, max_lines=max_lines)


def _clean(line: str) -> str:
    from dashboard.series import _ANSI

    return _ANSI.sub("", line)


@dataclass
class ReportFiles:
    markdown: str
    zip_bytes: bytes
    path: Path


def build_report(run: str, runs_dir: Path, checkpoints_dir: Path, out: Path) -> ReportFiles:
    """engine.report.write_report -> RESULTS.md text and a zip with its images.

    Raises ImportError when engine/report.py is missing, EngineError for a run it cannot report."""
    import io
    import zipfile

    from engine import report

    md_path = Path(report.write_report(run, runs_dir=str(runs_dir), checkpoints_dir=str(checkpoints_dir),
                                       out=str(out)))
    if hasattr(report, "report_zip"):
        data = report.report_zip(md_path)
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(md_path.parent.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(md_path.parent).as_posix())
        data = buf.getvalue()
    return ReportFiles(markdown=md_path.read_text(encoding="utf-8"), zip_bytes=data, path=md_path)
