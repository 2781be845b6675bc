"""Batch inference throughput: idefics3-batch's loop at several batch sizes against a plain loop of transformers'
`generate`, on a SmolVLM-256M-shaped checkpoint (random weights) with photo-sized images.

    python benchmarks/batch_benchmark.py                              # batch sizes 1,4,8, 16 rows, 640x480 photos
    python benchmarks/batch_benchmark.py --batch-sizes 1,8 --rows 32 --image-splitting

Each configuration runs in a process of its own (MindSpore keeps every compiled graph; peak RSS is per process):
one untimed pass over all rows compiles the graphs of every shape, a second pass is timed. transformers runs the
same rows one by one (processor + generate, eager attention, its vision position ids corrected as in
tests/reference.py so that the answers can be compared), after one warm-up row. Both sides: greedy,
--new-tokens at most, stopping at the checkpoint's stop ids, the same threads.

Measured: rows/s and tokens/s (generated tokens, stop token included, / seconds of the timed pass, processing
and decoding included), the cold pass's seconds, peak RSS (VmHWM of the process), answers equal to transformers'.
Writes a markdown table and benchmarks/results/batch-smolvlm-256m-cpu.json (the machine described: CPU model,
cores, RAM, versions).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench.machine import describe  # noqa: E402  (the benchmarks' shared package: benchmarks/bench)
from bench.processes import run_jobs, save_results, script_main  # noqa: E402
from bench.presets import ensure_preset  # noqa: E402
from mindone_idefics3.process import peak_rss_bytes  # noqa: E402

PRESET = "smolvlm-256m"
TILE, LONGEST_EDGE, IMAGE_SEQ_LEN = 512, 2048, 64  # SmolVLM-256M's processor: 512-px tiles, 4 x 512, 64 tokens
QUESTIONS = ["Describe this photo.", "What is in the picture? Answer in one sentence.",
             "List the colours you can see in this image, from the most to the least visible.",
             "Is there any text in this photo? If so, transcribe it exactly; otherwise describe the scene in detail."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,4,8", help="comma list (default: 1,4,8)")
    p.add_argument("--rows", type=int, default=16, help="rows per pass (default: 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per row (default: 32)")
    p.add_argument("--photo-size", default="640x480", help="WIDTHxHEIGHT of the generated photos (default 640x480)")
    p.add_argument("--image-splitting", action="store_true",
                   help="split photos into 512-px tiles as SmolVLM's processor does by default (13 tiles for "
                        "640x480); default: one tile per photo (--no-image-splitting)")
    p.add_argument("--reference", choices=["hf", "none"], default="hf", help="transformers loop (default: hf)")
    p.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".cache"), help="preset weights and inputs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch-smolvlm-256m-cpu.json"))
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.width, args.height = (int(v) for v in args.photo_size.lower().split("x"))
    return args


# ----------------------------------------------------------------------------------------------- inputs
def batch_checkpoint(work_dir: Path) -> Path:
    """The preset's checkpoint: random weights with the demo tokenizer and SmolVLM-256M's processor settings
    (512-px tiles, longest edge 4 x 512, 64 tokens per tile); the special token ids in config.json are the
    tokenizer's (bench.presets writes it so)."""
    path = ensure_preset(PRESET, work_dir)
    proc = json.loads((path / "preprocessor_config.json").read_text())
    seq = json.loads((path / "processor_config.json").read_text())["image_seq_len"]
    if (proc["max_image_size"]["longest_edge"], proc["size"]["longest_edge"], seq) != (TILE, LONGEST_EDGE,
                                                                                       IMAGE_SEQ_LEN):
        raise RuntimeError(f"preset {PRESET} at {path} no longer has SmolVLM-256M's processor settings "
                           f"(tiles of {TILE} px, longest edge {LONGEST_EDGE}, {IMAGE_SEQ_LEN} tokens per tile)")
    return path


