"""Decode and prefill throughput of mindone_idefics3, side by side with transformers on the same weights.

    python benchmarks/throughput.py --preset tiny --dtype fp32,fp16,bf16 --reference hf
    python benchmarks/throughput.py --preset smolvlm-256m --dtype fp32 --batch-sizes 1 --reference hf
    python benchmarks/throughput.py --model path/to/checkpoint --dtype fp16 --new-tokens 64

Prints a markdown table in the MindONE gallery's format (model, precision, device, attention backend, jit, batch,
tokens/s, time to first token, ratio vs the reference) and a table of details, writes a JSON file (the machine
described: CPU, cores, RAM, versions, threads, date) and, when matplotlib is installed (`pip install -e .[plot]`),
a PNG of decode tokens/s against batch size and against context length.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

DEFINITIONS = """\
What is measured, per precision × jit × batch × context (timings: median of --repeats runs after --warmup runs;
min/max in the JSON):
  tokens/s       decode speed per sequence: (new tokens - 2) / time from the 2nd to the last new token. The first
                 token comes from the prefill; the first decode step (which may compile) is left out.
                 aggregate tokens/s = tokens/s per sequence x batch.
  TTFT           time to first token: generate() called -> first new token on the host (vision + prefill + first
                 sampling), warm (graphs were compiled in the warm-up).
  vision ms      the vision tower + connector alone (model.model.image_features; transformers'
                 get_image_features), timed separately from generate(), warm.
  load s         from_pretrained of the checkpoint into that precision.
  peak RSS       this process's peak resident memory (VmHWM) during our generate() runs, reset before each run
                 (/proc/self/clear_refs); both models are resident then: the JSON also has each side's peak above
                 its pre-run baseline. On Ascend: device memory (mindspore.runtime.max_memory_allocated).
  finite         no NaN/inf in our logits of one full forward over the prompt.
  kernels/step   kernels launched by one compiled decode step: the kernel actors of MindSpore's final actor set
                 for the decode graph (set_context(save_graphs=1), MS_DEV_DUMP_IR_PASSES=actor_set), compiled once
                 more after each precision's timings. PyNative (jit off) dispatches op by op: not counted.
  BW bound       memory-bandwidth limit on decode: host memory bandwidth (numpy streaming read on --threads
                 threads, measured in this run) / bytes one decode step reads (decoder + lm_head weights + the
                 whole static KV cache), as tokens/s per sequence; '% of bound' = measured / bound.
