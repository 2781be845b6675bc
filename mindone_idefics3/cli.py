"""`generate.py` / `idefics3-generate`: ask an Idefics3 (or SmolVLM) model about one or more images, or a
SmolVLM2 model about a video."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import List, Optional

from .cli_options import (add_image_cache_argument, add_model_arguments, add_sampling_arguments, check_max_new_tokens,
                          generation_options, image_cache, load_processor_and_model, run_command)
from .process import peak_rss_bytes

DEFAULT_MODEL = "HuggingFaceM4/Idefics3-8B-Llama3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Answer a prompt about images with an Idefics3 / SmolVLM checkpoint (MindSpore, Ascend or CPU). "
                    "Streams the answer to stdout; prompt tokens, time to first token, decode speed and peak "
                    "memory go to stderr.",
        epilog="example: python generate.py --model HuggingFaceM4/Idefics3-8B-Llama3 --image a.jpg "
               "--prompt 'Describe the image.'   |   python generate.py --demo (tiny random model, no download)")
    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="an image file or http(s) URL; repeat for several images (they go before the prompt)")
    p.add_argument("--video", action="append", default=[], metavar="PATH_OR_URL",
                   help="a video file or http(s) URL (SmolVLM2 checkpoints; needs the `video` extra); frames are "
                        "sampled as the checkpoint says (SmolVLM2: 1 per second, at most 64) unless --fps / "
                        "--max-frames say otherwise. Not with --image or --chat")
    p.add_argument("--fps", type=float, default=None, help="video frames sampled per second")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="at most N video frames")
    p.add_argument("--prompt", default="Describe the image.", help="the question or instruction")
    p.add_argument("--system", default=None, metavar="TEXT", help="an optional system turn before the user turn")
    add_sampling_arguments(p, default_max_new_tokens=500)
    p.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (answer, token counts, the new token ids, timings) on "
                        "stdout instead of text")
    p.add_argument("--no-jit", action="store_true",
                   help="decode in PyNative mode instead of a compiled step (slow; for debugging)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled graphs here for the next run of the same shapes (default: "
                        "~/.cache/mindone_idefics3/compile); a run with other shapes compiles into its own "
                        "subdirectory")
    p.add_argument("--no-compile-cache", action="store_true", help="compile every graph afresh, keep nothing on disk")
    p.add_argument("--demo", action="store_true",
                   help="write a tiny random-weight checkpoint and a test image to a temp dir and run on them "
                        "(no download; the text is meaningless by construction)")
    p.add_argument("--chat", action="store_true",
                   help="a conversation: turns are read from stdin, one per line (--image files go with the first); "
                        "'/image PATH' attaches an image to the next turn, '/reset' starts again, '/exit' or the "
                        "end of input quits. Each turn prefills only what the conversation's cache does not hold "
                        "and encodes only its new images; per-turn stats go to stderr")
    add_image_cache_argument(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(run, args)


def run(args: argparse.Namespace) -> int:
    check_max_new_tokens(args)
    _check_video_arguments(args)
    with tempfile.TemporaryDirectory(prefix="idefics3-demo-") as tmp:
        if args.demo:
            from .demo import write_demo_checkpoint, write_demo_image

            args.model = str(write_demo_checkpoint(os.path.join(tmp, "model")))
            if not args.image:
                args.image = [str(write_demo_image(os.path.join(tmp, "demo.png")))]
            print("demo: tiny random-weight model — the generated text is meaningless by construction",
                  file=sys.stderr)
        return _chat(args) if args.chat else _answer(args)


def _answer(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    from .device import dtype_name, select_device
    from .generation import GenerationStats, stream_generate
    from .processing import load_image
    from .processing.chat_template import question_turns

    import_seconds = time.perf_counter() - t_start

    select_device(args.device)
    t_images = time.perf_counter()
    images = [load_image(src) for src in args.image]  # bad images fail before the slow model load
    processor, model, device, load_seconds = load_processor_and_model(args)
    # videos are decoded once the processor is there: the checkpoint says how to sample and size their frames
    videos = [processor.load_video(src, args.fps, args.max_frames) for src in args.video]
    messages = question_turns(args.prompt, len(images), args.system, num_videos=len(videos))
    inputs = processor.chat_inputs(messages, images, videos)
    # reading the images, loading the processor and running the prompt through it: all but the model's load
    processor_seconds = time.perf_counter() - t_images - load_seconds
    gen_kwargs = dict(generation_options(args), use_jit=not args.no_jit)
    cache_dir = None
    if not (args.no_compile_cache or args.no_jit):
        from .compile_cache import DEFAULT_DIR, enable, request_signature
        from .generation import sampling_params

        greedy = sampling_params(1, **generation_options(args)).greedy
        signature = request_signature(model, inputs, args.max_new_tokens, greedy)
        cache_dir = enable(args.compile_cache or DEFAULT_DIR, model.model_dir, dtype_name(model.dtype), device,
                           signature)
    stats = GenerationStats()
    pieces = []
    for piece in stream_generate(model, processor, **inputs, stats=stats, **gen_kwargs):
        pieces.append(piece)
        if not (args.no_stream or args.json):
            print(piece, end="", flush=True)
    answer = "".join(pieces)
    report = dict(model=args.model, device=device, dtype=dtype_name(model.dtype),
                  prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                  import_seconds=round(import_seconds, 3), processor_seconds=round(processor_seconds, 3),
                  load_seconds=round(load_seconds, 3),
                  time_to_first_token=round(stats.time_to_first_token, 3),
                  vision_seconds=round(stats.vision_seconds, 3), prefill_seconds=round(stats.prefill_seconds, 3),
                  first_step_seconds=round(stats.first_step_seconds, 3),
                  decode_tokens_per_second=round(stats.decode_tokens_per_second, 2),
                  decode_seconds=round(stats.decode_seconds, 3),
                  peak_host_memory_mb=round(peak_rss_bytes() / 2**20, 1),
                  total_seconds=round(time.perf_counter() - t_start, 3),
                  compile_cache=None if cache_dir is None else str(cache_dir),
                  new_ids=[int(t[0]) for t in stats.new_ids])
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


def _check_video_arguments(args: argparse.Namespace) -> None:
    from .errors import Idefics3Error

    if args.video and args.image:
        raise Idefics3Error("--video and --image cannot be combined (SmolVLM's processor takes images or videos in "
                            "one request, not both)")
    if args.video and args.chat:
        raise Idefics3Error("--video works for one question, not with --chat")
    if (args.fps is not None or args.max_frames is not None) and not args.video:
        raise Idefics3Error("--fps and --max-frames apply to --video; pass a video")
    if args.fps is not None and not args.fps > 0:
        raise Idefics3Error(f"--fps must be a positive number of frames per second, got {args.fps:g}")
    if args.max_frames is not None and args.max_frames < 1:
        raise Idefics3Error(f"--max-frames must be at least 1, got {args.max_frames}")


def _chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession
    from .device import select_device
    from .errors import Idefics3Error
    from .processing import load_image

    select_device(args.device)
    pending = [load_image(src) for src in args.image]  # bad images fail before the slow model load
    processor, model, device, _ = load_processor_and_model(args)
    chat = ChatSession(model, processor, image_cache=image_cache(args, device), use_jit=not args.no_jit,
                       **generation_options(args))
    print("chat: one turn per line; /image PATH attaches an image to the next turn, /reset starts again, /exit "
          "quits", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        command, _, rest = line.partition(" ")
        if not line:
            continue
        if command.startswith("/"):
            if command == "/exit":
                break
            if command == "/reset":
                chat.reset()
                pending = []
                print("[the conversation starts again]", file=sys.stderr)
            elif command == "/image" and rest.strip():
                try:
                    pending.append(load_image(rest.strip()))
                except Idefics3Error as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"error: {line!r} is not a command: use /image PATH, /reset or /exit", file=sys.stderr)
            continue
        try:
            for piece in chat.stream(line, pending):
                print(piece, end="", flush=True)
        except Idefics3Error as e:  # the turn is dropped (with its images), the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            pending = []
            continue
        print(flush=True)
        pending = []
        s = chat.last_stats
        print(f"[{s.prompt_tokens} prompt tokens, {s.reused_tokens} from the conversation's cache, {s.vision_tiles} "
              f"image tiles encoded, {s.new_tokens} new | time to first token {s.time_to_first_token:.2f} s | decode "
              f"{s.decode_tokens_per_second:.2f} tokens/s]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
