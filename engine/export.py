"""Export a checkpoint to ONNX (the whole detector), verify it against PyTorch, and run it with ONNX Runtime.

The exported graph takes one image as float32 CHW, already normalised with the model's mean and
std and resized so its shorter side is `size` (longer side capped at `max_size`), and does what the
PyTorch model does in eval mode after that: pad, backbone + FPN, RPN, box head, NMS, clip to the
image. Outputs: boxes (N, 4) xyxy in the resized image's pixels, labels (N,), scores (N,), every box
scoring >= the score floor (0.05). Normalisation and resize stay in Python, done by torchvision's own
GeneralizedRCNNTransform (`preprocess`), because inside the graph the resized size is computed in
float32 and comes out 1 px short for some aspect ratios (boxes then move by more than a pixel), and
because the same operations in the same order keep the backbone's input bit-identical to PyTorch's.
`OnnxPredictor` preprocesses, runs the session and scales the boxes back to the input image.

Files: `<out>/<checkpoint stem>-<size>.onnx` and `<out>/<checkpoint stem>-<size>.json` (what was
exported, the verification report). Both are written to temp names and renamed only after ONNX
Runtime agreed with PyTorch; the .onnx is renamed first and the .json last, so the JSON is the truth:
a model without its JSON beside it is not a finished export (load_export refuses it).
"""
from __future__ import annotations

import copy
import io
import json
import os
import platform
import time
import types
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from engine.errors import EngineError
from engine.runs import EXPORT_DIR
from engine.predict import SCORE_FLOOR, ImageError, image_to_tensor, infer, load_image, prediction_dict

EXPORT_FORMATS = ("onnx",)
META_FORMAT = "plate-detector-onnx/1"
OPSET = 17
BOX_TOLERANCE_PX = 1.0  # max |coordinate difference| between matched ONNX Runtime and PyTorch boxes
SCORE_TOLERANCE = 1e-3  # max |score difference| between matched boxes
TIE_EPSILON = 1e-6  # two different boxes whose scores are this close are a tie that NMS may break either way
VERIFY_TOP_K = 20  # besides every box above the threshold, the K best boxes are compared
VERIFY_DATA_IMAGES = 4  # photos taken from the checkpoint's test split, when it is on disk
VERIFY_SYNTHETIC = ((320, 240), (240, 320))  # synthetic images always verified (landscape, portrait)
DEFAULT_CLASS_NAME = "license_plate"
PathLike = Union[str, Path]


class ExportError(EngineError):
    """An export that failed or could not be verified; one line."""


# ----------------------------------------------------------------------------- input size
def default_max_size(test_size: int, max_size: int, size: int) -> int:
    """The longer-side cap for `size`, keeping the checkpoint's max_size / test_size ratio."""
    return max(size, int(round(size * max_size / test_size)))


def set_input_size(model: torch.nn.Module, size: int, max_size: int) -> None:
    """Make the model's transform resize the shorter side to `size` (eval) with the longer side <= max_size."""
    transform = model.transform
    canvas = getattr(transform, "test_canvas", None)
    if canvas and int(size) != transform.test_size:  # the canvas keeps its proportion to the image size
        transform.test_canvas = tuple(max(32, int(round(v * int(size) / transform.test_size))) for v in canvas)
    transform.test_size = int(size)
    transform.max_size = int(max_size)
    transform.train(transform.training)  # SizedTransform re-reads test_size into min_size


def load_sized_model(checkpoint: PathLike, size: Optional[int] = None, device: str = "cpu"):
    """(model in eval mode, config, size, max_size) with the model resizing to `size` (default: the config's)."""
    from engine.model import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(checkpoint, device=device)
    size = int(size or cfg.input.test_size)
    if not 32 <= size <= 4096:
        raise ExportError(f"--size {size}: must be between 32 and 4096")
    max_size = default_max_size(cfg.input.test_size, cfg.input.max_size, size)
    set_input_size(model, size, max_size)
    return model, cfg, size, max_size


