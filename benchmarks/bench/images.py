"""Deterministic test pictures, written as JPEG files (not kept in git): photo-like content — a sky-to-ground
gradient, a sun, hills, a few coloured shapes and sensor-like noise — so that resizing, JPEG decoding and tiling do
the work they do on a photo.

    photo  640×480 (SmolVLM's processor: 4×3 tiles of 512 px + the global view = 13 tiles)
    wide   1024×768
    tall   300×900
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

SIZES = {"photo": (640, 480), "wide": (1024, 768), "tall": (300, 900)}  # name: (width, height)


def synthetic_photo(width: int, height: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    sky = np.stack([90 + 80 * v, 140 + 70 * v, 230 - 40 * v], -1)
    ground = np.stack([70 + 60 * u, 120 - 30 * v, 40 + 20 * u], -1)
    horizon = 0.55 + 0.08 * np.sin(6 * u + seed)  # rolling hills
    img = np.where((v > horizon)[..., None], ground, sky)
    sun = (u - 0.78) ** 2 + ((v - 0.2) * height / width) ** 2 < 0.004
    img[sun] = (255, 225, 120)
    for _ in range(6):  # boxes and discs of random colours
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.5, 0.95), rng.uniform(0.03, 0.1)
        colour = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            img[(abs(u - cx) < r) & (abs(v - cy) < r * width / height)] = colour
        else:
            img[(u - cx) ** 2 + ((v - cy) * height / width) ** 2 < r * r] = colour
    img += rng.normal(0, 6, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def write_test_images(directory: Path) -> Dict[str, Path]:
    """The pictures of SIZES as JPEG files in `directory` (rewritten each time: the same bytes for the same code)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        paths[name] = directory / f"{name}-{width}x{height}.jpg"
        Image.fromarray(synthetic_photo(width, height, seed)).save(paths[name], quality=90)
    return paths


def write_photo(directory: Path, name: str, width: int, height: int, seed: int) -> Path:
    """One more photo-like JPEG (another seed: another picture), e.g. a second photo of the test photo's size."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{width}x{height}.jpg"
    Image.fromarray(synthetic_photo(width, height, seed)).save(path, quality=90)
    return path
