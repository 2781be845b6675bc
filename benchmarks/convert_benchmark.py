"""Converter throughput and peak memory on a synthetic Idefics3-8B-shaped checkpoint (≥ 4 GB).

The checkpoint has Idefics3-8B-Llama3's real tensor names and shapes — taken from transformers' own model built on
the meta device — with the decoder cut to --text-layers layers (4 → 4.7 GB), random bf16 weights like the real
one, in several shards. Each conversion runs `python -m mindone_idefics3.convert` in a subprocess; its peak RSS is
that child's ru_maxrss (os.wait4 in a lean launcher), its time the converter's own summary line (without
interpreter start-up; wall time is reported too). The source's pages are evicted from the page cache before every
run (posix_fadvise), so reads come from disk. The synthetic data is deleted at the end.

    python benchmarks/convert_benchmark.py [--workdir /tmp] [--text-layers 4] [--output-dir /dev/shm]

Needs the `test` extra (torch + transformers, for the names and shapes). Writes benchmarks/results/convert.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import ROOT
from bench.machine import cpu_model, meminfo_bytes
from bench.processes import evict, run_measured
from mindone_idefics3.process import usable_cores

RSS_LIMIT = 1.5e9

# HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-so400m vision tower (364 px, patch 14, scale 2 → 169 tokens per tile)
# and a Llama 3.1 8B decoder with the Idefics3 vocabulary.
IDEFICS3_8B = dict(
    model_type="idefics3", scale_factor=2, image_token_id=128257, pad_token_id=128002,
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=364, patch_size=14),
    text_config=dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=128002, bos_token_id=128000, eos_token_id=128001),
)


def hf_tensor_shapes(config: dict) -> dict:
    """transformers' state-dict names and shapes for `config`, without allocating weights."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(Idefics3Config(**config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def synthesise(path: Path, config: dict, shapes: dict, shard_bytes: int, seed: int = 0) -> int:
    """Write an HF-layout bf16 checkpoint (config.json, shards, index); returns the tensor bytes."""
    from mindone_idefics3.convert import OutputTensor, assign_shards, safetensors_header

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tensors = [OutputTensor(n, (n,), s, int(np.prod(s)) * 2) for n, s in shapes.items()]
    shards = assign_shards(tensors, shard_bytes)
    # A pool of N(0, 0.02) values rounded to bf16; tensors take windows of it at random offsets.
    rng = np.random.default_rng(seed)
    pool32 = (rng.standard_normal(32 * 2**20, dtype=np.float32) * 0.02).view(np.uint32)
    pool = ((pool32 + 0x7FFF + ((pool32 >> 16) & 1)) >> 16).astype(np.uint16)
    pool = np.concatenate([pool, pool])  # windows up to len/2 never wrap
    window = len(pool) // 2
    for shard in shards:
        with open(path / shard.file, "wb") as f:
            f.write(safetensors_header(shard.tensors, "bf16", {"format": "pt"}))
            for t in shard.tensors:
                left = t.nbytes // 2
                while left:
                    n = min(left, window)
                    start = int(rng.integers(0, window))
                    f.write(pool[start:start + n].tobytes())
                    left -= n
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.name: s.file for s in shards for t in s.tensors}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(t.nbytes for t in tensors)


def run_conversion(src: Path, dst: Path, dtype: str, verify: bool) -> dict:
    cmd = [sys.executable, "-m", "mindone_idefics3.convert", str(src), str(dst), "--dtype", dtype, "--no-progress",
           "--verify" if verify else "--no-verify"]
    proc = run_measured(cmd, cwd=ROOT)
    if proc.rc != 0:
        raise SystemExit(f"conversion failed ({proc.rc}):\n{proc.stderr}")
    summary = proc.stdout.strip().splitlines()[-1]
    seconds = float(re.search(r", ([\d.]+) s \(", summary).group(1))
    manifest = json.loads((dst / "conversion_manifest.json").read_text())
    return dict(dtype=dtype, verify=verify, tensors=manifest["tensors"], shards=len(manifest["weight_files"]),
                bytes_in=manifest["bytes_in"], bytes_out=manifest["bytes_out"], seconds=seconds,
                gb_per_s=manifest["bytes_in"] / seconds / 1e9, wall_seconds=proc.wall_s,
                peak_rss_bytes=proc.peak_rss_bytes, summary=summary)


