"""Validation during training and the full evaluation of a checkpoint on a split.

`validate` is the quick per-epoch pass the trainer calls. `evaluate_checkpoint` is
`python -m engine evaluate`: it predicts every image of the split at batch 1 (timed: preprocess,
model, postprocess; 3 warm-up runs first; CUDA synchronised) and writes to `out`
(default `<runs_dir>/<run>/test/`):

    metrics.json            COCO mAPs, P/R/F1 + TP/FP/FN at the deployment threshold and at max F1,
                            speed, device, parameters, checkpoint sizes, dataset counts
    pr_curve.json           precision/recall points, envelope and 101-point interpolation (metrics.pr_curve)
    prf_vs_confidence.json  precision, recall, F1 at confidences 0, 0.01, ..., 1
    predictions.json        COCO results (xywh, category_id 1, the dataset's image ids), scores >= 0.05
    samples.json, samples/  good and challenging predictions drawn (engine.samples)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from engine import metrics
from engine.config import load_config, validate_run_name
from engine.data import PlateDataset, load_split
from engine.errors import EngineError
from engine.model import count_parameters, device_name, load_model_from_checkpoint, resolve_device
from engine.predict import infer
from engine.runs import (BEST_CKPT, LAST_CKPT, PR_CURVE_FILE, PRF_FILE, PREDICTIONS_FILE, TEST_DIR,
                         TEST_METRICS_FILE, atomic_write_json, atomic_write_text)
from engine.samples import luminance_stats, select_samples, write_samples

WARMUP_RUNS = 3


class EvaluationError(EngineError):
    """Evaluation cannot run (empty split, config that does not fit the checkpoint...)."""


# ----------------------------------------------------------------------------- validation
def _to_numpy(tensor) -> np.ndarray:
    return tensor.as_subclass(torch.Tensor).detach().float().cpu().numpy() if isinstance(tensor, torch.Tensor) \
        else np.asarray(tensor, dtype=np.float32)


def predict_loader(model: torch.nn.Module, loader, device: Union[str, torch.device], amp: bool = False,
                   progress: bool = True, desc: str = "predict",
                   amp_dtype: torch.dtype = torch.float16) -> tuple[list[dict], list[dict]]:
    """(gts, preds) in engine.metrics' format for every image of `loader` (model in eval mode, no grad).

    The loader yields (images, targets) as PlateDataset + collate_fn do; its targets are the gts.
    `amp` autocasts to `amp_dtype`: float16 only on CUDA, bfloat16 on CUDA and CPU.
    """
    device = torch.device(device)
    use_amp = amp and (device.type == "cuda" or amp_dtype == torch.bfloat16)
    model.eval()
    gts, preds = [], []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            images = [image.to(device, non_blocking=True) for image in images]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = model(images)
            for image, target, output in zip(images, targets, outputs):
                image_id = int(target["image_id"])
                gts.append({"image_id": image_id, "boxes": _to_numpy(target["boxes"]).reshape(-1, 4),
                            "width": int(image.shape[-1]), "height": int(image.shape[-2])})
                preds.append({"image_id": image_id, "boxes": _to_numpy(output["boxes"]).reshape(-1, 4),
                              "scores": _to_numpy(output["scores"]).reshape(-1)})
    return gts, preds


def validate(model: torch.nn.Module, loader, device: Union[str, torch.device], score_threshold: float,
             amp: bool = False, iou: float = 0.5, progress: bool = True,
             amp_dtype: torch.dtype = torch.float16) -> dict:
    """{map50, map50_95, map75, map_small/medium/large, precision, recall, f1, tp, fp, fn, score_threshold}.

    precision / recall / F1 / TP / FP / FN count a match at IoU >= `iou`. The model's train/eval
    mode is restored afterwards.
    """
    was_training = model.training
    try:
        gts, preds = predict_loader(model, loader, device, amp, progress, desc="validate", amp_dtype=amp_dtype)
    finally:
        model.train(was_training)
    matches = metrics.match_detections(gts, preds, iou)  # one vectorised matching pass
    return metrics.detection_metrics(gts, preds, score_threshold, iou, matches=matches)


# ----------------------------------------------------------------------------- evaluate a checkpoint
def _checkpoint_info(path: Path) -> dict:
    """run name and epoch of a checkpoint, read without loading its tensors (mmap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ckpt = {}
    run = ckpt.get("run") if isinstance(ckpt, dict) else None
    names = [n for n in (run, path.resolve().parent.name) if isinstance(n, str) and _is_run_name(n)]
    return {"run": names[0] if names else None, "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None}


def _is_run_name(name: str) -> bool:
    """A name that stays inside runs_dir (a checkpoint's stored run name is not trusted)."""
    try:
        validate_run_name(name)
    except EngineError:
        return False
    return True


def _checkpoint_sizes(path: Path) -> dict:
    sizes = {}
    for name in (BEST_CKPT, LAST_CKPT, path.name):
        file = path.parent / name
        if file.is_file():
            sizes[name] = round(file.stat().st_size / 2**20, 2)
    return sizes


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else 0.0


def _print_table(result: dict, out: Path) -> None:
    thr, best, speed = result["score_threshold"], result["best_f1"], result["speed"]
    rows = [
        ("mAP@0.5", f"{result['map50']:.4f}"),
        ("mAP@0.5:0.95", f"{result['map50_95']:.4f}"),
        ("AP75", f"{result['map75']:.4f}"),
        ("AP small / medium / large", f"{result['map_small']:.4f} / {result['map_medium']:.4f} / {result['map_large']:.4f}"),
        (f"precision @ {thr:.2f}", f"{result['precision']:.4f}"),
        (f"recall @ {thr:.2f}", f"{result['recall']:.4f}"),
        (f"F1 @ {thr:.2f}", f"{result['f1']:.4f}"),
        (f"TP / FP / FN @ {thr:.2f}", f"{result['tp']} / {result['fp']} / {result['fn']}"),
        ("max F1", f"{best['f1']:.4f} at confidence {best['threshold']:.3f} "
                   f"(P {best['precision']:.3f}, R {best['recall']:.3f}, TP/FP/FN {best['tp']}/{best['fp']}/{best['fn']})"),
        ("ms / image (model)", f"{result['ms_per_image']:.1f}"),
        ("ms / image pre / model / post", f"{speed['preprocess_ms']:.1f} / {speed['model_ms']:.1f} / {speed['postprocess_ms']:.1f}"),
        ("FPS (batch 1, end to end)", f"{speed['fps_batch1']:.1f}"),
        ("device", f"{result['device']} ({result['device_name']}), AMP {'on' if result['amp'] else 'off'}"),
        ("parameters", f"{result['params']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Evaluation of {result['checkpoint']} on {result['data_root']}/{result['split']} "
          f"({result['num_images']} images, {result['num_gt_boxes']} plates)")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
    print(f"Results written to {out}")


def _predict_timed(model: torch.nn.Module, dataset: PlateDataset, dev: torch.device, amp: bool, progress: bool,
                   desc: str, on_image: Optional[Callable[[], None]]) -> tuple:
    """Predict every image at batch 1 after WARMUP_RUNS untimed runs; returns (gts, preds, image
    brightness stats, preprocess ms, model ms, postprocess ms) per image."""
    first, _ = dataset[0]
    for _ in range(WARMUP_RUNS):
        infer(model, first.to(dev), dev, amp)
    gts, preds, image_stats, pre_ms, model_ms, post_ms = [], [], {}, [], [], []
    for index in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not progress):
        if on_image is not None:
            on_image()
        start = time.perf_counter()
        image, _ = dataset[index]
        on_device = image.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        pre_ms.append((time.perf_counter() - start) * 1000)
        boxes, scores, ms_model, ms_post = infer(model, on_device, dev, amp)
        model_ms.append(ms_model)
        post_ms.append(ms_post)
        record = dataset.records[index]
        gts.append({"image_id": record.id, "boxes": record.boxes, "width": record.width, "height": record.height})
        preds.append({"image_id": record.id, "boxes": boxes, "scores": scores})
        image_stats[record.id] = luminance_stats(image)
    return gts, preds, image_stats, pre_ms, model_ms, post_ms


def _speed_summary(pre_ms: list, model_ms: list, post_ms: list) -> dict:
    """Mean milliseconds per image for each stage, and the batch-1 frame rates they imply."""
    speed = {"preprocess_ms": round(_mean(pre_ms), 3), "model_ms": round(_mean(model_ms), 3),
             "postprocess_ms": round(_mean(post_ms), 3)}
    speed["total_ms"] = round(sum(speed.values()), 3)
    speed["fps_batch1"] = round(1000.0 / speed["total_ms"], 2) if speed["total_ms"] > 0 else 0.0
    speed["model_fps"] = round(1000.0 / speed["model_ms"], 2) if speed["model_ms"] > 0 else 0.0
    speed["images_timed"] = len(model_ms)
    speed["warmup_runs"] = WARMUP_RUNS
    return speed


def evaluate_checkpoint(checkpoint: Union[str, Path], config_path: Optional[Union[str, Path]] = None,
                        device: str = "auto", data_root: Optional[Union[str, Path]] = None, split: str = "test",
                        out: Optional[Union[str, Path]] = None, progress: bool = True, verbose: bool = True,
                        on_image: Optional[Callable[[], None]] = None) -> dict:
    """Evaluate a checkpoint on a split; write the files listed in the module docstring; return metrics.json.

    The architecture and weights come from the checkpoint. `config_path` (else the checkpoint's
    own config) gives the data root, input sizes, eval thresholds and AMP; `data_root` overrides
    the data root. Errors (bad checkpoint, bad dataset, missing device) raise EngineError.
    `on_image` is called before each image (the trainer's heartbeat; an exception it raises,
    e.g. a stop request, ends the evaluation with nothing written).
    """
    path = Path(checkpoint)
    dev = resolve_device(device)
    model, ckpt_cfg = load_model_from_checkpoint(path, device=dev)
    cfg = load_config(config_path) if config_path else ckpt_cfg
    if cfg.model.name != ckpt_cfg.model.name:
        raise EvaluationError(f"{config_path}: model.name {cfg.model.name!r} does not match the checkpoint's "
                              f"{ckpt_cfg.model.name!r} ({path})")
    transform = model.transform
    if hasattr(transform, "test_size"):
        transform.test_size = cfg.input.test_size
    transform.max_size = cfg.input.max_size
    if hasattr(transform, "test_canvas"):
        transform.test_canvas = tuple(cfg.input.test_canvas) if cfg.input.test_canvas else None
    model.eval()
    info = _checkpoint_info(path)
    root = Path(data_root) if data_root else Path(cfg.data.root)
    coco_split = load_split(root, split)
    if not coco_split.images:
        raise EvaluationError(f"{root / split}: the split has no images")
    if not out and not info["run"]:
        raise EvaluationError(f"{path}: cannot tell which run this checkpoint belongs to; pass --out DIR")
    out_dir = Path(out) if out else Path(ckpt_cfg.run.runs_dir) / info["run"] / TEST_DIR
    amp = bool(cfg.train.amp) and dev.type == "cuda"
    thr, iou = cfg.eval.score_threshold, cfg.eval.iou_threshold

    dataset = PlateDataset(coco_split, train=False)
    records = dataset.records
    gts, preds, image_stats, pre_ms, model_ms, post_ms = _predict_timed(model, dataset, dev, amp, progress,
                                                                         f"evaluate {split}", on_image)
    matches = metrics.match_detections(gts, preds, iou)
    at_thr = metrics.prf_at_threshold(gts, preds, thr, iou, matches=matches)
    best = metrics.best_f1(gts, preds, iou, matches=matches)
    curve = metrics.pr_curve(gts, preds, iou, matches=matches)
    prf_conf = metrics.prf_vs_confidence(gts, preds, iou=iou, matches=matches)
    speed = _speed_summary(pre_ms, model_ms, post_ms)
    result = {
        **metrics.coco_map(gts, preds),
        **{k: at_thr[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
        "score_threshold": float(thr), "iou_threshold": float(iou),
        "best_f1": {k: best[k] for k in ("threshold", "precision", "recall", "f1", "tp", "fp", "fn")},
        "pr_ap50": curve["ap"],
        "ms_per_image": speed["model_ms"],
        "speed": speed,
        "device": str(dev), "device_name": device_name(dev), "amp": amp,
        "num_images": len(gts), "num_gt_boxes": int(sum(len(g["boxes"]) for g in gts)),
        "num_detections": int(sum(len(p["scores"]) for p in preds)),
        "params": count_parameters(model), "model": ckpt_cfg.model.name, "test_size": cfg.input.test_size,
        "checkpoint_sizes_mb": _checkpoint_sizes(path),
        "split": split, "data_root": str(root), "checkpoint": str(path), "run": info["run"],
        "checkpoint_epoch": info["epoch"], "created_at": time.time(),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda if dev.type == "cuda" else None,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    # the long point lists are written compactly (one line)
    atomic_write_text(out_dir / PR_CURVE_FILE, json.dumps(curve))
    atomic_write_text(out_dir / PRF_FILE, json.dumps({**prf_conf, "score_threshold": float(thr),
                                                      "best_f1": result["best_f1"]}))
    atomic_write_text(out_dir / PREDICTIONS_FILE, json.dumps(metrics.coco_results(preds)))
    selection = select_samples(matches, thr, image_stats)
    write_samples(selection, matches, {r.id: r.path for r in records}, out_dir,
                  file_names={r.id: r.file_name for r in records})
    atomic_write_json(out_dir / TEST_METRICS_FILE, result)  # last: its presence means the evaluation finished
    if verbose:
        _print_table(result, out_dir)
    return result
