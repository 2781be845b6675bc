"""The fused projections' layout: which of transformers' linear modules each of our fused Linears concatenates on
its output axis, and each one's output rows — q ‖ k ‖ v in `qkv_proj` (both towers' attention), gate ‖ up in
`gate_up_proj` (the text MLP).

Declared here, from the config, once. The part names are the checkpoint naming (weights.FUSED: the loader and the
converter need them below the model); the rows are the architecture's. The towers build their `FusedLinear`s from
`text_fused` / `vision_fused`; LoRA places PEFT's modules on the rows of each Linear's `parts`; the fine-tuning
export splits fused weights (and gradients) back with `fused_parts`, which needs the config alone.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from ..config import Idefics3Config, TextConfig, VisionConfig
from ..weights import FUSED
from .layers import Parts


def named_parts(fused: str, rows: Sequence[int]) -> Parts:
    """The parts of fused module `fused`: its modules (weights.FUSED) with their output rows, in order."""
    names = FUSED[fused]
    if len(names) != len(rows):
        raise ValueError(f"{fused} concatenates {len(names)} modules, got {len(rows)} sizes")
    return tuple(zip(names, rows))


def text_fused(cfg: TextConfig) -> Dict[str, Parts]:
    """A decoder layer's fused Linears (attribute name) → their parts: q (heads · head_dim) ‖ k ‖ v (kv heads ·
    head_dim each), gate ‖ up (intermediate each)."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"qkv_proj": named_parts("qkv_proj", (q, kv, kv)),
            "gate_up_proj": named_parts("gate_up_proj", (cfg.intermediate_size, cfg.intermediate_size))}


def vision_fused(cfg: VisionConfig) -> Dict[str, Parts]:
    """A SigLIP layer's fused Linears → their parts: q ‖ k ‖ v (hidden each)."""
    return {"qkv_proj": named_parts("qkv_proj", (cfg.hidden_size,) * 3)}


def fused_parts(config: Idefics3Config, module: str) -> Optional[Parts]:
    """The parts of the Linear at `module`, a path in Idefics3ForConditionalGeneration (e.g.
    "model.text_model.layers.0.self_attn.qkv_proj"); None when that module is not fused."""
    leaf = module.rpartition(".")[2]
    if module.startswith("model.vision_model."):
        return vision_fused(config.vision_config).get(leaf)
    if module.startswith("model.text_model."):
        return text_fused(config.text_config).get(leaf)
    return None
