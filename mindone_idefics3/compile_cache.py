"""MindSpore's compile cache for one-shot runs (`generate.py`), made safe: one directory per sequence of graphs.

A fresh `generate.py` process compiles its graphs again every time (seconds per graph on the CPU;
docs/performance.md). MindSpore 2.10 can keep compiled graphs on disk (`MS_COMPILER_CACHE_ENABLE`, read at each
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


def request_signature(model, inputs, max_new_tokens: int, greedy: bool) -> dict:
    """What decides the graphs one compiled generate() call of `model` makes, in order: the vision chunks' shapes
    and whether their tiles have padded patches (first appearance of each), the prompt bucket, whether a prompt is
    padded, the cache length, greedy or sampled steps. Prompts of one bucket share it (not just equal lengths).
    Each rule is asked of the code that applies it (generation's buckets, the model's vision chunks)."""
    from .generation import cache_length, prompt_slots

    batch, length = inputs["input_ids"].shape
    vision = []
    if inputs.get("pixel_values") is not None:
        vision = [[*inputs["pixel_values"].shape[2:]]]
        for chunk in model.vision_chunks(inputs["pixel_values"], inputs["pixel_attention_mask"]):
            if chunk not in vision:
                vision.append(chunk)
    slots = prompt_slots(length, True)
    return dict(batch=batch, prompt_slots=slots, padded=bool(not inputs["attention_mask"].all()),
                cache_length=cache_length(slots + max_new_tokens), greedy=greedy, vision=vision)


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
