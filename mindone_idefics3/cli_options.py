"""What the command-line tools share: the model, image and sampling flags, and what they turn into (a processor
and a model on the chosen device, the options of `generate`). No MindSpore at import: `--help` stays fast."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Type

from .errors import Idefics3Error


def add_model_arguments(p: argparse.ArgumentParser, default_model: Optional[str] = None,
                        model_required: bool = True) -> None:
    """--model, --adapter, --dtype, --device, --longest-edge, --no-image-splitting."""
    if default_model is None:
        p.add_argument("--model", required=model_required,
                       help="model directory or Hugging Face repo id (repo ids are downloaded to the hub cache "
                            "unless HF_HUB_OFFLINE=1)")
    else:
        p.add_argument("--model", default=default_model,
                       help=f"model directory or Hugging Face repo id (default: {default_model}); repo ids are "
                            "downloaded to the hub cache unless HF_HUB_OFFLINE=1")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter merged into the model at load: finetune.py's output directory, or one saved "
                        "by PEFT (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights and activations dtype (default: bf16 on Ascend, fp32 on CPU; bf16 needs Ascend)")
    p.add_argument("--device", choices=["Ascend", "CPU"], default=None,
                   help="device (default: Ascend when an NPU is usable, else CPU)")
    p.add_argument("--longest-edge", type=int, default=None, metavar="PIXELS",
                   help="resize images so their longest edge is this many pixels before splitting (processor "
                        "default, 4×364 = 1456 for Idefics3-8B; 2–3×364 to save memory, 5×364 for huge images)")
    p.add_argument("--no-image-splitting", action="store_true",
                   help="do not split large images into tiles (one tile per image: faster, less detail)")


def add_image_cache_argument(p: argparse.ArgumentParser) -> None:
    """--image-cache-mb: the image-feature cache of generate.py, idefics3-batch and idefics3-serve."""
    p.add_argument("--image-cache-mb", type=megabytes, default=None, metavar="MB",
                   help="keep the vision features of up to this many MB of images, so an image seen again (the same "
                        "pixels, whatever its name) skips the vision tower (default: 512 on the CPU, 2048 on "
                        "Ascend; 0 = off)")


def image_cache(args: argparse.Namespace, device: str):
    """The ImageFeatureCache of --image-cache-mb (the device's default when not given)."""
    from .image_cache import DEFAULT_MB, ImageFeatureCache

    mb = DEFAULT_MB[device] if args.image_cache_mb is None else args.image_cache_mb
    return ImageFeatureCache(int(mb * 2**20))


def megabytes(text: str) -> float:
    """--image-cache-mb's value, refused by the parser (exit 2, before any model loads) when negative."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--image-cache-mb must be >= 0 (0 = off), got {value:g}")
    return value


def add_sampling_arguments(p: argparse.ArgumentParser, default_max_new_tokens: int) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --seed."""
    p.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens,
                   help=f"upper bound on generated tokens (default {default_max_new_tokens})")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this temperature (setting it, --top-p or --top-k turns sampling on; "
                        "default: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same output)")


def check_max_new_tokens(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise Idefics3Error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def generation_options(args: argparse.Namespace) -> Dict[str, Any]:
    """`generate` keyword arguments from the sampling flags: greedy unless --temperature/--top-p/--top-k is set."""
    sampling = args.temperature is not None or args.top_p is not None or bool(args.top_k)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                temperature=args.temperature if args.temperature is not None else 1.0,
                top_k=args.top_k or 0, top_p=args.top_p if args.top_p is not None else 1.0,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_processor_and_model(args: argparse.Namespace, progress: bool = True) -> Tuple[Any, Any, str, float]:
    """(processor, model, device, seconds the model took to load) for --model/--dtype/--device, the image flags and
    --adapter (where the command has it)."""
    import time

    from . import Idefics3ForConditionalGeneration, Idefics3Processor
    from .device import resolve_dtype, select_device
    from .hub import resolve_model_dir

    device = select_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_dir = resolve_model_dir(args.model)
    processor = Idefics3Processor.from_pretrained(model_dir, **processor_overrides(args))
    t_load = time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, device=device,
                                                             adapter=getattr(args, "adapter", None), progress=progress)
    return processor, model, device, time.perf_counter() - t_load


def processor_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Idefics3Processor.from_pretrained options from --longest-edge and --no-image-splitting."""
    overrides: Dict[str, Any] = {}
    if args.longest_edge:
        overrides["size"] = {"longest_edge": args.longest_edge}
    if args.no_image_splitting:
        overrides["do_image_splitting"] = False
    return overrides


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                errors: Optional[Dict[Type[Exception], int]] = None, interrupted: str = "interrupted") -> int:
    """A command's body under the package's CLI contract: an Idefics3Error is one `error: ...` line on stderr and
    exit code 2, Ctrl-C one `interrupted` line and 130; MindSpore's own INFO/WARNING lines stay off (they would
    drown the command's output). `errors`: more exception types reported the same way, with their own exit codes;
    `interrupted`: the Ctrl-C line of a command that has more to say."""
    os.environ.setdefault("GLOG_v", "3")

    codes = {Idefics3Error: 2, **(errors or {})}
    try:
        return run(args)
    except tuple(codes) as e:
        print(f"error: {e}", file=sys.stderr)
        return next(code for kind, code in codes.items() if isinstance(e, kind))
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
