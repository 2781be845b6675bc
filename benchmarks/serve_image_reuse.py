"""idefics3-serve's image-feature cache on a photo at the processor's default settings: the real server (a
subprocess on 127.0.0.1) with a SmolVLM-256M-shaped checkpoint (random weights, fp32).

    python benchmarks/serve_image_reuse.py

After one warm-up request with another photo (it compiles every graph of the 13-tile photo shape), four requests,
one at a time, each non-streamed with max_tokens 1, so its latency is its time to first token:
  1. photo A + question 1: A is new, its 13 tiles go through the vision tower;
  2. photo A + question 2: the same pixels, vision is skipped (the cache's hit counter moves);
  3. photo A + a system prompt + question 1: the same;
  4. photo A with one pixel changed + question 1: new pixels, vision runs (the miss counter moves).
Measured: each request's seconds and its ratio to request 1, the cache counters' moves (/metrics), the server's
peak RSS. Writes benchmarks/results/serve-image-reuse-smolvlm-256m-cpu.json and .md (the machine described).
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench.images import synthetic_photo  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.report import table, write_json  # noqa: E402
from mindone_idefics3.files import write_text_atomically  # noqa: E402
from serve_benchmark import ServerProcess, serve_checkpoint  # noqa: E402

MODEL = "smolvlm-256m-random"
QUESTIONS = ("What is in the image?", "Describe the colours of the image.")


def png_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: the one changed pixel survives
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(base: str, image: str, question: str, system: str = None) -> float:
    import httpx

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": question}]})
    t0 = time.perf_counter()
    r = httpx.post(base + "/chat/completions", timeout=3600,
                   json=dict(model=MODEL, max_tokens=1, temperature=0, messages=messages))
    r.raise_for_status()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"), help="checkpoint")
    p.add_argument("--photo-size", default="640x480", help="WIDTHxHEIGHT of the photos (default 640x480)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-image-reuse-smolvlm-256m-cpu.json"))
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    load_at_start = os.getloadavg()[0]
    from mindone_idefics3.device import cpu_threads

    checkpoint = serve_checkpoint(Path(args.work_dir))
    photo, other = synthetic_photo(width, height, seed=11), synthetic_photo(width, height, seed=12)
    changed = photo.copy()
    changed[height // 2, width // 2, 0] ^= 0xFF
    print("starting the server (loading the model) ...", file=sys.stderr, flush=True)
    server = ServerProcess(checkpoint, options=())  # the processor's default settings: 13 tiles for 640x480
    try:
        t0 = time.perf_counter()
        ask(server.base, png_uri(other), QUESTIONS[0])
        warmup = time.perf_counter() - t0
        rows = []
        for label, image, question, system in (
                ("1. photo A, question 1", photo, QUESTIONS[0], None),
                ("2. photo A, question 2", photo, QUESTIONS[1], None),
                ("3. photo A, system prompt + question 1", photo, QUESTIONS[0], "You answer in one word."),
                ("4. photo A with one pixel changed, question 1", changed, QUESTIONS[0], None)):
            hits, misses = (server.metric(f"idefics3_image_cache_{k}_total") for k in ("hits", "misses"))
            seconds = ask(server.base, png_uri(image), question, system)
            rows.append(dict(request=label, seconds=round(seconds, 2),
                             image_cache_hits=int(server.metric("idefics3_image_cache_hits_total") - hits),
                             image_cache_misses=int(server.metric("idefics3_image_cache_misses_total") - misses)))
        peak = server.peak_rss_mb()
    finally:
        code = server.stop()
    for row in rows:
        row["x_request_1"] = round(row["seconds"] / rows[0]["seconds"], 3)
    machine = dict(describe(cpu_threads(), "CPU"), load_average_1min_at_start=load_at_start,
                   load_average_1min_at_end=os.getloadavg()[0])
    result = dict(machine=machine, checkpoint_shapes="smolvlm-256m (bench preset)", photo_size=f"{width}x{height}",
                  warmup_seconds=round(warmup, 1), server_peak_rss_mb=round(peak), server_exit_code=code,
                  requests=rows, definitions=__doc__)
    out = Path(args.out)
    write_json(out, result)
    m = machine
    lines = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores; MindSpore {m['mindspore']}; {m['date']}; load "
             f"average {m['load_average_1min_at_start']:.1f} at start, {m['load_average_1min_at_end']:.1f} at end.",
             f"Server: idefics3-serve, SmolVLM-256M shapes, random weights, fp32, {width}x{height} photos at the "
             f"processor's defaults; warm-up {warmup:.0f} s (not timed); peak RSS {peak:.0f} MB.", ""]
    lines += table([("request", "l"), ("seconds (= TTFT)", "r"), ("x request 1", "r"), ("cache hits", "r"),
                    ("cache misses", "r")],
                   [[r["request"], r["seconds"], r["x_request_1"], str(r["image_cache_hits"]),
                     str(r["image_cache_misses"])] for r in rows])
    text = "\n".join(lines)
    write_text_atomically(out.with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
