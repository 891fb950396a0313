"""Detection metrics for the single plate class.

Inputs are plain lists (one entry per image):

    gts   [{"image_id": int, "boxes": (N,4) xyxy, "width": int, "height": int}, ...]
    preds [{"image_id": int, "boxes": (M,4) xyxy, "scores": (M,)}, ...]

- `coco_map`: mAP@0.5, mAP@0.5:0.95, AP75 and AP small/medium/large from faster-coco-eval
  (`coco_stats` gives all 12 COCOeval numbers, from it or from pycocotools, the reference).
- `match_detections`: one-to-one greedy matching per image, detections by descending score, each
  taking the unmatched ground-truth box with the highest IoU >= `iou` (the rule pycocotools uses).
- `prf_at_threshold`, `prf_vs_confidence`, `best_f1`, `pr_curve`: built on that matching.

Conventions: a detection is kept at threshold t when score >= t. precision = TP / (TP + FP) and is
0 when nothing is kept; recall = TP / (TP + FN) and is 0 when there is no ground truth;
F1 = 2PR / (P + R), 0 when P + R = 0. Like pycocotools, only the `max_dets` (100) highest-scoring
detections of an image count.
"""
from __future__ import annotations

import contextlib
import gc
import io
from typing import Optional, Sequence

import numpy as np

MAX_DETS = 100
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation
COCO_KEYS = ("map50", "map50_95", "map75", "map_small", "map_medium", "map_large")


# ----------------------------------------------------------------------------- helpers
def _as_boxes(boxes) -> np.ndarray:
    arr = np.asarray(boxes if boxes is not None else [], dtype=np.float64)
    return arr.reshape(-1, 4)