def write_photos(folder: Path, rows: int, width: int, height: int) -> Path:
    """`rows` photo-sized JPEGs (smooth colour fields, shapes, sensor-like noise) and an input file asking
    questions of different lengths about them."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(rows):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        base = np.stack([np.sin(a * x + c), np.cos(b * y), np.sin((a + b) * (x + y))], -1) * 100 + 128
        image = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"photo-{i:03d}.jpg", quality=90)
        lines.append(json.dumps({"id": i, "prompt": QUESTIONS[i % len(QUESTIONS)], "images": [f"photo-{i:03d}.jpg"]}))
    (folder / "input.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "input.jsonl"


# ----------------------------------------------------------------------------------------------- measuring
def ours(job: dict) -> dict:
    """idefics3-batch's loop (no files: records collected in memory) at one batch size: cold pass, timed pass."""
    from mindone_idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor
    from mindone_idefics3.batch.cli import build_parser
    from mindone_idefics3.batch.runner import answer_rows
    from mindone_idefics3.batch.rows import read_rows
    from mindone_idefics3.cli_options import generation_options
    from mindone_idefics3.device import select_device

    select_device("CPU")
    args = build_parser().parse_args(["--model", job["checkpoint"], "--input", job["input"], "--output", "-",
                                      "--max-new-tokens", str(job["new_tokens"])])
    processor = Idefics3Processor.from_pretrained(job["checkpoint"], do_image_splitting=job["splitting"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], dtype="fp32", progress=False)
    rows = read_rows(Path(job["input"]))
    passes = []
    for _ in range(2):
        records: List[dict] = []
        t0 = time.perf_counter()
        answer_rows(rows, processor, model, generation_options(args), job["batch"], len(rows), records.extend)
        passes.append((time.perf_counter() - t0, records))
    return summary(passes, job)


def reference(job: dict) -> dict:
    """A plain loop over the rows with transformers: processor, generate, batch_decode."""
    import torch
    from PIL import Image
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    from tests.reference import corrected_position_ids

    torch.set_num_threads(job["threads"])
    processor = Idefics3Processor.from_pretrained(job["checkpoint"], do_image_splitting=job["splitting"])
    model = Idefics3ForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="eager").eval()
    gen = json.loads((Path(job["checkpoint"]) / "generation_config.json").read_text())
    folder = Path(job["input"]).parent
    rows = [json.loads(line) for line in Path(job["input"]).read_text().splitlines()]

    def run(selected) -> List[dict]:
        records = []
        for row in selected:
            images = [Image.open(folder / name) for name in row["images"]]
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images)
                         + [{"type": "text", "text": row["prompt"]}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=prompt, images=[images], return_tensors="pt")
            inputs.pop("token_type_ids", None)  # the tokenizer adds them; Idefics3's generate refuses them
            with torch.inference_mode(), corrected_position_ids():
                out = model.generate(**inputs, max_new_tokens=job["new_tokens"], do_sample=False,
                                     eos_token_id=gen["eos_token_id"], pad_token_id=gen["pad_token_id"])
            new = out[0, inputs["input_ids"].shape[1]:].tolist()
            stop = next((i for i, t in enumerate(new) if t in gen["eos_token_id"]), None)
            records.append({"id": row["id"], "completion_tokens": len(new) if stop is None else stop + 1,
                            "answer": processor.batch_decode([new[:stop]], skip_special_tokens=True)[0].strip()})
        return records

    t0 = time.perf_counter()
    warm = run(rows[:1])
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = run(rows)
    return summary([(cold, warm), (time.perf_counter() - t0, records)], job)


def summary(passes, job: dict) -> dict:
    (cold_s, _), (seconds, records) = passes
    tokens = sum(r.get("completion_tokens", 0) for r in records)
    return dict(impl=job["impl"], batch=job["batch"], rows=len(records), seconds=round(seconds, 2),
                cold_seconds=round(cold_s, 2), completion_tokens=tokens, rows_per_s=round(len(records) / seconds, 3),
                tokens_per_s=round(tokens / seconds, 2), errors=sum("error" in r for r in records),
                peak_rss_mb=round(peak_rss_bytes() / 2**20), answers={str(r["id"]): r.get("answer") for r in records})


