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
import os
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from bench import RESULTS, Refused
from bench.args import add_checkpoint_args, add_threads_arg, checked, choices, positive_ints, use_threads
from bench.kernels import attention_backend, count_decode_kernels, decode_bytes
from bench.machine import describe, finish, headline, memory_bandwidth_gbs
from bench.presets import resolve_checkpoint
from bench.processes import run_child, save_results, script_main
from bench.report import fmt, pyplot, table, write_json
from bench.runs import Run, leading_equal, load_models, measure, ours_generate, reference_generate, summary

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
tests/reference.py so the ids can be compared. 'x ref' columns are speed-ups, > 1 = ours faster:
our tokens/s / theirs, their TTFT / ours. 'ids equal' = new tokens equal to the reference's (leading, every row);
'logits rel. L2' compares one full forward. Inputs: random token ids with --images-per-prompt blocks of image
tokens, random pixels, every row the same length (no padding)."""

DTYPES = ("fp32", "fp16", "bf16")


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=DEFINITIONS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
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
    add_threads_arg(p)
    p.add_argument("--reference", choices=["none", "hf"], default="none",
                   help="hf: run transformers on the same weights and inputs, interleaved, and print ratios "
                        "(needs the test extra: torch, transformers)")
    p.add_argument("--kernel-count", choices=["on", "off"], default="on",
                   help="count the kernels of one compiled decode step (default: on; needs a jit=on row)")
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None, help="default: Ascend when usable, else CPU")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/<preset or model>-<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png; needs matplotlib)")
    args = checked(p, p.parse_args(argv))
    try:
        args.dtypes = choices(args.dtype, DTYPES, "--dtype")
        args.jits = choices(args.jit, ("on", "off"), "--jit")
        args.batches = positive_ints(args.batch_sizes, "--batch-sizes")
        args.contexts = positive_ints(args.prompt_tokens, "--prompt-tokens")
    except ValueError as e:
        p.error(str(e))
    if args.new_tokens < 3:
        p.error("--new-tokens must be at least 3 (the first comes from the prefill, the first decode step is not "
                "timed, tokens/s needs one more)")
    if args.warmup < 0 or args.images_per_prompt < 0:
        p.error("--warmup and --images-per-prompt must be >= 0")
    return args


# ----------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, batch: int, images: int, valid_px: int, text_tokens: int, seed: int = 0) -> dict:
    """Random ids (any but the image token's) with `images` blocks of image tokens after the first half of the
    text; random pixels in the top-left valid_px × valid_px of each tile (the rest zero and masked out)."""
    rng = np.random.default_rng(seed)
    n_img = images * cfg.image_seq_len
    ids = rng.integers(0, cfg.text_config.vocab_size - 1, size=(batch, n_img + text_tokens))
    ids[ids >= cfg.image_token_id] += 1
    ids[:, text_tokens // 2: text_tokens // 2 + n_img] = cfg.image_token_id
    inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    if images:
        tile = cfg.vision_config.image_size
        pv = np.zeros((batch, images, 3, tile, tile), np.float32)
        pv[..., :valid_px, :valid_px] = rng.standard_normal((batch, images, 3, valid_px, valid_px))
        pam = np.zeros((batch, images, tile, tile), np.int64)
        pam[..., :valid_px, :valid_px] = 1
        inputs.update(pixel_values=pv, pixel_attention_mask=pam)
    return inputs


def torch_inputs(inputs: dict) -> dict:
    import torch

    out = {k: torch.tensor(v) for k, v in inputs.items()}
    if "pixel_attention_mask" in out:
        out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()
    return out


# ----------------------------------------------------------------------------------------------- vision, logits
def vision_ms(encode, repeats: int) -> float:
    """Median ms of `encode()` (which must block until its result is on the host), after one warm call."""
    encode()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encode()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ours_vision(model, inputs: dict, use_jit: bool):
    from mindone_idefics3.model.idefics3 import prepare_vision_inputs

    cfg = model.config.vision_config
    vision = prepare_vision_inputs(inputs["pixel_values"], inputs["pixel_attention_mask"], cfg.patch_size,
                                   cfg.patches_per_side)
    return lambda: model.model.image_features(vision, model.dtype, use_jit).asnumpy()


def reference_vision(ref, inputs: dict):
    import torch

    from tests.reference import corrected_position_ids

    tensors = torch_inputs(inputs)
    pv, pam = tensors["pixel_values"], tensors["pixel_attention_mask"]

    def encode():
        with torch.inference_mode(), corrected_position_ids():
            return ref.model.get_image_features(pv, pam).float().numpy()

    return encode


def logits_check(model, ref, inputs: dict) -> dict:
    """One full forward: are our logits finite, and how far from the reference's (relative L2)? Full sequence when
    it fits in 256 MB of fp32 logits, else the last position."""
    vocab = model.config.text_config.vocab_size
    last_only = inputs["input_ids"].size * vocab * 4 > 256 * 2**20
    ours = model(**inputs, last_only=last_only).logits.asnumpy()
    out = dict(finite=bool(np.isfinite(ours).all()), logits_checked="last position" if last_only else "all")
    if ref is not None:
        import torch

        from mindone_idefics3.ops.rope import position_ids_from_mask
        from tests.reference import corrected_position_ids

        positions = position_ids_from_mask(inputs["attention_mask"]).astype(np.int64)  # ours, given explicitly
        with torch.inference_mode(), corrected_position_ids():
            theirs = ref(**torch_inputs(inputs), position_ids=torch.tensor(positions)).logits.float().numpy()
        if last_only:
            theirs = theirs[:, -1:]
        a, b = ours.astype(np.float64), theirs.astype(np.float64)
        out.update(ref_finite=bool(np.isfinite(b).all()),
                   logits_rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return out


# ----------------------------------------------------------------------------------------------- the loop
def benchmark_precision(job: dict, emit) -> None:
    """Every row of one precision: runs in a process of its own (see `run_benchmark`)."""
    import gc

    import mindspore as ms

    args = argparse.Namespace(**job["args"])
    dtype_s, device, new_tokens = job["precision"], job["device"], args.new_tokens
    model, ref, facts = load_models(job["checkpoint"], dtype_s, device, job["threads"], args.reference == "hf",
                                    attn_implementation="eager")
    base = dict(model=job["name"], precision=dtype_s, device=device, attention=attention_backend(model), **facts)
    cfg, pad_id = model.config, model.config.text_config.pad_token_id or 0
    for batch in args.batches:
        for text_tokens in args.contexts:
            inputs = make_inputs(cfg, batch, args.images_per_prompt, job["image_valid_px"], text_tokens)
            images = "pixel_values" in inputs
            shared = dict(base, batch=batch, context=inputs["input_ids"].shape[1], image_tiles=args.images_per_prompt,
                          image_valid_px=job["image_valid_px"], new_tokens=new_tokens,
                          **logits_check(model, ref, inputs))
            ref_vision = None
            if ref is not None and images:
                ref_vision = round(vision_ms(reference_vision(ref, inputs), args.repeats), 2)
            theirs_in = torch_inputs(inputs) if ref is not None else None
            for jit in args.jits:
                use_jit = jit == "on"
                row = dict(shared, jit=jit, status="ok")
                if images:
                    row["vision_ms"] = round(vision_ms(ours_vision(model, inputs, use_jit), args.repeats), 2)
                    row["ref_vision_ms"] = ref_vision
                ours: List[Run] = []
                theirs: List[Run] = []
                for i in range(args.warmup + args.repeats):  # ours, reference, ours, reference, ...
                    run = measure(lambda clock: ours_generate(model, inputs, new_tokens, clock, use_jit), new_tokens,
                                  device)
                    if i >= args.warmup:
                        ours.append(run)
                    if ref is not None:
                        ref_run = measure(lambda clock: reference_generate(ref, theirs_in, new_tokens, pad_id, clock),
                                          new_tokens)
                        if i >= args.warmup:
                            theirs.append(ref_run)
                row.update(summary(ours))
                row["aggregate_tokens_per_s"] = round(row["tokens_per_s"] * batch, 3)
                step = decode_bytes(model)
                bound = job["bandwidth_gbs"] * 1e9 / (step["weights"] + step["kv_cache"])
                row.update(decode_weight_bytes=step["weights"], decode_kv_cache_bytes=step["kv_cache"],
                           bandwidth_bound_tokens_per_s=round(bound, 2),
                           fraction_of_bound=float(f"{row['tokens_per_s'] / bound:.3g}"))
                if theirs:
                    row.update(summary(theirs, "ref_"))
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


def child_main(job: dict) -> int:
    """`throughput.py --child JOB.json`: measure one precision, save its rows after each."""
    part = dict(rows=[], kernels=None)

    def emit(row: dict) -> None:
        if row["status"] == "kernels":
            part["kernels"] = {k: v for k, v in row.items() if k != "status"}
            print(f"{job['precision']}: {row.get('kernels', row.get('error'))} kernels per compiled decode step",
                  file=sys.stderr, flush=True)
        else:
            part["rows"].append(row)
            print(progress_line(row), file=sys.stderr, flush=True)
        save_results(job, part)

    benchmark_precision(job, emit)
    return 0


def run_benchmark(args) -> int:
    """Check, prepare the weights, describe the machine; then measure each precision in a fresh process (MindSpore
    keeps every compiled graph: one process for all would grow by GBs), collecting rows into the JSON."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings off (read when it is imported)
    os.environ.setdefault("MS_DEV_DUMP_IR_PASSES", "actor_set")  # the kernel count's graph dump: the actor set only
    threads = use_threads(args.threads)
    ckpt, name = resolve_checkpoint(args, args.dtypes)
    from mindone_idefics3.config import Idefics3Config
    from mindone_idefics3.device import resolve_dtype, select_device
    from mindone_idefics3.errors import Idefics3Error

    device = select_device(args.device)
    valid_px = check_inputs(args, Idefics3Config.from_json_file(ckpt / "config.json"))
    thread_note = (f"MindSpore CPU kernels {threads} (ms.device_context.cpu.op_tuning.threads_num)"
                   if device == "CPU" else "MindSpore on Ascend")
    machine = describe(threads, device, reference=args.reference == "hf")
    if args.reference == "hf":
        if machine["torch"] is None or machine["transformers"] is None:
            raise Refused("--reference hf needs torch and transformers (pip install -e .[test])")
        thread_note += f", torch {threads} (torch.set_num_threads)"
    bandwidth = memory_bandwidth_gbs(threads)
    print(f"threads: {thread_note}; memory bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    out = Path(args.out or RESULTS / f"{name}-{device.lower()}.json")
    result = dict(machine=machine, threads=thread_note, memory_bandwidth_gbs=round(bandwidth, 2),
                  checkpoint=str(ckpt), weights="random (preset)" if args.preset else "checkpoint",
                  reference="transformers (CPU torch, eager attention)" if args.reference == "hf" else None,
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
        part, failure = run_child(Path(__file__).resolve(), dict(
            args=vars(args), checkpoint=str(ckpt), name=name, precision=dtype_s, device=device, threads=threads,
            bandwidth_gbs=bandwidth, image_valid_px=valid_px))
        result["rows"] += part.get("rows", [])
        if part.get("kernels"):
            result["kernels_per_decode_step"][dtype_s] = part["kernels"]
        if failure:
            result["rows"].append(dict(base, status="failed", reason=failure))
        write_json(out, result)  # after every precision: a long run keeps what it measured
    finish(machine)
    write_json(out, result)
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


MAIN_COLUMNS = [("model", "c"), ("precision", "c"), ("device", "c"), ("attention", "c"), ("jit", "c"),
                ("batch", "r"), ("context", "r"), ("tokens/s", "r"), ("aggregate tokens/s", "r"), ("TTFT (s)", "r"),
                ("decode x ref", "r"), ("TTFT x ref", "r")]
DETAIL_COLUMNS = [("precision", "c"), ("jit", "c"), ("batch", "r"), ("context", "r"), ("tokens/s min–max", "r"),
                  ("ref tokens/s", "r"), ("ref TTFT (s)", "r"), ("vision ms (ours / ref)", "r"),
                  ("load s (ours / ref)", "r"), ("peak RSS MB", "r"), ("finite", "c"), ("logits rel. L2", "r"),
                  ("ids equal", "r"), ("kernels/step", "r"), ("BW bound tokens/s", "r"), ("% of bound", "r")]


def markdown(result: dict) -> str:
    head = [headline(result["machine"]),
            f"Threads: {result['threads']}. Memory bandwidth (numpy read): {result['memory_bandwidth_gbs']} GB/s.",
            f"Weights: {result['weights']}. tokens/s = decode tokens per second per sequence (aggregate = x batch); "
            "x ref = speed-up over transformers (> 1 = ours faster).", ""]
    kernels = result["kernels_per_decode_step"]
    main, details = [], []
    for r in result["rows"]:
        if r["status"] != "ok":
            what = f"unsupported on {r['device']}" if r["status"] == "unsupported" else "failed (see the JSON)"
            main.append([r["model"], r["precision"], r["device"], *["—"] * 4, what, *["—"] * 4])
            continue
        main.append([r["model"], r["precision"], r["device"], r["attention"], r["jit"], r["batch"], r["context"],
                     r["tokens_per_s"], r["aggregate_tokens_per_s"], fmt(r["ttft_s"], 3), r.get("decode_speedup"),
                     r.get("ttft_speedup")])
        k = kernels.get(r["precision"], {}).get("kernels") if r["jit"] == "on" else None
        ids = f"{r['ids_equal']}/{r['new_tokens']}" if "ids_equal" in r else None
        rel = f"{r['logits_rel_l2']:.1e}" if "logits_rel_l2" in r else None
        memory = f"{r['peak_rss_mb']}" + (f" (device {r['peak_device_memory_mb']})" if "peak_device_memory_mb" in r
                                          else "")
        details.append([
            r["precision"], r["jit"], r["batch"], r["context"],
            f"{fmt(r['tokens_per_s_min'])}–{fmt(r['tokens_per_s_max'])}", r.get("ref_tokens_per_s"),
            fmt(r.get("ref_ttft_s"), 3), f"{fmt(r.get('vision_ms'), 1)} / {fmt(r.get('ref_vision_ms'), 1)}",
            f"{fmt(r['load_s'])} / {fmt(r.get('ref_load_s'))}", memory, r["finite"], rel, ids, k,
            fmt(r["bandwidth_bound_tokens_per_s"], 1), f"{100 * r['fraction_of_bound']:.2g}%"])
    return "\n".join(head + table(MAIN_COLUMNS, main) + ["", "Details:", ""] + table(DETAIL_COLUMNS, details))


def plot(result: dict, path: Path) -> Optional[Path]:
    """Decode tokens/s vs batch size (aggregate, at the smallest context) and vs context (per sequence, at the
    smallest batch); ours per precision × jit, transformers per precision. None when matplotlib is missing."""
    plt = pyplot()
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if plt is None or not ok:
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
    return script_main(argv, lambda a: run_benchmark(parse_args(a)), child_main)


if __name__ == "__main__":
    sys.exit(main())
