"""The command line from a fresh process: `generate.py` (ours) against the equivalent transformers script
(benchmarks/hf_generate.py: AutoProcessor + from_pretrained + generate) on the same checkpoint, image and prompt.

    python benchmarks/cli_benchmark.py --preset smolvlm-256m
    python benchmarks/cli_benchmark.py --model path/to/checkpoint --image a.jpg --runs 3

Each side runs --runs times in a row (the first run, then the second, ...), each a fresh process started from a
lean launcher: wall time from spawn to exit, the process's peak RSS (ru_maxrss via os.wait4), and the phases the
script reports itself (import, processor, load, time to first token, first decode step, decode tokens/s). Both
are greedy and stop on the checkpoint's stop ids; their new ids are compared. Before each side's first run the
checkpoint's files are dropped from the page cache and generate.py's compile cache (see --compile-cache) is
emptied, so a first run is cold and later runs read the graphs the first one compiled, as a user's second run
would. Prints a markdown table (the machine first) and writes
benchmarks/results/cli-<preset or model>-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from bench import RESULTS, ROOT, Refused
from bench.args import add_checkpoint_args, add_threads_arg, checked, use_threads
from bench.images import write_test_images
from bench.machine import describe, finish, headline
from bench.presets import resolve_checkpoint
from bench.processes import evict, run_measured
from bench.report import fmt, table, write_json

PHASES = ("import_seconds", "processor_seconds", "load_seconds", "time_to_first_token", "first_step_seconds",
          "decode_tokens_per_second")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--image", action="append", default=None,
                   help="image file(s) for both sides (default: the synthetic 640x480 photo, written under --work-dir)")
    p.add_argument("--prompt", default="Describe the image.", help="the question (default: Describe the image.)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="(default: 32)")
    p.add_argument("--runs", type=int, default=2, help="fresh processes per side, in a row (default: 2)")
    add_threads_arg(p)
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="generate.py's --compile-cache for our runs, emptied before the first run (default: "
                            "<work-dir>/compile-cache, not generate.py's default in your home directory)")
    cache.add_argument("--no-compile-cache", action="store_true",
                       help="our runs keep no compiled graphs (generate.py --no-compile-cache): every run compiles")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/cli-<preset or model>-cpu.json)")
    args = checked(p, p.parse_args(argv))
    if args.runs < 1 or args.max_new_tokens < 1:
        p.error("--runs and --max-new-tokens must be at least 1")
    return args


def compile_cache(args) -> Optional[Path]:
    """The root of generate.py's compile cache for our runs, or None when it is off."""
    if args.no_compile_cache:
        return None
    return Path(args.compile_cache or Path(args.work_dir) / "compile-cache").resolve()


def commands(args, ckpt: Path, images, threads: int, cache: Optional[Path]) -> dict:
    common = ["--model", str(ckpt), *[a for image in images for a in ("--image", str(image))], "--prompt",
              args.prompt, "--max-new-tokens", str(args.max_new_tokens)]
    cache_args = ["--no-compile-cache"] if cache is None else ["--compile-cache", str(cache)]
    return {"ours": [sys.executable, str(ROOT / "generate.py"), *common, "--json", *cache_args],
            "transformers": [sys.executable, str(ROOT / "benchmarks" / "hf_generate.py"), *common, "--threads",
                             str(threads)]}


