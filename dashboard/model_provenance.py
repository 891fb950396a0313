"""What a run's model was trained on, read from its config: synthetic plates or which real dataset.

A model trained only on synthetic plates finds plates in synthetic images but few in real photos;
`describe_run` says so and gives the one command that fine-tunes it on a real Roboflow export.
Plain functions (no Streamlit), tolerant of missing or broken files: they never raise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine import runs
from engine.data import ANNOTATIONS_FILE

FINETUNE_CONFIG = "configs/real_finetune_cpu.yaml"
SYNTHETIC_DESCRIPTION = "synthetic license plates"  # engine.synthetic writes this into info.description
MAX_WEIGHTS_HOPS = 5  # a chain of fine-tunes is followed this far back


@dataclass(frozen=True)
class Provenance:
    trained_on: str  # one line for the page, e.g. "synthetic plates (data/synthetic)"
    synthetic_only: bool  # no real plate photos anywhere in the chain of weights
    pretrained_from: Optional[str]  # e.g. "run demo_cpu-2026... (synthetic plates)" or "COCO weights"
    warning: Optional[str]  # for a synthetic-only model: real photos need a model trained on real data
    command: Optional[str]  # the one command that trains such a model


def read_config(run_dir: Path) -> Optional[dict]:
    """runs/<run>/config.yaml as a dict, or None when missing or unreadable."""
    return runs.read_config(run_dir) or None


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def is_synthetic_data(data: dict, base: Path = Path(".")) -> bool:
    """True when the data section points at the synthetic generator's output.

    The train split's annotation file says so in info.description; when the folder is not there
    (another machine), `generate_if_missing` or a root named 'synthetic' decide."""
    root = Path(str(data.get("root", "")))
    if not root.is_absolute():
        root = base / root
    ann = root / str(data.get("train_split", "train")) / ANNOTATIONS_FILE
    try:
        with open(ann, encoding="utf-8") as f:
            head = f.read(4096)  # info comes first in the files engine.synthetic writes
        if SYNTHETIC_DESCRIPTION in head:
            return True
        if ann.stat().st_size <= 4096:
            return False
        return SYNTHETIC_DESCRIPTION in str(json.loads(ann.read_text(encoding="utf-8")).get("info", {}))
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return bool(data.get("generate_if_missing")) or root.name.startswith("synthetic")


def _dataset_label(data: dict, synthetic: bool) -> str:
    root = str(data.get("root", "?"))
    return f"synthetic plates ({root})" if synthetic else f"real photos: {Path(root).name or root} ({root})"


def _weights_run(weights: str, runs_dir: Path) -> Optional[Path]:
    """The run folder of a checkpoint path like checkpoints/<run>/best.pth, when it exists."""
    run_dir = runs_dir / Path(weights).parent.name
    return run_dir if (run_dir / runs.CONFIG_FILE).is_file() else None


def finetune_command(checkpoint: Optional[str]) -> str:
    weights = checkpoint or "checkpoints/<this run>/best.pth"
    return (f"python -m engine train --config {FINETUNE_CONFIG} --data <your Roboflow export> "
            f"--set model.weights={weights}")


def describe_config(cfg: dict, runs_dir: Path = Path("runs"), checkpoint: Optional[str] = None,
                    base: Path = Path("."), _hops: int = 0) -> Provenance:
    """Provenance of the model a config trained; `checkpoint` is that model's file (for the command)."""
    data, model = _section(cfg, "data"), _section(cfg, "model")
    synthetic = is_synthetic_data(data, base)
    trained_on = _dataset_label(data, synthetic)
    weights = str(model.get("weights", "none"))
    pretrained_from, parent_synthetic = None, True
    if weights == "coco":
        pretrained_from = "COCO weights (general objects, no plates)"
    elif weights not in ("none", ""):
        parent_dir = _weights_run(weights, Path(runs_dir))
        parent_cfg = read_config(parent_dir) if parent_dir is not None else None
        if parent_cfg is not None and _hops < MAX_WEIGHTS_HOPS:
            parent = describe_config(parent_cfg, runs_dir, weights, base, _hops + 1)
            pretrained_from = f"run {parent_dir.name} ({parent.trained_on})"
            parent_synthetic = parent.synthetic_only
        else:
            pretrained_from = f"checkpoint {weights}"
            parent_synthetic = "synthetic" in weights
    synthetic_only = synthetic and parent_synthetic
    warning = command = None
    if synthetic_only:
        warning = ("This model was trained only on synthetic plates: on real photos it finds few plates. "
                   "Real photos need a model trained on real data.")
        command = finetune_command(checkpoint)
    return Provenance(trained_on, synthetic_only, pretrained_from, warning, command)


def describe_run(run: str, runs_dir: Path = Path("runs"), checkpoints_dir: Path = Path("checkpoints"),
                 base: Path = Path(".")) -> Optional[Provenance]:
    """Provenance of runs/<run>'s model, or None when its config is missing or unreadable."""
    cfg = read_config(Path(runs_dir) / run)
    if cfg is None:
        return None
    checkpoint = str(Path(checkpoints_dir) / run / runs.BEST_CKPT)
    return describe_config(cfg, Path(runs_dir), checkpoint, base)