With --reference hf, transformers runs in this process on the same files (CPU torch, attn_implementation="eager",
same precision, inputs and threads), interleaved with ours (ours, reference, ours, ...), greedy, exactly
--new-tokens tokens on both sides (no stop ids), its vision position ids corrected as in
mindone_idefics3/testing.py so the ids can be compared. 'x ref' columns are speed-ups, > 1 = ours faster:
our tokens/s / theirs, their TTFT / ours. 'ids equal' = new tokens equal to the reference's (leading, every row);
'logits rel. L2' compares one full forward. Inputs: random token ids with --images-per-prompt blocks of image
tokens, random pixels, every row the same length (no padding)."""

# Random-weight shape presets (transformers' config fields). storage: the dtype the weights are written in.
PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                    patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=500000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0),
        scale=2, image_token_id=500, storage="float32"),
    "smolvlm-256m": dict(  # HuggingFaceTB/SmolVLM-256M-Instruct's shapes
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2),
        scale=4, image_token_id=49190, storage="float32"),
    "idefics3-8b": dict(  # HuggingFaceM4/Idefics3-8B-Llama3's shapes
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=364, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", bos_token_id=128000,
                  eos_token_id=128001, pad_token_id=128002,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
        scale=2, image_token_id=128257, storage="float16"),
}
DTYPES = ("fp32", "fp16", "bf16")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
RAM_FACTOR = 2.5  # RAM needed ≈ weight bytes × this: ours, the reference's copy, working memory
SHAPE_ONLY_KERNELS = {"Reshape", "ExpandDims", "Squeeze", "Flatten"}
PRESET_STAMP = "preset.json"  # written last: a preset directory without it is incomplete and rewritten


class Refused(Exception):
    """The run cannot go ahead (memory, disk, arguments); the message says why and what to do."""


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=DEFINITIONS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory in the Hugging Face layout (or a hub repo id)")
    src.add_argument("--preset", choices=list(PRESETS),
                     help="random weights of these shapes, written once under --work-dir (default: tiny)")
    p.add_argument("--dtype", default="fp32,fp16,bf16",
                   help="comma list of fp32,fp16,bf16; ones the device cannot run are reported as unsupported "
                        "(default: all three)")
    p.add_argument("--batch-sizes", default="1,2", help="comma list (default: 1,2)")
    p.add_argument("--images-per-prompt", type=int, default=1,
                   help="image tiles per prompt, 0 = text only (default: 1); a split image is several tiles")
    p.add_argument("--image-size", type=int, default=None,
                   help="valid pixels per tile edge: tiles are padded to the model's tile size with the pixel mask, "
                        "as the processor pads smaller images (default: the full tile)")
    p.add_argument("--prompt-tokens", default="32,256",
                   help="comma list of text tokens per prompt, besides the image tokens; several values give the "
                        "context-length plot (default: 32,256)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run, at least 3 (default: 32)")
    p.add_argument("--jit", default="on",
                   help="comma list of on,off: compiled graphs (mindspore.jit) or PyNative; off is slow (tiny: "
                        "~0.1 s per token, SmolVLM-256M: seconds) (default: on)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="runs before measuring, they compile graphs (default: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides: MindSpore's ms.device_context.cpu.op_tuning.threads_num, "
                        "torch.set_num_threads and the bandwidth probe (default: $MINDONE_CPU_THREADS, else the "
                        "cores this process may use)")
    p.add_argument("--reference", choices=["none", "hf"], default="none",
                   help="hf: run transformers on the same weights and inputs, interleaved, and print ratios "
                        "(needs the test extra: torch, transformers)")
    p.add_argument("--kernel-count", choices=["on", "off"], default="on",
                   help="count the kernels of one compiled decode step (default: on; needs a jit=on row)")
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None, help="default: Ascend when usable, else CPU")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"),
                   help="where preset weights are written (default: benchmarks/.cache)")
    p.add_argument("--ram-budget-gb", type=float, default=None,
                   help="memory the run may use; a model whose weights x 2.5 exceed it is refused before anything is "
                        "written or loaded (default: MemAvailable of /proc/meminfo)")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/<preset or model>-<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png; needs matplotlib)")
    args = p.parse_args(argv)
    if args.model is None and args.preset is None:
        args.preset = "tiny"
    try:
        args.dtypes = _choices(args.dtype, DTYPES, "--dtype")
        args.jits = _choices(args.jit, ("on", "off"), "--jit")
        args.batches = _positive_ints(args.batch_sizes, "--batch-sizes")
        args.contexts = _positive_ints(args.prompt_tokens, "--prompt-tokens")
    except ValueError as e:
        p.error(str(e))
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3 (the first comes from the prefill, the first decode step is not "
                "timed, tokens/s needs one more)")
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.images_per_prompt < 0:
        p.error("--warmup and --images-per-prompt must be >= 0")
    return args


def _choices(text: str, allowed, flag: str) -> List[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{flag}: {', '.join(bad) or 'nothing given'}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(values))


def _positive_ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} takes positive integers, got {text!r}")
    return list(dict.fromkeys(values))


# ----------------------------------------------------------------------------------------------- machine
def machine_description(threads: int, device: str) -> dict:
    import mindspore

    def meminfo(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith(key + ":"))

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown")
    info = dict(cpu=cpu, cores_usable=len(os.sched_getaffinity(0)), cores_total=os.cpu_count(),
                ram_gb=round(meminfo("MemTotal") / 1e9, 1), ram_available_gb=round(meminfo("MemAvailable") / 1e9, 1),
                load_average_1min_at_start=os.getloadavg()[0], device=device, threads=threads,
                os=platform.platform(), python=platform.python_version(), numpy=np.__version__,
                mindspore=mindspore.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"))
    return info


def memory_bandwidth_gbs(threads: int) -> float:
    """Host memory read bandwidth: best of 5 sums of a 512 MB float64 array split over `threads` threads."""
    a = np.ones(64 * 2**20, np.float64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    return kb / 1024 if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- checkpoint
def preset_params(name: str) -> int:
    from mindone_idefics3.demo import weight_shapes

    spec = PRESETS[name]
    return sum(int(np.prod(s)) for s in weight_shapes(spec["vision"], spec["text"], spec["scale"]).values())


def check_memory(params: int, dtypes: List[str], what: str, budget_gb: Optional[float]) -> None:
    """Refuse when the weights in the widest precision asked for, × RAM_FACTOR, exceed the memory budget."""
    widest = max(dtypes, key=BYTES.get)
    need = params * BYTES[widest] * RAM_FACTOR
    if budget_gb is not None:
        avail, source = budget_gb * 1e9, "--ram-budget-gb"
    else:
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        source = "MemAvailable"
    if need > avail:
        raise Refused(f"{what} has {params / 1e9:.2f} B parameters: {params * BYTES[widest] / 1e9:.1f} GB in "
                      f"{widest}, about {need / 1e9:.0f} GB of RAM to run (x{RAM_FACTOR}: ours, the reference's "
                      f"copy, working memory); {source} is {avail / 1e9:.1f} GB. Nothing was written or loaded: "
                      "use a smaller --preset (smolvlm-256m), a narrower --dtype, or a machine with more memory")


def ensure_preset(name: str, work_dir: Path) -> Path:
    """The preset's random-weight checkpoint under work_dir, written once (atomically: a partial one is redone)."""
    from mindone_idefics3.demo import weight_shapes, write_random_checkpoint

    spec = PRESETS[name]
    path = work_dir / name
    stamp = json.dumps(spec, sort_keys=True)
    if (path / PRESET_STAMP).is_file() and (path / PRESET_STAMP).read_text() == stamp:
        return path
    storage = np.dtype(spec["storage"])
    nbytes = sum(int(np.prod(s)) for s in weight_shapes(spec["vision"], spec["text"], spec["scale"]).values()) \
        * storage.itemsize
    work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work_dir).free
    if nbytes * 1.05 > free:
        raise Refused(f"preset {name} needs {nbytes / 1e9:.1f} GB of disk under {work_dir}, {free / 1e9:.1f} GB "
                      "free: pass another --work-dir")
    print(f"writing random {name} weights ({nbytes / 1e9:.2f} GB, {storage.name}) to {path} ...", file=sys.stderr)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_random_checkpoint(partial, spec["vision"], spec["text"], spec["scale"], spec["image_token_id"],
                            dtype=storage)
    (partial / PRESET_STAMP).write_text(stamp)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return path


