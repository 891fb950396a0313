"""Experiment (issue 11, session 8), not on main: the demo's generator with photo-like background texture.

Adds 1/f^a colour noise (a in 0.9-1.6, amplitude 8-45 grey levels, mostly luminance) to every background
and blurs half of them (sigma 0.5-2 px) before cars and plates are drawn; everything else is engine.synthetic.
Measured result and commands: docs/benchmarks.md, "What did not help the synthetic-only model".

    .venv/bin/python docs/wip/textured_backgrounds.py /tmp/synth-tex 400
    .venv/bin/python -m engine train --config configs/demo_cpu.yaml --data /tmp/synth-tex --run tex
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import engine.synthetic as synthetic  # noqa: E402


def pink_noise(rng: np.random.Generator, width: int, height: int, alpha: float) -> np.ndarray:
    """(height, width, 3) noise with a 1/f^alpha spectrum, unit std, channels mostly shared."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1
    shape = (3, height, width // 2 + 1)
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / f ** alpha
    spectrum[:, 0, 0] = 0
    noise = np.fft.irfft2(spectrum, s=(height, width))
    shared = rng.uniform(0.3, 1.0)
    noise = shared * noise.mean(0, keepdims=True) + (1 - shared) * noise
    return np.moveaxis(noise / (noise.std() + 1e-8), 0, -1)


_flat_background = synthetic._background


def textured_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    arr = np.asarray(_flat_background(rng, width, height).convert("RGB"), np.float32)
    amplitude = rng.uniform(8, 45)
    arr += pink_noise(rng, width, height, rng.uniform(0.9, 1.6)) * amplitude
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return out.convert("RGBA")


if __name__ == "__main__":
    synthetic._background = textured_background
    print(synthetic.generate_dataset(sys.argv[1], train=int(sys.argv[2]), valid=100, test=100, seed=0))
