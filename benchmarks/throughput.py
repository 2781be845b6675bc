"""Prefill and decode throughput of mindone_idefics3, side by side with transformers on the same weights.

    python benchmarks/throughput.py --preset tiny --dtype fp32,fp16,bf16 --reference hf
    python benchmarks/throughput.py --preset smolvlm-256m --reference hf --new-tokens 64

Prints a markdown table in the format of the MindONE gallery (model, precision, device, attention, jit, tokens/s,
time to first token, ratio vs the reference), writes a JSON file (machine description included) and, when
matplotlib is installed, a PNG plot of decode tokens/s against batch size and against context length.

Definitions. decode tokens/s = generated tokens per second per sequence, after the first (compiling) step, median
of --repeats runs after --warmup (min/max in the JSON); aggregate tokens/s = that × batch. TTFT = vision + prefill
+ first token, warm (compiled graphs cached). vision ms = the vision tower + connector alone. The reference runs
in this process with the same threads, interleaved with ours (ours, reference, ours, ...), greedy, exactly
--new-tokens tokens; its vision position ids are corrected as in tests/reference.py so greedy ids can be compared.
peak_rss_mb = this process's peak so far (ours and the reference share it; run without --reference for ours
alone). Memory-bandwidth bound: decoder + lm_head weight bytes read per token ÷ a numpy streaming-read bandwidth measured
in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the reference's position-id correction lives with the tests

PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                    patch_size=8, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=500000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0),
        scale=2, image_token_id=500),
    "smolvlm-256m": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=512, patch_size=16, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                  rope_theta=100000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2),
        scale=4, image_token_id=49190),
    "idefics3-8b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=364, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh"),
        text=dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", bos_token_id=128000,
                  eos_token_id=128001, pad_token_id=128002,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
        scale=2, image_token_id=128257),
}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint directory (Hugging Face layout)")
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                     help="random weights of these shapes, written once under --work-dir (default tiny)")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32,fp16,bf16 (default fp32)")
    p.add_argument("--batch-sizes", default="1", help="comma list (default 1)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="image tiles per prompt (default 1)")
    p.add_argument("--image-size", type=int, default=None, help="tile edge in pixels (default: the vision size)")
    p.add_argument("--prompt-tokens", default="32", help="comma list of text tokens besides the image tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--jit", default="on", help="comma list of on,off (off = PyNative decode; default on)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="runs before measuring (compiles graphs; default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all cores)")
    p.add_argument("--reference", choices=["none", "hf"], default="none",
                   help="hf: run transformers on the same weights and inputs, interleaved, and print ratios")
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None)
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"), help="where preset weights go")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<model>-<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the JSON; needs matplotlib)")
    return p.parse_args(argv)


def machine(threads: int) -> dict:
    import mindspore

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    info = dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), ram_gb=round(mem / 2**20, 1), threads=threads,
                python=platform.python_version(), mindspore=mindspore.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def memory_bandwidth_gbs() -> float:
    """Best of 5 streaming reads of a 512 MB array (numpy sum), GB/s."""
    a = np.ones(64 * 2**20, np.float64)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ensure_checkpoint(args) -> Path:
    if args.model:
        return Path(args.model)
    from mindone_idefics3.demo import write_random_checkpoint

    spec = PRESETS[args.preset]
    path = Path(args.work_dir) / args.preset
    if not (path / "model.safetensors").exists():
        need = 4 * _param_count(spec) * 2.5
        avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        if need > avail:
            sys.exit(f"error: preset {args.preset} needs about {need / 1e9:.0f} GB of RAM to write and load in fp32 "
                     f"(random weights, ours + reference); this machine has {avail / 1e9:.0f} GB available")
        print(f"writing random {args.preset} weights to {path} ...", file=sys.stderr)
        write_random_checkpoint(path, spec["vision"], spec["text"], spec["scale"], spec["image_token_id"])
    return path


def _param_count(spec) -> int:
    v, t = spec["vision"], spec["text"]
    head = t["hidden_size"] // t["num_attention_heads"]
    layer = (t["hidden_size"] * (t["hidden_size"] + 2 * t["num_key_value_heads"] * head) + t["hidden_size"] ** 2
             + 3 * t["hidden_size"] * t["intermediate_size"])
    vis = v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"])
    return t["num_hidden_layers"] * layer + 2 * t["vocab_size"] * t["hidden_size"] + vis


def decode_weight_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes of weights one decode step reads: every decoder layer, the final norm, the lm_head (+ one embedding row)."""
    t = cfg.text_config
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size \
        + 2 * t.hidden_size
    return dtype_bytes * (t.num_hidden_layers * layer + t.vocab_size * t.hidden_size + 2 * t.hidden_size)


