"""PEFT's LoRA adapter directory, read and loaded onto the model (transformers' `model.load_adapter`): ours, as
finetune/ saves them, or PEFT's `save_pretrained`.

The directory holds `adapter_config.json` (PEFT's LoraConfig fields) and `adapter_model.safetensors` with tensors
`base_model.model.<module path>.lora_A[.<adapter name>].weight` / `.lora_B...`, named by transformers' module paths
(model/lora.py's `module_slots`); which modules an adapter wraps is read from those names and checked against its
config's target_modules. Only plain LoRA loads (no DoRA, bias, per-module ranks or extra saved modules).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from mindspore import nn

from ..errors import Idefics3Error
from .lora import Lora, LoraPart, attach, merge, module_slots

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_adapter(directory) -> Tuple[dict, Dict[str, np.ndarray]]:
    """adapter_config.json and the tensors of a PEFT LoRA adapter directory, checked for what we support."""
    from safetensors.numpy import load_file

    from ..files import read_json

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise Idefics3Error(f"{directory} is not a LoRA adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                            "(what finetune.py or PEFT's save_pretrained writes)")
    config = read_json(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise Idefics3Error(f"{config_file}: peft_type {config.get('peft_type')!r}; only LORA adapters load here")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                    if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise Idefics3Error(f"{config_file} uses {', '.join(unsupported)}, which this loader does not support; "
                            "merge the adapter with PEFT (merge_and_unload) and load the merged checkpoint")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise Idefics3Error(f"{config_file}: {key} must be a positive number, got {config.get(key)!r}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise Idefics3Error(f"{weights_file} is not a readable safetensors file ({e})") from None
    return config, tensors


def adapter_module_names(config: dict, tensors: Dict[str, np.ndarray], known: Sequence[str]) -> List[str]:
    """The modules an adapter wraps, from its tensor names (`base_model.model.<path>.lora_A[.default].weight`),
    checked against its config's target_modules (a list of names/suffixes, or a regex) and the model's modules."""
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    names: Dict[str, set] = {}
    for key in tensors:
        m = pattern.match(key)
        if not m:
            raise Idefics3Error(f"adapter tensor {key!r} is not a LoRA weight of PEFT's naming "
                                "(base_model.model.<module>.lora_A.weight)")
        names.setdefault(m.group(1), set()).add(m.group(2))
    unknown = sorted(n for n in names if n not in set(known))
    if unknown:
        raise Idefics3Error(f"the adapter wraps modules this model does not have: {', '.join(unknown[:5])}; it "
                            "was trained for another model")
    half = sorted(n for n, ab in names.items() if ab != {"A", "B"})
    if half:
        raise Idefics3Error(f"the adapter lacks lora_A or lora_B for {', '.join(half[:5])}")
    targets = config.get("target_modules")
    for name in names:
        if isinstance(targets, str):
            ok = re.fullmatch(targets, name) is not None
        elif isinstance(targets, list):
            ok = any(name == t or name.endswith("." + t) for t in targets)
        else:
            ok = True
        if not ok:
            raise Idefics3Error(f"adapter_config.json's target_modules {targets!r} does not cover {name}, which "
                                "the weights hold; the adapter files do not belong together")
    return [n for n in known if n in names]


def load_adapter(model: nn.Cell, directory, merge_now: bool = True) -> Lora:
    """Load a LoRA adapter (ours or PEFT-saved) onto `model`: merged into the base weights (default: for
    inference), or attached as trainable adapters."""
    config, tensors = read_adapter(directory)
    slots = {s.name: s for s in module_slots(model)}
    names = adapter_module_names(config, tensors, list(slots))
    tensors = {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", k)
               if not k.endswith((".lora_A.weight", ".lora_B.weight")) else k: v for k, v in tensors.items()}
    r = int(config["r"])
    lora = Lora(r, float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                bool(config.get("use_rslora", False)))
    for name in names:
        slot = slots[name]
        lora.parts[name] = LoraPart(name, slot.cell.weight.shape[1], slot.size, r)
    lora.load_state(tensors)
    attach(model, lora)
    if merge_now:
        merge(model)
    return lora
