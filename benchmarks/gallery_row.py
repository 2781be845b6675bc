"""One row of MindONE's gallery performance table, measured on this machine:

    | model name | precision | cards | fa | tokens/s | weight |

On an Ascend NPU (the command that fills the README's Ascend rows; downloads the checkpoint from the hub):
    python benchmarks/gallery_row.py --model HuggingFaceTB/SmolVLM-256M-Instruct --dtype bf16 --attn-implementation flash_attention_2
    python benchmarks/gallery_row.py --model HuggingFaceM4/Idefics3-8B-Llama3 --dtype bf16 --attn-implementation flash_attention_2
On the CPU, without a download (random weights of a real model's shapes, written once under --work-dir):
    python benchmarks/gallery_row.py --preset smolvlm-256m --dtype fp32

tokens/s is the gallery's generation speed of one sequence: greedy, batch 1, one image tile (random pixels) and
--prompt-tokens text tokens, exactly --new-tokens new tokens (no stop ids); (new tokens - 2) / time from the 2nd to
the last new token (the first comes from the prefill, the first decode step may compile), median of --repeats runs
after one warm-up; decode compiled with mindspore.jit (the package's default). fa: ON when the model runs Ascend's
flash attention kernels (attn_implementation, ops/kernels.py), OFF for the eager math. cards: 1 (one device).
Prints the machine and MindSpore release above the table, as the gallery groups rows by MindSpore release.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench import Refused
from bench.args import add_checkpoint_args, add_threads_arg, checked, use_threads
from bench.kernels import attention_backend
from bench.machine import describe, finish, headline
from bench.presets import resolve_checkpoint
from bench.runs import TokenClock, exact_length, measure, ours_generate

HEADER = ("| model name | precision | cards | fa | tokens/s | weight |\n"
          "| :---: | :---: | :---: | :---: | :---: | --- |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    add_threads_arg(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision (default: the device's, bf16 on Ascend, fp32 on the CPU)")
    p.add_argument("--attn-implementation", choices=("eager", "flash_attention_2"), default=None,
                   help="as from_pretrained's (default: the device and dtype decide)")
    p.add_argument("--device", choices=("Ascend", "CPU"), default=None, help="default: Ascend when usable, else CPU")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per run (default: 32)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens besides the image's (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default: 3)")
    args = checked(p, p.parse_args(argv))
    if args.new_tokens < 3 or args.prompt_tokens < 1:
        p.error("--new-tokens must be at least 3 and --prompt-tokens at least 1")
    return args


def weight_link(args, name: str) -> str:
    if args.preset:
        return f"random weights ({args.preset} shapes)"
    if not Path(args.model).exists() and args.model.count("/") == 1:  # a hub repo id
        return f"[weight](https://huggingface.co/{args.model})"
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = use_threads(args.threads)
    from mindone_idefics3 import Idefics3ForConditionalGeneration
    from mindone_idefics3.device import dtype_name, select_device
    from mindone_idefics3.errors import Idefics3Error
    from throughput import make_inputs

    try:
        device = select_device(args.device)
        ckpt, name = resolve_checkpoint(args, [args.dtype or ("bf16" if device == "Ascend" else "fp32")])
        model = exact_length(Idefics3ForConditionalGeneration.from_pretrained(
            ckpt, mindspore_dtype=args.dtype, attn_implementation=args.attn_implementation, progress=False))
    except (Refused, Idefics3Error) as e:
        print(f"gallery_row: {e}", file=sys.stderr)
        return 2
    machine = describe(threads, device)
    inputs = make_inputs(model.config, 1, 1, model.config.vision_config.image_size, args.prompt_tokens)
    ours_generate(model, inputs, args.new_tokens, TokenClock())  # warm-up: compiles the graphs of these shapes
    runs = [measure(lambda clock: ours_generate(model, inputs, args.new_tokens, clock), args.new_tokens, device)
            for _ in range(args.repeats)]
    finish(machine)
    fa = "ON" if attention_backend(model) != "eager" else "OFF"
    tps = statistics.median(r.tokens_per_second for r in runs)
    print(f"- mindspore {machine['mindspore']}, {device}, decode compiled (mindspore.jit), batch 1, "
          f"{args.prompt_tokens} text tokens + 1 image tile, {args.new_tokens} new tokens, median of {args.repeats}")
    print(headline(machine))
    print()
    print(HEADER)
    print(f"| {name} | {dtype_name(model.dtype)} | 1 | {fa} | {tps:.2f} | {weight_link(args, name)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