def make_inputs(cfg, batch: int, images: int, size: int, text_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = cfg.text_config.vocab_size
    n_img = images * cfg.image_seq_len
    ids = rng.integers(3, min(vocab, cfg.image_token_id) - 1, size=(batch, n_img + text_tokens))
    ids[:, text_tokens // 2: text_tokens // 2 + n_img] = cfg.image_token_id
    mask = np.ones_like(ids)
    pv = rng.standard_normal((batch, images, 3, size, size)).astype(np.float32) if images else None
    return ids, mask, pv


def run_ours(model, ids, mask, pv, new_tokens, use_jit):
    from mindone_idefics3.generation import GenerationStats

    stats = GenerationStats()
    out = model.generate(ids, mask, pv, None, max_new_tokens=new_tokens, eos_token_id=[], use_jit=use_jit,
                         stats=stats)
    return out, stats.time_to_first_token, stats.decode_tokens_per_second


def run_reference(ref, ids, mask, pv, new_tokens):
    import torch

    from reference import corrected_position_ids

    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                  pad_token_id=0)
    if pv is not None:
        kwargs["pixel_values"] = torch.tensor(pv, dtype=ref.dtype)
    with torch.no_grad(), corrected_position_ids():
        t = time.perf_counter()
        ref.generate(**kwargs, max_new_tokens=1, min_new_tokens=1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = ref.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        total = time.perf_counter() - t
    return out.numpy(), ttft, (new_tokens - 1) / max(total - ttft, 1e-9)


def time_vision(model, pv, use_jit, repeats):
    from mindone_idefics3.model.idefics3 import prepare_vision_inputs

    cfg = model.config.vision_config
    vision = prepare_vision_inputs(pv, None, cfg.patch_size, cfg.patches_per_side)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        model.model.image_features(vision, model.dtype, use_jit).asnumpy()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def main(argv=None):
    args = parse_args(argv)
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import cpu_threads, dtype_name, resolve_dtype, select_device
    from mindone_idefics3.errors import Idefics3Error

    if args.threads:
        os.environ["MINDONE_CPU_THREADS"] = str(args.threads)
    device = select_device(args.device)
    threads = args.threads or cpu_threads()
    ckpt = ensure_checkpoint(args)
    name = args.model and Path(args.model).name or args.preset
    ref_cls = None
    if args.reference == "hf":
        import torch
        from transformers import Idefics3ForConditionalGeneration as ref_cls

        torch.set_num_threads(threads)
    bandwidth = memory_bandwidth_gbs()
    rows = []
    for dtype_s in args.dtype.split(","):
        try:
            dtype = resolve_dtype(dtype_s, device)
        except Idefics3Error as e:
            rows.append(dict(model=name, precision=dtype_s, device=device, status="unsupported", reason=str(e)))
            continue
        t = time.perf_counter()
        model = Idefics3ForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, progress=False)
        load_s = time.perf_counter() - t
        ref = None
        if ref_cls is not None:
            import torch

            tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name(dtype)]
            ref = ref_cls.from_pretrained(str(ckpt), attn_implementation="eager", dtype=tdtype).eval()
        cfg = model.config
        size = args.image_size or cfg.vision_config.image_size
        for jit in args.jit.split(","):
            use_jit = jit == "on"
            for batch in map(int, args.batch_sizes.split(",")):
                for text_tokens in map(int, args.prompt_tokens.split(",")):
                    ids, mask, pv = make_inputs(cfg, batch, args.images_per_prompt, size, text_tokens)
                    logits = model(ids, mask, pv, last_only=True).logits.asnumpy()
                    row = dict(model=name, precision=dtype_name(dtype), device=device,
                               attention=type(model.model.text_model.attention).__name__, jit=jit, batch=batch,
                               prompt_tokens=int(ids.shape[1]), new_tokens=args.new_tokens, load_s=round(load_s, 2),
                               finite=bool(np.isfinite(logits).all()), status="ok")
                    if pv is not None:
                        row["vision_ms"] = round(time_vision(model, pv, use_jit, max(1, args.repeats - 1)), 1)
                    ours, theirs = [], []
                    for i in range(args.warmup + args.repeats):
                        out, ttft, tps = run_ours(model, ids, mask, pv, args.new_tokens, use_jit)
                        if i >= args.warmup:
                            ours.append((ttft, tps))
                        if ref is not None:
                            ref_out, rttft, rtps = run_reference(ref, ids, mask, pv, args.new_tokens)
                            if i >= args.warmup:
                                theirs.append((rttft, rtps))
                    tps = [o[1] for o in ours]
                    row.update(ttft_s=round(statistics.median(o[0] for o in ours), 4),
                               decode_tps=round(statistics.median(tps), 2), decode_tps_min=round(min(tps), 2),
                               decode_tps_max=round(max(tps), 2),
                               aggregate_tps=round(statistics.median(tps) * batch, 2),
                               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
                    if device == "Ascend":
                        import mindspore as ms

                        row["peak_device_memory_mb"] = round(ms.runtime.max_memory_allocated() / 2**20)
                    bound = bandwidth * 1e9 / decode_weight_bytes(cfg, BYTES[row["precision"]])
                    row.update(bandwidth_bound_tps=round(bound, 1),
                               of_bound=round(row["decode_tps"] / bound, 3))
                    if theirs:
                        rt = [o[1] for o in theirs]
                        row.update(ref_ttft_s=round(statistics.median(o[0] for o in theirs), 4),
                                   ref_decode_tps=round(statistics.median(rt), 2),
                                   decode_ratio=round(statistics.median(tps) / statistics.median(rt), 2),
                                   ttft_ratio=round(row["ttft_s"] and statistics.median(o[0] for o in theirs)
                                                    / row["ttft_s"], 2),
                                   greedy_ids_equal=bool(np.array_equal(out, ref_out)))
                    rows.append(row)
                    print(_row_line(row), file=sys.stderr, flush=True)
        del model, ref
    result = dict(machine=machine(threads), memory_bandwidth_gbs=round(bandwidth, 2), args=vars(args), rows=rows)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{name}-{device.lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"\nJSON: {out}")
    png = plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
    return 0


def _row_line(row) -> str:
    return (f"{row['precision']} jit={row['jit']} batch={row['batch']} prompt={row['prompt_tokens']}: "
            f"{row['decode_tps']} tok/s, TTFT {row['ttft_s']} s" +
            (f", ref {row['ref_decode_tps']} tok/s / {row['ref_ttft_s']} s" if "ref_decode_tps" in row else ""))


def markdown_table(result) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB, {m['threads']} threads; MindSpore "
             f"{m['mindspore']}" + (f", torch {m['torch']}, transformers {m['transformers']}" if "torch" in m else "")
             + f"; memory bandwidth {result['memory_bandwidth_gbs']} GB/s", "",
             "| model | precision | device | attention | jit | batch | prompt | tokens/s | TTFT (s) | vision (ms) "
             "| ref tokens/s | ref TTFT (s) | decode ratio | TTFT ratio | % of bandwidth bound | ids equal |",
             "| :---: | :---: | :---: | :---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | :---: |"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['precision']} | {r['device']} | — | — | — | — | unsupported on "
                         f"{r['device']} | — | — | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['device']} | {r['attention']} | {r['jit']} | {r['batch']} | "
            f"{r['prompt_tokens']} | {r['decode_tps']} | {r['ttft_s']} | {r.get('vision_ms', '—')} | "
            f"{r.get('ref_decode_tps', '—')} | {r.get('ref_ttft_s', '—')} | {r.get('decode_ratio', '—')} | "
            f"{r.get('ttft_ratio', '—')} | {round(100 * r['of_bound'])}% | {r.get('greedy_ids_equal', '—')} |")
    return "\n".join(lines)


