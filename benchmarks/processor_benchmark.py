"""Time our Idefics3Processor against transformers' on 16 images of mixed sizes and modes (not a test).

Both processors read the same checkpoint files (Idefics3-8B's processor settings: tiles of 364, longest edge
4×364, 169 tokens per tile, its chat template; the demo's byte-level BPE tokenizer unless --tokenizer points at a
tokenizer.json). Each scenario is run once to warm up, then --repeats times; the table shows the median seconds
and the ratio reference / ours (> 1: we are faster). Outputs are checked equal on every run (transformers
gets the L and P images converted to RGB, which is what ours gives for them).

    python benchmarks/processor_benchmark.py [--repeats 5] [--tokenizer path/to/tokenizer.json]

Writes benchmarks/results/processor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (width, height, mode): phone photos, screenshots, a panorama, a tall receipt, icons, a scan
IMAGES = [(1024, 768, "RGB"), (1920, 1080, "RGB"), (3000, 400, "RGB"), (400, 2400, "RGB"), (364, 364, "RGB"),
          (1456, 1456, "RGB"), (640, 480, "RGBA"), (4032, 3024, "RGB"), (800, 600, "L"), (512, 512, "P"),
          (1280, 720, "RGB"), (64, 64, "RGBA"), (2480, 3508, "L"), (1000, 1000, "RGB"), (300, 200, "RGB"),
          (1600, 900, "RGB")]
KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


def synthetic_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 120 * np.sin((x + 2 * y) / 40)], -1)
    rgb = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = (255 * (x / width)).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


def write_checkpoint(directory: Path, tokenizer_file: str | None) -> Path:
    from mindone_idefics3.demo import IDEFICS3_CHAT_TEMPLATE, build_tokenizer

    if tokenizer_file:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_file)
    else:
        tok = build_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    files = {
        "tokenizer_config.json": dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=bos,
                                      eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", padding_side="left",
                                      model_input_names=["input_ids", "attention_mask"]),
        "preprocessor_config.json": dict(image_processor_type="Idefics3ImageProcessor", do_convert_rgb=True,
                                         do_resize=True, size={"longest_edge": 4 * 364}, resample=1,
                                         do_image_splitting=True, max_image_size={"longest_edge": 364},
                                         do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True),
        "processor_config.json": dict(image_seq_len=169, processor_class="Idefics3Processor"),
        "chat_template.json": dict(chat_template=IDEFICS3_CHAT_TEMPLATE),
    }
    for name, data in files.items():
        (directory / name).write_text(json.dumps(data), encoding="utf-8")
    return directory


def scenarios(ours, images):
    def prompt(n):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "Describe these images in detail."}]
        return ours.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    batch = dict(text=[prompt(4)] * 4, images=[images[i:i + 4] for i in range(0, 16, 4)], padding=True)
    return {  # load: options given to from_pretrained (transformers ignores a per-call do_image_splitting)
        "batch 4x4 images, split": dict(calls=[batch], load={}),
        "batch 4x4 images, no split": dict(calls=[batch], load={"do_image_splitting": False}),
        "16 single-image prompts, split": dict(calls=[dict(text=prompt(1), images=[im]) for im in images], load={}),
        "batch 4x4 images, longest edge 2x364": dict(calls=[{**batch, "size": {"longest_edge": 2 * 364}}], load={}),
    }


def reference_calls(calls):
    """transformers gets L and P images converted to RGB: ours gives what it gives for those (it would resize the
    L/P images themselves with NEAREST, or raise on a first one)."""
    def rgb(image: Image.Image) -> Image.Image:
        return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")

    return [{**call, "images": [rgb(im) if isinstance(im, Image.Image) else [rgb(i) for i in im]
                                for im in call["images"]]} for call in calls]


def run(processor, calls, return_tensors_kw):
    return [processor(**call, **return_tensors_kw) for call in calls]


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", help="a tokenizer.json with Idefics3's added tokens (default: demo BPE)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "processor.json"))
    args = parser.parse_args(argv)

    import transformers
    from transformers import Idefics3Processor as Reference

    from mindone_idefics3.processing import Idefics3Processor

    images = [synthetic_image(w, h, mode, seed) for seed, (w, h, mode) in enumerate(IMAGES)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp), args.tokenizer)
        rows = []
        for name, spec in scenarios(Idefics3Processor.from_pretrained(path), images).items():
            ours = Idefics3Processor.from_pretrained(path, **spec["load"])
            ref = Reference.from_pretrained(str(path), **spec["load"])
            ref_calls = reference_calls(spec["calls"])
            ours_out = run(ours, spec["calls"], {})
            ref_out = run(ref, ref_calls, {"return_tensors": "np"})
            diff = max(float(np.abs(o[k].astype(np.float64) - np.asarray(r[k])).max())
                       for o, r in zip(ours_out, ref_out) for k in KEYS)
            ours_s, ours_all = timed(lambda: run(ours, spec["calls"], {}), args.repeats)
            ref_s, ref_all = timed(lambda: run(ref, ref_calls, {"return_tensors": "np"}), args.repeats)
            tiles = sum(int(o["pixel_attention_mask"].reshape(-1, *o["pixel_attention_mask"].shape[-2:])
                            .any(axis=(1, 2)).sum()) for o in ours_out)
            rows.append(dict(scenario=name, tiles=tiles, ours_seconds=round(ours_s, 4),
                             reference_seconds=round(ref_s, 4), ratio_reference_over_ours=round(ref_s / ours_s, 2),
                             max_abs_diff=diff, ours_all=[round(t, 4) for t in ours_all],
                             reference_all=[round(t, 4) for t in ref_all]))

    width = max(len(r["scenario"]) for r in rows)
    print(f"{'scenario':<{width}}  tiles  ours (s)  transformers (s)  ratio  max|diff|")
    for r in rows:
        print(f"{r['scenario']:<{width}}  {r['tiles']:>5}  {r['ours_seconds']:>8.3f}  {r['reference_seconds']:>16.3f}"
              f"  {r['ratio_reference_over_ours']:>5.2f}  {r['max_abs_diff']:.1e}")
    result = dict(benchmark="processor", images=[f"{w}x{h} {m}" for w, h, m in IMAGES], repeats=args.repeats,
                  tokenizer=args.tokenizer or "demo byte-level BPE", transformers=transformers.__version__,
                  machine=dict(python=platform.python_version(), cpus=os.cpu_count(), platform=platform.platform()),
                  results=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if all(r["max_abs_diff"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