def make_preprocessor(size: int, max_size: int, mean, std):
    """torchvision's own transform in eval mode; `preprocess` uses its normalize and resize."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    return GeneralizedRCNNTransform(min_size=int(size), max_size=int(max_size), image_mean=list(mean),
                                    image_std=list(std)).eval()


def preprocess(transform, chw: torch.Tensor) -> torch.Tensor:
    """What the PyTorch model does to an image before padding: normalise, then resize (bilinear)."""
    with torch.inference_mode():
        return transform.resize(transform.normalize(chw), None)[0]


def scale_boxes_back(boxes: np.ndarray, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> np.ndarray:
    """Boxes from the resized image to the original's pixels (float32 ratios, as torchvision computes them)."""
    ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
    return (boxes.reshape(-1, 4) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32)).astype(np.float32)


def _graph_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model whose transform neither normalises nor resizes (preprocess did both)."""
    graph = copy.deepcopy(model).eval()
    graph.transform.normalize = types.MethodType(lambda self, image: image, graph.transform)
    graph.transform.resize = types.MethodType(lambda self, image, target=None: (image, target), graph.transform)
    return graph


# ----------------------------------------------------------------------------- comparing detections
def _score_ties(scores: np.ndarray) -> np.ndarray:
    """Which scores equal (to TIE_EPSILON) another score of the same output."""
    return (np.abs(scores[:, None] - scores[None, :]) <= TIE_EPSILON).sum(axis=1) > 1


def _tied_elsewhere(ref_boxes: np.ndarray, ref_scores: np.ndarray, got_boxes: np.ndarray,
                    got_scores: np.ndarray) -> np.ndarray:
    """Which reference boxes have a candidate box at another place with the same score (to TIE_EPSILON): the
    sign that PyTorch's NMS kept one of two equal candidates and ONNX Runtime's the other."""
    if not len(got_scores) or not len(ref_scores):
        return np.zeros(len(ref_scores), dtype=bool)
    elsewhere = np.abs(got_boxes[None, :, :] - ref_boxes[:, None, :]).max(axis=2) > BOX_TOLERANCE_PX
    return ((np.abs(ref_scores[:, None] - got_scores[None, :]) <= TIE_EPSILON) & elsewhere).any(axis=1)


def _closest_pairs(box_diff: np.ndarray, score_diff: np.ndarray) -> dict[int, int]:
    """Greedy one-to-one matching, closest pairs first (near-duplicate boxes of an untrained model must not
    steal each other's match); a pair needs both differences within the tolerances."""
    cost = np.where(score_diff <= SCORE_TOLERANCE, box_diff, np.inf)
    matched: dict[int, int] = {}
    used = set()
    for flat in np.argsort(cost, axis=None, kind="mergesort"):
        r, g = divmod(int(flat), cost.shape[1])
        if r in matched or g in used or not np.isfinite(cost[r, g]) or cost[r, g] > BOX_TOLERANCE_PX:
            continue
        matched[r] = g
        used.add(g)
    return matched


def compare_detections(ref_boxes: np.ndarray, ref_scores: np.ndarray, got_boxes: np.ndarray,
                       got_scores: np.ndarray, threshold: float) -> dict:
    """Match every reference box above `threshold` (and the VERIFY_TOP_K best) to a candidate box.

    Returns {"ok", "reason", "count_ref", "count_got", "compared", "tied", "max_box_px", "max_score_diff"}.
    The counts at the threshold must agree, except for boxes whose score is within SCORE_TOLERANCE of it.
    A box left unmatched is excused (counted in "tied") when its score is a tie: among equal scores, top-k and
    NMS may keep either box in either runtime (an undertrained model on a flat image region gives dozens of
    them). A tie is a PyTorch score shared by another PyTorch box, or an exact score (to TIE_EPSILON) that ONNX
    Runtime gives to a box at another place. At most half of the boxes may be excused, so a systematic
    difference (every box moved, scores kept) still fails.
    """
    ref_boxes, got_boxes = np.asarray(ref_boxes).reshape(-1, 4), np.asarray(got_boxes).reshape(-1, 4)
    ref_scores, got_scores = np.asarray(ref_scores).ravel(), np.asarray(got_scores).ravel()
    count_ref, count_got = int((ref_scores >= threshold).sum()), int((got_scores >= threshold).sum())
    low = int((ref_scores >= threshold + SCORE_TOLERANCE).sum())
    high = int((ref_scores >= threshold - SCORE_TOLERANCE).sum())
    out = {"ok": True, "reason": "", "count_ref": count_ref, "count_got": count_got, "compared": 0,
           "tied": 0, "max_box_px": 0.0, "max_score_diff": 0.0}
    if not low <= count_got <= high:
        out.update(ok=False, reason=f"{count_got} boxes at score >= {threshold} instead of {count_ref}")
        return out
    order = np.argsort(-ref_scores, kind="mergesort")
    wanted = [i for rank, i in enumerate(order) if (ref_scores[i] >= threshold or rank < VERIFY_TOP_K)
              and ref_scores[i] >= SCORE_FLOOR + SCORE_TOLERANCE]  # boxes at the floor may drop out either side
    if wanted and not len(got_boxes):
        out.update(ok=False, reason=f"no boxes where {len(wanted)} were expected")
        return out
    box_diff = np.abs(got_boxes[None, :, :] - ref_boxes[wanted][:, None, :]).max(axis=2)
    score_diff = np.abs(got_scores[None, :] - ref_scores[wanted][:, None])
    matched = _closest_pairs(box_diff, score_diff)
    tied = (_score_ties(ref_scores)[wanted] | _tied_elsewhere(ref_boxes[wanted], ref_scores[wanted], got_boxes, got_scores)
            if wanted else np.zeros(0, dtype=bool))
    unmatched = [r for r in range(len(wanted)) if r not in matched]
    failed = [r for r in unmatched if not tied[r]] or (unmatched if len(unmatched) * 2 > len(wanted) else [])
    if failed:
        r, i = failed[0], wanted[failed[0]]
        g = int(np.argmin(box_diff[r]))
        out.update(ok=False, reason=f"box {i} (score {ref_scores[i]:.4f}): nearest box differs by "
                                    f"{box_diff[r, g]:.2f} px, score by {score_diff[r, g]:.4f}")
        return out
    for r, g in matched.items():
        out["max_box_px"] = max(out["max_box_px"], float(box_diff[r, g]))
        out["max_score_diff"] = max(out["max_score_diff"], float(score_diff[r, g]))
    out.update(compared=len(matched), tied=len(unmatched))
    return out


# ----------------------------------------------------------------------------- ONNX Runtime
def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("onnxruntime is not installed (pip install -r requirements.txt)") from None
    return onnxruntime


def meta_path_for(onnx_path: PathLike) -> Path:
    return Path(onnx_path).with_suffix(".json")


def load_export(onnx_path: PathLike) -> dict:
    """The JSON written beside an exported model; ExportError when the model or its JSON is missing or wrong."""
    onnx_path = Path(onnx_path)
    meta_path = meta_path_for(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: ONNX model not found")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{onnx_path}: no {meta_path.name} beside it (not a finished export; "
                          f"run python -m engine export)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{meta_path}: unreadable export description ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT or not isinstance(meta.get("input"), dict):
        raise ExportError(f"{meta_path}: not a {META_FORMAT} export description")
    return meta


def available_providers() -> list[str]:
    return list(_onnxruntime().get_available_providers())


class OnnxPredictor:
    """An exported model in an ONNX Runtime session; `.predict(image)` returns what Predictor.predict does."""

    def __init__(self, onnx_path: PathLike, device: str = "cpu", threads: int = 0, meta: Optional[dict] = None):
        ort = _onnxruntime()
        self.onnx_path = Path(onnx_path)
        self.meta = meta if meta is not None else load_export(self.onnx_path)
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise ExportError(f"{self.onnx_path}: ONNX Runtime here has no {provider} "
                              f"(available: {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=[provider])
        except Exception as exc:
            raise ExportError(f"{self.onnx_path}: ONNX Runtime cannot load it "
                              f"({str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__})") from None
        self.provider = provider
        self.input_name = self.session.get_inputs()[0].name
        self.test_size = int(self.meta["input"]["size"])
        self.max_size = int(self.meta["input"]["max_size"])
        self.transform = make_preprocessor(self.test_size, self.max_size, self.meta["input"]["mean"],
                                           self.meta["input"]["std"])
        self.score_floor = float(self.meta.get("score_floor", SCORE_FLOOR))

    def detect(self, chw: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(boxes in chw's pixels, scores sorted by score, model_ms, postprocess_ms) for one float32 CHW image
        in [0, 1]; model_ms includes normalising and resizing it."""
        start = time.perf_counter()
        resized = preprocess(self.transform, chw)
        boxes, _labels, scores = self.session.run(None, {self.input_name: resized.numpy()})
        mid = time.perf_counter()
        keep = scores >= self.score_floor
        boxes = scale_boxes_back(boxes.reshape(-1, 4)[keep], tuple(resized.shape[-2:]), tuple(chw.shape[-2:]))
        scores = scores[keep]
        order = np.argsort(-scores, kind="mergesort")
        end = time.perf_counter()
        return boxes[order], scores[order], (mid - start) * 1000, (end - mid) * 1000

    def predict(self, image: Image.Image) -> dict:
        start = time.perf_counter()
        chw = image_to_tensor(image)
        pre_ms = (time.perf_counter() - start) * 1000
        boxes, scores, model_ms, post_ms = self.detect(chw)
        return prediction_dict(image, boxes, scores, start, pre_ms, model_ms, post_ms)


# ----------------------------------------------------------------------------- verification
def verification_images(cfg, paths: Optional[Sequence[PathLike]] = None) -> list[tuple[str, Image.Image]]:
    """(name, image) pairs: the given files, else the first photos of the config's test split when it is on
    disk; plus synthetic plates in landscape and portrait, so the dynamic input size is always exercised."""
    from engine.synthetic import render_image

    images = []
    if paths:
        for path in paths:
            try:
                images.append((str(path), load_image(path)))
            except ImageError as exc:
                raise ExportError(f"verification image {exc}") from None
    else:
        split_dir = Path(cfg.data.root) / cfg.data.test_split
        for path in sorted(split_dir.glob("*.jpg"))[:VERIFY_DATA_IMAGES] if split_dir.is_dir() else []:
            try:
                images.append((str(path), load_image(path)))
            except ImageError:
                continue
    rng = np.random.default_rng(0)
    for width, height in VERIFY_SYNTHETIC:
        images.append((f"synthetic {width}x{height}", render_image(rng, width, height)[0]))
    return images


def verify_export(model: torch.nn.Module, predictor: OnnxPredictor, images, threshold: float) -> dict:
    """Compare ONNX Runtime with the PyTorch model on every image; ExportError naming the first mismatch."""
    per_image = []
    for name, image in images:
        tensor = image_to_tensor(image)
        ref_boxes, ref_scores, _, _ = infer(model, tensor, torch.device("cpu"))
        got_boxes, got_scores, _, _ = predictor.detect(tensor)
        result = compare_detections(ref_boxes, ref_scores, got_boxes, got_scores, threshold)
        if not result["ok"]:
            ties = len(ref_scores) - len(np.unique(ref_scores))
            hint = (f"; {ties} of {len(ref_scores)} PyTorch scores are exact ties, as from an untrained model, "
                    f"and NMS may keep either of two equal boxes" if ties else "")
            raise ExportError(f"export not verified: ONNX Runtime and PyTorch disagree on {name}: {result['reason']} "
                              f"(tolerance {BOX_TOLERANCE_PX} px, score {SCORE_TOLERANCE}){hint}")
        per_image.append({"image": name, **{k: v for k, v in result.items() if k not in ("ok", "reason")}})
    if not any(r["compared"] for r in per_image):
        raise ExportError(f"export not verified: the model finds no box scoring >= {SCORE_FLOOR + SCORE_TOLERANCE:g} "
                          f"on any of the {len(per_image)} verification images, so there is nothing to compare "
                          f"(give --verify-images with plates)")
    return {"box_tolerance_px": BOX_TOLERANCE_PX, "score_tolerance": SCORE_TOLERANCE, "threshold": threshold,
            "images": per_image, "max_box_px": max((r["max_box_px"] for r in per_image), default=0.0),
            "max_score_diff": max((r["max_score_diff"] for r in per_image), default=0.0)}


# ----------------------------------------------------------------------------- export
def _trace_example(model: torch.nn.Module, tries: int = 8) -> torch.Tensor:
    """The image the exporter traces with: a synthetic plate photo the model detects something in,
    preprocessed as at inference. Tracing records one path through the detector's data-dependent steps;
    traced on noise (no detection at any stage) the graph failed or differed on most real photos."""
    from engine.synthetic import render_image

    size = model.transform.test_size
    width = min(size * 4 // 3, model.transform.max_size)
    graph = _graph_model(model)
    best, best_count = None, -1
    for k in range(tries):
        image = render_image(np.random.default_rng([0, 7, k]), width, size)[0]
        example = preprocess(model.transform, image_to_tensor(image))
        with torch.inference_mode():
            count = len(graph([example])[0]["scores"])
        if count > best_count:
            best, best_count = example, count
        if count >= 2:
            break
    return best.clone()


def _torch_export(model: torch.nn.Module, path: Path, opset: int) -> None:
    """TorchScript-based exporter (dynamo=False): it traces torchvision's detection models with their
    ONNX-specific code paths (any image height and width, batched NMS)."""
    example = _trace_example(model)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_graph_model(model), ([example],), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "labels": {0: "detections"}, "scores": {0: "detections"}})


def _class_names(cfg) -> list[str]:
    """["__background__", <the category the training annotations use>] (default name: license_plate)."""
    path = Path(cfg.data.root) / cfg.data.train_split / "_annotations.coco.json"
    name = None
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        used = {a.get("category_id") for a in coco.get("annotations", []) if isinstance(a, dict)}
        name = next((c.get("name") for c in coco.get("categories", []) if isinstance(c, dict) and c.get("id") in used),
                    None)
    except (OSError, ValueError, AttributeError):
        pass
    return ["__background__", str(name or DEFAULT_CLASS_NAME)]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def export_onnx(checkpoint: PathLike, size: Optional[int] = None, out: Optional[PathLike] = None,
                opset: int = OPSET, verify_images: Optional[Sequence[PathLike]] = None) -> dict:
    """Export, verify and write `<out>/<stem>-<size>.onnx` + `.json`; returns the JSON written (with paths)."""
    import onnx

    from engine.model import _read_checkpoint
    from engine.runs import atomic_write_json

    checkpoint = Path(checkpoint)
    if opset < 11:
        raise ExportError(f"--opset {opset}: must be at least 11")
    model, cfg, size, max_size = load_sized_model(checkpoint, size)
    run = _read_checkpoint(checkpoint).get("run")
    out_dir = Path(out) if out else checkpoint.parent / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{checkpoint.stem}-{size}.onnx"
    tmp = out_dir / f".{onnx_path.name}.{os.getpid()}.tmp"
    start = time.perf_counter()
    try:
        try:
            _torch_export(model, tmp, opset)
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            raise ExportError(f"{checkpoint}: ONNX export failed ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        meta = {"format": META_FORMAT, "model": cfg.model.name, "class_names": _class_names(cfg),
                "input": {"size": size, "max_size": max_size, "mean": [float(v) for v in model.transform.image_mean],
                          "std": [float(v) for v in model.transform.image_std],
                          "layout": "float32 CHW RGB: (pixel / 255 - mean) / std, then resized (bilinear) so the "
                                    "shorter side is size and the longer side <= max_size"},
                "outputs": ["boxes (N,4) xyxy in the resized input's pixels", "labels (N,)", "scores (N,)"],
                "score_threshold": cfg.eval.score_threshold, "score_floor": SCORE_FLOOR,
                "source_checkpoint": str(checkpoint.resolve()), "run": run, "opset": opset,
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                             "onnxruntime": _onnxruntime().__version__, "python": platform.python_version()}}
        predictor = OnnxPredictor(tmp, meta=meta)
        meta["verification"] = verify_export(model, predictor, verification_images(cfg, verify_images),
                                             cfg.eval.score_threshold)
        meta["export_s"] = round(time.perf_counter() - start, 1)
        os.replace(tmp, onnx_path)
        atomic_write_json(meta_path_for(onnx_path), meta)
    finally:
        _remove(tmp)
    return {**meta, "onnx_path": str(onnx_path), "meta_path": str(meta_path_for(onnx_path))}