def _as_scores(scores) -> np.ndarray:
    return np.asarray(scores if scores is not None else [], dtype=np.float64).reshape(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a, b = _as_boxes(a), _as_boxes(b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _preds_by_image(preds: Sequence[dict]) -> dict:
    """image_id -> (boxes, scores); several entries for one image are concatenated."""
    out: dict = {}
    for p in preds:
        boxes, scores = _as_boxes(p.get("boxes")), _as_scores(p.get("scores"))
        if len(boxes) != len(scores):
            raise ValueError(f"image {p.get('image_id')}: {len(boxes)} boxes but {len(scores)} scores")
        image_id = int(p["image_id"])
        if image_id in out:
            b0, s0 = out[image_id]
            boxes, scores = np.concatenate([b0, boxes]), np.concatenate([s0, scores])
        out[image_id] = (boxes, scores)
    return out


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


# ----------------------------------------------------------------------------- matching
def _per_image(gts: Sequence[dict], preds: Sequence[dict], max_dets: int) -> list[tuple]:
    """(image_id, gt boxes, top-`max_dets` detections by score, their scores, gt) per gt image, by id."""
    by_image = _preds_by_image(preds)
    rows = []
    for gt in sorted(gts, key=lambda g: int(g["image_id"])):
        image_id = int(gt["image_id"])
        pboxes, scores = by_image.get(image_id, (np.zeros((0, 4)), np.zeros(0)))
        order = np.argsort(-scores, kind="mergesort")[:max_dets]
        rows.append((image_id, _as_boxes(gt.get("boxes")), pboxes[order], scores[order], gt))
    return rows


def _padded_ious(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU (images, D, G) with padding, plus valid-detection (images, D) and valid-gt (images, G) masks."""
    n = len(rows)
    D = max((len(r[2]) for r in rows), default=0)
    G = max((len(r[1]) for r in rows), default=0)
    det = np.zeros((n, D, 4))
    gtb = np.zeros((n, G, 4))
    dvalid = np.zeros((n, D), bool)
    gvalid = np.zeros((n, G), bool)
    for i, (_, gboxes, pboxes, _, _) in enumerate(rows):
        det[i, : len(pboxes)], dvalid[i, : len(pboxes)] = pboxes, True
        gtb[i, : len(gboxes)], gvalid[i, : len(gboxes)] = gboxes, True
    area_d = np.clip(det[..., 2] - det[..., 0], 0, None) * np.clip(det[..., 3] - det[..., 1], 0, None)
    area_g = np.clip(gtb[..., 2] - gtb[..., 0], 0, None) * np.clip(gtb[..., 3] - gtb[..., 1], 0, None)
    w = np.clip(np.minimum(det[:, :, None, 2], gtb[:, None, :, 2]) - np.maximum(det[:, :, None, 0], gtb[:, None, :, 0]), 0, None)
    h = np.clip(np.minimum(det[:, :, None, 3], gtb[:, None, :, 3]) - np.maximum(det[:, :, None, 1], gtb[:, None, :, 1]), 0, None)
    inter = w * h
    union = area_d[:, :, None] + area_g[:, None, :] - inter
    ious = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return ious, dvalid, gvalid


def _greedy(ious: np.ndarray, dvalid: np.ndarray, gvalid: np.ndarray, thr: float) -> np.ndarray:
    """pred_gt (images, D): detections in score order, all images at once, each taking the unmatched
    gt with the highest IoU >= thr (the last such gt on ties, as pycocotools does)."""
    n, D, G = ious.shape
    pred_gt = np.full((n, D), -1, dtype=np.int64)
    if not G:
        return pred_gt
    taken = ~gvalid.copy()
    rows = np.arange(n)
    for d in range(D):
        cand = np.where(taken, -np.inf, ious[:, d, :])
        g = G - 1 - np.argmax(cand[:, ::-1], axis=1)
        ok = dvalid[:, d] & (cand[rows, g] >= thr)
        pred_gt[ok, d] = g[ok]
        taken[rows[ok], g[ok]] = True
    return pred_gt


def match_detections(gts: Sequence[dict], preds: Sequence[dict], iou: float = 0.5,
                     max_dets: int = MAX_DETS, images_per_pass: int = 512) -> list[dict]:
    """Per image (in image-id order), the one-to-one greedy matching, vectorised over images.

    Each entry: {"image_id", "gt_boxes", "pred_boxes", "scores" (descending), "pred_gt" (index of the
    matched gt or -1 per detection), "pred_iou" (IoU with the matched gt, else the best IoU with any
    gt), "gt_pred" (index of the matched detection or -1 per gt), "width", "height"}.
    Predictions for images that are not in `gts` are ignored.
    """
    rows = _per_image(gts, preds, max_dets)
    thr = min(iou, 1 - 1e-10)
    out = []
    for start in range(0, len(rows), images_per_pass):
        part = rows[start:start + images_per_pass]
        ious, dvalid, gvalid = _padded_ious(part)
        pred_gt = _greedy(ious, dvalid, gvalid, thr)
        for i, (image_id, gboxes, pboxes, scores, gt) in enumerate(part):
            nd, ng = len(pboxes), len(gboxes)
            pg = pred_gt[i, :nd]
            m_ious = ious[i, :nd, :ng]
            pred_iou = m_ious.max(axis=1) if ng else np.zeros(nd)
            matched = np.flatnonzero(pg >= 0)
            pred_iou[matched] = m_ious[matched, pg[matched]]
            gt_pred = np.full(ng, -1, dtype=np.int64)
            gt_pred[pg[matched]] = matched
            out.append({"image_id": image_id, "gt_boxes": gboxes, "pred_boxes": pboxes, "scores": scores,
                        "pred_gt": pg.copy(), "pred_iou": pred_iou, "gt_pred": gt_pred,
                        "width": gt.get("width"), "height": gt.get("height")})
    return out


def _ranked(matches: list[dict]) -> tuple[np.ndarray, np.ndarray, int]:
    """All detections as (scores descending, is_tp) plus the number of gt boxes.

    Ties are broken the way pycocotools does it (stable sort over images in id order).
    """
    num_gt = int(sum(len(m["gt_boxes"]) for m in matches))
    if not matches:
        return np.zeros(0), np.zeros(0, dtype=bool), 0
    scores = np.concatenate([m["scores"] for m in matches])
    tp = np.concatenate([m["pred_gt"] >= 0 for m in matches])
    order = np.argsort(-scores, kind="mergesort")
    return scores[order], tp[order].astype(bool), num_gt


def _prf(tp: int, fp: int, num_gt: int, threshold: float) -> dict:
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, num_gt)
    return {"threshold": float(threshold), "precision": precision, "recall": recall,
            "f1": _f1(precision, recall), "tp": int(tp), "fp": int(fp), "fn": int(num_gt - tp)}


# ----------------------------------------------------------------------------- P / R / F1
def prf_at_threshold(gts: Sequence[dict], preds: Sequence[dict], threshold: float, iou: float = 0.5,
                     matches: Optional[list[dict]] = None) -> dict:
    """{precision, recall, f1, tp, fp, fn, threshold} keeping detections with score >= threshold.

    Matching all detections once and then thresholding equals thresholding first: a greedy match
    by descending score never depends on lower-scoring detections.
    """
    matches = match_detections(gts, preds, iou) if matches is None else matches
    scores, tp, num_gt = _ranked(matches)
    keep = scores >= threshold
    return _prf(int(tp[keep].sum()), int((~tp[keep]).sum()), num_gt, threshold)


def prf_vs_confidence(gts: Sequence[dict], preds: Sequence[dict], thresholds=None, iou: float = 0.5,
                      matches: Optional[list[dict]] = None) -> dict:
    """Precision, recall, F1, TP, FP, FN at each confidence threshold (default 0, 0.01, ..., 1)."""
    thresholds = np.round(np.linspace(0, 1, 101), 4) if thresholds is None else np.asarray(thresholds, float)
    matches = match_detections(gts, preds, iou) if matches is None else matches
    scores, tp, num_gt = _ranked(matches)
    # scores are descending: the detections kept at t are the first `n` of them.
    n_kept = np.searchsorted(-scores, -thresholds, side="right")
    ctp = np.concatenate([[0], np.cumsum(tp)])
    rows = [_prf(int(ctp[n]), int(n - ctp[n]), num_gt, t) for t, n in zip(thresholds, n_kept)]
    return {"iou": iou, "num_gt": num_gt,
            **{k: [r[k] for r in rows] for k in ("threshold", "precision", "recall", "f1", "tp", "fp", "fn")}}


def best_f1(gts: Sequence[dict], preds: Sequence[dict], iou: float = 0.5,
            matches: Optional[list[dict]] = None) -> dict:
    """The confidence threshold with the highest F1, searched over every detection score.

    Returns {threshold, precision, recall, f1, tp, fp, fn}; on ties the highest threshold wins.
    With no detections: threshold 0 and F1 0.
    """
    matches = match_detections(gts, preds, iou) if matches is None else matches
    scores, tp, num_gt = _ranked(matches)
    if len(scores) == 0:
        return _prf(0, 0, num_gt, 0.0)
    ctp = np.cumsum(tp)
    n = np.arange(1, len(scores) + 1)
    last_of_group = np.append(scores[1:] != scores[:-1], True)  # threshold = score keeps all ties
    idx = np.flatnonzero(last_of_group)
    f1 = np.array([_f1(_safe_div(ctp[i], n[i]), _safe_div(ctp[i], num_gt)) for i in idx])
    best = idx[int(np.argmax(f1))]  # argmax takes the first = highest threshold
    return _prf(int(ctp[best]), int(n[best] - ctp[best]), num_gt, float(scores[best]))


def pr_curve(gts: Sequence[dict], preds: Sequence[dict], iou: float = 0.5,
             matches: Optional[list[dict]] = None) -> dict:
    """Precision-recall points over all detection scores, plus the plotting envelope and AP.

    {"iou", "num_gt", "scores", "precision", "recall" (one point per detection, by descending score),
     "precision_envelope" (max precision at any recall >= this one, monotone),
     "recall_points" / "precision_interpolated" (COCO's 101 recall points), "ap" (their mean, which is
     how pycocotools computes AP50)}.
    """
    matches = match_detections(gts, preds, iou) if matches is None else matches
    scores, tp, num_gt = _ranked(matches)
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
    recall = ctp / num_gt if num_gt else np.zeros(len(scores))
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    interpolated = np.zeros(len(RECALL_POINTS))
    if num_gt and len(scores):
        pos = np.searchsorted(recall, RECALL_POINTS, side="left")
        valid = pos < len(recall)
        interpolated[valid] = envelope[pos[valid]]
    return {"iou": iou, "num_gt": num_gt,
            "scores": scores.tolist(), "precision": precision.tolist(), "recall": recall.tolist(),
            "precision_envelope": envelope.tolist(),
            "recall_points": RECALL_POINTS.round(2).tolist(), "precision_interpolated": interpolated.tolist(),
            "ap": float(interpolated.mean()) if num_gt else 0.0}


# ----------------------------------------------------------------------------- COCO mAP
def coco_gt_dict(gts: Sequence[dict]) -> dict:
    """A COCO ground-truth dict (category 1 = plate) built from the gt list."""
    images, annotations = [], []
    for g in gts:
        images.append({"id": int(g["image_id"]), "width": int(g.get("width") or 0),
                       "height": int(g.get("height") or 0)})
        for box in _as_boxes(g.get("boxes")):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": int(g["image_id"]), "category_id": 1,
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "license_plate"}]}


def coco_result_rows(preds: Sequence[dict], image_ids: Optional[set] = None) -> np.ndarray:
    """Detections as an (N, 6) float64 array of COCO results: image_id, x, y, w, h (rounded to 0.01 px, as
    in a results file), score (rounded to 1e-5); built with numpy, one block per image."""
    blocks = []
    for p in preds:
        if image_ids is not None and int(p["image_id"]) not in image_ids:
            continue
        boxes, scores = _as_boxes(p.get("boxes")).astype(np.float64), _as_scores(p.get("scores")).astype(np.float64)
        n = min(len(boxes), len(scores))
        if n:
            xywh = np.c_[boxes[:n, :2], boxes[:n, 2:] - boxes[:n, :2]]
            blocks.append(np.c_[np.full(n, int(p["image_id"])), np.round(xywh, 2), np.round(scores[:n], 5)])
    return np.concatenate(blocks) if blocks else np.zeros((0, 6))


def coco_results(preds: Sequence[dict], image_ids: Optional[set] = None) -> list[dict]:
    """Detections in the COCO results format (xywh, category_id 1)."""
    return _result_dicts(coco_result_rows(preds, image_ids))


def _result_dicts(rows: np.ndarray) -> list[dict]:
    return [{"image_id": int(r[0]), "category_id": 1, "bbox": r[1:5], "score": r[5]} for r in rows.tolist()]


@contextlib.contextmanager
def _gc_paused():
    """Build many small Python objects without the cyclic collector rescanning them (none form cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fast_results(coco_gt, rows: np.ndarray):
    """faster-coco-eval's results object built directly from the rows (what its loadRes does, without a Python
    pass per detection over segmentation polygons): ids from 1, area w*h, iscrowd 0."""
    from faster_coco_eval import COCO as FastCOCO

    area = (rows[:, 3] * rows[:, 4]).tolist()
    anns = [{"id": k + 1, "image_id": int(r[0]), "category_id": 1, "bbox": r[1:5], "score": r[5], "area": a,
             "iscrowd": 0} for k, (r, a) in enumerate(zip(rows.tolist(), area))]
    res = FastCOCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": anns,
                   "categories": list(coco_gt.dataset["categories"])}
    res.createIndex()
    return res


COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def coco_stats(gts: Sequence[dict], preds: Sequence[dict], backend: str = "faster") -> Optional[np.ndarray]:
    """COCOeval's 12 summary numbers (-1 where a size range has no gt), or None with no gt or no detection.

    backend "faster": faster-coco-eval (C++, the same numbers as pycocotools, several times faster);
    "pycocotools": the reference implementation.
    """
    gt_dict = coco_gt_dict(gts)
    rows = coco_result_rows(preds, {img["id"] for img in gt_dict["images"]})
    if not gt_dict["annotations"] or not len(rows):
        return None
    if backend == "faster":
        try:
            from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        except ImportError:  # pragma: no cover - requirements.txt installs it
            backend = "pycocotools"
    # our faster path pauses the cyclic GC (100k small dicts, no cycles); pycocotools runs as users call it
    with contextlib.redirect_stdout(io.StringIO()), (_gc_paused() if backend == "faster" else contextlib.nullcontext()):
        if backend == "faster":
            coco_gt = FastCOCO(gt_dict)
            ev = COCOeval_faster(coco_gt, _fast_results(coco_gt, rows), iouType="bbox", print_function=lambda *a, **k: None)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = gt_dict
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(_result_dicts(rows)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64)


def coco_map(gts: Sequence[dict], preds: Sequence[dict], backend: str = "faster") -> dict:
    """{map50, map50_95, map75, map_small, map_medium, map_large} from COCOeval (faster-coco-eval).

    No detections or no ground truth give 0.0 (COCOeval would say -1).
    """
    stats = coco_stats(gts, preds, backend)
    if stats is None:
        return {k: 0.0 for k in COCO_KEYS}
    values = [max(float(v), 0.0) for v in stats[:6]]  # -1 = no gt in that size range
    by_name = dict(zip(("map50_95", "map50", "map75", "map_small", "map_medium", "map_large"), values))
    return {k: by_name[k] for k in COCO_KEYS}


def detection_metrics(gts: Sequence[dict], preds: Sequence[dict], score_threshold: float = 0.5,
                      iou: float = 0.5, matches: Optional[list[dict]] = None) -> dict:
    """coco_map plus precision / recall / F1 / TP / FP / FN at `score_threshold`."""
    prf = prf_at_threshold(gts, preds, score_threshold, iou, matches=matches)
    out = coco_map(gts, preds)
    out.update({k: prf[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")})
    out["score_threshold"] = float(score_threshold)
    return out
