"""Training configuration: YAML files loaded into typed dataclasses.

The dataclass defaults below ARE the recipe (FasterRCNN-MobileNetV3-FPN fine-tuned from COCO on
a GPU box); a config file holds only the keys it changes (configs/demo_cpu.yaml: the CPU demo).
`--set section.key=value` overrides a single value after the file is read (the value is
parsed as YAML, so `--set train.epochs=3` gives an int and `--set input.train_sizes=[240,288]`
a list). Unknown keys, wrong types and out-of-range values raise ConfigError with one line
that names the key and the file.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from engine.errors import EngineError

MODEL_NAMES = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn_v2",
)
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(EngineError, ValueError):
    """A bad config value; the message is one line naming the key and the file."""


@dataclass
class RunConfig:
    name: Optional[str] = None  # default: <config stem>-<YYYYmmdd-HHMMSS>; letters, digits, '-', '_', '.'
    runs_dir: str = "runs"  # the run folder goes to <runs_dir>/<name>
    checkpoints_dir: str = "checkpoints"  # best.pth / last.pth go to <checkpoints_dir>/<name>
    seed: int = 42  # seeds python, numpy, torch and the data order
    author: str = ""  # copied into the results report; empty -> a prompt for the user
    contact: str = ""  # copied into the results report
    notes: str = ""  # copied into the results report


@dataclass
class SynthConfig:
    """Used when data.root does not exist and data.generate_if_missing is true."""
    train: int = 600  # images per split
    valid: int = 100
    test: int = 100
    seed: int = 0  # the same seed gives the same images
    width: int = 320  # image size, px
    height: int = 240


@dataclass
class DataConfig:
    root: str = "data/plates"  # Roboflow COCO export: <root>/{train,valid,test}/_annotations.coco.json; --data sets it
    train_split: str = "train"  # folder names under root
    valid_split: str = "valid"
    test_split: str = "test"
    num_workers: int = 4  # DataLoader worker processes
    train_limit: int = 0  # use only the first N train images (0 = all); for smoke runs
    valid_limit: int = 0
    generate_if_missing: bool = False  # generate the synthetic set at `root` when it is missing
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    name: str = "fasterrcnn_mobilenet_v3_large_fpn"  # or fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_resnet50_fpn_v2
    weights: str = "coco"  # coco | none | path to a checkpoint (.pth) to fine-tune from
    trainable_backbone_layers: Optional[int] = None  # None = torchvision's default; with coco weights only
    num_classes: int = 2  # 1 plate class + background
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box head (torchvision default 512)
    anchor_sizes: Optional[list] = None  # RPN anchor sizes in pixels, as many as the model has (None = torchvision's)
    anchor_aspect_ratios: Optional[list] = None  # height/width of the anchors, 3 of them (None = 0.5, 1, 2)


@dataclass
class InputConfig:
    """Resizing is done once, by the model's own transform (GeneralizedRCNNTransform)."""
    train_sizes: list = field(default_factory=lambda: [800, 864, 928, 992, 1056, 1120, 1184, 1248, 1333])  # shorter side, one sampled per batch
    test_size: int = 800  # shorter side at validation / test / predict
    max_size: int = 1333  # longer side cap
    test_canvas: Optional[list] = None  # [height, width]: eval images padded (zeros right/below) to at least this, like training batches; none = to a multiple of 32


@dataclass
class AugmentConfig:
    """torchvision.transforms.v2 on tv_tensors: boxes follow the flip."""
    hflip_p: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.2  # colour jitter strengths
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0


@dataclass
class OptimConfig:
    name: str = "sgd"  # the only optimizer
    lr: float = 0.005  # peak learning rate, reached after the warmup
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 3.0  # linear warmup, per iteration
    warmup_start_factor: float = 0.001  # lr at step 0 = lr * this
    min_lr: float = 1e-6  # cosine annealing ends here at the last iteration


@dataclass
class TrainConfig:
    epochs: int = 50  # at most; early stopping or the time limit may end sooner
    time_limit_min: float = 0.0  # minutes of training + validation, over resumes; 0 = none; the cosine is refit to the epochs that fit
    batch_size: int = 16  # images per optimizer step (per process under torchrun)
    amp: bool = True  # mixed precision (autocast), see amp_dtype
    amp_dtype: str = "auto"  # auto: float16 + GradScaler on CUDA, AMP off on CPU | float16 (CUDA only) | bfloat16 (CUDA or CPU, no GradScaler)
    grad_clip: float = 10.0  # max L2 norm; 0 disables clipping (the norm is still logged)
    early_stopping_patience: int = 10  # epochs without a better val mAP@0.5; 0 disables
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 1  # write a step record every N iterations
    deterministic: bool = False  # deterministic algorithms (slower)


