"""`idefics3-convert SRC DST`: a Hugging Face Idefics3 checkpoint → a MindSpore checkpoint directory.

DST holds config.json and every processor/tokenizer/chat-template/generation file of SRC, the weights cast to one
dtype as safetensors shards in MindSpore's flavour (`__metadata__` format "ms"; `mindspore.load_checkpoint(shard,
format="safetensors")` reads them), `model.safetensors.index.json`, and `conversion_manifest.json` (source files
with sha256, dtype, tool version). `Idefics3ForConditionalGeneration.from_pretrained(DST)` loads it.

- Streaming: tensors are read, cast and written CHUNK_ELEMENTS at a time with plain file reads (no memory map, so
  resident memory does not grow with the checkpoint); shard headers are computed up front from the source headers,
  so no shard is ever held in memory.
- Atomic: everything is written into a hidden sibling of DST and renamed into place at the end; an existing DST
  (replaced only with --force) is swapped out in one step once the new one is complete and verified. A failed run
  also removes the parent directories it created for DST (those still empty).
- Verified: every output shard is re-opened (our header parser and safetensors' own) and each tensor compared,
  bit for bit, with its source cast again.
- Names: as in the source (Hugging Face's), or with --fused the fused projections our Cells hold (`qkv_proj`,
  `gate_up_proj`, see weights.py); the loader accepts both.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 verification failed or an I/O error, 130/143 interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mindspore as ms
import numpy as np

from .config import Idefics3Config
from .errors import Idefics3Error
from .files import remove, replace_directory
from .version import __version__
from .hub import resolve_model_dir
from .process import is_alive, peak_rss_bytes
from .weights import NP_DTYPES, SAFE_INDEX, CheckpointReader, cast, plan_weights

CHUNK_ELEMENTS = 2**20  # per read/cast/write step: a few MB, cache-sized (faster than larger chunks)
MANIFEST = "conversion_manifest.json"
DTYPES = {"bf16": ms.bfloat16, "fp16": ms.float16, "fp32": ms.float32}
ST_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Files never copied to DST: weights in any format (ours are rewritten), their indexes.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class VerificationError(Exception):
    """The written checkpoint does not read back as the source cast to the target dtype."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so that the temporary directory is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------------- planning
@dataclass
class OutputTensor:
    name: str
    sources: Tuple[str, ...]  # source tensors concatenated on axis 0 (several only for a fused projection)
    shape: Tuple[int, ...]
    nbytes: int  # in the target dtype