def checkpoint_params(model_dir: Path) -> int:
    from mindone_idefics3.weights import CheckpointReader

    reader = CheckpointReader(model_dir)
    try:
        return sum(info.numel for info in reader.tensors.values())
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    ids: np.ndarray  # (B, S) int64
    mask: np.ndarray  # (B, S) int64, all ones
    pixel_values: Optional[np.ndarray]  # (B, I, 3, T, T) float32
    pixel_mask: Optional[np.ndarray]  # (B, I, T, T) int64

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])


def make_inputs(cfg, batch: int, images: int, valid_px: int, text_tokens: int, seed: int = 0) -> Inputs:
    """Random ids with `images` blocks of image tokens after the first half of the text; random pixels in the
    top-left valid_px × valid_px of each tile (the rest zero and masked out)."""
    rng = np.random.default_rng(seed)
    n_img = images * cfg.image_seq_len
    high = min(cfg.text_config.vocab_size, cfg.image_token_id)
    ids = rng.integers(3, high, size=(batch, n_img + text_tokens))
    ids[:, text_tokens // 2: text_tokens // 2 + n_img] = cfg.image_token_id
    if not images:
        return Inputs(ids, np.ones_like(ids), None, None)
    tile = cfg.vision_config.image_size
    pv = np.zeros((batch, images, 3, tile, tile), np.float32)
    pv[..., :valid_px, :valid_px] = rng.standard_normal((batch, images, 3, valid_px, valid_px))
    pam = np.zeros((batch, images, tile, tile), np.int64)
    pam[..., :valid_px, :valid_px] = 1
    return Inputs(ids, np.ones_like(ids), pv, pam)


# ----------------------------------------------------------------------------------------------- one run
class TokenClock:
    """A streamer for both sides' generate(): when each new token (a (B,) vector) reached the host. transformers
    also puts the prompt, (B, S), first: ignored."""

    def __init__(self):
        self.times: List[float] = []

    def put(self, value) -> None:
        if len(getattr(value, "shape", (0,))) == 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Run:
    ttft: float
    tokens_per_second: float  # per sequence
    new_ids: np.ndarray
    peak_rss_mb: float
    peak_above_baseline_mb: float
    first_step_s: Optional[float] = None
    device_peak_mb: Optional[float] = None


def _timed(generate, new_tokens: int, device: str = "CPU") -> Run:
    clock = TokenClock()
    baseline = rss_mb()
    reset_peak_rss()
    if device == "Ascend":
        import mindspore as ms

        ms.runtime.reset_peak_memory_stats()
    t0 = time.perf_counter()
    new_ids, first_step = generate(clock)
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, got {len(clock.times)}")
    peak = peak_rss_mb()
    run = Run(ttft=clock.times[0] - t0, tokens_per_second=(new_tokens - 2) / (clock.times[-1] - clock.times[1]),
              new_ids=new_ids, peak_rss_mb=peak, peak_above_baseline_mb=peak - baseline, first_step_s=first_step)
    if device == "Ascend":
        import mindspore as ms

        run.device_peak_mb = ms.runtime.max_memory_allocated() / 2**20
    return run


def run_ours(model, inp: Inputs, new_tokens: int, use_jit: bool, device: str) -> Run:
    from mindone_idefics3.generation import GenerationStats

    def generate(clock):
        stats = GenerationStats()
        out = model.generate(inp.ids, inp.mask, inp.pixel_values, inp.pixel_mask, max_new_tokens=new_tokens,
                             do_sample=False, repetition_penalty=1.0, eos_token_id=[], use_jit=use_jit,
                             stats=stats, streamer=clock)
        return out[:, inp.context:], stats.first_step_seconds

    return _timed(generate, new_tokens, device)


def _torch_inputs(inp: Inputs) -> dict:
    import torch

    kwargs = dict(input_ids=torch.tensor(inp.ids), attention_mask=torch.tensor(inp.mask))
    if inp.pixel_values is not None:
        kwargs.update(pixel_values=torch.tensor(inp.pixel_values),
                      pixel_attention_mask=torch.tensor(inp.pixel_mask).bool())
    return kwargs


def run_reference(ref, inp: Inputs, new_tokens: int, pad_id: int) -> Run:
    import torch

    from mindone_idefics3.testing import corrected_position_ids

    def generate(clock):
        with torch.inference_mode(), corrected_position_ids():
            out = ref.generate(**_torch_inputs(inp), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                               repetition_penalty=1.0, eos_token_id=None, pad_token_id=pad_id, streamer=clock)
        return out[:, inp.context:].numpy(), None

    return _timed(generate, new_tokens)


def vision_ms(encode, repeats: int) -> float:
    """Median ms of `encode()` (which must block until its result is on the host), after one warm call."""
    encode()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encode()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ours_vision(model, inp: Inputs, use_jit: bool):
    from mindone_idefics3.model.idefics3 import prepare_vision_inputs

    cfg = model.config.vision_config
    vision = prepare_vision_inputs(inp.pixel_values, inp.pixel_mask, cfg.patch_size, cfg.patches_per_side)
    return lambda: model.model.image_features(vision, model.dtype, use_jit).asnumpy()


def reference_vision(ref, inp: Inputs):
    import torch

    from mindone_idefics3.testing import corrected_position_ids

    tensors = _torch_inputs(inp)
    pv, pam = tensors["pixel_values"], tensors["pixel_attention_mask"]

    def encode():
        with torch.inference_mode(), corrected_position_ids():
            return ref.model.get_image_features(pv, pam).float().numpy()

    return encode


def logits_check(model, ref, inp: Inputs) -> dict:
    """One full forward: are our logits finite, and how far from the reference's (relative L2)? Full sequence when
    it fits in 256 MB of fp32 logits, else the last position."""
    vocab = model.config.text_config.vocab_size
    last_only = inp.ids.size * vocab * 4 > 256 * 2**20
    ours = model(inp.ids, inp.mask, inp.pixel_values, inp.pixel_mask, last_only=last_only).logits.asnumpy()
    out = dict(finite=bool(np.isfinite(ours).all()), logits_checked="last position" if last_only else "all")
    if ref is not None:
        import torch

        from mindone_idefics3.model.idefics3 import position_ids_from_mask
        from mindone_idefics3.testing import corrected_position_ids

        positions = position_ids_from_mask(inp.mask).astype(np.int64)  # ours, passed to the reference explicitly
        with torch.inference_mode(), corrected_position_ids():
            theirs = ref(**_torch_inputs(inp), position_ids=torch.tensor(positions)).logits.float().numpy()
        if last_only:
            theirs = theirs[:, -1:]
        a, b = ours.astype(np.float64), theirs.astype(np.float64)
        out.update(ref_finite=bool(np.isfinite(b).all()),
                   logits_rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return out


def leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading new tokens agree in every row."""
    differ = (a != b).any(axis=0)
    return int(differ.argmax()) if differ.any() else int(a.shape[1])


# ----------------------------------------------------------------------------------------------- model facts
def attention_backend(model) -> str:
    name = type(model.model.text_model.attention).__name__
    return {"EagerAttention": "eager", "AscendAttention": "flash (FA / fused infer)"}.get(name, name)


def decode_bytes(model) -> Dict[str, int]:
    """Bytes one decode step must read: decoder layers, final norm, lm_head (the embedding when tied), and the whole
    static KV cache (eager attention reads every slot). Call while the caches of the run are set up. (Walks the
    cells, not parameter names: the names gain a prefix once a generation step cell wraps the model.)"""
    text = model.model.text_model
    weights = kv = 0
    for p in text.layers.get_parameters():
        if "kv_cache" in p.name:
            kv += p.nbytes
        else:
            weights += p.nbytes
    weights += sum(p.nbytes for p in text.norm.get_parameters())
    weights += (text.embed_tokens if model.tied else model.lm_head).weight.nbytes
    return dict(weights=weights, kv_cache=kv)


def count_decode_kernels(model, batch: int) -> dict:
    """Kernels one compiled (greedy) decode step launches: compile it once more with MindSpore's graph dump on and
    count the kernel actors of the final actor set (one actor per kernel launch)."""
    import mindspore as ms
    from mindspore import Tensor

    from mindone_idefics3.generation import CACHE_BUCKET, decode_step_fn

    text = model.model.text_model
    text.setup_caches(batch, CACHE_BUCKET)  # new caches: the step compiles again, now with the dump on
    with tempfile.TemporaryDirectory() as d:
        ms.set_context(save_graphs=1, save_graphs_path=d)
        try:
            step = decode_step_fn(model, greedy=True, use_jit=True)
            zeros = Tensor(np.zeros((batch, 1), np.int32))
            step(zeros, zeros, Tensor([0], ms.int32), Tensor(np.ones((batch, CACHE_BUCKET), bool))).asnumpy()
        finally:
            ms.set_context(save_graphs=0)
        graphs = [collections.Counter(re.findall(r"^%\d+ = kernel_graph\d+:([A-Za-z0-9]+)-op\d+\(", f.read_text(),
                                                 re.M))
                  for f in Path(d).rglob("final_actor_set_*.ir")]
    text.drop_caches()
    if not graphs:
        return dict(error="MindSpore wrote no actor set (graph dump unavailable)")
    ops = max(graphs, key=lambda c: sum(c.values()))  # the decode graph (the only one compiled with the dump on)
    total = sum(ops.values())
    return dict(kernels=total, shape_only=sum(n for k, n in ops.items() if k in SHAPE_ONLY_KERNELS),
                per_layer=round(total / model.config.text_config.num_hidden_layers, 1), batch=batch,
                by_op=dict(ops.most_common()))


# ----------------------------------------------------------------------------------------------- the loop
def _summary(runs: List[Run], prefix: str = "") -> dict:
    tps = [r.tokens_per_second for r in runs]
    out = {f"{prefix}tokens_per_s": round(statistics.median(tps), 3), f"{prefix}tokens_per_s_min": round(min(tps), 3),
           f"{prefix}tokens_per_s_max": round(max(tps), 3),
           f"{prefix}ttft_s": round(statistics.median(r.ttft for r in runs), 4),
           f"{prefix}peak_rss_mb": round(max(r.peak_rss_mb for r in runs)),
           f"{prefix}peak_above_baseline_mb": round(max(r.peak_above_baseline_mb for r in runs))}
    if runs[0].device_peak_mb is not None:
        out[f"{prefix}peak_device_memory_mb"] = round(max(r.device_peak_mb for r in runs))
    if runs[0].first_step_s is not None:
        out[f"{prefix}first_decode_step_s"] = round(statistics.median(r.first_step_s for r in runs), 4)
    return out


def benchmark_precision(job: dict, emit) -> None:
    """Every row of one precision: runs in a process of its own (see `run_benchmark`)."""
    import gc

    import mindspore as ms

    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import select_device

    args = argparse.Namespace(**job["args"])
    ckpt, dtype_s, device = Path(job["checkpoint"]), job["precision"], job["device"]
    select_device(device)  # on the CPU: ms.device_context.cpu.op_tuning.threads_num($MINDONE_CPU_THREADS)
    ref_cls = None
    base = dict(model=job["name"], precision=dtype_s, device=device)
    if args.reference == "hf":
        import torch
        from transformers import Idefics3ForConditionalGeneration as ref_cls

        torch.set_num_threads(job["threads"])
        base["torch_threads"] = torch.get_num_threads()
    rss0, t = rss_mb(), time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype_s, progress=False)
    base.update(load_s=round(time.perf_counter() - t, 2), load_rss_mb=round(rss_mb() - rss0))
    model.model_dir = None  # no <end_of_utterance> stop id from the tokenizer: exactly --new-tokens on both sides
    ref, pad_id = None, model.config.text_config.pad_token_id or 0
    if ref_cls is not None:
        rss0, t = rss_mb(), time.perf_counter()
        ref = ref_cls.from_pretrained(str(ckpt), attn_implementation="eager",
                                      dtype={"fp32": torch.float32, "fp16": torch.float16,
                                             "bf16": torch.bfloat16}[dtype_s]).eval()
        base.update(ref_load_s=round(time.perf_counter() - t, 2), ref_load_rss_mb=round(rss_mb() - rss0))
    cfg = model.config
    base["attention"] = attention_backend(model)
    for batch in args.batches:
        for text_tokens in args.contexts:
            inp = make_inputs(cfg, batch, args.images_per_prompt, job["image_valid_px"], text_tokens)
            shared = dict(base, batch=batch, context=inp.context, image_tiles=args.images_per_prompt,
                          image_valid_px=job["image_valid_px"], new_tokens=args.new_tokens,
                          **logits_check(model, ref, inp))
            ref_vision = None
            if ref is not None and inp.pixel_values is not None:
                ref_vision = round(vision_ms(reference_vision(ref, inp), args.repeats), 2)
            for jit in args.jits:
                use_jit = jit == "on"
                row = dict(shared, jit=jit, status="ok")
                if inp.pixel_values is not None:
                    row["vision_ms"] = round(vision_ms(ours_vision(model, inp, use_jit), args.repeats), 2)
                    row["ref_vision_ms"] = ref_vision
                ours: List[Run] = []
                theirs: List[Run] = []
                for i in range(args.warmup + args.repeats):  # ours, reference, ours, reference, ...
                    run = run_ours(model, inp, args.new_tokens, use_jit, device)
                    if i >= args.warmup:
                        ours.append(run)
                    if ref is not None:
                        ref_run = run_reference(ref, inp, args.new_tokens, pad_id)
                        if i >= args.warmup:
                            theirs.append(ref_run)
                row.update(_summary(ours))
                row["aggregate_tokens_per_s"] = round(row["tokens_per_s"] * batch, 3)
                step = decode_bytes(model)
                bound = job["bandwidth_gbs"] * 1e9 / (step["weights"] + step["kv_cache"])
                row.update(decode_weight_bytes=step["weights"], decode_kv_cache_bytes=step["kv_cache"],
                           bandwidth_bound_tokens_per_s=round(bound, 2),
                           fraction_of_bound=float(f"{row['tokens_per_s'] / bound:.3g}"))
                if theirs:
                    row.update(_summary(theirs, "ref_"))
                    row.update(decode_speedup=round(row["tokens_per_s"] / row["ref_tokens_per_s"], 3),
                               ttft_speedup=round(row["ref_ttft_s"] / row["ttft_s"], 3),
                               ids_equal=leading_equal(ours[-1].new_ids, theirs[-1].new_ids))
                emit(row)
            # The graphs compiled for this shape stay in memory otherwise (~1 GB per shape for SmolVLM-256M).
            model.model.text_model.drop_caches()
            gc.collect()
            ms.ms_memory_recycle()
    if args.kernel_count == "on" and "on" in args.jits:
        emit(dict(status="kernels", **count_decode_kernels(model, args.batches[0])))


def child_main(job_path: Path) -> int:
    """`throughput.py --child JOB.json`: measure one precision, write its rows to the job's `out` file after each."""
    job = json.loads(job_path.read_text())
    part = dict(rows=[], kernels=None)

    def emit(row: dict) -> None:
        if row["status"] == "kernels":
            part["kernels"] = {k: v for k, v in row.items() if k != "status"}
            print(f"{job['precision']}: {row.get('kernels', row.get('error'))} kernels per compiled decode step",
                  file=sys.stderr, flush=True)
        else:
            part["rows"].append(row)
            print(progress_line(row), file=sys.stderr, flush=True)
        Path(job["out"]).write_text(json.dumps(part))

    benchmark_precision(job, emit)
    return 0


def run_benchmark(args) -> int:
    """Check, prepare the weights, describe the machine; then measure each precision in a fresh process (MindSpore
    keeps every compiled graph: one process for all would grow by GBs), collecting rows into the JSON."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings off (read when it is imported)
    os.environ.setdefault("MS_DEV_DUMP_IR_PASSES", "actor_set")  # the kernel count's graph dump: the actor set only
    if args.preset:
        check_memory(preset_params(args.preset), args.dtypes, f"preset {args.preset}", args.ram_budget_gb)
    if args.threads:
        os.environ["MINDONE_CPU_THREADS"] = str(args.threads)  # select_device passes it to threads_num
    from mindone_idefics3.config import Idefics3Config
    from mindone_idefics3.device import cpu_threads, resolve_dtype, select_device
    from mindone_idefics3.errors import Idefics3Error

    threads = cpu_threads()
    device = select_device(args.device)
    if args.model:
        from mindone_idefics3.hub import resolve_model_dir

        ckpt = Path(resolve_model_dir(args.model))
        check_memory(checkpoint_params(ckpt), args.dtypes, str(ckpt), args.ram_budget_gb)
        name = ckpt.name
    else:
        ckpt, name = ensure_preset(args.preset, Path(args.work_dir)), args.preset
    cfg = Idefics3Config.from_json_file(ckpt / "config.json")
    valid_px = check_inputs(args, cfg)
    thread_note = (f"MindSpore CPU kernels {threads} (ms.device_context.cpu.op_tuning.threads_num)"
                   if device == "CPU" else "MindSpore on Ascend")
    versions = {}
    if args.reference == "hf":
        import importlib.metadata as md

        try:
            versions = dict(torch=md.version("torch"), transformers=md.version("transformers"))
        except md.PackageNotFoundError as e:
            raise Refused(f"--reference hf needs torch and transformers (pip install -e .[test]): {e}") from None
        thread_note += f", torch {threads} (torch.set_num_threads)"
    bandwidth = memory_bandwidth_gbs(threads)
    print(f"threads: {thread_note}; memory bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{name}-{device.lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(machine=dict(machine_description(threads, device), **versions), threads=thread_note,
                  memory_bandwidth_gbs=round(bandwidth, 2), checkpoint=str(ckpt),
                  weights="random (preset)" if args.preset else "checkpoint",
                  reference="transformers (CPU torch, eager attention)" if versions else None,
                  args={k: v for k, v in vars(args).items() if k not in ("dtypes", "jits", "batches", "contexts")},
                  definitions=DEFINITIONS, rows=[], kernels_per_decode_step={})
    for dtype_s in args.dtypes:
        base = dict(model=name, precision=dtype_s, device=device)
        try:
            resolve_dtype(dtype_s, device)
        except Idefics3Error as e:
            result["rows"].append(dict(base, status="unsupported", reason=str(e)))
            print(progress_line(result["rows"][-1]), file=sys.stderr, flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            job_file, rows_file = Path(d) / "job.json", Path(d) / "rows.json"
            job_file.write_text(json.dumps(dict(
                args=vars(args), checkpoint=str(ckpt), name=name, precision=dtype_s, device=device, threads=threads,
                bandwidth_gbs=bandwidth, image_valid_px=valid_px, out=str(rows_file))))
            code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file)])
            part = json.loads(rows_file.read_text()) if rows_file.exists() else {}
        result["rows"] += part.get("rows", [])
        if part.get("kernels"):
            result["kernels_per_decode_step"][dtype_s] = part["kernels"]
        if code:
            why = "killed by the system (out of memory?)" if code == -9 else f"exit code {code}, see stderr"
            result["rows"].append(dict(base, status="failed", reason=f"the measuring process failed: {why}"))
        out.write_text(json.dumps(result, indent=2))  # after every precision: a long run keeps what it measured
    result["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nJSON: {out}")
    png = plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed: pip install -e .[plot])")
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0


def check_inputs(args, cfg) -> int:
    """Refuse an --image-size or a context the model cannot take; returns the valid pixels per tile edge."""
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    valid_px = args.image_size or tile
    if not patch <= valid_px <= tile:
        raise Refused(f"--image-size {valid_px}: must be between the patch size {patch} and the tile size {tile} "
                      "(larger images are split into tiles: use --images-per-prompt)")
    longest = args.images_per_prompt * cfg.image_seq_len + max(args.contexts) + args.new_tokens
    if longest > cfg.text_config.max_position_embeddings:
        raise Refused(f"{args.images_per_prompt} image tile(s) x {cfg.image_seq_len} tokens + {max(args.contexts)} "
                      f"prompt tokens + {args.new_tokens} new tokens = {longest}, beyond the model's "
                      f"{cfg.text_config.max_position_embeddings} positions: lower --prompt-tokens or --new-tokens")
    return valid_px


# ----------------------------------------------------------------------------------------------- output
def progress_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['precision']}: {row['status']} ({row.get('reason', '')})"
    line = (f"{row['precision']} jit={row['jit']} batch={row['batch']} context={row['context']}: "
            f"{row['tokens_per_s']:.1f} tok/s, TTFT {row['ttft_s']:.3f} s")
    if "ref_tokens_per_s" in row:
        line += (f" | transformers {row['ref_tokens_per_s']:.1f} tok/s, TTFT {row['ref_ttft_s']:.3f} s"
                 f" | ids equal {row['ids_equal']}/{row['new_tokens']}")
    return line


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict) -> str:
    m = result["machine"]
    versions = f"MindSpore {m['mindspore']}" + (f", torch {m['torch']}, transformers {m['transformers']}"
                                                if "torch" in m else "")
    head = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gb']} GB RAM; {versions}; "
            f"{m['date']}; load average {m['load_average_1min_at_start']:.2f} at start, "
            f"{m.get('load_average_1min_at_end', float('nan')):.2f} at end.",
            f"Threads: {result['threads']}. Memory bandwidth (numpy read): {result['memory_bandwidth_gbs']} GB/s.",
            f"Weights: {result['weights']}. tokens/s = decode tokens per second per sequence (aggregate = x batch); "
            "x ref = speed-up over transformers (> 1 = ours faster).", ""]
    main = ["| model | precision | device | attention | jit | batch | context | tokens/s | aggregate tokens/s "
            "| TTFT (s) | decode x ref | TTFT x ref |",
            "| :---: | :---: | :---: | :---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    details = ["| precision | jit | batch | context | tokens/s min–max | ref tokens/s | ref TTFT (s) | vision ms "
               "(ours / ref) | load s (ours / ref) | peak RSS MB | finite | logits rel. L2 | ids equal "
               "| kernels/step | BW bound tokens/s | % of bound |",
               "| :---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: "
               "| ---: | ---: | ---: |"]
    kernels = result["kernels_per_decode_step"]
    for r in result["rows"]:
        if r["status"] != "ok":
            what = f"unsupported on {r['device']}" if r["status"] == "unsupported" else "failed (see the JSON)"
            main.append(f"| {r['model']} | {r['precision']} | {r['device']} | — | — | — | — | {what} "
                        "| — | — | — | — |")
            continue
        main.append(f"| {r['model']} | {r['precision']} | {r['device']} | {r['attention']} | {r['jit']} | "
                    f"{r['batch']} | {r['context']} | {_fmt(r['tokens_per_s'])} | "
                    f"{_fmt(r['aggregate_tokens_per_s'])} | {_fmt(r['ttft_s'], 3)} | "
                    f"{_fmt(r.get('decode_speedup'))} | {_fmt(r.get('ttft_speedup'))} |")
        k = kernels.get(r["precision"], {}).get("kernels") if r["jit"] == "on" else None
        ids = f"{r['ids_equal']}/{r['new_tokens']}" if "ids_equal" in r else None
        rel = f"{r['logits_rel_l2']:.1e}" if "logits_rel_l2" in r else None
        memory = f"{r['peak_rss_mb']}" + (f" (device {r['peak_device_memory_mb']})" if "peak_device_memory_mb" in r
                                          else "")
        details.append(
            f"| {r['precision']} | {r['jit']} | {r['batch']} | {r['context']} | "
            f"{_fmt(r['tokens_per_s_min'])}–{_fmt(r['tokens_per_s_max'])} | {_fmt(r.get('ref_tokens_per_s'))} | "
            f"{_fmt(r.get('ref_ttft_s'), 3)} | {_fmt(r.get('vision_ms'), 1)} / {_fmt(r.get('ref_vision_ms'), 1)} | "
            f"{_fmt(r['load_s'])} / {_fmt(r.get('ref_load_s'))} | {memory} | {_fmt(r['finite'])} | "
            f"{_fmt(rel)} | {_fmt(ids)} | {_fmt(k)} | {_fmt(r['bandwidth_bound_tokens_per_s'], 1)} | "
            f"{100 * r['fraction_of_bound']:.2g}% |")
    return "\n".join(head + main + ["", "Details:", ""] + details)


def plot(result: dict, path: Path) -> Optional[Path]:
    """Decode tokens/s vs batch size (aggregate, at the smallest context) and vs context (per sequence, at the
    smallest batch); ours per precision × jit, transformers per precision. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:green"}
    panels = (("batch", "context", "aggregate_tokens_per_s", "batch size", "decode tokens/s (aggregate)"),
              ("context", "batch", "tokens_per_s", "context (prompt tokens)", "decode tokens/s per sequence"))
    for ax, (x, held, y, xlabel, ylabel) in zip(axes, panels):
        value = min(r[held] for r in ok)
        rows = [r for r in ok if r[held] == value]
        for precision, jit in sorted({(r["precision"], r["jit"]) for r in rows}):
            pts = sorted((r[x], r[y]) for r in rows if (r["precision"], r["jit"]) == (precision, jit))
            ax.plot(*zip(*pts), marker="o", color=colors[precision], linestyle="-" if jit == "on" else ":",
                    label=f"mindone_idefics3 {precision} jit={jit}")
        for precision in sorted({r["precision"] for r in rows if "ref_tokens_per_s" in r}):
            ref_y = {}
            for r in rows:  # one point per x: the reference measured alongside the first jit mode
                if r["precision"] == precision and "ref_tokens_per_s" in r:
                    ref_y.setdefault(r[x], r["ref_tokens_per_s"] * (r["batch"] if y.startswith("aggregate") else 1))
            ax.plot(*zip(*sorted(ref_y.items())), marker="x", linestyle="--", color=colors[precision],
                    label=f"transformers {precision}")
        ax.set_title(f"{held} = {value}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({r[x] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{ok[0]['model']} on {m['device']} ({m['cpu']}, {m['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mindone_idefics3.errors import Idefics3Error

    try:
        if argv[:1] == ["--child"]:  # internal: one precision's measuring process
            return child_main(Path(argv[1]))
        return run_benchmark(parse_args(argv))
    except (Refused, Idefics3Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
