"""Faster R-CNN builders by name, weights (coco | none | checkpoint path), devices.

Input sizes: the model resizes every image once, with its own GeneralizedRCNNTransform.
torchvision samples the shorter side from `transform.min_size` in training mode and uses
`transform.min_size[-1]` in eval mode. We replace the transform with SizedTransform, whose
`train(mode)` swaps `min_size` between `tuple(cfg.input.train_sizes)` (training) and
`(cfg.input.test_size,)` (eval), so `model.train()` / `model.eval()` pick the right sizes.
"""
from __future__ import annotations

import copy
import logging
import os
import pickle
import platform
import socket
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import getproxies

import torch
import torchvision
from torch import nn
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from engine.config import Config, ConfigError, config_from_dict
from engine.errors import EngineError

log = logging.getLogger(__name__)

BUILDERS: dict[str, tuple[Callable[..., nn.Module], Any]] = {
    "fasterrcnn_mobilenet_v3_large_fpn": (fasterrcnn_mobilenet_v3_large_fpn,
                                          FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (fasterrcnn_mobilenet_v3_large_320_fpn,
                                              FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1),
    "fasterrcnn_resnet50_fpn_v2": (fasterrcnn_resnet50_fpn_v2, FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}
COCO_NUM_CLASSES = 91
HEAD_PREFIX = "roi_heads.box_predictor."
SCORE_FLOOR = 0.05  # keep low-score boxes so evaluation sees a full PR curve
DETECTIONS_PER_IMAGE = 100
OFFLINE_ENV = "ENGINE_OFFLINE"  # set to 1 to never try downloading weights
REACH_TIMEOUT_S = 3.0
DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


class WeightsError(EngineError):
    """Weights or checkpoint cannot be used; one line naming the file."""


class DeviceError(EngineError):
    """The requested device is not available."""


class SizedTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose shorter side is sampled from train_sizes in training mode and
    is test_size in eval mode (torchvision uses min_size[-1] in eval, so eval sets min_size=(test_size,))."""

    def __init__(self, base: GeneralizedRCNNTransform, train_sizes, test_size: int, max_size: int,
                 test_canvas: Optional[Sequence[int]] = None):
        super().__init__(min_size=tuple(train_sizes), max_size=max_size, image_mean=base.image_mean,
                         image_std=base.image_std, size_divisible=base.size_divisible, fixed_size=base.fixed_size)
        self.train_sizes = tuple(int(s) for s in train_sizes)
        self.test_size = int(test_size)
        self.test_canvas = tuple(int(v) for v in test_canvas) if test_canvas else None  # (height, width)
        self.train(self.training)

    def batch_images(self, images: list, size_divisible: int = 32) -> torch.Tensor:
        """torchvision's padding (to the batch's largest image, a multiple of 32); in eval mode with a
        test_canvas, then zeros right and below up to at least that canvas: a model trained on padded
        batches sees, at validation, test and predict time, the canvas it was trained on."""
        if self.training or not self.test_canvas:
            return super().batch_images(images, size_divisible)
        height, width = self.test_canvas
        if torchvision._is_tracing():  # ONNX export: sizes stay tensors, as in torchvision's _onnx_batch_images
            return self._onnx_canvas_batch(images, size_divisible, height, width)
        batched = super().batch_images(images, size_divisible)
        pad_h, pad_w = max(0, height - batched.shape[-2]), max(0, width - batched.shape[-1])
        return torch.nn.functional.pad(batched, (0, pad_w, 0, pad_h)) if pad_h or pad_w else batched

    @torch.jit.unused
    def _onnx_canvas_batch(self, images: list, size_divisible: int, height: int, width: int) -> torch.Tensor:
        size = [torch.max(torch.stack([img.shape[i] for img in images]).to(torch.float32)).to(torch.int64)
                for i in range(3)]
        for axis, least in ((1, height), (2, width)):
            rounded = (torch.ceil(size[axis].to(torch.float32) / size_divisible) * size_divisible).to(torch.int64)
            size[axis] = torch.maximum(rounded, torch.tensor(least, dtype=torch.int64))
        return torch.stack([torch.nn.functional.pad(img, (0, size[2] - img.shape[2], 0, size[1] - img.shape[1],
                                                          0, size[0] - img.shape[0])) for img in images])

    def train(self, mode: bool = True):
        super().train(mode)
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return self


# ----------------------------------------------------------------------------- helpers
def coco_weights_path(model_name: str) -> Path:
    """Where torchvision looks for the COCO weight file: $TORCH_HOME/hub/checkpoints/<file from the url>."""
    weights = BUILDERS[model_name][1]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _builder_kwargs(cfg: Config) -> dict:
    return {"min_size": tuple(cfg.input.train_sizes), "max_size": cfg.input.max_size,
            "box_score_thresh": SCORE_FLOOR, "box_detections_per_img": DETECTIONS_PER_IMAGE,
            "box_batch_size_per_image": cfg.model.box_batch_size_per_image}


def _anchor_generator(current: AnchorGenerator, sizes: Optional[list], ratios: Optional[list],
                      model_name: str) -> AnchorGenerator:
    """The model's anchors with model.anchor_sizes / anchor_aspect_ratios put in, keeping the number of
    anchors per location (the RPN head's shape, so COCO weights and checkpoints still load). Sizes keep
    the model's layout: the same list on every feature level (mobilenet) or one size per level (resnet)."""
    old_sizes, old_ratios = current.sizes, current.aspect_ratios
    new_sizes = old_sizes
    if sizes is not None:
        if all(level == old_sizes[0] for level in old_sizes) and len(old_sizes[0]) > 1:
            if len(sizes) != len(old_sizes[0]):
                raise ConfigError(f"model.anchor_sizes: {model_name} needs {len(old_sizes[0])} sizes, got {len(sizes)}")
            new_sizes = (tuple(sizes),) * len(old_sizes)
        else:
            if len(sizes) != len(old_sizes):
                raise ConfigError(f"model.anchor_sizes: {model_name} needs {len(old_sizes)} sizes (one per "
                                  f"feature level), got {len(sizes)}")
            new_sizes = tuple((s,) for s in sizes)
    new_ratios = old_ratios
    if ratios is not None:
        if len(ratios) != len(old_ratios[0]):
            raise ConfigError(f"model.anchor_aspect_ratios: {model_name} needs {len(old_ratios[0])} ratios, "
                              f"got {len(ratios)}")
        new_ratios = (tuple(float(r) for r in ratios),) * len(old_ratios)
    return AnchorGenerator(new_sizes, new_ratios)


def _finish(model: nn.Module, cfg: Config) -> nn.Module:
    """Replace the class head for plate + background, set the anchors, install the train/eval sizes."""
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != cfg.model.num_classes:
        model.roi_heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features, cfg.model.num_classes)
    if cfg.model.anchor_sizes is not None or cfg.model.anchor_aspect_ratios is not None:
        model.rpn.anchor_generator = _anchor_generator(model.rpn.anchor_generator, cfg.model.anchor_sizes,
                                                       cfg.model.anchor_aspect_ratios, cfg.model.name)
    model.transform = SizedTransform(model.transform, cfg.input.train_sizes, cfg.input.test_size, cfg.input.max_size,
                                     cfg.input.test_canvas)
    return model


def _freeze_batchnorm(module: nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d (the layout of torchvision's pretrained backbones)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def _uses_frozen_batchnorm(state: dict) -> bool:
    body = [k for k in state if k.startswith("backbone.body.")]
    return bool(body) and not any(k.endswith("num_batches_tracked") for k in body)


def _can_reach(url: str) -> bool:
    """A quick TCP check so an offline machine fails in seconds, not after urllib's long timeouts."""
    if getproxies().get("https"):
        return True  # behind a proxy a direct connection says nothing; let urllib try (socket timeout set)
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


def _missing_coco_message(path: Path, url: str, why: str) -> str:
    return (f"{path}: COCO weights not found ({why}); download {url} and place it at that path "
            f"(TORCH_HOME={Path(torch.hub.get_dir()).parent}), or use 'weights: none'")


def _build_coco(cfg: Config) -> nn.Module:
    builder, weights = BUILDERS[cfg.model.name]
    path = coco_weights_path(cfg.model.name)
    if not path.is_file():
        if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
            raise WeightsError(_missing_coco_message(path, weights.url, f"{OFFLINE_ENV} is set"))
        if not _can_reach(weights.url):
            raise WeightsError(_missing_coco_message(path, weights.url, "no network"))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        model = builder(weights=weights, num_classes=COCO_NUM_CLASSES,
                        trainable_backbone_layers=cfg.model.trainable_backbone_layers, **_builder_kwargs(cfg))
    except (URLError, OSError) as exc:
        raise WeightsError(_missing_coco_message(path, weights.url, f"download failed: {exc.__class__.__name__}")) from None
    except Exception as exc:  # corrupt cache file, hash mismatch, wrong tensors
        raise WeightsError(f"{path}: cannot load COCO weights ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); delete the file and "
                           f"place the original, or use 'weights: none'") from None
    finally:
        socket.setdefaulttimeout(previous)
    return model


def _build_random(cfg: Config) -> nn.Module:
    builder, _ = BUILDERS[cfg.model.name]
    # weights_backbone=None: the backbone is random too (and uses trainable BatchNorm2d).
    return builder(weights=None, weights_backbone=None, num_classes=cfg.model.num_classes, **_builder_kwargs(cfg))


def _read_checkpoint(path: Path, map_location: Any = "cpu") -> Any:
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{path}: not loadable with weights_only=True (not a plain checkpoint)") from None
    except Exception as exc:
        raise WeightsError(f"{path}: corrupt or not a PyTorch checkpoint ({exc.__class__.__name__})") from None


def _state_dict_of(obj: Any, path: Path) -> dict:
    """Our checkpoint ({"model": state_dict, ...}) or a raw state_dict."""
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: not a model checkpoint (expected a state_dict or a dict with 'model')")
    return state


def _load_state(model: nn.Module, state: dict, path: Path, model_name: str, allow_head_skip: bool) -> None:
    """Load strictly, except: a different class head is skipped (fine-tuning) when allowed, and a
    missing BatchNorm `num_batches_tracked` counter is harmless."""
    own = model.state_dict()
    usable, skipped, problems = {}, [], []
    for key, value in state.items():
        if key not in own:
            problems.append(f"unexpected key {key!r}")
        elif own[key].shape != value.shape:
            if allow_head_skip and key.startswith(HEAD_PREFIX):
                skipped.append(key)
            else:
                problems.append(f"{key!r} has shape {tuple(value.shape)}, model needs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    problems += [f"missing key {k!r}" for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if problems:
        raise WeightsError(f"{path}: does not fit {model_name} ({len(problems)} problems, first: {problems[0]})")
    if skipped:
        log.warning("%s: class head has a different shape; not loaded, trained from scratch: %s",
                    path, ", ".join(skipped))
    model.load_state_dict(usable, strict=False)


def _build_from_path(cfg: Config, path: Path) -> nn.Module:
    state = _state_dict_of(_read_checkpoint(path), path)
    model = _finish(_build_random(cfg), cfg)
    if _uses_frozen_batchnorm(state):  # the source was trained from pretrained weights: keep its layout
        _freeze_batchnorm(model.backbone.body)
    _load_state(model, state, path, cfg.model.name, allow_head_skip=True)
    return model


# ----------------------------------------------------------------------------- public API
def build_model(cfg: Config) -> nn.Module:
    """Faster R-CNN for cfg.model.name with weights coco | none | <checkpoint path>; 2-class head.
    Fine-tuning from a path trains every backbone layer (trainable_backbone_layers applies to coco)."""
    name = cfg.model.name
    if name not in BUILDERS:
        raise WeightsError(f"{cfg.source or 'config'}: model.name {name!r} is not one of {', '.join(BUILDERS)}")
    weights = cfg.model.weights.strip()
    if weights.lower() == "coco":
        return _finish(_build_coco(cfg), cfg)
    if weights.lower() == "none":
        return _finish(_build_random(cfg), cfg)
    return _build_from_path(cfg, Path(weights).expanduser())


def load_model_from_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """(model in eval mode on `device`, Config) from one of our checkpoints."""
    path = Path(path)
    ckpt = _read_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise WeightsError(f"{path}: not a plate-detector checkpoint (needs 'model' and 'config')")
    cfg = config_from_dict(ckpt["config"], where=f"{path} (config)")
    rebuild = copy.deepcopy(cfg)
    rebuild.model.weights = "none"
    state = _state_dict_of(ckpt, path)
    model = _finish(_build_random(rebuild), rebuild)
    if _uses_frozen_batchnorm(state):
        _freeze_batchnorm(model.backbone.body)
    _load_state(model, state, path, cfg.model.name, allow_head_skip=False)
    return model.to(device).eval(), cfg


def device_name(device: torch.device) -> str:
    """What a run reports as its device: the GPU's name, or the CPU model and the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; an unavailable cuda device -> DeviceError."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: CUDA is not available on this machine (use 'cpu' or 'auto')")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise DeviceError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
