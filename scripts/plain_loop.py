"""A plain training loop in the shape of torchvision's references/detection `train_one_epoch`, over the
same model, data and batch as `python -m engine train`: the anchor for "our loop vs a plain loop".

    .venv/bin/python scripts/plain_loop.py --config configs/demo_cpu.yaml --set data.root=... [--set ...]

It builds the model (engine.model.build_model), the train dataset (engine.data.PlateDataset with the
config's augmentation, in the order of engine train's first epoch) and an SGD optimizer exactly as the
config says, runs one epoch with no tracking, no clipping, no checkpoints, and prints one JSON line:
images/s over every step after the first (the first pays for warm-up), plus the step count.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.build import make_train_sampler  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.data import PlateDataset, collate_fn, load_split  # noqa: E402
from engine.model import build_model, resolve_device  # noqa: E402


def train_one_epoch(model, optimizer, data_loader, device) -> list[tuple[int, float]]:
    """(images, seconds) per step."""
    model.train()
    steps = []
    start = time.perf_counter()
    for images, targets in data_loader:
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        losses.item()
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        now = time.perf_counter()
        steps.append((len(images), now - start))
        start = now
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (as engine train)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.train.device)
    split = load_split(cfg.data.root, cfg.data.train_split)
    dataset = PlateDataset(split, train=True, augment=cfg.augment, limit=cfg.data.train_limit)
    # the same batches in the same order as engine train's first epoch: photos differ in cost, so
    # different batches would make the two loops' step rates differ by more than the loops do
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=make_train_sampler(dataset, cfg.run.seed, 1),
                        num_workers=cfg.data.num_workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")
    model = build_model(cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    steps = train_one_epoch(model, optimizer, loader, device)
    timed = steps[1:] or steps
    print(json.dumps({"images_per_s": sum(n for n, _ in timed) / sum(s for _, s in timed), "steps": len(steps)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