def machine() -> dict:
    import mindspore

    return dict(cpu=cpu_model(), cores=usable_cores(), ram_gb=round(meminfo_bytes("MemTotal") / 1e9, 1),
                python=platform.python_version(), numpy=np.__version__, mindspore=mindspore.__version__,
                platform=platform.platform())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the synthetic checkpoint goes")
    ap.add_argument("--text-layers", type=int, default=4, help="decoder layers kept (32 in the real model)")
    ap.add_argument("--source-shard-size", default="1.2GB")
    ap.add_argument("--output-dir", help="where converted copies go (default: next to the source; /dev/shm "
                                         "takes the disk out of the measurement)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
    args = ap.parse_args()

    from mindone_idefics3.convert import parse_size

    config = json.loads(json.dumps(IDEFICS3_8B))
    config["text_config"]["num_hidden_layers"] = args.text_layers
    shapes = hf_tensor_shapes(config)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    free = shutil.disk_usage(args.workdir).free
    print(f"{args.workdir}: {free / 1e9:.1f} GB free; the benchmark needs {2.2 * total / 1e9:.1f} GB")
    if free < 2.2 * total:  # the source and one converted copy at a time
        raise SystemExit(f"not enough free space in {args.workdir}")
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        src = work / "hf"
        t0 = time.perf_counter()
        synthesise(src, config, shapes, parse_size(args.source_shard_size))
        n_shards = len(list(src.glob("model-*.safetensors")))
        print(f"synthesised {total / 1e9:.2f} GB bf16 in {n_shards} shards ({time.perf_counter() - t0:.0f} s)")
        runs = []
        for dtype, verify in (("bf16", True), ("fp16", True), ("bf16", False), ("fp16", False)):
            dst = Path(args.output_dir or work) / f"convert-bench-{os.getpid()}-{dtype}"
            evict(src)
            run = run_conversion(src, dst, dtype, verify)
            runs.append(run)
            print(run["summary"])
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for dtype in ("bf16", "fp16"):
            shutil.rmtree(Path(args.output_dir or work) / f"convert-bench-{os.getpid()}-{dtype}", ignore_errors=True)

    print(f"\n{'dtype':<6}{'verify':<8}{'in GB':>7}{'out GB':>8}{'time s':>8}{'GB/s':>7}{'peak RSS GB':>13}")
    for r in runs:
        print(f"{r['dtype']:<6}{'yes' if r['verify'] else 'no':<8}{r['bytes_in'] / 1e9:>7.2f}"
              f"{r['bytes_out'] / 1e9:>8.2f}{r['seconds']:>8.1f}{r['gb_per_s']:>7.2f}"
              f"{r['peak_rss_bytes'] / 1e9:>13.3f}")
    worst = max(r["peak_rss_bytes"] for r in runs)
    print(f"peak RSS {worst / 1e9:.3f} GB ({'under' if worst < RSS_LIMIT else 'OVER'} the 1.5 GB budget)")
    result = dict(machine=machine(), checkpoint=dict(
        layout="Idefics3-8B-Llama3 names/shapes (transformers, meta device)", text_layers=args.text_layers,
        vision_layers=config["vision_config"]["num_hidden_layers"], dtype="bf16", bytes=total, shards=n_shards),
        cache="source evicted from the page cache before each run (posix_fadvise DONTNEED)",
        output_dir=args.output_dir or args.workdir, runs=runs,
        peak_rss_budget_bytes=RSS_LIMIT, within_budget=worst < RSS_LIMIT)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if worst >= RSS_LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()
