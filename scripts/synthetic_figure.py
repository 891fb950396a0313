"""docs/img/synthetic_vs_real.png: generated images (left) beside real plates-real photos (right), boxes drawn.

    .venv/bin/python scripts/synthetic_figure.py [--real /path/to/plates-real] [--out docs/img/synthetic_vs_real.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data import load_split  # noqa: E402
from engine.synthetic import render_image  # noqa: E402

CELL = (200, 150)
GRID = (3, 4)  # columns, rows per panel


def _framed(img: Image.Image, boxes: list) -> Image.Image:
    img = img.convert("RGB")
    scale = min(CELL[0] / img.width, CELL[1] / img.height)
    draw = ImageDraw.Draw(img)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1, y1, x2, y2], outline=(0, 255, 0), width=max(1, round(1 / scale)))
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", CELL, (255, 255, 255))
    cell.paste(img, ((CELL[0] - img.width) // 2, (CELL[1] - img.height) // 2))
    return cell


def synthetic_cells(n: int, seed: int = 0) -> list:
    return [_framed(*render_image(np.random.default_rng([seed, 9, i]), 320, 240)) for i in range(n)]


def real_cells(root: Path, n: int) -> list:
    images = load_split(root, "valid").images
    images = images[:: max(1, len(images) // n)][:n]
    return [_framed(Image.open(im.path), im.boxes.tolist()) for im in images]


def panel(cells: list) -> Image.Image:
    cols, rows = GRID
    out = Image.new("RGB", (cols * CELL[0] + (cols - 1) * 4, rows * CELL[1] + (rows - 1) * 4), (255, 255, 255))
    for k, cell in enumerate(cells):
        out.paste(cell, ((k % cols) * (CELL[0] + 4), (k // cols) * (CELL[1] + 4)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "plates-real"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "synthetic_vs_real.png"))
    args = ap.parse_args()
    n = GRID[0] * GRID[1]
    left, right = panel(synthetic_cells(n)), panel(real_cells(Path(args.real), n))
    title_h = 28
    fig = Image.new("RGB", (left.width + right.width + 24, left.height + title_h), (255, 255, 255))
    fig.paste(left, (0, title_h))
    fig.paste(right, (left.width + 24, title_h))
    draw = ImageDraw.Draw(fig)
    draw.text((8, 6), "generated (engine.synthetic, seed 0)", fill=(0, 0, 0))
    draw.text((left.width + 32, 6), "real (plates-real/valid)", fill=(0, 0, 0))
    fig.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
