"""LoRA on the model's linear layers, in PEFT's terms and file format.

PEFT wraps each targeted `nn.Linear` of transformers' model: `base(x) + lora_B(lora_A(dropout(x))) · scaling`,
scaling = alpha / r (alpha / √r with rsLoRA). Our model fuses q/k/v into `qkv_proj` and gate/up into
`gate_up_proj`, so one of our `Linear`s may stand for several of PEFT's modules: its adapter (`LoraAdapter`) holds
one (lora_A, lora_B) pair per targeted part and adds each part's delta to its slice of the fused output (zeros
for the parts not targeted). The adapter is attached with `Linear.adapter` (the layer math then calls it, see
model/layers.py); the frozen base weights are never written while training.

Names are PEFT's: the module paths of transformers' model (`model.text_model.layers.0.self_attn.q_proj`), saved as
`base_model.model.<path>.lora_A.weight` / `.lora_B.weight` in `adapter_model.safetensors`, with an
`adapter_config.json` whose `target_modules` is a regular expression matching exactly the wrapped modules
(`peft` matches a plain list of names against every module, so `["q_proj"]` would also wrap SigLIP's q_proj).
A PEFT-saved adapter loads here too: which modules it wraps is read from its tensor names.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from ..errors import Idefics3Error
from ..model.layers import Linear, linear
from .names import DEFAULT_TARGETS, TARGET_HELP, TEXT_NAMES, VISION_NAMES  # noqa: F401

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
@dataclass
class ModuleSlot:
    """One of transformers' linear modules inside one of ours: rows [start, start + size) of `cell`'s output."""

    name: str  # transformers' module path
    cell: nn.Cell  # our Linear
    start: int
    size: int
    group: str  # "text", "vision", "connector", "lm_head"

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


GROUPS = (("model.vision_model.", "vision"), ("model.connector.", "connector"), ("model.text_model.", "text"),
          ("lm_head", "lm_head"))  # module path prefix → group


def module_slots(model) -> List[ModuleSlot]:
    """Every linear module of transformers' Idefics3, in model order, mapped onto our Linears: a fused one holds a
    slot per part (its `parts`, model/fused.py), a plain one a single slot under its own path."""
    slots: List[ModuleSlot] = []
    for path, cell in model.cells_and_names():
        if not isinstance(cell, Linear):
            continue
        group = next(g for prefix, g in GROUPS if path.startswith(prefix))
        if cell.parts is None:
            slots.append(ModuleSlot(path, cell, 0, cell.weight.shape[0], group))
            continue
        stem, start = path[: path.rfind(".") + 1], 0
        for part, rows in cell.parts:
            slots.append(ModuleSlot(stem + part, cell, start, rows, group))
            start += rows
    return slots


def select_targets(model, targets: str) -> List[ModuleSlot]:
    """The modules `--lora-targets` names (see TARGET_HELP); an unknown name is one Idefics3Error."""
    slots = module_slots(model)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise Idefics3Error(f"--lora-targets is empty; pass {TARGET_HELP}")
    if "all-linear" in names:
        if len(names) > 1:
            raise Idefics3Error("--lora-targets all-linear takes no other names")
        return [s for s in slots if s.group != "lm_head"]
    chosen = set()
    for name in names:
        if name in TEXT_NAMES:
            hits = [s for s in slots if s.group == "text" and s.leaf == name]
        elif name == "proj":
            hits = [s for s in slots if s.group == "connector"]
        elif name.startswith("vision.") and name[len("vision."):] in VISION_NAMES:
            hits = [s for s in slots if s.group == "vision" and s.leaf == name[len("vision."):]]
        elif name == "lm_head":
            hits = [s for s in slots if s.group == "lm_head"]
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


# ----------------------------------------------------------------------------------------------- the cells
class LoraPart(nn.Cell):
    """lora_A (r, in), lora_B (out, r) of one of transformers' modules."""

    def __init__(self, name: str, in_features: int, out_features: int, r: int, dtype=ms.float32):
        """dtype: fp32 (the trainable weights stay fp32 over a half-precision base)."""
        super().__init__()
        self.module_name = name
        self.lora_A = Parameter(Tensor(np.zeros((r, in_features), np.float32), dtype), name=f"{name}.lora_A.weight")
        self.lora_B = Parameter(Tensor(np.zeros((out_features, r), np.float32), dtype), name=f"{name}.lora_B.weight")