def child_main(job: dict) -> int:
    save_results(job, ours(job) if job["impl"] == "mindone_idefics3" else reference(job))
    return 0


# ----------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    m = result["machine"]
    ref = next((r for r in result["results"] if r["impl"] == "transformers"), None)
    lines = [f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gb']} GB RAM; MindSpore "
             f"{m['mindspore']}, torch {m.get('torch', '—')}, transformers {m.get('transformers', '—')}; {m['date']}; "
             f"load average {m['load_average_1min_at_start']:.1f} at start, {m['load_average_1min_at_end']:.1f} at end "
             "(the machine is shared).",
             f"Checkpoint: {result['checkpoint_shapes']}, random weights, fp32. Rows: {result['rows_per_pass']} photos of "
             f"{result['photo_size']}, {result['image_tiles']}; at most {result['new_tokens']} new tokens.", "",
             "| implementation | batch | rows/s | tokens/s | x transformers (rows/s) | timed pass (s) | cold pass (s) "
             "| peak RSS (MB) | answers = transformers |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["results"]:
        ratio = f"{r['rows_per_s'] / ref['rows_per_s']:.2f}" if ref else "—"
        same = r.get("answers_equal_to_reference", "—")
        lines.append(f"| {r['impl']} | {r['batch']} | {r['rows_per_s']:.3f} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{r['seconds']:.1f} | {r['cold_seconds']:.1f} | {r['peak_rss_mb']} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return script_main(argv, run_all, child_main)


def run_all(argv) -> int:
    args = parse_args(argv)
    load_at_start = os.getloadavg()[0]
    os.environ.setdefault("GLOG_v", "3")
    from mindone_idefics3.device import cpu_threads

    threads = cpu_threads()
    work = Path(args.work_dir)
    checkpoint = batch_checkpoint(work)
    source = write_photos(work / "batch-photos", args.rows, args.width, args.height)
    runs = [("mindone_idefics3", b) for b in args.batches] + ([("transformers", 1)] if args.reference == "hf" else [])
    jobs = [dict(impl=impl, batch=batch, checkpoint=str(checkpoint), input=str(source), threads=threads,
                 new_tokens=args.new_tokens, splitting=args.image_splitting) for impl, batch in runs]
    rows = run_jobs(Path(__file__).resolve(), jobs, lambda job: f"{job['impl']} batch {job['batch']}")
    ref = next((r for r in rows if r["impl"] == "transformers"), None)
    for r in rows:
        if ref and r is not ref:
            r["answers_equal_to_reference"] = f"{sum(r['answers'][k] == v for k, v in ref['answers'].items())}/" \
                                              f"{len(ref['answers'])}"
            r["rows_per_s_vs_transformers"] = round(r["rows_per_s"] / ref["rows_per_s"], 3)
            r["tokens_per_s_vs_transformers"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
    import importlib.metadata as md

    machine = dict(describe(threads, "CPU"), torch=md.version("torch"),
                   transformers=md.version("transformers"), load_average_1min_at_start=load_at_start,
                   load_average_1min_at_end=os.getloadavg()[0])
    result = dict(machine=machine, threads=threads, checkpoint_shapes=f"{PRESET} (benchmarks/bench/presets.py)",
                  rows_per_pass=args.rows, photo_size=f"{args.width}x{args.height}", new_tokens=args.new_tokens,
                  image_tiles=("split into 512-px tiles + a global view (SmolVLM's default)" if args.image_splitting
                               else "one 512-px tile per photo (--no-image-splitting)"),
                  definitions=__doc__, results=[{k: v for k, v in r.items() if k != "answers"} for r in rows])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0 if len(rows) == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