@dataclass
class Shard:
    file: str
    tensors: List[OutputTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def model_parameter_shapes(config: Idefics3Config) -> Tuple[Dict[str, Tuple[int, ...]], bool]:
    """Our Cells' parameter names → shapes (built without allocating weights), and whether embeddings are tied."""
    from .model.idefics3 import Idefics3ForConditionalGeneration

    with ms.nn.utils.no_init_parameters():
        model = Idefics3ForConditionalGeneration(config, ms.float32)
    return {p.name: tuple(p.shape) for p in model.get_parameters()}, model.tied


def plan_tensors(reader: CheckpointReader, config: Idefics3Config, dtype: str, fused: bool) -> List[OutputTensor]:
    """What DST stores, in the order the sources lie on disk (sequential reads).

    The checkpoint must match the config exactly (missing, unexpected, mis-shaped tensors are refused before
    anything is written), so that DST is sure to load. Without `fused` names stay as in the source.
    """
    shapes, tied = model_parameter_shapes(config)
    plan = plan_weights(shapes, reader, ignore=lambda n: tied and n == "lm_head.weight")
    size = ITEMSIZE[dtype]
    if fused:
        out = [OutputTensor(name, sources, shapes[name], int(np.prod(shapes[name], dtype=np.int64)) * size)
               for name, sources in plan.items()]
    else:
        out = [OutputTensor(s, (s,), reader.tensors[s].shape, reader.tensors[s].numel * size)
               for sources in plan.values() for s in sources]
    where = {name: (str(info.file), info.start) for name, info in reader.tensors.items()}
    return sorted(out, key=lambda t: where[t.sources[0]])


def assign_shards(tensors: List[OutputTensor], shard_size: int) -> List[Shard]:
    """Greedy, in order: a new shard when the next tensor would overflow this one (a bigger tensor gets its own)."""
    groups: List[List[OutputTensor]] = [[]]
    for t in tensors:
        if groups[-1] and sum(x.nbytes for x in groups[-1]) + t.nbytes > shard_size:
            groups.append([])
        groups[-1].append(t)
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


# ----------------------------------------------------------------------------------------------- streaming
class ChunkBuffers:
    """The only memory a conversion streams through: one chunk of source bytes, of fp32, of output, of read-back.

    Reused for every chunk, so nothing is allocated (and page-faulted) per chunk, whatever the model's size.
    """

    def __init__(self, dtype: str, elements: Optional[int] = None):
        elements = elements or CHUNK_ELEMENTS
        self.source = np.empty(elements * 4, np.uint8)
        self.wide = np.empty(elements, np.float32)
        self.out = np.empty(elements, NP_DTYPES[DTYPES[dtype]])
        self.readback = np.empty(elements * ITEMSIZE[dtype], np.uint8)
        self.elements = elements


def cast_chunks(reader: CheckpointReader, tensor: OutputTensor, dtype: str,
                buffers: ChunkBuffers) -> Iterator[np.ndarray]:
    """The elements of `tensor` in the target dtype, flat, a chunk at a time (fused parts one after another: a
    concatenation on axis 0 is a concatenation of the row-major bytes). Each chunk is a view of `buffers`, valid
    until the next one."""
    for source in tensor.sources:
        numel = reader.tensors[source].numel
        for first in range(0, numel, buffers.elements):
            raw = reader.read_elements(source, first, min(buffers.elements, numel - first), out=buffers.source)
            out = cast(raw, DTYPES[dtype], out=buffers.out, wide=buffers.wide)
            if dtype == "fp16" and raw.dtype != np.float16:
                _check_fp16_range(source, buffers.wide[:raw.size] if raw.dtype != np.float32 else raw, out)
            yield out


def _check_fp16_range(name: str, fp32: np.ndarray, fp16: np.ndarray) -> None:
    """Refuse values that become inf in fp16 (|x| ≥ 65520 rounds to inf); two reductions, no temporaries."""
    if fp32.size == 0 or max(fp32.max(), -fp32.min()) < 65520:  # NaN fails the comparison: checked below
        return
    overflow = int(np.count_nonzero(np.isinf(fp16) & np.isfinite(fp32)))
    if overflow:
        raise Idefics3Error(f"{name}: {overflow} value(s) exceed fp16's range (±65504) and would become inf; "
                            "convert to bf16 (or fp32) instead")


def safetensors_header(tensors: List[OutputTensor], dtype: str, metadata: Dict[str, str]) -> bytes:
    """Length-prefixed JSON header; entries in data order (MindSpore's reader requires it), data 8-byte aligned."""
    entries: Dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": ST_NAMES[dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: Path, shard: Shard, reader: CheckpointReader, dtype: str, metadata: Dict[str, str],
                buffers: ChunkBuffers, bar) -> None:
    """Write one shard, streaming, and flush it to disk. `bar` counts source bytes."""
    with open(path, "wb") as f:
        f.write(safetensors_header(shard.tensors, dtype, metadata))
        for t in shard.tensors:
            for chunk in cast_chunks(reader, t, dtype, buffers):
                f.write(chunk.view(np.uint8))  # as bytes: a bf16 array has no buffer-protocol format
            bar.update(sum(reader.tensors[s].nbytes for s in t.sources))
        f.flush()
        os.fsync(f.fileno())


def verify(out_dir: Path, shards: List[Shard], reader: CheckpointReader, dtype: str, buffers: ChunkBuffers,
           bar) -> List[str]:
    """Re-open the written checkpoint and compare every tensor with its source cast again; problems by name."""
    out = CheckpointReader(out_dir)  # our header checks, safetensors' parser, index ↔ shards consistency
    try:
        expected = {t.name: t for s in shards for t in s.tensors}
        problems = [f"{name}: not in the output" for name in expected if name not in out.tensors]
        problems += [f"{name}: not expected in the output" for name in out.tensors if name not in expected]
        uint = {2: np.uint16, 4: np.uint32}[ITEMSIZE[dtype]]
        for name, t in expected.items():
            info = out.tensors.get(name)
            if info is None:
                continue
            if info.dtype != ST_NAMES[dtype] or info.shape != t.shape:
                problems.append(f"{name}: stored as {info.dtype} {info.shape}, expected {ST_NAMES[dtype]} {t.shape}")
                continue
            first, differing = 0, 0
            for want in cast_chunks(reader, t, dtype, buffers):
                got = out.read_elements(name, first, want.size, out=buffers.readback)
                if not np.array_equal(got.view(uint), want.view(uint)):
                    differing += int(np.count_nonzero(got.view(uint) != want.view(uint)))
                first += want.size
            if differing:
                problems.append(f"{name}: {differing} of {first} values differ from the source")
            bar.update(t.nbytes)
        return problems
    finally:
        out.close()