def run_side(side: str, cmd: list, runs: int, cache: Optional[Path], ckpt: Path) -> list:
    """`runs` fresh processes in a row, the first one cold (page cache, compile cache)."""
    evict(ckpt)
    if side == "ours" and cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    # MindSpore's own cache variables stay out: generate.py sets them for its cache, and "off" means off
    env = {k: v for k, v in os.environ.items() if not k.startswith("MS_COMPILER_CACHE")}
    rows = []
    for i in range(1, runs + 1):
        m = run_measured(cmd, env={**env, "GLOG_v": "3"}, cwd=ROOT)
        row = dict(side=side, run=i, wall_s=round(m.wall_s, 3), peak_rss_mb=round(m.peak_rss_bytes / 2**20),
                   exit_code=m.rc)
        if m.rc == 0:
            report = json.loads(m.stdout.strip().splitlines()[-1])
            row.update({k: report[k] for k in ("device", "prompt_tokens", "new_tokens", "new_ids", *PHASES)
                        if k in report})
        else:
            row["stderr_tail"] = m.stderr[-3000:]
        print(f"{side} run {i}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_mb']} MB, exit code {m.rc}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def compare(rows: list) -> dict:
    """Ours ÷ theirs per run number (wall, peak RSS), and whether each of our runs gave transformers' ids."""
    ours = {r["run"]: r for r in rows if r["side"] == "ours"}
    theirs = {r["run"]: r for r in rows if r["side"] == "transformers"}
    reference = next((r for r in theirs.values() if "new_ids" in r), None)
    for r in ours.values():
        if reference is not None and "new_ids" in r:
            r["ids_equal"] = r["new_ids"] == reference["new_ids"]
            r["prompt_tokens_equal"] = r["prompt_tokens"] == reference["prompt_tokens"]
    return {f"run_{i}": dict(wall_ratio=round(ours[i]["wall_s"] / theirs[i]["wall_s"], 3),
                             peak_rss_ratio=round(ours[i]["peak_rss_mb"] / theirs[i]["peak_rss_mb"], 3))
            for i in ours if i in theirs}


COLUMNS = [("side", "c"), ("run", "r"), ("wall s", "r"), ("peak RSS MB", "r"), ("prompt tokens", "r"),
           ("new tokens", "r"), ("import s", "r"), ("processor s", "r"), ("load s", "r"), ("TTFT s", "r"),
           ("first step s", "r"), ("decode tok/s", "r"), ("ids equal", "c")]


def markdown(result: dict) -> str:
    cache = result["compile_cache"] or "off"
    head = [headline(result["machine"]),
            f"Threads: {result['machine']['threads']} for both sides. Weights: {result['weights']}. Image(s): "
            f"{', '.join(Path(i).name for i in result['images'])}; prompt {result['prompt']!r}; up to "
            f"{result['max_new_tokens']} new tokens, greedy. MindSpore compile cache: {cache}. Before each side's "
            "first run: checkpoint evicted from the page cache (and the compile cache emptied).", ""]
    rows = []
    for r in result["runs"]:
        if r["exit_code"]:
            rows.append([r["side"], r["run"], r["wall_s"], r["peak_rss_mb"], f"failed (exit code {r['exit_code']})",
                         *["—"] * 8])
            continue
        rows.append([r["side"], r["run"], r["wall_s"], r["peak_rss_mb"], r["prompt_tokens"], r["new_tokens"],
                     *[fmt(r[k], 2 if k == "decode_tokens_per_second" else 3) for k in PHASES], r.get("ids_equal")])
    ratios = [f"- run {k.split('_')[1]}: wall x{v['wall_ratio']:.2f}, peak RSS x{v['peak_rss_ratio']:.2f}"
              for k, v in result["ours_over_transformers"].items()]
    return "\n".join(head + table(COLUMNS, rows) + ["", "Ours ÷ transformers (< 1: ours faster / smaller):", *ratios])


def main(argv=None) -> int:
    args = parse_args(argv)
    from mindone_idefics3.errors import Idefics3Error

    try:
        threads = use_threads(args.threads)
        ckpt, name = resolve_checkpoint(args, ["fp32"])
        images = args.image or [write_test_images(Path(args.work_dir) / "images")["photo"]]
        missing = [i for i in images if not Path(i).is_file()]
        if missing:
            raise Refused(f"no such image file: {', '.join(map(str, missing))}")
    except (Refused, Idefics3Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = compile_cache(args)
    machine = describe(threads, "CPU", reference=True)
    result = dict(machine=machine, checkpoint=str(ckpt), weights="random (preset)" if args.preset else "checkpoint",
                  images=[str(i) for i in images], prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                  compile_cache=str(cache) if cache else None, args=vars(args), runs=[])
    for side, cmd in commands(args, ckpt, images, threads, cache).items():
        result["runs"] += run_side(side, cmd, args.runs, cache, ckpt)
    result["ours_over_transformers"] = compare(result["runs"])
    finish(machine)
    out = Path(args.out or RESULTS / f"cli-{name}-cpu.json")
    write_json(out, result)
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 1 if any(r["exit_code"] for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
