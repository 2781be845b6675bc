"""Hugging Face checkpoints: find them (local directory or hub repo id), read safetensors lazily, map names, load.

Weight naming lives here and nowhere else: our Cells keep transformers' parameter names except for the fused
projections (`qkv_proj` = q_proj ‖ k_proj ‖ v_proj, `gate_up_proj` = gate_proj ‖ up_proj, concatenated on the
output axis). A checkpoint may hold either form (the converter can store the fused one).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import mindspore as ms  # noqa: F401  (registers numpy's bfloat16, which safetensors needs to read BF16 as numpy)
import numpy as np
from mindspore import Tensor
from mindspore.common import np_dtype
from safetensors import SafetensorError, safe_open

from .errors import Idefics3Error

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# What a model directory needs besides the weights (config, processor, tokenizer, chat template, generation).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]

NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.bfloat16: np_dtype.bfloat16}

# fused parameter suffix → the Hugging Face suffixes concatenated (output axis) to make it
FUSED = {
    "qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    "qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
    "gate_up_proj.weight": ("gate_proj.weight", "up_proj.weight"),
    "gate_up_proj.bias": ("gate_proj.bias", "up_proj.bias"),
}


# ----------------------------------------------------------------------------------------------- locating files
def _looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/"))


def resolve_model_dir(path_or_repo: Union[str, os.PathLike], *, cache_dir: Optional[str] = None,
                      revision: Optional[str] = None, allow_patterns: Optional[List[str]] = None) -> Path:
    """A local directory as is; a hub repo id downloaded (or found in the cache) with huggingface_hub."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise Idefics3Error(f"{path} is a file; pass the model directory that holds config.json")
    name = str(path_or_repo)
    if not _looks_like_repo_id(name):
        raise Idefics3Error(f"{name}: no such directory, and not a Hugging Face repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=allow_patterns or HUB_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached (no network?)"
        raise Idefics3Error(f"cannot download {name!r}: {why} and it is not in the local cache; download it on a "
                            "machine with network (`huggingface-cli download " + name + " --local-dir DIR`) and "
                            "pass the directory instead") from None
    except HfHubHTTPError as e:
        raise Idefics3Error(f"cannot download {name!r} from the Hugging Face hub: {str(e).splitlines()[0]}; "
                            "check the repo id (and `huggingface-cli login` for gated repos) or pass a local "
                            "directory") from None
    except OSError as e:  # connection errors surface as OSError subclasses
        raise Idefics3Error(f"cannot download {name!r}: {e}; pass a local directory instead") from None


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class TensorInfo:
    file: Path
    dtype: str
    shape: Tuple[int, ...]


class CheckpointReader:
    """All tensors of a safetensors checkpoint (single file or shards), opened lazily (memory-mapped)."""

    SUPPORTED = {"F32": np.float32, "F16": np.float16, "BF16": np_dtype.bfloat16}

    def __init__(self, model_dir: Union[str, Path]):
        self.dir = Path(model_dir)
        self.files = self._weight_files()
        self.tensors: Dict[str, TensorInfo] = {}
        self._handles: Dict[Path, object] = {}
        for f in self.files:
            for name, info in self._read_header(f).items():
                if name in self.tensors:
                    raise Idefics3Error(f"tensor {name!r} is stored twice: in {self.tensors[name].file.name} and "
                                        f"in {f.name}; the checkpoint is inconsistent")
                self.tensors[name] = info

    def _weight_files(self) -> List[Path]:
        index = self.dir / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise Idefics3Error(f"{index} is not a valid safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise Idefics3Error(f"{self.dir}: shard(s) listed in {SAFE_INDEX} are missing: "
                                    f"{', '.join(missing)}; the download is incomplete — download them again")
            self.index = weight_map
            return [self.dir / f for f in files]
        self.index = None
        if (self.dir / SAFE_SINGLE).is_file():
            return [self.dir / SAFE_SINGLE]
        pickles = [n for n in PICKLE_NAMES if (self.dir / n).exists()]
        if pickles:
            raise Idefics3Error(f"{self.dir} holds only pickle weights ({', '.join(pickles)}), which can run "
                                "arbitrary code when loaded and are refused; use the safetensors files of the "
                                "checkpoint (transformers: `save_pretrained(dir, safe_serialization=True)`)")
        raise Idefics3Error(f"{self.dir} has no weights: expected {SAFE_SINGLE} or {SAFE_INDEX} with its shards")

    def _read_header(self, path: Path) -> Dict[str, TensorInfo]:
        try:
            handle = safe_open(str(path), framework="np")
        except (SafetensorError, OSError, ValueError) as e:
            raise Idefics3Error(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt — "
                                "download or convert it again") from None
        self._handles[path] = handle
        infos = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            dtype = sl.get_dtype()
            if dtype not in self.SUPPORTED:
                raise Idefics3Error(f"{path.name}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 "
                                    "weights are supported")
            infos[name] = TensorInfo(path, dtype, tuple(sl.get_shape()))
        if self.index is not None:
            strays = [n for n in infos if self.index.get(n) != path.name]
            if strays:
                raise Idefics3Error(f"{path.name} holds tensors the index maps elsewhere (or not at all): "
                                    f"{', '.join(strays[:5])}; the checkpoint is inconsistent")
        return infos

    def names(self) -> Iterable[str]:
        return self.tensors.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        try:
            return self._handles[info.file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise Idefics3Error(f"{info.file}: cannot read tensor {name!r} ({e}); the file is corrupt") from None


# ----------------------------------------------------------------------------------------------- mapping
def source_names(param_name: str, available) -> Tuple[str, ...]:
    """The checkpoint tensors that make parameter `param_name`: itself, or the pieces of a fused projection."""
    if param_name in available:
        return (param_name,)
    for fused, parts in FUSED.items():
        if param_name.endswith(fused):
            prefix = param_name[: -len(fused)]
            return tuple(prefix + p for p in parts)
    return (param_name,)


def cast(array: np.ndarray, dtype) -> np.ndarray:
    """Cast to a MindSpore dtype's numpy type (bf16 rounds to nearest even); through fp32 between half types."""
    target = NP_DTYPES[dtype]
    if array.dtype == target:
        return array
    if array.dtype != np.float32 and target != np.float32:
        array = array.astype(np.float32)
    return array.astype(target)


def load_weights(params: Dict[str, "ms.Parameter"], reader: CheckpointReader, dtype, *,
                 ignore: Callable[[str], bool] = lambda name: False, progress: bool = True) -> None:
    """Fill `params` (name → Parameter) from `reader`, cast to `dtype`.

    Everything is checked before anything is loaded: missing tensors, unexpected tensors (unless `ignore(name)`)
    and shape mismatches are reported together in one Idefics3Error.
    """
    available = set(reader.names())
    plan, missing, bad_shape, used = {}, [], [], set()
    for name, param in params.items():
        sources = source_names(name, available)
        absent = [s for s in sources if s not in available]
        if absent:
            missing.extend(absent)
            continue
        shapes = [reader.tensors[s].shape for s in sources]
        fused_shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if shapes[0] else shapes[0]
        if any(s[1:] != shapes[0][1:] for s in shapes) or tuple(fused_shape) != tuple(param.shape):
            got = " + ".join(str(s) for s in shapes)
            bad_shape.append(f"{' + '.join(sources)}: checkpoint {got}, model expects {tuple(param.shape)}")
        plan[name] = sources
        used.update(sources)
    unexpected = sorted(n for n in available - used if not ignore(n))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(sorted(missing)[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}"
                        + (" ..." if len(unexpected) > 10 else ""))
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): " + "; ".join(bad_shape[:10]))
    if problems:
        raise Idefics3Error(f"the checkpoint in {reader.dir} does not match the model config: "
                            + " | ".join(problems))

    from tqdm.auto import tqdm

    total = sum(int(np.prod(p.shape)) * NP_DTYPES[dtype]().itemsize for p in params.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=None if progress else True,
              leave=False) as bar:
        for name, sources in plan.items():
            arrays = [reader.get(s) for s in sources]
            array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
            array = np.ascontiguousarray(cast(array, dtype))
            params[name].set_data(Tensor.from_numpy(array))
            bar.update(array.nbytes)
