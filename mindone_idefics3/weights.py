"""Hugging Face checkpoints: find them (local directory or hub repo id), read safetensors lazily, map names, load.

Weight naming lives here and nowhere else: our Cells keep transformers' parameter names except for the fused
projections (`qkv_proj` = q_proj ‖ k_proj ‖ v_proj, `gate_up_proj` = gate_proj ‖ up_proj, concatenated on the
output axis: `FUSED`, with each part's rows from the config: `text_fused`, `vision_fused`). The towers build their
FusedLinears from it, LoRA places PEFT's modules on their rows, the fine-tuning export splits them back. A
checkpoint may hold either form (the converter can store the fused one).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import mindspore as ms  # noqa: F401  (registers numpy's bfloat16, which safetensors needs to read BF16 as numpy)
import numpy as np
from mindspore import Tensor
from mindspore.common import np_dtype
from safetensors import SafetensorError, safe_open

from .config import Idefics3Config, TextConfig, VisionConfig
from .errors import Idefics3Error
from .files import read_json

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# What a model directory needs besides the weights (config, processor, tokenizer, chat template, generation).

NP_DTYPES = {ms.float32: np.float32, ms.float16: np.float16, ms.bfloat16: np_dtype.bfloat16}

# Our fused module → the Hugging Face modules concatenated (output axis, in this order) to make its weight and bias.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
Parts = Tuple[Tuple[str, int], ...]  # the modules a fused Linear holds, in order: (transformers' name, output rows)


def text_fused(cfg: TextConfig) -> Dict[str, Parts]:
    """A decoder layer's fused Linears → their parts: q (heads · head_dim) ‖ k ‖ v (kv heads · head_dim each),
    gate ‖ up (intermediate each)."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"qkv_proj": tuple(zip(FUSED["qkv_proj"], (q, kv, kv))),
            "gate_up_proj": tuple(zip(FUSED["gate_up_proj"], (cfg.intermediate_size,) * 2))}


def vision_fused(cfg: VisionConfig) -> Dict[str, Parts]:
    """A SigLIP layer's fused Linears → their parts: q ‖ k ‖ v (hidden each)."""
    return {"qkv_proj": tuple(zip(FUSED["qkv_proj"], (cfg.hidden_size,) * 3))}


def fused_parts(config: Idefics3Config, module: str) -> Optional[Parts]:
    """The parts of the Linear at `module`, a path in Idefics3ForConditionalGeneration (e.g.
    "model.text_model.layers.0.self_attn.qkv_proj"); None when that module is not fused."""
    leaf = module.rpartition(".")[2]
    if module.startswith("model.vision_model."):
        return vision_fused(config.vision_config).get(leaf)
    if module.startswith("model.text_model."):
        return text_fused(config.text_config).get(leaf)
    return None


# ----------------------------------------------------------------------------------------------- reading
SUPPORTED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np_dtype.bfloat16}
# The other dtypes of the safetensors format (valid files, but not weights this model can use).
OTHER_SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64", "C64", "F4",
                            "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
