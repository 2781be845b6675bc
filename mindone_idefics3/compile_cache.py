"""MindSpore's compile cache for one-shot runs (`generate.py`), made safe: one directory per sequence of graphs.

A fresh `generate.py` process compiles its graphs again every time (the decode step of SmolVLM-256M: ~7 s on
a 2-core CPU). MindSpore 2.10 can keep compiled graphs on disk (`MS_COMPILER_CACHE_ENABLE`, read at each
compile), but it stores them as compile_cache_0..N in the order a process compiled them and reads them back by
that order, not by their inputs: a second run that compiled other shapes (another prompt length, a padded
tile, a different batch) loaded the wrong graph and failed ("For 'ExpandDims', the size of 'input_x' ... is not
equal to the size of the first output"). So each cache directory is named after everything that decides which
graphs a run compiles and in which order: this package's source, MindSpore's version, the checkpoint's config,
dtype, device, kernel switch, and the request's shapes. A repeated question about a same-sized image reuses its
graphs; anything else compiles into a new directory.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mindone_idefics3" / "compile"


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    """sha256 of this package's Python source: graphs compiled by other code are never reused."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def request_signature(input_ids: np.ndarray, attention_mask: np.ndarray, pixel_values: Optional[np.ndarray],
                      pixel_attention_mask: Optional[np.ndarray], max_new_tokens: int, greedy: bool,
                      vision_chunk: int) -> dict:
    """What decides the graphs one compiled generate() call makes, in order: the vision chunks' shapes and
    whether their tiles have padded patches (first appearance of each), the prompt bucket, whether a prompt is
    padded, the cache length, greedy or sampled steps. Prompts of one bucket share it (not just equal lengths)."""
    from .generation import cache_length, prompt_slots

    batch, length = input_ids.shape
    vision = []
    if pixel_values is not None:
        tiles = pixel_values.reshape(-1, *pixel_values.shape[2:])
        real = ~np.all(tiles == 0, axis=(1, 2, 3))  # padding images are dropped, as prepare_vision_inputs does
        masks = np.asarray(pixel_attention_mask).reshape(len(tiles), -1)[real]
        for start in range(0, len(masks), vision_chunk):
            chunk = (len(masks[start:start + vision_chunk]), bool(masks[start:start + vision_chunk].all()))
            if chunk not in vision:
                vision.append(chunk)
        vision = [list(tiles.shape[1:])] + vision
    return dict(batch=batch, prompt_slots=prompt_slots(length, True), padded=bool(not attention_mask.all()),
                cache_length=cache_length(prompt_slots(length, True) + max_new_tokens), greedy=greedy, vision=vision)


def enable(root: Path, model_dir: Path, dtype: str, device: Optional[str], request: dict) -> Path:
    """Point MindSpore's compile cache at the directory of this run's graphs under `root` (made if missing)."""
    import mindspore

    config = Path(model_dir) / "config.json"
    key = json.dumps(dict(package=_package_digest(), mindspore=mindspore.__version__,
                          config=hashlib.sha256(config.read_bytes()).hexdigest(), dtype=dtype, device=device,
                          kernels=os.environ.get("MINDONE_ASCEND_KERNELS", "1"), request=request), sort_keys=True)
    path = Path(root).expanduser() / hashlib.sha256(key.encode()).hexdigest()[:24]
    path.mkdir(parents=True, exist_ok=True)
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(path)
    return path
