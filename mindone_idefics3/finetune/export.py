"""A trained model as a Hugging Face checkpoint: transformers' tensor names (the fused projections split again),
with the base checkpoint's config, generation, processor, tokenizer and chat-template files beside it."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict

import numpy as np

from ..files import atomic_directory, atomic_path
from ..weights import fused_parts

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
SIDE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model")
SKIP = {"model.safetensors.index.json", "adapter_config.json", "train_log.jsonl"}


def hf_state_dict(model) -> Dict[str, np.ndarray]:
    """transformers' names → fp32 arrays, each fused projection split into its parts (weights.py). Reads only
    `model.config` and `model.parameters_and_names()`, so gradients under our names split the same way."""
    out = {}
    for name, param in model.parameters_and_names():
        if "adapter." in name or "kv_cache" in name:
            continue
        array = param.asnumpy().astype(np.float32)
        module, _, kind = name.rpartition(".")  # kind: weight or bias
        parts = fused_parts(model.config, module)
        if parts is None:
            out[name] = array
            continue
        stem = module[: module.rfind(".") + 1]
        pieces = np.split(array, np.cumsum([rows for _, rows in parts])[:-1], axis=0)
        for (part, _), piece in zip(parts, pieces):
            out[f"{stem}{part}.{kind}"] = np.ascontiguousarray(piece)
    return out


def write_hf_checkpoint(model, source_dir, dest) -> None:
    """dest/ = model.safetensors + the side files of `source_dir`; written into a temporary folder beside dest and
    renamed over it, so dest is whole or absent."""
    from safetensors.numpy import save_file

    with atomic_directory(dest) as tmp:
        copy_side_files(source_dir, tmp)
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})


def write_hf_files_into(model, source_dir, dest) -> None:
    """The same files written into an existing folder (OUT of `--full`), each atomically."""
    from safetensors.numpy import save_file

    copy_side_files(source_dir, dest)
    with atomic_path(Path(dest) / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})


def copy_side_files(source_dir, dest) -> None:
    for pattern in SIDE_PATTERNS:
        for f in sorted(Path(source_dir).glob(pattern)):
            if f.name not in SKIP and f.is_file():
                with atomic_path(Path(dest) / f.name) as tmp:
                    shutil.copyfile(f, tmp)
