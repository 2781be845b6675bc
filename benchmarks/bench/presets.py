"""Random-weight checkpoints of real models' shapes, with processor files, written once under a work directory.

Each preset directory is a checkpoint in the Hugging Face layout that both processors (ours and transformers')
and both models can load: config, generation config, random weights (`mindone_idefics3.demo.write_random_model`)
and the demo's byte-level BPE tokenizer with the model's processor settings — SmolVLM's (LANCZOS, image splitting,
rescale 1/255, mean/std 0.5), the images resized to a longest edge of 4 tiles (SmolVLM-256M: 2048 px, tiles of
512 px, 64 tokens per tile). The special token ids (bos, eos, pad, `<image>`) are the tokenizer's.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from . import Refused

# Shapes as transformers' config fields. storage: the dtype the weights are written in.
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                    patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=500000.0, hidden_act="silu"),
        scale=2, storage="float32"),
    "smolvlm-256m": dict(  # HuggingFaceTB/SmolVLM-256M-Instruct's shapes
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, hidden_act="silu"),
        scale=4, storage="float32"),
    "idefics3-8b": dict(  # HuggingFaceM4/Idefics3-8B-Llama3's shapes
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=364, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
        scale=2, storage="float16"),
}
LONGEST_EDGE_TILES = 4  # the processor resizes images to a longest edge of this many tiles (SmolVLM: 4 x 512)
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
RAM_FACTOR = 2.5  # RAM needed ≈ weight bytes × this: ours, the reference's copy, working memory
STAMP = "preset.json"  # written last: a preset directory without it (or with another stamp) is rewritten
FORMAT = 2  # 2: with processor files and the tokenizer's special token ids


def preset_params(name: str) -> int:
    from mindone_idefics3.demo import weight_shapes

    spec = PRESETS[name]
    return sum(int(np.prod(s)) for s in weight_shapes(spec["vision"], spec["text"], spec["scale"]).values())


def checkpoint_params(model_dir: Path) -> int:
    from mindone_idefics3.weights import CheckpointReader

    reader = CheckpointReader(model_dir)
    try:
        return sum(info.numel for info in reader.tensors.values())
    finally:
        reader.close()


def check_memory(params: int, dtypes: List[str], what: str, budget_gb: Optional[float]) -> None:
    """Refuse when the weights in the widest precision asked for, × RAM_FACTOR, exceed the memory budget."""
    from .machine import meminfo_bytes

    widest = max(dtypes, key=BYTES.get)
    need = params * BYTES[widest] * RAM_FACTOR
    if budget_gb is not None:
        avail, source = budget_gb * 1e9, "--ram-budget-gb"
    else:
        avail, source = meminfo_bytes("MemAvailable"), "MemAvailable"
    if need > avail:
        raise Refused(f"{what} has {params / 1e9:.2f} B parameters: {params * BYTES[widest] / 1e9:.1f} GB in "
                      f"{widest}, about {need / 1e9:.0f} GB of RAM to run (x{RAM_FACTOR}: ours, the reference's "
                      f"copy, working memory); {source} is {avail / 1e9:.1f} GB. Nothing was written or loaded: "
                      "use a smaller --preset (smolvlm-256m), a narrower --dtype, or a machine with more memory")


def ensure_preset(name: str, work_dir: Path) -> Path:
    """The preset's checkpoint under work_dir, written once (atomically: a partial one is redone)."""
    from mindone_idefics3.demo import write_random_model

    spec = PRESETS[name]
    path = work_dir / name
    stamp = json.dumps(dict(spec, format=FORMAT), sort_keys=True)
    if (path / STAMP).is_file() and (path / STAMP).read_text() == stamp:
        return path
    storage = np.dtype(spec["storage"])
    nbytes = preset_params(name) * storage.itemsize
    work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work_dir).free
    if nbytes * 1.05 > free:
        raise Refused(f"preset {name} needs {nbytes / 1e9:.1f} GB of disk under {work_dir}, {free / 1e9:.1f} GB "
                      "free: pass another --work-dir")
    print(f"writing random {name} weights ({nbytes / 1e9:.2f} GB, {storage.name}) to {path} ...", file=sys.stderr)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_model(partial, spec["vision"], spec["text"], spec["scale"],
                       longest_edge=LONGEST_EDGE_TILES * spec["vision"]["image_size"], dtype=storage)
    (partial / STAMP).write_text(stamp)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


def resolve_checkpoint(args, dtypes: List[str]) -> tuple:
    """(checkpoint directory, name) of --model or --preset, after the memory check (before anything is written)."""
    if args.model:
        from mindone_idefics3.hub import resolve_model_dir

        ckpt = Path(resolve_model_dir(args.model))
        check_memory(checkpoint_params(ckpt), dtypes, str(ckpt), args.ram_budget_gb)
        return ckpt, ckpt.name
    check_memory(preset_params(args.preset), dtypes, f"preset {args.preset}", args.ram_budget_gb)
    return ensure_preset(args.preset, Path(args.work_dir)), args.preset
