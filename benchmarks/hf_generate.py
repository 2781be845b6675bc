"""The transformers script that `generate.py` is compared with (benchmarks/cli_benchmark.py): what a user of the
model card runs — AutoProcessor, Idefics3ForConditionalGeneration.from_pretrained, generate — greedy, stopping on
the checkpoint's eos ids as generate.py does. Prints one JSON object: the new ids and its phases.

    python benchmarks/hf_generate.py --model DIR --image photo.jpg --prompt "Describe the image." --max-new-tokens 32

Its vision position ids are corrected as in tests/reference.py (transformers 4.57 shifts full tiles), so
that its ids can be compared with ours; the correction costs nothing measurable.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.runs import TokenClock  # (importing bench puts this checkout first on sys.path)
from mindone_idefics3.process import peak_rss_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory in the Hugging Face layout")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--prompt", default="Describe the image.", help="the question (default: Describe the image.)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="upper bound on generated tokens (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)

    t = time.perf_counter()
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration
    from transformers.image_utils import load_image

    from tests.reference import corrected_position_ids

    import_seconds = time.perf_counter() - t
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    images = [load_image(path) for path in args.image]
    processor = AutoProcessor.from_pretrained(args.model)
    processor_seconds = time.perf_counter() - t
    t = time.perf_counter()
    model = Idefics3ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - t

    t = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "image"} for _ in images]
                 + [{"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
    processor_seconds += time.perf_counter() - t

    clock = TokenClock()
    t = time.perf_counter()
    with torch.inference_mode(), corrected_position_ids():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=clock)
    new_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    times = clock.times
    report = dict(prompt_tokens=int(inputs["input_ids"].shape[1]), new_tokens=len(new_ids),
                  import_seconds=round(import_seconds, 3), processor_seconds=round(processor_seconds, 3),
                  load_seconds=round(load_seconds, 3), time_to_first_token=round(times[0] - t, 3),
                  first_step_seconds=round(times[1] - times[0], 3) if len(times) > 1 else None,
                  decode_tokens_per_second=round((len(times) - 2) / (times[-1] - times[1]), 2)
                  if len(times) > 2 else None,
                  peak_host_memory_mb=round(peak_rss_bytes() / 2**20, 1),
                  torch_threads=torch.get_num_threads(),
                  attention=model.config._attn_implementation, new_ids=new_ids)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
