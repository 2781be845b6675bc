"""LoRA for training: which modules `--lora-targets` names, fresh adapters on them, and the adapter files saved.

The LoRA layer, its merge, PEFT's names and the reading of adapter files are the model's (model/lora.py); this
module chooses targets, initialises their weights as PEFT does and writes the files, with an `adapter_config.json`
whose `target_modules` is a regular expression matching exactly the wrapped modules (`peft` matches a plain list of
names against every module, so `["q_proj"]` would also wrap SigLIP's q_proj).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from mindspore import Tensor

from ..errors import Idefics3Error
from ..files import atomic_path, write_json_atomically
from ..model.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, Lora, LoraPart, ModuleSlot, attach,
                          module_slots)
from .names import DEFAULT_TARGETS, TARGET_HELP, TEXT_NAMES, VISION_NAMES  # noqa: F401

GROUPS = (("model.vision_model.", "vision"), ("model.connector.", "connector"), ("model.text_model.", "text"),
          ("lm_head", "lm_head"))  # module path prefix → the part of the model `--lora-targets` names it by


def group_of(slot: ModuleSlot) -> str:
    """"vision", "connector", "text" or "lm_head": where a module lies, as `--lora-targets` tells them apart."""
    return next(g for prefix, g in GROUPS if slot.name.startswith(prefix))


def select_targets(model, targets: str) -> List[ModuleSlot]:
    """The modules `--lora-targets` names (see TARGET_HELP); an unknown name is one Idefics3Error."""
    slots = module_slots(model)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise Idefics3Error(f"--lora-targets is empty; pass {TARGET_HELP}")
    if "all-linear" in names:
        if len(names) > 1:
            raise Idefics3Error("--lora-targets all-linear takes no other names")
        return [s for s in slots if group_of(s) != "lm_head"]
    chosen = set()
    for name in names:
        if name in TEXT_NAMES:
            hits = [s for s in slots if group_of(s) == "text" and s.leaf == name]
        elif name == "proj":
            hits = [s for s in slots if group_of(s) == "connector"]
        elif name.startswith("vision.") and name[len("vision."):] in VISION_NAMES:
            hits = [s for s in slots if group_of(s) == "vision" and s.leaf == name[len("vision."):]]
        elif name == "lm_head":
            hits = [s for s in slots if group_of(s) == "lm_head"]
            if not hits:
                raise Idefics3Error("--lora-targets lm_head: this model ties lm_head to the token embeddings")
        else:
            raise Idefics3Error(f"--lora-targets: unknown module name {name!r}; use {TARGET_HELP}")
        chosen.update(s.name for s in hits)
    return [s for s in slots if s.name in chosen]


def target_regex(names: Sequence[str], all_names: Sequence[str]) -> str:
    """A regular expression that PEFT full-matches against module paths, matching exactly `names` among the
    model's modules `all_names`: layer indices become \\d+ where that stays exact, else the names are listed."""
    patterns = sorted({re.escape(re.sub(r"\.\d+\.", ".<i>.", n)).replace("<i>", r"\d+") for n in names})
    regex = "^(?:" + "|".join(patterns) + ")$"
    if {n for n in all_names if re.fullmatch(regex, n)} == set(names):
        return regex
    return "^(?:" + "|".join(map(re.escape, names)) + ")$"


def attach_lora(model, slots: Sequence[ModuleSlot], r: int, alpha: float, dropout: float = 0.0,
                seed: int = 0, use_rslora: bool = False) -> Lora:
    """Wrap `slots` with LoRA adapters initialised as PEFT does (A: Kaiming-uniform with a = √5, i.e.
    U(−1/√in, 1/√in); B: zero), from a generator seeded with `seed`, in model order."""
    if r < 1:
        raise Idefics3Error(f"--lora-rank must be at least 1, got {r}")
    if not 0 <= dropout < 1:
        raise Idefics3Error(f"--lora-dropout must be in [0, 1), got {dropout}")
    lora = Lora(r, float(alpha), float(dropout), use_rslora)
    rng = np.random.default_rng(seed)
    for slot in module_slots(model):  # model order, so the same seed gives the same weights whatever the order
        if slot.name not in {s.name for s in slots}:
            continue
        in_features = slot.cell.weight.shape[1]
        part = LoraPart(slot.name, in_features, slot.size, r)
        bound = 1.0 / math.sqrt(in_features)
        part.lora_A.set_data(Tensor(rng.uniform(-bound, bound, (r, in_features)).astype(np.float32),
                                    part.lora_A.dtype))
        lora.parts[slot.name] = part
    attach(model, lora)
    return lora


# ----------------------------------------------------------------------------------------------- files
def adapter_config(lora: Lora, base_model: Optional[str], all_names: Sequence[str]) -> dict:
    """adapter_config.json in PEFT's LoraConfig fields."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": target_regex(list(lora.parts), all_names), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": lora.use_rslora, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(directory, lora: Lora, model, base_model: Optional[str]) -> None:
    """adapter_config.json + adapter_model.safetensors in `directory`, each written atomically."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(lora.state(), str(tmp), metadata={"format": "pt"})
    names = [s.name for s in module_slots(model)]
    write_json_atomically(directory / ADAPTER_CONFIG, adapter_config(lora, base_model, names))
