"""Idefics3 image preprocessing: resize, split into tiles + a global view, rescale/normalize, pad into one batch.

For each image (Idefics3-8B values in brackets; all come from `preprocessor_config.json`):
1. resize so the longest edge is `size["longest_edge"]` [4·364] keeping the aspect ratio (the short side rounded
   up to even, everything capped at 4096);
2. with `do_image_splitting`: resize again so both sides are multiples of `max_image_size["longest_edge"]` [364],
   cut that into rows × cols tiles (row-major) and append the whole image squashed to 364×364 (the global view);
   an image that fits in one tile stays one image with rows = cols = 0. Without splitting: squash to 364×364;
3. convert to RGB (alpha composited on white), rescale by `rescale_factor` and normalize by mean/std;
4. pad every tile to the batch's largest height/width and every sample to its largest image count (zero images,
   mask 0): pixel_values (B, I, 3, H, W) float32, pixel_attention_mask (B, I, H, W) int64.

This is numerically identical to transformers' `Idefics3ImageProcessor` (4.57.1): the same Pillow operations in
the same order (resize in the image's own mode, convert to RGB afterwards), the same float arithmetic for sizes,
and rescale + normalize as a per-channel 256-entry lookup table computed with the reference's float32 ops.
Where the reference is position-dependent or breaks, we do what it does for a well-behaved image instead:

- L and P images give exactly what their `image.convert("RGB")` gives. The reference resizes them with NEAREST
  (it turns 1-channel arrays into "P" images, which Pillow resamples only that way), so a scan comes out aliased.
  L is resized as L with the configured filter: Pillow filters every channel alike, so this is bit-identical to
  resizing the RGB image, with a third of the work.
- The reference infers the channel layout from the *first* image of a batch: a first image of height 1, 3 or 4
  is read as channels-first (wrong tiles), and a first L/P image raises. Ours does not depend on position.
- P images with transparency are treated as their `image.convert("RGBA")`: transparent pixels are composited on
  white (the reference drops the transparency, palette colours show). LA/PA/La/RGBa are treated as RGBA (the
  reference raises on LA).
- CMYK, YCbCr, LAB, HSV are converted with Pillow to RGB first (the reference reads CMYK as RGBA); 16-bit
  (I;16*, I) is scaled to 8 bits by 255/65535 with rounding (the reference raises on values above 255); "1" is
  read as L with 0/255; F is clipped to 0..255 by Pillow.
- `do_convert_rgb` and `do_pad` are always on: the model needs one 3-channel tensor (the reference's output with
  them off is only usable for RGB/L images, for which it equals ours).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import Idefics3Error
from .image_io import ensure_decoded

MAX_IMAGE_SIZE = 4096  # the reference caps the resized longest edge at 4k (and so a tile can be no larger)
MAX_EDGE = 2**31 - 1  # a `size` above MAX_IMAGE_SIZE acts as that cap; this one keeps the arithmetic in floats
RGBA_MODES = ("LA", "La", "PA", "RGBa")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImageProcessorConfig:
    """The fields of `preprocessor_config.json` we use (defaults are transformers' Idefics3 defaults)."""

    do_resize: bool = True
    size: Dict[str, int] = field(default_factory=lambda: {"longest_edge": 4 * 364})
    resample: int = int(Image.Resampling.LANCZOS)
    do_image_splitting: bool = True
    max_image_size: Dict[str, int] = field(default_factory=lambda: {"longest_edge": 364})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True  # always on, see the module docstring
    do_pad: bool = True  # always on, see the module docstring

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "ImageProcessorConfig":
        """Known fields from a preprocessor_config.json dict, then `overrides` (unknown override names raise)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise Idefics3Error(f"unknown image processor option(s) {unknown}; valid: {sorted(names)}")
        values = {k: v for k, v in {**data, **overrides}.items() if k in names and v is not None}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise Idefics3Error(f"{name} must be true or false, got {getattr(self, name)!r:.80}")
        self.size = edge_dict(self.size, "size")
        self.max_image_size = edge_dict(self.max_image_size, "max_image_size", most=MAX_IMAGE_SIZE)
        if isinstance(self.resample, bool) or not isinstance(self.resample, (int, np.integer)) or \
                self.resample not in range(6):
            raise Idefics3Error(f"resample={self.resample!r:.80} is not a PIL resampling filter (0-5; 1 is LANCZOS, "
                                "Idefics3's)")
        self.resample = int(self.resample)
        if not _is_number(self.rescale_factor) or not 0 < self.rescale_factor < math.inf:
            raise Idefics3Error(f"rescale_factor must be a positive number (1/255 for 8-bit images), got "
                                f"{self.rescale_factor!r:.80}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            value = [value] * 3 if _is_number(value) else value
            if not isinstance(value, (list, tuple)) or len(value) != 3 or \
                    not all(_is_number(v) and math.isfinite(v) for v in value):
                raise Idefics3Error(f"{name} must be 3 finite numbers (R, G, B), got {getattr(self, name)!r:.80}")
            setattr(self, name, tuple(float(v) for v in value))
        if any(s == 0 for s in self.image_std):
            raise Idefics3Error(f"image_std must not contain 0, got {self.image_std}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def edge_dict(value, name: str, most: int = MAX_EDGE) -> Dict[str, int]:
    """{"longest_edge": N} from that dict or a bare positive int N (at most `most`)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = {"longest_edge": int(value)}
    if not isinstance(value, dict) or "longest_edge" not in value:
        raise Idefics3Error(f"{name} must be {{'longest_edge': N}} (Idefics3 resizes by the longest edge), "
                            f"got {value!r:.80}")
    edge = value["longest_edge"]
    if isinstance(edge, bool) or not isinstance(edge, (int, np.integer)) or not 1 <= edge <= most:
        raise Idefics3Error(f"{name}['longest_edge'] must be a positive integer number of pixels, at most {most}, "
                            f"got {edge!r:.80}")
    return {"longest_edge": int(edge)}


# --------------------------------------------------------------------------------------------- output sizes
def fit_longest_edge(height: int, width: int, longest_edge: int) -> Tuple[int, int]:
    """(h, w) with the longest side = longest_edge, aspect ratio kept, the other side rounded up to even."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def cap_longest_edge(height: int, width: int, cap: int = MAX_IMAGE_SIZE) -> Tuple[int, int]:
    """Shrink (h, w) so the longest side is at most `cap`, aspect ratio kept (no even rounding here)."""
    aspect = width / height
    if width >= height and width > cap:
        width = cap
        height = int(width / aspect)
    elif height > width and height > cap:
        height = cap
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> Tuple[int, int]:
    """(h, w) rounded up to multiples of `tile`: the long side first, the short side from the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_boxes(height: int, width: int, tile: int) -> Tuple[List[Tuple[int, int, int, int]], int, int]:
    """Row-major (top, left, bottom, right) crops of an image larger than one tile; ([], 0, 0) if it fits."""
    if height <= tile and width <= tile:
        return [], 0, 0
    rows, cols = math.ceil(height / tile), math.ceil(width / tile)
    step_h, step_w = math.ceil(height / rows), math.ceil(width / cols)
    boxes = [(r * step_h, c * step_w, min((r + 1) * step_h, height), min((c + 1) * step_w, width))
             for r in range(rows) for c in range(cols)]
    return boxes, rows, cols


# --------------------------------------------------------------------------------------------- modes
def working_image(image: Image.Image) -> Image.Image:
    """The image in one of the modes the pipeline resizes in: RGB, RGBA or L (grey, equal to its RGB image)."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L"):
        return image
    if mode in RGBA_MODES or (mode == "P" and _palette_has_alpha(image)):
        return image.convert("RGBA")
    if mode == "P":
        return image.convert("RGB")
    if mode == "1":
        return image.convert("L")
    if mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _palette_has_alpha(image: Image.Image) -> bool:
    return "transparency" in image.info or image.palette.mode == "RGBA"


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB, RGBA or L image as (H, W, 3) uint8; RGBA composited on white (as the reference's convert_to_rgb)."""
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


# --------------------------------------------------------------------------------------------- the processor
@dataclass
class ImageBatch:
    """pixel_values (B, I, 3, H, W) float32, pixel_attention_mask (B, I, H, W) int64, tile rows/cols per image."""

    pixel_values: np.ndarray
    pixel_attention_mask: np.ndarray
    rows: List[List[int]]
    cols: List[List[int]]


class Idefics3ImageProcessor:
    """Images → model tiles. `__call__(images)` takes one list of PIL images per prompt."""

    def __init__(self, config: Optional[ImageProcessorConfig] = None):
        self.config = config or ImageProcessorConfig()
        self.config.validate()

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "Idefics3ImageProcessor":
        return cls(ImageProcessorConfig.from_dict(data, **overrides))

    def _lookup_table(self) -> np.ndarray:
        """(3, 256) float32: uint8 value → rescaled, normalized value, with the reference's exact float ops."""
        cfg = self.config
        values = np.arange(256, dtype=np.float64)
        values = (values * cfg.rescale_factor if cfg.do_rescale else values).astype(np.float32)
        table = np.stack([values] * 3)
        if cfg.do_normalize:
            mean = np.asarray(cfg.image_mean, np.float32)[:, None]
            std = np.asarray(cfg.image_std, np.float32)[:, None]
            table = (table - mean) / std
        return table

    def split(self, image: Image.Image, *, size: Dict[str, int], max_image_size: Dict[str, int],
              do_image_splitting: bool) -> Tuple[List[np.ndarray], int, int]:
        """One image → its frames as (h, w, 3) uint8 arrays (tiles row-major, then the global view), rows, cols."""
        cfg = self.config
        image = working_image(ensure_decoded(image, "an input image"))
        resample = Image.Resampling(cfg.resample)
        tile = max_image_size["longest_edge"]

        def resized(img: Image.Image, height: int, width: int) -> Image.Image:
            return img.resize((width, height), resample=resample)

        if cfg.do_resize:
            h, w = fit_longest_edge(image.height, image.width, size["longest_edge"])
            image = resized(image, *cap_longest_edge(h, w))
        if not do_image_splitting:
            return [to_rgb_array(resized(image, tile, tile))], 0, 0
        image = resized(image, *tile_multiple_size(image.height, image.width, tile))
        boxes, rows, cols = tile_boxes(image.height, image.width, tile)
        if not boxes:
            return [to_rgb_array(image)], 0, 0
        whole = to_rgb_array(image)
        frames = [whole[top:bottom, left:right] for top, left, bottom, right in boxes]
        frames.append(to_rgb_array(resized(image, tile, tile)))
        return frames, rows, cols

    def __call__(self, images: Sequence[Sequence[Image.Image]], *, size=None, max_image_size=None,
                 do_image_splitting: Optional[bool] = None) -> ImageBatch:
        """images: one list of PIL images per sample (lists may be empty). Keyword options override the config."""
        size, max_image_size, splitting = self.call_options(size, max_image_size, do_image_splitting)

        frames, rows, cols = [], [], []
        for sample in images:
            sample_frames, sample_rows, sample_cols = [], [], []
            for image in sample:
                f, r, c = self.split(image, size=size, max_image_size=max_image_size, do_image_splitting=splitting)
                sample_frames += f
                sample_rows.append(r)
                sample_cols.append(c)
            frames.append(sample_frames)
            rows.append(sample_rows)
            cols.append(sample_cols)
        pixel_values, pixel_mask = self.pad_and_normalize(frames)
        return ImageBatch(pixel_values, pixel_mask, rows, cols)

    def call_options(self, size=None, max_image_size=None, do_image_splitting: Optional[bool] = None
                     ) -> Tuple[Dict[str, int], Dict[str, int], bool]:
        """Per-call options checked (one Idefics3Error naming the wrong one), the config's where not given."""
        cfg = self.config
        if do_image_splitting is not None and not isinstance(do_image_splitting, bool):
            raise Idefics3Error(f"do_image_splitting must be True, False or None, got {do_image_splitting!r:.80}")
        return (cfg.size if size is None else edge_dict(size, "size"),
                cfg.max_image_size if max_image_size is None else edge_dict(max_image_size, "max_image_size",
                                                                            most=MAX_IMAGE_SIZE),
                cfg.do_image_splitting if do_image_splitting is None else do_image_splitting)

    def pad_and_normalize(self, frames: List[List[np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
        """Per-sample lists of (h, w, 3) uint8 frames → (B, I, 3, H, W) float32 and (B, I, H, W) int64."""
        all_frames = [f for sample in frames for f in sample]
        if not all_frames:
            raise Idefics3Error("no images to process: every sample's image list is empty")
        height = max(f.shape[0] for f in all_frames)
        width = max(f.shape[1] for f in all_frames)
        count = max(len(sample) for sample in frames)
        pixel_values = np.zeros((len(frames), count, 3, height, width), np.float32)
        pixel_mask = np.zeros((len(frames), count, height, width), np.int64)
        table = self._lookup_table()
        for b, sample in enumerate(frames):
            for i, frame in enumerate(sample):
                h, w = frame.shape[:2]
                for c in range(3):
                    pixel_values[b, i, c, :h, :w] = table[c][frame[:, :, c]]
                pixel_mask[b, i, :h, :w] = 1
        return pixel_values, pixel_mask