def plot(result, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # each panel varies one axis and holds the other at its smallest value
    fixed = {"batch": ("prompt_tokens", min((r["prompt_tokens"] for r in ok), default=0)),
             "prompt_tokens": ("batch", min((r["batch"] for r in ok), default=0))}
    for key, ax, label in (("batch", axes[0], "batch size"), ("prompt_tokens", axes[1], "context (prompt tokens)")):
        other, value = fixed[key]
        ok_panel = [r for r in ok if r[other] == value]
        ax.set_title(f"{other} = {value}", fontsize=9)
        for series in sorted({(r["precision"], r["jit"]) for r in ok_panel}):
            pts = sorted((r[key], r["decode_tps"]) for r in ok_panel if (r["precision"], r["jit"]) == series)
            ax.plot(*zip(*pts), marker="o", label=f"ours {series[0]} jit={series[1]}")
            ref = sorted((r[key], r["ref_decode_tps"]) for r in ok_panel
                         if (r["precision"], r["jit"]) == series and "ref_decode_tps" in r)
            if ref:
                ax.plot(*zip(*ref), marker="x", linestyle="--", label=f"transformers {series[0]}")
        ax.set_xlabel(label)
        ax.set_ylabel("decode tokens/s per sequence")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


if __name__ == "__main__":
    os.environ.setdefault("GLOG_v", "3")
    sys.exit(main())
