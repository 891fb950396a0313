"""The New run form's logic: which configs exist, the form's defaults, and the launch overrides."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from engine.config import (MODEL_NAMES, Config, ConfigError, default_run_name,  # noqa: F401  (the form's name)
                           load_config, validate_run_name)

from dashboard.settings import BASELINES_FILE, DEMO_CONFIG

DEVICES = ("auto", "cpu", "cuda")


def list_configs(configs_dir: Path) -> list[Path]:
    """Training configs (*.yaml, *.yml) in configs_dir, the CPU demo first; baselines.yaml excluded."""
    if not configs_dir.is_dir():
        return []
    found = [p for p in configs_dir.iterdir()
             if p.suffix in (".yaml", ".yml") and p.is_file() and p.name != BASELINES_FILE]
    return sorted(found, key=lambda p: (p.name != DEMO_CONFIG, p.name))


@dataclass
class FormValues:
    """What the New run form holds; defaults come from the chosen config."""
    data_root: str
    model: str
    weights: str
    epochs: int
    batch_size: int
    lr: float
    image_size: int
    device: str
    name: str = ""
    time_limit_min: float = 0.0  # 0: no limit


def form_defaults(cfg: Config) -> FormValues:
    return FormValues(
        data_root=cfg.data.root, model=cfg.model.name, weights=cfg.model.weights,
        epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=cfg.optim.lr,
        image_size=cfg.input.test_size, device=cfg.train.device, time_limit_min=cfg.train.time_limit_min,
    )


def build_overrides(defaults: FormValues, chosen: FormValues) -> list[str]:
    """`--set` overrides for the values the user changed (the config keeps the rest).

    The image size sets both input.train_sizes=[s] (one training scale) and input.test_size=s,
    and only when it differs from the config's test size, so a multi-scale recipe stays intact.
    """
    out = []
    if chosen.model != defaults.model:
        out.append(f"model.name={chosen.model}")
    if chosen.weights.strip() != defaults.weights:
        out.append(f"model.weights={chosen.weights.strip()}")
    if chosen.epochs != defaults.epochs:
        out.append(f"train.epochs={int(chosen.epochs)}")
    if abs(chosen.time_limit_min - defaults.time_limit_min) > 1e-9:
        out.append(f"train.time_limit_min={float(chosen.time_limit_min):g}")
    if chosen.batch_size != defaults.batch_size:
        out.append(f"train.batch_size={int(chosen.batch_size)}")
    if abs(chosen.lr - defaults.lr) > 1e-12:
        out.append(f"optim.lr={chosen.lr!r}")
    if chosen.image_size != defaults.image_size:
        out.append(f"input.train_sizes=[{int(chosen.image_size)}]")
        out.append(f"input.test_size={int(chosen.image_size)}")
    return out


@functools.lru_cache(maxsize=1)
def default_processes() -> int:
    """Processes (GPUs) per run the form proposes: one per GPU present, 1 on a CPU machine."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def check_processes(nproc: int, batch_size: int) -> int:
    """`nproc`, or ConfigError when it is not >= 1 or does not divide the (global) batch size."""
    nproc = int(nproc)
    if nproc < 1:
        raise ConfigError(f"processes per run {nproc}: must be >= 1")
    if batch_size % nproc:
        raise ConfigError(f"batch size {batch_size} is split over the processes: {nproc} processes need a batch "
                          f"size divisible by {nproc}")
    return nproc


def check_name(name: str, runs_dir: Path) -> str:
    """The stripped name, or ConfigError when it has bad characters or is taken."""
    name = (name or "").strip()
    validate_run_name(name)
    if (runs_dir / name).exists():
        raise ConfigError(f"run name {name!r} is already used in {runs_dir}; choose another")
    return name


def validate_launch(config_path: Path, overrides: list[str]) -> Config:
    """The config with overrides applied, or ConfigError naming the bad key."""
    return load_config(config_path, overrides)


def weight_choices(current: str, checkpoints: list[Path]) -> list[str]:
    """coco, none, the config's own value, and existing best.pth files to fine-tune from."""
    out = ["coco", "none"]
    if current not in out:
        out.append(current)
    out += [str(p) for p in checkpoints if str(p) not in out]
    return out


def model_choices(current: str) -> list[str]:
    return list(MODEL_NAMES) if current in MODEL_NAMES else [current, *MODEL_NAMES]