@dataclass
class EvalConfig:
    score_threshold: float = 0.5  # deployment threshold for precision / recall / F1
    iou_threshold: float = 0.5  # a detection matches a plate at this IoU (P/R/F1)
    batch_size: int = 8  # images per validation / test batch
    probe_images: int = 8  # validation images predicted every epoch for the dashboard's slider
    test_after_train: bool = True  # evaluate best.pth on the test split when training completes


@dataclass
class DistConfig:
    """Multi-process training under torchrun (engine/distributed.py); ignored in a single process."""
    timeout_s: float = 1800.0  # how long a collective waits for the other ranks before the run fails
    find_unused_parameters: bool = False  # DDP option; every Faster R-CNN parameter is used in each step


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    source: str = field(default="", metadata={"internal": True})  # the file this came from

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source", None)
        return out


# ----------------------------------------------------------------------------- range checks
# key -> (predicate, description); checked after loading and after every override.
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "run.seed": (lambda v: v >= 0, ">= 0"),
    "run.name": (lambda v: v is None or (bool(RUN_NAME_RE.fullmatch(v)) and v not in (".", "..")), "letters, digits, '-', '_', '.' only"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.train_limit": (lambda v: v >= 0, ">= 0"),
    "data.valid_limit": (lambda v: v >= 0, ">= 0"),
    "data.synth.train": (lambda v: v >= 1, ">= 1"),
    "data.synth.valid": (lambda v: v >= 1, ">= 1"),
    "data.synth.test": (lambda v: v >= 1, ">= 1"),
    "data.synth.width": (lambda v: 64 <= v <= 4096, "between 64 and 4096"),
    "data.synth.height": (lambda v: 64 <= v <= 4096, "between 64 and 4096"),
    "model.name": (lambda v: v in MODEL_NAMES, "one of " + ", ".join(MODEL_NAMES)),
    "model.weights": (lambda v: bool(v), "coco, none or a checkpoint path"),
    "model.trainable_backbone_layers": (lambda v: v is None or 0 <= v <= 6, "between 0 and 6"),
    "model.num_classes": (lambda v: v == 2, "2 (one plate class + background)"),
    "model.box_batch_size_per_image": (lambda v: 16 <= v <= 4096, "between 16 and 4096"),
    "model.anchor_sizes": (lambda v: v is None or (len(v) > 0 and all(isinstance(x, int) and 4 <= x <= 2048 for x in v)),
                           "a non-empty list of ints between 4 and 2048"),
    "model.anchor_aspect_ratios": (lambda v: v is None or (len(v) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0.05 <= x <= 20 for x in v)),
        "a non-empty list of numbers between 0.05 and 20"),
    "input.train_sizes": (lambda v: len(v) > 0 and all(isinstance(x, int) and 32 <= x <= 4096 for x in v),
                          "a non-empty list of ints between 32 and 4096"),
    "input.test_size": (lambda v: 32 <= v <= 4096, "between 32 and 4096"),
    "input.test_canvas": (lambda v: v is None or (len(v) == 2 and all(isinstance(x, int) and 32 <= x <= 8192 for x in v)),
                          "[height, width], ints between 32 and 8192"),
    "input.max_size": (lambda v: 32 <= v <= 8192, "between 32 and 8192"),
    "augment.hflip_p": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "augment.brightness": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "augment.contrast": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "augment.saturation": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "augment.hue": (lambda v: 0 <= v <= 0.5, "between 0 and 0.5"),
    "optim.name": (lambda v: v == "sgd", "sgd"),
    "optim.lr": (lambda v: 0 < v <= 10, "> 0 and <= 10"),
    "optim.momentum": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
    "optim.weight_decay": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
    "schedule.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "schedule.warmup_start_factor": (lambda v: 0 < v <= 1, "> 0 and <= 1"),
    "schedule.min_lr": (lambda v: v >= 0, ">= 0"),
    "train.epochs": (lambda v: 1 <= v <= 10000, "between 1 and 10000"),
    "train.time_limit_min": (lambda v: 0 <= v <= 10_000_000, ">= 0 (minutes; 0 = no limit)"),
    "train.batch_size": (lambda v: 1 <= v <= 1024, "between 1 and 1024"),
    "train.grad_clip": (lambda v: v >= 0, ">= 0"),
    "train.early_stopping_patience": (lambda v: v >= 0, ">= 0"),
    "train.amp_dtype": (lambda v: v in ("auto", "float16", "bfloat16"), "auto, float16 or bfloat16"),
    "train.device": (lambda v: bool(re.match(r"^(auto|cpu|cuda(:\d+)?)$", v)), "auto, cpu, cuda or cuda:N"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "eval.score_threshold": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "eval.iou_threshold": (lambda v: 0 < v < 1, "between 0 and 1"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.probe_images": (lambda v: 0 <= v <= 64, "between 0 and 64"),
    "dist.timeout_s": (lambda v: 10 <= v <= 86400, "between 10 and 86400 seconds"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*", value):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return list(value)
    raise ConfigError(f"{where}: {key} has unsupported type {_type_name(tp)}")


def _apply(obj: Any, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, f"{full}.", where)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, where))


def _check_ranges(cfg: Config, where: str, set_keys: tuple = ()) -> None:
    """Range checks; the error names the `--set` that gave the value, else the config file."""
    def source(*keys: str) -> str:
        return next((f"--set {k}" for k in reversed(set_keys) if k in keys), where)

    for key, (ok, desc) in _RANGES.items():
        value = get_value(cfg, key)
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{source(key)}: {key} must be {desc}, got {value!r}")
    if cfg.schedule.min_lr > cfg.optim.lr:
        raise ConfigError(f"{source('schedule.min_lr', 'optim.lr')}: schedule.min_lr ({cfg.schedule.min_lr}) "
                          f"must not exceed optim.lr ({cfg.optim.lr})")


def get_value(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def config_from_dict(data: dict, where: str = "<dict>", overrides: Optional[list[str]] = None) -> Config:
    cfg = Config(source=where)
    _apply(cfg, data or {}, "", where)
    set_keys = []
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), "", f"--set {key}")
        set_keys.append(key)
    _check_ranges(cfg, where, tuple(set_keys))
    return cfg


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config, apply `--set` overrides, validate. Raises ConfigError."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read config ({exc})") from None
    if data is None:
        data = {}
    return config_from_dict(data, where, overrides)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Written atomically: a run killed while writing it has the whole file or none."""
    from engine.runs import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate_run_name(name: str) -> str:
    if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"run name {name!r}: use letters, digits, '-', '_', '.' only")
    return name


def default_run_name(source: Union[str, Path, None], now: Optional[dt.datetime] = None) -> str:
    """<config file stem>-<YYYYmmdd-HHMMSS>; 'run-...' when the config did not come from a file."""
    source = str(source or "")
    stem = Path(source).stem if source and not source.startswith("<") else "run"
    stem = "".join(c if (c.isalnum() or c in "-_.") else "-" for c in stem) or "run"
    return f"{stem}-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- reference table
TABLE_START = "<!-- config-table:start (python -m engine config-doc --write docs/engine.md) -->"
TABLE_END = "<!-- config-table:end -->"


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `# comment` on the line that declares it in the class source."""
    comments: dict[int, str] = {}
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for number, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"\s+(\w+)\s*:", line)
        if match and number in comments:
            out[match.group(1)] = comments[number]
    return out


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def reference_rows(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every leaf key of the config, from the dataclasses above."""
    obj = Config() if obj is None else obj
    comments = _field_comments(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += reference_rows(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _yaml_value(value), comments.get(f.name, "")))
    return rows


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def reference_table() -> str:
    """The markdown table of docs/engine.md (between TABLE_START and TABLE_END)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{default}` | {_markdown_cell(meaning)} |" for key, default, meaning in reference_rows()]
    return "\n".join(lines)


def replace_reference_table(text: str) -> str:
    """`text` (a markdown file) with the part between the markers replaced by reference_table()."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ConfigError(f"the markers {TABLE_START!r} ... {TABLE_END!r} are missing")
    return text[: start + len(TABLE_START)] + "\n" + reference_table() + "\n" + text[end:]


# ----------------------------------------------------------------------------- paths
WEIGHT_NAMES = ("coco", "none")  # model.weights values that are not paths


def resolve_paths(cfg: Config, also_under: Optional[Path] = None) -> Config:
    """Make data.root, run.checkpoints_dir and a model.weights path absolute (in place), so the
    config.yaml a run saves still finds them from another working directory (--resume, the
    dashboard). A relative path is taken from the working directory; when it does not exist
    there but does under `also_under` (the project folder of an older run's runs/), from there."""
    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        if not path.exists() and also_under is not None and (also_under / path).exists():
            return str((also_under / path).resolve())
        return str(path.resolve())

    cfg.data.root = absolute(cfg.data.root)
    cfg.run.checkpoints_dir = absolute(cfg.run.checkpoints_dir)
    if cfg.model.weights and cfg.model.weights.lower() not in WEIGHT_NAMES:
        cfg.model.weights = absolute(cfg.model.weights)
    return cfg
