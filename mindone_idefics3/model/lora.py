"""LoRA on the model's Linears, in PEFT's terms (tuners/lora/layer.py): the layer, its delta weight and its merge,
and PEFT's adapter directories loaded onto the model (transformers' `model.load_adapter`).

PEFT wraps each targeted `nn.Linear` of transformers' model: `base(x) + lora_B(lora_A(dropout(x))) · scaling`,
scaling = alpha / r (alpha / √r with rsLoRA). One of our Linears may stand for several of PEFT's modules (a
`FusedLinear`'s parts, weights.py), so its `LoraLayer` holds one (lora_A, lora_B) pair per targeted part and
adds each part's delta to that part's rows of the output (zeros for the parts not targeted). The layer hangs on
`Linear.adapter` (the layer math then calls it, see layers.py); the frozen base weight is never written while it is
attached, and `merge` folds it in for inference.

Names are PEFT's: the module paths of transformers' model (`model.text_model.layers.0.self_attn.q_proj`, see
`module_slots`), whose tensors serialize as `base_model.model.<path>.lora_A[.<adapter name>].weight` /
`.lora_B...` in `adapter_model.safetensors`, beside `adapter_config.json` (PEFT's LoraConfig fields). An adapter
loads whether finetune/ or PEFT's `save_pretrained` wrote it; which modules it wraps is read from its tensor names
and checked against its config's target_modules. Only plain LoRA loads (no DoRA, bias, per-module ranks or extra
saved modules).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..errors import Idefics3Error
from ..files import read_json
from .layers import Linear, linear

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class ModuleSlot:
    """One of transformers' linear modules inside one of ours: rows [start, start + size) of `cell`'s output."""

    name: str  # transformers' module path
    cell: Linear
    start: int
    size: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def module_slots(model: nn.Cell) -> List[ModuleSlot]:
    """Every linear module of transformers' Idefics3, in model order, mapped onto our Linears: a fused one holds a
    slot per part (its `parts`), a plain one a single slot under its own path."""
    slots: List[ModuleSlot] = []
    for path, cell in model.cells_and_names():
        if not isinstance(cell, Linear):
            continue
        if cell.parts is None:
            slots.append(ModuleSlot(path, cell, 0, cell.weight.shape[0]))
            continue
        stem, start = path[: path.rfind(".") + 1], 0
        for part, rows in cell.parts:
            slots.append(ModuleSlot(stem + part, cell, start, rows))
            start += rows
    return slots


class LoraPart(nn.Cell):
    """lora_A (r, in), lora_B (out, r) of one of transformers' modules."""

    def __init__(self, name: str, in_features: int, out_features: int, r: int, dtype=ms.float32):
        """dtype: fp32 (the trainable weights stay fp32 over a half-precision base)."""
        super().__init__()
        self.module_name = name
        self.lora_A = Parameter(Tensor(np.zeros((r, in_features), np.float32), dtype), name=f"{name}.lora_A.weight")
        self.lora_B = Parameter(Tensor(np.zeros((out_features, r), np.float32), dtype), name=f"{name}.lora_B.weight")


