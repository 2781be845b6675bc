"""Video files written with PyAV for the tests, and transformers' SmolVLM video code made importable.

transformers' `video_processing_smolvlm` imports torchvision at the top, and torchvision's PyPI wheels need a CUDA
build of torch (here torch is the CPU build): `smolvlm_reference()` puts a stand-in `torchvision` module in
sys.modules that holds only what those modules touch at import (`InterpolationMode`), so the parts that are numpy
and text — `SmolVLMVideoProcessor.sample_frames`, `SmolVLMProcessor.expand_text_with_video_tokens`,
`video_utils.read_video_pyav` and `get_resize_output_image_size` — run unmodified. Anything that would resize with
torchvision fails loudly on the stand-in (it has no `resize`).
"""
from __future__ import annotations

import enum
import sys
import types
from fractions import Fraction

import numpy as np


def write_video(path, *, frames: int, fps, width: int, height: int, codec: str = "libx264", seed: int = 0):
    """A clip of moving gradients and blocks (every frame differs) with PyAV; fps may be a Fraction."""
    import av

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.stack([(x * 255 / width + 7 * i) % 256, (y * 255 / height + 3 * i) % 256,
                            127 + 100 * np.sin(x / 5 + i / 3)], -1)
            top, left = (5 * i) % max(height - 8, 1), (9 * i) % max(width - 8, 1)
            rgb[top:top + 8, left:left + 8] = rng.integers(0, 256, 3)
            frame = av.VideoFrame.from_ndarray(np.clip(rgb, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path, seconds: float = 1.0):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(int(16000 * seconds)) / 10) * 0.3).astype(np.float32)[None]
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def smolvlm_reference():
    """(SmolVLMVideoProcessor, SmolVLMProcessor, video_utils, video_processing_smolvlm) of transformers."""
    import transformers  # noqa: F401  (imported before the stand-in: it probes torchvision's installation)

    if "torchvision" not in sys.modules:
        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            NEAREST_EXACT = "nearest-exact"
            BILINEAR = "bilinear"
            BICUBIC = "bicubic"
            BOX = "box"
            HAMMING = "hamming"
            LANCZOS = "lanczos"

        names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional"]
        modules = [types.ModuleType(n) for n in names]
        for parent, child in zip(modules, modules[1:]):
            setattr(parent, child.__name__.rsplit(".", 1)[1], child)
        modules[1].InterpolationMode = modules[3].InterpolationMode = InterpolationMode
        sys.modules.update(zip(names, modules))
    from transformers import video_utils
    from transformers.models.smolvlm import processing_smolvlm, video_processing_smolvlm

    return (video_processing_smolvlm.SmolVLMVideoProcessor, processing_smolvlm.SmolVLMProcessor, video_utils,
            video_processing_smolvlm)