class _Hasher:
    """sha256 of files, in a background thread (hashlib and file reads release the GIL): the conversion does not
    wait for it."""

    def __init__(self):
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._futures = {}

    def add(self, path: Path) -> None:
        self._futures[path] = self._pool.submit(self._sha256, path)

    def _sha256(self, path: Path) -> Optional[str]:
        digest, buf = hashlib.sha256(), bytearray(8 << 20)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buf)) and not self._stop.is_set():
                digest.update(view[:n])
        return digest.hexdigest()

    def __getitem__(self, path: Path) -> str:
        return self._futures[path].result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------- the directory
def _is_weight_file(name: str) -> bool:
    if name.endswith(".index.json"):
        name = name[: -len(".index.json")]
    return name.endswith(WEIGHT_SUFFIXES)


def extra_files(src_dir: Path) -> List[Path]:
    """Everything but weights at the top of SRC: config, processor, tokenizer, chat template, generation config."""
    return sorted(p for p in src_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not _is_weight_file(p.name) and p.name != MANIFEST)


def _partial_dir(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _remove_stale_partials(dst: Path) -> None:
    """Temporary directories of conversions to `dst` that were killed (SIGKILL, power loss) on this host."""
    prefix = f".{dst.name}.partial-{socket.gethostname()}-"
    for path in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = path.name[len(prefix):] if path.name.startswith(prefix) else ""
        if pid.isdigit() and not is_alive(int(pid)):
            print(f"removing {path}, left by an interrupted conversion", file=sys.stderr)
            remove(path)


def _make_parents(dst: Path) -> List[Path]:
    """Create DST's missing parent directories; returns them, deepest first (a failed conversion removes them)."""
    missing, parent = [], dst.parent
    while not (parent.exists() or parent.is_symlink()):
        missing.append(parent)
        parent = parent.parent
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except BaseException:
        _remove_empty(missing)
        raise
    return missing


def _remove_empty(directories: List[Path]) -> None:
    """Remove `directories` (deepest first) while they are empty: a directory something else was put in stays,
    and so do its parents."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


# ----------------------------------------------------------------------------------------------- conversion
@dataclass
class Summary:
    dst: Path
    tensors: int
    shards: int
    bytes_in: int
    bytes_out: int
    dtype: str
    verified: bool
    seconds: float
    peak_rss: int  # bytes

    def line(self) -> str:
        return (f"converted {self.tensors} tensors: {_size(self.bytes_in)} in, {_size(self.bytes_out)} out "
                f"({self.dtype}, {self.shards} shard{'s' if self.shards > 1 else ''}), "
                f"{'verified' if self.verified else 'NOT verified'}, {self.seconds:.1f} s "
                f"({self.bytes_in / max(self.seconds, 1e-9) / 1e9:.2f} GB/s), peak RSS {_size(self.peak_rss)} "
                f"→ {self.dst}")


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def convert(src: str, dst, *, dtype: str = "bf16", shard_size: int = 5 * 10**9, force: bool = False,
            verify_output: bool = True, fused: bool = False, revision: Optional[str] = None,
            cache_dir: Optional[str] = None, progress: Optional[bool] = None) -> Summary:
    """Convert SRC (a directory or hub repo id) into the directory DST; see the module docstring.

    Raises Idefics3Error for bad input (DST untouched), VerificationError if the output does not read back
    as expected, OSError for I/O failures; on any of them (and on KeyboardInterrupt) DST is left as it was.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if dtype not in DTYPES:
        raise Idefics3Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    dst = Path(dst).expanduser().absolute()
    if (dst.exists() or dst.is_symlink()) and not force:
        raise Idefics3Error(f"{dst} already exists; pass --force to replace it (it is kept until the new "
                            "checkpoint is complete and verified)")
    src_dir = resolve_model_dir(src, revision=revision, cache_dir=cache_dir)
    if dst.exists() and dst.resolve() == src_dir.resolve():
        raise Idefics3Error(f"{dst} is the source directory; write the converted checkpoint somewhere else")
    config = Idefics3Config.from_json_file(src_dir / "config.json")
    reader = CheckpointReader(src_dir)
    tensors = plan_tensors(reader, config, dtype, fused)
    shards = assign_shards(tensors, shard_size)
    bytes_in = sum(reader.tensors[s].nbytes for t in tensors for s in t.sources)
    bytes_out = sum(t.nbytes for t in tensors)

    created = _make_parents(dst)
    tmp = _partial_dir(dst)
    hasher = _Hasher()
    bar_args = dict(unit="B", unit_scale=True, unit_divisor=1000, leave=False, file=sys.stderr,
                    disable=None if progress is None else not progress)
    try:
        _remove_stale_partials(dst)
        free = shutil.disk_usage(dst.parent).free
        if free < bytes_out + (1 << 20):
            raise Idefics3Error(f"{dst.parent} has {_size(free)} free; the converted checkpoint needs "
                                f"{_size(bytes_out)}")
        remove(tmp)
        extras = extra_files(src_dir)
        for path in reader.files + extras:
            hasher.add(path)
        tmp.mkdir()
        metadata = {"format": "ms", "dtype": dtype, "converted_by": f"mindone_idefics3.convert {__version__}"}
        buffers = ChunkBuffers(dtype)
        with tqdm(total=bytes_in, desc=f"converting to {dtype}", **bar_args) as bar:
            for shard in shards:
                write_shard(tmp / shard.file, shard, reader, dtype, metadata, buffers, bar)
                hasher.add(tmp / shard.file)
        index = {"metadata": {"total_size": bytes_out},
                 "weight_map": {t.name: s.file for s in shards for t in s.tensors}}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if verify_output:
            with tqdm(total=bytes_out, desc="verifying", **bar_args) as bar:
                problems = verify(tmp, shards, reader, dtype, buffers, bar)
            if problems:
                raise VerificationError(f"{len(problems)} tensor(s) did not read back as written: "
                                        + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
        for path in extras:
            shutil.copyfile(path, tmp / path.name)
        manifest = {
            "tool": "mindone_idefics3.convert", "tool_version": __version__, "mindspore_version": ms.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"location": str(src), "directory": str(src_dir.resolve()), "revision": revision},
            "dtype": dtype, "fused": fused, "shard_size": shard_size, "verified": verify_output,
            "tensors": len(tensors), "bytes_in": bytes_in, "bytes_out": bytes_out,
            "source_files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": hasher[p]}
                             for p in reader.files + extras],
            "weight_files": [{"name": s.file, "bytes": (tmp / s.file).stat().st_size, "sha256": hasher[tmp / s.file]}
                             for s in shards],
            "copied_files": [p.name for p in extras],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_directory(tmp, dst)
    except BaseException:
        remove(tmp)
        _remove_empty(created)
        raise
    finally:
        hasher.close()
        reader.close()
    return Summary(dst, len(tensors), len(shards), bytes_in, bytes_out, dtype, verify_output,
                   time.perf_counter() - started, peak_rss_bytes())


