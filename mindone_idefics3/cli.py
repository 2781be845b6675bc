"""`generate.py` / `idefics3-generate`: ask an Idefics3 (or SmolVLM) model about one or more images."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

DEFAULT_MODEL = "HuggingFaceM4/Idefics3-8B-Llama3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Answer a prompt about images with an Idefics3 / SmolVLM checkpoint (MindSpore, Ascend or CPU). "
                    "Streams the answer to stdout; prompt tokens, time to first token, decode speed and peak "
                    "memory go to stderr.",
        epilog="example: python generate.py --model HuggingFaceM4/Idefics3-8B-Llama3 --image a.jpg "
               "--prompt 'Describe the image.'   |   python generate.py --demo (tiny random model, no download)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model directory or Hugging Face repo id (default: {DEFAULT_MODEL}); repo ids are "
                        "downloaded to the hub cache unless HF_HUB_OFFLINE=1")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s) URL; repeat for several images (they go before the prompt)")
    p.add_argument("--prompt", default="Describe the image.", help="the question or instruction")
    p.add_argument("--system", default=None, metavar="TEXT", help="an optional system turn before the user turn")
    p.add_argument("--max-new-tokens", type=int, default=500, help="upper bound on generated tokens (default 500)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights and activations dtype (default: bf16 on Ascend, fp32 on CPU; bf16 needs Ascend)")
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None,
                   help="device (default: Ascend when an NPU is usable, else CPU)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this temperature (setting it, --top-p or --top-k turns sampling on; "
                        "default: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same output)")
    p.add_argument("--longest-edge", type=int, default=None, metavar="PIXELS",
                   help="resize images so their longest edge is this many pixels before splitting (processor "
                        "default, 4×364 = 1456 for Idefics3-8B; 2–3×364 to save memory, 5×364 for huge images)")
    p.add_argument("--no-image-splitting", action="store_true",
                   help="do not split large images into tiles (one tile per image: faster, less detail)")
    p.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (answer, token counts, timings) on stdout instead of text")
    p.add_argument("--no-jit", action="store_true",
                   help="decode in PyNative mode instead of a compiled step (slow; for debugging)")
    p.add_argument("--demo", action="store_true",
                   help="write a tiny random-weight checkpoint and a test image to a temp dir and run on them "
                        "(no download; the text is meaningless by construction)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's own INFO/WARNING lines would drown the answer
    from .errors import Idefics3Error

    try:
        return run(args)
    except Idefics3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from .errors import Idefics3Error

    if args.max_new_tokens < 1:
        raise Idefics3Error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    with tempfile.TemporaryDirectory(prefix="idefics3-demo-") as tmp:
        if args.demo:
            from .demo import write_demo_checkpoint, write_demo_image

            args.model = str(write_demo_checkpoint(os.path.join(tmp, "model")))
            if not args.image:
                args.image = [str(write_demo_image(os.path.join(tmp, "demo.png")))]
            print("demo: tiny random-weight model — the generated text is meaningless by construction",
                  file=sys.stderr)
        return _answer(args)


def _answer(args: argparse.Namespace) -> int:
    t_import = time.perf_counter()
    from . import Idefics3ForConditionalGeneration, Idefics3Processor
    from .device import resolve_dtype, select_device
    from .generation import GenerationStats, stream_generate
    from .processing import load_image
    from .hub import resolve_model_dir

    import_seconds = time.perf_counter() - t_import
    device = select_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t_images = time.perf_counter()
    images = [load_image(src) for src in args.image]  # bad images fail before the slow model load
    model_dir = resolve_model_dir(args.model)
    overrides = {}
    if args.longest_edge:
        overrides["size"] = {"longest_edge": args.longest_edge}
    if args.no_image_splitting:
        overrides["do_image_splitting"] = False
    processor = Idefics3Processor.from_pretrained(model_dir, **overrides)
    processor_seconds = time.perf_counter() - t_images
    t_load = time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device=device)
    load_seconds = time.perf_counter() - t_load

    t_prompt = time.perf_counter()
    messages = []
    if args.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
    messages.append({"role": "user", "content": [{"type": "image"} for _ in images]
                     + [{"type": "text", "text": args.prompt}]})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="np")
    processor_seconds += time.perf_counter() - t_prompt

    sampling = args.temperature is not None or args.top_p is not None or bool(args.top_k)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                      temperature=args.temperature if args.temperature is not None else 1.0,
                      top_k=args.top_k or 0, top_p=args.top_p if args.top_p is not None else 1.0,
                      repetition_penalty=args.repetition_penalty, seed=args.seed, use_jit=not args.no_jit)
    stats = GenerationStats()
    pieces = []
    for piece in stream_generate(model, processor, **_model_inputs(inputs), stats=stats, **gen_kwargs):
        pieces.append(piece)
        if not (args.no_stream or args.json):
            print(piece, end="", flush=True)
    answer = "".join(pieces)
    report = dict(model=args.model, device=device, dtype=args.dtype or ("bf16" if device == "Ascend" else "fp32"),
                  prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                  load_seconds=round(load_seconds, 3), time_to_first_token=round(stats.time_to_first_token, 3),
                  first_step_seconds=round(stats.first_step_seconds, 3),
                  decode_tokens_per_second=round(stats.decode_tokens_per_second, 2),
                  peak_host_memory_mb=round(_peak_rss_mb(), 1), import_seconds=round(import_seconds, 3),
                  processor_seconds=round(processor_seconds, 3), new_ids=[int(t[0]) for t in stats.new_ids])
    if device == "Ascend":
        import mindspore as ms

        report["peak_device_memory_mb"] = round(ms.runtime.max_memory_allocated() / 2**20, 1)
    if args.json:
        print(json.dumps({"answer": answer, **report}, ensure_ascii=False))
    else:
        print(answer if args.no_stream else "")
        print(f"[{report['prompt_tokens']} prompt tokens, {report['new_tokens']} new | load "
              f"{report['load_seconds']:.1f} s | time to first token {report['time_to_first_token']:.2f} s | "
              f"decode {report['decode_tokens_per_second']:.2f} tokens/s (first step incl. compile "
              f"{report['first_step_seconds']:.2f} s) | peak host memory {report['peak_host_memory_mb']:.0f} MB | "
              f"{device} {report['dtype']}]", file=sys.stderr)
    return 0


def _model_inputs(inputs) -> dict:
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    return {k: inputs[k] for k in keys if k in inputs and inputs[k] is not None}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


if __name__ == "__main__":
    sys.exit(main())