class LoraLayer(nn.Cell):
    """LoRA on one of our Linears: each targeted part's `B(A(dropout(x))) · scaling` in its rows of the output.

    layout: (rows, LoraPart or None) per part of the Linear, in output order (None: the part is not targeted).
    """

    def __init__(self, layout: Sequence[Tuple[int, Optional[LoraPart]]], scaling: float, dropout: float):
        super().__init__()
        self.parts = nn.CellList([p for _, p in layout if p is not None])
        self.in_features = self.parts[0].lora_A.shape[1]
        index, self.layout = 0, []
        for size, part in layout:
            self.layout.append((size, index if part is not None else -1))
            index += part is not None
        self.scaling, self.dropout = scaling, dropout

    def construct(self, x: Tensor) -> Tensor:
        """x (..., in) → (..., out) in x's dtype; computed in fp32 (the LoRA weights' dtype, whatever the base's)."""
        x32, outs = x.astype(ms.float32), []
        for size, index in self.layout:
            if index < 0:
                outs.append(ops.zeros(x.shape[:-1] + (size,), ms.float32))
                continue
            part = self.parts[index]
            h = ops.dropout(x32, p=self.dropout, training=True) if self.dropout > 0 and self.training else x32
            outs.append(linear(linear(h, part.lora_A), part.lora_B) * self.scaling)
        out = outs[0] if len(outs) == 1 else ops.cat(outs, axis=-1)
        return out.astype(x.dtype)

    def get_delta_weight(self) -> np.ndarray:
        """(out, in) fp32: scaling · B·A of each targeted part in its rows, zeros in the others'."""
        rows = []
        for size, index in self.layout:
            if index < 0:
                rows.append(np.zeros((size, self.in_features), np.float32))
                continue
            part = self.parts[index]
            rows.append(self.scaling * (part.lora_B.asnumpy().astype(np.float32)
                                        @ part.lora_A.asnumpy().astype(np.float32)))
        return np.concatenate(rows, axis=0)

    def merge(self, weight: Parameter) -> None:
        """weight (out, in) += the delta weight, added in fp32 and stored in weight's dtype. The base weight is an
        argument (PEFT's layer holds its base_layer): this layer hangs inside its Linear, not around it."""
        merged = weight.asnumpy().astype(np.float32) + self.get_delta_weight()
        weight.set_data(Tensor(merged, weight.dtype))


@dataclass
class Lora:
    """The adapters of a model: PEFT module name → LoraPart, and the hyper-parameters."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False
    parts: Dict[str, LoraPart] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def parameters(self) -> List[Parameter]:
        return [p for part in self.parts.values() for p in (part.lora_A, part.lora_B)]

    def state(self) -> Dict[str, np.ndarray]:
        """PEFT's tensor names → arrays (fp32)."""
        out = {}
        for name, part in self.parts.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = part.lora_A.asnumpy().astype(np.float32)
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = part.lora_B.asnumpy().astype(np.float32)
        return out

    def load_state(self, tensors: Dict[str, np.ndarray]) -> None:
        for name, part in self.parts.items():
            for key, param in ((f"{PEFT_PREFIX}{name}.lora_A.weight", part.lora_A),
                               (f"{PEFT_PREFIX}{name}.lora_B.weight", part.lora_B)):
                if tuple(tensors[key].shape) != tuple(param.shape):
                    raise Idefics3Error(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, the model "
                                        f"needs {tuple(param.shape)}: the adapter belongs to another model")
                param.set_data(Tensor(tensors[key].astype(np.float32), param.dtype))


def attach(model: nn.Cell, lora: Lora) -> None:
    """Hang a LoraLayer on every Linear holding one of `lora.parts`: the model then runs base + LoRA."""
    cells: Dict[int, Tuple[Linear, List[ModuleSlot]]] = {}
    for slot in module_slots(model):
        cells.setdefault(id(slot.cell), (slot.cell, []))[1].append(slot)
    for cell, slots in cells.values():
        if any(s.name in lora.parts for s in slots):
            cell.adapter = LoraLayer([(s.size, lora.parts.get(s.name)) for s in slots], lora.scaling, lora.dropout)
    for name, part in lora.parts.items():  # attaching renamed them relative to the Linear ("adapter.parts.0...")
        part.lora_A.name, part.lora_B.name = f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def merge(model: nn.Cell) -> None:
    """Merge every attached LoraLayer into its Linear's weight and detach it (PEFT's merge_and_unload): the model
    then runs as a plain one (compiled generation)."""
    for cell in [c for _, c in model.cells_and_names() if isinstance(c, Linear) and c.adapter is not None]:
        cell.adapter.merge(cell.weight)
        cell.adapter = None


# ----------------------------------------------------------------------------------------------- adapter files
def read_adapter(directory) -> Tuple[dict, Dict[str, np.ndarray]]:
    """adapter_config.json and the tensors of a PEFT LoRA adapter directory, checked for what we support."""
    from safetensors.numpy import load_file

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