class LoraAdapter(nn.Cell):
    """The delta of one of our Linears: each targeted part's `B(A(dropout(x))) · scaling` in its output slice."""

    def __init__(self, layout: Sequence[Tuple[int, Optional[LoraPart]]], scaling: float, dropout: float):
        super().__init__()
        self.parts = nn.CellList([p for _, p in layout if p is not None])
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


@dataclass
class Lora:
    """The adapters attached to a model: PEFT module name → LoraPart, and the hyper-parameters."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool = False
    parts: Dict[str, LoraPart] = field(default_factory=dict)
    slots: Dict[str, ModuleSlot] = field(default_factory=dict)

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
    by_cell: Dict[int, List[ModuleSlot]] = {}
    for slot in slots:
        by_cell.setdefault(id(slot.cell), []).append(slot)
    for slot in module_slots(model):  # model order, so the same seed gives the same weights whatever the order
        if slot.name not in {s.name for s in slots}:
            continue
        in_features = slot.cell.weight.shape[1]
        part = LoraPart(slot.name, in_features, slot.size, r)
        bound = 1.0 / math.sqrt(in_features)
        part.lora_A.set_data(Tensor(rng.uniform(-bound, bound, (r, in_features)).astype(np.float32),
                                    part.lora_A.dtype))
        lora.parts[slot.name], lora.slots[slot.name] = part, slot
    _attach(model, lora)
    return lora


def _attach(model, lora: Lora) -> None:
    cells: Dict[int, Tuple[nn.Cell, List[ModuleSlot]]] = {}
    for slot in module_slots(model):
        cells.setdefault(id(slot.cell), (slot.cell, []))[1].append(slot)
    for cell, parts in cells.values():
        if any(s.name in lora.parts for s in parts):
            cell.adapter = LoraAdapter([(s.size, lora.parts.get(s.name)) for s in parts], lora.scaling,
                                       lora.dropout)
    for name, part in lora.parts.items():  # attaching renamed them relative to the Linear ("adapter.parts.0...")
        part.lora_A.name, part.lora_B.name = f"{name}.lora_A.weight", f"{name}.lora_B.weight"


def detach(model) -> None:
    for slot in module_slots(model):
        slot.cell.adapter = None


def merge(model, lora: Lora) -> None:
    """Add every adapter's delta to its base weight (W[slice] += scaling · B·A, in fp32) and detach the adapters:
    the model then runs as a plain one (compiled generation)."""
    for name, part in lora.parts.items():
        slot = lora.slots[name]
        weight = slot.cell.weight
        w = weight.asnumpy().astype(np.float32)
        delta = lora.scaling * (part.lora_B.asnumpy().astype(np.float32) @ part.lora_A.asnumpy().astype(np.float32))
        w[slot.start:slot.start + slot.size] += delta
        weight.set_data(Tensor(w, weight.dtype))
    detach(model)


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
    """adapter_config.json + adapter_model.safetensors in `directory`, each written to a temp file and renamed."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(lora.state(), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    names = [s.name for s in module_slots(model)]
    write_json_atomic(directory / ADAPTER_CONFIG, adapter_config(lora, base_model, names))


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_adapter(directory) -> Tuple[dict, Dict[str, np.ndarray]]:
    """adapter_config.json and the tensors of a PEFT LoRA adapter directory, checked for what we support."""
    from safetensors.numpy import load_file

    from ..json_file import read_json

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


def load_adapter(model, directory, merge_now: bool = True) -> Lora:
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
        lora.slots[name] = slot
    lora.load_state(tensors)
    if merge_now:
        merge(model, lora)
    else:
        _attach(model, lora)
    return lora