# ----------------------------------------------------------------------------------------------- command line
def parse_size(text: str) -> int:
    """'5GB' → 5·10⁹ (KB/MB/GB/TB decimal, KiB/MiB/GiB binary, as transformers); a plain number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "b").lower()
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="idefics3-convert",
        description="Convert a Hugging Face Idefics3/SmolVLM checkpoint (safetensors) into a MindSpore checkpoint "
                    "directory that Idefics3ForConditionalGeneration.from_pretrained loads.")
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory or hub repo id (org/name)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="dtype of the stored weights (default bf16; bf16 rounds to nearest even)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="maximum tensor bytes per shard, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--force", action="store_true",
                   help="replace an existing DST (only once the new checkpoint is complete)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="re-read every output tensor and compare it with the source (default on)")
    p.add_argument("--fused", action="store_true",
                   help="store q/k/v and gate/up projections fused (qkv_proj, gate_up_proj), as the model's "
                        "Cells hold them")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--cache-dir", help="huggingface_hub cache directory when SRC is a repo id")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (they are shown on terminals only anyway)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .device import select_device

    def interrupted(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        select_device("CPU")  # conversion runs on the host; no NPU needed (and none probed)
        summary = convert(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size, force=args.force,
                          verify_output=args.verify, fused=args.fused, revision=args.revision,
                          cache_dir=args.cache_dir, progress=args.progress)
    except Idefics3Error as e:
        print(f"idefics3-convert: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"idefics3-convert: verification failed, nothing written to {args.dst}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"idefics3-convert: {e}; {args.dst} was left as it was", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"idefics3-convert: interrupted; {args.dst} was left as it was", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"idefics3-convert: {e} received; {args.dst} was left as it was", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