MAX_HEADER_BYTES = 100_000_000  # the limit of safetensors and of MindSpore's reader


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors name: F32, F16 or BF16
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _is_uint(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, Any]]:
    """Parse and check one safetensors header without reading tensor data.

    Checks everything the format implies, so that a bad file is one Idefics3Error naming the file (and tensor):
    a length field running past the end of the file, JSON that does not parse (or repeats a name), unknown or
    unsupported dtypes, malformed shapes, offsets outside the data section or not matching dtype × shape, and
    tensors that overlap or leave holes. Returns name → TensorInfo (absolute offsets) and `__metadata__`.
    """
    path = Path(path)
    corrupt = "the file is truncated or corrupt — download or convert it again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8:
                raise Idefics3Error(f"{path}: {size} bytes, too short to be a safetensors file; {corrupt}")
            if length > size - 8:
                raise Idefics3Error(f"{path}: the header length field says {length} bytes but only {size - 8} "
                                    f"follow (is it a safetensors file?); {corrupt}")
            if length > MAX_HEADER_BYTES:
                raise Idefics3Error(f"{path}: header of {length} bytes exceeds the format's "
                                    f"{MAX_HEADER_BYTES} byte limit; {corrupt}")
            raw = f.read(length)
    except OSError as e:
        raise Idefics3Error(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise Idefics3Error(f"{path}: the header lists {e.args[0]!r} twice; {corrupt}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON, a number too long, nesting too deep
        raise Idefics3Error(f"{path}: the header cannot be parsed as JSON ({e}); {corrupt}") from None
    if not isinstance(header, dict):
        raise Idefics3Error(f"{path}: the header is not a JSON object; {corrupt}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Idefics3Error(f"{path}: __metadata__ must map strings to strings; {corrupt}")
    data_start, data_len = 8 + length, size - 8 - length
    infos: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise Idefics3Error(f"{where} lacks dtype, shape or data_offsets; {corrupt}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
            if dtype in OTHER_SAFETENSORS_DTYPES:
                raise Idefics3Error(f"{where} has dtype {dtype}; only F32, F16 and BF16 weights are supported")
            raise Idefics3Error(f"{where} has unknown dtype {dtype!r} (not a safetensors dtype): the file is corrupt "
                                "or was written by an incompatible tool")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise Idefics3Error(f"{where} has an invalid shape {shape!r}; {corrupt}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise Idefics3Error(f"{where} has invalid data_offsets {offsets!r}; {corrupt}")
        begin, end = offsets
        if end > data_len:
            raise Idefics3Error(f"{where}: data_offsets [{begin}, {end}] are out of range, the file holds only "
                                f"{data_len} bytes of tensor data; {corrupt}")
        nbytes = math.prod(shape) * np.dtype(SUPPORTED_DTYPES[dtype]).itemsize  # exact, even for absurd shapes
        if end - begin != nbytes:
            raise Idefics3Error(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype} "
                                f"{tuple(shape)} needs {nbytes}; {corrupt}")
        infos[name] = TensorInfo(path, dtype, tuple(shape), data_start + begin, nbytes)
    covered = data_start  # the format covers the data section exactly: no overlaps, no holes
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if info.start != covered:
            how = "overlaps the previous tensor" if info.start < covered else "leaves a hole before it"
            raise Idefics3Error(f"{path}: tensor {name!r} {how}; {corrupt}")
        covered += info.nbytes
    if covered != size:
        raise Idefics3Error(f"{path}: {size - covered} bytes after the last tensor; {corrupt}")
    return infos, metadata


def read_weight_map(index: Path) -> Dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: tensor name → file name of a shard beside the index."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise Idefics3Error(f"{index} must hold a non-empty \"weight_map\" object from tensor names to shard file "
                            "names; download it again")
    outside = sorted(v for v in set(weight_map.values()) if v in ("", ".", "..") or Path(v).name != v)
    if outside:
        raise Idefics3Error(f"{index} maps tensors to {outside[0]!r:.80}, which is not the name of a file beside "
                            "the index; the index is corrupt — download it again")
    return weight_map


class CheckpointReader:
    """All tensors of a safetensors checkpoint (single file or shards), opened lazily (memory-mapped).

    Every header is checked by `read_safetensors_header` and by safetensors' own parser; the index must agree
    with the shards (no missing shard, no tensor stored twice, none the index maps elsewhere or cannot find).
    """

    def __init__(self, model_dir: Union[str, Path]):
        self.dir = Path(model_dir)
        self.files = self._weight_files()
        self.tensors: Dict[str, TensorInfo] = {}
        self._handles: Dict[Path, object] = {}
        self._fds: Dict[Path, int] = {}
        for f in self.files:
            for name, info in self._read_header(f).items():
                if name in self.tensors:
                    raise Idefics3Error(f"tensor {name!r} is stored twice: in {self.tensors[name].file.name} and "
                                        f"in {f.name}; the checkpoint is inconsistent")
                self.tensors[name] = info
        if self.index is not None:
            strays = [n for n, info in self.tensors.items() if self.index.get(n) != info.file.name]
            if strays:
                where = self.tensors[strays[0]].file.name
                raise Idefics3Error(f"{where} holds tensors the index maps elsewhere (or not at all): "
                                    f"{', '.join(strays[:5])}; the checkpoint is inconsistent")
            lost = sorted(n for n in self.index if n not in self.tensors)
            if lost:
                raise Idefics3Error(f"{self.dir}: {SAFE_INDEX} lists tensors that its shards do not hold: "
                                    f"{', '.join(lost[:5])}" + (" ..." if len(lost) > 5 else "")
                                    + "; the index and the shards do not belong together — download them again")

    def _weight_files(self) -> List[Path]:
        index = self.dir / SAFE_INDEX
        if index.is_file():
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise Idefics3Error(f"{self.dir}: shard(s) listed in {SAFE_INDEX} are missing: "
                                    f"{', '.join(missing)}; the download is incomplete — download them again")
            self.index = weight_map
            self.unlisted = sorted(p.name for p in self.dir.glob("*.safetensors") if p.name not in files)
            return [self.dir / f for f in files]
        self.index, self.unlisted = None, []
        if (self.dir / SAFE_SINGLE).is_file():
            return [self.dir / SAFE_SINGLE]
        pickles = [n for n in PICKLE_NAMES if (self.dir / n).exists()]
        if pickles:
            raise Idefics3Error(f"{self.dir} holds only pickle weights ({', '.join(pickles)}), which can run "
                                "arbitrary code when loaded and are refused; use the safetensors files of the "
                                "checkpoint (transformers: `save_pretrained(dir, safe_serialization=True)`)")
        raise Idefics3Error(f"{self.dir} has no weights: expected {SAFE_SINGLE} or {SAFE_INDEX} with its shards")

    def _read_header(self, path: Path) -> Dict[str, TensorInfo]:
        infos, _ = read_safetensors_header(path)
        try:
            handle = safe_open(str(path), framework="np")
        except (SafetensorError, OSError, ValueError) as e:
            raise Idefics3Error(f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt — "
                                "download or convert it again") from None
        self._handles[path] = handle
        if set(handle.keys()) != set(infos):  # two parsers of one header must agree
            raise Idefics3Error(f"{path}: the header is ambiguous (safetensors reads other tensor names); "
                                "the file is corrupt")
        return infos

    def names(self) -> Iterable[str]:
        return self.tensors.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        try:
            return self._handles[info.file].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise Idefics3Error(f"{info.file}: cannot read tensor {name!r} ({e}); the file is corrupt") from None

    def read_elements(self, name: str, first: int, count: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Elements [first, first + count) of tensor `name`, flattened, in its stored dtype.

        A plain positioned read, not a memory map: resident memory stays at `count` elements however large the
        tensor or the checkpoint (the converter streams whole checkpoints through this). With `out` (a uint8
        buffer) the data is read into it and the result is a view of it.
        """
        info = self.tensors[name]
        np_type = np.dtype(SUPPORTED_DTYPES[info.dtype])
        if first < 0 or count < 0 or first + count > info.numel:
            raise IndexError(f"elements [{first}, {first + count}) of {name} (numel {info.numel})")
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        want = count * np_type.itemsize
        data = np.empty(want, np.uint8) if out is None else out[:want]
        done, offset = 0, info.start + first * np_type.itemsize
        while done < want:
            try:
                got = os.preadv(fd, [data[done:]], offset + done)
            except OSError as e:
                raise Idefics3Error(f"{info.file}: cannot read tensor {name!r} ({e})") from None
            if got == 0:
                raise Idefics3Error(f"{info.file}: tensor {name!r} ends early (the file shrank while being read?); "
                                    "the file is truncated")
            done += got
        return data.view(np_type)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------- mapping
def source_names(param_name: str, available) -> Tuple[str, ...]:
    """The checkpoint tensors that make parameter `param_name`: itself, or the pieces of a fused projection."""
    if param_name in available:
        return (param_name,)
    module, _, kind = param_name.rpartition(".")  # kind: weight or bias
    leaf = module.rpartition(".")[2]
    if leaf in FUSED:
        stem = module[: len(module) - len(leaf)]
        return tuple(f"{stem}{part}.{kind}" for part in FUSED[leaf])
    return (param_name,)


def cast(array: np.ndarray, dtype, *, out: Optional[np.ndarray] = None,
         wide: Optional[np.ndarray] = None) -> np.ndarray:
    """Cast to a MindSpore dtype's numpy type (bf16 and fp16 round to nearest even); through fp32 between half types.

    out, wide: optional flat buffers of the target dtype and of float32, at least `array.size` long; the result
    then lives in one of them (or is `array` itself), so a caller streaming chunks allocates nothing per chunk.
    """
    target = NP_DTYPES[dtype]
    if array.dtype == target:
        return array
    shape, n = array.shape, array.size
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float32:
        fp32 = flat
    else:
        fp32 = np.empty(n, np.float32) if wide is None else wide[:n]
        if flat.dtype == np_dtype.bfloat16:  # widening is exact: a 16-bit shift (several times faster than the ufunc)
            np.left_shift(flat.view(np.uint16), 16, out=fp32.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(fp32, flat)
    if target == np.float32:
        return fp32.reshape(shape)
    result = np.empty(n, target) if out is None else out[:n]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN stays NaN, overflow becomes inf (callers check)
        np.copyto(result, fp32, casting="unsafe")
    return result.reshape(shape)


def plan_weights(shapes: Dict[str, Tuple[int, ...]], reader: CheckpointReader, *,
                 ignore: Callable[[str], bool] = lambda name: False) -> Dict[str, Tuple[str, ...]]:
    """Parameter name → the checkpoint tensors that make it, for parameters of the given shapes.

    Missing tensors, unexpected tensors (unless `ignore(name)`) and shape mismatches are reported together in one
    Idefics3Error, before anything is read.
    """
    available = set(reader.names())
    plan, missing, bad_shape, used = {}, [], [], set()
    for name, shape in shapes.items():
        sources = source_names(name, available)
        absent = [s for s in sources if s not in available]
        if absent:
            missing.extend(absent)
            continue
        parts = [reader.tensors[s].shape for s in sources]
        fused_shape = (sum(s[0] for s in parts), *parts[0][1:]) if parts[0] else parts[0]
        if any(s[1:] != parts[0][1:] for s in parts) or tuple(fused_shape) != tuple(shape):
            got = " + ".join(str(s) for s in parts)
            bad_shape.append(f"{' + '.join(sources)}: checkpoint {got}, model expects {tuple(shape)}")
        plan[name] = sources
        used.update(sources)
    unexpected = sorted(n for n in available - used if not ignore(n))
    problems = []
    if missing and reader.unlisted:
        problems.append(f"{', '.join(reader.unlisted)} {'is' if len(reader.unlisted) == 1 else 'are'} in the "
                        f"directory but not in {SAFE_INDEX}: the index does not belong to these shards")
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
    return plan


def load_weights(params: Dict[str, "ms.Parameter"], reader: CheckpointReader, dtype, *,
                 ignore: Callable[[str], bool] = lambda name: False, progress: bool = True) -> None:
    """Fill `params` (name → Parameter) from `reader`, cast to `dtype`; checks everything first (`plan_weights`)."""
    plan = plan_weights({name: tuple(p.shape) for name, p in params.items()}, reader, ignore=ignore)

    from tqdm.auto import tqdm

    total = sum(int(np.prod(p.shape)) * NP_DTYPES[dtype]().itemsize for p in params.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=None if progress else True,
              leave=False) as bar:
        for name, sources in plan.items():
            array = read_parameter(reader, sources, dtype)
            params[name].set_data(Tensor.from_numpy(array))
            bar.update(array.nbytes)
    reader.close()


def read_parameter(reader: CheckpointReader, sources: Tuple[str, ...], dtype) -> np.ndarray:
    """The parameter made of checkpoint tensors `sources` (concatenated on axis 0), in `dtype`.

    Read with positioned reads straight into the parameter's own buffer (through one tensor-sized staging buffer
    when the stored dtype differs), never through a memory map: a memory-mapped read keeps the file's pages in
    this process's resident memory beside the copies, which made loading peak at twice the weights.
    """
    infos = [reader.tensors[s] for s in sources]
    shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:]) if infos[0].shape else ()
    out = np.empty(shape, NP_DTYPES[dtype])
    flat, at = out.reshape(-1), 0
    for source, info in zip(sources, infos):
        n = info.numel
        if np.dtype(SUPPORTED_DTYPES[info.dtype]) == out.dtype:
            reader.read_elements(source, 0, n, out=flat[at:at + n].view(np.uint8))
        else:
            dst = flat[at:at + n]  # cast writes an fp32 result into `wide`, other dtypes into `out`
            cast(reader.read_elements(source, 0, n), dtype, out=dst, wide=dst if out.dtype == np.float32 else None)
        at += n
    return out
